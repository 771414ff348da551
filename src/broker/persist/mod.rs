//! The broker's persistence: what a restart must not forget (retained messages, persistent
//! sessions with their subscriptions and wills, the QoS 1/2 messages queued or in flight
//! for them), kept in `state.db` by one writer thread with the outbox's discipline.
//!
//! The core's [`Journal`](super::core::Journal) says what changed; the writer commits what
//! is `queue.commit_interval` old, all in one transaction. A message its subscriber
//! acknowledges within that is never written, an idle broker writes nothing, and a written
//! message that is acknowledged is deleted in a commit of its own at once (so it is not
//! replayed after a clean restart). SIGTERM writes everything.
//!
//! At start ([`restore`]) the core gets back everything before the listeners open; it is
//! a load from one file, not a replay, so many sessions start quickly.

pub mod store;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::codec::SubOptions;
use super::core::Core;
use super::message::{Message, Origin, OriginKind, SubIds};
use super::router::{Filter, Sub};
use super::session::{
    Inflight, Queued, Row, RowState, Session, SessionKind, Stage, StoredWill, NEVER_EXPIRES,
};
use super::Shared;
use crate::health::{inc, SharedHealth};
use store::{Batch, Clock, Loaded, Store, StoredMessage, StoredSession, StoredWillRow};

/// What the writer is sent: a wake-up (None), or a request to write everything now.
pub type WriterMsg = Option<oneshot::Sender<()>>;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("opening {path}: {error}")]
    Open {
        path: String,
        error: rusqlite::Error,
    },
    #[error("starting the state writer thread: {0}")]
    Thread(std::io::Error),
}

/// `state.db` opened and loaded, its writer not started yet.
pub struct Opened {
    store: Store,
    loaded: Loaded,
}

/// Opens `DATA_DIR/state.db` (a damaged one is moved aside and counted).
pub fn open(data_dir: &Path, fsync: bool, health: &SharedHealth) -> Result<Opened, StateError> {
    let path = data_dir.join("state.db");
    let (store, loaded, aside) = Store::open(&path, fsync).map_err(|error| StateError::Open {
        path: path.display().to_string(),
        error,
    })?;
    if let Some(aside) = aside {
        inc(&health.counters.state_errors);
        error!(path = %path.display(), aside = %aside.display(),
            "state.db was damaged; moved aside, starting without the retained messages and sessions it held");
    }
    Ok(Opened { store, loaded })
}

/// The writer thread's handle.
#[derive(Clone)]
pub struct Writer {
    tx: SyncSender<WriterMsg>,
}

impl Writer {
    /// Writes everything the journal holds; returns once it is on disk.
    pub async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.clone();
        let sent = tokio::task::spawn_blocking(move || tx.send(Some(done)).is_ok()).await;
        if matches!(sent, Ok(true)) {
            let _ = rx.await;
        }
    }
}

/// Gives the core what the last run left, then starts the writer.
pub fn start(shared: &Arc<Shared>, opened: Opened) -> Result<Writer, StateError> {
    let Opened { store, loaded } = opened;
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    {
        let started = Instant::now();
        let mut core = shared.lock();
        let counts = restore(&mut core, loaded, &store.clock);
        core.persist = true;
        core.writer_wake = Some(tx.clone());
        info!(
            retained = counts.0,
            sessions = counts.1,
            queued = counts.2,
            took_ms = started.elapsed().as_millis() as u64,
            "local broker state restored from state.db"
        );
    }
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("state".into())
        .spawn(move || run(shared, store, rx))
        .map_err(StateError::Thread)?;
    Ok(Writer { tx })
}

