//! The telemetry connection: sends what the outbox holds, in order, and tells the outbox
//! when the cloud has a message (acknowledged at QoS 1, written at QoS 0).
//!
//! rumqttc's own session state is not trusted (it drops or replays pending publishes on its
//! own terms, see design.md): every connection gets a fresh client and event loop and a new
//! outbox session, which starts over from the oldest message the outbox still holds. The
//! outbox is the only source of resends, so duplicates stay within the in-flight window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cloud::{error_chain, CloudLink};
use crate::health::{add, LinkState, SharedHealth};
use crate::outbox::{Delivered, OutboxHandle, Row};
use crate::reload::CloudControl;

/// Messages (and bytes of topic plus payload) the outbox may send ahead of the window; the
/// uplink gives credit back in halves.
const PREFETCH: usize = 2048;
const PREFETCH_BYTES: usize = 8 << 20;
/// Deliveries are reported to the outbox in batches of this many, or as soon as the
/// connection has nothing else ready.
const DELIVERED_BATCH: usize = 256;
/// How long a clean shutdown waits for the cloud to acknowledge `offline`.
const OFFLINE_ACK_WAIT: Duration = Duration::from_millis(1500);

pub struct Uplink {
    pub cloud: CloudLink,
    pub outbox: OutboxHandle,
    pub health: SharedHealth,
    pub shutdown: watch::Receiver<bool>,
    /// New `[cloud]` settings from a reload end the connection; the next one uses them.
    pub control: CloudControl,
}

/// What a request sent to rumqttc stands for, in request order.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Row(Delivered, u8),
    Status,
}

/// What a packet in flight stands for.
#[derive(Debug, Clone, Copy)]
enum InFlight {
    Row(Delivered),
    Status,
}

enum End {
    Shutdown,
    /// New cloud settings: reconnect with them at once.
    Reconfigured,
    Lost {
        error: String,
        /// The link had been up long enough to count as working (backoff starts over).
        was_up: bool,
        /// Whether any message was acknowledged in this connection.
        progressed: bool,
        /// The oldest message in flight when the connection was lost.
        head: Option<i64>,
        /// Evidence against one message: sent alone on a connection that had just
        /// proven itself (the status message acknowledged), and the connection was lost
        /// right after, before its acknowledgement.
        alone: Option<i64>,
    },
}

/// A connection that lasted this long was a working link; a shorter one was a flap, and
/// the backoff keeps growing (a cloud that drops us right after CONNACK is not hammered).
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// After this many lost connections in a row with the same oldest message in flight and
/// nothing acknowledged, the uplink sends one message at a time to find out whether the
/// cloud refuses one of them (it hangs up on a size or topic it will not take).
const POISON_LOSSES: u32 = 5;
/// Connections lost right after the same message was sent alone, in a row, before that
/// message is taken for one the cloud refuses and dead-lettered.
const STRIKES: u32 = 3;
/// The test window W: this many round trips of the status message on the same connection,
/// at least `STRIKE_MIN`. While probing, a connection must first carry the status message
/// and then stay up for W with nothing in flight (the link is sound); only then is the
/// suspect sent alone, and a loss within W of that is a strike. A cloud refusing a packet
/// closes at once; a flapping link or a slow cloud fails the first half of the test instead.
const STRIKE_RTTS: u32 = 4;
const STRIKE_MIN: Duration = Duration::from_millis(200);
/// Messages acknowledged one at a time after which the link is trusted with the full window.
const PROBE_CLEAR: u64 = 32;

/// Finding a message the cloud refuses, without ever dead-lettering a good one. With the
/// full window the culprit may be any message in flight, so after repeated losses with
/// nothing acknowledged messages go one at a time; a message is dead-lettered only after
/// it was alone in flight on `STRIKES` connections in a row that each proved sound until it
/// was sent and closed right after (see `STRIKE_RTTS`). Losses for any other reason are
/// link trouble.
#[derive(Debug, Default)]
struct Poison {
    suspect: Option<(i64, u32)>,
    probing: bool,
    strikes: Option<(i64, u32)>,
}

