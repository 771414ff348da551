//! The intake: one subscription to everything on the local broker, our own rule matching
//! (overlapping filters must not deliver a message twice), and the hand-off to the outbox.

use std::time::Duration;

use rumqttd::Notification;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Link;
use crate::health::{inc, RateLimit, SharedHealth};
use crate::outbox::{NewMessage, OutboxHandle};
use crate::topics;

/// An uplink rule as the intake applies it.
#[derive(Debug, Clone)]
pub struct IntakeRule {
    pub filter: String,
    pub remote_prefix: String,
    pub qos: u8,
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
    };
    loop {
        tokio::select! {
            next = link.rx.next() => {
                if !intake.handle(&link, next).await {
                    return;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    while let Ok(Ok(next)) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + DRAIN_QUIET),
        link.rx.next(),
    )
    .await
    {
        if !intake.handle(&link, Ok(next)).await {
            return;
        }
    }
}

struct Intake {
    rules: Vec<IntakeRule>,
    outbox: OutboxHandle,
    health: SharedHealth,
    invalid_log: RateLimit,
}

impl Intake {
    /// Returns false when the intake cannot go on (link or outbox gone).
    async fn handle(
        &mut self,
        link: &Link,
        next: Result<Option<Notification>, rumqttd::local::LinkError>,
    ) -> bool {
        let notification = match next {
            Ok(Some(n)) => n,
            Ok(None) => return true,
            Err(e) => {
                warn!(error = %e, "intake link to the local broker closed");
                return false;
            }
        };
        match notification {
            Notification::Forward(forward) => {
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
                let message = NewMessage {
                    topic: format!("{}{}", rule.remote_prefix, topic),
                    size: (topic.len() + publish.payload.len()) as u64,
                    payload: publish.payload,
                    qos: rule.qos,
                };
                if self.outbox.push(message).await.is_err() {
                    warn!("outbox closed; intake stops");
                    return false;
                }
            }
            Notification::Unschedule => {
                if let Err(e) = link.rx.wake().await {
                    warn!(error = %e, "intake could not resume its link");
                    return false;
                }
            }
            _ => {}
        }
        true
    }
}
