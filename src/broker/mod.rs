//! The site's local MQTT broker (3.1, 3.1.1 and 5 on every listener), in the gateway's own
//! runtime.
//!
//! - [`listeners`] accept devices (TCP, TLS) within `local.max_connections`;
//! - a [`connection`] task per device reads, frames ([`codec`]) and handles every packet:
//!   [`connect`], publishes, acknowledgements, subscriptions, keep alive;
//! - the [`core`] owns every [`session`], the subscription tree ([`router`]) and the
//!   [`retained`] store, behind one lock, and keeps the journal [`persist`] writes to
//!   `state.db` (write-behind: nothing for what a device acknowledges within
//!   `queue.commit_interval`, nothing while idle);
//! - the [`intake`] hands what `[[uplink]]` rules match to the outbox, and local messages
//!   to the `[[rule]]`s, before the device's PUBACK;
//! - [`internal`] clients are how the gateway's own parts publish and subscribe;
//! - [`auth`], [`acl`], [`policy`] and [`tls`] decide who may connect and what they touch.

pub mod acl;
pub mod auth;
pub mod codec;
mod connect;
pub mod connection;
pub mod core;
pub mod intake;
pub mod internal;
pub mod listeners;
pub mod message;
pub mod persist;
pub mod policy;
pub mod retained;
pub mod router;
pub mod session;
pub mod tls;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{debug, warn};

use self::core::{wake_all, Core, Limits};
use codec::{Budget, PacketError};
use connect::Refused;
use connection::Close;
use message::OriginKind;
use policy::SharedPolicy;

use crate::config::{Config, LocalConfig};
use crate::health::{inc, RateLimit, SharedHealth};

pub use intake::{Intake, IntakeRule, Rules as IntakeRules};

/// Client ids of the gateway's own subscribers start with this; devices may not use it.
pub const INTERNAL_ID_PREFIX: &str = "bridgehead-internal-";

/// Room for topic, properties and headers on top of `local.max_payload` in a packet.
const PACKET_OVERHEAD: usize = 64 * 1024;
/// Bytes of unfinished device packets all connections may hold together (at least four of
/// the largest packets).
const BUFFERS: usize = 64 << 20;
/// QoS 1/2 publishes a client may have unacknowledged toward the broker (MQTT 5 Receive
/// Maximum in CONNACK).
const RECEIVE_MAXIMUM: u16 = 1024;
/// Topic aliases a client may set (MQTT 5 Topic Alias Maximum in CONNACK).
const TOPIC_ALIAS_MAXIMUM: u16 = 64;
/// Messages in flight to one client at most (its own Receive Maximum may be lower).
const MAX_INFLIGHT: u16 = 1000;

/// Per-connection settings a reload can change (new connections take them).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// `local.max_keep_alive` in seconds.
    pub max_keep_alive: Option<u16>,
    pub max_connections: usize,
    /// Largest packet a client may send (and is told in MQTT 5).
    pub max_packet: usize,
    pub max_subscriptions: usize,
    pub receive_max: u16,
    pub topic_alias_max: u16,
}

impl Settings {
    pub fn of(local: &LocalConfig) -> Self {
        Settings {
            connect_timeout: local.connect_timeout,
            max_keep_alive: local.max_keep_alive,
            max_connections: local.max_connections,
            max_packet: local.max_payload + PACKET_OVERHEAD,
            max_subscriptions: local.security.max_subscriptions,
            receive_max: RECEIVE_MAXIMUM,
            topic_alias_max: TOPIC_ALIAS_MAXIMUM,
        }
    }
}

/// The core's bounds a config asks for.
pub fn limits(config: &Config) -> Limits {
    Limits {
        max_queued_messages: config.local.persistence.max_queued_messages,
        max_queued_bytes: config.local.persistence.max_queued_bytes,
        max_retained_size: config.local.persistence.max_retained_size as usize,
        max_inflight: MAX_INFLIGHT,
        commit_interval: config.queue.commit_interval,
    }
}

