//! What the gateway tells about itself: counters, link states, the status document that is
//! written to `status.json` and published on the local metrics topic.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

/// State of one cloud connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connecting = 0,
    Up = 1,
    BackingOff = 2,
    /// Not configured (no rules need this connection).
    Off = 3,
}

impl LinkState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => LinkState::Up,
            2 => LinkState::BackingOff,
            3 => LinkState::Off,
            _ => LinkState::Connecting,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::BackingOff => "backing_off",
            LinkState::Off => "off",
        }
    }
}

/// A link state shared between its owner (who sets it) and the status reporter.
#[derive(Debug, Default)]
pub struct SharedLinkState(AtomicU8);

impl SharedLinkState {
    pub fn set(&self, state: LinkState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> LinkState {
        LinkState::from_u8(self.0.load(Ordering::Relaxed))
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic event counters; each failure path of the gateway has one.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Counters`].
        #[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
        pub struct CounterSnapshot {
            $(pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Local messages matched by an uplink rule and handed to the outbox.
    received,
    /// Messages committed to the outbox.
    enqueued,
    /// Messages acknowledged by the cloud (QoS 1) or written to it (QoS 0).
    forwarded,
    /// Oldest rows dropped because the outbox was full (`when_full = "drop-oldest"`).
    dropped_full,
    /// New messages refused because the outbox was full (`when_full = "reject-new"`).
    rejected_full,
    /// Rows removed because they were older than `queue.max_age`.
    expired,
    /// Rows the cloud can never accept, moved to the dead-letter table.
    dead_lettered,
    /// Times the embedded broker skipped data the intake had not read yet.
    intake_overruns,
    /// Times a local device subscriber fell behind and lost messages in the broker.
    local_overruns,
    /// Local messages matched by an uplink rule whose topic is not valid upstream (not
    /// UTF-8, a wildcard character, too long) and so could not be forwarded.
    intake_invalid,
    /// Commands received from the cloud.
    commands_received,
    /// Commands confirmed by the local broker.
    commands_delivered,
    /// Commands redelivered by the cloud after they had been handed over (acked again only).
    commands_duplicate,
    /// Commands that could not be handed to the local broker.
    commands_failed,
    /// Cloud connection attempts that failed or connections that were lost.
    reconnects,
    /// Device connections refused or dropped by the front door (limits, bad CONNECT, timeouts).
    front_door_refused,
    /// Device connections without a finished TLS handshake and CONNECT in `local.connect_timeout`.
    front_door_timeouts,
    /// Device connections closed for garbage, a malformed packet or invalid UTF-8.
    front_door_malformed,
    /// Device connections closed for a packet over the limit (or buffers over the total bound).
    front_door_oversize,
    /// Device TLS handshakes that failed (no or untrusted client certificate, garbage).
    tls_failures,
    /// Device logins refused (bad user name or password, anonymous not allowed).
    auth_failures,
    /// Device publishes dropped by `local.acl_file`.
    acl_denied,
    /// Messages withheld from a device that may not read their topic.
    acl_withheld,
    /// Subscription filters refused (ACL, `local.max_subscriptions`, invalid, `$SYS`).
    subscriptions_refused,
    /// Changed password or ACL files that could not be loaded (the old ones stay).
    security_reload_errors,
    /// Outbox database errors (each is also logged).
    outbox_errors,
    /// Messages lost because the database refused them repeatedly (disk full, I/O errors).
    outbox_lost,
    /// Field readings (Modbus values, serial-line values) published into the local broker.
    field_readings,
    /// Modbus transactions that failed (timeout, exception, CRC error, garbage, I/O), all devices.
    field_errors,
    /// Modbus polls skipped because the previous cycle overran the poll period.
    field_overruns,
    /// Modbus writes done from commands.
    field_writes,
    /// Modbus commands refused (unparseable payload) or failed.
    field_write_errors,
    /// Serial lines dropped: too long, not UTF-8, or not in the sensor's format.
    serial_lines_dropped,
}

/// Current fill of the outbox, kept up to date by its writer.
#[derive(Debug, Default)]
pub struct QueueGauges {
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    /// Gateway-clock ms of the oldest row, or u64::MAX when empty.
    pub oldest_ts: AtomicU64,
    /// Gateway-clock ms "now", as last seen by the writer.
    pub now_ts: AtomicU64,
}

/// Everything the status reporter reads; shared by all components.
#[derive(Debug)]
pub struct Health {
    pub started: Instant,
    pub counters: Counters,
    pub queue: QueueGauges,
    pub telemetry: SharedLinkState,
    pub commands: SharedLinkState,
    /// One entry per Modbus device and serial sensor, in config order.
    pub devices: std::sync::Mutex<Vec<Arc<DeviceHealth>>>,
    device_names: std::sync::Mutex<Vec<String>>,
}

/// State of one field device, logged when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Not polled or opened yet.
    Starting = 0,
    Online = 1,
    /// Some recent transactions failed; still answering.
    Failing = 2,
    /// Not answering, or its port or connection cannot be opened; retried with backoff.
    Unreachable = 3,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Starting => "starting",
            DeviceState::Online => "online",
            DeviceState::Failing => "failing",
            DeviceState::Unreachable => "unreachable",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => DeviceState::Online,
            2 => DeviceState::Failing,
            3 => DeviceState::Unreachable,
            _ => DeviceState::Starting,
        }
    }
}

/// Per-device counters, shown under `devices` in the status document.
#[derive(Debug, Default)]
pub struct DeviceHealth {
    state: AtomicU8,
    /// Modbus requests sent (reads and writes) or serial lines read.
    pub transactions: AtomicU64,
    pub timeouts: AtomicU64,
    /// Modbus exception responses.
    pub exceptions: AtomicU64,
    /// CRC errors, garbage replies, I/O and connection errors.
    pub errors: AtomicU64,
    pub overruns: AtomicU64,
    pub readings: AtomicU64,
    pub writes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Serial lines dropped (too long, not UTF-8, not in the format).
    pub dropped: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceSnapshot {
    pub state: &'static str,
    pub transactions: u64,
    pub timeouts: u64,
    pub exceptions: u64,
    pub errors: u64,
    pub overruns: u64,
    pub readings: u64,
    pub writes: u64,
    pub write_errors: u64,
    pub dropped: u64,
}

impl DeviceHealth {
    /// Sets the state; true when it changed (the caller logs it).
    pub fn set_state(&self, state: DeviceState) -> bool {
        self.state.swap(state as u8, Ordering::Relaxed) != state as u8
    }

    pub fn state(&self) -> DeviceState {
        DeviceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn snapshot(&self) -> DeviceSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DeviceSnapshot {
            state: self.state().as_str(),
            transactions: get(&self.transactions),
            timeouts: get(&self.timeouts),
            exceptions: get(&self.exceptions),
            errors: get(&self.errors),
            overruns: get(&self.overruns),
            readings: get(&self.readings),
            writes: get(&self.writes),
            write_errors: get(&self.write_errors),
            dropped: get(&self.dropped),
        }
    }
}

impl Health {
    /// Registers a field device under `name` (unique per kind: `modbus/NAME`, `serial/NAME`).
    pub fn device(&self, name: String) -> Arc<DeviceHealth> {
        let device = Arc::new(DeviceHealth::default());
        if let Ok(mut devices) = self.devices.lock() {
            devices.push(device.clone());
        }
        if let Ok(mut names) = self.device_names.lock() {
            names.push(name);
        }
        device
    }

    fn device_snapshots(&self) -> std::collections::BTreeMap<String, DeviceSnapshot> {
        let (Ok(devices), Ok(names)) = (self.devices.lock(), self.device_names.lock()) else {
            return Default::default();
        };
        names
            .iter()
            .cloned()
            .zip(devices.iter().map(|d| d.snapshot()))
            .collect()
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            counters: Counters::default(),
            queue: QueueGauges {
                oldest_ts: AtomicU64::new(u64::MAX),
                ..QueueGauges::default()
            },
            telemetry: SharedLinkState::default(),
            commands: SharedLinkState::default(),
            devices: Default::default(),
            device_names: Default::default(),
        }
    }
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug, Serialize)]
pub struct StatusDoc {
    pub gateway_id: String,
    pub version: &'static str,
    pub uptime_s: u64,
    pub cloud: CloudStatus,
    pub queue: QueueStatus,
    pub counters: CounterSnapshot,
    /// Field devices by `modbus/NAME` or `serial/NAME`.
    pub devices: std::collections::BTreeMap<String, DeviceSnapshot>,
}

#[derive(Debug, Serialize)]
pub struct CloudStatus {
    pub telemetry: &'static str,
    pub commands: &'static str,
}

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub rows: u64,
    pub bytes: u64,
    pub oldest_age_ms: Option<u64>,
}

impl Health {
    pub fn status(&self, gateway_id: &str) -> StatusDoc {
        let oldest = self.queue.oldest_ts.load(Ordering::Relaxed);
        let now = self.queue.now_ts.load(Ordering::Relaxed);
        StatusDoc {
            gateway_id: gateway_id.to_owned(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            cloud: CloudStatus {
                telemetry: self.telemetry.get().as_str(),
                commands: self.commands.get().as_str(),
            },
            queue: QueueStatus {
                rows: self.queue.rows.load(Ordering::Relaxed),
                bytes: self.queue.bytes.load(Ordering::Relaxed),
                oldest_age_ms: (oldest != u64::MAX).then(|| now.saturating_sub(oldest)),
            },
            counters: self.counters.snapshot(),
            devices: self.device_snapshots(),
        }
    }
}

pub type SharedHealth = Arc<Health>;

/// Lets a repeated warning through at most once per `every`, counting what it held back.
#[derive(Debug)]
pub struct RateLimit {
    every: std::time::Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: std::time::Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when the caller should log now; `n` events were held back since the last log.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Every `every`: rewrites `status.json` in the data directory and publishes the same
/// document, retained, on the local metrics topic. Runs until shutdown, then writes once more.
pub async fn run_reporter(
    health: SharedHealth,
    gateway_id: String,
    status_file: std::path::PathBuf,
    metrics_topic: String,
    mut link: crate::broker::Link,
    every: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_states = (LinkState::Connecting, LinkState::Connecting);
    let mut link_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // The link's notifications must be read, or the broker stalls it.
            next = link.next(), if link_open => {
                link_open = next.is_ok();
                continue;
            }
            _ = shutdown.changed() => {
                write_status(&health, &gateway_id, &status_file);
                return;
            }
        }
        let doc = write_status(&health, &gateway_id, &status_file);
        let states = (health.telemetry.get(), health.commands.get());
        if states != last_states {
            last_states = states;
            tracing::debug!(
                telemetry = states.0.as_str(),
                commands = states.1.as_str(),
                "cloud link states"
            );
        }
        if let Some(json) = doc {
            let publish = rumqttd::protocol::Publish::new(metrics_topic.clone(), json, true);
            if let Err(e) = link
                .tx
                .send(rumqttd::protocol::Packet::Publish(publish, None))
                .await
            {
                tracing::warn!(error = %e, "publishing metrics on the local broker failed");
            }
        }
    }
}

/// Writes `status.json` atomically (temp file + rename); returns the JSON it wrote.
fn write_status(health: &Health, gateway_id: &str, path: &std::path::Path) -> Option<String> {
    let json = match serde_json::to_string(&health.status(gateway_id)) {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(error = %e, "serialising the status document");
            return None;
        }
    };
    let tmp = path.with_extension("json.tmp");
    if let Err(e) = std::fs::write(&tmp, &json).and_then(|_| std::fs::rename(&tmp, path)) {
        tracing::warn!(path = %path.display(), error = %e, "writing the status file failed");
    }
    Some(json)
}

/// The status document as `bridgehead status` prints it.
pub fn render_status(doc: &serde_json::Value) -> String {
    let field = |path: &str| {
        doc.pointer(path)
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".to_owned(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "?".to_owned())
    };
    let mut out = format!(
        "gateway    {} (bridgehead {}), up {}s\n\
         cloud      telemetry {}, commands {}\n\
         outbox     {} rows, {} bytes, oldest {} ms\n\
         counters  ",
        field("/gateway_id"),
        field("/version"),
        field("/uptime_s"),
        field("/cloud/telemetry"),
        field("/cloud/commands"),
        field("/queue/rows"),
        field("/queue/bytes"),
        field("/queue/oldest_age_ms"),
    );
    if let Some(counters) = doc.get("counters").and_then(|c| c.as_object()) {
        for (name, value) in counters {
            out.push_str(&format!(" {name}={value}"));
        }
    }
    out.push('\n');
    if let Some(devices) = doc.get("devices").and_then(|d| d.as_object()) {
        for (name, device) in devices {
            let state = device["state"].as_str().unwrap_or("?");
            out.push_str(&format!("device     {name} {state}"));
            if let Some(counters) = device.as_object() {
                for (key, value) in counters.iter().filter(|(key, _)| *key != "state") {
                    out.push_str(&format!(" {key}={value}"));
                }
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
    fn status_shows_each_field_device() {
        let health = Health::default();
        let plc = health.device("modbus/plc".to_owned());
        plc.set_state(DeviceState::Failing);
        inc(&plc.timeouts);
        let doc = serde_json::to_value(health.status("gw")).expect("status serialises");
        let text = render_status(&doc);
        assert!(
            text.contains("device     modbus/plc failing dropped=0 errors=0 exceptions=0 overruns=0 readings=0 timeouts=1 transactions=0 write_errors=0 writes=0\n"),
            "{text}"
        );
    }
}
