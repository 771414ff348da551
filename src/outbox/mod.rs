//! The outbox: every message an uplink rule accepted, from the intake until the cloud has
//! it, in memory and on disk, and nothing else. One task owns it; everyone else talks to
//! it through [`OutboxHandle`].
//!
//! Write-behind (promise 1): a message is handed to the uplink at once and held in memory;
//! it is written to SQLite only if the cloud has not acknowledged it within
//! `queue.commit_interval` (so always while the link is down or the window is full), or when
//! more than `queue.commit_batch` messages wait in memory. On a healthy link most messages
//! never touch the flash; a crash loses at most the unacknowledged messages of the last
//! `commit_interval`. Ids are assigned in arrival order and every id on disk is lower than
//! every id in memory, so "oldest first" is one ordered walk over disk, then memory.
//!
//! Ages are measured on the *gateway clock*: the monotonic time the gateway has been
//! running, carried over restarts in the database, so a wall-clock jump (a Pi booting in
//! 1970, NTP stepping) never expires a backlog.

pub mod dead_letters;
pub(crate) mod store;

use std::collections::{BTreeSet, VecDeque};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rangemap::RangeInclusiveSet;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::{QueueConfig, WhenFull};
use crate::health::{add, inc, RateLimit, SharedHealth};
use store::{Flush, Store};

/// How an uplink rule's messages are ordered after an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    /// Oldest first, always (promise 2).
    #[default]
    Strict,
    /// Messages that arrive while a backlog drains go first; the backlog follows in its
    /// own order (`drain = "live-first"`).
    LiveFirst,
}

/// A message accepted from the local broker, on its way into the outbox.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The cloud topic it will be published on.
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// What it counts against `queue.max_size`: local topic plus payload bytes.
    pub size: u64,
    pub lane: Lane,
}

/// A message handed to the uplink.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub size: u64,
}

/// The cloud has this message (acknowledged at QoS 1, written at QoS 0).
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub id: i64,
    pub size: u64,
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
}

/// The uplink's subscription for one connection: messages flow to it as they come, as long
/// as it has credit (rows and bytes it can still take), so a slow link bounds memory.
struct Feed {
    /// The uplink's connection: a new one starts over from the oldest message.
    session: u64,
    tx: mpsc::UnboundedSender<Vec<Row>>,
    rows: usize,
    bytes: usize,
}

enum Command {
    Push(Vec<NewMessage>),
    Subscribe(Feed),
    Credit {
        session: u64,
        rows: usize,
        bytes: usize,
    },
    Delivered(Vec<Delivered>),
    DeadLetter {
        id: i64,
        reason: String,
    },
    Replay {
        which: dead_letters::Selection,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Shutdown(oneshot::Sender<()>),
    /// New `[queue]` settings from a reload.
    Reconfigure(QueueConfig),
    /// A liveness probe: answered from the owner's loop.
    Ping(oneshot::Sender<()>),
}

/// The way to the outbox's owner. Cheap to clone.
#[derive(Clone)]
pub struct OutboxHandle {
    tx: flume::Sender<Command>,
}

impl OutboxHandle {
    /// Hands messages to the outbox; waits while the owner is saturated.
    pub async fn push(&self, messages: Vec<NewMessage>) -> Result<(), OutboxError> {
        self.send(Command::Push(messages)).await
    }

    /// Starts a session (one cloud connection): messages not yet handed out in it come on
    /// the returned channel, oldest first (live-first rules' new messages before their
    /// backlog), up to `rows` messages and about `bytes` of topic plus payload until
    /// [`credit`](Self::credit) gives more. A new session replaces the previous one.
    pub async fn subscribe(
        &self,
        session: u64,
        rows: usize,
        bytes: usize,
    ) -> Result<mpsc::UnboundedReceiver<Vec<Row>>, OutboxError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.send(Command::Subscribe(Feed {
            session,
            tx,
            rows,
            bytes,
        }))
        .await?;
        Ok(rx)
    }

    /// The uplink has taken `rows` messages (`bytes` of topic plus payload) off its feed.
    pub async fn credit(&self, session: u64, rows: usize, bytes: usize) -> Result<(), OutboxError> {
        self.send(Command::Credit {
            session,
            rows,
            bytes,
        })
        .await
    }

    /// The cloud has these messages: they may go.
    pub async fn delivered(&self, messages: Vec<Delivered>) -> Result<(), OutboxError> {
        self.send(Command::Delivered(messages)).await
    }

    /// The cloud can never take this message: move it aside so the ones behind it can flow.
    pub async fn dead_letter(&self, id: i64, reason: String) -> Result<(), OutboxError> {
        self.send(Command::DeadLetter { id, reason }).await
    }

    /// Applies new `[queue]` settings (a reload) from the next command on.
    pub async fn reconfigure(&self, config: QueueConfig) -> Result<(), OutboxError> {
        self.send(Command::Reconfigure(config)).await
    }

    /// Answers once the owner's loop has come round: it is not stuck.
    pub async fn ping(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Ping(reply)).await?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// Puts dead letters back in the queue, after everything in it; returns how many.
    pub async fn replay(&self, which: dead_letters::Selection) -> Result<usize, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Replay { which, reply })
            .await
            .map_err(|e| e.to_string())?;
        rx.await.map_err(|_| OutboxError::Closed.to_string())?
    }

    /// Writes what is held in memory and stops the owner.
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

