//! What the local broker must not forget across a restart of the gateway: retained
//! messages, persistent sessions (clean session = 0; MQTT 5: a session expiry interval)
//! with their subscriptions, and the QoS 1/2 messages queued for them.
//!
//! rumqttd keeps all of this in memory only. The gateway learns it where messages enter
//! the broker: the front door's [hook](hook) sees every device's PUBLISH (after the ACL),
//! SUBSCRIBE, UNSUBSCRIBE, CONNECT and acknowledgement, and the downlink reports the
//! commands it hands over ([`State::published`]). A message for a persistent session is
//! recorded *before* rumqttd sees it and forgotten when the device acknowledges it, so
//! nothing falls between the two.
//!
//! One owner thread holds it in memory and writes `state.db` with the outbox's
//! discipline: a message the device acknowledges within `queue.commit_interval` is never
//! written; everything else (queued messages, retained changes, subscriptions) is
//! committed in one transaction once it is `commit_interval` old; nothing is written while
//! idle; a queued message that is on disk and then acknowledged is deleted at once (so it
//! is not replayed after a restart). Bounded: `local.max_retained_size` and
//! `local.max_queued_messages` per session, with counted drops.
//!
//! At start ([`restore`]) the retained messages go back into rumqttd and every stored
//! session is given back its subscriptions before the front door lets a device in; the
//! messages queued before the restart are delivered by the hook when the device resumes
//! its session.

mod filters;
pub mod hook;
pub mod restore;
mod store;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::broker::front_door::Backends;
use crate::broker::packet::Protocol;
use crate::broker::SideDoor;
use crate::health::{add, inc, RateLimit, SharedHealth};
use filters::FilterTree;
pub use store::StoredSession;
use store::{Batch, Store, StoredMessage};

/// Events the owner may have waiting; more are dropped and counted (`state_errors`).
const EVENT_QUEUE: usize = 65_536;
/// Stored persistent sessions at most; more are not kept (and counted).
const MAX_SESSIONS: usize = 100_000;
/// Subscriptions kept per persistent session (`local.max_subscriptions` caps each
/// connection, by default at 1000; a session collects them across connections).
const MAX_SESSION_FILTERS: usize = 10_000;
/// Bytes of topic and payload the owner may have waiting in `Published` events.
const EVENT_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_retained_size: u64,
    pub max_queued_messages: usize,
    pub commit_interval: Duration,
}

impl Limits {
    pub fn of(config: &crate::config::Config) -> Self {
        Limits {
            max_retained_size: config.local.persistence.max_retained_size,
            max_queued_messages: config.local.persistence.max_queued_messages,
            commit_interval: config.queue.commit_interval,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("opening {path}: {error}")]
    Open {
        path: String,
        error: rusqlite::Error,
    },
    #[error("starting the state's owner thread: {0}")]
    Thread(std::io::Error),
}

/// The handle every part of the gateway talks to the state's owner through.
#[derive(Clone)]
pub struct State {
    shared: Arc<Shared>,
}

/// A message of an earlier run waiting for its session's device.
#[derive(Debug, Clone)]
pub struct Replay {
    pub id: i64,
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    /// Sent to a connection before (DUP on the next try).
    pub sent: bool,
}

/// What the front door's hooks read without waiting for the owner.
pub(crate) struct Shared {
    events: flume::Sender<Event>,
    /// Filters at QoS 1/2 of the stored persistent sessions, rebuilt by the owner.
    filters: ArcSwap<FilterTree>,
    /// The QoS of every retained message in the broker, so that a subscriber gets it at
    /// its own QoS rather than the subscription's (rumqttd's choice).
    retained_qos: Mutex<HashMap<String, u8>>,
    /// Messages of earlier runs by client id, until their device acknowledges them.
    replays: Mutex<HashMap<Arc<str>, VecDeque<Replay>>>,
    next_conn: AtomicU64,
    /// Bytes of the `Published` events the owner has waiting (bounded by [`EVENT_BYTES`]).
    pending_bytes: AtomicU64,
    health: SharedHealth,
    overrun_log: Mutex<RateLimit>,
}

impl Shared {
    fn send(&self, event: Event) {
        if let Err(refused) = self.events.try_send(event) {
            if let Event::Published { topic, payload, .. } = refused.into_inner() {
                let size = weight(&topic, &payload);
                self.pending_bytes.fetch_sub(size, Ordering::Relaxed);
            }
            self.overrun();
        }
    }