/// Puts what `state.db` held into the core: retained messages (expired ones left out),
/// sessions with their subscriptions, pending wills and expiry, and their messages.
/// Returns (retained, sessions, messages).
fn restore(core: &mut Core, loaded: Loaded, clock: &Clock) -> (usize, usize, usize) {
    let now = Instant::now();
    let clock_now = clock.now_ms();
    for r in loaded.retained {
        if r.expires_at.is_some_and(|at| at <= clock_now) {
            core.journal.retained.insert(r.topic.as_str().into());
            continue;
        }
        core.retained.restore(Arc::new(Message {
            topic: r.topic.into(),
            payload: r.payload,
            qos: r.qos,
            retain: true,
            props: r.props,
            expires: r.expires_at.map(|at| clock.instant(at)),
            origin: Origin::of(OriginKind::Device),
        }));
    }
    let mut sessions = 0;
    for stored in loaded.sessions {
        let client: Arc<str> = stored.client_id.as_str().into();
        // Offline time counts from when it went offline, or from this start.
        let offline_ms = stored
            .offline_at
            .map_or(0, |at| clock_now.saturating_sub(at));
        let left_ms = match stored.expiry {
            NEVER_EXPIRES => None,
            expiry => Some((u64::from(expiry) * 1000).saturating_sub(offline_ms)),
        };
        if left_ms == Some(0) || stored.expiry == 0 {
            core.journal.ended.insert(client);
            continue;
        }
        let instance = core.new_instance();
        let mut session = Session::new(client.clone(), instance, SessionKind::Device, stored.level);
        session.expiry = stored.expiry;
        session.offline_since = Some(now);
        session.incoming_qos2 = stored.incoming_qos2.clone();
        session.expires_at = left_ms.map(|ms| now + Duration::from_millis(ms));
        // A will waits only if its connection had ended; one of a connection the restart
        // cut is not published.
        if let (Some(will), Some(at)) = (&stored.will, stored.will_at) {
            session.will = Some(Box::new(StoredWill {
                topic: will.topic.as_str().into(),
                payload: will.payload.clone(),
                qos: will.qos,
                retain: will.retain,
                props: will.props.clone(),
                delay: will.delay,
                expiry: will.expiry,
            }));
            session.will_at = Some(clock.instant(at));
        }
        session.stored = hash_of(&stored);
        let key = core.sessions.insert(session);
        core.by_client.insert(client, key);
        for (filter, options, id) in &stored.filters {
            let Ok(parsed) = Filter::parse(filter) else {
                continue;
            };
            let options = SubOptions::from_byte(*options);
            core.router.insert(
                parsed,
                Sub {
                    session: key,
                    options,
                    id: *id,
                },
            );
            if let Some(s) = core.sessions.get_mut(key) {
                s.subscriptions.insert(filter, options, *id);
            }
        }
        core.restore_timers(key);
        sessions += 1;
    }
    let mut queued = 0;
    let limits = core.limits;
    for m in loaded.queued {
        core.next_row = core.next_row.max(m.id + 1);
        let key = core.by_client.get(m.client_id.as_str()).copied();
        let Some(session) = key.and_then(|k| core.sessions.get_mut(k)) else {
            core.journal.deletes.push(m.id);
            continue;
        };
        if m.expires_at.is_some_and(|at| at <= clock_now) && m.in_flight.is_none() {
            core.journal.deletes.push(m.id);
            continue;
        }
        let item = Queued {
            msg: Arc::new(Message {
                topic: m.topic.into(),
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                props: m.props,
                expires: m.expires_at.map(|at| clock.instant(at)),
                origin: Origin::of(OriginKind::Device),
            }),
            qos: m.qos,
            retain: m.retain,
            sub_ids: m.sub_ids.iter().fold(SubIds::None, |ids, id| ids.with(*id)),
            token: None,
            row: Row {
                id: m.id,
                state: RowState::OnDisk,
            },
        };
        match m.in_flight {
            Some((packet_id, stage)) => session.restore_inflight(
                packet_id,
                match stage {
                    0 => Stage::Sent,
                    _ => Stage::Released,
                },
                item,
            ),
            None => {
                if let super::session::Enqueued::Dropped(dropped) =
                    session.enqueue(item, limits.max_queued_messages, limits.max_queued_bytes)
                {
                    core.journal.deletes.push(dropped.row.id);
                    inc(&core.health.counters.queued_dropped);
                }
            }
        }
        queued += 1;
    }
    (core.retained.len(), sessions, queued)
}

fn hash_of(s: &StoredSession) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The session as `state.db` keeps it.
fn snapshot(s: &Session, clock: &Clock) -> StoredSession {
    StoredSession {
        client_id: s.client_id.to_string(),
        level: s.level,
        expiry: s.expiry,
        offline_at: s.offline_since.map(|t| clock.at(t)),
        will: s
            .will
            .as_ref()
            .filter(|_| s.will_at.is_some())
            .map(|w| StoredWillRow {
                topic: w.topic.to_string(),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                props: w.props.clone(),
                delay: w.delay,
                expiry: w.expiry,
            }),
        will_at: s.will_at.map(|t| clock.at(t)),
        incoming_qos2: s.incoming_qos2.clone(),
        filters: s
            .subscriptions
            .iter()
            .map(|(f, o, id)| (f.to_string(), o.to_byte(), id))
            .collect(),
    }
}

