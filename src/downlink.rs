//! The command connection: its own client id and persistent session, so a telemetry burst
//! never delays a command. Each command is published into the local broker at QoS 1 and
//! acknowledged to the cloud only after the broker confirmed it.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, Publish, QoS, SubscribeFilter,
};
use rumqttd::local::LinkError;
use rumqttd::protocol::Packet as RouterPacket;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::broker::Link;
use crate::cloud::{error_chain, CloudLink};
use crate::config::DownlinkRule;
use crate::health::{inc, LinkState, RateLimit, SharedHealth};
use crate::topics;

/// The largest packet MQTT can frame (remaining length 268,435,455 plus the fixed header).
const MQTT_MAX_PACKET: usize = 268_435_460;
/// A connection that lasted this long was a working link: the backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Commands remembered as handed over, to recognise the cloud's redeliveries.
const REMEMBERED: usize = 4096;
/// A local broker that does not confirm a command in this time is stuck.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error("the local broker did not confirm a command within {0:?}")]
    HandoffTimeout(Duration),
    #[error("the in-process link to the local broker failed: {0}")]
    Link(String),
}

pub struct Downlink {
    pub cloud: CloudLink,
    /// Where the record of handed-over commands is kept.
    pub data_dir: std::path::PathBuf,
    pub rules: Vec<DownlinkRule>,
    pub link: Link,
    pub health: SharedHealth,
    pub shutdown: watch::Receiver<bool>,
}

enum End {
    Shutdown,
    Lost { error: String, was_up: bool },
    Fatal(DownlinkError),
}

