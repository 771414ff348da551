//! `state.db`: retained messages, persistent sessions (subscriptions, will, QoS 2 packet
//! ids awaiting PUBREL) and the messages queued or in flight for them. Only the writer
//! thread touches it, in batches. Times are on the state's own clock (milliseconds of
//! gateway running time, carried across restarts in `meta`), so an expiry counts the time
//! the gateway ran, never a jump of the wall clock.
//!
//! The first versions' file (four tables without the MQTT 5 columns) is upgraded in place.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tracing::error;

pub struct Store {
    db: Connection,
    pub clock: Clock,
    /// When the clock was last written (with every commit).
    pub saved_at: Instant,
}

/// The state clock: milliseconds of gateway running time, persisted across restarts.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    start: Instant,
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }

    /// `at` as a clock reading.
    pub fn at(&self, at: Instant) -> u64 {
        let now = Instant::now();
        match at.checked_duration_since(now) {
            Some(ahead) => self.now_ms() + ahead.as_millis() as u64,
            None => self
                .now_ms()
                .saturating_sub(now.duration_since(at).as_millis() as u64),
        }
    }

    /// A clock reading as an instant of this run (earlier readings: now).
    pub fn instant(&self, ms: u64) -> Instant {
        let now = self.now_ms();
        Instant::now() + std::time::Duration::from_millis(ms.saturating_sub(now))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRetained {
    pub topic: String,
    pub qos: u8,
    pub payload: Bytes,
    pub props: Bytes,
    /// State-clock ms of its expiry.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoredWillRow {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: Bytes,
    pub delay: u32,
    pub expiry: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoredSession {
    pub client_id: String,
    /// Protocol level of its last connection (3, 4 or 5).
    pub level: u8,
    /// Session Expiry Interval, seconds (u32::MAX: never).
    pub expiry: u32,
    /// State-clock ms of when it went offline (None: it was online).
    pub offline_at: Option<u64>,
    pub will: Option<StoredWillRow>,
    /// State-clock ms of when its will is due.
    pub will_at: Option<u64>,
    pub incoming_qos2: Vec<u16>,
    /// Filter as written, subscription options byte, subscription identifier.
    pub filters: Vec<(String, u8, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: u64,
    pub client_id: String,
    pub topic: String,
    /// The QoS it goes out with.
    pub qos: u8,
    pub retain: bool,
    pub payload: Bytes,
    pub props: Bytes,
    pub expires_at: Option<u64>,
    /// Packet id and stage (0 sent, 1 released) when it was in flight.
    pub in_flight: Option<(u16, u8)>,
    pub sub_ids: Vec<u32>,
}

/// What a previous run left.
#[derive(Debug, Default)]
pub struct Loaded {
    pub retained: Vec<StoredRetained>,
    pub sessions: Vec<StoredSession>,
    /// Queued messages in the order they came (by id).
    pub queued: Vec<StoredMessage>,
}

/// One transaction's worth of changes.
#[derive(Debug, Default)]
pub struct Batch {
    pub retained_put: Vec<StoredRetained>,
    pub retained_delete: Vec<String>,
    /// Sessions ended: their row, subscriptions and queued messages go (first).
    pub sessions_delete: Vec<String>,
    pub sessions_put: Vec<StoredSession>,
    pub queued_put: Vec<StoredMessage>,
    pub queued_delete: Vec<u64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.retained_put.is_empty()
            && self.retained_delete.is_empty()
            && self.sessions_delete.is_empty()
            && self.sessions_put.is_empty()
            && self.queued_put.is_empty()
            && self.queued_delete.is_empty()
    }
}

/// Columns added since the first version, with their types.
const UPGRADES: &[(&str, &str, &str)] = &[
    ("retained", "props", "BLOB"),
    ("retained", "expires_at", "INTEGER"),
    ("sessions", "offline_at", "INTEGER"),
    ("sessions", "will", "BLOB"),
    ("sessions", "will_at", "INTEGER"),
    ("sessions", "incoming_qos2", "BLOB"),
    ("subscriptions", "sub_id", "INTEGER NOT NULL DEFAULT 0"),
    ("queued", "retain", "INTEGER NOT NULL DEFAULT 0"),
    ("queued", "props", "BLOB"),
    ("queued", "expires_at", "INTEGER"),
    ("queued", "packet_id", "INTEGER"),
    ("queued", "stage", "INTEGER"),
    ("queued", "sub_ids", "BLOB"),
];

impl Store {
    /// Opens (or creates) the file. A damaged file (not a database, corrupt, rows that do
    /// not decode) is moved aside to `state.db.damaged-<unix seconds>` and the gateway
    /// starts with an empty state rather than not at all; returns where it went. Any other
    /// error (permissions, a full disk) is returned: the file may be fine.
    pub fn open(path: &Path, fsync: bool) -> rusqlite::Result<(Store, Loaded, Option<PathBuf>)> {
        match Self::try_open(path, fsync) {
            Ok((store, loaded)) => Ok((store, loaded, None)),
            Err(e) if path.exists() && is_damaged(&e) => {
                let aside = crate::outbox::store::move_aside(path).map_err(|io| {
                    error!(path = %path.display(), error = %io, "state.db is damaged and cannot be moved aside");
                    e
                })?;
                let (store, loaded) = Self::try_open(path, fsync)?;
                Ok((store, loaded, Some(aside)))
            }
            Err(e) => Err(e),
        }
    }

    fn try_open(path: &Path, fsync: bool) -> rusqlite::Result<(Store, Loaded)> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "page_size", 4096)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS retained (
                 topic TEXT PRIMARY KEY, qos INTEGER NOT NULL, payload BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS sessions (
                 client_id TEXT PRIMARY KEY, protocol INTEGER NOT NULL, expiry INTEGER);
             CREATE TABLE IF NOT EXISTS subscriptions (
                 client_id TEXT NOT NULL, filter TEXT NOT NULL, options INTEGER NOT NULL,
                 PRIMARY KEY (client_id, filter));
             CREATE TABLE IF NOT EXISTS queued (
                 id INTEGER PRIMARY KEY, client_id TEXT NOT NULL, topic TEXT NOT NULL,
                 qos INTEGER NOT NULL, payload BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )?;
        for (table, column, kind) in UPGRADES {
            let exists: bool = db.query_row(
                "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
                params![table, column],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if !exists {
                db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            }
        }
        let base_ms: u64 = db
            .query_row("SELECT value FROM meta WHERE key = 'clock_ms'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .map_or(0, |v| v.max(0) as u64);
        let loaded = load(&db)?;
        Ok((
            Store {
                db,
                clock: Clock {
                    base_ms,
                    start: Instant::now(),
                },
                saved_at: Instant::now(),
            },
            loaded,
        ))
    }

    pub fn commit(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        for topic in &batch.retained_delete {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute([topic])?;
        }
        for r in &batch.retained_put {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO retained (topic, qos, payload, props, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                r.topic,
                r.qos,
                r.payload.as_ref(),
                blob(&r.props),
                r.expires_at.map(|v| v as i64)
            ])?;
        }
        for client in &batch.sessions_delete {
            for sql in [
                "DELETE FROM sessions WHERE client_id = ?1",
                "DELETE FROM subscriptions WHERE client_id = ?1",
                "DELETE FROM queued WHERE client_id = ?1",
            ] {
                tx.prepare_cached(sql)?.execute([client])?;
            }
        }
        for s in &batch.sessions_put {
            let qos2: Vec<u8> = s
                .incoming_qos2
                .iter()
                .flat_map(|id| id.to_be_bytes())
                .collect();
            tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions
                 (client_id, protocol, expiry, offline_at, will, will_at, incoming_qos2)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                s.client_id,
                s.level,
                s.expiry,
                s.offline_at.map(|v| v as i64),
                s.will.as_ref().map(encode_will),
                s.will_at.map(|v| v as i64),
                qos2,
            ])?;
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1")?
                .execute([&s.client_id])?;
            for (filter, options, sub_id) in &s.filters {
                tx.prepare_cached(
                    "INSERT INTO subscriptions (client_id, filter, options, sub_id)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![s.client_id, filter, options, sub_id])?;
            }
        }
        for m in &batch.queued_put {
            let ids: Vec<u8> = m.sub_ids.iter().flat_map(|id| id.to_be_bytes()).collect();
            tx.prepare_cached(
                "INSERT OR REPLACE INTO queued
                 (id, client_id, topic, qos, payload, retain, props, expires_at, packet_id, stage, sub_ids)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                m.id as i64,
                m.client_id,
                m.topic,
                m.qos,
                m.payload.as_ref(),
                m.retain,
                blob(&m.props),
                m.expires_at.map(|v| v as i64),
                m.in_flight.map(|(id, _)| id),
                m.in_flight.map(|(_, stage)| stage),
                ids,
            ])?;
        }
        for id in &batch.queued_delete {
            tx.prepare_cached("DELETE FROM queued WHERE id = ?1")?
                .execute([*id as i64])?;
        }
        tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock_ms', ?1)")?
            .execute([self.clock.now_ms() as i64])?;
        tx.commit()?;
        self.saved_at = Instant::now();
        Ok(())
    }
}

