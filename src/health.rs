//! What the gateway tells about itself: counters, link states, the status document that is
//! written to `status.json` and published on the local metrics topic.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// A link state shared between its owner (who sets it) and the status reporter, with the
/// moment it last changed.
#[derive(Debug, Default)]
pub struct SharedLinkState {
    state: AtomicU8,
    /// Milliseconds after [`process_start`] of the last change.
    since_ms: AtomicU64,
}

impl SharedLinkState {
    pub fn set(&self, state: LinkState) {
        if self.state.swap(state as u8, Ordering::Relaxed) != state as u8 {
            let ms = process_start().elapsed().as_millis() as u64;
            self.since_ms.store(ms, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// How long the link has been in its current state.
    pub fn for_s(&self) -> u64 {
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        process_start().elapsed().saturating_sub(since).as_secs()
    }
}

/// The instant ages in the status document are measured from (monotonic).
pub fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
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
    /// Messages the outbox accepted (held in memory, and written to disk unless the cloud
    /// acknowledged them within `queue.commit_interval`).
    enqueued,
    /// Messages written to disk: the cloud had not acknowledged them within
    /// `queue.commit_interval` (the link down, the window full, a slow cloud), or memory
    /// held more than `queue.commit_batch`, or the gateway was shutting down.
    persisted,
    /// Messages acknowledged by the cloud (QoS 1) or written to it (QoS 0).
    forwarded,
    /// Oldest rows dropped because the outbox was full (`when_full = "drop-oldest"`).
    dropped_full,
    /// New messages refused because the outbox was full (`when_full = "reject-new"`).
    rejected_full,
    /// New messages refused because the outbox could not write to disk (disk full, I/O
    /// errors) and its memory was full.
    rejected_storage,
    /// Rows removed because they were older than `queue.max_age`.
    expired,
    /// Rows the cloud can never accept, moved to the dead-letter table.
    dead_lettered,
    /// Local messages matched by an uplink rule whose topic is not valid upstream (not
    /// UTF-8, a wildcard character, too long) and so could not be forwarded.
    intake_invalid,
    /// Commands received from the cloud.
    commands_received,
    /// Commands whose hand-off to the local broker completed (every subscriber at QoS 1/2
    /// acknowledged it, or it is held for an offline persistent session).
    commands_delivered,
    /// Commands a local subscriber did not acknowledge within 5 s: acknowledged upstream
    /// anyway, while they wait in the subscriber's session.
    commands_unconfirmed,
    /// Commands redelivered by the cloud after they had been handed over (acked again only).
    commands_duplicate,
    /// Commands that could not be handed to the local broker.
    commands_failed,
    /// Cloud connection attempts that failed or connections that were lost.
    reconnects,
    /// Device connections refused before their CONNACK (limits, a bad CONNECT, timeouts,
    /// logins).
    connections_refused,
    /// Device connections without a finished TLS handshake and CONNECT in `local.connect_timeout`.
    connect_timeouts,
    /// Device connections closed for a malformed packet or a protocol violation.
    malformed_packets,
    /// Device connections closed for a packet over the limit (or buffers over the total bound).
    oversize_packets,
    /// Device connections closed because nothing came within 1.5 times their keep alive.
    keepalive_timeouts,
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
    /// Times the outbox database was found damaged at start, moved aside and started anew.
    outbox_damaged,
    /// Dead letters deleted, oldest first, to keep the dead-letter table within its bound.
    dead_letters_dropped,
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
    /// Config reloads applied (changes or not).
    reloads,
    /// Config reloads refused: the new file had problems and the running config stayed.
    reloads_failed,
    /// Wall-clock steps seen (NTP sync, a manual `date`): readings' `ts` jumped with them.
    clock_steps,
    /// Local messages read by a `[[rule]]` (one per rule whose topic matched).
    rule_readings,
    /// Readings a rule found no number in (not numeric, not JSON, no field at value_path).
    rule_not_numeric,
    /// Decisions rules published into the local broker.
    rule_publications,
    /// Times a rule's output went stale (no reading within stale_after).
    rule_stale,
    /// Rule publications that failed: an output topic that is not valid, or no
    /// confirmation from the local broker.
    rule_errors,
    /// Readings not evaluated because the rule task had fallen behind.
    rule_overruns,
    /// Retained messages the local broker took but `state.db` does not keep (over
    /// `local.max_retained_size`): a restart forgets them.
    retained_dropped,
    /// Messages for a subscriber that its queue could not take (`local.max_queued_messages`
    /// or `max_queued_bytes`; QoS 0 first, then the oldest), and QoS 0 messages of a session
    /// that went offline.
    queued_dropped,
    /// Messages whose MQTT 5 message expiry interval passed while they were queued.
    local_expired,
    /// `state.db` errors (each is also logged).
    state_errors,
    /// Messages withheld from an MQTT 5 device because they exceed the maximum packet size
    /// it announced.
    withheld_oversize,
}

/// What the local broker keeps across a restart (`state.db`), updated every second.
#[derive(Debug, Default)]
pub struct BrokerStateGauges {
    pub retained: AtomicU64,
    pub retained_bytes: AtomicU64,
    /// Persistent sessions kept (online and offline).
    pub sessions: AtomicU64,
    /// QoS 1/2 messages kept for persistent sessions, not yet acknowledged by their device.
    pub queued: AtomicU64,
    /// Device connections now.
    pub connections: AtomicU64,
}

/// Current fill of the outbox, kept up to date by its owner.
#[derive(Debug, Default)]
pub struct QueueGauges {
    /// Messages in the outbox, in memory and on disk.
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    /// Of `rows`, those on disk.
    pub disk_rows: AtomicU64,
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
    pub broker_state: BrokerStateGauges,
    pub telemetry: SharedLinkState,
    pub commands: SharedLinkState,
    /// One entry per Modbus device and serial sensor, in config order.
    pub devices: Mutex<Vec<Arc<DeviceHealth>>>,
    device_names: Mutex<Vec<String>>,
    /// The running config's generation, the last reload and the keys waiting for a restart.
    pub config: Mutex<ConfigStatus>,
    /// Messages per second in (received) and out (forwarded) over the last metrics interval.
    pub rates: Mutex<Rates>,
    /// Each `[[rule]]`: its counters and the state of its outputs.
    pub rules: crate::automation::status::RulesHealth,
}

/// What the status tells about the running configuration.
#[derive(Debug, Clone, Default)]
pub struct ConfigStatus {
    /// 1 for the config the gateway started with, +1 for each reload that changed something.
    pub generation: u64,
    pub last_reload: Option<ReloadOutcome>,
    /// Keys changed in the file that only a restart applies (e.g. `gateway.data_dir`).
    pub restart_needed: Vec<String>,
}

/// One reload attempt.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub at: Instant,
    /// `applied`, `unchanged` or `failed`.
    pub result: &'static str,
    /// The summary line (`+1 uplink rule, cloud unchanged`), or why it failed.
    pub summary: String,
    /// Every problem of a refused file, as `check` prints them.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rates {
    pub in_per_s: f64,
    pub out_per_s: f64,
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
    /// A device restarted by a reload gets its entry back, counters included.
    pub fn device(&self, name: String) -> Arc<DeviceHealth> {
        let (Ok(mut devices), Ok(mut names)) = (self.devices.lock(), self.device_names.lock())
        else {
            return Arc::new(DeviceHealth::default());
        };
        if let Some(i) = names.iter().position(|n| *n == name) {
            return devices[i].clone();
        }
        let device = Arc::new(DeviceHealth::default());
        devices.push(device.clone());
        names.push(name);
        device
    }

    /// Forgets a device removed from the config.
    pub fn remove_device(&self, name: &str) {
        let (Ok(mut devices), Ok(mut names)) = (self.devices.lock(), self.device_names.lock())
        else {
            return;
        };
        if let Some(i) = names.iter().position(|n| n == name) {
            names.remove(i);
            devices.remove(i);
        }
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
            broker_state: BrokerStateGauges::default(),
            telemetry: SharedLinkState::default(),
            commands: SharedLinkState::default(),
            devices: Default::default(),
            device_names: Default::default(),
            config: Mutex::new(ConfigStatus {
                generation: 1,
                ..ConfigStatus::default()
            }),
            rates: Mutex::new(Rates::default()),
            rules: Default::default(),
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
    /// What the local broker keeps across a restart.
    pub local: LocalStatus,
    pub rates: Rates,
    pub counters: CounterSnapshot,
    /// Field devices by `modbus/NAME` or `serial/NAME`.
    pub devices: std::collections::BTreeMap<String, DeviceSnapshot>,
    pub config: ConfigDoc,
    pub clock: ClockDoc,
    /// `[[rule]]`s by name.
    pub rules: std::collections::BTreeMap<String, crate::automation::status::RuleSnapshot>,
}

#[derive(Debug, Serialize)]
pub struct CloudStatus {
    pub telemetry: &'static str,
    pub commands: &'static str,
    /// Seconds each link has been in its state.
    pub telemetry_for_s: u64,
    pub commands_for_s: u64,
}

#[derive(Debug, Serialize)]
pub struct ConfigDoc {
    pub generation: u64,
    pub last_reload: Option<ReloadDoc>,
    pub restart_needed: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ReloadDoc {
    pub ago_s: u64,
    pub result: &'static str,
    pub summary: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ClockDoc {
    /// The wall clock is synchronised (or at least later than this build): readings' `ts`
    /// can be trusted.
    pub trusted: bool,
}

#[derive(Debug, Serialize)]
pub struct LocalStatus {
    pub connections: u64,
    pub retained: u64,
    pub retained_bytes: u64,
    pub sessions: u64,
    pub queued: u64,
}

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub rows: u64,
    pub bytes: u64,
    pub on_disk: u64,
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
                telemetry_for_s: self.telemetry.for_s(),
                commands_for_s: self.commands.for_s(),
            },
            queue: QueueStatus {
                rows: self.queue.rows.load(Ordering::Relaxed),
                bytes: self.queue.bytes.load(Ordering::Relaxed),
                on_disk: self.queue.disk_rows.load(Ordering::Relaxed),
                oldest_age_ms: (oldest != u64::MAX).then(|| now.saturating_sub(oldest)),
            },
            local: LocalStatus {
                connections: self.broker_state.connections.load(Ordering::Relaxed),
                retained: self.broker_state.retained.load(Ordering::Relaxed),
                retained_bytes: self.broker_state.retained_bytes.load(Ordering::Relaxed),
                sessions: self.broker_state.sessions.load(Ordering::Relaxed),
                queued: self.broker_state.queued.load(Ordering::Relaxed),
            },
            rates: self.rates.lock().map(|r| *r).unwrap_or_default(),
            counters: self.counters.snapshot(),
            devices: self.device_snapshots(),
            config: self.config_doc(),
            clock: ClockDoc {
                trusted: crate::clock::trusted(),
            },
            rules: self.rules.snapshot(),
        }
    }

