//! The telemetry connection: sends what the outbox holds, in order, and deletes a row only
//! when the cloud has acknowledged it (QoS 1) or it was written (QoS 0).
//!
//! rumqttc's own session state is not trusted (it drops or replays pending publishes on its
//! own terms, see design.md): every connection gets a fresh client and event loop, and after
//! each CONNACK the uplink resends from the oldest row still in the outbox. The outbox is the
//! only source of resends, so duplicates stay within the in-flight window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cloud::{error_chain, CloudLink};
use crate::health::{add, LinkState, SharedHealth};
use crate::outbox::{OutboxHandle, Row};

/// Rows (and bytes of topic plus payload) read from the outbox ahead of the window.
const PREFETCH: usize = 2048;
const PREFETCH_BYTES: usize = 8 << 20;
/// How long a clean shutdown waits for the cloud to acknowledge `offline`.
const OFFLINE_ACK_WAIT: Duration = Duration::from_millis(1500);

pub struct Uplink {
    pub cloud: CloudLink,
    pub outbox: OutboxHandle,
    pub health: SharedHealth,
    pub shutdown: watch::Receiver<bool>,
}

/// What a request sent to rumqttc stands for, in request order.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Row { id: i64, qos: u8 },
    Status,
}

enum End {
    Shutdown,
    Lost {
        error: String,
        /// The link had been up long enough to count as working (backoff starts over).
        was_up: bool,
        /// Whether any row was acknowledged in this connection.
        progressed: bool,
        /// The oldest row in flight when the connection was lost.
        head: Option<i64>,
    },
}

/// A connection that lasted this long was a working link; a shorter one was a flap, and
/// the backoff keeps growing (a cloud that drops us right after CONNACK is not hammered).
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// After this many lost connections in a row with the same oldest row in flight and nothing
/// acknowledged, the cloud is taken to refuse one of the rows in flight (it hangs up on a
/// size or topic it will not take), and the uplink sends one row at a time to find it.
const POISON_LOSSES: u32 = 5;
/// Rows acknowledged one at a time after which the link is trusted with the full window.
const PROBE_CLEAR: u64 = 32;

/// Finding the row the cloud refuses. With the full window the culprit may be any row in
/// flight (the broker's reset also discards the PUBACKs of the rows before it), so after
/// repeated losses rows go one at a time: a row that loses the connection twice alone is
/// dead-lettered, and the rows behind it flow.
#[derive(Debug, Default)]
struct Poison {
    suspect: Option<(i64, u32)>,
    probing: bool,
}

impl Poison {
    fn window(&self, max: usize) -> usize {
        if self.probing {
            1
        } else {
            max
        }
    }

    /// Called after a lost connection; returns the row to dead-letter, if any.
    fn after_loss(&mut self, head: Option<i64>, progressed: bool) -> Option<i64> {
        self.suspect = match (head, self.suspect) {
            (Some(head), Some((row, losses))) if head == row && !progressed => {
                Some((row, losses + 1))
            }
            (Some(head), _) => Some((head, 1)),
            (None, _) => None,
        };
        let (row, losses) = self.suspect?;
        if self.probing && losses >= 2 {
            self.clear();
            return Some(row);
        }
        if !self.probing && losses >= POISON_LOSSES {
            warn!(losses, "the cloud keeps closing the connection with nothing acknowledged; sending one message at a time to find the one it refuses");
            self.probing = true;
            self.suspect = None;
        }
        None
    }

    fn clear(&mut self) {
        self.probing = false;
        self.suspect = None;
    }
}

impl Uplink {
    pub async fn run(mut self) {
        let mut reconnect = self.cloud.reconnect();
        let mut poison = Poison::default();
        loop {
            self.health.telemetry.set(LinkState::Connecting);
            let (client, eventloop) = self.connect();
            let End::Lost {
                error,
                was_up,
                progressed,
                head,
            } = self.session(client, eventloop, &mut poison).await
            else {
                return;
            };
            if let Some(row) = poison.after_loss(head, progressed) {
                let reason = format!(
                    "the cloud closed the connection each time this message was sent alone ({error})"
                );
                if self.outbox.dead_letter(row, reason).await.is_err() {
                    return;
                }
            }
            let go_on = reconnect
                .after_failure(
                    &self.health,
                    &self.health.telemetry,
                    &self.cloud.config.client_id,
                    "cloud telemetry link down; messages stay queued in the outbox",
                    &error,
                    was_up,
                    &mut self.shutdown,
                )
                .await;
            if !go_on {
                return;
            }
        }
    }