/// Everything the broker's tasks share.
pub struct Shared {
    core: Mutex<Core>,
    pub settings: ArcSwap<Settings>,
    pub policy: SharedPolicy,
    pub health: SharedHealth,
    pub intake: Intake,
    pub budget: Arc<Budget>,
    pub throttle: auth::Throttle,
    pub logins_waiting: AtomicUsize,
    /// Device connections now, held to the current `max_connections`.
    active: Arc<AtomicUsize>,
    pub next_conn: AtomicU64,
    stopping: AtomicBool,
    log: Mutex<RateLimit>,
    login_log: Mutex<RateLimit>,
    denied_log: Mutex<RateLimit>,
}

/// One of `local.max_connections`, held while a device is connected. A counter rather
/// than a semaphore, so that a reload can lower the limit below the connections already
/// open (they stay; new ones wait for the count to fall).
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn locked<'a>(guard: &'a Mutex<RateLimit>) -> MutexGuard<'a, RateLimit> {
    guard.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(
        limits: Limits,
        settings: Settings,
        policy: SharedPolicy,
        intake: Intake,
        health: SharedHealth,
    ) -> Arc<Shared> {
        let budget = Budget::new(BUFFERS.max(4 * settings.max_packet));
        Arc::new(Shared {
            core: Mutex::new(Core::new(limits, health.clone())),
            settings: ArcSwap::from_pointee(settings),
            policy,
            health,
            intake,
            budget,
            throttle: auth::Throttle::default(),
            logins_waiting: AtomicUsize::new(0),
            active: Arc::new(AtomicUsize::new(0)),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            log: Mutex::new(RateLimit::new(Duration::from_secs(10))),
            login_log: Mutex::new(RateLimit::new(Duration::from_secs(10))),
            denied_log: Mutex::new(RateLimit::new(Duration::from_secs(10))),
        })
    }

    /// The core. Held briefly, never across an await.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place among `local.max_connections`, if there is one.
    pub fn permit(&self) -> Option<Permit> {
        let max = self.settings.load().max_connections;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.active.clone()))
    }

    pub fn connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Counts and logs a connection refused before its CONNACK.
    pub(crate) fn refused(&self, peer: SocketAddr, reason: &Refused) {
        let c = &self.health.counters;
        match reason {
            Refused::Io(_) => {
                debug!(%peer, %reason, "device connection ended before its CONNECT");
                return;
            }
            Refused::Timeout => inc(&c.connect_timeouts),
            Refused::Tls(_) => inc(&c.tls_failures),
            Refused::Login { .. } => inc(&c.auth_failures),
            Refused::Packet(PacketError::TooLarge { .. } | PacketError::OverBudget) => {
                inc(&c.oversize_packets)
            }
            Refused::Packet(_) | Refused::Protocol(_) | Refused::ClientId(_) => {
                inc(&c.malformed_packets)
            }
            Refused::ReservedId(_)
            | Refused::AuthMethod(_)
            | Refused::KeepAlive(..)
            | Refused::Busy
            | Refused::Sessions => {}
        }
        inc(&c.connections_refused);
        // Refused logins have their own budget of log lines: a flood of garbage must not
        // hide a password guesser.
        let log = match reason {
            Refused::Login { .. } => &self.login_log,
            _ => &self.log,
        };
        if let Some(held) = locked(log).check() {
            warn!(%peer, %reason, earlier_warnings_suppressed = held, "device connection refused");
        }
    }

    /// Counts and logs how a device's connection ended.
    pub(crate) fn ended(&self, peer: SocketAddr, client_id: &str, end: &Close) {
        let c = &self.health.counters;
        match end {
            Close::Kicked(codec::reason::KEEP_ALIVE_TIMEOUT) => {
                inc(&c.keepalive_timeouts);
                debug!(%peer, client_id, "device disconnected: nothing came within 1.5 times its keep alive");
                return;
            }
            Close::Peer | Close::Disconnect | Close::Kicked(_) | Close::Outbox | Close::Io(_) => {
                debug!(%peer, client_id, reason = %end, "device disconnected");
                return;
            }
            Close::Packet(PacketError::TooLarge { .. } | PacketError::OverBudget) => {
                inc(&c.oversize_packets)
            }
            Close::Packet(_) | Close::Protocol { .. } => inc(&c.malformed_packets),
        }
        if let Some(held) = locked(&self.log).check() {
            warn!(%peer, client_id, reason = %end, earlier_warnings_suppressed = held,
                "device connection closed by the broker");
        }
    }

    /// Logs a publish, will or subscription the ACL refused (rate-limited).
    pub(crate) fn log_denied(&self, peer: SocketAddr, client_id: &str, what: &str, topic: &str) {
        if let Some(held) = locked(&self.denied_log).check() {
            warn!(%peer, client_id, topic, earlier_warnings_suppressed = held,
                "{what} denied by local.acl_file");
        }
    }

    /// Tells every connection to finish and go (MQTT 5: DISCONNECT 0x8B); new ones are
    /// refused from now on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let core = self.lock();
        for (_, s) in core.sessions.iter() {
            if let (Some(conn), session::SessionKind::Device) = (&s.conn, s.kind) {
                conn.signal.kick(codec::reason::SERVER_SHUTTING_DOWN);
            }
        }
    }

    /// Waits (within `budget`) until every device connection has ended.
    pub async fn drained(&self, budget: Duration) {
        let deadline = tokio::time::Instant::now() + budget;
        while self.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Applies new per-connection settings and core bounds (a reload).
    pub fn reconfigure(&self, settings: Settings, limits: Limits) {
        self.settings.store(Arc::new(settings));
        self.lock().limits = limits;
    }

    /// Offers what the core published itself (wills) to the intake.
    pub async fn hand_over(&self, published: Vec<Arc<message::Message>>) {
        if published.is_empty() {
            return;
        }
        let mut batch = self.intake.batch();
        for msg in &published {
            batch.offer(msg);
        }
        if batch.flush().await.is_err() {
            debug!(
                wills = published.len(),
                "the outbox has stopped: wills not forwarded"
            );
        }
    }

    /// A client of the gateway's own, for publishing and subscribing in process.
    pub fn client(self: &Arc<Self>, name: &str, origin: OriginKind) -> internal::Client {
        internal::Client::open(self.clone(), name, origin)
    }
}