    fn config_doc(&self) -> ConfigDoc {
        let Ok(config) = self.config.lock() else {
            return ConfigDoc {
                generation: 0,
                last_reload: None,
                restart_needed: Vec::new(),
            };
        };
        ConfigDoc {
            generation: config.generation,
            last_reload: config.last_reload.as_ref().map(|r| ReloadDoc {
                ago_s: r.at.elapsed().as_secs(),
                result: r.result,
                summary: r.summary.clone(),
                problems: r.problems.clone(),
            }),
            restart_needed: config.restart_needed.clone(),
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

/// Where `status.json` is written. Under systemd, in the runtime directory (tmpfs): it is
/// rewritten every `metrics_interval`, and an idle gateway must not wear the SD card. A
/// symlink `DATA_DIR/status.json` points there, so `bridgehead status` finds it the same
/// way as when the gateway runs by hand (then the file is in the data directory itself).
pub fn status_file(
    data_dir: &std::path::Path,
    runtime: Option<&std::ffi::OsStr>,
) -> std::path::PathBuf {
    let in_data_dir = data_dir.join("status.json");
    let Some(runtime) = runtime
        .and_then(|dirs| dirs.to_str())
        .and_then(|dirs| dirs.split(':').next())
        .filter(|first| !first.is_empty())
    else {
        return in_data_dir;
    };
    let target = std::path::Path::new(runtime).join("status.json");
    if std::fs::read_link(&in_data_dir).ok().as_deref() != Some(target.as_path()) {
        let _ = std::fs::remove_file(&in_data_dir);
        if let Err(e) = std::os::unix::fs::symlink(&target, &in_data_dir) {
            tracing::warn!(link = %in_data_dir.display(), error = %e,
                "cannot link the status file into the data directory; `bridgehead status` will not find it when the gateway is not running");
        }
    }
    target
}

/// What the reporter takes from the config; a reload may change any of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReporterSettings {
    pub gateway_id: String,
    pub status_file: std::path::PathBuf,
    pub metrics_topic: String,
    pub every: Duration,
}

/// Every `every`: rewrites `status.json` in the data directory and publishes the same
/// document, retained, on the local metrics topic; measures the rates in and out. Runs
/// until shutdown, then writes once more.
pub async fn run_reporter(
    health: SharedHealth,
    mut settings: tokio::sync::watch::Receiver<ReporterSettings>,
    mut client: crate::broker::internal::Client,
    mut probe: crate::supervisor::Probe,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut current = settings.borrow_and_update().clone();
    let mut tick = tokio::time::interval(current.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_states = (LinkState::Connecting, LinkState::Connecting);
    let mut last_counts = (Instant::now(), 0u64, 0u64);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = settings.changed() => {
                if changed.is_ok() {
                    current = settings.borrow_and_update().clone();
                    tick = tokio::time::interval(current.every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                continue;
            }
            _ = probe.serve() => continue,
            _ = shutdown.changed() => {
                write_status(&health, &current).await;
                return;
            }
        }
        last_counts = measure_rates(&health, last_counts);
        let doc = write_status(&health, &current).await;
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
            let publication = crate::broker::internal::Publication {
                topic: current.metrics_topic.clone(),
                payload: json.into(),
                qos: 0,
                retain: true,
                completion: None,
            };
            if let Err(e) = client.publish(publication).await {
                tracing::warn!(error = %e, "publishing metrics on the local broker failed");
            }
        }
    }
}

/// Messages per second in and out since the last measurement.
fn measure_rates(
    health: &Health,
    (at, received, forwarded): (Instant, u64, u64),
) -> (Instant, u64, u64) {
    let now = Instant::now();
    let counters = &health.counters;
    let (r, f) = (
        counters.received.load(Ordering::Relaxed),
        counters.forwarded.load(Ordering::Relaxed),
    );
    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
    if let Ok(mut rates) = health.rates.lock() {
        rates.in_per_s = ((r - received) as f64 / secs * 10.0).round() / 10.0;
        rates.out_per_s = ((f - forwarded) as f64 / secs * 10.0).round() / 10.0;
    }
    (now, r, f)
}

/// Writes `status.json` atomically (temp file + rename) on a blocking thread; returns the
/// JSON it wrote.
async fn write_status(health: &Health, settings: &ReporterSettings) -> Option<String> {
    let json = match serde_json::to_string(&health.status(&settings.gateway_id)) {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(error = %e, "serialising the status document");
            return None;
        }
    };
    let path = settings.status_file.clone();
    let text = json.clone();
    let written = tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| (path, e))
    })
    .await;
    if let Ok(Err((path, e))) = written {
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
         cloud      telemetry {} for {}s, commands {} for {}s\n\
         outbox     {} rows ({} on disk), {} bytes, oldest {} ms\n\
         rates      in {} msg/s, out {} msg/s\n\
         drops      full {}, rejected {}, expired {}, dead-lettered {}, invalid topic {}, lost {}\n",
        field("/gateway_id"),
        field("/version"),
        field("/uptime_s"),
        field("/cloud/telemetry"),
        field("/cloud/telemetry_for_s"),
        field("/cloud/commands"),
        field("/cloud/commands_for_s"),
        field("/queue/rows"),
        field("/queue/on_disk"),
        field("/queue/bytes"),
        field("/queue/oldest_age_ms"),
        field("/rates/in_per_s"),
        field("/rates/out_per_s"),
        field("/counters/dropped_full"),
        field("/counters/rejected_full"),
        field("/counters/expired"),
        field("/counters/dead_lettered"),
        field("/counters/intake_invalid"),
        field("/counters/outbox_lost"),
    );
    out.push_str(&format!(
        "local      {} connections, {} retained ({} bytes), {} persistent sessions, {} messages queued for them\n",
        field("/local/connections"),
        field("/local/retained"),
        field("/local/retained_bytes"),
        field("/local/sessions"),
        field("/local/queued"),
    ));
    out.push_str(&format!(
        "config     generation {}",
        field("/config/generation")
    ));
    if let Some(reload) = doc.pointer("/config/last_reload").filter(|r| !r.is_null()) {
        let text = |key: &str| reload[key].as_str().unwrap_or("?").to_owned();
        out.push_str(&format!(
            ", last reload {}s ago: {} ({})",
            reload["ago_s"],
            text("result"),
            text("summary")
        ));
        for problem in reload["problems"].as_array().into_iter().flatten() {
            out.push_str(&format!("\n           {}", problem.as_str().unwrap_or("?")));
        }
    }
    out.push('\n');
    if let Some(keys) = doc
        .pointer("/config/restart_needed")
        .and_then(|k| k.as_array())
    {
        if !keys.is_empty() {
            let keys: Vec<&str> = keys.iter().filter_map(|k| k.as_str()).collect();
            out.push_str(&format!("restart    needed to apply {}\n", keys.join(", ")));
        }
    }
    if doc.pointer("/clock/trusted") == Some(&serde_json::Value::Bool(false)) {
        out.push_str("clock      not trusted yet (readings' ts say so)\n");
    }
    out.push_str("counters  ");
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
    out.push_str(&crate::automation::status::render(doc));
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

    #[test]
    fn under_systemd_the_status_file_is_on_the_runtime_directory_linked_from_the_data_dir() {
        let data = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        assert_eq!(
            status_file(data.path(), None),
            data.path().join("status.json")
        );
        let file = status_file(data.path(), Some(run.path().as_os_str()));
        assert_eq!(file, run.path().join("status.json"));
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(
            std::fs::read_to_string(data.path().join("status.json")).unwrap(),
            "{}"
        );
        // Idempotent across reloads.
        assert_eq!(status_file(data.path(), Some(run.path().as_os_str())), file);
    }
}
