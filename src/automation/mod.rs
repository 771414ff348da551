//! Local automation: `[[rule]]` threshold rules that the gateway runs itself, so that the
//! site looks after itself while the cloud is away.
//!
//! The broker's intake offers every local message, as it is published, to the [`Feed`];
//! those a rule's topic matches reach the rule task in batches, and no publisher ever
//! waits for it. The rule task owns every rule's state ([`engine`]), keeps monotonic time
//! for staleness and `min_interval`, and publishes decisions into the local broker with a
//! client of its own, so MQTT actuators and Modbus/serial writers act on them like on any
//! command.
//!
//! A decision reaches the intake like a device's message (and goes up when an `[[uplink]]`
//! rule matches it, so the cloud sees what the site decided). `check` refuses a rule whose
//! output topics a rule's topic can match, so that a decision never feeds a decision.

pub mod engine;
pub mod status;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::broker::internal::{Client, Publication as BrokerPublication, PublishError};
use crate::broker::message::Completion;
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
    topic: Arc<str>,
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

impl Clone for Feed {
    /// Another publisher's feed to the same rule task.
    fn clone(&self) -> Self {
        Feed {
            rules: self.rules.clone(),
            current: self.current.clone(),
            batch: Vec::new(),
            tx: self.tx.clone(),
            health: self.health.clone(),
            overrun_log: RateLimit::new(Duration::from_secs(10)),
        }
    }
}

impl Feed {
    /// Takes the rules a reload sent, if any.
    pub fn refresh(&mut self) {
        if self.rules.has_changed().unwrap_or(false) {
            self.current = self.rules.borrow_and_update().clone();
        }
    }

    /// A local message, as it is published.
    pub fn offer(&mut self, topic: &Arc<str>, payload: &Bytes) {
        if self.batch.is_empty() {
            self.refresh();
        }
        if self
            .current
            .iter()
            .any(|r| topics::matches(&r.topic, topic))
        {
            self.batch.push(Reading {
                topic: topic.clone(),
                payload: payload.clone(),
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
/// and `min_interval`, and publishes decisions with `client`. Returns at shutdown, or when
/// the broker can no longer take its publications (the rules could not act any more: the
/// supervisor restarts the gateway).
pub async fn run(
    mut client: Client,
    mut rules: watch::Receiver<RuleSet>,
    mut readings: mpsc::Receiver<Vec<Reading>>,
    health: SharedHealth,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut engine = Engine::new(health.clone());
    engine.apply(&rules.borrow_and_update(), Instant::now());
    let mut broker = Confirmations::new();
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
                        engine.reading(&reading.topic, &reading.payload, now, &mut out);
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
            Some(key) = broker.completed.recv() => broker.confirmed(key),
            _ = probe.serve() => {}
            _ = shutdown.changed() => return,
        }
        for publication in out.drain(..) {
            if let Err(e) = broker.publish(&mut client, publication, &health).await {
                error!(error = %e, "the local broker cannot take the rules' publications; rules cannot act");
                return;
            }
        }
    }
}

/// The rules' QoS 1 publications whose hand-off is not complete yet, oldest first.
struct Confirmations {
    next: u64,
    waiting: VecDeque<Waiting>,
    completions: mpsc::UnboundedSender<u64>,
    completed: mpsc::UnboundedReceiver<u64>,
}

struct Waiting {
    key: u64,
    since: Instant,
    topic: String,
    rule: Arc<RuleHealth>,
}

impl Confirmations {
    fn new() -> Self {
        let (completions, completed) = mpsc::unbounded_channel();
        Confirmations {
            next: 0,
            waiting: VecDeque::new(),
            completions,
            completed,
        }
    }

    async fn publish(
        &mut self,
        client: &mut Client,
        p: Publication,
        health: &SharedHealth,
    ) -> Result<(), PublishError> {
        let completion = match p.qos {
            Qos::AtMostOnce => None,
            Qos::AtLeastOnce => {
                self.next += 1;
                Some(Completion {
                    done: self.completions.clone(),
                    key: self.next,
                })
            }
        };
        let key = completion.as_ref().map(|c| c.key);
        let published = client
            .publish(BrokerPublication {
                topic: p.topic.clone(),
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                completion,
            })
            .await;
        match published {
            Ok(_) => {}
            // An output topic that is not valid: that rule's problem, counted.
            Err(PublishError::Topic { topic, why }) => {
                inc(&p.rule.errors);
                inc(&health.counters.rule_errors);
                warn!(output = %topic, why, "a rule's output topic is not valid; not published");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if let Some(key) = key {
            self.waiting.push_back(Waiting {
                key,
                since: Instant::now(),
                topic: p.topic,
                rule: p.rule,
            });
        }
        Ok(())
    }

    /// The hand-off of publication `key` completed.
    fn confirmed(&mut self, key: u64) {
        if let Some(i) = self.waiting.iter().position(|w| w.key == key) {
            self.waiting.remove(i);
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
            warn!(output = %w.topic, "a subscriber of a rule's output did not acknowledge it within {CONFIRM_TIMEOUT:?}");
            self.waiting.pop_front();
        }
    }
}
