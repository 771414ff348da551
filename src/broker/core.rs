//! The broker's core: the one owner of every session, the subscription tree, the retained
//! store, the wills and expiry timers, and the journal of what `state.db` has not got yet.
//! It lives behind one mutex ([`super::Shared`]); connections lock it for a whole batch of
//! packets at a time, never across an await, and wake each other after unlocking.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::message::{Message, Origin, OriginKind, SubIds, Token};
use super::retained::{Change, Retained};
use super::router::{Filter, Matched, Router, Sub};
use super::session::{
    ConnLink, Enqueued, Queued, Row, RowState, Session, SessionKey, SessionKind, Sessions, Signal,
    StoredWill, NEVER_EXPIRES,
};
use crate::health::{add, inc, RateLimit, SharedHealth};

/// Bounds the core keeps to; a reload changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages queued per session beyond those in flight.
    pub max_queued_messages: usize,
    /// Bytes of topic plus payload queued per session.
    pub max_queued_bytes: usize,
    /// Bytes of topic plus payload of all retained messages.
    pub max_retained_size: usize,
    /// Messages in flight to one client at most (its Receive Maximum may be lower).
    pub max_inflight: u16,
    /// How long a change may stay out of `state.db`.
    pub commit_interval: Duration,
}

/// Changes `state.db` has not got yet.
#[derive(Debug, Default)]
pub struct Journal {
    /// The oldest retained or session change not written.
    pub since: Option<Instant>,
    pub retained: HashSet<Arc<str>>,
    /// Sessions whose row is to be written again (or deleted, if they are gone).
    pub sessions: HashSet<Arc<str>>,
    /// Sessions that ended: their rows go, before any new one is written.
    pub ended: HashSet<Arc<str>>,
    /// Messages of persistent sessions not written yet, oldest first.
    pub unwritten: VecDeque<(Instant, Arc<str>, u64)>,
    /// Rows of messages that left their session (acknowledged, dropped, expired).
    pub deletes: Vec<u64>,
    /// Rows whose in-flight stage changed after they were written.
    pub updates: Vec<(Arc<str>, u64)>,
}

impl Journal {
    pub fn is_empty(&self) -> bool {
        self.since.is_none() && self.unwritten.is_empty() && self.deletes.is_empty()
    }
}

/// Timers: a will waiting for its delay, an offline session waiting for its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    Will,
    Expiry,
}

/// How a connection ended, for its will and session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// DISCONNECT (MQTT 5: reason 0): the will is dropped.
    Normal,
    /// MQTT 5 DISCONNECT 0x04, or the connection failed or broke the protocol: the will
    /// is published (after its delay).
    WithWill,
    /// The gateway is stopping: the will is not published.
    Shutdown,
}

/// A CONNECT the core takes.
#[derive(Debug)]
pub struct Open {
    pub client_id: Arc<str>,
    pub level: u8,
    pub clean_start: bool,
    /// Session Expiry Interval (MQTT 3.1.1 clean session 0: never).
    pub expiry: u32,
    pub will: Option<Box<StoredWill>>,
    pub receive_max: u16,
    pub conn: ConnLink,
}

#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub key: SessionKey,
    pub instance: u64,
    pub present: bool,
}

/// Sessions the broker holds at most (online and offline, the gateway's own included):
/// devices that connect with ever new client ids and clean session 0 must not make it
/// grow without bound.
pub const MAX_SESSIONS: usize = 100_000;

/// Connections to wake once the core is unlocked.
pub type Wake = Vec<Arc<Signal>>;

pub fn wake_all(wake: &mut Wake) {
    for signal in wake.drain(..) {
        signal.notify.notify_one();
    }
}

pub struct Core {
    pub sessions: Sessions,
    pub by_client: HashMap<Arc<str>, SessionKey>,
    pub router: Router,
    pub retained: Retained,
    pub limits: Limits,
    pub journal: Journal,
    /// Whether `state.db` is kept (else the journal stays empty).
    pub persist: bool,
    pub timers: BTreeSet<(Instant, Timer, SessionKey)>,
    /// Messages the core published itself (wills) that the intake has not seen yet.
    pub published: Vec<Arc<Message>>,
    next_instance: u64,
    pub next_row: u64,
    scratch: Vec<Matched>,
    pub health: SharedHealth,
    drop_log: RateLimit,
    retain_log: RateLimit,
    /// Tells the writer of `state.db` that the journal is no longer empty.
    pub writer_wake: Option<std::sync::mpsc::SyncSender<super::persist::WriterMsg>>,
    /// Tells the timer task that a new timer was set.
    pub timer_wake: Arc<tokio::sync::Notify>,
}

