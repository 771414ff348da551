//! The outbox: the on-disk SQLite queue between the local broker and the cloud, and nothing
//! else. One thread owns the database; everyone else talks to it through [`OutboxHandle`].
//!
//! Messages are committed in groups (`queue.commit_interval` or `queue.commit_batch` rows,
//! whichever comes first); only committed rows are ever handed to the uplink, so nothing is
//! sent that a power cut could take back. Ages are measured on the *gateway clock*: the
//! monotonic time the gateway has been running, carried over restarts in the database, so a
//! wall-clock jump (a Pi booting in 1970, NTP stepping) never expires a backlog.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{QueueConfig, WhenFull};
use crate::health::{add, inc, RateLimit, SharedHealth};

/// A message accepted from the local broker, on its way into the outbox.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The cloud topic it will be published on.
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// What it counts against `queue.max_size`: local topic plus payload bytes.
    pub size: u64,
}

/// A committed row, ready to be sent.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("opening the outbox database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the outbox has stopped")]
    Closed,
    #[error("outbox database: {0}")]
    Db(#[from] rusqlite::Error),
}

enum Command {
    Push(Vec<NewMessage>),
    Fetch {
        after: i64,
        limit: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Fetched>,
    },
    Ack(i64),
    DeadLetter {
        id: i64,
        reason: String,
    },
    Shutdown(oneshot::Sender<()>),
    /// New `[queue]` settings from a reload.
    Reconfigure(QueueConfig),
}

/// The answer to a fetch.
#[derive(Debug)]
pub struct Fetched {
    pub rows: Vec<Row>,
    /// The highest committed row id when the rows were read: every row up to it that is
    /// not in `rows` (after the last one) was acknowledged or is not there.
    pub upto: i64,
}

/// The way to the outbox's owner thread. Cheap to clone.
#[derive(Clone)]
pub struct OutboxHandle {
    tx: flume::Sender<Command>,
    committed: watch::Receiver<i64>,
}

impl OutboxHandle {
    /// Queues messages for the next group commit; waits while the writer is saturated.
    pub async fn push(&self, messages: Vec<NewMessage>) -> Result<(), OutboxError> {
        self.send(Command::Push(messages)).await
    }

    /// Up to `limit` committed rows (and about `max_bytes` of payload) with id > `after`,
    /// oldest first, excluding rows already acknowledged.
    pub async fn fetch(
        &self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch {
            after,
            limit,
            max_bytes,
            reply,
        })
        .await?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// The cloud has the row: it may go.
    pub async fn ack(&self, id: i64) -> Result<(), OutboxError> {
        self.send(Command::Ack(id)).await
    }

    /// The cloud can never take this row: move it aside so the rows behind it can flow.
    pub async fn dead_letter(&self, id: i64, reason: String) -> Result<(), OutboxError> {
        self.send(Command::DeadLetter { id, reason }).await
    }

    /// The highest committed row id; changes after every group commit.
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    /// Applies new `[queue]` settings (a reload) from the next command on.
    pub async fn reconfigure(&self, config: QueueConfig) -> Result<(), OutboxError> {
        self.send(Command::Reconfigure(config)).await
    }

    /// Commits what is pending and stops the writer.
    pub async fn shutdown(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Shutdown(reply)).await?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    async fn send(&self, command: Command) -> Result<(), OutboxError> {
        self.tx
            .send_async(command)
            .await
            .map_err(|_| OutboxError::Closed)
    }
}

