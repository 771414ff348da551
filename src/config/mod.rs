//! The gateway's configuration: the typed, validated form every other module reads.
//!
//! `load()` parses the TOML file into a raw, string-typed form, then validates and converts
//! it into [`Config`], collecting every problem with the line and key it belongs to.

mod defaults;
pub mod diff;
mod field;
mod locate;
mod raw;
mod rule;
mod security;
mod units;
mod url;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::ImDocument;

pub use crate::outbox::Lane;

pub use field::{
    Layout, LineFormat, ModbusDevice, ModbusRead, ModbusWrite, OnChange, Order, Parity,
    PayloadFormat, RegisterKind, SerialLine, SerialSensor, Transport, ValueType, WriteKind,
    KEY_PLACEHOLDER,
};
pub use rule::{Staleness, Threshold, ThresholdRule};

use locate::line_at;
use validate::Report;

/// Every problem found in a config file; `Display` prints one per line as
/// `FILE:LINE: KEY: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line of the key (or of its table when the key is missing); None when the
    /// file could not be read at all.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `uplink[1].qos` (1-based index as the user counts); empty
    /// when the problem is the whole file (unreadable, not TOML).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigError {
    fn whole_file(file: &str, line: Option<usize>, message: String) -> Self {
        let key = String::new();
        ConfigError {
            problems: vec![Problem {
                file: file.to_owned(),
                line,
                key,
                message,
            }],
        }
    }
}

/// Reads, parses and validates the config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::whole_file(&file, None, format!("cannot read the config file: {error}"))
    })?;
    parse(&file, &text)
}

/// Where the gateway running with the file at `path` keeps its state, read as leniently as
/// possible: `bridgehead status` must find the running gateway even when the file has
/// problems (an edit that a reload refused).
///
/// A file that sets no `data_dir` means `$STATE_DIRECTORY` under systemd; from a shell,
/// where that is not set, the packaged unit's state directory ([`PACKAGED_DATA_DIR`]) is
/// taken when it holds a gateway's files (or cannot be looked into) and `./bridgehead-data`
/// does not: `bridgehead status --config /etc/bridgehead/bridgehead.toml` on the box finds
/// the gateway the unit runs.
pub fn data_dir_of(path: &Path) -> PathBuf {
    data_dir_from(
        path,
        std::env::var_os("STATE_DIRECTORY").as_deref(),
        [Path::new(defaults::DATA_DIR), Path::new(PACKAGED_DATA_DIR)],
    )
}

/// The `StateDirectory=` of `systemd/bridgehead.service`.
pub const PACKAGED_DATA_DIR: &str = "/var/lib/bridgehead";

/// `local` and `packaged`: where a gateway run from a shell and the unit keep their state.
fn data_dir_from(
    path: &Path,
    state_directory: Option<&std::ffi::OsStr>,
    [local, packaged]: [&Path; 2],
) -> PathBuf {
    let configured = std::fs::read_to_string(path).ok().and_then(|text| {
        let table: toml::Table = text.parse().ok()?;
        table
            .get("gateway")?
            .get("data_dir")?
            .as_str()
            .map(PathBuf::from)
    });
    if let Some(dir) = configured {
        return dir;
    }
    if state_directory.is_some_and(|d| !d.is_empty()) {
        return defaults::data_dir(state_directory);
    }
    // A gateway's files, or a directory this user may not look into (the unit's is 0750).
    let holds = |dir: &Path| {
        ["status.sock", "status.json", "outbox.db"]
            .iter()
            .any(|name| match std::fs::symlink_metadata(dir.join(name)) {
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
            })
    };
    match !holds(local) && holds(packaged) {
        true => packaged.to_path_buf(),
        false => local.to_path_buf(),
    }
}

/// Parses and validates config text; `file` names it in the problems.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    parse_with(file, text, std::env::var_os("STATE_DIRECTORY").as_deref())
}

fn parse_with(
    file: &str,
    text: &str,
    state_directory: Option<&std::ffi::OsStr>,
) -> Result<Config, ConfigError> {
    let doc = ImDocument::parse(text).map_err(|error| syntax_error(file, text, &error))?;
    let mut report = Report::new(file, &doc);
    let parsed = raw::parse(text);
    for key in &parsed.unknown_keys {
        report.unknown_key(key);
    }
    match parsed.config {
        Ok(raw) => {
            let config = validate::validate(&raw, &mut report, state_directory);
            report.finish(config)
        }
        Err(wrong) => {
            report.wrong_type(wrong);
            Err(report.into_error())
        }
    }
}

fn syntax_error(file: &str, text: &str, error: &toml_edit::TomlError) -> ConfigError {
    let offset = error.span().map_or(0, |span| span.start);
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    let what = error.message().trim().replace('\n', "; ");
    let message = format!("not valid TOML at column {column}: {what}");
    ConfigError::whole_file(file, Some(line_at(text, offset)), message)
}

