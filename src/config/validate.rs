//! From the raw file to [`Config`]: every value parsed and checked, every problem collected
//! with its key and line. A check that finds a problem reports it and returns a stand-in,
//! so the checks after it still run; the stand-ins never leave this module, because a
//! report with problems is an error.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use toml::Value;
use toml_edit::ImDocument;

use super::locate::{line_at, line_of, KeyPath};
use super::raw::{self, RawCloud, RawConfig, RawDownlink, RawGateway, RawLocal, RawQueue};
use super::raw::{RawUplink, WrongType};
use super::{defaults, field, rule, units, url};
use super::{CloudConfig, CloudUrl, Config, ConfigError, DownlinkRule, GatewayConfig};
use super::{Lane, LocalConfig, Problem, Qos, QueueConfig, UplinkRule, WhenFull};
use crate::topics;

/// The largest MQTT packet: the remaining length field tops out at 256 MiB - 1.
const MQTT_MAX_PACKET: u64 = 268_435_455;
/// MQTT keep alive is a 16-bit number of seconds; below 5 s a Pi on a slow link flaps.
const KEEP_ALIVE: RangeInclusive<Duration> = Duration::from_secs(5)..=Duration::from_secs(65_535);
const COMMIT_INTERVAL: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(10);
/// Stands in for an invalid `gateway.id`: topics are still checked, and show the placeholder.
const STAND_IN_ID: &str = topics::GATEWAY_ID_PLACEHOLDER;

const UPLINK_QOS2: &str = "QoS 2 is not supported upstream: delivery to the cloud is \
    at-least-once from the durable outbox (a message may be resent after a reconnect)";
const DOWNLINK_QOS2: &str = "QoS 2 is not supported for commands: a command is acknowledged \
    upstream once the local broker took it (at least once)";

/// Problems found so far in one file.
pub struct Report<'a> {
    file: &'a str,
    doc: &'a ImDocument<&'a str>,
    problems: Vec<Problem>,
}

impl<'a> Report<'a> {
    pub fn new(file: &'a str, doc: &'a ImDocument<&'a str>) -> Self {
        let problems = Vec::new();
        Report {
            file,
            doc,
            problems,
        }
    }

    pub fn add(&mut self, path: &KeyPath, message: impl Into<String>) {
        let line = line_of(self.doc, path);
        self.add_at(line, path, message);
    }

    fn add_at(&mut self, line: usize, path: &KeyPath, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: Some(line),
            key: path.to_string(),
            message: message.into(),
        });
    }

    pub fn unknown_key(&mut self, path: &KeyPath) {
        let accepted = raw::accepted_keys(path);
        let message = match accepted {
            [] => "unknown key".to_owned(),
            _ => format!(
                "unknown key; the keys accepted here are {}",
                accepted.join(", ")
            ),
        };
        self.add(path, message);
    }

    pub fn wrong_type(&mut self, wrong: WrongType) {
        let line = match (&wrong.span, wrong.path == KeyPath::default()) {
            (Some(span), true) => line_at(self.doc.raw(), span.start),
            _ => line_of(self.doc, &wrong.path),
        };
        self.add_at(line, &wrong.path, wrong.message);
    }

    /// The config when nothing was reported, else every problem.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error())
        }
    }

    /// Every problem reported, in file order.
    pub fn into_error(mut self) -> ConfigError {
        self.problems.sort_by_key(|problem| problem.line);
        ConfigError {
            problems: self.problems,
        }
    }

    pub(super) fn section<'r>(&'r mut self, path: KeyPath, id: &'r str) -> Section<'r, 'a> {
        Section {
            report: self,
            path,
            id,
        }
    }
}

