//! The rules proper: per output topic, a threshold with hysteresis fed with readings and
//! with the passing of monotonic time (staleness, `min_interval`). The engine decides what
//! to publish; the task in `mod.rs` publishes it.
//!
//! An output publishes only when the payload it wants the actuator to hold changes: a
//! reading above `above` publishes `on` once, however many follow; a reading between the
//! two thresholds keeps the last decision.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::status::{OutputHealth, OutputState, RuleHealth};
use crate::config::{Qos, Threshold, ThresholdRule};
use crate::health::{inc, RateLimit, SharedHealth};
use crate::topics::{self, Template};

/// A repeated complaint about one rule's readings is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Output topics one rule keeps at most: a device publishing on ever new topics must not
/// grow the gateway's memory without bound.
const MAX_OUTPUTS: usize = 4096;

/// A payload for the local broker.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// The deciding rule's health, for what the broker makes of it.
    pub rule: Arc<RuleHealth>,
}

/// Every rule of the running config, with the state of its outputs.
pub struct Engine {
    rules: Vec<Rule>,
    health: SharedHealth,
}

impl Engine {
    pub fn new(health: SharedHealth) -> Self {
        Engine {
            rules: Vec::new(),
            health,
        }
    }

    /// Takes the rules of a (re)loaded config. A rule whose config did not change keeps
    /// its outputs' state; a changed rule starts over (its outputs unknown until a reading
    /// decides); a removed rule is forgotten.
    pub fn apply(&mut self, rules: &[ThresholdRule], now: Instant) {
        let mut old: HashMap<String, Rule> = self
            .rules
            .drain(..)
            .map(|rule| (rule.config.name.clone(), rule))
            .collect();
        for config in rules {
            let rule = match old.remove(&config.name) {
                Some(rule) if rule.config == *config => rule,
                changed => {
                    let health = self.health.rules.rule(&config.name);
                    if changed.is_some() {
                        health.clear_outputs();
                    }
                    debug!(rule = %config.name, changed = changed.is_some(), "rule starts");
                    Rule::new(config.clone(), health, now)
                }
            };
            self.rules.push(rule);
        }
        for name in old.keys() {
            self.health.rules.remove(name);
            debug!(rule = %name, "rule removed");
        }
    }

    /// A local message: every rule whose topic matches it reads it.
    pub fn reading(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        out: &mut Vec<Publication>,
    ) {
        for rule in &mut self.rules {
            rule.reading(topic, payload, now, &self.health, out);
        }
    }

    /// Publishes what `min_interval` held back and is now due, and marks the outputs
    /// without a reading for `stale_after` stale.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Publication>) {
        for rule in &mut self.rules {
            rule.tick(now, &self.health, out);
        }
    }

    /// When [`Engine::tick`] has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.rules.iter().filter_map(Rule::next_deadline).min()
    }
}

/// What a reading decided for an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Unknown,
    Off,
    On,
}

fn decide(threshold: Threshold, was: Decision, value: f64) -> Decision {
    match threshold {
        Threshold::Above { above, .. } if value > above => Decision::On,
        Threshold::Above { clear_below, .. } if value < clear_below => Decision::Off,
        Threshold::Below { below, .. } if value < below => Decision::On,
        Threshold::Below { clear_above, .. } if value > clear_above => Decision::Off,
        _ => was,
    }
}

/// Why an output publishes, for the log.
#[derive(Debug, Clone, Copy)]
enum Cause {
    Reading(f64),
    Stale(Duration),
    /// `min_interval` had held the payload back.
    Held,
}

struct Rule {
    config: ThresholdRule,
    template: Template,
    path: Option<Vec<String>>,
    on: Bytes,
    off: Bytes,
    stale: Option<(Duration, Bytes)>,
    outputs: HashMap<String, Output>,
    health: Arc<RuleHealth>,
    bad_reading_log: RateLimit,
    bad_topic_log: RateLimit,
}

