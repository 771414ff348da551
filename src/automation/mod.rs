//! Local automation: `[[rule]]` threshold rules that the gateway runs itself, so that the
//! site looks after itself while the cloud is away.
//!
//! The intake, which reads every local message once, offers each to the [`Feed`]; those a
//! rule's topic matches reach the rule task in batches, and the intake never waits for it.
//! The rule task owns every rule's state ([`engine`]), keeps monotonic time for staleness
//! and `min_interval`, and publishes decisions into the local broker on a link of its own,
//! so MQTT actuators and Modbus/serial writers act on them like on any command.
//!
//! rumqttd's messages carry no origin: a decision reaches the intake like a device's
//! message (and goes up when an `[[uplink]]` rule matches it). `check` refuses a rule whose
//! output topics a rule's topic can match, so that a decision never feeds a decision.

pub mod engine;
pub mod status;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::LinkError;
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::broker::Link;
use crate::config::{Qos, ThresholdRule};
use crate::health::{add, inc, RateLimit, SharedHealth};
use crate::supervisor::Probe;
use crate::topics;
use engine::{Engine, Publication};
use status::RuleHealth;

/// The rules in force; a reload replaces the whole set at once.
pub type RuleSet = Arc<Vec<ThresholdRule>>;

/// Batches of readings waiting for the rule task. When it falls this far behind, readings
/// are dropped and counted rather than slowing the intake (and so the uplink) down.
const QUEUE: usize = 64;
/// A publication the local broker has not confirmed in this time is counted as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// A local message a rule's topic matched.
#[derive(Debug)]
pub struct Reading {
    topic: Bytes,
    payload: Bytes,
}

/// The rule task's inbox, for the intake (see [`Feed`]), and its receiving end.
pub fn feed(
    rules: watch::Receiver<RuleSet>,
    health: SharedHealth,
) -> (Feed, mpsc::Receiver<Vec<Reading>>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let current = rules.borrow().clone();
    let feed = Feed {
        rules,
        current,
        batch: Vec::new(),
        tx: Some(tx),
        health,
        overrun_log: RateLimit::new(Duration::from_secs(10)),
    };
    (feed, rx)
}

/// The intake's side: it offers every local message, and hands the batch over with its
/// own. Matching costs a topic comparison per rule; the message itself is shared, not
/// copied.
pub struct Feed {
    rules: watch::Receiver<RuleSet>,
    current: RuleSet,
    batch: Vec<Reading>,
    /// None once the rule task is gone.
    tx: Option<mpsc::Sender<Vec<Reading>>>,
    health: SharedHealth,
    overrun_log: RateLimit,
}

impl Feed {
    /// Whether the config has rules.
    pub fn has_rules(&mut self) -> bool {
        self.refresh();
        !self.current.is_empty()
    }

    /// Waits until a reload changes the rules, and takes them.
    pub async fn changed(&mut self) {
        if self.rules.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.current = self.rules.borrow_and_update().clone();
    }

    /// Takes the rules a reload sent, if any.
    pub fn refresh(&mut self) {
        if self.rules.has_changed().unwrap_or(false) {
            self.current = self.rules.borrow_and_update().clone();
        }
    }

    /// A local message on `topic` (`publish.topic` as text).
    pub fn offer(&mut self, topic: &str, publish: &Publish) {
        if self
            .current
            .iter()
            .any(|r| topics::matches(&r.topic, topic))
        {
            self.batch.push(Reading {
                topic: publish.topic.clone(),
                payload: publish.payload.clone(),
            });
        }
    }

    /// Readings gathered and not handed over yet.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Hands the gathered readings to the rule task, without waiting.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let Some(tx) = &self.tx else { return };
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(batch)) => {
                add(&self.health.counters.rule_overruns, batch.len() as u64);
                if let Some(held) = self.overrun_log.check() {
                    warn!(
                        readings = batch.len(),
                        earlier_warnings_suppressed = held,
                        "the rule task fell behind; these readings were not evaluated by the rules"
                    );
                }
            }
            Err(TrySendError::Closed(_)) => {
                warn!("the rule task is gone; rules are no longer evaluated");
                self.tx = None;
            }
        }
    }
}