impl Poison {
    fn window(&self, max: usize) -> usize {
        if self.probing {
            1
        } else {
            max
        }
    }

    /// Called after a lost connection; returns the message to dead-letter, if any.
    fn after_loss(
        &mut self,
        head: Option<i64>,
        progressed: bool,
        alone: Option<i64>,
    ) -> Option<i64> {
        if self.probing {
            if let Some(row) = alone {
                let strikes = match self.strikes {
                    Some((id, n)) if id == row => n + 1,
                    _ => 1,
                };
                self.strikes = Some((row, strikes));
                if strikes >= STRIKES {
                    self.clear();
                    return Some(row);
                }
            }
            return None;
        }
        self.suspect = match (head, self.suspect) {
            (Some(head), Some((row, losses))) if head == row && !progressed => {
                Some((row, losses + 1))
            }
            (Some(head), _) if !progressed => Some((head, 1)),
            _ => None,
        };
        if let Some((_, losses)) = self.suspect {
            if losses >= POISON_LOSSES {
                warn!(losses, "the cloud keeps closing the connection with nothing acknowledged; sending one message at a time to find out whether it refuses one");
                self.probing = true;
                self.suspect = None;
                self.strikes = None;
            }
        }
        None
    }

    fn clear(&mut self) {
        *self = Poison::default();
    }
}

impl Uplink {
    pub async fn run(mut self) {
        let mut reconnect = self.cloud.reconnect();
        let mut poison = Poison::default();
        let mut session = 0u64;
        loop {
            session += 1;
            self.cloud = self.control.cloud();
            self.health.telemetry.set(LinkState::Connecting);
            let (client, eventloop) = self.connect();
            let (error, was_up, progressed, head, alone) =
                match self.session(client, eventloop, &mut poison, session).await {
                    End::Lost {
                        error,
                        was_up,
                        progressed,
                        head,
                        alone,
                    } => (error, was_up, progressed, head, alone),
                    End::Reconfigured => continue,
                    End::Shutdown => return,
                };
            if let Some(row) = poison.after_loss(head, progressed, alone) {
                if self.dead_letter_by_id(row, &error).await.is_err() {
                    return;
                }
            }
            let go_on = tokio::select! {
                go_on = reconnect.after_failure(
                    &self.health,
                    &self.health.telemetry,
                    &self.cloud.config.client_id,
                    "cloud telemetry link down; messages stay queued in the outbox",
                    &error,
                    was_up,
                    &mut self.shutdown,
                ) => go_on,
                _ = self.control.cloud_changed() => true,
            };
            if !go_on {
                return;
            }
        }
    }