pub fn validate(raw: &RawConfig, report: &mut Report, state_directory: Option<&OsStr>) -> Config {
    let root = KeyPath::default();
    let id = gateway_id(&raw.gateway, &root.key("gateway"), report);
    let topic_id = usable_id(&id);
    let gateway = gateway(
        &raw.gateway,
        report.section(root.key("gateway"), topic_id),
        state_directory,
        id.clone(),
    );
    let local = local(&raw.local, report.section(root.key("local"), topic_id));
    let cloud = cloud(&raw.cloud, report.section(root.key("cloud"), topic_id));
    let queue = queue(&raw.queue, report.section(root.key("queue"), topic_id));
    let uplink: Vec<Option<UplinkRule>> = (raw.uplink.iter().enumerate())
        .map(|(i, rule)| uplink_rule(rule, report.section(root.key("uplink").index(i), topic_id)))
        .collect();
    let downlink: Vec<Option<DownlinkRule>> = (raw.downlink.iter().enumerate())
        .map(|(i, rule)| {
            downlink_rule(
                rule,
                report.section(root.key("downlink").index(i), topic_id),
            )
        })
        .collect();
    refuse_loops(&uplink, &downlink, &cloud.status_topic, report);
    let modbus = field::modbus_devices(&raw.modbus, report, topic_id);
    let serial = field::serial_sensors(&raw.serial, &raw.modbus, report, topic_id);
    let rules = rule::threshold_rules(&raw.rule, report, topic_id);
    Config {
        gateway,
        local,
        cloud,
        queue,
        uplink: uplink.into_iter().flatten().collect(),
        downlink: downlink.into_iter().flatten().collect(),
        modbus,
        serial,
        rules,
    }
}

fn gateway_id(raw: &RawGateway, path: &KeyPath, report: &mut Report) -> String {
    let path = path.key("id");
    let Some(id) = raw.id.as_deref() else {
        report.add(
            &path,
            r#"missing; every gateway needs a unique id, like id = "gw-001""#,
        );
        return String::new();
    };
    if let Err(why) = valid_gateway_id(id) {
        report.add(&path, format!("{id:?} {why}"));
    }
    id.to_owned()
}

/// The id goes into topics and client ids.
fn valid_gateway_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        Err("is empty; every gateway needs a unique id")
    } else if id.contains(['/', '+', '#']) {
        Err("contains '/', '+' or '#'; the id is used in topics, so it may not")
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("contains whitespace or a control character; the id is used in topics and client ids, so it may not")
    } else {
        Ok(())
    }
}

/// The id, or the stand-in when it is not valid (already reported).
fn usable_id(id: &str) -> &str {
    if valid_gateway_id(id).is_ok() {
        id
    } else {
        STAND_IN_ID
    }
}

fn gateway(
    raw: &RawGateway,
    mut s: Section,
    state_directory: Option<&OsStr>,
    id: String,
) -> GatewayConfig {
    let data_dir = match raw.data_dir.as_deref() {
        None => defaults::data_dir(state_directory),
        Some("") => {
            s.report(
                "data_dir",
                "is empty; name a directory, or leave the key out for the default",
            );
            PathBuf::new()
        }
        Some(dir) => PathBuf::from(dir),
    };
    GatewayConfig {
        id,
        data_dir,
        metrics_topic: s.topic("metrics_topic", &raw.metrics_topic, defaults::METRICS_TOPIC),
        metrics_interval: s.duration(
            "metrics_interval",
            &raw.metrics_interval,
            defaults::METRICS_INTERVAL,
            at_least_ms(100),
        ),
    }
}

