//! The dead-letter table as an operator sees it: `bridgehead dead-letters list|purge|replay`.
//!
//! Listing reads the database beside a running gateway (WAL readers never block it).
//! Purging deletes rows the gateway no longer looks at, so it is safe at any time.
//! Replaying puts messages back in the queue: while the gateway runs that is done by its
//! outbox owner (through the live status socket); with the gateway stopped, here.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

/// One dead letter, without its payload.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub topic: String,
    pub bytes: usize,
    pub qos: u8,
    pub reason: String,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Ids(Vec<i64>),
}

impl Selection {
    fn contains(&self, id: i64) -> bool {
        match self {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&id),
        }
    }
}

pub fn list(path: &Path) -> rusqlite::Result<Vec<DeadLetter>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn
        .prepare("SELECT id, topic, length(payload), qos, reason FROM dead_letter ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok(DeadLetter {
            id: r.get(0)?,
            topic: r.get(1)?,
            bytes: r.get::<_, i64>(2)?.max(0) as usize,
            qos: r.get(3)?,
            reason: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Deletes the selected dead letters; returns how many went.
pub fn purge(path: &Path, which: &Selection) -> rusqlite::Result<usize> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let tx = conn.transaction()?;
    let mut purged = 0;
    match which {
        Selection::All => purged += tx.execute("DELETE FROM dead_letter", [])?,
        Selection::Ids(ids) => {
            for id in ids {
                purged += tx.execute("DELETE FROM dead_letter WHERE id = ?1", [id])?;
            }
        }
    }
    tx.commit()?;
    Ok(purged)
}

/// The selected dead letters, payloads included, oldest first.
pub(super) fn take(
    conn: &Connection,
    which: &Selection,
) -> rusqlite::Result<Vec<(i64, super::Row)>> {
    let mut stmt = conn.prepare("SELECT id, topic, payload, qos FROM dead_letter ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        let id: i64 = r.get(0)?;
        let topic: String = r.get(1)?;
        let payload: Vec<u8> = r.get(2)?;
        Ok((
            id,
            super::Row {
                id: 0,
                size: (topic.len() + payload.len()) as u64,
                topic,
                payload: payload.into(),
                qos: r.get(3)?,
            },
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let row = row?;
        if which.contains(row.0) {
            out.push(row);
        }
    }
    Ok(out)
}

/// With the gateway stopped: moves the selected dead letters back into the queue, after
/// everything already in it; returns how many.
pub fn replay_offline(path: &Path, which: &Selection) -> rusqlite::Result<usize> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let tx = conn.transaction()?;
    let letters = take(&tx, which)?;
    let clock: i64 = tx.query_row(
        "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key = 'clock_ms'), 0), COALESCE((SELECT MAX(ts) FROM messages), 0))",
        [],
        |r| r.get(0),
    )?;
    for (id, row) in &letters {
        tx.execute(
            "INSERT INTO messages (topic, payload, qos, size, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![row.topic, &row.payload[..], row.qos, row.size as i64, clock],
        )?;
        tx.execute("DELETE FROM dead_letter WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(letters.len())
}
