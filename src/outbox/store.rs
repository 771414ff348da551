//! The outbox's SQLite file: the rows that had to be written (the cloud did not acknowledge
//! them within `queue.commit_interval`), the dead letters, and the gateway clock.
//!
//! Tuned for flash: WAL, one transaction per flush, acknowledged rows deleted by id range,
//! a WAL that is checkpointed in large steps and truncated back to a small size afterwards.

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use rangemap::RangeInclusiveSet;
use rusqlite::{params, Connection, OptionalExtension};

use super::{Held, Row};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY,
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

/// Page size of a new database file. Small pages for small rows: an outage at 100 msg/s
/// of 64-byte messages (WAL appends plus checkpoints, `/proc/PID/io` write_bytes) costs
/// 352 bytes per message with 1 KiB pages, 363 with 2 KiB and 488 with 4 KiB, because each
/// commit rewrites the partly filled last page of the table.
const PAGE_SIZE: u32 = 1024;
/// WAL pages between checkpoints (1 MiB at 1 KiB pages). A checkpoint copies each changed
/// page to the database file once, however often the WAL rewrote it; 256 pages measured 393
/// bytes per message in the same outage.
const WAL_AUTOCHECKPOINT: u32 = 1024;
/// After a checkpoint the WAL file is truncated to this, so that a burst written in large
/// transactions does not leave a large file behind; below it the WAL is reused in place.
const JOURNAL_SIZE_LIMIT: u64 = 4 << 20;

/// Runs SQLite work from the outbox's owner task: on the multi-threaded runtime the worker
/// hands its other tasks to another thread for the duration (`block_in_place`), so a slow
/// SD card never stalls the front door; elsewhere (tests, the command line) it just runs.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Whether an error opening the file means the file itself is damaged (not a database,
/// corrupt), rather than a problem of the directory or the system.
pub fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// Renames the database and its WAL files to `<name>.damaged-<unix seconds>[-wal|-shm]`;
/// returns the new name of the database file.
pub fn move_aside(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("outbox.db");
    let aside = path.with_file_name(format!("{name}.damaged-{stamp}"));
    for suffix in ["-wal", "-shm"] {
        let from = path.with_file_name(format!("{name}{suffix}"));
        if from.exists() {
            std::fs::rename(
                &from,
                path.with_file_name(format!("{name}.damaged-{stamp}{suffix}")),
            )?;
        }
    }
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// The gateway clock: milliseconds of gateway running time, persisted across restarts.
pub struct Clock {
    base_ms: u64,
    start: Instant,
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }
}

/// One flush: everything the owner wants written, in one transaction.
#[derive(Default)]
pub struct Flush<'a> {
    /// Messages to write, oldest first, with ids above every id on disk.
    pub spill: Vec<&'a Held>,
    /// Rows to delete (acknowledged, dropped, expired, dead-lettered).
    pub delete: Vec<RangeInclusive<i64>>,
    pub dead: Vec<(&'a Row, u64, &'a str)>,
    /// Save the gateway clock.
    pub clock_ms: Option<u64>,
}

pub struct Store {
    conn: Connection,
    pub clock: Clock,
    /// Ids of the rows on disk that are still wanted (not waiting for deletion).
    pub on_disk: RangeInclusiveSet<i64>,
    /// Rows and bytes (topic plus payload) of `on_disk`.
    pub rows: u64,
    pub bytes: u64,
    /// The highest id in the file when it was opened.
    pub max_id: i64,
}