fn local(raw: &RawLocal, mut s: Section) -> LocalConfig {
    let listen = s.address("listen", raw.listen.as_deref().unwrap_or(defaults::LISTEN));
    let listen_v5 = raw
        .listen_v5
        .as_deref()
        .map(|text| s.address("listen_v5", text));
    if let Some(v5) = listen_v5 {
        let same_ip =
            v5.ip() == listen.ip() || v5.ip().is_unspecified() || listen.ip().is_unspecified();
        if v5.port() == listen.port() && same_ip {
            s.report(
                "listen_v5",
                format!("{v5} collides with local.listen {listen}; MQTT 5 needs a port of its own"),
            );
        }
    }
    LocalConfig {
        security: super::security::local(raw, &mut s, listen, listen_v5),
        listen,
        listen_v5,
        max_payload: s.size(
            "max_payload",
            &raw.max_payload,
            defaults::MAX_PAYLOAD,
            1..=MQTT_MAX_PACKET,
        ),
        max_connections: s.int(
            "max_connections",
            raw.max_connections,
            defaults::MAX_CONNECTIONS,
            1..=1_000_000,
        ),
        connect_timeout: s.duration(
            "connect_timeout",
            &raw.connect_timeout,
            defaults::CONNECT_TIMEOUT,
            at_least_ms(100),
        ),
        max_keep_alive: raw.max_keep_alive.as_ref().map(|_| {
            let keep_alive = s.duration(
                "max_keep_alive",
                &raw.max_keep_alive,
                "1s",
                Duration::from_secs(1)..=Duration::from_secs(u64::from(u16::MAX)),
            );
            u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX)
        }),
        persistence: super::Persistence {
            max_retained_size: s.size(
                "max_retained_size",
                &raw.max_retained_size,
                defaults::MAX_RETAINED_SIZE,
                0..=u64::MAX,
            ),
            max_queued_messages: s.int(
                "max_queued_messages",
                raw.max_queued_messages,
                defaults::MAX_QUEUED_MESSAGES,
                0..=1_000_000,
            ),
            max_queued_bytes: s.size(
                "max_queued_bytes",
                &raw.max_queued_bytes,
                defaults::MAX_QUEUED_BYTES,
                1024..=u64::MAX,
            ),
        },
    }
}

fn cloud(raw: &RawCloud, mut s: Section) -> CloudConfig {
    let urls = match &raw.url {
        None => {
            s.report(
                "url",
                r#"missing; name the cloud broker, like url = "mqtts://iot.example.com:8883""#,
            );
            None
        }
        Some(value) => url::parse_list(value)
            .map_err(|why| s.report("url", why))
            .ok(),
    };
    let (url, failover) = match urls {
        Some(mut urls) => {
            let rest = urls.split_off(1);
            (urls.pop(), rest)
        }
        None => (None, Vec::new()),
    };
    let client_id = s.client_id("client_id", raw.client_id.as_deref().unwrap_or(s.id));
    let command_default = format!("{client_id}{}", defaults::COMMAND_CLIENT_ID_SUFFIX);
    let command_client_id = s.client_id(
        "command_client_id",
        raw.command_client_id.as_deref().unwrap_or(&command_default),
    );
    if command_client_id == client_id {
        let why = "is also cloud.client_id; the command connection needs a client id of its own";
        s.report("command_client_id", format!("{client_id:?} {why}"));
    }
    let tls = url.as_ref().is_none_or(|url| url.tls);
    let ca_file = s.pem_file("ca_file", &raw.ca_file, tls, Pem::Certificates);
    let cert_file = s.pem_file("cert_file", &raw.cert_file, tls, Pem::Certificates);
    let key_file = s.pem_file("key_file", &raw.key_file, tls, Pem::PrivateKey);
    let alone = "set alone; a client certificate needs its private key: set both cert_file and key_file, or neither";
    match (&raw.cert_file, &raw.key_file) {
        (Some(_), None) => s.report("cert_file", alone),
        (None, Some(_)) => s.report("key_file", alone),
        _ => {}
    }
    if raw.username.as_deref() == Some("") {
        s.report(
            "username",
            "is empty; leave the key out to connect without a user name",
        );
    }
    if raw.password_file.is_some() && raw.username.is_none() {
        s.report(
            "password_file",
            "set without cloud.username; MQTT sends a password only with a user name",
        );
    }
    let reconnect_min = s.duration(
        "reconnect_min",
        &raw.reconnect_min,
        defaults::RECONNECT_MIN,
        at_least_ms(10),
    );
    CloudConfig {
        url: url.unwrap_or(CloudUrl {
            tls,
            host: String::new(),
            port: 0,
        }),
        failover,
        client_id,
        command_client_id,
        keep_alive: s.duration(
            "keep_alive",
            &raw.keep_alive,
            defaults::KEEP_ALIVE,
            KEEP_ALIVE,
        ),
        max_packet_size: s.size(
            "max_packet_size",
            &raw.max_packet_size,
            defaults::MAX_PACKET_SIZE,
            1024..=MQTT_MAX_PACKET,
        ),
        ca_file,
        cert_file,
        key_file,
        username: raw.username.clone(),
        password_file: s.readable("password_file", &raw.password_file),
        status_topic: s.topic("status_topic", &raw.status_topic, defaults::STATUS_TOPIC),
        max_inflight: s.int(
            "max_inflight",
            raw.max_inflight,
            defaults::MAX_INFLIGHT,
            1..=65_535,
        ),
        reconnect_max: s.duration(
            "reconnect_max",
            &raw.reconnect_max,
            defaults::RECONNECT_MAX,
            reconnect_min..=Duration::MAX,
        ),
        reconnect_min,
    }
}