fn blob(bytes: &Bytes) -> Option<&[u8]> {
    (!bytes.is_empty()).then_some(bytes.as_ref())
}

/// A will as one blob: qos, retain, delay, expiry (u32::MAX: none), then topic, payload and
/// properties, each with a 32-bit length.
fn encode_will(w: &StoredWillRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + w.topic.len() + w.payload.len() + w.props.len());
    out.push(w.qos);
    out.push(u8::from(w.retain));
    out.extend_from_slice(&w.delay.to_be_bytes());
    out.extend_from_slice(&w.expiry.unwrap_or(u32::MAX).to_be_bytes());
    for part in [w.topic.as_bytes(), &w.payload, &w.props] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn decode_will(b: &[u8]) -> Option<StoredWillRow> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let (qos, retain) = (*b.first()?, *b.get(1)? != 0);
    let delay = u32_at(2)?;
    let expiry = Some(u32_at(6)?).filter(|e| *e != u32::MAX);
    let mut at = 10;
    let mut parts = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = u32_at(at)? as usize;
        parts.push(b.get(at + 4..at + 4 + len)?.to_vec());
        at += 4 + len;
    }
    let props = Bytes::from(parts.pop()?);
    let payload = Bytes::from(parts.pop()?);
    let topic = String::from_utf8(parts.pop()?).ok()?;
    Some(StoredWillRow {
        topic,
        payload,
        qos: qos.min(2),
        retain,
        props,
        delay,
        expiry,
    })
}