/// The rule task: evaluates the readings the intake hands over, keeps time for staleness
/// and `min_interval`, and publishes decisions on `link`. Returns at shutdown, or when the
/// link to the broker fails (the rules could not act any more: the supervisor restarts the
/// gateway).
pub async fn run(
    mut link: Link,
    state: Option<crate::state::State>,
    mut rules: watch::Receiver<RuleSet>,
    mut readings: mpsc::Receiver<Vec<Reading>>,
    health: SharedHealth,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut engine = Engine::new(health.clone());
    engine.apply(&rules.borrow_and_update(), Instant::now());
    let mut broker = Confirmations::default();
    let mut out = Vec::new();
    let (mut rules_open, mut readings_open) = (true, true);
    loop {
        let deadline = [engine.next_deadline(), broker.deadline()]
            .into_iter()
            .flatten()
            .min();
        let sleep = tokio::time::sleep_until(
            deadline.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        tokio::select! {
            batch = readings.recv(), if readings_open => match batch {
                Some(batch) => {
                    let now = Instant::now();
                    for reading in batch {
                        if let Ok(topic) = std::str::from_utf8(&reading.topic) {
                            engine.reading(topic, &reading.payload, now, &mut out);
                        }
                    }
                    probe.tick();
                }
                None => readings_open = false,
            },
            _ = sleep, if deadline.is_some() => {
                let now = Instant::now();
                engine.tick(now, &mut out);
                broker.expire(now, &health);
            }
            changed = rules.changed(), if rules_open => match changed {
                Ok(()) => engine.apply(&rules.borrow_and_update(), Instant::now()),
                Err(_) => rules_open = false,
            },
            next = link.next() => {
                if let Err(e) = broker.notified(next) {
                    error!(error = %e, "the rules' link to the local broker failed; rules cannot act");
                    return;
                }
            }
            _ = probe.serve() => {}
            _ = shutdown.changed() => return,
        }
        for publication in out.drain(..) {
            if let Err(e) = broker.publish(&mut link, state.as_ref(), publication).await {
                error!(error = %e, "the rules' link to the local broker failed; rules cannot act");
                return;
            }
        }
    }
}

/// The rules' QoS 1 publications the broker has yet to confirm, oldest first.
#[derive(Default)]
struct Confirmations {
    pkid: u16,
    waiting: VecDeque<Waiting>,
}

struct Waiting {
    pkid: u16,
    since: Instant,
    topic: String,
    rule: Arc<RuleHealth>,
}

impl Confirmations {
    async fn publish(
        &mut self,
        link: &mut Link,
        state: Option<&crate::state::State>,
        p: Publication,
    ) -> Result<(), LinkError> {
        let (pkid, qos) = match p.qos {
            Qos::AtMostOnce => (None, 0),
            Qos::AtLeastOnce => {
                self.pkid = self.pkid.checked_add(1).unwrap_or(1);
                (Some(self.pkid), 1)
            }
        };
        // A retained decision, and one queued for an offline actuator's persistent
        // session, are recorded before the broker has them: a restart keeps both.
        if let Some(state) = state {
            state.published(&p.topic, &p.payload, qos, p.retain);
        }
        link.publish(&p.topic, p.payload, p.retain, pkid).await?;
        if let Some(pkid) = pkid {
            self.waiting.push_back(Waiting {
                pkid,
                since: Instant::now(),
                topic: p.topic,
                rule: p.rule,
            });
        }
        Ok(())
    }

    /// A notification from the broker: the confirmation of a publication.
    fn notified(&mut self, next: Result<Option<Notification>, LinkError>) -> Result<(), String> {
        // rumqttd does not export its Ack type; its Packet form is public.
        match next
            .map_err(|e| e.to_string())?
            .and_then(Option::<Packet>::from)
        {
            Some(Packet::PubAck(ack, _)) => {
                if let Some(i) = self.waiting.iter().position(|w| w.pkid == ack.pkid) {
                    self.waiting.remove(i);
                }
                Ok(())
            }
            Some(Packet::Disconnect(..)) => Err("disconnected by the broker".into()),
            _ => Ok(()),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.waiting.front().map(|w| w.since + CONFIRM_TIMEOUT)
    }

    /// Counts the publications not confirmed in time as failed.
    fn expire(&mut self, now: Instant, health: &SharedHealth) {
        while let Some(w) = self.waiting.front() {
            if now < w.since + CONFIRM_TIMEOUT {
                return;
            }
            inc(&w.rule.errors);
            inc(&health.counters.rule_errors);
            warn!(output = %w.topic, "the local broker did not confirm a rule's publication within {CONFIRM_TIMEOUT:?}");
            self.waiting.pop_front();
        }
    }
}