fn queue(raw: &RawQueue, mut s: Section) -> QueueConfig {
    let when_full = [
        ("drop-oldest", WhenFull::DropOldest),
        ("reject-new", WhenFull::RejectNew),
    ];
    QueueConfig {
        max_size: s.size(
            "max_size",
            &raw.max_size,
            defaults::QUEUE_MAX_SIZE,
            1..=u64::MAX,
        ),
        when_full: s.choice("when_full", &raw.when_full, defaults::WHEN_FULL, &when_full),
        max_age: s.duration(
            "max_age",
            &raw.max_age,
            defaults::MAX_AGE,
            at_least_ms(1000),
        ),
        commit_interval: s.duration(
            "commit_interval",
            &raw.commit_interval,
            defaults::COMMIT_INTERVAL,
            COMMIT_INTERVAL,
        ),
        commit_batch: s.int(
            "commit_batch",
            raw.commit_batch,
            defaults::COMMIT_BATCH,
            1..=100_000,
        ),
        fsync: s.choice(
            "synchronous",
            &raw.synchronous,
            defaults::SYNCHRONOUS,
            &[("full", true), ("normal", false)],
        ),
        dead_letter_max_size: s.size(
            "dead_letter_max_size",
            &raw.dead_letter_max_size,
            defaults::DEAD_LETTER_MAX_SIZE,
            0..=u64::MAX,
        ),
        drain_rate: raw
            .drain_rate
            .map(|_| s.int("drain_rate", raw.drain_rate, 1, 1..=1_000_000)),
    }
}

/// None when the rule has a problem (already reported).
fn uplink_rule(raw: &RawUplink, mut s: Section) -> Option<UplinkRule> {
    let problems_before = s.report.problems.len();
    let rule = UplinkRule {
        topic: s.filter("topic", &raw.topic),
        remote_prefix: s.prefix("remote_prefix", &raw.remote_prefix),
        qos: s.qos("qos", raw.qos, UPLINK_QOS2),
        drain: s.choice(
            "drain",
            &raw.drain,
            defaults::DRAIN,
            &[("strict", Lane::Strict), ("live-first", Lane::LiveFirst)],
        ),
    };
    (s.report.problems.len() == problems_before).then_some(rule)
}

fn downlink_rule(raw: &RawDownlink, mut s: Section) -> Option<DownlinkRule> {
    let problems_before = s.report.problems.len();
    let rule = DownlinkRule {
        topic: s.filter("topic", &raw.topic),
        remote_prefix: s.prefix("remote_prefix", &raw.remote_prefix),
        local_prefix: s.prefix("local_prefix", &raw.local_prefix),
        qos: s.qos("qos", raw.qos, DOWNLINK_QOS2),
    };
    if s.report.problems.len() > problems_before {
        return None;
    }
    let subscription = format!("{}{}", rule.remote_prefix, rule.topic);
    if let Err(why) = topics::valid_filter(&subscription) {
        let fix = "end remote_prefix with '/' or start topic with one";
        s.report(
            "topic",
            format!("the cloud subscription {subscription:?} (remote_prefix + topic) {why}; {fix}"),
        );
        return None;
    }
    Some(rule)
}

