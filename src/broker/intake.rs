//! The intake: one subscription to everything on the local broker, our own rule matching
//! (overlapping filters must not deliver a message twice), and the hand-off to the outbox,
//! and to the `[[rule]]`s (which so cost no second delivery of a message).

use std::sync::Arc;
use std::time::Duration;

use rumqttd::local::LinkError;
use rumqttd::Notification;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Link;
use crate::automation::Feed;
use crate::health::{inc, RateLimit, SharedHealth};
use crate::outbox::{Lane, NewMessage, OutboxHandle};
use crate::supervisor::Probe;
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

/// The uplink rules in force; a reload replaces the whole set at once, so every message is
/// matched against one set, the old or the new.
pub type Rules = watch::Receiver<Arc<Vec<IntakeRule>>>;

/// Reads every local message and queues those matched by a rule; returns after shutdown,
/// once the broker's backlog toward the intake is drained.
pub async fn run_intake(
    mut link: Link,
    mut rules: Rules,
    mut automation: Feed,
    outbox: OutboxHandle,
    health: SharedHealth,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    // Without rules there is nothing to read: the subscription waits for the first
    // [[uplink]] or [[rule]].
    while rules.borrow_and_update().is_empty() && !automation.has_rules() {
        info!("no [[uplink]] or [[rule]] sections: nothing is forwarded to the cloud or automated");
        tokio::select! {
            changed = rules.changed() => if changed.is_err() { return },
            _ = automation.changed() => {}
            _ = probe.serve() => {}
            _ = shutdown.changed() => return,
        }
    }
    if let Err(e) = link.tx.subscribe("#") {
        warn!(error = %e, "intake could not subscribe on the local broker; nothing will be forwarded");
        return;
    }
    let mut intake = Intake {
        rules: rules.borrow().clone(),
        automation,
        outbox,
        health,
        invalid_log: RateLimit::new(Duration::from_secs(10)),
        batch: Vec::with_capacity(MAX_BATCH),
    };
    loop {
        let next = tokio::select! {
            next = link.next() => next,
            _ = probe.serve() => continue,
            _ = shutdown.changed() => break,
        };
        probe.tick();
        intake.rules = rules.borrow_and_update().clone();
        intake.automation.refresh();
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
    rules: Arc<Vec<IntakeRule>>,
    /// Messages for the `[[rule]]`s.
    automation: Feed,
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
        while self.batch.len() < MAX_BATCH && self.automation.len() < MAX_BATCH {
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

    /// Hands the batch to the outbox (and the rules theirs); false when the outbox is gone.
    async fn flush(&mut self) -> bool {
        self.automation.flush();
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
        self.automation.offer(topic, &publish);
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