fn stored_message(
    client: &str,
    q: &Queued,
    in_flight: Option<(u16, u8)>,
    clock: &Clock,
) -> StoredMessage {
    StoredMessage {
        id: q.row.id,
        client_id: client.to_owned(),
        topic: q.msg.topic.to_string(),
        qos: q.qos,
        retain: q.retain,
        payload: q.msg.payload.clone(),
        props: q.msg.props.clone(),
        expires_at: q.msg.expires.map(|t| clock.at(t)),
        in_flight,
        sub_ids: q.sub_ids.as_slice().to_vec(),
    }
}

/// The row `id` of a session, with its in-flight state.
fn find_row(s: &mut Session, id: u64) -> Option<(&mut Queued, Option<(u16, u8)>)> {
    if let Some(f) = s.inflight.iter_mut().find(|f| f.queued.row.id == id) {
        let stage = match f.stage {
            Stage::Sent => 0,
            Stage::Released => 1,
        };
        return Some((&mut f.queued, Some((f.packet_id, stage))));
    }
    s.queue
        .iter_mut()
        .find(|q| q.row.id == id)
        .map(|q| (q, None))
}

/// While a will or a session expiry is pending, the state clock is written this often
/// (with any commit, and on its own when nothing else is): after a `kill -9` or a power
/// cut, at most this much of the gateway's running time before it is not counted (a will
/// or an expiry comes that much late, never early). Idle otherwise: no writes.
const CLOCK_SAVE_EVERY: Duration = Duration::from_secs(60);

/// When the writer must commit next (None: nothing waits).
fn next_due(core: &Core, clock_saved: Instant) -> Option<Instant> {
    let j = &core.journal;
    if !j.deletes.is_empty() {
        return Some(Instant::now());
    }
    let interval = core.limits.commit_interval;
    let since = j.since.map(|t| t + interval);
    let queued = j.unwritten.front().map(|(t, _, _)| *t + interval);
    let clock = (!core.timers.is_empty()).then(|| clock_saved + CLOCK_SAVE_EVERY);
    since.into_iter().chain(queued).chain(clock).min()
}