/// Refuses configs that send a message around: what an uplink rule sends up would come
/// back down under a downlink subscription as a command. (A command itself is never sent
/// back up, whatever uplink rule matches its local topic: messages carry their origin; but
/// a device's telemetry arriving as a command is never what such a config meant.)
fn refuse_loops(
    uplink: &[Option<UplinkRule>],
    downlink: &[Option<DownlinkRule>],
    status_topic: &str,
    report: &mut Report,
) {
    let root = KeyPath::default();
    for (d, down) in downlink.iter().enumerate() {
        let Some(down) = down else { continue };
        let down_rule = root.key("downlink").index(d);
        let down_line = line_of(report.doc, &down_rule.key("topic"));
        let subscription = format!("{}{}", down.remote_prefix, down.topic);
        for (u, up) in uplink.iter().enumerate() {
            let Some(up) = up else { continue };
            if topics::prefixed_filter_overlaps(&up.remote_prefix, &up.topic, &subscription) {
                let cloud_topics = format!("{}{}", up.remote_prefix, up.topic);
                let message = format!(
                    "the cloud topics of this rule, {cloud_topics:?} (remote_prefix + topic), can match \
                     {down_rule}'s cloud subscription {subscription:?} (line {down_line}): a message sent up \
                     would come back down as a command and be sent up again; change a remote_prefix or \
                     narrow a topic"
                );
                report.add(&root.key("uplink").index(u).key("topic"), message);
            }
        }
        if topics::matches(&subscription, status_topic) {
            let message = format!(
                "the cloud subscription {subscription:?} matches cloud.status_topic {status_topic:?}: \
                 the gateway's own online/offline messages would arrive as commands"
            );
            report.add(&down_rule.key("topic"), message);
        }
    }
}

fn at_least_ms(millis: u64) -> RangeInclusive<Duration> {
    Duration::from_millis(millis)..=Duration::MAX
}

/// The checks of one table (`[cloud]`, `uplink[2]`): each reads a key of it, reports a
/// problem under that key, and substitutes `{gateway_id}` where text becomes a topic.
pub(super) struct Section<'r, 'a> {
    report: &'r mut Report<'a>,
    path: KeyPath,
    id: &'r str,
}

