//! What the rules tell about themselves: per rule its counters, per output topic its state,
//! last value and ages. The engine writes atomics; the status reporter reads them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::health::process_start;

/// The state of one output topic of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputState {
    /// No reading has decided yet (after a start, or a change of the rule).
    Unknown = 0,
    Off = 1,
    On = 2,
    /// No reading within `stale_after`: `stale_payload` was published.
    Stale = 3,
}

impl OutputState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputState::Unknown => "unknown",
            OutputState::Off => "off",
            OutputState::On => "on",
            OutputState::Stale => "stale",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => OutputState::Off,
            2 => OutputState::On,
            3 => OutputState::Stale,
            _ => OutputState::Unknown,
        }
    }
}

/// Every rule's health, by name.
#[derive(Debug, Default)]
pub struct RulesHealth(Mutex<BTreeMap<String, Arc<RuleHealth>>>);

impl RulesHealth {
    /// The entry of rule `name`, made on first use; a rule changed by a reload keeps its
    /// counters.
    pub fn rule(&self, name: &str) -> Arc<RuleHealth> {
        let Ok(mut rules) = self.0.lock() else {
            return Arc::default();
        };
        rules.entry(name.to_owned()).or_default().clone()
    }

    /// Forgets a rule removed from the config.
    pub fn remove(&self, name: &str) {
        if let Ok(mut rules) = self.0.lock() {
            rules.remove(name);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, RuleSnapshot> {
        let Ok(rules) = self.0.lock() else {
            return BTreeMap::new();
        };
        rules
            .iter()
            .map(|(name, rule)| (name.clone(), rule.snapshot()))
            .collect()
    }
}

/// One rule's counters and outputs.
#[derive(Debug, Default)]
pub struct RuleHealth {
    /// Readings the rule's topic matched.
    pub readings: AtomicU64,
    /// Readings that held no number where the rule looks for one.
    pub not_numeric: AtomicU64,
    /// Payloads published on an output.
    pub publications: AtomicU64,
    /// Times an output went stale.
    pub stale: AtomicU64,
    /// Publications that failed (invalid output topic, not confirmed by the broker).
    pub errors: AtomicU64,
    outputs: Mutex<BTreeMap<String, Arc<OutputHealth>>>,
}

impl RuleHealth {
    /// The entry of output `topic`, made on first use.
    pub fn output(&self, topic: &str) -> Arc<OutputHealth> {
        let Ok(mut outputs) = self.outputs.lock() else {
            return Arc::new(OutputHealth::default());
        };
        outputs.entry(topic.to_owned()).or_default().clone()
    }

    /// Forgets the outputs: the rule starts over.
    pub fn clear_outputs(&self) {
        if let Ok(mut outputs) = self.outputs.lock() {
            outputs.clear();
        }
    }

    fn snapshot(&self) -> RuleSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuleSnapshot {
            readings: get(&self.readings),
            not_numeric: get(&self.not_numeric),
            publications: get(&self.publications),
            stale: get(&self.stale),
            errors: get(&self.errors),
            outputs: self
                .outputs
                .lock()
                .map(|outputs| {
                    outputs
                        .iter()
                        .map(|(topic, output)| (topic.clone(), output.snapshot()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// One output topic: its state and the last reading that reached it.
#[derive(Debug)]
pub struct OutputHealth {
    state: AtomicU8,
    /// Milliseconds after [`process_start`] of the last change of state.
    since_ms: AtomicU64,
    /// The last value read, as f64 bits; NaN before the first.
    value: AtomicU64,
    /// Milliseconds after [`process_start`] of the last reading; u64::MAX before the first.
    reading_ms: AtomicU64,
}

impl Default for OutputHealth {
    fn default() -> Self {
        OutputHealth {
            state: AtomicU8::new(OutputState::Unknown as u8),
            since_ms: AtomicU64::new(ms_since_start(Instant::now())),
            value: AtomicU64::new(f64::NAN.to_bits()),
            reading_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl OutputHealth {
    pub fn set_state(&self, state: OutputState, at: Instant) {
        if self.state.swap(state as u8, Ordering::Relaxed) != state as u8 {
            self.since_ms.store(ms_since_start(at), Ordering::Relaxed);
        }
    }

    pub fn reading(&self, value: f64, at: Instant) {
        self.value.store(value.to_bits(), Ordering::Relaxed);
        self.reading_ms.store(ms_since_start(at), Ordering::Relaxed);
    }

    fn snapshot(&self) -> OutputSnapshot {
        let now = ms_since_start(Instant::now());
        let value = f64::from_bits(self.value.load(Ordering::Relaxed));
        let reading = self.reading_ms.load(Ordering::Relaxed);
        OutputSnapshot {
            state: OutputState::from_u8(self.state.load(Ordering::Relaxed)).as_str(),
            for_s: now.saturating_sub(self.since_ms.load(Ordering::Relaxed)) / 1000,
            value: (!value.is_nan()).then_some(value),
            reading_ago_ms: (reading != u64::MAX).then(|| now.saturating_sub(reading)),
        }
    }
}

fn ms_since_start(at: Instant) -> u64 {
    at.saturating_duration_since(process_start()).as_millis() as u64
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleSnapshot {
    pub readings: u64,
    pub not_numeric: u64,
    pub publications: u64,
    pub stale: u64,
    pub errors: u64,
    /// By output topic.
    pub outputs: BTreeMap<String, OutputSnapshot>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputSnapshot {
    /// unknown | off | on | stale
    pub state: &'static str,
    /// Seconds in that state.
    pub for_s: u64,
    /// The last value read; null before the first reading.
    pub value: Option<f64>,
    pub reading_ago_ms: Option<u64>,
}

/// The `rule` lines of `bridgehead status`: each rule with its counters, then one line per
/// output.
pub fn render(doc: &serde_json::Value) -> String {
    let mut out = String::new();
    let Some(rules) = doc.get("rules").and_then(|r| r.as_object()) else {
        return out;
    };
    for (name, rule) in rules {
        out.push_str(&format!("rule       {name}:"));
        for key in ["readings", "not_numeric", "publications", "stale", "errors"] {
            out.push_str(&format!(" {key}={}", rule[key]));
        }
        out.push('\n');
        for (topic, output) in rule["outputs"].as_object().into_iter().flatten() {
            let state = output["state"].as_str().unwrap_or("?");
            out.push_str(&format!(
                "             {topic} {state} for {}s",
                output["for_s"]
            ));
            if let (Some(value), Some(ago)) =
                (output["value"].as_f64(), output["reading_ago_ms"].as_u64())
            {
                out.push_str(&format!(", last reading {value} {ago} ms ago"));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_each_rule_and_output() {
        let rules = RulesHealth::default();
        let fans = rules.rule("zone fans");
        fans.readings.fetch_add(3, Ordering::Relaxed);
        let zone1 = fans.output("warehouse/zone1/fan/command");
        zone1.reading(31.5, Instant::now());
        zone1.set_state(OutputState::On, Instant::now());
        fans.output("warehouse/zone2/fan/command");
        let doc = serde_json::json!({ "rules": rules.snapshot() });
        let text = render(&doc);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "rule       zone fans: readings=3 not_numeric=0 publications=0 stale=0 errors=0"
        );
        assert!(
            lines[1].starts_with(
                "             warehouse/zone1/fan/command on for 0s, last reading 31.5 "
            ) && lines[1].ends_with(" ms ago"),
            "{text}"
        );
        assert_eq!(
            lines[2],
            "             warehouse/zone2/fan/command unknown for 0s"
        );
        rules.remove("zone fans");
        assert!(rules.snapshot().is_empty());
    }
}