    fn connect(&self) -> (AsyncClient, EventLoop) {
        let c = &self.cloud.config;
        let mut options = self.cloud.options(&c.client_id);
        options
            .set_inflight(c.max_inflight)
            .set_last_will(LastWill::new(
                &c.status_topic,
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        AsyncClient::new(options, c.max_inflight as usize + 16)
    }

    async fn session(
        &mut self,
        client: AsyncClient,
        mut eventloop: EventLoop,
        poison: &mut Poison,
    ) -> End {
        let c = self.cloud.config.clone();
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = self.shutdown.changed() => return End::Shutdown,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == ConnectReturnCode::Success =>
                {
                    info!(client_id = %c.client_id, node = %self.cloud.node(&c.client_id),
                        session_present = ack.session_present, "cloud telemetry link up");
                    break;
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return End::Lost {
                        error: format!("cloud refused the connection: {:?}", ack.code),
                        was_up: false,
                        progressed: false,
                        head: None,
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    return End::Lost {
                        error: error_chain(&e),
                        was_up: false,
                        progressed: false,
                        head: None,
                    }
                }
            }
        }
        self.health.telemetry.set(LinkState::Up);
        let up_at = Instant::now();
        let mut window = Window::new(poison.window(c.max_inflight as usize));
        if client
            .publish(&c.status_topic, QoS::AtLeastOnce, true, "online")
            .await
            .is_ok()
        {
            window.sent.push_back(Sent::Status);
        }
        let mut committed = self.outbox.committed();
        let mut buffer: VecDeque<Row> = VecDeque::new();
        let mut fetched_up_to = 0i64;
        loop {
            if buffer.len() < PREFETCH / 2 && *committed.borrow_and_update() > fetched_up_to {
                match self
                    .outbox
                    .fetch(fetched_up_to, PREFETCH - buffer.len(), PREFETCH_BYTES)
                    .await
                {
                    Ok(fetched) => {
                        // Empty: everything up to what was committed when the outbox read
                        // is sent or gone (not what is committed now: that may be newer).
                        fetched_up_to = fetched.rows.last().map_or(fetched.upto, |last| last.id);
                        buffer.extend(fetched.rows);
                    }
                    Err(_) => return End::Shutdown,
                }
            }
            while window.has_room() {
                let Some(row) = buffer.pop_front() else { break };
                let size = packet_size(&row.topic, row.payload.len(), row.qos);
                if size > c.max_packet_size {
                    let reason = format!(
                        "packet of {size} bytes is over cloud.max_packet_size ({} bytes)",
                        c.max_packet_size
                    );
                    if self.outbox.dead_letter(row.id, reason).await.is_err() {
                        return End::Shutdown;
                    }
                    continue;
                }
                let qos = if row.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                if client
                    .publish_bytes(row.topic, qos, false, row.payload)
                    .await
                    .is_err()
                {
                    return window.lost("telemetry client closed".into(), up_at);
                }
                window.sent.push_back(Sent::Row {
                    id: row.id,
                    qos: row.qos,
                });
            }
            let want_rows = buffer.is_empty() && window.has_room();
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(event) => {
                        if self.on_event(event, &mut window).await.is_err() {
                            return End::Shutdown;
                        }
                        if poison.probing && window.acked_rows >= PROBE_CLEAR {
                            info!("the cloud takes messages again; back to the full in-flight window");
                            poison.clear();
                            window.size = c.max_inflight as usize;
                        }
                    }
                    Err(e) => return window.lost(error_chain(&e), up_at),
                },
                changed = committed.changed(), if want_rows => {
                    if changed.is_err() {
                        return End::Shutdown;
                    }
                }
                _ = self.shutdown.changed() => {
                    self.go_offline(&client, &mut eventloop, &mut window).await;
                    return End::Shutdown;
                }
            }
        }
    }

    async fn on_event(&self, event: Event, window: &mut Window) -> Result<(), ()> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => match window.sent.pop_front() {
                Some(Sent::Row { id, qos: 0 }) => {
                    window.acked_rows += 1;
                    self.acked(id).await?
                }
                Some(Sent::Row { id, .. }) => {
                    window.inflight.insert(pkid, Some(id));
                }
                Some(Sent::Status) => {
                    window.inflight.insert(pkid, None);
                }
                None => error!(
                    pkid,
                    "cloud client sent a publish the uplink did not ask for"
                ),
            },
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Some(id)) = window.inflight.remove(&ack.pkid) {
                    window.acked_rows += 1;
                    self.acked(id).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn acked(&self, id: i64) -> Result<(), ()> {
        add(&self.health.counters.forwarded, 1);
        self.outbox.ack(id).await.map_err(|_| ())
    }

    /// Publishes `offline` (retained) and disconnects, waiting a bounded time for the acks.
    async fn go_offline(
        &self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        window: &mut Window,
    ) {
        let c = &self.cloud.config;
        if client
            .try_publish(&c.status_topic, QoS::AtLeastOnce, true, "offline")
            .is_err()
        {
            return;
        }
        window.sent.push_back(Sent::Status);
        let deadline = tokio::time::Instant::now() + OFFLINE_ACK_WAIT;
        let mut offline_pkid = None;
        while let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await {
            match event {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(Sent::Status) = window.sent.back() {
                        if window.sent.len() == 1 {
                            offline_pkid = Some(pkid);
                        }
                    }
                    let _ = self
                        .on_event(Event::Outgoing(Outgoing::Publish(pkid)), window)
                        .await;
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) if Some(ack.pkid) == offline_pkid => {
                    info!("published offline status; disconnecting from the cloud");
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(event) => {
                    let _ = self.on_event(event, window).await;
                }
                Err(_) => break,
            }
        }
        // Flush the DISCONNECT (or give up at the deadline).
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        self.health.telemetry.set(LinkState::Connecting);
    }
}