impl Core {
    pub fn new(limits: Limits, health: SharedHealth) -> Self {
        Core {
            sessions: Sessions::default(),
            by_client: HashMap::new(),
            router: Router::default(),
            retained: Retained::default(),
            limits,
            journal: Journal::default(),
            persist: false,
            timers: BTreeSet::new(),
            published: Vec::new(),
            next_instance: 1,
            next_row: 1,
            scratch: Vec::new(),
            health,
            drop_log: RateLimit::new(Duration::from_secs(10)),
            retain_log: RateLimit::new(Duration::from_secs(10)),
            writer_wake: None,
            timer_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn new_instance(&mut self) -> u64 {
        self.next_instance += 1;
        self.next_instance
    }

    fn writer_needed(&mut self) {
        if let Some(tx) = &self.writer_wake {
            let _ = tx.try_send(None);
        }
    }

    fn journal_change(&mut self, now: Instant) {
        if !self.persist {
            return;
        }
        let was_empty = self.journal.is_empty();
        self.journal.since.get_or_insert(now);
        if was_empty {
            self.writer_needed();
        }
    }

    /// A persistent session's row must be written again.
    pub fn session_changed(&mut self, key: SessionKey, now: Instant) {
        let Some(s) = self.sessions.get(key) else {
            return;
        };
        if !self.persist || !s.persistent() {
            return;
        }
        let client = s.client_id.clone();
        self.journal.sessions.insert(client);
        self.journal_change(now);
    }

    /// A message left its session: its row goes, if it was written.
    pub fn row_gone(&mut self, row: Row) {
        if row.written() {
            let was_empty = self.journal.is_empty();
            self.journal.deletes.push(row.id);
            if was_empty {
                self.writer_needed();
            }
        }
    }

    /// A written in-flight row changed stage (PUBREC): it is written again.
    pub fn row_updated(&mut self, client: Arc<str>, id: u64) {
        self.journal.updates.push((client, id));
        self.journal_change(Instant::now());
    }

    /// The timers of a session restored from `state.db`.
    pub fn restore_timers(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get(key) else {
            return;
        };
        let (will, expiry) = (s.will_at, s.expires_at);
        if let Some(at) = will {
            self.set_timer(at, Timer::Will, key);
        }
        if let Some(at) = expiry {
            self.set_timer(at, Timer::Expiry, key);
        }
    }

    fn set_timer(&mut self, at: Instant, timer: Timer, key: SessionKey) {
        let earliest = self.timers.first().map(|t| t.0);
        self.timers.insert((at, timer, key));
        if earliest.is_none_or(|e| at < e) {
            self.timer_wake.notify_one();
        }
    }

    /// Routes a message to every session a subscription of which matches, and keeps it
    /// when it is retained. `token` is the in-process publisher's hand-off: each QoS 1/2
    /// delivery to an online session holds a part of it. Returns the deliveries made.
    pub fn route(&mut self, msg: &Arc<Message>, token: Option<&Token>, wake: &mut Wake) -> usize {
        let now = Instant::now();
        if msg.retain {
            self.retain(msg, now);
        }
        let mut matched = std::mem::take(&mut self.scratch);
        matched.clear();
        let sessions = &self.sessions;
        self.router.matches(&msg.topic, &mut matched, |key| {
            sessions.get(key).is_some_and(Session::has_room)
        });
        // One delivery per session for its plain subscriptions ([MQTT-3.3.4-2], MQTT 5
        // 3.3.4: the highest QoS, every subscription identifier), one per shared one.
        matched.sort_unstable_by_key(|m| (m.sub.session, m.shared));
        let mut deliveries = 0;
        let mut i = 0;
        while i < matched.len() {
            let first = matched[i];
            let mut j = i + 1;
            if !first.shared {
                while j < matched.len()
                    && matched[j].sub.session == first.sub.session
                    && !matched[j].shared
                {
                    j += 1;
                }
            }
            let group = &matched[i..j];
            i = j;
            if self.deliver(msg, group, token, now, wake) {
                deliveries += 1;
            }
        }
        self.scratch = matched;
        deliveries
    }

    /// One delivery of `msg` to the session of `subs` (all its matching subscriptions).
    fn deliver(
        &mut self,
        msg: &Arc<Message>,
        subs: &[Matched],
        token: Option<&Token>,
        now: Instant,
        wake: &mut Wake,
    ) -> bool {
        let key = subs[0].sub.session;
        let Some(session) = self.sessions.get(key) else {
            return false;
        };
        let own = msg.origin.session == session.instance;
        let mut qos = None;
        let mut retain = false;
        let mut ids = SubIds::None;
        for m in subs {
            // [MQTT-3.8.3-3]: No Local (a shared subscription cannot have it).
            if own && m.sub.options.no_local && !m.shared {
                continue;
            }
            qos = qos.max(Some(m.sub.options.qos));
            retain |= m.sub.options.retain_as_published && msg.retain;
            ids = ids.with(m.sub.id);
        }
        let Some(sub_qos) = qos else {
            return false;
        };
        let qos = sub_qos.min(msg.qos);
        let online = session.online();
        if !online && qos == 0 {
            return false;
        }
        let row = match session.persistent() && qos > 0 && self.persist {
            true => {
                let id = self.next_row;
                self.next_row += 1;
                let client = session.client_id.clone();
                let was_empty = self.journal.is_empty();
                self.journal.unwritten.push_back((now, client, id));
                if was_empty {
                    self.writer_needed();
                }
                Row {
                    id,
                    state: RowState::Memory,
                }
            }
            false => Row::NONE,
        };
        let item = Queued {
            msg: msg.clone(),
            qos,
            retain,
            sub_ids: ids,
            // Held for an offline persistent session: the hand-off is complete.
            token: token.filter(|_| online && qos > 0).map(Token::share),
            row,
        };
        let limits = self.limits;
        let Some(session) = self.sessions.get_mut(key) else {
            return false;
        };
        let outcome = session.enqueue(item, limits.max_queued_messages, limits.max_queued_bytes);
        if online && !session.wake_pending {
            session.wake_pending = true;
            if let Some(conn) = &session.conn {
                wake.push(conn.signal.clone());
            }
        }
        if let Enqueued::Dropped(dropped) = outcome {
            let client = session.client_id.clone();
            let total = session.dropped;
            self.dropped(&client, total, dropped);
        }
        true
    }

    /// A message the session's queue could not take, counted and logged.
    fn dropped(&mut self, client: &str, total: u64, dropped: Queued) {
        inc(&self.health.counters.queued_dropped);
        self.row_gone(dropped.row);
        if let Some(held) = self.drop_log.check() {
            warn!(client_id = %client, dropped_for_client = total, qos = dropped.qos,
                max_queued_messages = self.limits.max_queued_messages,
                max_queued_bytes = self.limits.max_queued_bytes,
                earlier_warnings_suppressed = held,
                "a subscriber's queue is full: a message for it was dropped (QoS 0 first, then the oldest)");
        }
    }

    fn retain(&mut self, msg: &Arc<Message>, now: Instant) {
        // The gateway's metrics document is republished at start: rewriting it in state.db
        // every metrics interval would be the one write of an idle gateway.
        let kept = self.persist && msg.origin.kind != OriginKind::Gateway;
        match self.retained.set(msg, self.limits.max_retained_size) {
            Change::Stored | Change::Cleared => {
                if kept {
                    self.journal.retained.insert(msg.topic.clone());
                    self.journal_change(now);
                }
            }
            Change::Unchanged => {}
            Change::Refused => {
                inc(&self.health.counters.retained_dropped);
                if kept {
                    self.journal.retained.insert(msg.topic.clone());
                    self.journal_change(now);
                }
                if let Some(held) = self.retain_log.check() {
                    warn!(topic = %msg.topic, max_retained_size = self.limits.max_retained_size,
                        earlier_warnings_suppressed = held,
                        "retained message not kept: local.max_retained_size reached (it was delivered to the subscribers of this moment)");
                }
            }
        }
    }

    /// Takes a CONNECT: a new session, or the existing one resumed; a connection still on
    /// it is told to go ([MQTT-3.1.4-3]). None when a new session would be one more than
    /// [`MAX_SESSIONS`].
    pub fn open(&mut self, open: Open, wake: &mut Wake) -> Option<Opened> {
        let now = Instant::now();
        if !self.by_client.contains_key(&open.client_id) && self.sessions.len() >= MAX_SESSIONS {
            return None;
        }
        let mut resumed = None;
        if let Some(&key) = self.by_client.get(&open.client_id) {
            let (old_conn, old_will, pending) = match self.sessions.get_mut(key) {
                Some(s) => (s.conn.take(), s.will.take(), s.will_at.take()),
                None => (None, None, None),
            };
            if let Some(at) = pending {
                self.timers.remove(&(at, Timer::Will, key));
            }
            let instance = self.sessions.get(key).map_or(0, |s| s.instance);
            if let Some(will) = old_will {
                // The old connection's will: published unless this connection cancels its
                // delay (MQTT 5 3.1.2.5); a session that ends publishes it at once.
                let cancelled = !open.clean_start && (pending.is_some() || will.delay > 0);
                if !cancelled {
                    self.publish_will(instance, *will, now, wake);
                }
            }
            if let Some(old) = old_conn {
                old.signal.kick(super::codec::reason::SESSION_TAKEN_OVER);
            }
            match open.clean_start {
                true => self.end_session(key, wake),
                false => resumed = Some(key),
            }
        }
        let (key, present) = match resumed {
            Some(key) => (key, true),
            None => {
                let instance = self.new_instance();
                let session = Session::new(
                    open.client_id.clone(),
                    instance,
                    SessionKind::Device,
                    open.level,
                );
                let key = self.sessions.insert(session);
                self.by_client.insert(open.client_id.clone(), key);
                (key, false)
            }
        };
        let mut expiry_timer = None;
        let instance = match self.sessions.get_mut(key) {
            Some(s) => {
                if let Some(at) = s.expires_at.take() {
                    expiry_timer = Some(at);
                }
                s.offline_since = None;
                s.level = open.level;
                s.expiry = open.expiry;
                s.will = open.will;
                s.receive_max = open.receive_max.min(self.limits.max_inflight).max(1);
                s.conn = Some(open.conn);
                s.wake_pending = false;
                s.instance
            }
            None => 0,
        };
        if let Some(at) = expiry_timer {
            self.timers.remove(&(at, Timer::Expiry, key));
        }
        self.session_changed(key, now);
        Some(Opened {
            key,
            instance,
            present,
        })
    }

    /// A connection of the session ended. `expiry` is an MQTT 5 DISCONNECT's new Session
    /// Expiry Interval.
    pub fn close(
        &mut self,
        key: SessionKey,
        conn_id: u64,
        ending: Ending,
        expiry: Option<u32>,
        wake: &mut Wake,
    ) {
        let now = Instant::now();
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.conn.as_ref().map(|c| c.id) != Some(conn_id) {
            // Taken over: the session belongs to the new connection.
            return;
        }
        s.conn = None;
        s.wake_pending = false;
        if let Some(expiry) = expiry {
            s.expiry = expiry;
        }
        let will = s.will.take();
        let (session_expiry, instance) = (s.expiry, s.instance);
        if let (Some(will), Ending::WithWill) = (will, ending) {
            match will.delay == 0 || session_expiry == 0 {
                true => self.publish_will(instance, *will, now, wake),
                false => {
                    let delay = will.delay.min(session_expiry);
                    let at = now + Duration::from_secs(u64::from(delay));
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.will = Some(will);
                        s.will_at = Some(at);
                    }
                    self.set_timer(at, Timer::Will, key);
                }
            }
        }
        if session_expiry == 0 {
            self.end_session(key, wake);
            return;
        }
        let mut expires = None;
        if let Some(s) = self.sessions.get_mut(key) {
            s.offline_since = Some(now);
            if session_expiry != NEVER_EXPIRES {
                let at = now + Duration::from_secs(u64::from(session_expiry));
                s.expires_at = Some(at);
                expires = Some(at);
            }
            let dropped = s.drop_qos0();
            s.release_tokens();
            if dropped > 0 {
                add(&self.health.counters.queued_dropped, dropped as u64);
            }
        }
        if let Some(at) = expires {
            self.set_timer(at, Timer::Expiry, key);
        }
        self.session_changed(key, now);
    }

    /// The session is over (clean start, expiry, or it lived for one connection): its
    /// subscriptions and messages go, and a will still waiting is published.
    pub fn end_session(&mut self, key: SessionKey, wake: &mut Wake) {
        let now = Instant::now();
        let Some(mut s) = self.sessions.remove(key) else {
            return;
        };
        if self.by_client.get(&s.client_id) == Some(&key) {
            self.by_client.remove(&s.client_id);
        }
        for (filter, ..) in s.subscriptions.iter() {
            if let Ok(parsed) = Filter::parse(filter) {
                self.router.remove(parsed, key);
            }
        }
        if let Some(at) = s.will_at.take() {
            self.timers.remove(&(at, Timer::Will, key));
        }
        if let Some(at) = s.expires_at.take() {
            self.timers.remove(&(at, Timer::Expiry, key));
        }
        if let Some(will) = s.will.take() {
            if s.conn.is_none() {
                self.publish_will(s.instance, *will, now, wake);
            }
        }
        // Its row goes if it was ever written (a DISCONNECT may have set its expiry to 0).
        let written = s.stored != 0 || self.journal.sessions.contains(&s.client_id);
        if self.persist && (s.persistent() || written) {
            self.journal.ended.insert(s.client_id.clone());
            self.journal_change(now);
        }
        // Rows written for its messages go with the session's rows ("ended").
    }

    /// Publishes a will (its ACL was checked when the client connected).
    fn publish_will(&mut self, instance: u64, will: StoredWill, now: Instant, wake: &mut Wake) {
        let msg = Arc::new(Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            props: will.props,
            expires: will.expiry.map(|s| now + Duration::from_secs(u64::from(s))),
            origin: Origin {
                kind: OriginKind::Device,
                session: instance,
            },
        });
        self.route(&msg, None, wake);
        self.published.push(msg);
    }