    async fn dead_letter_by_id(&self, id: i64, error: &str) -> Result<(), ()> {
        let reason = format!(
            "the cloud closed the connection each time this message was sent alone ({error})"
        );
        self.outbox.dead_letter(id, reason).await.map_err(|_| ())
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
        session: u64,
    ) -> End {
        let c = self.cloud.config.clone();
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = self.shutdown.changed() => return End::Shutdown,
                _ = self.control.cloud_changed() => return End::Reconfigured,
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
                        alone: None,
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    return End::Lost {
                        error: error_chain(&e),
                        was_up: false,
                        progressed: false,
                        head: None,
                        alone: None,
                    }
                }
            }
        }
        self.health.telemetry.set(LinkState::Up);
        let mut window = Window::new(poison.window(c.max_inflight as usize));
        if client
            .publish(&c.status_topic, QoS::AtLeastOnce, true, "online")
            .await
            .is_ok()
        {
            window.sent.push_back(Sent::Status);
        }
        let mut buffer: VecDeque<Row> = VecDeque::new();
        let Ok(mut feed) = self
            .outbox
            .subscribe(session, PREFETCH, PREFETCH_BYTES)
            .await
        else {
            return End::Shutdown;
        };
        let mut taken = (0usize, 0usize);
        let mut delivered = Deliveries::default();
        loop {
            if taken.0 >= PREFETCH / 2 || taken.1 >= PREFETCH_BYTES / 2 {
                let (rows, bytes) = std::mem::take(&mut taken);
                if self.outbox.credit(session, rows, bytes).await.is_err() {
                    return End::Shutdown;
                }
            }
            while window.has_room() {
                let Some(row) = buffer.pop_front() else { break };
                taken.0 += 1;
                taken.1 += row.topic.len() + row.payload.len();
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
                let sent = Sent::Row(
                    Delivered {
                        id: row.id,
                        size: row.size,
                    },
                    row.qos,
                );
                if client
                    .publish_bytes(row.topic, qos, false, row.payload)
                    .await
                    .is_err()
                {
                    return self
                        .lost(
                            &mut window,
                            &mut delivered,
                            "telemetry client closed".into(),
                        )
                        .await;
                }
                window.sent.push_back(sent);
            }
            if delivered.list.len() >= DELIVERED_BATCH && self.report(&mut delivered).await.is_err()
            {
                return End::Shutdown;
            }
            // Biased: what the cloud sent is taken first, so that deliveries gather while
            // acknowledgements stream in, and are reported once nothing else is ready (a
            // timer for that would wake the gateway once more per message at low rates).
            tokio::select! {
                biased;
                event = eventloop.poll() => match event {
                    Ok(event) => {
                        window.on_event(event, &mut delivered);
                        if poison.probing && window.acked_rows >= PROBE_CLEAR {
                            info!("the cloud takes messages again; back to the full in-flight window");
                            poison.clear();
                            window.size = c.max_inflight as usize;
                        }
                    }
                    Err(e) => return self.lost(&mut window, &mut delivered, error_chain(&e)).await,
                },
                rows = feed.recv() => match rows {
                    Some(rows) => buffer.extend(rows),
                    None => return End::Shutdown,
                },
                _ = tokio::time::sleep_until(window.hold_end()), if window.holding() => {}
                _ = self.shutdown.changed() => {
                    self.go_offline(&client, &mut eventloop, &mut window, &mut delivered).await;
                    let _ = self.report(&mut delivered).await;
                    return End::Shutdown;
                }
                _ = self.control.cloud_changed() => {
                    info!("cloud settings changed: reconnecting with them; unacknowledged messages are resent from the outbox");
                    self.go_offline(&client, &mut eventloop, &mut window, &mut delivered).await;
                    let _ = self.report(&mut delivered).await;
                    return End::Reconfigured;
                }
                _ = std::future::ready(()), if !delivered.list.is_empty() => {
                    if self.report(&mut delivered).await.is_err() {
                        return End::Shutdown;
                    }
                }
            }
        }
    }

    /// Tells the outbox what the cloud has.
    async fn report(&self, delivered: &mut Deliveries) -> Result<(), ()> {
        if delivered.list.is_empty() {
            return Ok(());
        }
        let list = std::mem::take(&mut delivered.list);
        add(&self.health.counters.forwarded, list.len() as u64);
        self.outbox.delivered(list).await.map_err(|_| ())
    }

    async fn lost(&self, window: &mut Window, delivered: &mut Deliveries, error: String) -> End {
        if self.report(delivered).await.is_err() {
            return End::Shutdown;
        }
        window.lost(error)
    }

    /// Publishes `offline` (retained) and disconnects, waiting a bounded time for the acks.
    async fn go_offline(
        &self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        window: &mut Window,
        delivered: &mut Deliveries,
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
                    if let (Some(Sent::Status), 1) = (window.sent.back(), window.sent.len()) {
                        offline_pkid = Some(pkid);
                    }
                    window.on_event(Event::Outgoing(Outgoing::Publish(pkid)), delivered);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) if Some(ack.pkid) == offline_pkid => {
                    info!("published offline status; disconnecting from the cloud");
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(event) => window.on_event(event, delivered),
                Err(_) => break,
            }
        }
        // Flush the DISCONNECT (or give up at the deadline).
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        self.health.telemetry.set(LinkState::Connecting);
    }
}

