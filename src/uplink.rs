//! The telemetry connection: sends what the outbox holds, in order, and deletes a row only
//! when the cloud has acknowledged it (QoS 1) or it was written (QoS 0).
//!
//! rumqttc's own session state is not trusted (it drops or replays pending publishes on its
//! own terms, see design.md): every connection gets a fresh client and event loop, and after
//! each CONNACK the uplink resends from the oldest row still in the outbox. The outbox is the
//! only source of resends, so duplicates stay within the in-flight window.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tracing::{error, info};

use crate::cloud::{error_chain, CloudLink};
use crate::health::{add, LinkState, SharedHealth};
use crate::outbox::{OutboxHandle, Row};

/// Rows read from the outbox ahead of the in-flight window.
const PREFETCH: usize = 2048;
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
    Lost { error: String, was_up: bool },
}

impl Uplink {
    pub async fn run(mut self) {
        let mut reconnect = self.cloud.reconnect();
        loop {
            self.health.telemetry.set(LinkState::Connecting);
            let (client, eventloop) = self.connect();
            let End::Lost { error, was_up } = self.session(client, eventloop).await else {
                return;
            };
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

    async fn session(&mut self, client: AsyncClient, mut eventloop: EventLoop) -> End {
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
                    info!(client_id = %c.client_id, host = %c.url.host, port = c.url.port,
                        tls = c.url.tls, session_present = ack.session_present, "cloud telemetry link up");
                    break;
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return End::Lost {
                        error: format!("cloud refused the connection: {:?}", ack.code),
                        was_up: false,
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    return End::Lost {
                        error: error_chain(&e),
                        was_up: false,
                    }
                }
            }
        }
        self.health.telemetry.set(LinkState::Up);
        let mut window = Window::new(c.max_inflight as usize);
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
                    .fetch(fetched_up_to, PREFETCH - buffer.len())
                    .await
                {
                    Ok(rows) => {
                        if let Some(last) = rows.last() {
                            fetched_up_to = last.id;
                        } else {
                            fetched_up_to = *committed.borrow();
                        }
                        buffer.extend(rows);
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
                    return End::Lost {
                        error: "telemetry client closed".into(),
                        was_up: true,
                    };
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
                    }
                    Err(e) => return End::Lost { error: error_chain(&e), was_up: true },
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
                Some(Sent::Row { id, qos: 0 }) => self.acked(id).await?,
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
    sent: VecDeque<Sent>,
    /// pkid -> outbox row (None for the status message).
    inflight: HashMap<u16, Option<i64>>,
}

impl Window {
    fn new(size: usize) -> Self {
        Window {
            size,
            sent: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    fn has_room(&self) -> bool {
        self.sent.len() + self.inflight.len() < self.size
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