    /// Runs the timers that are due; returns when the next one is.
    pub fn tick(&mut self, now: Instant, wake: &mut Wake) -> Option<Instant> {
        while let Some(&(at, timer, key)) = self.timers.first() {
            if at > now {
                return Some(at);
            }
            self.timers.pop_first();
            match timer {
                Timer::Will => {
                    let will = match self.sessions.get_mut(key) {
                        Some(s) if s.will_at == Some(at) => {
                            s.will_at = None;
                            s.will.take().map(|w| (s.instance, w))
                        }
                        _ => None,
                    };
                    if let Some((instance, will)) = will {
                        self.publish_will(instance, *will, now, wake);
                        self.session_changed(key, now);
                    }
                }
                Timer::Expiry => {
                    let due = self
                        .sessions
                        .get(key)
                        .is_some_and(|s| !s.online() && s.expires_at == Some(at));
                    if due {
                        if let Some(s) = self.sessions.get(key) {
                            info!(client_id = %s.client_id, "session expired: its subscriptions and queued messages are dropped");
                        }
                        self.end_session(key, wake);
                    }
                }
            }
        }
        None
    }

    /// Adds (or replaces) a subscription and queues the retained messages it gets
    /// ([MQTT-3.3.1-9..11], MQTT 5 Retain Handling). Returns whether it is new.
    pub fn subscribe(
        &mut self,
        key: SessionKey,
        written: &str,
        filter: Filter<'_>,
        sub: Sub,
        wake: &mut Wake,
    ) -> bool {
        let now = Instant::now();
        let replaced = self.router.insert(filter, sub);
        if let Some(s) = self.sessions.get_mut(key) {
            s.subscriptions.insert(written, sub.options, sub.id);
        }
        let send_retained = match sub.options.retain_handling {
            0 => true,
            1 => !replaced,
            _ => false,
        };
        if send_retained && !filter.is_shared() {
            let (mut found, mut expired) = (Vec::new(), Vec::new());
            self.retained.lookup(filter, now, &mut found, &mut expired);
            for topic in expired {
                if self.persist {
                    self.journal.retained.insert(topic);
                }
            }
            for msg in found {
                self.queue_retained(key, msg, sub, wake);
            }
        }
        self.session_changed(key, now);
        !replaced
    }