/// How often keep alives are checked and the retained store and the status gauges are
/// looked after: a silent client is closed within 1.5 times its keep alive plus this.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// Publishes wills whose delay passed and ends sessions whose expiry passed, hands what
/// they published to the intake, drops expired retained messages and updates the status
/// gauges; until shutdown. It takes the core's lock at least every second, so a core that
/// never comes free stops its liveness probe (and so the watchdog).
pub async fn run_timers(
    shared: Arc<Shared>,
    mut probe: crate::supervisor::Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    let timer_wake = shared.lock().timer_wake.clone();
    let mut intake = shared.intake.batch();
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut wake = Vec::new();
        let (next, published) = {
            let mut core = shared.lock();
            let next = core.tick(std::time::Instant::now(), &mut wake);
            (next, std::mem::take(&mut core.published))
        };
        wake_all(&mut wake);
        for msg in &published {
            intake.offer(msg);
        }
        if intake.flush().await.is_err() {
            return;
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = timer_wake.notified() => {}
            _ = housekeeping.tick() => housekeep(&shared),
            _ = probe.serve() => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn housekeep(shared: &Shared) {
    let now = std::time::Instant::now();
    let mut core = shared.lock();
    core.sweep_keep_alives();
    let gone = core.retained.expire(now);
    if core.persist && !gone.is_empty() {
        for topic in gone {
            core.journal.retained.insert(topic);
        }
        core.journal.since.get_or_insert(now);
    }
    let (retained, retained_bytes, sessions, queued) = core.gauges();
    drop(core);
    let g = &shared.health.broker_state;
    g.retained.store(retained, Ordering::Relaxed);
    g.retained_bytes.store(retained_bytes, Ordering::Relaxed);
    g.sessions.store(sessions, Ordering::Relaxed);
    g.queued.store(queued, Ordering::Relaxed);
    g.connections
        .store(shared.connections() as u64, Ordering::Relaxed);
}
