//! The command connection: its own client id and persistent session, so a telemetry burst
//! never delays a command. Each command is published into the local broker at QoS 1 and
//! acknowledged to the cloud only after its hand-off completed (every QoS 1/2 subscriber
//! acknowledged it, or it is held for an offline persistent session) and is on record.
//!
//! Commands are pipelined: each goes to the local broker as soon as it arrives, hand-offs
//! complete in any order, the records of several hand-offs are written in one transaction
//! by the recorder thread, and the cloud's PUBACKs go out in the order the commands came,
//! each once its record is durable.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, Publish, QoS, SubscribeFilter,
};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::broker::internal::{Client, Publication, PublishError};
use crate::broker::message::Completion;
use crate::cloud::{error_chain, CloudLink};
use crate::config::DownlinkRule;
use crate::health::{inc, LinkState, RateLimit, SharedHealth};
use crate::reload::{Change, CloudControl};
use crate::topics;

/// The largest packet MQTT can frame (remaining length 268,435,455 plus the fixed header).
const MQTT_MAX_PACKET: usize = 268_435_460;
/// A connection that lasted this long was a working link: the backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Commands remembered as handed over, to recognise the cloud's redeliveries.
const REMEMBERED: usize = 4096;
/// A command whose subscribers have not all acknowledged it in this time is taken as
/// handed over (it waits in their sessions): one subscriber that never acknowledges must
/// not hold up every command behind it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error("the local broker cannot take commands: {0}")]
    Broker(#[from] PublishError),
}

pub struct Downlink {
    pub cloud: CloudLink,
    /// Where the record of handed-over commands is kept.
    pub data_dir: std::path::PathBuf,
    pub rules: Vec<DownlinkRule>,
    /// The downlink's client of the local broker.
    pub client: Client,
    pub health: SharedHealth,
    pub shutdown: watch::Receiver<bool>,
    /// New `[cloud]` settings (reconnect) and `[[downlink]]` rules (subscribe and
    /// unsubscribe on the live connection) from a reload.
    pub control: CloudControl,
}

enum End {
    Shutdown,
    /// New cloud settings, or no rules left: start over with the new config.
    Reconfigured,
    Lost {
        error: String,
        was_up: bool,
    },
    Fatal(DownlinkError),
}

/// Where a command stands between the cloud's PUBLISH and our PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Published into the local broker as hand-off `n`; its completion is awaited.
    AtBroker(u64),
    /// Handed over; its record is not written yet.
    Confirmed,
    /// Its record is in this recorder batch.
    Recording(u64),
    /// Nothing more to wait for: the PUBACK may go (in order).
    Done,
}

struct Entry {
    /// What to acknowledge upstream; None once the connection it came on is gone (the
    /// cloud redelivers it).
    ack: Option<Publish>,
    key: u64,
    stage: Stage,
    since: Instant,
}

/// Commands in the order the cloud sent them, until their PUBACK goes out.
struct Pipeline {
    entries: VecDeque<Entry>,
    handoffs: u64,
    batch: u64,
    /// Where the broker reports completed hand-offs.
    completions: mpsc::UnboundedSender<u64>,
    completed: mpsc::UnboundedReceiver<u64>,
}

impl Pipeline {
    fn new() -> Self {
        let (completions, completed) = mpsc::unbounded_channel();
        Pipeline {
            entries: VecDeque::new(),
            handoffs: 0,
            batch: 0,
            completions,
            completed,
        }
    }

    fn next_handoff(&mut self) -> u64 {
        self.handoffs += 1;
        self.handoffs
    }

    /// When the oldest command still at the broker is taken as handed over.
    fn handoff_deadline(&self) -> Option<tokio::time::Instant> {
        self.entries
            .iter()
            .find(|e| matches!(e.stage, Stage::AtBroker(_)))
            .map(|e| tokio::time::Instant::from_std(e.since) + HANDOFF_TIMEOUT)
    }