/// The writer thread: waits for work, commits what is due, until every handle is gone.
fn run(shared: Arc<Shared>, mut store: Store, rx: Receiver<WriterMsg>) {
    loop {
        let due = next_due(&shared.lock(), store.saved_at);
        let first = match due {
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        let mut replies: Vec<oneshot::Sender<()>> = first.into_iter().collect();
        replies.extend(rx.try_iter().flatten());
        commit(&shared, &mut store, !replies.is_empty());
        for reply in replies {
            let _ = reply.send(());
        }
    }
}

/// Collects what is due (everything when `all`), writes it in one transaction, and marks
/// what was written.
fn commit(shared: &Shared, store: &mut Store, all: bool) {
    let now = Instant::now();
    let clock = store.clock;
    let mut batch = Batch::default();
    let mut written: Vec<(Arc<str>, u64)> = Vec::new();
    let mut hashes: Vec<(Arc<str>, u64)> = Vec::new();
    let clock_due = {
        let mut core = shared.lock();
        let clock_due = !core.timers.is_empty() && store.saved_at + CLOCK_SAVE_EVERY <= now;
        let interval = core.limits.commit_interval;
        let due = |t: Instant| all || t + interval <= now;
        if core.journal.since.is_some_and(due) {
            core.journal.since = None;
            let retained: Vec<Arc<str>> = core.journal.retained.drain().collect();
            for topic in retained {
                match core.retained.get(&topic) {
                    Some(m) => batch.retained_put.push(store::StoredRetained {
                        topic: topic.to_string(),
                        qos: m.qos,
                        payload: m.payload.clone(),
                        props: m.props.clone(),
                        expires_at: m.expires.map(|t| clock.at(t)),
                    }),
                    None => batch.retained_delete.push(topic.to_string()),
                }
            }
            batch.sessions_delete = core.journal.ended.drain().map(|c| c.to_string()).collect();
            let dirty: Vec<Arc<str>> = core.journal.sessions.drain().collect();
            for client in dirty {
                let key = core.by_client.get(&client).copied();
                match key.and_then(|k| core.sessions.get(k)) {
                    Some(s) if s.persistent() => {
                        let snap = snapshot(s, &clock);
                        let hash = hash_of(&snap);
                        if hash != s.stored {
                            hashes.push((client, hash));
                            batch.sessions_put.push(snap);
                        }
                    }
                    _ => {
                        if !batch.sessions_delete.iter().any(|c| **c == *client) {
                            batch.sessions_delete.push(client.to_string());
                        }
                    }
                }
            }
            let updates: Vec<(Arc<str>, u64)> = core.journal.updates.drain(..).collect();
            for (client, id) in updates {
                let key = core.by_client.get(&client).copied();
                if let Some(s) = key.and_then(|k| core.sessions.get_mut(k)) {
                    if let Some((q, in_flight)) = find_row(s, id) {
                        if q.row.state == RowState::OnDisk {
                            batch
                                .queued_put
                                .push(stored_message(&client, q, in_flight, &clock));
                        }
                    }
                }
            }
        }
        while let Some((at, _, _)) = core.journal.unwritten.front() {
            if !due(*at) {
                break;
            }
            let Some((_, client, id)) = core.journal.unwritten.pop_front() else {
                break;
            };
            let key = core.by_client.get(&client).copied();
            let Some(s) = key.and_then(|k| core.sessions.get_mut(k)) else {
                continue;
            };
            if !s.persistent() {
                continue;
            }
            if let Some((q, in_flight)) = find_row(s, id) {
                if q.row.state == RowState::Memory {
                    q.row.state = RowState::Writing;
                    batch
                        .queued_put
                        .push(stored_message(&client, q, in_flight, &clock));
                    written.push((client, id));
                }
            }
        }
        batch.queued_delete = std::mem::take(&mut core.journal.deletes);
        clock_due
    };
    if batch.is_empty() && !clock_due {
        return;
    }
    let result = store.commit(&batch);
    let mut core = shared.lock();
    match result {
        Ok(()) => {
            debug!(
                retained = batch.retained_put.len() + batch.retained_delete.len(),
                sessions = batch.sessions_put.len() + batch.sessions_delete.len(),
                queued = batch.queued_put.len(),
                deleted = batch.queued_delete.len(),
                "state.db committed"
            );
            for (client, id) in written {
                let key = core.by_client.get(&client).copied();
                if let Some((q, _)) = key
                    .and_then(|k| core.sessions.get_mut(k))
                    .and_then(|s| find_row(s, id))
                {
                    if q.row.state == RowState::Writing {
                        q.row.state = RowState::OnDisk;
                    }
                }
            }
            for (client, hash) in hashes {
                let key = core.by_client.get(&client).copied();
                if let Some(s) = key.and_then(|k| core.sessions.get_mut(k)) {
                    s.stored = hash;
                }
            }
        }
        Err(e) => {
            inc(&core.health.counters.state_errors);
            let interval = core.limits.commit_interval;
            error!(error = %e, retry_in = ?interval,
                "writing state.db failed; what it held stays in memory and is written with the next commit (a restart before that forgets it)");
            // Nothing a failed write held is forgotten: above all an acknowledged
            // message's delete, or it would be replayed after a restart.
            let j = &mut core.journal;
            j.since = Some(j.since.map_or(now, |t| t.min(now)));
            j.retained.extend(
                batch
                    .retained_put
                    .iter()
                    .map(|r| Arc::from(r.topic.as_str()))
                    .chain(batch.retained_delete.iter().map(|t| Arc::from(t.as_str()))),
            );
            j.ended
                .extend(batch.sessions_delete.iter().map(|c| Arc::from(c.as_str())));
            j.sessions.extend(
                batch
                    .sessions_put
                    .iter()
                    .map(|s| Arc::from(s.client_id.as_str())),
            );
            j.deletes.extend(batch.queued_delete.iter().copied());
            for (client, id) in written.into_iter().rev() {
                let key = core.by_client.get(&client).copied();
                if let Some((q, _)) = key
                    .and_then(|k| core.sessions.get_mut(k))
                    .and_then(|s| find_row(s, id))
                {
                    q.row.state = RowState::Memory;
                }
                core.journal.unwritten.push_front((now, client, id));
            }
            if batch.queued_put.len() > 1000 {
                warn!("state.db keeps failing with a large backlog in memory");
            }
        }
    }
}

impl Session {
    /// A message that was in flight when the gateway stopped: it goes again, with DUP set
    /// (or its PUBREL), under the same packet id, when the client resumes.
    fn restore_inflight(&mut self, packet_id: u16, stage: Stage, queued: Queued) {
        self.restore_packet_id(packet_id);
        self.inflight.push_back(Inflight {
            packet_id,
            seq: 0,
            queued,
            stage,
        });
    }
}