impl Rule {
    fn new(config: ThresholdRule, health: Arc<RuleHealth>, now: Instant) -> Self {
        let template = Template::parse(&config.publish);
        let mut outputs = HashMap::new();
        // Without a wildcard the output is known from the start, and so is a sensor that
        // never reports.
        if !config.topic.contains(['+', '#']) {
            let topic = template.fill(&[]);
            let output = Output::new(topic.clone(), health.output(&topic), now);
            outputs.insert(topic, output);
        }
        Rule {
            template,
            path: config
                .value_path
                .as_ref()
                .map(|path| path.split('.').map(str::to_owned).collect()),
            on: Bytes::from(config.on.clone()),
            off: Bytes::from(config.off.clone()),
            stale: config
                .stale
                .as_ref()
                .map(|s| (s.after, Bytes::from(s.payload.clone()))),
            outputs,
            health,
            bad_reading_log: RateLimit::new(LOG_EVERY),
            bad_topic_log: RateLimit::new(LOG_EVERY),
            config,
        }
    }

    fn reading(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        health: &SharedHealth,
        out: &mut Vec<Publication>,
    ) {
        let mut captures = Vec::new();
        if !topics::captures(&self.config.topic, topic, &mut captures) {
            return;
        }
        inc(&self.health.readings);
        inc(&health.counters.rule_readings);
        let value = match read_number(payload, self.path.as_deref()) {
            Ok(value) => value,
            Err(why) => {
                inc(&self.health.not_numeric);
                inc(&health.counters.rule_not_numeric);
                if let Some(held) = self.bad_reading_log.check() {
                    let preview = String::from_utf8_lossy(&payload[..payload.len().min(64)]);
                    warn!(rule = %self.config.name, %topic, reason = why, payload = %preview,
                        earlier_warnings_suppressed = held, "rule: reading ignored, no number in it");
                }
                return;
            }
        };
        let outputs_full = self.outputs.len() >= MAX_OUTPUTS;
        let output = match self.outputs.entry(self.template.fill(&captures)) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                // The template may make a topic MQTT does not allow (too long).
                let refused = match topics::valid_topic(entry.key()) {
                    Err(why) => Some(format!("it {why}")),
                    Ok(()) if outputs_full => {
                        Some(format!("the rule has {MAX_OUTPUTS} output topics already"))
                    }
                    Ok(()) => None,
                };
                if let Some(why) = refused {
                    inc(&self.health.errors);
                    inc(&health.counters.rule_errors);
                    if let Some(held) = self.bad_topic_log.check() {
                        warn!(rule = %self.config.name, %topic, output = %entry.key(), reason = %why,
                            earlier_warnings_suppressed = held, "rule: reading ignored, no output topic for it");
                    }
                    return;
                }
                let topic = entry.key().clone();
                let health = self.health.output(&topic);
                entry.insert(Output::new(topic, health, now))
            }
        };
        output.health.reading(value, now);
        output.last_reading = now;
        if std::mem::replace(&mut output.stale, false) {
            info!(rule = %self.config.name, %topic, value, "rule: readings again after staleness");
        }
        output.decision = decide(self.config.threshold, output.decision, value);
        let payload = match output.decision {
            Decision::On => Some(&self.on),
            Decision::Off => Some(&self.off),
            Decision::Unknown => None,
        };
        if let Some(payload) = payload {
            if output.want(payload, now, self.config.min_interval) {
                let cause = Cause::Reading(value);
                out.push(publication(
                    &self.config,
                    &self.health,
                    output,
                    cause,
                    health,
                ));
            }
        }
        output.health.set_state(output.state(), now);
    }

    fn tick(&mut self, now: Instant, health: &SharedHealth, out: &mut Vec<Publication>) {
        for output in self.outputs.values_mut() {
            if output
                .held_due(self.config.min_interval)
                .is_some_and(|due| due <= now)
            {
                if let Some(payload) = output.held.take() {
                    output.mark_published(payload, now);
                    out.push(publication(
                        &self.config,
                        &self.health,
                        output,
                        Cause::Held,
                        health,
                    ));
                }
            }
            let Some((after, payload)) = &self.stale else {
                continue;
            };
            if output.stale || output.stale_due(*after).is_none_or(|due| due > now) {
                continue;
            }
            output.stale = true;
            output.health.set_state(OutputState::Stale, now);
            inc(&self.health.stale);
            inc(&health.counters.rule_stale);
            let silent = now.saturating_duration_since(output.last_reading);
            if output.want(payload, now, self.config.min_interval) {
                out.push(publication(
                    &self.config,
                    &self.health,
                    output,
                    Cause::Stale(silent),
                    health,
                ));
            } else {
                warn!(rule = %self.config.name, output = %output.topic, silent_ms = silent.as_millis() as u64,
                    "rule output stale: no reading within stale_after; it already holds stale_payload");
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stale_after = self.stale.as_ref().map(|(after, _)| *after);
        self.outputs
            .values()
            .filter_map(|output| {
                let stale = stale_after
                    .filter(|_| !output.stale)
                    .and_then(|after| output.stale_due(after));
                let held = output.held_due(self.config.min_interval);
                stale.into_iter().chain(held).min()
            })
            .min()
    }
}

/// Logs and counts a decision; the publication the output's last payload makes.
fn publication(
    config: &ThresholdRule,
    rule: &Arc<RuleHealth>,
    output: &Output,
    cause: Cause,
    health: &SharedHealth,
) -> Publication {
    inc(&rule.publications);
    inc(&health.counters.rule_publications);
    let payload = output.published.clone().unwrap_or_default();
    let text = String::from_utf8_lossy(&payload);
    let state = output.state().as_str();
    match cause {
        Cause::Reading(value) => {
            info!(rule = %config.name, output = %output.topic, value, payload = %text, "rule decision: {state}")
        }
        Cause::Held => {
            info!(rule = %config.name, output = %output.topic, payload = %text, "rule decision: {state} (held back by min_interval until now)")
        }
        Cause::Stale(silent) => {
            warn!(rule = %config.name, output = %output.topic, silent_ms = silent.as_millis() as u64, payload = %text,
                "rule output stale: no reading within stale_after; published stale_payload")
        }
    }
    Publication {
        topic: output.topic.clone(),
        payload,
        qos: config.qos,
        retain: config.retain,
        rule: rule.clone(),
    }
}

/// One output topic of a rule.
struct Output {
    topic: String,
    decision: Decision,
    stale: bool,
    /// The last reading (or when the output appeared, before one).
    last_reading: Instant,
    /// The payload last published: only a different one is published.
    published: Option<Bytes>,
    last_publish: Option<Instant>,
    /// A payload `min_interval` holds back, published when it ends unless the decision
    /// turns back first.
    held: Option<Bytes>,
    health: Arc<OutputHealth>,
}

impl Output {
    fn new(topic: String, health: Arc<OutputHealth>, now: Instant) -> Self {
        Output {
            topic,
            decision: Decision::Unknown,
            stale: false,
            last_reading: now,
            published: None,
            last_publish: None,
            held: None,
            health,
        }
    }

    fn state(&self) -> OutputState {
        match (self.stale, self.decision) {
            (true, _) => OutputState::Stale,
            (false, Decision::Unknown) => OutputState::Unknown,
            (false, Decision::Off) => OutputState::Off,
            (false, Decision::On) => OutputState::On,
        }
    }

    /// Whether `payload` is to be published now: not when the output already holds it,
    /// nor while `min_interval` since the last publication runs (then it is held).
    fn want(&mut self, payload: &Bytes, now: Instant, min_interval: Duration) -> bool {
        if self.published.as_ref() == Some(payload) {
            self.held = None;
            return false;
        }
        let too_soon = self
            .last_publish
            .is_some_and(|at| at.checked_add(min_interval).is_none_or(|due| now < due));
        if too_soon {
            self.held = Some(payload.clone());
            return false;
        }
        self.mark_published(payload.clone(), now);
        true
    }

    fn mark_published(&mut self, payload: Bytes, now: Instant) {
        self.published = Some(payload);
        self.last_publish = Some(now);
        self.held = None;
    }

    fn held_due(&self, min_interval: Duration) -> Option<Instant> {
        self.held.as_ref()?;
        self.last_publish?.checked_add(min_interval)
    }

    fn stale_due(&self, after: Duration) -> Option<Instant> {
        self.last_reading.checked_add(after)
    }
}

/// The number in a payload: the payload itself (`25.5`, ` 25.5\n`, `true`/`false` as 1/0),
/// or the field at `path` of a JSON payload (a number, a boolean, or a string holding a
/// number).
fn read_number(payload: &[u8], path: Option<&[String]>) -> Result<f64, &'static str> {
    let Some(path) = path else {
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8 text")?;
        return plain_number(text).ok_or("not a number");
    };
    let doc: serde_json::Value = serde_json::from_slice(payload).map_err(|_| "not JSON")?;
    let mut value = &doc;
    for key in path {
        value = match value {
            serde_json::Value::Object(fields) => fields.get(key.as_str()),
            serde_json::Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
        .ok_or("no field at value_path")?;
    }
    let number = match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Bool(b) => Some(f64::from(u8::from(*b))),
        serde_json::Value::String(s) => plain_number(s),
        _ => None,
    };
    number
        .filter(|n| n.is_finite())
        .ok_or("the field at value_path is not a number")
}