    /// The owner is behind: what could not be handed to it is counted and logged.
    fn overrun(&self) {
        inc(&self.health.counters.state_errors);
        let held = self
            .overrun_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check();
        if let Some(held) = held {
            warn!(earlier_warnings_suppressed = held,
                "the state's owner is behind: a retained message or session change is not kept across a restart");
        }
    }

    /// Bookkeeping of a message entering the broker: the retained set, and the persistent
    /// sessions it is queued for. `scratch` is reused between calls.
    fn published(
        &self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        scratch: &mut Vec<(Arc<str>, u8)>,
    ) {
        // rumqttd clears a retained message on any empty publish, retained or not.
        let retained_change = retain || payload.is_empty();
        scratch.clear();
        if qos > 0 {
            let tree = self.filters.load();
            if !tree.is_empty() {
                tree.matches(topic, scratch);
            }
        }
        if !retained_change && scratch.is_empty() {
            return;
        }
        if retained_change {
            let mut map = self.retained_qos.lock().unwrap_or_else(|p| p.into_inner());
            match payload.is_empty() {
                true => map.remove(topic),
                false => map.insert(topic.to_owned(), qos),
            };
        }
        // Bounded in bytes too: 65,536 events of large payloads would be gigabytes.
        let size = weight(topic, payload);
        if self.pending_bytes.fetch_add(size, Ordering::Relaxed) + size > EVENT_BYTES {
            self.pending_bytes.fetch_sub(size, Ordering::Relaxed);
            self.overrun();
            return;
        }
        self.send(Event::Published {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain: retained_change,
            targets: std::mem::take(scratch),
        });
    }
}

#[derive(Debug)]
enum Event {
    Connected {
        conn: u64,
        client: Arc<str>,
        protocol: Protocol,
        persistent: bool,
        clean: bool,
        expiry: Option<u32>,
    },
    Disconnected {
        conn: u64,
        client: Arc<str>,
    },
    Subscribed {
        client: Arc<str>,
        filters: Vec<(String, u8)>,
    },
    Unsubscribed {
        client: Arc<str>,
        filters: Vec<String>,
    },
    /// `retain`: a change of the retained set (an empty payload clears it).
    Published {
        topic: Arc<str>,
        payload: Bytes,
        qos: u8,
        retain: bool,
        targets: Vec<(Arc<str>, u8)>,
    },
    /// The device acknowledged a message rumqttd delivered (by topic and payload).
    Delivered {
        client: Arc<str>,
        key: u64,
    },
    /// The device acknowledged a message of an earlier run.
    ReplayAcked {
        client: Arc<str>,
        id: i64,
    },
    Limits(Limits),
    Broker(Backends, SideDoor, tokio::runtime::Handle),
    Flush(oneshot::Sender<()>),
}

/// What a restart gives back to the broker before devices are let in.
#[derive(Debug, Default)]
pub struct Restore {
    pub retained: Vec<(String, u8, Bytes)>,
    pub sessions: Vec<StoredSession>,
}

/// Bytes of topic and payload: what the bounds on retained messages and on the owner's
/// waiting events count.
fn weight(topic: &str, payload: &[u8]) -> u64 {
    (topic.len() + payload.len()) as u64
}

/// A message's identity for matching rumqttd's deliveries to what was recorded.
pub fn key(topic: &str, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topic.bytes().chain([0]).chain(payload.iter().copied()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl State {
    /// Opens `DATA_DIR/state.db` and starts its owner thread; returns what the broker
    /// must be given back before devices connect.
    pub fn open(
        data_dir: &Path,
        limits: Limits,
        fsync: bool,
        health: SharedHealth,
    ) -> Result<(State, Restore, std::thread::JoinHandle<()>), StateError> {
        let path = data_dir.join("state.db");
        let (store, loaded, aside) =
            Store::open(&path, fsync).map_err(|error| StateError::Open {
                path: path.display().to_string(),
                error,
            })?;
        if let Some(aside) = aside {
            inc(&health.counters.state_errors);
            error!(path = %path.display(), aside = %aside.display(),
                "state.db was damaged; moved aside, starting without the retained messages and sessions it held");
        }
        let (tx, rx) = flume::bounded(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            events: tx,
            filters: ArcSwap::from_pointee(FilterTree::default()),
            retained_qos: Mutex::new(HashMap::new()),
            replays: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            pending_bytes: AtomicU64::new(0),
            health,
            overrun_log: Mutex::new(RateLimit::new(Duration::from_secs(10))),
        });
        let mut owner = Owner::new(store, shared.clone(), limits);
        let restore = owner.load(loaded);
        let thread = std::thread::Builder::new()
            .name("state".into())
            .spawn(move || owner.run(rx))
            .map_err(StateError::Thread)?;
        Ok((State { shared }, restore, thread))
    }

    /// The hook factory for the front door.
    pub fn hooks(
        &self,
        policy: crate::broker::policy::SharedPolicy,
    ) -> Arc<dyn crate::broker::hook::HookFactory> {
        Arc::new(hook::Hooks {
            shared: self.shared.clone(),
            policy,
        })
    }

    /// A message published into the broker by the gateway itself (a cloud command).
    pub fn published(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool) {
        let mut scratch = Vec::new();
        self.shared
            .published(topic, payload, qos, retain, &mut scratch);
    }

    pub fn set_limits(&self, limits: Limits) {
        self.shared.send(Event::Limits(limits));
    }

    /// Where sessions that expire are ended in rumqttd.
    pub fn attach_broker(&self, backends: Backends, side_door: SideDoor) {
        let handle = tokio::runtime::Handle::current();
        self.shared.send(Event::Broker(backends, side_door, handle));
    }

    /// Writes everything held (shutdown); returns once it is on disk.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .shared
            .events
            .send_async(Event::Flush(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

/// A message queued for a persistent session.
#[derive(Debug)]
struct Queued {
    id: i64,
    key: u64,
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
    on_disk: bool,
    /// From an earlier run: rumqttd does not have it, the hook delivers it.
    replay: bool,
}

#[derive(Debug)]
struct Session {
    protocol: Protocol,
    expiry: Option<u32>,
    filters: BTreeMap<String, u8>,
    queue: VecDeque<Queued>,
    /// The connection the device is on now.
    online: Option<u64>,
    offline_since: Option<Instant>,
}

impl Session {
    fn stored(&self, client: &str) -> StoredSession {
        StoredSession {
            client_id: client.to_owned(),
            protocol: self.protocol,
            expiry: self.expiry,
            filters: self.filters.iter().map(|(f, o)| (f.clone(), *o)).collect(),
        }
    }

    fn expires_at(&self) -> Option<Instant> {
        match (self.expiry, self.offline_since) {
            (Some(seconds), Some(since)) if seconds != u32::MAX => {
                Some(since + Duration::from_secs(u64::from(seconds)))
            }
            _ => None,
        }
    }
}

struct Owner {
    store: Store,
    shared: Arc<Shared>,
    limits: Limits,
    retained: HashMap<Arc<str>, (u8, Bytes)>,
    retained_bytes: u64,
    retained_dirty: HashSet<Arc<str>>,
    sessions: HashMap<Arc<str>, Session>,
    sessions_dirty: HashSet<Arc<str>>,
    sessions_deleted: HashSet<Arc<str>>,
    /// Queued messages not on disk yet, in arrival order: written once `commit_interval` old.
    unwritten: VecDeque<(Instant, Arc<str>, i64)>,
    /// Queued messages on disk that their device acknowledged (or that were dropped).
    deletes: Vec<i64>,
    dirty_since: Option<Instant>,
    /// When each offline MQTT 5 session with a finite expiry interval ends.
    expiries: HashMap<Arc<str>, Instant>,
    last_gauges: Option<Instant>,
    gauges_stale: bool,
    tree_dirty: bool,
    next_id: i64,
    broker: Option<(Backends, SideDoor, tokio::runtime::Handle)>,
    drop_log: RateLimit,
}

impl Owner {
    fn new(store: Store, shared: Arc<Shared>, limits: Limits) -> Self {
        Owner {
            store,
            shared,
            limits,
            retained: HashMap::new(),
            retained_bytes: 0,
            retained_dirty: HashSet::new(),
            sessions: HashMap::new(),
            sessions_dirty: HashSet::new(),
            sessions_deleted: HashSet::new(),
            unwritten: VecDeque::new(),
            deletes: Vec::new(),
            dirty_since: None,
            expiries: HashMap::new(),
            last_gauges: None,
            gauges_stale: false,
            tree_dirty: false,
            next_id: 1,
            broker: None,
            drop_log: RateLimit::new(Duration::from_secs(10)),
        }
    }

    fn health(&self) -> &SharedHealth {
        &self.shared.health
    }

    /// Takes in what the last run left: its queued messages become replays.
    fn load(&mut self, loaded: store::Loaded) -> Restore {
        let now = Instant::now();
        let mut restore = Restore::default();
        {
            let mut qos = self
                .shared
                .retained_qos
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (topic, q, payload) in loaded.retained {
                self.retained_bytes += weight(&topic, &payload);
                qos.insert(topic.clone(), q);
                restore.retained.push((topic.clone(), q, payload.clone()));
                self.retained.insert(topic.into(), (q, payload));
            }
        }
        for stored in loaded.sessions {
            let client: Arc<str> = stored.client_id.as_str().into();
            restore.sessions.push(stored.clone());
            let session = Session {
                protocol: stored.protocol,
                expiry: stored.expiry,
                filters: stored.filters.into_iter().collect(),
                queue: VecDeque::new(),
                online: None,
                offline_since: Some(now),
            };
            if let Some(at) = session.expires_at() {
                self.expiries.insert(client.clone(), at);
            }
            self.sessions.insert(client, session);
        }
        let mut replays = self
            .shared
            .replays
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for m in loaded.queued {
            self.next_id = self.next_id.max(m.id + 1);
            let Some(client) = self
                .sessions
                .get_key_value(m.client_id.as_str())
                .map(|(client, _)| client.clone())
            else {
                self.deletes.push(m.id);
                continue;
            };
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            let topic: Arc<str> = m.topic.as_str().into();
            replays
                .entry(client.clone())
                .or_default()
                .push_back(Replay {
                    id: m.id,
                    topic: topic.clone(),
                    payload: m.payload.clone(),
                    qos: m.qos,
                    sent: false,
                });
            session.queue.push_back(Queued {
                id: m.id,
                key: key(&m.topic, &m.payload),
                topic,
                payload: m.payload,
                qos: m.qos,
                on_disk: true,
                replay: true,
            });
        }
        drop(replays);
        self.tree_dirty = true;
        self.rebuild_tree();
        self.gauges_stale = true;
        self.gauges();
        info!(
            retained = self.retained.len(),
            sessions = self.sessions.len(),
            queued = self.queued_count(),
            "local broker state loaded from state.db"
        );
        restore
    }

    fn run(mut self, rx: flume::Receiver<Event>) {
        loop {
            let now = Instant::now();
            let event = match self.next_deadline() {
                None => rx.recv().ok(),
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(now)) {
                    Ok(event) => Some(event),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => {
                        self.commit(true);
                        return;
                    }
                },
            };
            let mut flushes = Vec::new();
            if let Some(event) = event {
                self.gauges_stale = true;
                self.handle(event, &mut flushes);
                for event in rx.try_iter().take(4096) {
                    self.handle(event, &mut flushes);
                }
            } else if rx.is_disconnected() && rx.is_empty() {
                self.commit(true);
                return;
            }
            self.rebuild_tree();
            self.expire(Instant::now());
            self.commit(!flushes.is_empty());
            if !flushes.is_empty() {
                self.last_gauges = None;
            }
            self.gauges();
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    fn handle(&mut self, event: Event, flushes: &mut Vec<oneshot::Sender<()>>) {
        match event {
            Event::Connected {
                conn,
                client,
                protocol,
                persistent,
                clean,
                expiry,
            } => self.connected(conn, client, protocol, persistent, clean, expiry),
            Event::Disconnected { conn, client } => {
                if let Some(session) = self.sessions.get_mut(&client) {
                    if session.online == Some(conn) {
                        session.online = None;
                        session.offline_since = Some(Instant::now());
                        if let Some(at) = session.expires_at() {
                            self.expiries.insert(client, at);
                        }
                    }
                }
            }
            Event::Subscribed { client, filters } => {
                if let Some(session) = self.sessions.get_mut(&client) {
                    // The front door caps filters per connection; a session lives across
                    // connections, so it is capped here too.
                    let mut refused = 0u64;
                    for (filter, options) in filters {
                        if session.filters.len() < MAX_SESSION_FILTERS
                            || session.filters.contains_key(&filter)
                        {
                            session.filters.insert(filter, options);
                        } else {
                            refused += 1;
                        }
                    }
                    if refused > 0 {
                        add(&self.shared.health.counters.state_errors, refused);
                        warn!(client_id = %client, filters = refused, max = MAX_SESSION_FILTERS,
                            "a persistent session has too many subscriptions; these are not kept across a restart");
                    }
                    self.session_changed(client);
                }
            }
            Event::Unsubscribed { client, filters } => {
                if let Some(session) = self.sessions.get_mut(&client) {
                    for filter in &filters {
                        session.filters.remove(filter);
                    }
                    self.session_changed(client);
                }
            }
            Event::Published {
                topic,
                payload,
                qos,
                retain,
                targets,
            } => {
                let size = weight(&topic, &payload);
                self.shared.pending_bytes.fetch_sub(size, Ordering::Relaxed);
                if retain {
                    self.retain(topic.clone(), qos, &payload);
                }
                for (client, sub_qos) in targets {
                    self.enqueue(&client, &topic, &payload, qos.min(sub_qos));
                }
            }
            Event::Delivered { client, key } => {
                if let Some(session) = self.sessions.get_mut(&client) {
                    if let Some(i) = session.queue.iter().position(|q| q.key == key && !q.replay) {
                        if let Some(q) = session.queue.remove(i) {
                            if q.on_disk {
                                self.deletes.push(q.id);
                            }
                        }
                    }
                }
            }
            Event::ReplayAcked { client, id } => self.forget(&client, id),
            Event::Limits(limits) => {
                self.limits = limits;
                self.trim_all();
            }
            Event::Broker(backends, side_door, handle) => {
                self.broker = Some((backends, side_door, handle))
            }
            Event::Flush(done) => flushes.push(done),
        }
    }

    fn connected(
        &mut self,
        conn: u64,
        client: Arc<str>,
        protocol: Protocol,
        persistent: bool,
        clean: bool,
        expiry: Option<u32>,
    ) {
        if clean || !persistent {
            self.end_session(&client);
        }
        if !persistent {
            return;
        }
        if !self.sessions.contains_key(&client) && self.sessions.len() >= MAX_SESSIONS {
            inc(&self.health().counters.state_errors);
            if let Some(held) = self.drop_log.check() {
                warn!(client_id = %client, earlier_warnings_suppressed = held,
                    "{MAX_SESSIONS} persistent sessions are kept already; this one is not kept across a restart");
            }
            return;
        }
        let session = self.sessions.entry(client.clone()).or_insert(Session {
            protocol,
            expiry,
            filters: BTreeMap::new(),
            queue: VecDeque::new(),
            online: None,
            offline_since: None,
        });
        session.protocol = protocol;
        session.expiry = expiry;
        session.online = Some(conn);
        session.offline_since = None;
        self.expiries.remove(&client);
        self.session_changed(client);
    }

    /// The session is over (clean start, or it expired): its subscriptions and queued
    /// messages go too.
    fn end_session(&mut self, client: &Arc<str>) {
        self.expiries.remove(client);
        if self.sessions.remove(client).is_none() {
            return;
        }
        self.shared
            .replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client);
        self.sessions_dirty.remove(client);
        self.sessions_deleted.insert(client.clone());
        self.tree_dirty = true;
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    fn session_changed(&mut self, client: Arc<str>) {
        // A session ended and begun again before a commit stays in `sessions_deleted`: the
        // commit deletes the old one's rows (its queued messages too) before writing the new.
        self.sessions_dirty.insert(client);
        self.tree_dirty = true;
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    fn retain(&mut self, topic: Arc<str>, qos: u8, payload: &Bytes) {
        let old = self
            .retained
            .remove(&topic)
            .map_or(0, |(_, p)| (topic.len() + p.len()) as u64);
        self.retained_bytes -= old;
        self.retained_dirty.insert(topic.clone());
        self.dirty_since.get_or_insert_with(Instant::now);
        if payload.is_empty() {
            return;
        }
        let size = weight(&topic, payload);
        if self.retained_bytes + size > self.limits.max_retained_size {
            inc(&self.health().counters.retained_dropped);
            if let Some(held) = self.drop_log.check() {
                warn!(topic = %topic, max_retained_size = self.limits.max_retained_size, earlier_warnings_suppressed = held,
                    "retained message not kept across a restart: local.max_retained_size reached");
            }
            return;
        }
        self.retained_bytes += size;
        self.retained.insert(topic, (qos, payload.clone()));
    }

    fn enqueue(&mut self, client: &Arc<str>, topic: &Arc<str>, payload: &Bytes, qos: u8) {
        if qos == 0 {
            return;
        }
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        session.queue.push_back(Queued {
            id,
            key: key(topic, payload),
            topic: topic.clone(),
            payload: payload.clone(),
            qos,
            on_disk: false,
            replay: false,
        });
        self.unwritten
            .push_back((Instant::now(), client.clone(), id));
        self.trim(client);
    }

    /// Drops the oldest queued messages of `client` over `max_queued_messages`.
    fn trim(&mut self, client: &Arc<str>) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let mut dropped = Vec::new();
        while session.queue.len() > self.limits.max_queued_messages {
            if let Some(q) = session.queue.pop_front() {
                dropped.push(q);
            }
        }
        if dropped.is_empty() {
            return;
        }
        add(
            &self.shared.health.counters.queued_dropped,
            dropped.len() as u64,
        );
        if let Some(held) = self.drop_log.check() {
            warn!(client_id = %client, dropped = dropped.len(), max_queued_messages = self.limits.max_queued_messages,
                earlier_warnings_suppressed = held,
                "oldest messages queued for a persistent session dropped from state.db: local.max_queued_messages reached");
        }
        let mut replays = self
            .shared
            .replays
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for q in dropped {
            if q.on_disk {
                self.deletes.push(q.id);
            }
            if q.replay {
                if let Some(list) = replays.get_mut(client) {
                    list.retain(|r| r.id != q.id);
                }
            }
        }
    }

    fn trim_all(&mut self) {
        let clients: Vec<Arc<str>> = self.sessions.keys().cloned().collect();
        for client in clients {
            self.trim(&client);
        }
    }

    /// A message of an earlier run was acknowledged by its device.
    fn forget(&mut self, client: &Arc<str>, id: i64) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        if let Ok(i) = session.queue.binary_search_by_key(&id, |q| q.id) {
            if let Some(q) = session.queue.remove(i) {
                if q.on_disk {
                    self.deletes.push(q.id);
                }
            }
        }
    }

    /// MQTT 5 sessions whose expiry interval passed since their device left.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<Arc<str>> = self
            .expiries
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for client in expired {
            info!(client_id = %client, "MQTT 5 session expired: its subscriptions and queued messages are dropped");
            let protocol = self.sessions.get(&client).map(|s| s.protocol);
            self.end_session(&client);
            if let (Some((backends, side_door, handle)), Some(protocol)) = (&self.broker, protocol)
            {
                let addr = match protocol {
                    Protocol::V5 => backends.v5.unwrap_or(backends.v4),
                    Protocol::V311 => backends.v4,
                };
                let side_door = side_door.clone();
                handle.spawn(async move {
                    if let Err(e) =
                        crate::broker::internal::end_session(addr, &side_door, protocol, &client)
                            .await
                    {
                        warn!(client_id = %client, error = %e, "ending an expired session in the embedded broker failed");
                    }
                });
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.deletes.is_empty() {
            return Some(Instant::now());
        }
        let interval = self.limits.commit_interval;
        let dirty = self.dirty_since.map(|t| t + interval);
        let queued = self.unwritten.front().map(|(t, _, _)| *t + interval);
        let expiry = self.expiries.values().min().copied();
        let gauges = self
            .last_gauges
            .filter(|_| self.gauges_stale)
            .map(|t| t + Duration::from_millis(500));
        [dirty, queued, expiry, gauges].into_iter().flatten().min()
    }

    /// Writes what is due (everything when `all`), in one transaction.
    fn commit(&mut self, all: bool) {
        let now = Instant::now();
        let interval = self.limits.commit_interval;
        let due = |t: Instant| all || t + interval <= now;
        let mut batch = Batch::default();
        if self.dirty_since.is_some_and(due) {
            for topic in self.retained_dirty.drain() {
                match self.retained.get(&topic) {
                    Some((qos, payload)) => {
                        batch
                            .retained_put
                            .push((topic.to_string(), *qos, payload.clone()))
                    }
                    None => batch.retained_delete.push(topic.to_string()),
                }
            }
            batch.sessions_delete = self
                .sessions_deleted
                .drain()
                .map(|c| c.to_string())
                .collect();
            for client in self.sessions_dirty.drain() {
                if let Some(session) = self.sessions.get(&client) {
                    batch.sessions_put.push(session.stored(&client));
                }
            }
            self.dirty_since = None;
        }
        let mut written = Vec::new();
        while let Some((at, _, _)) = self.unwritten.front() {
            if !due(*at) {
                break;
            }
            let Some((_, client, id)) = self.unwritten.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get(&client) else {
                continue;
            };
            if let Ok(i) = session.queue.binary_search_by_key(&id, |q| q.id) {
                let q = &session.queue[i];
                batch.queued_put.push(StoredMessage {
                    id,
                    client_id: client.to_string(),
                    topic: q.topic.to_string(),
                    qos: q.qos,
                    payload: q.payload.clone(),
                });
                written.push((client, id));
            }
        }
        batch.queued_delete = std::mem::take(&mut self.deletes);
        if batch.is_empty() {
            return;
        }
        match self.store.commit(&batch) {
            Ok(()) => {
                debug!(
                    retained = batch.retained_put.len() + batch.retained_delete.len(),
                    sessions = batch.sessions_put.len() + batch.sessions_delete.len(),
                    queued = batch.queued_put.len(),
                    deleted = batch.queued_delete.len(),
                    "state.db committed"
                );
                for (client, id) in written {
                    if let Some(session) = self.sessions.get_mut(&client) {
                        if let Ok(i) = session.queue.binary_search_by_key(&id, |q| q.id) {
                            session.queue[i].on_disk = true;
                        }
                    }
                }
            }
            Err(e) => {
                inc(&self.health().counters.state_errors);
                error!(error = %e, retry_in = ?interval,
                    "writing state.db failed; what it held stays in memory and is written with the next commit (a restart before that forgets it)");
                self.retry(batch, written);
            }
        }
    }

    /// Puts back what a failed commit held, so that the next commit writes it: nothing a
    /// failed write held is forgotten (an acknowledged message's delete above all, or it
    /// would be replayed after a restart).
    fn retry(&mut self, batch: Batch, written: Vec<(Arc<str>, i64)>) {
        let now = Instant::now();
        let topics = batch.retained_put.into_iter().map(|(topic, _, _)| topic);
        self.retained_dirty
            .extend(topics.chain(batch.retained_delete).map(Arc::from));
        self.sessions_deleted
            .extend(batch.sessions_delete.into_iter().map(Arc::from));
        self.sessions_dirty.extend(
            batch
                .sessions_put
                .into_iter()
                .map(|s| Arc::from(s.client_id)),
        );
        for (client, id) in written.into_iter().rev() {
            self.unwritten.push_front((now, client, id));
        }
        self.deletes.extend(batch.queued_delete);
        self.dirty_since = Some(self.dirty_since.map_or(now, |t| t.min(now)));
    }

    fn rebuild_tree(&mut self) {
        if !self.tree_dirty {
            return;
        }
        self.tree_dirty = false;
        let mut tree = FilterTree::default();
        let mut too_deep = 0u64;
        for (client, session) in &self.sessions {
            for (filter, options) in &session.filters {
                let qos = options & 0x03;
                if qos > 0
                    && !filter.starts_with("$share/")
                    && !tree.insert(filter, client.clone(), qos)
                {
                    too_deep += 1;
                }
            }
        }
        self.shared.filters.store(Arc::new(tree));
        if too_deep > 0 {
            add(&self.shared.health.counters.state_errors, too_deep);
            warn!(filters = too_deep, max_levels = filters::MAX_LEVELS,
                "subscriptions of persistent sessions deeper than this are not kept across a restart");
        }
    }

    fn queued_count(&self) -> u64 {
        self.sessions.values().map(|s| s.queue.len() as u64).sum()
    }

    /// Updates the status gauges, at most twice a second (counting walks every session).
    fn gauges(&mut self) {
        if self
            .last_gauges
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        if !self.gauges_stale {
            return;
        }
        self.gauges_stale = false;
        self.last_gauges = Some(Instant::now());
        let g = &self.health().broker_state;
        g.retained
            .store(self.retained.len() as u64, Ordering::Relaxed);
        g.retained_bytes
            .store(self.retained_bytes, Ordering::Relaxed);
        g.sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        g.queued.store(self.queued_count(), Ordering::Relaxed);
    }
}