impl Downlink {
    /// Runs until shutdown; an error means the local broker can no longer take commands and
    /// the gateway must restart.
    pub async fn run(mut self) -> Result<(), DownlinkError> {
        let mut reconnect = self.cloud.reconnect();
        let mut handed = Handed::open(&self.data_dir, REMEMBERED);
        let mut pkid = 0u16;
        loop {
            self.health.commands.set(LinkState::Connecting);
            let mut options = self.cloud.options(&self.cloud.config.command_client_id);
            // Take any command in, however large, and refuse the oversized ones in command():
            // rumqttc would otherwise fail on it, reconnect and get it again, forever.
            options
                .set_manual_acks(true)
                .set_max_packet_size(MQTT_MAX_PACKET, self.cloud.config.max_packet_size);
            let (client, eventloop) = AsyncClient::new(options, 256);
            match self
                .session(&client, eventloop, &mut handed, &mut pkid)
                .await
            {
                End::Shutdown => {
                    let _ = client.try_disconnect();
                    return Ok(());
                }
                End::Fatal(e) => return Err(e),
                End::Lost { error, was_up } => {
                    let go_on = reconnect
                        .after_failure(
                            &self.health,
                            &self.health.commands,
                            &self.cloud.config.command_client_id,
                            "cloud command link down; the cloud keeps commands for us",
                            &error,
                            was_up,
                            &mut self.shutdown,
                        )
                        .await;
                    if !go_on {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn session(
        &mut self,
        client: &AsyncClient,
        mut eventloop: EventLoop,
        handed: &mut Handed,
        pkid: &mut u16,
    ) -> End {
        let mut up_at: Option<Instant> = None;
        let mut bad_log = RateLimit::new(Duration::from_secs(10));
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = self.shutdown.changed() => return End::Shutdown,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == ConnectReturnCode::Success =>
                {
                    up_at = Some(Instant::now());
                    self.health.commands.set(LinkState::Up);
                    info!(client_id = %self.cloud.config.command_client_id,
                        node = %self.cloud.node(&self.cloud.config.command_client_id),
                        session_present = ack.session_present, "cloud command link up");
                    if !ack.session_present {
                        let filters = self.rules.iter().map(|r| {
                            let qos = if r.qos as u8 == 0 {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            };
                            SubscribeFilter::new(format!("{}{}", r.remote_prefix, r.topic), qos)
                        });
                        if let Err(e) = client.try_subscribe_many(filters) {
                            return End::Lost {
                                error: format!("subscribing to commands: {e}"),
                                was_up: up_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER),
                            };
                        }
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return End::Lost {
                        error: format!("cloud refused the connection: {:?}", ack.code),
                        was_up: up_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER),
                    };
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        error!(refused, "the cloud refused command subscriptions; check its ACL for cloud.command_client_id");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Err(e) = self
                        .command(client, publish, handed, pkid, &mut bad_log)
                        .await
                    {
                        return End::Fatal(e);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    return End::Lost {
                        error: error_chain(&e),
                        was_up: up_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER),
                    }
                }
            }
        }
    }

    async fn command(
        &mut self,
        client: &AsyncClient,
        publish: Publish,
        handed: &mut Handed,
        pkid: &mut u16,
        bad_log: &mut RateLimit,
    ) -> Result<(), DownlinkError> {
        let counters = &self.health.counters;
        inc(&counters.commands_received);
        let key = Handed::key(&publish);
        if publish.dup && handed.contains(key) {
            inc(&counters.commands_duplicate);
            info!(topic = %publish.topic, "command redelivered by the cloud was already handed over; acknowledging it again");
            let _ = client.try_ack(&publish);
            return Ok(());
        }
        if !publish.dup {
            // A first delivery: an older command with the same packet id, topic and payload
            // was acknowledged long ago, and this one must not be taken for its redelivery.
            handed.forget(key);
        }
        let limit = self.cloud.config.max_packet_size;
        if publish.payload.len() + publish.topic.len() > limit {
            inc(&counters.commands_failed);
            warn!(topic = %publish.topic, bytes = publish.payload.len(), limit,
                "command larger than cloud.max_packet_size; acknowledged and dropped");
            let _ = client.try_ack(&publish);
            return Ok(());
        }
        let Some(local) = self.local_topic(&publish.topic) else {
            inc(&counters.commands_failed);
            if let Some(held) = bad_log.check() {
                warn!(topic = %publish.topic, earlier_warnings_suppressed = held,
                    "command on a topic no [[downlink]] rule maps to a valid local topic; acknowledged and dropped");
            }
            let _ = client.try_ack(&publish);
            return Ok(());
        };
        let started = Instant::now();
        *pkid = pkid.checked_add(1).unwrap_or(1);
        handoff(
            &mut self.link,
            &local,
            publish.payload.clone(),
            publish.retain,
            *pkid,
        )
        .await?;
        inc(&counters.commands_delivered);
        handed.insert(key);
        let _ = client.try_ack(&publish);
        tracing::debug!(topic = %local, took = ?started.elapsed(), "command handed to the local broker");
        Ok(())
    }

    /// `local_prefix + (cloud topic - remote_prefix)` of the first rule that matches.
    fn local_topic(&self, cloud_topic: &str) -> Option<String> {
        let rule = self.rules.iter().find(|r| {
            cloud_topic
                .strip_prefix(r.remote_prefix.as_str())
                .is_some_and(|rest| topics::matches(&r.topic, rest))
        })?;
        let rest = &cloud_topic[rule.remote_prefix.len()..];
        let local = format!("{}{}", rule.local_prefix, rest);
        topics::valid_topic(&local).ok().map(|_| local)
    }
}

/// Publishes into the local broker at QoS 1 and waits for the broker's PUBACK.
async fn handoff(
    link: &mut Link,
    topic: &str,
    payload: Bytes,
    retain: bool,
    pkid: u16,
) -> Result<(), DownlinkError> {
    // rumqttd keeps Publish's QoS and packet id private; its own serialised form is the way
    // to build a QoS 1 publish from outside.
    let mut raw = BytesMut::with_capacity(5 + topic.len() + payload.len());
    raw.put_u8(0b0011_0010 | retain as u8);
    raw.put_u16(pkid);
    raw.put_u16(topic.len() as u16);
    raw.extend_from_slice(topic.as_bytes());
    raw.extend_from_slice(&payload);
    let publish = rumqttd::protocol::Publish::deserialize(raw.freeze());
    let link_err = |e: LinkError| DownlinkError::Link(e.to_string());
    link.tx
        .send(RouterPacket::Publish(publish, None))
        .await
        .map_err(link_err)?;
    let deadline = tokio::time::Instant::now() + HANDOFF_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, link.next())
            .await
            .map_err(|_| DownlinkError::HandoffTimeout(HANDOFF_TIMEOUT))?
            .map_err(link_err)?;
        // rumqttd does not export its Ack type; its Packet form is public.
        match next.and_then(Option::<RouterPacket>::from) {
            Some(RouterPacket::PubAck(ack, _)) if ack.pkid == pkid => return Ok(()),
            Some(RouterPacket::Disconnect(..)) => {
                return Err(DownlinkError::Link("disconnected by the broker".into()))
            }
            _ => {}
        }
    }
}