fn plain_number(text: &str) -> Option<f64> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("true") {
        return Some(1.0);
    }
    if text.eq_ignore_ascii_case("false") {
        return Some(0.0);
    }
    text.parse::<f64>().ok().filter(|n| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Staleness;

    fn fans() -> ThresholdRule {
        ThresholdRule {
            name: "zone fans".into(),
            topic: "warehouse/+/temp".into(),
            publish: "warehouse/{1}/fan/command".into(),
            threshold: Threshold::Above {
                above: 30.0,
                clear_below: 28.0,
            },
            on: "ON".into(),
            off: "OFF".into(),
            value_path: None,
            qos: Qos::AtLeastOnce,
            retain: false,
            min_interval: Duration::ZERO,
            stale: None,
        }
    }

    struct Run {
        engine: Engine,
        health: SharedHealth,
        start: Instant,
    }

    impl Run {
        fn new(rules: &[ThresholdRule]) -> Self {
            let health = SharedHealth::default();
            let mut engine = Engine::new(health.clone());
            let start = Instant::now();
            engine.apply(rules, start);
            Run {
                engine,
                health,
                start,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.start + Duration::from_millis(ms)
        }

        /// `(topic, payload)` published for a reading at `ms`.
        fn read(&mut self, ms: u64, topic: &str, payload: &str) -> Vec<(String, String)> {
            let mut out = Vec::new();
            self.engine
                .reading(topic, payload.as_bytes(), self.at(ms), &mut out);
            published(out)
        }

        fn tick(&mut self, ms: u64) -> Vec<(String, String)> {
            let mut out = Vec::new();
            self.engine.tick(self.at(ms), &mut out);
            published(out)
        }

        fn state(&self, rule: &str, output: &str) -> &'static str {
            self.health.rules.snapshot()[rule].outputs[output].state
        }
    }

    fn published(out: Vec<Publication>) -> Vec<(String, String)> {
        out.into_iter()
            .map(|p| (p.topic, String::from_utf8_lossy(&p.payload).into_owned()))
            .collect()
    }

    fn one(topic: &str, payload: &str) -> Vec<(String, String)> {
        vec![(topic.to_owned(), payload.to_owned())]
    }

    const ZONE1: &str = "warehouse/zone1/fan/command";

    #[test]
    fn hysteresis_publishes_each_change_once() {
        let mut run = Run::new(&[fans()]);
        let mut seen = Vec::new();
        for (i, value) in ["29", "31", "35", "29.5", "30.5", "28", "27.9", "25", "29"]
            .iter()
            .enumerate()
        {
            seen.extend(run.read(i as u64, "warehouse/zone1/temp", value));
        }
        assert_eq!(seen, [one(ZONE1, "ON"), one(ZONE1, "OFF")].concat());
        assert_eq!(run.state("zone fans", ZONE1), "off");
        assert_eq!(
            run.read(10, "warehouse/zone2/temp", "20"),
            one("warehouse/zone2/fan/command", "OFF")
        );
        assert_eq!(run.read(11, "warehouse/zone2/hum", "99"), []);
        let counters = run.health.counters.snapshot();
        assert_eq!(
            (counters.rule_readings, counters.rule_publications),
            (10, 3)
        );
    }

    #[test]
    fn below_triggers_on_falling_values() {
        let rule = ThresholdRule {
            threshold: Threshold::Below {
                below: 5.0,
                clear_above: 7.0,
            },
            ..fans()
        };
        let mut run = Run::new(&[rule]);
        let topic = "warehouse/cold/temp";
        assert_eq!(run.read(0, topic, "6"), []);
        assert_eq!(
            run.read(1, topic, "4.9"),
            one("warehouse/cold/fan/command", "ON")
        );
        assert_eq!(run.read(2, topic, "6.9"), []);
        assert_eq!(
            run.read(3, topic, "7.1"),
            one("warehouse/cold/fan/command", "OFF")
        );
    }

    #[test]
    fn min_interval_holds_back_and_drops_what_turned_back() {
        let rule = ThresholdRule {
            min_interval: Duration::from_secs(10),
            ..fans()
        };
        let mut run = Run::new(&[rule]);
        let topic = "warehouse/zone1/temp";
        assert_eq!(run.read(0, topic, "31"), one(ZONE1, "ON"));
        assert_eq!(run.read(1000, topic, "20"), []);
        assert_eq!(run.engine.next_deadline(), Some(run.at(10_000)));
        assert_eq!(run.read(2000, topic, "35"), [], "turned back: nothing held");
        assert_eq!(run.engine.next_deadline(), None);
        assert_eq!(run.read(3000, topic, "20"), []);
        assert_eq!(run.tick(9_999), []);
        assert_eq!(run.tick(10_000), one(ZONE1, "OFF"));
        assert_eq!(run.tick(20_000), []);
    }

    #[test]
    fn a_silent_sensor_makes_its_output_stale_once() {
        let rule = ThresholdRule {
            stale: Some(Staleness {
                after: Duration::from_secs(60),
                payload: "ON".into(),
            }),
            ..fans()
        };
        let mut run = Run::new(&[rule]);
        let topic = "warehouse/zone1/temp";
        assert_eq!(run.read(0, topic, "20"), one(ZONE1, "OFF"));
        assert_eq!(run.engine.next_deadline(), Some(run.at(60_000)));
        assert_eq!(run.tick(59_999), []);
        assert_eq!(run.tick(60_000), one(ZONE1, "ON"));
        assert_eq!(run.state("zone fans", ZONE1), "stale");
        assert_eq!(run.tick(200_000), [], "stale once");
        assert_eq!(run.engine.next_deadline(), None);
        assert_eq!(
            run.read(200_001, topic, "29"),
            one(ZONE1, "OFF"),
            "the last decision again"
        );
        assert_eq!(run.state("zone fans", ZONE1), "off");
        assert_eq!(run.health.counters.snapshot().rule_stale, 1);
    }

    #[test]
    fn a_rule_without_wildcards_watches_its_sensor_from_the_start() {
        let rule = ThresholdRule {
            topic: "warehouse/zone1/temp".into(),
            publish: ZONE1.into(),
            stale: Some(Staleness {
                after: Duration::from_secs(5),
                payload: "ON".into(),
            }),
            ..fans()
        };
        let mut run = Run::new(&[rule]);
        assert_eq!(run.state("zone fans", ZONE1), "unknown");
        assert_eq!(run.tick(5000), one(ZONE1, "ON"));
    }

    #[test]
    fn readings_without_a_number_are_counted() {
        let rule = ThresholdRule {
            value_path: Some("data.readings.1".into()),
            ..fans()
        };
        let mut run = Run::new(&[rule]);
        let topic = "warehouse/zone1/temp";
        for payload in [
            "25",
            "{\"data\":{}}",
            "{\"data\":{\"readings\":[1,\"x\"]}}",
            "{",
        ] {
            assert_eq!(run.read(0, topic, payload), []);
        }
        assert_eq!(
            run.read(1, topic, r#"{"data":{"readings":[1,"31.5"]}}"#),
            one(ZONE1, "ON")
        );
        assert_eq!(
            run.read(2, topic, r#"{"data":{"readings":[1,20]}}"#),
            one(ZONE1, "OFF")
        );
        let counters = run.health.counters.snapshot();
        assert_eq!((counters.rule_readings, counters.rule_not_numeric), (6, 4));
        assert_eq!(run.health.rules.snapshot()["zone fans"].not_numeric, 4);
    }

    #[test]
    fn a_rule_keeps_a_bounded_number_of_outputs() {
        let mut run = Run::new(&[fans()]);
        for zone in 0..MAX_OUTPUTS {
            assert_eq!(
                run.read(0, &format!("warehouse/{zone}/temp"), "20").len(),
                1
            );
        }
        assert_eq!(run.read(0, "warehouse/one-more/temp", "20"), []);
        assert_eq!(run.read(0, "warehouse/a+b/temp", "20"), []);
        assert_eq!(run.health.counters.snapshot().rule_errors, 2);
        assert_eq!(
            run.read(1, "warehouse/7/temp", "31").len(),
            1,
            "known outputs go on"
        );
    }

    #[test]
    fn numbers_in_payloads() {
        assert_eq!(read_number(b" 25.5\n", None), Ok(25.5));
        assert_eq!(read_number(b"TRUE", None), Ok(1.0));
        assert_eq!(read_number(b"-1e3", None), Ok(-1000.0));
        assert_eq!(read_number(b"NaN", None), Err("not a number"));
        assert_eq!(read_number(b"inf", None), Err("not a number"));
        assert_eq!(read_number(b"\xff", None), Err("not UTF-8 text"));
        let path = ["value".to_owned()];
        assert_eq!(
            read_number(br#"{"value":21.5,"ts":1}"#, Some(&path)),
            Ok(21.5)
        );
        assert_eq!(read_number(br#"{"value":false}"#, Some(&path)), Ok(0.0));
        assert_eq!(
            read_number(br#"{"value":null}"#, Some(&path)),
            Err("the field at value_path is not a number")
        );
        assert_eq!(
            read_number(br#"[1]"#, Some(&path)),
            Err("no field at value_path")
        );
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_rules() {
        let humidity = ThresholdRule {
            name: "dehumidifier".into(),
            topic: "warehouse/+/humidity".into(),
            publish: "warehouse/{1}/dehumidifier".into(),
            threshold: Threshold::Above {
                above: 70.0,
                clear_below: 60.0,
            },
            ..fans()
        };
        let mut run = Run::new(&[fans(), humidity.clone()]);
        assert_eq!(run.read(0, "warehouse/zone1/temp", "31"), one(ZONE1, "ON"));
        assert_eq!(
            run.read(0, "warehouse/zone1/humidity", "75"),
            one("warehouse/zone1/dehumidifier", "ON")
        );
        let changed = ThresholdRule {
            threshold: Threshold::Above {
                above: 80.0,
                clear_below: 60.0,
            },
            ..humidity
        };
        run.engine.apply(&[fans(), changed], run.at(1));
        assert_eq!(run.read(2, "warehouse/zone1/temp", "31"), [], "state kept");
        assert!(run.health.rules.snapshot()["dehumidifier"]
            .outputs
            .is_empty());
        assert_eq!(
            run.read(2, "warehouse/zone1/humidity", "75"),
            [],
            "in band of the new rule"
        );
        assert_eq!(
            run.read(3, "warehouse/zone1/humidity", "85"),
            one("warehouse/zone1/dehumidifier", "ON")
        );
        run.engine.apply(&[fans()], run.at(4));
        assert!(!run.health.rules.snapshot().contains_key("dehumidifier"));
    }
}