    /// Hand-off `n` completed: returns the command's key.
    fn confirmed(&mut self, n: u64) -> Option<u64> {
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.stage == Stage::AtBroker(n))?;
        entry.stage = Stage::Confirmed;
        Some(entry.key)
    }

    /// The hand-offs older than [`HANDOFF_TIMEOUT`]: taken as complete; returns their keys.
    fn overdue(&mut self, now: Instant) -> Vec<u64> {
        let mut keys = Vec::new();
        for e in self.entries.iter_mut() {
            if matches!(e.stage, Stage::AtBroker(_)) && now >= e.since + HANDOFF_TIMEOUT {
                e.stage = Stage::Confirmed;
                keys.push(e.key);
            }
        }
        keys
    }

    /// Keys of the confirmed commands, now part of a new recorder batch.
    fn start_batch(&mut self) -> Option<(u64, Vec<u64>)> {
        let batch = self.batch + 1;
        let keys: Vec<u64> = self
            .entries
            .iter_mut()
            .filter(|e| e.stage == Stage::Confirmed)
            .map(|e| {
                e.stage = Stage::Recording(batch);
                e.key
            })
            .collect();
        if keys.is_empty() {
            return None;
        }
        self.batch = batch;
        Some((batch, keys))
    }

    fn recorded(&mut self, batch: u64) {
        for e in self.entries.iter_mut() {
            if e.stage == Stage::Recording(batch) {
                e.stage = Stage::Done;
            }
        }
    }

    /// PUBACKs for the commands at the front that are done, in order. One the client's
    /// request queue has no room for stays at the front and is tried again on the next
    /// turn of the loop (not dropped: the cloud would redeliver it).
    fn release(&mut self, client: &AsyncClient) {
        while let Some(front) = self.entries.front() {
            if front.stage != Stage::Done {
                return;
            }
            if let Some(publish) = &front.ack {
                if client.try_ack(publish).is_err() {
                    return;
                }
            }
            self.entries.pop_front();
        }
    }

    /// The connection the commands came on is gone: nothing to acknowledge any more, but
    /// hand-offs in progress still complete and are recorded.
    fn connection_lost(&mut self) {
        for e in self.entries.iter_mut() {
            e.ack = None;
        }
        self.entries.retain(|e| e.stage != Stage::Done);
    }
}