/// Commands recently handed over, by packet id, topic and payload, kept in `commands.db` in
/// the data directory so that a redelivery after a gateway restart (the PUBACK was lost with
/// the process) is recognised too.
struct Handed {
    /// How many hand-offs are remembered (the newest).
    limit: usize,
    db: Option<rusqlite::Connection>,
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Handed {
    /// Opens the record; without it (unwritable data dir, broken file) commands still flow,
    /// remembered in memory only, and the error is logged.
    fn open(data_dir: &Path, limit: usize) -> Handed {
        let path = data_dir.join("commands.db");
        let mut handed = Handed {
            limit,
            db: None,
            set: HashSet::new(),
            order: VecDeque::new(),
        };
        match Self::load(&path, limit) {
            Ok((db, keys)) => {
                for key in keys {
                    handed.remember(key);
                }
                handed.db = Some(db);
            }
            Err(e) => warn!(path = %path.display(), error = %e,
                "cannot keep the record of handed-over commands on disk; after a restart a redelivered command may be published twice"),
        }
        handed
    }

    fn load(path: &Path, limit: usize) -> rusqlite::Result<(rusqlite::Connection, Vec<u64>)> {
        let db = rusqlite::Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch("CREATE TABLE IF NOT EXISTS handed (seq INTEGER PRIMARY KEY AUTOINCREMENT, key INTEGER NOT NULL)")?;
        let keys = db
            .prepare("SELECT key FROM handed ORDER BY seq DESC LIMIT ?1")?
            .query_map([limit as i64], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((db, keys.into_iter().rev().map(|k| k as u64).collect()))
    }

    /// FNV-1a over packet id, topic and payload: stable across runs and versions.
    fn key(p: &Publish) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let parts: [&[u8]; 4] = [&p.pkid.to_be_bytes(), p.topic.as_bytes(), &[0], &p.payload];
        for byte in parts.iter().flat_map(|part| part.iter()) {
            h ^= u64::from(*byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    fn contains(&self, key: u64) -> bool {
        self.set.contains(&key)
    }

    /// Records a hand-off, on disk before the cloud gets its PUBACK.
    fn insert(&mut self, key: u64) {
        if !self.remember(key) {
            return;
        }
        if let Some(db) = &self.db {
            let result = tokio::task::block_in_place(|| {
                db.prepare_cached("INSERT INTO handed (key) VALUES (?1)")?
                    .execute([key as i64])?;
                db.prepare_cached("DELETE FROM handed WHERE seq <= last_insert_rowid() - ?1")?
                    .execute([self.limit as i64])
            });
            if let Err(e) = result {
                warn!(error = %e, "recording a handed-over command on disk failed");
            }
        }
    }

    /// Drops a key from the record (memory and disk).
    fn forget(&mut self, key: u64) {
        if !self.set.remove(&key) {
            return;
        }
        self.order.retain(|k| *k != key);
        if let Some(db) = &self.db {
            let result = tokio::task::block_in_place(|| {
                db.prepare_cached("DELETE FROM handed WHERE key = ?1")?
                    .execute([key as i64])
            });
            if let Err(e) = result {
                warn!(error = %e, "removing a command from the on-disk record failed");
            }
        }
    }

    fn remember(&mut self, key: u64) -> bool {
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.limit {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(pkid: u16, payload: &str) -> Publish {
        let mut p = Publish::new(
            "fleet/gw/cmd/fan",
            QoS::AtLeastOnce,
            payload.as_bytes().to_vec(),
        );
        p.pkid = pkid;
        p
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn handed_over_commands_are_remembered_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (on, off) = (
            Handed::key(&command(7, "ON")),
            Handed::key(&command(7, "OFF")),
        );
        assert_ne!(on, off);
        let mut handed = Handed::open(dir.path(), 8);
        handed.insert(on);
        assert!(handed.contains(on));
        drop(handed);
        let handed = Handed::open(dir.path(), 8);
        assert!(handed.contains(on));
        assert!(!handed.contains(off));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_record_keeps_only_the_newest_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut handed = Handed::open(dir.path(), 8);
        for pkid in 0..18u32 {
            handed.insert(Handed::key(&command(pkid as u16, &pkid.to_string())));
        }
        assert_eq!(handed.set.len(), 8);
        let reopened = Handed::open(dir.path(), 8);
        assert_eq!(reopened.set.len(), 8);
        assert!(!reopened.contains(Handed::key(&command(9, "9"))));
        assert!(reopened.contains(Handed::key(&command(10, "10"))));
        assert!(reopened.contains(Handed::key(&command(17, "17"))));
    }
}