impl<'a> Section<'_, 'a> {
    pub(super) fn report(&mut self, key: &str, message: impl Into<String>) {
        self.report.add(&self.path.key(key), message);
    }

    /// Problems reported so far in the whole file: a check compares before and after.
    pub(super) fn problems(&self) -> usize {
        self.report.problems.len()
    }

    pub(super) fn path(&self) -> KeyPath {
        self.path.clone()
    }

    pub(super) fn id(&self) -> &str {
        self.id
    }

    /// The checks of a table nested in this one (`modbus[1].read[2]`).
    pub(super) fn child(&mut self, path: KeyPath) -> Section<'_, 'a> {
        Section {
            report: self.report,
            path,
            id: self.id,
        }
    }

    /// A name that shows in logs and metrics.
    pub(super) fn name(&mut self, key: &str, raw: &Option<String>) -> String {
        match raw.as_deref() {
            None => {
                self.report(
                    key,
                    r#"missing; name it for logs and metrics, like name = "zone1-climate""#,
                );
                String::new()
            }
            Some(name) if name.is_empty() || name.chars().any(|c| c.is_control()) => {
                self.report(
                    key,
                    format!("{name:?} is empty or holds control characters"),
                );
                name.to_owned()
            }
            Some(name) => name.to_owned(),
        }
    }

    pub(super) fn required_topic(&mut self, key: &str, raw: &Option<String>) -> String {
        if raw.is_none() {
            self.report(
                key,
                r#"missing; name the topic, like topic = "warehouse/zone1/temp""#,
            );
            return String::new();
        }
        self.topic(key, raw, "")
    }

    /// A 0-based register or bit address; `span` registers from it must fit under 65536.
    pub(super) fn required_address(&mut self, key: &str, raw: Option<i64>, span: u16) -> u16 {
        let Some(address) = raw else {
            self.report(
                key,
                "missing; the 0-based register or bit address, like address = 0",
            );
            return 0;
        };
        let last = 65_536 - i64::from(span);
        self.int(key, Some(address), 0, 0..=last)
    }

    /// An integer or float.
    pub(super) fn number(&mut self, key: &str, raw: &Option<Value>, default: f64) -> f64 {
        match raw {
            None => default,
            Some(Value::Integer(n)) => *n as f64,
            Some(Value::Float(x)) if x.is_finite() => *x,
            Some(other) => {
                self.report(key, format!("{other} is not a number"));
                default
            }
        }
    }

    pub(super) fn address(&mut self, key: &str, text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| {
            self.report(
                key,
                format!(
                    r#"{text:?} is not an IP address and port like "0.0.0.0:1883" or "[::]:1883""#
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    fn client_id(&mut self, key: &str, text: &str) -> String {
        let client_id = topics::substitute_gateway_id(text, self.id);
        if client_id.is_empty() || client_id.contains('\0') || client_id.len() > 65_535 {
            self.report(
                key,
                format!("{text:?} is not a client id; use 1 to 65535 bytes of text without NUL"),
            );
        }
        client_id
    }

    pub(super) fn topic(&mut self, key: &str, raw: &Option<String>, default: &str) -> String {
        let text = raw.as_deref().unwrap_or(default);
        let topic = topics::substitute_gateway_id(text, self.id);
        if let Err(why) = topics::valid_topic(&topic) {
            self.report(
                key,
                format!("{text:?} is not a topic to publish to: it {why}"),
            );
        }
        topic
    }

    pub(super) fn filter(&mut self, key: &str, raw: &Option<String>) -> String {
        let Some(text) = raw.as_deref() else {
            self.report(
                key,
                r#"missing; every rule needs a topic filter, like topic = "warehouse/#""#,
            );
            return String::new();
        };
        let filter = topics::substitute_gateway_id(text, self.id);
        if let Err(why) = topics::valid_filter(&filter) {
            self.report(key, format!("{text:?} is not a topic filter: it {why}"));
        }
        filter
    }

    fn prefix(&mut self, key: &str, raw: &Option<String>) -> String {
        let text = raw.as_deref().unwrap_or(defaults::PREFIX);
        let prefix = topics::substitute_gateway_id(text, self.id);
        if prefix.contains(['+', '#', '\0']) {
            self.report(
                key,
                format!("{text:?} contains '+', '#' or NUL; a prefix is plain topic text"),
            );
        }
        prefix
    }

    pub(super) fn qos(&mut self, key: &str, raw: Option<i64>, why_not_2: &str) -> Qos {
        match raw.unwrap_or(defaults::QOS) {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => {
                self.report(
                    key,
                    format!("2 is not accepted: {why_not_2}; accepted: 0 or 1"),
                );
                Qos::AtLeastOnce
            }
            other => {
                self.report(key, format!("{other} is not a QoS level; accepted: 0 or 1"));
                Qos::AtLeastOnce
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        raw: &Option<Value>,
        default: &str,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let value = raw
            .clone()
            .unwrap_or_else(|| Value::String(default.to_owned()));
        match units::duration(&value) {
            Ok(duration) if range.contains(&duration) => duration,
            Ok(_) => {
                let start = humantime::format_duration(*range.start());
                let accepted = match *range.end() {
                    Duration::MAX => format!("at least {start}"),
                    end => format!("{start} to {}", humantime::format_duration(end)),
                };
                self.report(
                    key,
                    format!("{value} is out of range; accepted: {accepted}"),
                );
                *range.start()
            }
            Err(why) => {
                self.report(key, why);
                *range.start()
            }
        }
    }

    pub(super) fn size<T: TryFrom<u64> + Default>(
        &mut self,
        key: &str,
        raw: &Option<Value>,
        default: &str,
        range: RangeInclusive<u64>,
    ) -> T {
        let value = raw
            .clone()
            .unwrap_or_else(|| Value::String(default.to_owned()));
        match units::size(&value) {
            Ok(bytes) => match T::try_from(bytes) {
                Ok(size) if range.contains(&bytes) => size,
                _ => {
                    let (min, max) = (range.start(), range.end());
                    self.report(key, format!("{value} ({bytes} bytes) is out of range; accepted: {min} to {max} bytes"));
                    T::default()
                }
            },
            Err(why) => {
                self.report(key, why);
                T::default()
            }
        }
    }

    pub(super) fn int<T: TryFrom<i64> + Default>(
        &mut self,
        key: &str,
        raw: Option<i64>,
        default: i64,
        range: RangeInclusive<i64>,
    ) -> T {
        let value = raw.unwrap_or(default);
        match T::try_from(value) {
            Ok(number) if range.contains(&value) => number,
            _ => {
                let (min, max) = (range.start(), range.end());
                self.report(
                    key,
                    format!("{value} is out of range; accepted: {min} to {max}"),
                );
                T::default()
            }
        }
    }

    /// `choices` is not empty; its first entry stands in after a problem.
    pub(super) fn choice<T: Copy>(
        &mut self,
        key: &str,
        raw: &Option<String>,
        default: &str,
        choices: &[(&str, T)],
    ) -> T {
        let text = raw.as_deref().unwrap_or(default);
        if let Some((_, value)) = choices.iter().find(|(name, _)| *name == text) {
            return *value;
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        self.report(key, format!("{text:?} is not one of {}", names.join(", ")));
        choices[0].1
    }

    /// A TLS file: set only with `mqtts://`, readable, and holding what its key promises.
    pub(super) fn pem_file(
        &mut self,
        key: &str,
        raw: &Option<String>,
        tls: bool,
        expect: Pem,
    ) -> Option<PathBuf> {
        let file = raw.as_deref()?;
        if !tls {
            self.report(key, format!("has no effect with a plain mqtt:// cloud.url; use mqtts:// for TLS, or remove {key}"));
            return None;
        }
        let bytes = std::fs::read(file)
            .map_err(|error| self.report(key, format!("cannot read {file:?}: {error}")))
            .ok()?;
        let mut reader = bytes.as_slice();
        let (found, what) = match expect {
            Pem::Certificates => (
                rustls_pemfile::certs(&mut reader)
                    .collect::<Result<Vec<_>, _>>()
                    .map(|certs| !certs.is_empty()),
                "PEM certificate (-----BEGIN CERTIFICATE-----)",
            ),
            Pem::PrivateKey => (
                rustls_pemfile::private_key(&mut reader).map(|key| key.is_some()),
                "PEM private key (PKCS#8, PKCS#1 or SEC1)",
            ),
        };
        match found {
            Ok(true) => return Some(PathBuf::from(file)),
            Ok(false) => self.report(key, format!("{file:?} holds no {what}")),
            Err(error) => self.report(
                key,
                format!("{file:?} is not valid PEM ({error}); expected a {what}"),
            ),
        }
        None
    }

    pub(super) fn readable(&mut self, key: &str, raw: &Option<String>) -> Option<PathBuf> {
        let file = raw.as_deref()?;
        match std::fs::File::open(file) {
            Ok(_) => Some(PathBuf::from(file)),
            Err(error) => {
                self.report(key, format!("cannot read {file:?}: {error}"));
                None
            }
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum Pem {
    Certificates,
    PrivateKey,
}