impl Store {
    pub fn open(path: &Path, fsync: bool) -> rusqlite::Result<Store> {
        let conn = Connection::open(path)?;
        // Takes effect only for a new file (before its first table); harmless otherwise.
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT)?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
        conn.execute_batch(SCHEMA)?;
        let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(format!("quick_check: {check}")),
            ));
        }
        let clock_ms: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'clock_ms'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let newest_ts: Option<i64> =
            conn.query_row("SELECT MAX(ts) FROM messages", [], |r| r.get(0))?;
        let base_ms = clock_ms.unwrap_or(0).max(newest_ts.unwrap_or(0)).max(0) as u64;
        let mut on_disk = RangeInclusiveSet::new();
        let (mut rows, mut bytes, mut max_id) = (0u64, 0u64, 0i64);
        {
            let mut stmt = conn.prepare("SELECT id, size FROM messages ORDER BY id")?;
            let mut run: Option<RangeInclusive<i64>> = None;
            let mut all = stmt.query([])?;
            while let Some(row) = all.next()? {
                let (id, size): (i64, i64) = (row.get(0)?, row.get(1)?);
                rows += 1;
                bytes += size.max(0) as u64;
                max_id = id;
                run = match run {
                    Some(r) if *r.end() + 1 == id => Some(*r.start()..=id),
                    Some(r) => {
                        on_disk.insert(r);
                        Some(id..=id)
                    }
                    None => Some(id..=id),
                };
            }
            if let Some(r) = run {
                on_disk.insert(r);
            }
        }
        Ok(Store {
            conn,
            clock: Clock {
                base_ms,
                start: Instant::now(),
            },
            on_disk,
            rows,
            bytes,
            max_id,
        })
    }

    /// The first wanted row with id >= `from`.
    pub fn first_from(&self, from: i64) -> Option<i64> {
        self.on_disk
            .overlapping(from..=i64::MAX)
            .next()
            .map(|r| (*r.start()).max(from))
    }

    pub fn last(&self) -> Option<i64> {
        self.on_disk.last().map(|r| *r.end())
    }

    /// Up to `limit` rows with id >= `from`, oldest first (rows waiting for deletion
    /// included: the caller skips what `on_disk` does not hold).
    pub fn read(&self, from: i64, limit: usize) -> rusqlite::Result<Vec<Row>> {
        blocking(|| {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, topic, payload, qos, size FROM messages WHERE id >= ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![from, limit as i64], |r| {
                Ok(Row {
                    id: r.get(0)?,
                    topic: r.get(1)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    qos: r.get(3)?,
                    size: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// (id, size, ts) of up to `limit` rows with id >= `from`, oldest first.
    pub fn sizes(&self, from: i64, limit: usize) -> rusqlite::Result<Vec<(i64, u64, i64)>> {
        blocking(|| {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, size, ts FROM messages WHERE id >= ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![from, limit as i64], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    /// Gateway-clock ms of the oldest wanted row.
    pub fn oldest_ts(&self) -> rusqlite::Result<Option<i64>> {
        let Some(first) = self.on_disk.first().map(|r| *r.start()) else {
            return Ok(None);
        };
        blocking(|| {
            self.conn
                .prepare_cached("SELECT ts FROM messages WHERE id = ?1")?
                .query_row([first], |r| r.get(0))
                .optional()
        })
    }

    /// Moves the selected dead letters back into the queue with ids from `first_id` on;
    /// returns (id, size) of each, in order.
    pub fn replay(
        &mut self,
        which: &super::dead_letters::Selection,
        first_id: i64,
    ) -> rusqlite::Result<Vec<(i64, u64)>> {
        blocking(|| {
            let ts = self.clock.now_ms() as i64;
            let tx = self.conn.transaction()?;
            let letters = super::dead_letters::take(&tx, which)?;
            let mut out = Vec::with_capacity(letters.len());
            for (offset, (dead_id, row)) in letters.iter().enumerate() {
                let id = first_id + offset as i64;
                tx.prepare_cached(
                    "INSERT INTO messages (id, topic, payload, qos, size, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![id, row.topic, &row.payload[..], row.qos, row.size as i64, ts])?;
                tx.prepare_cached("DELETE FROM dead_letter WHERE id = ?1")?
                    .execute([dead_id])?;
                out.push((id, row.size));
            }
            tx.commit()?;
            for (id, size) in &out {
                self.on_disk.insert(*id..=*id);
                self.rows += 1;
                self.bytes += size;
            }
            Ok(out)
        })
    }

    /// Writes one flush in one transaction, keeping the dead-letter table within
    /// `dead_max` bytes (oldest dropped first); returns how many dead letters were dropped.
    /// On error nothing was written.
    pub fn write(&mut self, flush: &Flush<'_>, dead_max: u64) -> rusqlite::Result<u64> {
        blocking(|| {
            let mut dropped = 0;
            let tx = self.conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO messages (id, topic, payload, qos, size, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for held in &flush.spill {
                    let m = &held.message;
                    insert.execute(params![
                        held.id,
                        m.topic,
                        &m.payload[..],
                        m.qos,
                        m.size as i64,
                        held.ts as i64
                    ])?;
                }
                let mut delete =
                    tx.prepare_cached("DELETE FROM messages WHERE id BETWEEN ?1 AND ?2")?;
                for range in &flush.delete {
                    delete.execute(params![range.start(), range.end()])?;
                }
                let mut dead = tx.prepare_cached(
                    "INSERT INTO dead_letter (topic, payload, qos, ts, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (row, ts, reason) in &flush.dead {
                    dead.execute(params![
                        row.topic,
                        &row.payload[..],
                        row.qos,
                        *ts as i64,
                        reason
                    ])?;
                }
                // Counted in the transaction: an operator may have purged some meanwhile.
                let mut dead_bytes = if flush.dead.is_empty() {
                    0
                } else {
                    tx.query_row(
                        "SELECT COALESCE(SUM(length(topic) + length(payload)), 0) FROM dead_letter",
                        [],
                        |r| r.get::<_, i64>(0),
                    )?
                    .max(0) as u64
                };
                if dead_bytes > dead_max {
                    let mut oldest = tx.prepare_cached(
                        "SELECT id, length(topic) + length(payload) FROM dead_letter ORDER BY id",
                    )?;
                    let mut upto = None;
                    let mut rows = oldest.query([])?;
                    while dead_bytes > dead_max {
                        let Some(row) = rows.next()? else { break };
                        upto = Some(row.get::<_, i64>(0)?);
                        dead_bytes -= (row.get::<_, i64>(1)?.max(0) as u64).min(dead_bytes);
                        dropped += 1;
                    }
                    drop(rows);
                    if let Some(upto) = upto {
                        tx.prepare_cached("DELETE FROM dead_letter WHERE id <= ?1")?
                            .execute([upto])?;
                    }
                }
                if let Some(clock_ms) = flush.clock_ms {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('clock_ms', ?1)",
                    )?
                    .execute(params![clock_ms as i64])?;
                }
            }
            tx.commit()?;
            Ok(dropped)
        })
    }
}
