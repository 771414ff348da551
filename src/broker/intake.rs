//! The intake: what the broker's other consumers take of every message as it is
//! published, in the publisher's own task. The first `[[uplink]]` rule whose filter
//! matches decides the cloud topic and QoS (overlapping rules never forward a message
//! twice), and the `[[rule]]`s get the messages their topics match. A device's PUBACK
//! waits until the outbox has the batch (promise: "in the gateway's care"); a full outbox
//! makes the publisher wait, so its connection is not read (back-pressure).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::message::{Message, OriginKind};
use crate::automation::Feed;
use crate::health::{inc, RateLimit, SharedHealth};
use crate::outbox::{Lane, NewMessage, OutboxError, OutboxHandle};
use crate::topics;

/// An uplink rule as the intake applies it.
#[derive(Debug, Clone)]
pub struct IntakeRule {
    pub filter: String,
    pub remote_prefix: String,
    pub qos: u8,
    pub lane: Lane,
}

/// The uplink rules in force; a reload replaces the whole set at once, so every message is
/// matched against one set, the old or the new.
pub type Rules = watch::Receiver<Arc<Vec<IntakeRule>>>;

/// What every publisher's [`Batch`] is made from.
#[derive(Clone)]
pub struct Intake {
    pub rules: Rules,
    pub feed: Feed,
    pub outbox: OutboxHandle,
    pub health: SharedHealth,
}

impl Intake {
    pub fn batch(&self) -> Batch {
        let mut rules = self.rules.clone();
        let current = rules.borrow_and_update().clone();
        Batch {
            rules,
            current,
            feed: self.feed.clone(),
            outbox: self.outbox.clone(),
            health: self.health.clone(),
            messages: Vec::new(),
            invalid_log: RateLimit::new(Duration::from_secs(10)),
        }
    }
}

/// One publisher's messages for the outbox and the rules, handed over together.
pub struct Batch {
    rules: Rules,
    current: Arc<Vec<IntakeRule>>,
    feed: Feed,
    outbox: OutboxHandle,
    health: SharedHealth,
    messages: Vec<NewMessage>,
    invalid_log: RateLimit,
}

impl Batch {
    /// Offers a message that was just published; true when an uplink rule took it.
    pub fn offer(&mut self, msg: &Message) -> bool {
        if self.messages.is_empty() && self.rules.has_changed().unwrap_or(false) {
            self.current = self.rules.borrow_and_update().clone();
        }
        self.feed.offer(&msg.topic, &msg.payload);
        // A command from the cloud never goes back up (`check` refuses configs where one
        // would, and this keeps it so).
        if msg.origin.kind == OriginKind::Cloud {
            return false;
        }
        let Some(rule) = self
            .current
            .iter()
            .find(|r| topics::matches(&r.filter, &msg.topic))
        else {
            return false;
        };
        inc(&self.health.counters.received);
        let mut cloud_topic = String::with_capacity(rule.remote_prefix.len() + msg.topic.len());
        cloud_topic.push_str(&rule.remote_prefix);
        cloud_topic.push_str(&msg.topic);
        // Too long upstream: the cloud would drop the connection on every resend.
        if let Err(why) = topics::valid_topic(&cloud_topic) {
            inc(&self.health.counters.intake_invalid);
            if let Some(held) = self.invalid_log.check() {
                warn!(topic = %msg.topic, reason = %why, earlier_warnings_suppressed = held,
                    "local message not forwarded: its cloud topic is not a valid MQTT topic");
            }
            return false;
        }
        self.messages.push(NewMessage {
            topic: cloud_topic,
            size: msg.weight() as u64,
            payload: msg.payload.clone(),
            qos: rule.qos,
            lane: rule.lane,
        });
        true
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Hands what was taken to the outbox (waiting while it is saturated) and to the rules
    /// (never waiting). An error means the outbox has stopped: nothing taken since the last
    /// flush is in the gateway's care.
    pub async fn flush(&mut self) -> Result<(), OutboxError> {
        self.feed.flush();
        if self.messages.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.messages);
        self.outbox.push(batch).await
    }
}
