//! `state.db`: retained messages, persistent sessions with their subscriptions, and the
//! messages queued for them. Only the state's owner thread touches it, in batches.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rusqlite::{params, Connection};
use tracing::error;

use crate::broker::packet::Protocol;

pub struct Store {
    db: Connection,
}

/// What a previous run left.
#[derive(Debug, Default)]
pub struct Loaded {
    pub retained: Vec<(String, u8, Bytes)>,
    pub sessions: Vec<StoredSession>,
    /// Queued messages in the order they came (by id).
    pub queued: Vec<StoredMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub client_id: String,
    pub protocol: Protocol,
    pub expiry: Option<u32>,
    /// Filter and subscription options (QoS in the low two bits).
    pub filters: Vec<(String, u8)>,
}

#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: i64,
    pub client_id: String,
    pub topic: String,
    pub qos: u8,
    pub payload: Bytes,
}

/// One transaction's worth of changes.
#[derive(Debug, Default)]
pub struct Batch {
    pub retained_put: Vec<(String, u8, Bytes)>,
    pub retained_delete: Vec<String>,
    /// Sessions ended: their row, subscriptions and queued messages go.
    pub sessions_delete: Vec<String>,
    pub sessions_put: Vec<StoredSession>,
    pub queued_put: Vec<StoredMessage>,
    pub queued_delete: Vec<i64>,
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
                 qos INTEGER NOT NULL, payload BLOB NOT NULL);",
        )?;
        let loaded = load(&db)?;
        Ok((Store { db }, loaded))
    }

    pub fn commit(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        for topic in &batch.retained_delete {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute([topic])?;
        }
        for (topic, qos, payload) in &batch.retained_put {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO retained (topic, qos, payload) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![topic, qos, payload.as_ref()])?;
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
        for session in &batch.sessions_put {
            let protocol = if session.protocol == Protocol::V5 {
                5
            } else {
                4
            };
            tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions (client_id, protocol, expiry) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![session.client_id, protocol, session.expiry])?;
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1")?
                .execute([&session.client_id])?;
            for (filter, options) in &session.filters {
                tx.prepare_cached(
                    "INSERT INTO subscriptions (client_id, filter, options) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![session.client_id, filter, options])?;
            }
        }
        for m in &batch.queued_put {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO queued (id, client_id, topic, qos, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![m.id, m.client_id, m.topic, m.qos, m.payload.as_ref()])?;
        }
        for id in &batch.queued_delete {
            tx.prepare_cached("DELETE FROM queued WHERE id = ?1")?
                .execute([id])?;
        }
        tx.commit()
    }
}

fn load(db: &Connection) -> rusqlite::Result<Loaded> {
    let retained = db
        .prepare("SELECT topic, qos, payload FROM retained")?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u8>(1)?,
                Bytes::from(r.get::<_, Vec<u8>>(2)?),
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut sessions = db
        .prepare("SELECT client_id, protocol, expiry FROM sessions ORDER BY client_id")?
        .query_map([], |r| {
            Ok(StoredSession {
                client_id: r.get(0)?,
                protocol: match r.get::<_, u8>(1)? {
                    5 => Protocol::V5,
                    _ => Protocol::V311,
                },
                expiry: r.get(2)?,
                filters: Vec::new(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut subscriptions = db.prepare(
        "SELECT filter, options FROM subscriptions WHERE client_id = ?1 ORDER BY filter",
    )?;
    for session in &mut sessions {
        session.filters = subscriptions
            .query_map([&session.client_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
    }
    let queued = db
        .prepare("SELECT id, client_id, topic, qos, payload FROM queued ORDER BY id")?
        .query_map([], |r| {
            Ok(StoredMessage {
                id: r.get(0)?,
                client_id: r.get(1)?,
                topic: r.get(2)?,
                qos: r.get(3)?,
                payload: Bytes::from(r.get::<_, Vec<u8>>(4)?),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    drop(subscriptions);
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