impl Downlink {
    /// Runs until shutdown; an error means the local broker can no longer take commands and
    /// the gateway must restart.
    pub async fn run(mut self) -> Result<(), DownlinkError> {
        let mut reconnect = self.cloud.reconnect();
        // Opening a database is blocking work: off the async workers.
        let mut handed = tokio::task::block_in_place(|| Handed::open(&self.data_dir, REMEMBERED));
        let mut pipeline = Pipeline::new();
        // Rules the cloud session may still hold subscriptions for, when they changed while
        // the link was down: the subscriptions are changed once it is up.
        let mut rules_before: Option<Vec<DownlinkRule>> = None;
        loop {
            self.cloud = self.control.cloud();
            let latest = self.control.downlink_rules();
            if latest != self.rules {
                rules_before.get_or_insert(std::mem::replace(&mut self.rules, latest));
            }
            // Without [[downlink]] rules there is no command connection at all.
            if self.rules.is_empty() {
                self.health.commands.set(LinkState::Off);
                tokio::select! {
                    _ = self.control.changed() => continue,
                    _ = self.shutdown.changed() => return Ok(()),
                }
            }
            self.health.commands.set(LinkState::Connecting);
            let mut options = self.cloud.options(&self.cloud.config.command_client_id);
            // Take any command in, however large, and refuse the oversized ones in command():
            // rumqttc would otherwise fail on it, reconnect and get it again, forever.
            options
                .set_manual_acks(true)
                .set_max_packet_size(MQTT_MAX_PACKET, self.cloud.config.max_packet_size);
            let (client, eventloop) = AsyncClient::new(options, 256);
            let end = self
                .session(
                    &client,
                    eventloop,
                    &mut handed,
                    &mut pipeline,
                    &mut rules_before,
                )
                .await;
            pipeline.connection_lost();
            match end {
                End::Shutdown => {
                    let _ = client.try_disconnect();
                    return Ok(());
                }
                End::Fatal(e) => return Err(e),
                End::Reconfigured => {}
                End::Lost { error, was_up } => {
                    let go_on = tokio::select! {
                        go_on = reconnect.after_failure(
                            &self.health,
                            &self.health.commands,
                            &self.cloud.config.command_client_id,
                            "cloud command link down; the cloud keeps commands for us",
                            &error,
                            was_up,
                            &mut self.shutdown,
                        ) => go_on,
                        _ = self.control.changed() => true,
                    };
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
        pipeline: &mut Pipeline,
        rules_before: &mut Option<Vec<DownlinkRule>>,
    ) -> End {
        let mut up_at: Option<Instant> = None;
        let mut bad_log = RateLimit::new(Duration::from_secs(10));
        let mut slow_log = RateLimit::new(Duration::from_secs(10));
        let was_up = |up_at: Option<Instant>| up_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        loop {
            if let Some((batch, keys)) = pipeline.start_batch() {
                handed.record(batch, keys);
            }
            pipeline.release(client);
            let deadline = pipeline.handoff_deadline();
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack)))
                        if ack.code == ConnectReturnCode::Success =>
                    {
                        up_at = Some(Instant::now());
                        self.health.commands.set(LinkState::Up);
                        info!(client_id = %self.cloud.config.command_client_id,
                            node = %self.cloud.node(&self.cloud.config.command_client_id),
                            session_present = ack.session_present, "cloud command link up");
                        match (ack.session_present, rules_before.take()) {
                            (true, Some(old)) if old != self.rules => {
                                change_subscriptions(client, &old, &self.rules)
                            }
                            _ => {}
                        }
                        if !ack.session_present {
                            if let Err(e) = self.subscribe(client) {
                                return End::Lost { error: format!("subscribing to commands: {e}"), was_up: was_up(up_at) };
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        return End::Lost {
                            error: format!("cloud refused the connection: {:?}", ack.code),
                            was_up: was_up(up_at),
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
                        if let Err(e) = self.command(publish, handed, pipeline, &mut bad_log).await {
                            return End::Fatal(e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return End::Lost { error: error_chain(&e), was_up: was_up(up_at) },
                },
                Some(n) = pipeline.completed.recv() => {
                    if let Some(key) = pipeline.confirmed(n) {
                        inc(&self.health.counters.commands_delivered);
                        handed.remember(key);
                    }
                }
                Some(batch) = handed.done.recv() => pipeline.recorded(batch),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    let overdue = pipeline.overdue(Instant::now());
                    if let Some(held) = slow_log.check() {
                        warn!(commands = overdue.len(), earlier_warnings_suppressed = held,
                            "a local subscriber did not acknowledge a command within {HANDOFF_TIMEOUT:?}; it waits in its session, and the cloud is acknowledged");
                    }
                    for key in overdue {
                        inc(&self.health.counters.commands_unconfirmed);
                        handed.remember(key);
                    }
                }
                _ = self.shutdown.changed() => return End::Shutdown,
                change = self.control.changed() => {
                    let old = std::mem::replace(&mut self.rules, self.control.downlink_rules());
                    let up = up_at.is_some();
                    if up && old != self.rules {
                        change_subscriptions(client, &old, &self.rules);
                    } else if !up {
                        rules_before.get_or_insert(old);
                    }
                    if change == Change::Cloud || self.rules.is_empty() {
                        info!("command link settings changed: reconnecting with them");
                        close(client, &mut eventloop).await;
                        return End::Reconfigured;
                    }
                }
            }
        }
    }

    fn subscribe(&self, client: &AsyncClient) -> Result<(), rumqttc::ClientError> {
        let filters = self.rules.iter().map(|r| {
            let qos = if r.qos as u8 == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            SubscribeFilter::new(format!("{}{}", r.remote_prefix, r.topic), qos)
        });
        client.try_subscribe_many(filters)
    }

    async fn command(
        &mut self,
        publish: Publish,
        handed: &mut Handed,
        pipeline: &mut Pipeline,
        bad_log: &mut RateLimit,
    ) -> Result<(), DownlinkError> {
        let counters = &self.health.counters;
        inc(&counters.commands_received);
        let key = Handed::key(&publish);
        let done = |publish: Publish| Entry {
            ack: Some(publish),
            key,
            stage: Stage::Done,
            since: Instant::now(),
        };
        if publish.dup && handed.contains(key) {
            inc(&counters.commands_duplicate);
            info!(topic = %publish.topic, "command redelivered by the cloud was already handed over; acknowledging it again");
            pipeline.entries.push_back(done(publish));
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
            pipeline.entries.push_back(done(publish));
            return Ok(());
        }
        let Some(local) = self.local_topic(&publish.topic) else {
            inc(&counters.commands_failed);
            if let Some(held) = bad_log.check() {
                warn!(topic = %publish.topic, earlier_warnings_suppressed = held,
                    "command on a topic no [[downlink]] rule maps to a valid local topic; acknowledged and dropped");
            }
            pipeline.entries.push_back(done(publish));
            return Ok(());
        };
        let n = pipeline.next_handoff();
        let completion = Completion {
            done: pipeline.completions.clone(),
            key: n,
        };
        self.client
            .publish(Publication {
                topic: local,
                payload: publish.payload.clone(),
                qos: 1,
                retain: publish.retain,
                completion: Some(completion),
            })
            .await?;
        pipeline.entries.push_back(Entry {
            ack: Some(publish),
            key,
            stage: Stage::AtBroker(n),
            since: Instant::now(),
        });
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

/// Commands recently handed over, by packet id, topic and payload, kept in `commands.db` in
/// the data directory so that a redelivery after a gateway restart (the PUBACK was lost with
/// the process) is recognised too. The recorder thread owns the file.
struct Handed {
    /// How many hand-offs are remembered (the newest).
    limit: usize,
    set: HashSet<u64>,
    order: VecDeque<u64>,
    recorder: Option<flume::Sender<Record>>,
    /// Recorder batches that are durable, in order.
    done: mpsc::UnboundedReceiver<u64>,
    done_tx: mpsc::UnboundedSender<u64>,
}

enum Record {
    Insert { batch: u64, keys: Vec<u64> },
    Forget(u64),
}

impl Handed {
    /// Opens the record; without it (unwritable data dir, broken file) commands still flow,
    /// remembered in memory only, and the error is logged.
    fn open(data_dir: &Path, limit: usize) -> Handed {
        let path = data_dir.join("commands.db");
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut handed = Handed {
            limit,
            set: HashSet::new(),
            order: VecDeque::new(),
            recorder: None,
            done,
            done_tx,
        };
        let opened = Self::load(&path, limit).and_then(|(db, keys)| {
            let (tx, rx) = flume::unbounded();
            let done = handed.done_tx.clone();
            std::thread::Builder::new()
                .name("commands-db".into())
                .spawn(move || record(db, limit, rx, done))
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            Ok((tx, keys))
        });
        match opened {
            Ok((tx, keys)) => {
                for key in keys {
                    handed.remember(key);
                }
                handed.recorder = Some(tx);
            }
            Err(e) => warn!(path = %path.display(), error = %e,
                "cannot keep the record of handed-over commands on disk; after a restart a redelivered command may be published twice"),
        }
        handed
    }

    /// Opens `commands.db`: 1 KiB pages and a plain rowid table, so that a record costs one
    /// small WAL frame; `synchronous = NORMAL`, so that a command waits for no fsync. A
    /// record survives a crash of the gateway (it is in the WAL); a power cut may take the
    /// last few seconds of records, and a command redelivered after one may be published
    /// again, which QoS 1 allows. The first versions' table (AUTOINCREMENT, 4 KiB pages)
    /// is carried over once.
    fn load(path: &Path, limit: usize) -> rusqlite::Result<(rusqlite::Connection, Vec<u64>)> {
        let db = rusqlite::Connection::open(path)?;
        let old: bool = db.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'handed'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if old {
            db.pragma_update(None, "journal_mode", "DELETE")?;
            db.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS handoffs (key INTEGER NOT NULL);
                 INSERT INTO handoffs (key) SELECT key FROM handed ORDER BY seq;
                 DROP TABLE handed;
                 COMMIT;",
            )?;
            db.pragma_update(None, "page_size", 1024)?;
            db.execute_batch("VACUUM")?;
        }
        db.pragma_update(None, "page_size", 1024)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch("CREATE TABLE IF NOT EXISTS handoffs (key INTEGER NOT NULL)")?;
        let keys = db
            .prepare("SELECT key FROM handoffs ORDER BY rowid DESC LIMIT ?1")?
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

    /// Has the keys of a batch written; `done` yields the batch once it is durable (at once
    /// when there is no file).
    fn record(&mut self, batch: u64, keys: Vec<u64>) {
        let sent = match &self.recorder {
            Some(tx) => tx.send(Record::Insert { batch, keys }).is_ok(),
            None => false,
        };
        if !sent {
            let _ = self.done_tx.send(batch);
        }
    }

    /// Drops a key from the record (memory and disk).
    fn forget(&mut self, key: u64) {
        if !self.set.remove(&key) {
            return;
        }
        self.order.retain(|k| *k != key);
        if let Some(tx) = &self.recorder {
            let _ = tx.send(Record::Forget(key));
        }
    }

    fn remember(&mut self, key: u64) {
        if !self.set.insert(key) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.limit {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Records beyond the limit are deleted in steps of this many, not one per command.
const TRIM_STEP: i64 = 256;

/// The recorder thread: everything queued is written in one transaction (group commit), then
/// its batches are reported durable, in order.
fn record(
    mut db: rusqlite::Connection,
    limit: usize,
    rx: flume::Receiver<Record>,
    done: mpsc::UnboundedSender<u64>,
) {
    while let Ok(first) = rx.recv() {
        let mut work = vec![first];
        work.extend(rx.try_iter());
        let result = (|| -> rusqlite::Result<()> {
            let tx = db.transaction()?;
            for item in &work {
                match item {
                    Record::Insert { keys, .. } => {
                        let mut insert =
                            tx.prepare_cached("INSERT INTO handoffs (key) VALUES (?1)")?;
                        for key in keys {
                            insert.execute([*key as i64])?;
                        }
                    }
                    Record::Forget(key) => {
                        tx.prepare_cached("DELETE FROM handoffs WHERE key = ?1")?
                            .execute([*key as i64])?;
                    }
                }
            }
            let newest = tx.last_insert_rowid();
            let oldest: i64 = tx
                .prepare_cached("SELECT COALESCE(MIN(rowid), 0) FROM handoffs")?
                .query_row([], |r| r.get(0))?;
            if newest - oldest >= limit as i64 + TRIM_STEP {
                tx.prepare_cached("DELETE FROM handoffs WHERE rowid <= ?1")?
                    .execute([newest - limit as i64])?;
            }
            tx.commit()
        })();
        if let Err(e) = result {
            warn!(error = %e, "recording handed-over commands on disk failed; a redelivery after a restart may be published twice");
        }
        for item in work {
            if let Record::Insert { batch, .. } = item {
                if done.send(batch).is_err() {
                    return;
                }
            }
        }
    }
}

/// A rule's cloud subscription: filter and QoS (0 or 1).
fn subscription(rule: &DownlinkRule) -> (String, u8) {
    (
        format!("{}{}", rule.remote_prefix, rule.topic),
        rule.qos as u8,
    )
}

/// Subscribes to what `new` adds (or changes the QoS of) and unsubscribes what it drops,
/// on the live connection.
fn change_subscriptions(client: &AsyncClient, old: &[DownlinkRule], new: &[DownlinkRule]) {
    let before: HashSet<(String, u8)> = old.iter().map(subscription).collect();
    let after: HashSet<(String, u8)> = new.iter().map(subscription).collect();
    let kept: HashSet<&String> = after.iter().map(|(filter, _)| filter).collect();
    let added: Vec<SubscribeFilter> = after
        .difference(&before)
        .map(|(filter, qos)| {
            let qos = match qos {
                0 => QoS::AtMostOnce,
                _ => QoS::AtLeastOnce,
            };
            SubscribeFilter::new(filter.clone(), qos)
        })
        .collect();
    let dropped: Vec<&String> = before
        .iter()
        .map(|(filter, _)| filter)
        .filter(|filter| !kept.contains(filter))
        .collect();
    info!(
        subscribed = added.len(),
        unsubscribed = dropped.len(),
        "command subscriptions changed"
    );
    if !added.is_empty() {
        if let Err(e) = client.try_subscribe_many(added) {
            warn!(error = %e, "subscribing to new command topics failed");
        }
    }
    for filter in dropped {
        if let Err(e) = client.try_unsubscribe(filter.clone()) {
            warn!(%filter, error = %e, "unsubscribing from a removed command topic failed");
        }
    }
}

/// Sends what is queued (unsubscriptions) and a DISCONNECT, waiting a bounded time.
async fn close(client: &AsyncClient, eventloop: &mut EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
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

    /// Remembers the keys and waits until their record is durable.
    async fn hand_over(handed: &mut Handed, batch: u64, keys: Vec<u64>) {
        for key in &keys {
            handed.remember(*key);
        }
        handed.record(batch, keys);
        assert_eq!(handed.done.recv().await, Some(batch));
    }

    #[tokio::test]
    async fn handed_over_commands_are_remembered_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (on, off) = (
            Handed::key(&command(7, "ON")),
            Handed::key(&command(7, "OFF")),
        );
        assert_ne!(on, off);
        let mut handed = Handed::open(dir.path(), 8);
        hand_over(&mut handed, 1, vec![on]).await;
        assert!(handed.contains(on));
        drop(handed);
        let handed = Handed::open(dir.path(), 8);
        assert!(handed.contains(on));
        assert!(!handed.contains(off));
    }

    #[tokio::test]
    async fn the_record_keeps_only_the_newest_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut handed = Handed::open(dir.path(), 8);
        for pkid in 0..18u32 {
            let key = Handed::key(&command(pkid as u16, &pkid.to_string()));
            hand_over(&mut handed, u64::from(pkid) + 1, vec![key]).await;
        }
        assert_eq!(handed.set.len(), 8);
        let reopened = Handed::open(dir.path(), 8);
        assert_eq!(reopened.set.len(), 8);
        assert!(!reopened.contains(Handed::key(&command(9, "9"))));
        assert!(reopened.contains(Handed::key(&command(10, "10"))));
        assert!(reopened.contains(Handed::key(&command(17, "17"))));
    }

    #[tokio::test]
    async fn several_commands_are_recorded_in_one_batch_and_reported_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut handed = Handed::open(dir.path(), 64);
        let keys: Vec<u64> = (0..20).map(|i| Handed::key(&command(i, "ON"))).collect();
        for key in &keys {
            handed.remember(*key);
        }
        handed.record(1, keys[..10].to_vec());
        handed.record(2, keys[10..].to_vec());
        assert_eq!(handed.done.recv().await, Some(1));
        assert_eq!(handed.done.recv().await, Some(2));
        drop(handed);
        let reopened = Handed::open(dir.path(), 64);
        assert!(keys.iter().all(|k| reopened.contains(*k)));
    }

    #[tokio::test]
    async fn the_first_versions_record_is_carried_over_to_small_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.db");
        let keys: Vec<u64> = (0..5).map(|i| Handed::key(&command(i, "ON"))).collect();
        {
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE handed (seq INTEGER PRIMARY KEY AUTOINCREMENT, key INTEGER NOT NULL)").unwrap();
            for key in &keys {
                db.execute("INSERT INTO handed (key) VALUES (?1)", [*key as i64])
                    .unwrap();
            }
        }
        let handed = Handed::open(dir.path(), 64);
        assert!(keys.iter().all(|k| handed.contains(*k)));
        drop(handed);
        let db = rusqlite::Connection::open(&path).unwrap();
        let page: i64 = db.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page, 1024);
    }
}