    /// A retained message for a new subscription: sent with the retain flag
    /// ([MQTT-3.3.1-8]) at the lower of its QoS and the subscription's.
    fn queue_retained(&mut self, key: SessionKey, msg: Arc<Message>, sub: Sub, wake: &mut Wake) {
        let qos = msg.qos.min(sub.options.qos);
        let limits = self.limits;
        let persist = self.persist;
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let online = s.online();
        if !online && qos == 0 {
            return;
        }
        let row = match s.persistent() && qos > 0 && persist {
            true => {
                let id = self.next_row;
                self.next_row += 1;
                self.journal
                    .unwritten
                    .push_back((Instant::now(), s.client_id.clone(), id));
                Row {
                    id,
                    state: RowState::Memory,
                }
            }
            false => Row::NONE,
        };
        let item = Queued {
            msg,
            qos,
            retain: true,
            sub_ids: SubIds::None.with(sub.id),
            token: None,
            row,
        };
        let outcome = s.enqueue(item, limits.max_queued_messages, limits.max_queued_bytes);
        if online && !s.wake_pending {
            s.wake_pending = true;
            if let Some(conn) = &s.conn {
                wake.push(conn.signal.clone());
            }
        }
        if let Enqueued::Dropped(dropped) = outcome {
            let (client, total) = (s.client_id.clone(), s.dropped);
            self.dropped(&client, total, dropped);
        }
        if persist {
            self.writer_needed();
        }
    }