/// The in-flight window: requests not yet turned into packets, and packets not yet acked.
struct Window {
    size: usize,
    /// Rows acknowledged (or written, QoS 0) in this connection.
    acked_rows: u64,
    sent: VecDeque<Sent>,
    /// pkid -> outbox row (None for the status message).
    inflight: HashMap<u16, Option<i64>>,
}

impl Window {
    fn new(size: usize) -> Self {
        Window {
            size,
            acked_rows: 0,
            sent: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    fn has_room(&self) -> bool {
        self.sent.len() + self.inflight.len() < self.size
    }

    /// How the connection ended, for the reconnect and poison-row logic.
    fn lost(&self, error: String, up_at: Instant) -> End {
        let in_flight = self.inflight.values().flatten().copied();
        let requested = self.sent.iter().filter_map(|s| match s {
            Sent::Row { id, .. } => Some(*id),
            Sent::Status => None,
        });
        End::Lost {
            error,
            was_up: up_at.elapsed() >= STABLE_AFTER,
            progressed: self.acked_rows > 0,
            head: in_flight.chain(requested).min(),
        }
    }
}

/// Bytes of an MQTT 3.1.1 PUBLISH packet, as rumqttc counts them against max_packet_size.
pub fn packet_size(topic: &str, payload: usize, qos: u8) -> usize {
    let len = 2 + topic.len() + payload + if qos > 0 { 2 } else { 0 };
    let len_len = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + len
}

#[cfg(test)]
mod tests {
    use super::packet_size;

    #[test]
    fn packet_size_counts_header_topic_pkid_and_payload() {
        assert_eq!(packet_size("a/b", 10, 1), 1 + 1 + 2 + 3 + 2 + 10);
        assert_eq!(packet_size("a/b", 10, 0), 1 + 1 + 2 + 3 + 10);
        assert_eq!(packet_size("t", 200, 1), 1 + 2 + 2 + 1 + 2 + 200);
    }
}