/// A fully validated configuration. Every field holds a usable value; `{gateway_id}` is
/// already substituted in every topic string.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub local: LocalConfig,
    pub cloud: CloudConfig,
    pub queue: QueueConfig,
    pub uplink: Vec<UplinkRule>,
    pub downlink: Vec<DownlinkRule>,
    /// Modbus devices to poll and write.
    pub modbus: Vec<ModbusDevice>,
    /// Line-oriented serial sensors.
    pub serial: Vec<SerialSensor>,
    /// `[[rule]]`: threshold rules run on local messages.
    pub rules: Vec<ThresholdRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub id: String,
    /// Outbox database and other state.
    pub data_dir: PathBuf,
    /// Local topic where the gateway publishes its metrics document (retained JSON).
    pub metrics_topic: String,
    /// How often metrics are published and `status.json` is rewritten.
    pub metrics_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    /// MQTT 3.1.1 listener.
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener.
    pub listen_v5: Option<SocketAddr>,
    /// Largest publish payload a device may send, in bytes.
    pub max_payload: usize,
    /// Most device connections at once (front door refuses more).
    pub max_connections: usize,
    /// Time a new connection has to send its CONNECT (and finish its TLS handshake).
    pub connect_timeout: Duration,
    /// Longest keep alive a client may ask for (MQTT 5 clients asking for more, or for
    /// none, are told this one in CONNACK; MQTT 3.x clients are refused). None: any.
    pub max_keep_alive: Option<u16>,
    /// Passwords, ACLs, TLS and per-client limits for devices.
    pub security: LocalSecurity,
    /// What `state.db` keeps of the local broker across restarts.
    pub persistence: Persistence,
}

/// Bounds of what the local broker keeps across restarts (`state.db`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    /// Bytes of topic plus payload of the retained messages kept.
    pub max_retained_size: u64,
    /// Messages queued per session beyond those in flight (QoS 0 dropped first, then the
    /// oldest); for a persistent session also what `state.db` keeps.
    pub max_queued_messages: usize,
    /// Bytes of topic plus payload queued per session.
    pub max_queued_bytes: usize,
}

/// Who may connect to the local broker and what they may do.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSecurity {
    /// mosquitto_passwd file of device users.
    pub password_file: Option<PathBuf>,
    /// Whether clients without a user name are let in.
    pub allow_anonymous: bool,
    /// mosquitto-format ACL file; None: every client may do everything.
    pub acl_file: Option<PathBuf>,
    /// Filters one connection may be subscribed to at once.
    pub max_subscriptions: usize,
    /// The TLS listener for devices, if any.
    pub tls: Option<DeviceTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTls {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA certificates that client certificates must chain to.
    pub ca_file: Option<PathBuf>,
    pub require_certificate: bool,
    /// The client certificate's common name is the client's user name.
    pub use_identity_as_username: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudConfig {
    /// The cloud broker (the first of `cloud.url`'s list).
    pub url: CloudUrl,
    /// Further nodes of the cloud broker, tried in order when the one before fails.
    pub failover: Vec<CloudUrl>,
    /// Telemetry connection client id.
    pub client_id: String,
    /// Command connection client id.
    pub command_client_id: String,
    pub keep_alive: Duration,
    /// Largest MQTT packet to or from the cloud, in bytes.
    pub max_packet_size: usize,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub status_topic: String,
    /// Unacknowledged QoS 1 publishes on the telemetry connection.
    pub max_inflight: u16,
    /// Reconnect backoff: first delay and ceiling (full jitter in between).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for CloudUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]:{}", self.host, self.port),
            false => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Bytes of topic plus payload the outbox may hold.
    pub max_size: u64,
    pub when_full: WhenFull,
    pub max_age: Duration,
    /// A message the cloud has not acknowledged within this is written to disk.
    pub commit_interval: Duration,
    /// Messages held in memory at most; beyond it the oldest are written at once.
    pub commit_batch: usize,
    /// `synchronous = FULL` (true, default) or `NORMAL`.
    pub fsync: bool,
    /// Bytes of topic plus payload the dead-letter table keeps (the newest).
    pub dead_letter_max_size: u64,
    /// Messages a second handed to the cloud at most (None: as fast as it takes them), so a
    /// backlog drains without flattening a cloud that just came back.
    pub drain_rate: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    DropOldest,
    RejectNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkRule {
    /// Filter on local topics.
    pub topic: String,
    /// Cloud topic = remote_prefix + local topic.
    pub remote_prefix: String,
    pub qos: Qos,
    /// Order after an outage: strict (oldest first) or live-first.
    pub drain: Lane,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkRule {
    /// Filter relative to remote_prefix.
    pub topic: String,
    /// The cloud subscription is remote_prefix + topic.
    pub remote_prefix: String,
    /// Local topic = local_prefix + (cloud topic - remote_prefix).
    pub local_prefix: String,
    pub qos: Qos,
}