    /// Removes a subscription; whether there was one.
    pub fn unsubscribe(&mut self, key: SessionKey, written: &str) -> bool {
        let now = Instant::now();
        let Ok(filter) = Filter::parse(written) else {
            return false;
        };
        let existed = self
            .sessions
            .get_mut(key)
            .is_some_and(|s| s.subscriptions.remove(written));
        if existed {
            self.router.remove(filter, key);
            self.session_changed(key, now);
        }
        existed
    }

    /// A session for one of the gateway's own subscribers (never persisted).
    pub fn open_internal(&mut self, name: &str, signal: Arc<Signal>) -> SessionKey {
        let instance = self.new_instance();
        let client: Arc<str> = format!("{}{name}", super::INTERNAL_ID_PREFIX).into();
        let mut session = Session::new(client.clone(), instance, SessionKind::Internal, 5);
        session.expiry = NEVER_EXPIRES;
        session.conn = Some(ConnLink { id: 0, signal });
        let key = self.sessions.insert(session);
        self.by_client.insert(client, key);
        key
    }

    /// Tells the connections whose clients went silent past their keep alive to go.
    pub fn sweep_keep_alives(&self) {
        for (_, s) in self.sessions.iter() {
            if let (Some(conn), SessionKind::Device) = (&s.conn, s.kind) {
                if conn.signal.silent() {
                    conn.signal.kick(super::codec::reason::KEEP_ALIVE_TIMEOUT);
                }
            }
        }
    }