/// Opens (or creates) the outbox in `data_dir` and starts its owner thread.
pub fn open(
    config: &QueueConfig,
    data_dir: &Path,
    health: SharedHealth,
) -> Result<(OutboxHandle, std::thread::JoinHandle<()>), OutboxError> {
    std::fs::create_dir_all(data_dir).map_err(|source| OutboxError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join("outbox.db");
    let store = Store::open(&path, config.fsync).map_err(|source| OutboxError::Open {
        path: path.clone(),
        source,
    })?;
    // Small: a push holds up to a whole intake batch, and what waits here is not on disk yet.
    let (tx, rx) = flume::bounded(16);
    let (committed_tx, committed) = watch::channel(store.max_id);
    info!(
        path = %path.display(),
        rows = store.rows,
        bytes = store.bytes,
        "outbox opened"
    );
    let writer = Writer {
        store,
        config: config.clone(),
        health,
        rx,
        committed: committed_tx,
        pending: Vec::new(),
        pending_since: None,
        acks_since: None,
        acks: HashSet::new(),
        dead: Vec::new(),
        full_log: RateLimit::new(Duration::from_secs(10)),
        next_expiry: Instant::now(),
        clock_saved: Instant::now(),
        oldest_ts: None,
    };
    let thread = std::thread::Builder::new()
        .name("outbox".into())
        .spawn(move || writer.run())
        .map_err(|source| OutboxError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
    Ok((OutboxHandle { tx, committed }, thread))
}

/// The gateway clock: milliseconds of gateway running time, persisted across restarts.
struct Clock {
    base_ms: u64,
    start: Instant,
}

impl Clock {
    fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }
}

/// The database and the figures we keep about it.
struct Store {
    conn: Connection,
    clock: Clock,
    rows: u64,
    bytes: u64,
    max_id: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    ts      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id      INTEGER PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    reason  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

impl Store {
    fn open(path: &Path, fsync: bool) -> rusqlite::Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
        conn.execute_batch(SCHEMA)?;
        let clock_ms: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'clock_ms'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let newest_ts: Option<i64> =
            conn.query_row("SELECT MAX(ts) FROM messages", [], |r| r.get(0))?;
        let base_ms = clock_ms.unwrap_or(0).max(newest_ts.unwrap_or(0)).max(0) as u64;
        let (rows, bytes): (i64, Option<i64>) =
            conn.query_row("SELECT COUNT(*), SUM(size) FROM messages", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let max_id: Option<i64> =
            conn.query_row("SELECT MAX(id) FROM messages", [], |r| r.get(0))?;
        Ok(Store {
            conn,
            clock: Clock {
                base_ms,
                start: Instant::now(),
            },
            rows: rows.max(0) as u64,
            bytes: bytes.unwrap_or(0).max(0) as u64,
            max_id: max_id.unwrap_or(0),
        })
    }

    fn oldest_ts(&self) -> rusqlite::Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT ts FROM messages ORDER BY id LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()
    }

    fn fetch(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
        max_bytes: usize,
        skip: &HashSet<i64>,
    ) -> rusqlite::Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, topic, payload, qos FROM messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, upto, (limit + skip.len()) as i64], |r| {
            Ok(Row {
                id: r.get(0)?,
                topic: r.get(1)?,
                payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                qos: r.get(3)?,
            })
        })?;
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut bytes = 0;
        for row in rows {
            let row = row?;
            if !skip.contains(&row.id) {
                bytes += row.topic.len() + row.payload.len();
                out.push(row);
                if out.len() == limit || bytes >= max_bytes {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// What one group commit did, for counters and logs.
#[derive(Debug, Default)]
struct CommitReport {
    inserted: u64,
    dropped: u64,
    rejected: u64,
    acked: u64,
    dead: u64,
}

struct Writer {
    store: Store,
    config: QueueConfig,
    health: SharedHealth,
    rx: flume::Receiver<Command>,
    committed: watch::Sender<i64>,
    pending: Vec<NewMessage>,
    pending_since: Option<Instant>,
    /// When the oldest uncommitted ack or dead letter came in.
    acks_since: Option<Instant>,
    /// Acknowledged rows not yet deleted (deleted at the next commit; never fetched again).
    acks: HashSet<i64>,
    dead: Vec<(i64, String)>,
    full_log: RateLimit,
    next_expiry: Instant,
    /// The gateway clock is saved with every commit, and at least this often when idle.
    clock_saved: Instant,
    /// Gateway-clock ms of the oldest row, as of the last commit.
    oldest_ts: Option<i64>,
}

const EXPIRY_EVERY: Duration = Duration::from_secs(1);
const CLOCK_SAVE_EVERY: Duration = Duration::from_secs(60);

impl Writer {
    fn run(mut self) {
        self.publish_gauges();
        loop {
            let deadline = match (self.pending_since, self.acks_since) {
                (Some(a), Some(b)) => a.min(b) + self.config.commit_interval,
                (Some(since), None) | (None, Some(since)) => since + self.config.commit_interval,
                (None, None) => self.next_expiry,
            };
            match self.rx.recv_deadline(deadline) {
                Ok(Command::Push(messages)) => {
                    self.pending_since.get_or_insert_with(Instant::now);
                    self.pending.extend(messages);
                    if self.pending.len() >= self.config.commit_batch {
                        self.commit();
                    }
                }
                Ok(Command::Fetch {
                    after,
                    limit,
                    max_bytes,
                    reply,
                }) => {
                    let upto = *self.committed.borrow();
                    let rows = self
                        .store
                        .fetch(after, upto, limit, max_bytes, &self.acks)
                        .unwrap_or_else(|e| {
                            self.db_error("reading rows to send", &e);
                            Vec::new()
                        });
                    let _ = reply.send(Fetched { rows, upto });
                }
                Ok(Command::Ack(id)) => {
                    self.acks_since.get_or_insert_with(Instant::now);
                    self.acks.insert(id);
                    if self.acks.len() >= self.config.commit_batch {
                        self.commit();
                    }
                }
                Ok(Command::DeadLetter { id, reason }) => {
                    self.acks_since.get_or_insert_with(Instant::now);
                    self.acks.insert(id);
                    self.dead.push((id, reason));
                }
                Ok(Command::Shutdown(reply)) => {
                    self.commit();
                    info!(
                        rows = self.store.rows,
                        bytes = self.store.bytes,
                        "outbox closed"
                    );
                    let _ = reply.send(());
                    return;
                }
                Ok(Command::Reconfigure(config)) => self.reconfigure(config),
                Err(flume::RecvTimeoutError::Timeout) => self.commit(),
                Err(flume::RecvTimeoutError::Disconnected) => {
                    self.commit();
                    return;
                }
            }
        }
    }

    /// New settings apply from now on. A smaller `max_size` applies `when_full` once:
    /// `drop-oldest` drops the oldest rows until the rest fits (counted in `dropped_full`),
    /// `reject-new` keeps them and refuses new messages until the queue is below it.
    fn reconfigure(&mut self, config: QueueConfig) {
        if config.fsync != self.config.fsync {
            let mode = if config.fsync { "FULL" } else { "NORMAL" };
            if let Err(e) = self.store.conn.pragma_update(None, "synchronous", mode) {
                self.db_error("changing queue.synchronous", &e);
            }
        }
        self.config = config;
        self.commit();
        if self.store.bytes <= self.config.max_size || self.config.when_full != WhenFull::DropOldest
        {
            return;
        }
        let need = self.store.bytes - self.config.max_size;
        let evicted = self.store.conn.transaction().and_then(|tx| {
            let freed = evict_oldest(&tx, need)?;
            tx.commit()?;
            Ok(freed)
        });
        match evicted {
            Ok((rows, bytes)) => {
                self.store.rows -= rows;
                self.store.bytes -= bytes;
                add(&self.health.counters.dropped_full, rows);
                warn!(dropped_oldest = rows, max_size = self.config.max_size,
                    "queue.max_size lowered below the outbox's content: oldest messages dropped (queue.when_full)");
            }
            Err(e) => self.db_error("shrinking the outbox to the new queue.max_size", &e),
        }
        self.publish_gauges();
    }

    fn db_error(&self, what: &str, e: &rusqlite::Error) {
        inc(&self.health.counters.outbox_errors);
        error!(error = %e, "outbox database error while {what}");
    }

    /// One transaction: new rows (making room or refusing per `when_full`), deletions of
    /// acknowledged rows, dead letters, expiry, and the gateway clock.
    fn commit(&mut self) {
        let now = Instant::now();
        let clock_ms = self.store.clock.now_ms();
        // Expiry and the idle clock save write only when there is something to write: an
        // idle gateway must not wear the flash with a commit every second.
        let cutoff = clock_ms as i64 - self.config.max_age.as_millis() as i64;
        let expire = now >= self.next_expiry && self.oldest_ts.is_some_and(|ts| ts < cutoff);
        if now >= self.next_expiry {
            self.next_expiry = now + EXPIRY_EVERY;
        }
        let work = !self.pending.is_empty() || !self.acks.is_empty() || !self.dead.is_empty();
        if !work && !expire && now.duration_since(self.clock_saved) < CLOCK_SAVE_EVERY {
            self.health.queue.now_ts.store(clock_ms, Ordering::Relaxed);
            return;
        }
        self.clock_saved = now;
        let pending = std::mem::take(&mut self.pending);
        self.pending_since = None;
        self.acks_since = None;
        let mut report = CommitReport::default();
        let result = self.write_batch(&pending, clock_ms, expire, &mut report);
        match result {
            Ok(expired) => {
                self.acks.clear();
                self.dead.clear();
                let health = &self.health.counters;
                add(&health.enqueued, report.inserted);
                add(&health.dropped_full, report.dropped);
                add(&health.rejected_full, report.rejected);
                add(&health.dead_lettered, report.dead);
                add(&health.expired, expired);
                if report.dropped + report.rejected > 0 {
                    if let Some(held) = self.full_log.check() {
                        warn!(
                            dropped_oldest = report.dropped,
                            rejected_new = report.rejected,
                            max_size = self.config.max_size,
                            earlier_warnings_suppressed = held,
                            "outbox full: messages lost to queue.when_full"
                        );
                    }
                }
                if expired > 0 {
                    warn!(expired, max_age = ?self.config.max_age, "outbox rows expired (queue.max_age)");
                }
                if report.inserted > 0 {
                    self.committed.send_replace(self.store.max_id);
                }
                debug!(?report, "group commit");
            }
            Err(e) => {
                // The transaction rolled back: keep the batch and try again at the next tick,
                // unless the batch itself is what the database refuses forever.
                self.db_error("committing a batch", &e);
                if self.pending.is_empty() && pending.len() < self.config.commit_batch * 4 {
                    self.pending = pending;
                    self.pending_since = Some(Instant::now());
                } else {
                    add(&self.health.counters.outbox_lost, pending.len() as u64);
                    error!(
                        lost = pending.len(),
                        "outbox cannot store messages; they are lost"
                    );
                }
                self.reload_figures();
            }
        }
        self.publish_gauges();
    }

    fn write_batch(
        &mut self,
        pending: &[NewMessage],
        clock_ms: u64,
        expire: bool,
        report: &mut CommitReport,
    ) -> rusqlite::Result<u64> {
        let store = &mut self.store;
        let tx = store.conn.transaction()?;
        let mut rows = store.rows;
        let mut bytes = store.bytes;
        let mut max_id = store.max_id;
        for (id, reason) in &self.dead {
            let moved = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO dead_letter (id, topic, payload, qos, ts, reason)
                 SELECT id, topic, payload, qos, ts, ?2 FROM messages WHERE id = ?1",
                )?
                .execute(params![id, reason])?;
            report.dead += moved as u64;
            warn!(row = id, reason = %reason, "message moved to the dead-letter table");
        }
        for id in &self.acks {
            let size: Option<i64> = tx
                .prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING size")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            if let Some(size) = size {
                rows -= 1;
                bytes -= size as u64;
                report.acked += 1;
            }
        }
        for message in pending {
            if bytes + message.size > self.config.max_size {
                match self.config.when_full {
                    WhenFull::RejectNew => {
                        report.rejected += 1;
                        continue;
                    }
                    WhenFull::DropOldest => {
                        if message.size > self.config.max_size {
                            report.rejected += 1;
                            continue;
                        }
                        let (n, freed) =
                            evict_oldest(&tx, bytes + message.size - self.config.max_size)?;
                        rows -= n;
                        bytes -= freed;
                        report.dropped += n;
                    }
                }
            }
            tx.prepare_cached(
                "INSERT INTO messages (topic, payload, qos, size, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                message.topic,
                &message.payload[..],
                message.qos,
                message.size as i64,
                clock_ms as i64
            ])?;
            max_id = tx.last_insert_rowid();
            rows += 1;
            bytes += message.size;
            report.inserted += 1;
        }
        let mut expired = 0;
        if expire {
            let cutoff = clock_ms as i64 - self.config.max_age.as_millis() as i64;
            let mut stmt =
                tx.prepare_cached("DELETE FROM messages WHERE ts < ?1 RETURNING size")?;
            let sizes = stmt.query_map(params![cutoff], |r| r.get::<_, i64>(0))?;
            for size in sizes {
                expired += 1;
                rows -= 1;
                bytes -= size? as u64;
            }
        }
        tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock_ms', ?1)")?
            .execute(params![clock_ms as i64])?;
        tx.commit()?;
        store.rows = rows;
        store.bytes = bytes;
        store.max_id = max_id;
        Ok(expired)
    }

    /// After a failed transaction, re-read the figures from what the database really holds.
    fn reload_figures(&mut self) {
        let conn = &self.store.conn;
        if let Ok((rows, bytes)) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        ) {
            self.store.rows = rows.max(0) as u64;
            self.store.bytes = bytes.max(0) as u64;
        }
    }

    fn publish_gauges(&mut self) {
        let queue = &self.health.queue;
        queue.rows.store(self.store.rows, Ordering::Relaxed);
        queue.bytes.store(self.store.bytes, Ordering::Relaxed);
        queue
            .now_ts
            .store(self.store.clock.now_ms(), Ordering::Relaxed);
        self.oldest_ts = match self.store.oldest_ts() {
            Ok(ts) => ts,
            Err(e) => {
                self.db_error("reading the oldest row", &e);
                None
            }
        };
        let oldest = self.oldest_ts.map_or(u64::MAX, |ts| ts.max(0) as u64);
        queue.oldest_ts.store(oldest, Ordering::Relaxed);
    }
}

/// Deletes the oldest rows until at least `need` bytes are freed; returns (rows, bytes).
fn evict_oldest(tx: &rusqlite::Transaction<'_>, need: u64) -> rusqlite::Result<(u64, u64)> {
    let mut freed = 0;
    let mut n = 0;
    while freed < need {
        let victim: Option<(i64, i64)> = tx
            .prepare_cached("SELECT id, size FROM messages ORDER BY id LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((id, size)) = victim else { break };
        tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute(params![id])?;
        freed += size as u64;
        n += 1;
    }
    Ok((n, freed))
}