fn pairs<T: Copy, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .filter_map(|c| c.try_into().ok().map(from))
        .collect()
}

fn load(db: &Connection) -> rusqlite::Result<Loaded> {
    let retained = db
        .prepare("SELECT topic, qos, payload, props, expires_at FROM retained")?
        .query_map([], |r| {
            Ok(StoredRetained {
                topic: r.get(0)?,
                qos: r.get::<_, u8>(1)?.min(2),
                payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                props: Bytes::from(r.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default()),
                expires_at: r.get::<_, Option<i64>>(4)?.map(|v| v.max(0) as u64),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut sessions = db
        .prepare(
            "SELECT client_id, protocol, expiry, offline_at, will, will_at, incoming_qos2
             FROM sessions ORDER BY client_id",
        )?
        .query_map([], |r| {
            Ok(StoredSession {
                client_id: r.get(0)?,
                level: r.get(1)?,
                // The first versions kept None for a 3.1.1 session (it never expires).
                expiry: r.get::<_, Option<u32>>(2)?.unwrap_or(u32::MAX),
                offline_at: r.get::<_, Option<i64>>(3)?.map(|v| v.max(0) as u64),
                will: r
                    .get::<_, Option<Vec<u8>>>(4)?
                    .and_then(|b| decode_will(&b)),
                will_at: r.get::<_, Option<i64>>(5)?.map(|v| v.max(0) as u64),
                incoming_qos2: pairs(
                    &r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default(),
                    u16::from_be_bytes,
                ),
                filters: Vec::new(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut subscriptions = db.prepare(
        "SELECT filter, options, sub_id FROM subscriptions WHERE client_id = ?1 ORDER BY filter",
    )?;
    for session in &mut sessions {
        session.filters = subscriptions
            .query_map([&session.client_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
    }
    drop(subscriptions);
    let queued = db
        .prepare(
            "SELECT id, client_id, topic, qos, payload, retain, props, expires_at, packet_id,
                    stage, sub_ids
             FROM queued ORDER BY id",
        )?
        .query_map([], |r| {
            let packet_id: Option<u16> = r.get(8)?;
            let stage: Option<u8> = r.get(9)?;
            Ok(StoredMessage {
                id: r.get::<_, i64>(0)?.max(0) as u64,
                client_id: r.get(1)?,
                topic: r.get(2)?,
                qos: r.get::<_, u8>(3)?.min(2),
                payload: Bytes::from(r.get::<_, Vec<u8>>(4)?),
                retain: r.get(5)?,
                props: Bytes::from(r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default()),
                expires_at: r.get::<_, Option<i64>>(7)?.map(|v| v.max(0) as u64),
                in_flight: packet_id
                    .filter(|id| *id != 0)
                    .map(|id| (id, stage.unwrap_or(0))),
                sub_ids: pairs(
                    &r.get::<_, Option<Vec<u8>>>(10)?.unwrap_or_default(),
                    u32::from_be_bytes,
                ),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded {
        retained,
        sessions,
        queued,
    })
}

/// A file that is not a database or is corrupt, or rows that do not decode.
fn is_damaged(e: &rusqlite::Error) -> bool {
    crate::outbox::store::is_damage(e)
        || matches!(
            e,
            rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_written_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (mut store, loaded, aside) = Store::open(&path, true).unwrap();
        assert!(aside.is_none() && loaded.sessions.is_empty());
        let will = StoredWillRow {
            topic: "w".into(),
            payload: Bytes::from_static(b"gone"),
            qos: 1,
            retain: true,
            props: Bytes::from_static(&[0x01, 1]),
            delay: 5,
            expiry: Some(60),
        };
        let session = StoredSession {
            client_id: "c".into(),
            level: 5,
            expiry: 300,
            offline_at: Some(1000),
            will: Some(will),
            will_at: Some(6000),
            incoming_qos2: vec![3, 9],
            filters: vec![("a/#".into(), 0x11, 7)],
        };
        let message = StoredMessage {
            id: 42,
            client_id: "c".into(),
            topic: "a/b".into(),
            qos: 2,
            retain: true,
            payload: Bytes::from_static(b"x"),
            props: Bytes::from_static(&[0x03, 0, 1, b't']),
            expires_at: Some(9000),
            in_flight: Some((17, 1)),
            sub_ids: vec![7, 8],
        };
        let retained = StoredRetained {
            topic: "r".into(),
            qos: 1,
            payload: Bytes::from_static(b"on"),
            props: Bytes::new(),
            expires_at: None,
        };
        store
            .commit(&Batch {
                retained_put: vec![retained.clone()],
                sessions_put: vec![session.clone()],
                queued_put: vec![message.clone()],
                ..Batch::default()
            })
            .unwrap();
        drop(store);
        let (_, loaded, _) = Store::open(&path, true).unwrap();
        assert_eq!(loaded.sessions, vec![session]);
        assert_eq!(loaded.queued, vec![message]);
        assert_eq!(loaded.retained, vec![retained]);
    }

    #[test]
    fn the_first_versions_file_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE retained (topic TEXT PRIMARY KEY, qos INTEGER NOT NULL, payload BLOB NOT NULL);
                 CREATE TABLE sessions (client_id TEXT PRIMARY KEY, protocol INTEGER NOT NULL, expiry INTEGER);
                 CREATE TABLE subscriptions (client_id TEXT NOT NULL, filter TEXT NOT NULL, options INTEGER NOT NULL, PRIMARY KEY (client_id, filter));
                 CREATE TABLE queued (id INTEGER PRIMARY KEY, client_id TEXT NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL, payload BLOB NOT NULL);
                 INSERT INTO retained VALUES ('fan/state', 0, x'4F4E');
                 INSERT INTO sessions VALUES ('fan', 4, NULL);
                 INSERT INTO subscriptions VALUES ('fan', 'fan/command', 1);
                 INSERT INTO queued VALUES (5, 'fan', 'fan/command', 1, x'4F4646');",
            )
            .unwrap();
        }
        let (_, loaded, aside) = Store::open(&path, true).unwrap();
        assert!(aside.is_none());
        assert_eq!(loaded.sessions[0].expiry, u32::MAX);
        assert_eq!(
            loaded.sessions[0].filters,
            vec![("fan/command".into(), 1, 0)]
        );
        assert_eq!(&loaded.queued[0].payload[..], b"OFF");
        assert_eq!(&loaded.retained[0].payload[..], b"ON");
    }
}