    /// Status gauges: retained messages and their bytes, persistent sessions, messages
    /// queued for them.
    pub fn gauges(&self) -> (u64, u64, u64, u64) {
        let (mut sessions, mut queued) = (0u64, 0u64);
        for (_, s) in self.sessions.iter() {
            if s.persistent() {
                sessions += 1;
                queued += s.backlog() as u64;
            }
        }
        (
            self.retained.len() as u64,
            self.retained.bytes() as u64,
            sessions,
            queued,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::codec::SubOptions;
    use bytes::Bytes;

    fn core() -> Core {
        Core::new(
            Limits {
                max_queued_messages: 100,
                max_queued_bytes: 1 << 20,
                max_retained_size: 1 << 20,
                max_inflight: 10,
                commit_interval: Duration::from_millis(10),
            },
            Arc::new(crate::Health::default()),
        )
    }

    fn open(core: &mut Core, client: &str, clean: bool, expiry: u32) -> (Opened, Arc<Signal>) {
        let signal = Arc::new(Signal::default());
        let opened = core
            .open(
                Open {
                    client_id: client.into(),
                    level: 5,
                    clean_start: clean,
                    expiry,
                    will: None,
                    receive_max: 10,
                    conn: ConnLink {
                        id: core.next_instance + 100,
                        signal: signal.clone(),
                    },
                },
                &mut Vec::new(),
            )
            .expect("room for a session");
        (opened, signal)
    }

    fn message(topic: &str, qos: u8, retain: bool) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain,
            props: Bytes::new(),
            expires: None,
            origin: Origin::of(OriginKind::Device),
        })
    }

    fn sub(core: &mut Core, key: SessionKey, filter: &str, qos: u8) {
        let parsed = Filter::parse(filter).unwrap();
        let options = SubOptions {
            qos,
            ..SubOptions::default()
        };
        core.subscribe(
            key,
            filter,
            parsed,
            Sub {
                session: key,
                options,
                id: 0,
            },
            &mut Vec::new(),
        );
    }

    #[test]
    fn overlapping_subscriptions_give_one_delivery_at_the_highest_qos() {
        let mut c = core();
        let (a, _) = open(&mut c, "a", true, 0);
        sub(&mut c, a.key, "t/#", 0);
        sub(&mut c, a.key, "t/+", 1);
        let mut wake = Vec::new();
        assert_eq!(c.route(&message("t/x", 2, false), None, &mut wake), 1);
        let s = c.sessions.get(a.key).unwrap();
        assert_eq!((s.queue.len(), s.queue[0].qos), (1, 1));
        assert_eq!(wake.len(), 1);
    }

    #[test]
    fn an_offline_persistent_session_keeps_qos_1_and_a_clean_start_ends_it() {
        let mut c = core();
        let (a, _) = open(&mut c, "a", true, 60);
        sub(&mut c, a.key, "t", 1);
        c.close(
            a.key,
            open_id(&c, a.key),
            Ending::Normal,
            None,
            &mut Vec::new(),
        );
        c.route(&message("t", 1, false), None, &mut Vec::new());
        c.route(&message("t", 0, false), None, &mut Vec::new());
        assert_eq!(c.sessions.get(a.key).unwrap().queue.len(), 1);
        let (again, _) = open(&mut c, "a", false, 60);
        assert!(again.present && again.key == a.key);
        let (fresh, _) = open(&mut c, "a", true, 60);
        assert!(!fresh.present);
        assert!(c.sessions.get(a.key).is_none());
        assert!(c.router.is_empty());
    }

    fn open_id(c: &Core, key: SessionKey) -> u64 {
        c.sessions.get(key).unwrap().conn.as_ref().unwrap().id
    }

    #[test]
    fn a_takeover_kicks_the_old_connection_and_a_delayed_will_waits() {
        let mut c = core();
        let (a, old) = open(&mut c, "a", false, 60);
        let (b, _) = open(&mut c, "a", false, 60);
        assert_eq!(
            old.kicked(),
            Some(crate::broker::codec::reason::SESSION_TAKEN_OVER)
        );
        assert!(b.present);
        // The old connection's end does not touch the session now.
        c.close(a.key, 0, Ending::WithWill, None, &mut Vec::new());
        assert!(c.sessions.get(b.key).unwrap().online());
        let (w, _) = open(&mut c, "w", true, 60);
        sub(&mut c, w.key, "wills/#", 1);
        c.sessions.get_mut(b.key).unwrap().will = Some(Box::new(StoredWill {
            topic: "wills/a".into(),
            payload: Bytes::from_static(b"gone"),
            qos: 1,
            retain: false,
            props: Bytes::new(),
            delay: 5,
            expiry: None,
        }));
        let id = open_id(&c, b.key);
        c.close(b.key, id, Ending::WithWill, None, &mut Vec::new());
        assert_eq!(c.sessions.get(w.key).unwrap().queue.len(), 0);
        let later = Instant::now() + Duration::from_secs(6);
        c.tick(later, &mut Vec::new());
        assert_eq!(c.sessions.get(w.key).unwrap().queue.len(), 1);
    }

    #[test]
    fn retained_messages_reach_new_subscriptions_by_retain_handling() {
        let mut c = core();
        c.route(&message("r/1", 1, true), None, &mut Vec::new());
        let (a, _) = open(&mut c, "a", true, 0);
        sub(&mut c, a.key, "r/#", 2);
        assert_eq!(c.sessions.get(a.key).unwrap().queue.len(), 1);
        assert!(c.sessions.get(a.key).unwrap().queue[0].retain);
        let parsed = Filter::parse("r/#").unwrap();
        let options = SubOptions {
            qos: 1,
            retain_handling: 1,
            ..SubOptions::default()
        };
        let s = Sub {
            session: a.key,
            options,
            id: 0,
        };
        assert!(!c.subscribe(a.key, "r/#", parsed, s, &mut Vec::new()));
        assert_eq!(c.sessions.get(a.key).unwrap().queue.len(), 1);
    }
}
