//! `[[rule]]`: threshold rules the gateway runs itself on local messages (see
//! `crate::automation`): the raw and typed forms, and their checks.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Value;

use super::locate::KeyPath;
use super::validate::{Report, Section};
use super::Qos;
use crate::topics::{self, Template};

pub const MIN_INTERVAL: &str = "0s";
/// Shorter staleness would take a sensor's normal jitter for a fault.
const MIN_STALE_AFTER: Duration = Duration::from_millis(100);

const RULE_QOS2: &str = "the gateway hands its decisions to the local broker at QoS 0 or 1";

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRule {
    pub name: Option<String>,
    pub topic: Option<String>,
    pub publish: Option<String>,
    pub above: Option<Value>,
    pub clear_below: Option<Value>,
    pub below: Option<Value>,
    pub clear_above: Option<Value>,
    pub on: Option<String>,
    pub off: Option<String>,
    pub value_path: Option<String>,
    pub qos: Option<i64>,
    pub retain: Option<bool>,
    pub min_interval: Option<Value>,
    pub stale_after: Option<Value>,
    pub stale_payload: Option<String>,
}

/// A threshold rule with hysteresis: readings on the topics `topic` matches decide, per
/// output topic, whether `on` or `off` is published there.
#[derive(Debug, Clone, PartialEq)]
pub struct ThresholdRule {
    pub name: String,
    /// Filter on local topics.
    pub topic: String,
    /// Output topic: `{N}` is what the N-th wildcard of `topic` matched.
    pub publish: String,
    pub threshold: Threshold,
    pub on: String,
    pub off: String,
    /// Dotted path of the number in a JSON payload (`value`, `data.temp`, `readings.0`);
    /// None: the payload is the number.
    pub value_path: Option<String>,
    pub qos: Qos,
    pub retain: bool,
    /// Least time between two publications of one output.
    pub min_interval: Duration,
    pub stale: Option<Staleness>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// On when the value rises above `above`, off when it falls below `clear_below`.
    Above { above: f64, clear_below: f64 },
    /// On when the value falls below `below`, off when it rises above `clear_above`.
    Below { below: f64, clear_above: f64 },
}

/// No reading on an output's topic for `after` is a fault: `payload` is published.
#[derive(Debug, Clone, PartialEq)]
pub struct Staleness {
    pub after: Duration,
    pub payload: String,
}

/// The `[[rule]]` sections; a rule with a problem (already reported) is left out.
pub fn threshold_rules(raw: &[RawRule], report: &mut Report, id: &str) -> Vec<ThresholdRule> {
    let root = KeyPath::default().key("rule");
    let rules: Vec<Option<ThresholdRule>> = raw
        .iter()
        .enumerate()
        .map(|(i, rule)| threshold_rule(rule, report.section(root.index(i), id)))
        .collect();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let Some(rule) = rule else { continue };
        if let Some(first) = names.insert(&rule.name, i) {
            report.add(
                &root.index(i).key("name"),
                format!(
                    "{:?} also names rule[{}]; rule names must be unique",
                    rule.name,
                    first + 1
                ),
            );
        }
    }
    refuse_feedback(&rules, report);
    refuse_shared_outputs(&rules, report);
    rules.into_iter().flatten().collect()
}