/// Deliveries not yet reported to the outbox.
#[derive(Default)]
struct Deliveries {
    list: Vec<Delivered>,
}

impl Deliveries {
    fn push(&mut self, d: Delivered) {
        self.list.push(d);
    }
}

/// The in-flight window: requests not yet turned into packets, and packets not yet acked.
struct Window {
    size: usize,
    opened: Instant,
    /// Messages acknowledged (or written, QoS 0) in this connection.
    acked_rows: u64,
    sent: VecDeque<Sent>,
    /// pkid -> what it carries.
    inflight: HashMap<u16, InFlight>,
    /// When the status message went out, and its round trip once acknowledged.
    status_out: Option<Instant>,
    status_rtt: Option<Duration>,
    /// With a window of one: the message in flight and when it went out.
    alone: Option<(i64, Instant)>,
    /// With a window of one: nothing is sent before this (the connection proves itself
    /// idle first); set once the status message is acknowledged.
    hold: Option<Instant>,
}

impl Window {
    fn new(size: usize) -> Self {
        Window {
            size,
            opened: Instant::now(),
            acked_rows: 0,
            sent: VecDeque::new(),
            inflight: HashMap::new(),
            status_out: None,
            status_rtt: None,
            alone: None,
            hold: None,
        }
    }

    fn has_room(&self) -> bool {
        self.sent.len() + self.inflight.len() < self.size
            && self.hold.is_none_or(|until| Instant::now() >= until)
    }

    fn holding(&self) -> bool {
        self.hold.is_some_and(|until| Instant::now() < until)
    }

    fn hold_end(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.hold.unwrap_or_else(Instant::now))
    }

    /// The strike window W of this connection, once its status message came back.
    fn strike_window(&self) -> Option<Duration> {
        self.status_rtt
            .map(|rtt| (rtt * STRIKE_RTTS).max(STRIKE_MIN))
    }

    fn on_event(&mut self, event: Event, delivered: &mut Deliveries) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => match self.sent.pop_front() {
                Some(Sent::Row(d, 0)) => {
                    self.acked_rows += 1;
                    delivered.push(d);
                }
                Some(Sent::Row(d, _)) => {
                    if self.size == 1 {
                        self.alone = Some((d.id, Instant::now()));
                    }
                    self.inflight.insert(pkid, InFlight::Row(d));
                }
                Some(Sent::Status) => {
                    self.status_out.get_or_insert_with(Instant::now);
                    self.inflight.insert(pkid, InFlight::Status);
                }
                None => error!(
                    pkid,
                    "cloud client sent a publish the uplink did not ask for"
                ),
            },
            Event::Incoming(Packet::PubAck(ack)) => match self.inflight.remove(&ack.pkid) {
                Some(InFlight::Row(d)) => {
                    self.acked_rows += 1;
                    if self.alone.is_some_and(|(id, _)| id == d.id) {
                        self.alone = None;
                    }
                    delivered.push(d);
                }
                Some(InFlight::Status) if self.status_rtt.is_none() => {
                    self.status_rtt = self.status_out.map(|at| at.elapsed());
                    if self.size == 1 {
                        self.hold = self.strike_window().map(|w| Instant::now() + w);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// How the connection ended, for the reconnect and poison logic.
    fn lost(&self, error: String) -> End {
        let in_flight = self.inflight.values().filter_map(|f| match f {
            InFlight::Row(d) => Some(d.id),
            InFlight::Status => None,
        });
        let requested = self.sent.iter().filter_map(|s| match s {
            Sent::Row(d, _) => Some(d.id),
            Sent::Status => None,
        });
        let alone = match (self.alone, self.strike_window()) {
            (Some((id, at)), Some(window)) if at.elapsed() <= window => Some(id),
            _ => None,
        };
        End::Lost {
            error,
            was_up: self.opened.elapsed() >= STABLE_AFTER,
            progressed: self.acked_rows > 0,
            head: in_flight.chain(requested).min(),
            alone,
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
