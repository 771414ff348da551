//! The intake: one subscription to everything on the local broker, our own rule matching
//! (overlapping filters must not deliver a message twice), and the hand-off to the outbox.

use std::time::Duration;

use rumqttd::local::LinkError;
use rumqttd::Notification;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Link;
use crate::health::{inc, RateLimit, SharedHealth};
use crate::outbox::{Lane, NewMessage, OutboxHandle};
use crate::topics;

/// An uplink rule as the intake applies it.
#[derive(Debug, Clone)]
pub struct IntakeRule {
    pub filter: String,
    pub remote_prefix: String,
    pub qos: u8,
    pub lane: Lane,
}

/// After shutdown is signalled, keep draining what the broker already accepted until it has
/// been quiet this long (bounded by `DRAIN_MAX`).
const DRAIN_QUIET: Duration = Duration::from_millis(100);
const DRAIN_MAX: Duration = Duration::from_secs(1);

/// Reads every local message and queues those matched by a rule; returns after shutdown,
/// once the broker's backlog toward the intake is drained.
pub async fn run_intake(
    mut link: Link,
    rules: Vec<IntakeRule>,
    outbox: OutboxHandle,
    health: SharedHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    if rules.is_empty() {
        info!("no [[uplink]] rules: nothing is forwarded to the cloud");
        return;
    }
    if let Err(e) = link.tx.subscribe("#") {
        warn!(error = %e, "intake could not subscribe on the local broker; nothing will be forwarded");
        return;
    }
    let mut intake = Intake {
        rules,
        outbox,
        health,
        invalid_log: RateLimit::new(Duration::from_secs(10)),
        batch: Vec::with_capacity(MAX_BATCH),
    };
    loop {
        let next = tokio::select! {
            next = link.next() => next,
            _ = shutdown.changed() => break,
        };
        if !intake.take(&mut link, next) || !intake.flush().await {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    while let Ok(next) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + DRAIN_QUIET),
        link.next(),
    )
    .await
    {
        if !intake.take(&mut link, next) || !intake.flush().await {
            return;
        }
    }
}

/// Messages handed to the outbox at once: everything the broker had ready, up to this.
const MAX_BATCH: usize = 1024;

struct Intake {
    rules: Vec<IntakeRule>,
    outbox: OutboxHandle,
    health: SharedHealth,
    invalid_log: RateLimit,
    batch: Vec<NewMessage>,
}

impl Intake {
    /// Takes `next` and whatever else the link has ready into the batch; false when the
    /// intake cannot go on (link gone).
    fn take(&mut self, link: &mut Link, next: Result<Option<Notification>, LinkError>) -> bool {
        if !self.handle(next) {
            return false;
        }
        while self.batch.len() < MAX_BATCH {
            match link.try_next() {
                Some(next) => {
                    if !self.handle(next) {
                        return false;
                    }
                }
                None => break,
            }
        }
        true
    }

    /// Hands the batch to the outbox; false when the outbox is gone.
    async fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(MAX_BATCH));
        if self.outbox.push(batch).await.is_err() {
            warn!("outbox closed; intake stops");
            return false;
        }
        true
    }

    /// Returns false when the intake cannot go on (link gone).
    fn handle(&mut self, next: Result<Option<Notification>, LinkError>) -> bool {
        let notification = match next {
            Ok(Some(n)) => n,
            Ok(None) => return true,
            Err(e) => {
                warn!(error = %e, "intake link to the local broker closed");
                return false;
            }
        };
        let Notification::Forward(forward) = notification else {
            return true;
        };
        let publish = forward.publish;
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            inc(&self.health.counters.intake_invalid);
            if let Some(held) = self.invalid_log.check() {
                warn!(
                    earlier_warnings_suppressed = held,
                    "local message with a non-UTF-8 topic not forwarded"
                );
            }
            return true;
        };
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| topics::matches(&r.filter, topic))
        else {
            return true;
        };
        inc(&self.health.counters.received);
        let mut cloud_topic = String::with_capacity(rule.remote_prefix.len() + topic.len());
        cloud_topic.push_str(&rule.remote_prefix);
        cloud_topic.push_str(topic);
        // rumqttd does not check publish topics: one with a wildcard (or too long)
        // would make the cloud drop the connection on every resend.
        if let Err(why) = topics::valid_topic(&cloud_topic) {
            inc(&self.health.counters.intake_invalid);
            if let Some(held) = self.invalid_log.check() {
                warn!(topic, reason = %why, earlier_warnings_suppressed = held,
                    "local message not forwarded: its cloud topic is not a valid MQTT topic");
            }
            return true;
        }
        self.batch.push(NewMessage {
            topic: cloud_topic,
            size: (topic.len() + publish.payload.len()) as u64,
            payload: publish.payload,
            qos: rule.qos,
            lane: rule.lane,
        });
        true
    }
}