fn threshold_rule(raw: &RawRule, mut s: Section) -> Option<ThresholdRule> {
    let before = s.problems();
    let name = s.name("name", &raw.name);
    let topic = s.filter("topic", &raw.topic);
    let publish = publish_template(&mut s, &raw.publish, &topic);
    let threshold = threshold(&mut s, raw);
    let on = payload(&mut s, "on", &raw.on, r#"like on = "ON""#);
    let off = payload(&mut s, "off", &raw.off, r#"like off = "OFF""#);
    let value_path = raw.value_path.as_deref().map(|path| {
        if path.split('.').any(str::is_empty) {
            s.report(
                "value_path",
                format!(
                    "{path:?} is not a path; name the JSON field, like \"value\" or \"data.temp\""
                ),
            );
        }
        path.to_owned()
    });
    let stale = match (&raw.stale_after, &raw.stale_payload) {
        (Some(_), payload_raw) => Some(Staleness {
            after: s.duration(
                "stale_after",
                &raw.stale_after,
                "",
                MIN_STALE_AFTER..=Duration::MAX,
            ),
            payload: payload(
                &mut s,
                "stale_payload",
                payload_raw,
                r#"stale_after needs the payload that makes the site safe, like stale_payload = "ON""#,
            ),
        }),
        (None, Some(_)) => {
            s.report(
                "stale_payload",
                "has no effect without stale_after (how long without a reading is a fault)",
            );
            None
        }
        (None, None) => None,
    };
    let rule = ThresholdRule {
        name,
        topic,
        publish,
        threshold,
        on,
        off,
        value_path,
        qos: s.qos("qos", raw.qos, RULE_QOS2),
        retain: raw.retain.unwrap_or(false),
        min_interval: s.duration(
            "min_interval",
            &raw.min_interval,
            MIN_INTERVAL,
            Duration::ZERO..=Duration::MAX,
        ),
        stale,
    };
    (s.problems() == before).then_some(rule)
}

/// The output topic: `{gateway_id}` substituted, every `{N}` standing for a wildcard of
/// `filter`, and a valid topic whatever the wildcards match.
fn publish_template(s: &mut Section, raw: &Option<String>, filter: &str) -> String {
    let Some(text) = raw.as_deref() else {
        s.report(
            "publish",
            r#"missing; the topic decisions go to, like publish = "warehouse/{1}/fan/command" ({1}: what the topic's first wildcard matched)"#,
        );
        return String::new();
    };
    let publish = topics::substitute_gateway_id(text, s.id());
    let template = Template::parse(&publish);
    let wildcards = filter.split('/').filter(|l| *l == "+" || *l == "#").count();
    if let Some(n) = template.placeholders().find(|n| *n == 0 || *n > wildcards) {
        let why = match wildcards {
            0 => "the topic filter has no wildcard".to_owned(),
            1 => "the topic filter has 1 wildcard: use {1}".to_owned(),
            w => format!("the topic filter has {w} wildcards: use {{1}} to {{{w}}}"),
        };
        s.report("publish", format!("{text:?} uses {{{n}}}, but {why}"));
    } else if let Err(why) = topics::valid_topic(&template.fill(&["x"; 16][..wildcards])) {
        s.report(
            "publish",
            format!("{text:?} is not a topic to publish to: it {why}"),
        );
    }
    publish
}

fn threshold(s: &mut Section, raw: &RawRule) -> Threshold {
    let rising = raw.above.is_some() || raw.clear_below.is_some();
    let falling = raw.below.is_some() || raw.clear_above.is_some();
    match (rising, falling) {
        (true, true) => {
            let key = if raw.below.is_some() {
                "below"
            } else {
                "clear_above"
            };
            s.report(key, "a rule triggers in one direction: set above and clear_below, or below and clear_above, not both");
            Threshold::Above {
                above: 0.0,
                clear_below: 0.0,
            }
        }
        (true, false) => {
            let above = bound(
                s,
                "above",
                &raw.above,
                "the value above which the rule triggers, like above = 30.0",
            );
            let clear_below = bound(s, "clear_below", &raw.clear_below, "the value under which it clears again (hysteresis), like clear_below = 28.0 for above = 30.0; equal to above for none");
            if let (Some(above), Some(clear)) = (above, clear_below) {
                if clear > above {
                    s.report("clear_below", format!("{clear} is above `above` ({above}): a value between them would trigger and clear the rule at once; clear_below must be at most above"));
                }
            }
            Threshold::Above {
                above: above.unwrap_or_default(),
                clear_below: clear_below.unwrap_or_default(),
            }
        }
        (false, true) => {
            let below = bound(
                s,
                "below",
                &raw.below,
                "the value below which the rule triggers, like below = 5.0",
            );
            let clear_above = bound(s, "clear_above", &raw.clear_above, "the value over which it clears again (hysteresis), like clear_above = 7.0 for below = 5.0; equal to below for none");
            if let (Some(below), Some(clear)) = (below, clear_above) {
                if clear < below {
                    s.report("clear_above", format!("{clear} is below `below` ({below}): a value between them would trigger and clear the rule at once; clear_above must be at least below"));
                }
            }
            Threshold::Below {
                below: below.unwrap_or_default(),
                clear_above: clear_above.unwrap_or_default(),
            }
        }
        (false, false) => {
            s.report("above", "missing; set above and clear_below (trigger when the value rises above), or below and clear_above (when it falls below)");
            Threshold::Above {
                above: 0.0,
                clear_below: 0.0,
            }
        }
    }
}

/// A threshold; None when missing or not a number (reported).
fn bound(s: &mut Section, key: &str, raw: &Option<Value>, what: &str) -> Option<f64> {
    if raw.is_none() {
        s.report(key, format!("missing; {what}"));
        return None;
    }
    let before = s.problems();
    let value = s.number(key, raw, 0.0);
    (s.problems() == before).then_some(value)
}

fn payload(s: &mut Section, key: &str, raw: &Option<String>, example: &str) -> String {
    match raw.as_deref() {
        None => {
            s.report(key, format!("missing; {example}"));
            String::new()
        }
        Some("") => {
            s.report(key, "is empty; an empty payload would clear a retained message on the local broker instead of being delivered");
            String::new()
        }
        Some(payload) => payload.to_owned(),
    }
}

/// Refuses rules whose decisions another rule (or the same) would read as readings: the
/// broker cannot tell the gateway's own publications from a device's, so a decision could
/// trigger a decision, forever.
fn refuse_feedback(rules: &[Option<ThresholdRule>], report: &mut Report) {
    let root = KeyPath::default().key("rule");
    for (i, rule) in rules.iter().enumerate() {
        let Some(rule) = rule else { continue };
        let outputs = Template::parse(&rule.publish).as_filter(&rule.topic);
        for (j, reader) in rules.iter().enumerate() {
            let Some(reader) = reader else { continue };
            if !topics::filters_overlap(&outputs, &reader.topic) {
                continue;
            }
            let whose = if i == j {
                "this rule's own topic".to_owned()
            } else {
                format!("rule[{}] ({:?})'s topic", j + 1, reader.name)
            };
            report.add(
                &root.index(i).key("publish"),
                format!(
                    "{:?} can match {whose} {:?}: a decision would be read as a reading; publish outside the rules' topics",
                    rule.publish, reader.topic
                ),
            );
        }
    }
}

/// Refuses two rules that can publish to one topic: each keeps its own state, so they
/// would switch the same actuator back and forth.
fn refuse_shared_outputs(rules: &[Option<ThresholdRule>], report: &mut Report) {
    let root = KeyPath::default().key("rule");
    let outputs: Vec<Option<(String, &ThresholdRule)>> = rules
        .iter()
        .map(|r| {
            r.as_ref()
                .map(|r| (Template::parse(&r.publish).as_filter(&r.topic), r))
        })
        .collect();
    for (i, output) in outputs.iter().enumerate() {
        let Some((mine, rule)) = output else { continue };
        for (j, other) in outputs.iter().enumerate().take(i) {
            let Some((theirs, first)) = other else {
                continue;
            };
            if topics::filters_overlap(mine, theirs) {
                report.add(
                    &root.index(i).key("publish"),
                    format!(
                        "{:?} can publish to a topic rule[{}] ({:?}) publishes to too; two rules would switch one actuator back and forth: combine them or publish elsewhere",
                        rule.publish,
                        j + 1,
                        first.name
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[gateway]\nid = \"gw\"\n[cloud]\nurl = \"mqtt://127.0.0.1\"\n";

    const FANS: &str = r#"
[[rule]]
name = "zone fans"
topic = "warehouse/+/temp"
publish = "warehouse/{1}/fan/command"
above = 30.0
clear_below = 28
on = "ON"
off = "OFF"
"#;

    fn parse(text: &str) -> Result<super::super::Config, super::super::ConfigError> {
        super::super::parse("test.toml", &format!("{BASE}{text}"))
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(config) => panic!("expected problems, got {:?}", config.rules),
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn a_rule_gets_its_defaults() {
        let config = parse(FANS).expect("a valid rule");
        assert_eq!(
            config.rules,
            [ThresholdRule {
                name: "zone fans".into(),
                topic: "warehouse/+/temp".into(),
                publish: "warehouse/{1}/fan/command".into(),
                threshold: Threshold::Above {
                    above: 30.0,
                    clear_below: 28.0
                },
                on: "ON".into(),
                off: "OFF".into(),
                value_path: None,
                qos: Qos::AtLeastOnce,
                retain: false,
                min_interval: Duration::ZERO,
                stale: None,
            }]
        );
    }

    #[test]
    fn every_key_is_read() {
        let text = r#"
[[rule]]
name = "cold store"
topic = "site/{gateway_id}/#"
publish = "alarm/{gateway_id}/{1}/heater"
below = -20
clear_above = -18.5
on = "1"
off = "0"
value_path = "data.temp"
qos = 0
retain = true
min_interval = "30s"
stale_after = "5m"
stale_payload = "1"
"#;
        let rule = &parse(text).expect("a valid rule").rules[0];
        assert_eq!(rule.topic, "site/gw/#");
        assert_eq!(rule.publish, "alarm/gw/{1}/heater");
        assert_eq!(
            rule.threshold,
            Threshold::Below {
                below: -20.0,
                clear_above: -18.5
            }
        );
        assert_eq!(rule.value_path.as_deref(), Some("data.temp"));
        assert_eq!((rule.qos, rule.retain), (Qos::AtMostOnce, true));
        assert_eq!(rule.min_interval, Duration::from_secs(30));
        assert_eq!(
            rule.stale,
            Some(Staleness {
                after: Duration::from_secs(300),
                payload: "1".into()
            })
        );
    }

    #[test]
    fn problems_name_their_line_and_key() {
        let text = r#"
[[rule]]
topic = "warehouse/+/temp"
publish = "warehouse/{2}/fan"
above = 30
clear_below = 31
on = ""

[[rule]]
name = "both ways"
topic = "a/b"
publish = "c/d"
above = 1
clear_below = 0
below = 5
on = "ON"
off = "OFF"
stale_payload = "ON"
qos = 2

[[rule]]
name = "half"
topic = "x/#"
publish = "y/{1}"
below = "cold"
on = "ON"
off = "OFF"
value_path = "a..b"
stale_after = "10ms"
"#;
        assert_eq!(
            problems(text),
            [
                r#"test.toml:6: rule[1].name: missing; name it for logs and metrics, like name = "zone1-climate""#,
                r#"test.toml:6: rule[1].off: missing; like off = "OFF""#,
                r#"test.toml:8: rule[1].publish: "warehouse/{2}/fan" uses {2}, but the topic filter has 1 wildcard: use {1}"#,
                "test.toml:10: rule[1].clear_below: 31 is above `above` (30): a value between them would trigger and clear the rule at once; clear_below must be at most above",
                "test.toml:11: rule[1].on: is empty; an empty payload would clear a retained message on the local broker instead of being delivered",
                "test.toml:19: rule[2].below: a rule triggers in one direction: set above and clear_below, or below and clear_above, not both",
                "test.toml:22: rule[2].stale_payload: has no effect without stale_after (how long without a reading is a fault)",
                "test.toml:23: rule[2].qos: 2 is not accepted: the gateway hands its decisions to the local broker at QoS 0 or 1; accepted: 0 or 1",
                "test.toml:25: rule[3].clear_above: missing; the value over which it clears again (hysteresis), like clear_above = 7.0 for below = 5.0; equal to below for none",
                r#"test.toml:25: rule[3].stale_payload: missing; stale_after needs the payload that makes the site safe, like stale_payload = "ON""#,
                r#"test.toml:29: rule[3].below: "cold" is not a number"#,
                r#"test.toml:32: rule[3].value_path: "a..b" is not a path; name the JSON field, like "value" or "data.temp""#,
                r#"test.toml:33: rule[3].stale_after: "10ms" is out of range; accepted: at least 100ms"#,
            ]
        );
    }

    #[test]
    fn a_rule_may_not_read_its_own_or_anothers_decisions() {
        let text = format!(
            "{FANS}\n[[rule]]\nname = \"loop\"\ntopic = \"alarm/#\"\npublish = \"alarm/{{1}}/x\"\n\
             above = 1\nclear_below = 0\non = \"1\"\noff = \"0\"\n\n\
             [[rule]]\nname = \"everything\"\ntopic = \"warehouse/#\"\npublish = \"dashboard/hot\"\n\
             above = 1\nclear_below = 0\non = \"1\"\noff = \"0\"\n"
        );
        assert_eq!(
            problems(&text),
            [
                r#"test.toml:9: rule[1].publish: "warehouse/{1}/fan/command" can match rule[3] ("everything")'s topic "warehouse/#": a decision would be read as a reading; publish outside the rules' topics"#,
                r#"test.toml:18: rule[2].publish: "alarm/{1}/x" can match this rule's own topic "alarm/#": a decision would be read as a reading; publish outside the rules' topics"#,
            ]
        );
    }

    #[test]
    fn two_rules_may_not_drive_one_output() {
        let text = format!(
            "{FANS}\n[[rule]]\nname = \"zone fans\"\ntopic = \"warehouse/+/humidity\"\n\
             publish = \"warehouse/{{1}}/fan/command\"\nabove = 70\nclear_below = 60\n\
             on = \"ON\"\noff = \"OFF\"\n"
        );
        assert_eq!(
            problems(&text),
            [
                r#"test.toml:16: rule[2].name: "zone fans" also names rule[1]; rule names must be unique"#,
                r#"test.toml:18: rule[2].publish: "warehouse/{1}/fan/command" can publish to a topic rule[1] ("zone fans") publishes to too; two rules would switch one actuator back and forth: combine them or publish elsewhere"#,
            ]
        );
    }

    #[test]
    fn publish_must_be_a_topic_whatever_the_wildcards_match() {
        let text = FANS.replace("warehouse/{1}/fan/command", "warehouse/{1}/fan/#");
        assert_eq!(
            problems(&text),
            [
                r#"test.toml:9: rule[1].publish: "warehouse/{1}/fan/#" is not a topic to publish to: it contains a wildcard ('+' or '#'), which only filters may use"#
            ]
        );
        let text = FANS.replace("warehouse/{1}/fan/command", "fans/{1}");
        let text = text.replace("warehouse/+/temp", "warehouse/zone1/temp");
        assert_eq!(
            problems(&text),
            [
                r#"test.toml:9: rule[1].publish: "fans/{1}" uses {1}, but the topic filter has no wildcard"#
            ]
        );
    }
}