/// Opens (or creates) the outbox in `data_dir` (blocking: run it off the async workers);
/// the owner is to be spawned as a task.
pub fn open(
    config: &QueueConfig,
    data_dir: &Path,
    health: SharedHealth,
) -> Result<(OutboxHandle, Owner), OutboxError> {
    std::fs::create_dir_all(data_dir).map_err(|source| OutboxError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join("outbox.db");
    let store = match Store::open(&path, config.fsync) {
        Ok(store) => store,
        Err(e) if store::is_damage(&e) => {
            // A damaged file must not become a crash loop: keep it for inspection, start
            // afresh. What it held is lost; that is said loudly, once.
            let aside = store::move_aside(&path).map_err(|source| OutboxError::DataDir {
                path: path.clone(),
                source,
            })?;
            inc(&health.counters.outbox_damaged);
            error!(path = %path.display(), moved_to = %aside.display(), error = %e,
                "the outbox database is damaged; it was moved aside and a new one started (its messages are not forwarded)");
            Store::open(&path, config.fsync).map_err(|source| OutboxError::Open {
                path: path.clone(),
                source,
            })?
        }
        Err(source) => {
            return Err(OutboxError::Open {
                path: path.clone(),
                source,
            })
        }
    };
    // Small: a push holds up to a whole intake batch.
    let (tx, rx) = flume::bounded(16);
    info!(
        path = %path.display(),
        rows = store.rows,
        bytes = store.bytes,
        "outbox opened"
    );
    Ok((
        OutboxHandle { tx },
        Owner::new(store, config.clone(), health, rx),
    ))
}

/// A message held in memory.
pub(crate) struct Held {
    id: i64,
    message: NewMessage,
    arrived: Instant,
    /// Gateway-clock ms of its arrival.
    ts: u64,
    state: HeldState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldState {
    /// Not handed to the uplink in its current session.
    Waiting,
    /// Handed to the uplink in this session.
    Issued(u64),
    /// Delivered, dropped or expired: nothing more to do.
    Gone,
}

/// Where the uplink's current session stands in the ordered walk.
#[derive(Default)]
struct Cursor {
    session: u64,
    /// The lowest id not yet handed out in strict order.
    next: i64,
    /// Ids above `next` handed out early (live-first) and since written to disk.
    ahead: BTreeSet<i64>,
    /// Live-first messages that arrived during this session and were written to disk
    /// before they could be handed out: still live, they go ahead of the backlog.
    live: BTreeSet<i64>,
}

/// At most this many spilled live-first messages are tracked per session; beyond it they
/// wait in the backlog's order.
const LIVE_TRACKED: usize = 100_000;

/// Memory the outbox may hold before it writes regardless of `commit_interval`.
const HELD_MAX_BYTES: u64 = 16 << 20;
/// While the database refuses writes, memory holds at most this much; new messages are
/// refused beyond it (counted in `rejected_storage`).
const HELD_HARD_BYTES: u64 = 32 << 20;
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
/// A failed write is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The gateway clock is saved at most this often, only while rows are on disk.
const CLOCK_SAVE_EVERY: Duration = Duration::from_secs(60);
/// Disk rows read per step when dropping or expiring the oldest.
const SCAN_STEP: usize = 512;

/// `queue.drain_rate` as a token bucket: `rate` messages a second, in bursts of at most a
/// tenth of a second's worth (at least one), so the uplink's window is fed smoothly.
#[derive(Debug)]
struct Pacer {
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(now: Instant) -> Self {
        Pacer {
            tokens: 0.0,
            at: now,
        }
    }

    fn burst(rate: u32) -> f64 {
        (f64::from(rate) / 10.0).max(1.0)
    }

    /// Messages that may go now.
    fn allowed(&mut self, rate: u32, now: Instant) -> usize {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + earned).min(Self::burst(rate));
        self.at = now;
        self.tokens as usize
    }

    fn took(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// When a burst's worth may go (one wake per tenth of a second, not one per message).
    fn next_allowed(&self, rate: u32) -> Instant {
        let missing = (Self::burst(rate) - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / f64::from(rate))
    }
}

/// The one owner of the outbox: memory and the SQLite file. Spawned as a task.
pub struct Owner {
    store: Store,
    config: QueueConfig,
    health: SharedHealth,
    rx: flume::Receiver<Command>,
    next_id: i64,
    held: VecDeque<Held>,
    /// Live (not gone) messages in memory and their bytes.
    held_rows: u64,
    held_bytes: u64,
    /// Disk rows to delete at the next flush, and since when the oldest waits.
    gone: RangeInclusiveSet<i64>,
    gone_since: Option<Instant>,
    dead: Vec<(Row, String)>,
    cursor: Cursor,
    feed: Option<Feed>,
    /// `queue.drain_rate`'s allowance; `paced`: the last feed stopped at it.
    pacer: Pacer,
    paced: bool,
    next_expiry: Instant,
    clock_saved: Instant,
    /// Gateway-clock ms of the oldest message, as of the last gauge update.
    oldest_ts: Option<u64>,
    /// The last write failed: memory fills up to `HELD_HARD_BYTES`, then new messages are
    /// refused, until a write succeeds.
    storage_failing: bool,
    failed_at: Option<Instant>,
    full_log: RateLimit,
    storage_log: RateLimit,
    db_log: RateLimit,
}

impl Owner {
    fn new(
        store: Store,
        config: QueueConfig,
        health: SharedHealth,
        rx: flume::Receiver<Command>,
    ) -> Self {
        Owner {
            next_id: store.max_id + 1,
            store,
            config,
            health,
            rx,
            held: VecDeque::new(),
            held_rows: 0,
            held_bytes: 0,
            gone: RangeInclusiveSet::new(),
            gone_since: None,
            dead: Vec::new(),
            cursor: Cursor::default(),
            feed: None,
            pacer: Pacer::new(Instant::now()),
            paced: false,
            next_expiry: Instant::now(),
            clock_saved: Instant::now(),
            oldest_ts: None,
            storage_failing: false,
            failed_at: None,
            full_log: RateLimit::new(Duration::from_secs(10)),
            storage_log: RateLimit::new(Duration::from_secs(10)),
            db_log: RateLimit::new(Duration::from_secs(10)),
        }
    }

    /// Serves the handles until shutdown. A task on the runtime, so that a message goes
    /// from the intake through here to the uplink without waking another thread; the
    /// SQLite work inside is done in `block_in_place` (see `store`).
    pub async fn run(mut self) {
        self.update_gauges(true);
        loop {
            let deadline = self.next_deadline();
            // Under a steady stream of commands the timeout below would never fire.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.tick();
                continue;
            }
            let command = match deadline {
                Some(deadline) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(deadline, self.rx.recv_async()).await {
                        Ok(Ok(command)) => Ok(command),
                        Ok(Err(_)) => Err(flume::RecvTimeoutError::Disconnected),
                        Err(_) => Err(flume::RecvTimeoutError::Timeout),
                    }
                }
                None => self
                    .rx
                    .recv_async()
                    .await
                    .map_err(|_| flume::RecvTimeoutError::Disconnected),
            };
            match command {
                Ok(Command::Push(messages)) => {
                    self.accept(messages);
                    self.feed();
                    let over = self.held_rows > self.config.commit_batch as u64
                        || self.held_bytes > HELD_MAX_BYTES;
                    if over && self.failed_at.is_none_or(|f| f.elapsed() >= RETRY_AFTER) {
                        self.flush(Spill::OverBound);
                    }
                    self.update_gauges(false);
                }
                Ok(Command::Subscribe(feed)) => {
                    self.cursor = Cursor {
                        session: feed.session,
                        ..Cursor::default()
                    };
                    self.feed = Some(feed);
                    self.feed();
                }
                Ok(Command::Credit {
                    session,
                    rows,
                    bytes,
                }) => {
                    if let Some(feed) = self.feed.as_mut().filter(|f| f.session == session) {
                        feed.rows += rows;
                        feed.bytes += bytes;
                        self.feed();
                    }
                }
                Ok(Command::Delivered(messages)) => {
                    for m in messages {
                        self.forget(m.id, m.size);
                    }
                    self.update_gauges(false);
                }
                Ok(Command::DeadLetter { id, reason }) => {
                    if let Some(row) = self.lookup(id) {
                        warn!(topic = %row.topic, bytes = row.payload.len(), reason = %reason,
                            "message moved to the dead-letter table");
                        self.forget(row.id, row.size);
                        self.dead.push((row, reason));
                        self.flush(Spill::Due);
                        self.update_gauges(true);
                    }
                }
                Ok(Command::Replay { which, reply }) => {
                    let _ = reply.send(self.replay(&which));
                    self.feed();
                    self.update_gauges(true);
                }
                Ok(Command::Shutdown(reply)) => {
                    self.close();
                    let _ = reply.send(());
                    return;
                }
                Ok(Command::Reconfigure(config)) => self.reconfigure(config),
                Ok(Command::Ping(reply)) => {
                    let _ = reply.send(());
                }
                Err(flume::RecvTimeoutError::Timeout) => self.tick(),
                Err(flume::RecvTimeoutError::Disconnected) => {
                    self.close();
                    return;
                }
            }
        }
    }

    /// When the owner has something to do without being asked: its housekeeping, or the
    /// drain rate allowing the uplink more.
    fn next_deadline(&self) -> Option<Instant> {
        [self.housekeeping_due(), self.pace_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// When `queue.drain_rate` allows the next burst, while a feed waits for it.
    fn pace_due(&self) -> Option<Instant> {
        self.config
            .drain_rate
            .filter(|_| self.paced)
            .map(|rate| self.pacer.next_allowed(rate))
    }

    /// When housekeeping is due: the oldest message in memory reaches `commit_interval`,
    /// deletions are due, rows may expire, the clock is due to be saved. None when idle: an
    /// idle gateway does not write.
    fn housekeeping_due(&self) -> Option<Instant> {
        let interval = self.config.commit_interval;
        let spill = self
            .held
            .iter()
            .find(|h| h.state != HeldState::Gone)
            .map(|h| h.arrived + interval);
        let gone = self.gone_since.map(|since| since + interval);
        let stored = self.store.rows + self.held_rows > 0;
        let expiry = stored.then_some(self.next_expiry);
        let clock = (self.store.rows > 0).then_some(self.clock_saved + CLOCK_SAVE_EVERY);
        let write = [spill, gone, clock].into_iter().flatten().min();
        // After a failed write, the next attempt waits a little: no busy loop on a full disk.
        let write = match (write, self.failed_at) {
            (Some(at), Some(failed)) => Some(at.max(failed + RETRY_AFTER)),
            (write, _) => write,
        };
        [write, expiry].into_iter().flatten().min()
    }

    /// What is due: the next burst of a paced feed, housekeeping, or both. A paced drain
    /// wakes the owner ten times a second; only the feed runs then, not a gauge update
    /// that reads the database.
    fn tick(&mut self) {
        let now = Instant::now();
        if self.pace_due().is_some_and(|due| now >= due) {
            self.feed();
        }
        if self.housekeeping_due().is_none_or(|due| now < due) {
            return;
        }
        if now >= self.next_expiry {
            self.next_expiry = now + EXPIRY_EVERY;
            self.expire();
        }
        self.flush(Spill::Due);
        self.update_gauges(true);
    }

    /// Takes new messages in, applying `queue.max_size` and `when_full`.
    fn accept(&mut self, messages: Vec<NewMessage>) {
        let counters = &self.health.counters;
        let (mut rejected, mut refused) = (0u64, 0u64);
        let mut accepted = 0u64;
        for message in messages {
            if self.storage_failing && self.held_bytes + message.size > HELD_HARD_BYTES {
                refused += 1;
                continue;
            }
            let fits = self.total_bytes() + message.size <= self.config.max_size;
            if !fits
                && (self.config.when_full == WhenFull::RejectNew
                    || message.size > self.config.max_size)
            {
                rejected += 1;
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.held_rows += 1;
            self.held_bytes += message.size;
            accepted += 1;
            self.held.push_back(Held {
                id,
                message,
                arrived: Instant::now(),
                ts: self.store.clock.now_ms(),
                state: HeldState::Waiting,
            });
        }
        add(&counters.enqueued, accepted);
        add(&counters.rejected_full, rejected);
        add(&counters.rejected_storage, refused);
        let over = self.total_bytes().saturating_sub(self.config.max_size);
        let dropped = if over > 0 { self.drop_oldest(over) } else { 0 };
        if rejected + dropped > 0 {
            if let Some(held) = self.full_log.check() {
                warn!(
                    dropped_oldest = dropped,
                    rejected_new = rejected,
                    max_size = self.config.max_size,
                    earlier_warnings_suppressed = held,
                    "outbox full: messages lost to queue.when_full"
                );
            }
        }
        if refused > 0 {
            if let Some(held) = self.storage_log.check() {
                error!(
                    refused,
                    earlier_warnings_suppressed = held,
                    "the outbox cannot write to disk and memory is full: new messages are refused"
                );
            }
        }
    }

    /// New settings apply from now on (a new `drain_rate` with the next message sent). A
    /// smaller `max_size` applies `when_full` once:
    /// `drop-oldest` drops the oldest messages until the rest fits (counted in
    /// `dropped_full`), `reject-new` keeps them and refuses new ones until below it.
    fn reconfigure(&mut self, config: QueueConfig) {
        self.config = config;
        self.feed();
        let over = self.total_bytes().saturating_sub(self.config.max_size);
        if over > 0 && self.config.when_full == WhenFull::DropOldest {
            let dropped = self.drop_oldest(over);
            warn!(dropped_oldest = dropped, max_size = self.config.max_size,
                "queue.max_size lowered below the outbox's content: oldest messages dropped (queue.when_full)");
        }
        self.update_gauges(true);
    }

    fn total_bytes(&self) -> u64 {
        self.store.bytes + self.held_bytes
    }

    /// Drops the oldest messages (disk first, then memory) until `need` bytes are freed.
    fn drop_oldest(&mut self, need: u64) -> u64 {
        let mut freed = 0;
        let mut dropped = 0;
        let mut from = i64::MIN;
        'disk: while freed < need {
            let Some(first) = self.store.first_from(from) else {
                break;
            };
            let rows = match self.store.sizes(first, SCAN_STEP) {
                Ok(rows) if !rows.is_empty() => rows,
                Ok(_) => break,
                Err(e) => {
                    self.db_error("reading the oldest rows to drop", &e);
                    break;
                }
            };
            for (id, size, _) in rows {
                from = id + 1;
                if self.store.on_disk.contains(&id) {
                    self.forget_disk(id, size);
                    freed += size;
                    dropped += 1;
                    if freed >= need {
                        break 'disk;
                    }
                }
            }
        }
        for held in self.held.iter_mut() {
            if freed >= need {
                break;
            }
            if held.state != HeldState::Gone {
                held.state = HeldState::Gone;
                self.held_rows -= 1;
                self.held_bytes -= held.message.size;
                freed += held.message.size;
                dropped += 1;
            }
        }
        self.pop_gone();
        add(&self.health.counters.dropped_full, dropped);
        dropped
    }

    /// Removes messages older than `queue.max_age` (gateway clock).
    fn expire(&mut self) {
        let now_ms = self.store.clock.now_ms();
        let Some(cutoff) = now_ms.checked_sub(self.config.max_age.as_millis() as u64) else {
            return;
        };
        if self.oldest_ts.is_none_or(|ts| ts >= cutoff) {
            return;
        }
        let mut expired = 0u64;
        let mut from = i64::MIN;
        'disk: while let Some(first) = self.store.first_from(from) {
            let rows = match self.store.sizes(first, SCAN_STEP) {
                Ok(rows) if !rows.is_empty() => rows,
                Ok(_) => break,
                Err(e) => {
                    self.db_error("reading rows to expire", &e);
                    break;
                }
            };
            for (id, size, ts) in rows {
                if ts.max(0) as u64 >= cutoff {
                    break 'disk;
                }
                from = id + 1;
                if self.store.on_disk.contains(&id) {
                    self.forget_disk(id, size);
                    expired += 1;
                }
            }
        }
        for held in self.held.iter_mut() {
            if held.ts >= cutoff {
                break;
            }
            if held.state != HeldState::Gone {
                held.state = HeldState::Gone;
                self.held_rows -= 1;
                self.held_bytes -= held.message.size;
                expired += 1;
            }
        }
        self.pop_gone();
        if expired > 0 {
            add(&self.health.counters.expired, expired);
            warn!(expired, max_age = ?self.config.max_age, "outbox messages expired (queue.max_age)");
        }
    }

    /// The message is no longer ours to keep (delivered or dead-lettered).
    fn forget(&mut self, id: i64, size: u64) {
        match self.held.front().map(|h| h.id) {
            Some(front) if id >= front => {
                let Some(held) = self.held.get_mut((id - front) as usize) else {
                    return;
                };
                if held.state != HeldState::Gone {
                    held.state = HeldState::Gone;
                    self.held_rows -= 1;
                    self.held_bytes -= held.message.size;
                }
                self.pop_gone();
            }
            _ if self.store.on_disk.contains(&id) => self.forget_disk(id, size),
            // Dropped or expired while it was in flight, or delivered before: nothing to do.
            _ => {}
        }
    }

    /// Messages at the front of memory that need nothing more are let go.
    fn pop_gone(&mut self) {
        while self
            .held
            .front()
            .is_some_and(|h| h.state == HeldState::Gone)
        {
            self.held.pop_front();
        }
    }

    fn forget_disk(&mut self, id: i64, size: u64) {
        self.store.on_disk.remove(id..=id);
        self.store.rows -= 1;
        self.store.bytes = self.store.bytes.saturating_sub(size);
        self.gone.insert(id..=id);
        self.gone_since.get_or_insert_with(Instant::now);
    }

    /// Dead letters back into the queue. Memory is written first, so that the replayed
    /// messages, newest of all, keep every id on disk below every id in memory.
    fn replay(&mut self, which: &dead_letters::Selection) -> Result<usize, String> {
        self.flush(Spill::All);
        if !self.held.is_empty() {
            return Err("the outbox cannot write to disk right now".into());
        }
        match self.store.replay(which, self.next_id) {
            Ok(replayed) => {
                self.next_id += replayed.len() as i64;
                add(&self.health.counters.enqueued, replayed.len() as u64);
                info!(
                    messages = replayed.len(),
                    "dead letters put back in the queue"
                );
                Ok(replayed.len())
            }
            Err(e) => {
                self.db_error("replaying dead letters", &e);
                Err(e.to_string())
            }
        }
    }

    /// A message still in the outbox, by id.
    fn lookup(&mut self, id: i64) -> Option<Row> {
        match self.held.front().map(|h| h.id) {
            Some(front) if id >= front => self
                .held
                .get((id - front) as usize)
                .filter(|h| h.state != HeldState::Gone)
                .map(row_of),
            _ if self.store.on_disk.contains(&id) => match self.store.read(id, 1) {
                Ok(rows) => rows.into_iter().find(|r| r.id == id),
                Err(e) => {
                    self.db_error("reading a row to dead-letter", &e);
                    None
                }
            },
            _ => None,
        }
    }

    /// Sends the uplink what it has credit for.
    fn feed(&mut self) {
        self.paced = false;
        let Some(feed) = self.feed.take() else {
            return;
        };
        if feed.tx.is_closed() {
            return;
        }
        let mut feed = feed;
        let allowed = match self.config.drain_rate {
            Some(rate) => self.pacer.allowed(rate, Instant::now()),
            None => usize::MAX,
        };
        let limit = feed.rows.min(allowed);
        // Stopped by the drain rate, not by credit: the owner comes back when it allows more.
        self.paced = allowed == 0 && feed.rows > 0;
        if limit > 0 && feed.bytes > 0 {
            let rows = self.issue(limit, feed.bytes);
            self.pacer.took(rows.len());
            self.paced = rows.len() == limit && limit < feed.rows;
            if !rows.is_empty() {
                feed.rows -= rows.len();
                let bytes: usize = rows.iter().map(|r| r.topic.len() + r.payload.len()).sum();
                feed.bytes = feed.bytes.saturating_sub(bytes);
                if feed.tx.send(rows).is_err() {
                    // The uplink's connection ended meanwhile; the next session starts over.
                    return;
                }
            }
        }
        self.feed = Some(feed);
    }

    /// The next messages for the uplink's session: live-first rules' messages in memory,
    /// then everything in order, disk first.
    fn issue(&mut self, limit: usize, max_bytes: usize) -> Vec<Row> {
        let session = self.cursor.session;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let full = |out: &Vec<Row>, bytes: usize| out.len() >= limit || bytes >= max_bytes;
        let backlog = self
            .store
            .last()
            .is_some_and(|last| last >= self.cursor.next);
        if backlog {
            while !full(&out, bytes) {
                let Some(id) = self.cursor.live.pop_first() else {
                    break;
                };
                if !self.store.on_disk.contains(&id) {
                    continue;
                }
                match self.store.read(id, 1) {
                    Ok(rows) => {
                        if let Some(row) = rows.into_iter().find(|r| r.id == id) {
                            if id >= self.cursor.next {
                                self.cursor.ahead.insert(id);
                            }
                            bytes += row.topic.len() + row.payload.len();
                            out.push(row);
                        }
                    }
                    Err(e) => {
                        self.db_error("reading a live message to send", &e);
                        break;
                    }
                }
            }
            for held in self.held.iter_mut() {
                if full(&out, bytes) {
                    break;
                }
                if held.message.lane == Lane::LiveFirst && issuable(held.state, session) {
                    held.state = HeldState::Issued(session);
                    bytes += held.message.topic.len() + held.message.payload.len();
                    out.push(row_of(held));
                }
            }
        }
        while !full(&out, bytes) {
            if let Some(first) = self.store.first_from(self.cursor.next) {
                let rows = match self.store.read(first, limit - out.len()) {
                    Ok(rows) => rows,
                    Err(e) => {
                        self.db_error("reading rows to send", &e);
                        break;
                    }
                };
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    if full(&out, bytes) {
                        break;
                    }
                    self.cursor.next = row.id + 1;
                    if self.cursor.ahead.remove(&row.id) || !self.store.on_disk.contains(&row.id) {
                        continue;
                    }
                    bytes += row.topic.len() + row.payload.len();
                    out.push(row);
                }
                continue;
            }
            let Some(front) = self.held.front().map(|h| h.id) else {
                break;
            };
            self.cursor.next = self.cursor.next.max(front);
            let start = (self.cursor.next - front) as usize;
            for held in self.held.iter_mut().skip(start) {
                if full(&out, bytes) {
                    break;
                }
                self.cursor.next = held.id + 1;
                if issuable(held.state, session) {
                    held.state = HeldState::Issued(session);
                    bytes += held.message.topic.len() + held.message.payload.len();
                    out.push(row_of(held));
                }
            }
            break;
        }
        out
    }

    /// Writes what is due: the messages in memory once one of them was held longer than
    /// `commit_interval` (or memory is over its bound, or at shutdown), deletions, dead
    /// letters and the clock.
    fn flush(&mut self, spill: Spill) {
        let now = Instant::now();
        // Group commit: once the oldest message in memory is due (or memory is over its
        // bound, or at shutdown), everything held goes, so an outage writes one batch per
        // commit_interval rather than one commit per message.
        let due = self
            .held
            .iter()
            .find(|h| h.state != HeldState::Gone)
            .is_some_and(|h| {
                now.checked_sub(self.config.commit_interval)
                    .is_some_and(|cutoff| h.arrived <= cutoff)
            });
        let count = match spill {
            Spill::Due if !due => 0,
            _ => self.held.len(),
        };
        let gone_due = self.gone_since.is_some_and(|since| {
            matches!(spill, Spill::All) || now >= since + self.config.commit_interval
        });
        let clock_due = self.store.rows > 0 && now >= self.clock_saved + CLOCK_SAVE_EVERY
            || matches!(spill, Spill::All) && self.store.rows + self.held_rows > 0;
        if count == 0 && !gone_due && self.dead.is_empty() && !clock_due {
            return;
        }
        let clock_ms = self.store.clock.now_ms();
        let flush = Flush {
            spill: self
                .held
                .iter()
                .take(count)
                .filter(|h| h.state != HeldState::Gone)
                .collect(),
            delete: if gone_due || count > 0 {
                self.gone.iter().cloned().collect()
            } else {
                Vec::new()
            },
            dead: self
                .dead
                .iter()
                .map(|(row, reason)| (row, clock_ms, reason.as_str()))
                .collect(),
            // A spill saves the clock anyway: its rows carry it, and opening takes the
            // newest row's time.
            clock_ms: clock_due.then_some(clock_ms),
        };
        let (spilled, deleted) = (flush.spill.len() as u64, !flush.delete.is_empty());
        let result = self.store.write(&flush, self.config.dead_letter_max_size);
        drop(flush);
        match result {
            Ok(dead_dropped) => {
                if dead_dropped > 0 {
                    add(&self.health.counters.dead_letters_dropped, dead_dropped);
                    warn!(
                        dropped = dead_dropped,
                        max = self.config.dead_letter_max_size,
                        "oldest dead letters deleted (queue.dead_letter_max_size)"
                    );
                }
                if self.storage_failing {
                    info!("the outbox writes to disk again");
                    self.storage_failing = false;
                }
                self.failed_at = None;
                self.settle_spill(count, spilled);
                if deleted {
                    self.gone.clear();
                    self.gone_since = None;
                }
                add(&self.health.counters.dead_lettered, self.dead.len() as u64);
                self.dead.clear();
                if clock_due || spilled > 0 {
                    self.clock_saved = now;
                }
                debug!(spilled, deleted, "outbox flush");
            }
            Err(e) => {
                self.storage_failing = true;
                self.failed_at = Some(now);
                self.db_error("writing to disk", &e);
            }
        }
    }

    /// After a successful write, the first `count` held messages are on disk (or were gone).
    fn settle_spill(&mut self, count: usize, spilled: u64) {
        let mut run: Option<RangeInclusive<i64>> = None;
        let linked = self.feed.as_ref().is_some_and(|f| !f.tx.is_closed());
        for held in self.held.drain(..count) {
            if held.state == HeldState::Gone {
                continue;
            }
            self.held_rows -= 1;
            self.held_bytes -= held.message.size;
            self.store.rows += 1;
            self.store.bytes += held.message.size;
            // Handed out early (live-first) in this session: the ordered walk must skip it.
            // Not handed out yet but live-first: it stays ahead of the backlog.
            let issued = held.state == HeldState::Issued(self.cursor.session);
            if issued && held.id >= self.cursor.next {
                self.cursor.ahead.insert(held.id);
            } else if linked
                && !issued
                && held.message.lane == Lane::LiveFirst
                && held.id >= self.cursor.next
                && self.cursor.live.len() < LIVE_TRACKED
            {
                self.cursor.live.insert(held.id);
            }
            run = match run {
                Some(r) if *r.end() + 1 == held.id => Some(*r.start()..=held.id),
                Some(r) => {
                    self.store.on_disk.insert(r);
                    Some(held.id..=held.id)
                }
                None => Some(held.id..=held.id),
            };
        }
        if let Some(r) = run {
            self.store.on_disk.insert(r);
        }
        add(&self.health.counters.persisted, spilled);
    }

    /// At shutdown: everything the cloud has not acknowledged goes to disk.
    fn close(&mut self) {
        self.flush(Spill::All);
        if self.held_rows > 0 {
            add(&self.health.counters.outbox_lost, self.held_rows);
            error!(
                lost = self.held_rows,
                "the outbox could not write its last messages to disk; they are lost"
            );
        }
        self.update_gauges(true);
        info!(
            rows = self.store.rows,
            bytes = self.store.bytes,
            "outbox closed"
        );
    }

    fn db_error(&mut self, what: &str, e: &rusqlite::Error) {
        inc(&self.health.counters.outbox_errors);
        if let Some(held) = self.db_log.check() {
            error!(error = %e, earlier_errors_suppressed = held, "outbox database error while {what}");
        }
    }

    /// Publishes rows, bytes and (when `oldest` is set, as it costs a read) the age of the
    /// oldest message.
    fn update_gauges(&mut self, oldest: bool) {
        let held_oldest = self
            .held
            .iter()
            .find(|h| h.state != HeldState::Gone)
            .map(|h| h.ts);
        self.oldest_ts = if self.store.rows == 0 {
            held_oldest
        } else if oldest || self.oldest_ts.is_none() {
            match self.store.oldest_ts() {
                Ok(ts) => ts.map(|ts| ts.max(0) as u64),
                Err(e) => {
                    self.db_error("reading the oldest row", &e);
                    held_oldest
                }
            }
        } else {
            self.oldest_ts
        };
        let queue = &self.health.queue;
        queue
            .rows
            .store(self.store.rows + self.held_rows, Ordering::Relaxed);
        queue.bytes.store(self.total_bytes(), Ordering::Relaxed);
        queue.disk_rows.store(self.store.rows, Ordering::Relaxed);
        queue
            .now_ts
            .store(self.store.clock.now_ms(), Ordering::Relaxed);
        queue
            .oldest_ts
            .store(self.oldest_ts.unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Spill {
    /// Whatever is due.
    Due,
    /// Memory is over its bound: every message in memory.
    OverBound,
    /// Shutdown: everything, deletions and the clock included.
    All,
}

fn issuable(state: HeldState, session: u64) -> bool {
    match state {
        HeldState::Waiting => true,
        HeldState::Issued(s) => s != session,
        HeldState::Gone => false,
    }
}

fn row_of(held: &Held) -> Row {
    Row {
        id: held.id,
        topic: held.message.topic.clone(),
        payload: held.message.payload.clone(),
        qos: held.message.qos,
        size: held.message.size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use std::sync::Arc;

    fn config(commit_interval_ms: u64) -> QueueConfig {
        QueueConfig {
            max_size: 1 << 30,
            when_full: WhenFull::DropOldest,
            max_age: Duration::from_secs(3600),
            commit_interval: Duration::from_millis(commit_interval_ms),
            commit_batch: 1000,
            fsync: false,
            dead_letter_max_size: 1 << 20,
            drain_rate: None,
        }
    }

    fn messages(from: usize, n: usize, lane: Lane) -> Vec<NewMessage> {
        (from..from + n)
            .map(|i| NewMessage {
                topic: format!(
                    "t/{}",
                    if lane == Lane::LiveFirst {
                        "live"
                    } else {
                        "load"
                    }
                ),
                payload: Bytes::from(format!("{i:04}")),
                qos: 1,
                size: 10,
                lane,
            })
            .collect()
    }

    struct Opened {
        outbox: OutboxHandle,
        owner: tokio::task::JoinHandle<()>,
        health: SharedHealth,
    }

    fn open_in(dir: &Path, config: &QueueConfig) -> Opened {
        let health = Arc::new(Health::default());
        let (outbox, owner) = open(config, dir, health.clone()).expect("opening the outbox");
        let owner = tokio::spawn(owner.run());
        Opened {
            outbox,
            owner,
            health,
        }
    }

    impl Opened {
        async fn close(self) -> SharedHealth {
            self.outbox.shutdown().await.expect("shutdown");
            self.owner.await.expect("owner task");
            self.health
        }
    }

    /// Receives until `n` rows came (or panics after 5 s).
    async fn take(feed: &mut mpsc::UnboundedReceiver<Vec<Row>>, n: usize) -> Vec<Row> {
        let mut rows = Vec::new();
        while rows.len() < n {
            let batch = tokio::time::timeout(Duration::from_secs(5), feed.recv())
                .await
                .expect("rows within 5 s")
                .expect("feed open");
            rows.extend(batch);
        }
        rows
    }

    fn payloads(rows: &[Row]) -> Vec<String> {
        rows.iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("{i:04}")).collect()
    }

    fn delivered(rows: &[Row]) -> Vec<Delivered> {
        rows.iter()
            .map(|r| Delivered {
                id: r.id,
                size: r.size,
            })
            .collect()
    }

    #[tokio::test]
    async fn disk_then_memory_in_arrival_order_and_a_new_session_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let o = open_in(dir.path(), &config(5));
        o.outbox.push(messages(0, 10, Lane::Strict)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(o.health.queue.disk_rows.load(Ordering::Relaxed), 10);
        o.outbox.push(messages(10, 10, Lane::Strict)).await.unwrap();

        let mut feed = o.outbox.subscribe(1, 100, 1 << 20).await.unwrap();
        let rows = take(&mut feed, 20).await;
        assert_eq!(payloads(&rows), numbered(0..20));
        o.outbox.delivered(delivered(&rows[..5])).await.unwrap();

        let mut feed = o.outbox.subscribe(2, 100, 1 << 20).await.unwrap();
        assert_eq!(payloads(&take(&mut feed, 15).await), numbered(5..20));
        let health = o.close().await;
        assert_eq!(health.queue.rows.load(Ordering::Relaxed), 15);
    }

    /// `queue.drain_rate`: a backlog of 600 goes out at 400 a second, in order, in bursts of
    /// a tenth of a second's worth; a reload to no limit sends the rest at once.
    #[tokio::test]
    async fn drain_rate_paces_the_backlog_and_a_reload_lifts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut paced = config(5);
        paced.drain_rate = Some(400);
        let o = open_in(dir.path(), &paced);
        o.outbox.push(messages(0, 600, Lane::Strict)).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut feed = o.outbox.subscribe(1, 10_000, 1 << 20).await.unwrap();
        let mut rows = Vec::new();
        let mut largest = 0;
        while rows.len() < 400 {
            let batch = tokio::time::timeout(Duration::from_secs(5), feed.recv())
                .await
                .expect("rows within 5 s")
                .expect("feed open");
            largest = largest.max(batch.len());
            rows.extend(batch);
        }
        let took = started.elapsed();
        // 400 at 400/s, the first burst of 40 at once: at least 0.85 s.
        assert!(took >= Duration::from_millis(850), "400 rows in {took:?}");
        assert!(took < Duration::from_secs(3), "400 rows in {took:?}");
        assert!(
            largest <= 40,
            "a burst of {largest} rows (a tenth of a second is 40)"
        );
        o.outbox.reconfigure(config(5)).await.unwrap();
        rows.extend(take(&mut feed, 600 - rows.len()).await);
        assert!(started.elapsed() < took + Duration::from_millis(300));
        assert_eq!(payloads(&rows), numbered(0..600));
        o.close().await;
    }

    #[tokio::test]
    async fn what_the_cloud_has_within_commit_interval_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let o = open_in(dir.path(), &config(1000));
        let mut feed = o.outbox.subscribe(1, 1000, 1 << 20).await.unwrap();
        for round in 0..5 {
            o.outbox
                .push(messages(round * 20, 20, Lane::Strict))
                .await
                .unwrap();
            let rows = take(&mut feed, 20).await;
            o.outbox.delivered(delivered(&rows)).await.unwrap();
        }
        let health = o.close().await;
        let counters = health.counters.snapshot();
        assert_eq!((counters.enqueued, counters.persisted), (100, 0));
        let reopened = open_in(dir.path(), &config(1000));
        assert_eq!(reopened.health.queue.rows.load(Ordering::Relaxed), 0);
        reopened.close().await;
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held_and_the_next_run_resends_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let o = open_in(dir.path(), &config(1000));
        o.outbox.push(messages(0, 30, Lane::Strict)).await.unwrap();
        let mut feed = o.outbox.subscribe(1, 1000, 1 << 20).await.unwrap();
        let rows = take(&mut feed, 30).await;
        o.outbox.delivered(delivered(&rows[..10])).await.unwrap();
        let health = o.close().await;
        assert_eq!(health.counters.snapshot().persisted, 20);

        let o = open_in(dir.path(), &config(1000));
        let mut feed = o.outbox.subscribe(1, 1000, 1 << 20).await.unwrap();
        assert_eq!(payloads(&take(&mut feed, 20).await), numbered(10..30));
        o.close().await;
    }

    #[tokio::test]
    async fn drop_oldest_counts_memory_and_disk_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(5);
        config.max_size = 100;
        let o = open_in(dir.path(), &config);
        o.outbox.push(messages(0, 6, Lane::Strict)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        o.outbox.push(messages(6, 8, Lane::Strict)).await.unwrap();
        let mut feed = o.outbox.subscribe(1, 1000, 1 << 20).await.unwrap();
        assert_eq!(payloads(&take(&mut feed, 10).await), numbered(4..14));
        let health = o.close().await;
        assert_eq!(health.counters.snapshot().dropped_full, 4);
        assert_eq!(health.queue.bytes.load(Ordering::Relaxed), 100);
    }

    #[tokio::test]
    async fn live_first_messages_overtake_the_backlog_which_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let o = open_in(dir.path(), &config(5));
        o.outbox.push(messages(0, 50, Lane::Strict)).await.unwrap();
        o.outbox
            .push(messages(50, 5, Lane::LiveFirst))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The link is back: a session with room for 10 at a time.
        let mut feed = o.outbox.subscribe(1, 10, 1 << 20).await.unwrap();
        let first = take(&mut feed, 10).await;
        o.outbox
            .push(messages(100, 3, Lane::LiveFirst))
            .await
            .unwrap();
        o.outbox.push(messages(200, 2, Lane::Strict)).await.unwrap();
        o.outbox.credit(1, 10, 1000).await.unwrap();
        let second = take(&mut feed, 10).await;
        assert_eq!(payloads(&first), numbered(0..10));
        // The new live-first messages first, then the backlog where it was.
        assert_eq!(
            payloads(&second),
            [numbered(100..103), numbered(10..17)].concat()
        );
        o.outbox.credit(1, 100, 10_000).await.unwrap();
        let rest = take(&mut feed, 40).await;
        assert_eq!(
            payloads(&rest),
            [numbered(17..55), numbered(200..202)].concat()
        );
        o.close().await;
    }

    #[tokio::test]
    async fn dead_letters_are_listed_bounded_replayed_and_purged() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(1000);
        config.dead_letter_max_size = 30;
        let o = open_in(dir.path(), &config);
        o.outbox.push(messages(0, 5, Lane::Strict)).await.unwrap();
        let mut feed = o.outbox.subscribe(1, 100, 1 << 20).await.unwrap();
        let rows = take(&mut feed, 5).await;
        for row in &rows[..4] {
            o.outbox
                .dead_letter(row.id, "refused".into())
                .await
                .unwrap();
        }
        o.outbox.delivered(delivered(&rows[4..])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let db = dir.path().join("outbox.db");
        // 4 letters of 10 bytes, 30 kept: the oldest went.
        let listed = dead_letters::list(&db).unwrap();
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().all(|d| d.reason == "refused" && d.bytes == 4));
        assert_eq!(o.health.counters.snapshot().dead_letters_dropped, 1);

        let first = dead_letters::Selection::Ids(vec![listed[0].id]);
        assert_eq!(o.outbox.replay(first).await, Ok(1));
        assert_eq!(payloads(&take(&mut feed, 1).await), numbered(1..2));
        assert_eq!(
            dead_letters::purge(&db, &dead_letters::Selection::All).unwrap(),
            2
        );
        assert!(dead_letters::list(&db).unwrap().is_empty());
        o.close().await;
    }

    #[tokio::test]
    async fn dead_letters_replayed_while_stopped_are_sent_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let o = open_in(dir.path(), &config(1000));
        o.outbox.push(messages(0, 3, Lane::Strict)).await.unwrap();
        let mut feed = o.outbox.subscribe(1, 100, 1 << 20).await.unwrap();
        let rows = take(&mut feed, 3).await;
        o.outbox
            .dead_letter(rows[1].id, "refused".into())
            .await
            .unwrap();
        o.close().await;
        let db = dir.path().join("outbox.db");
        assert_eq!(
            dead_letters::replay_offline(&db, &dead_letters::Selection::All).unwrap(),
            1
        );
        let o = open_in(dir.path(), &config(1000));
        let mut feed = o.outbox.subscribe(1, 100, 1 << 20).await.unwrap();
        let rows = take(&mut feed, 3).await;
        assert_eq!(payloads(&rows), ["0000", "0002", "0001"]);
        o.close().await;
    }
}
