//! An MQTT 5 device (rumqttc's v5 client), for what only MQTT 5 has: session expiry,
//! message expiry, delayed wills.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use rumqttc::v5::mqttbytes::QoS as QoS5;

/// One message as an MQTT 5 device saw it.
#[derive(Debug, Clone)]
pub struct Received5 {
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
    /// The Message Expiry Interval it came with (what was left of it), seconds.
    pub message_expiry: Option<u32>,
}

enum Note {
    ConnAck(bool),
    SubAck,
    PubAck,
    Message(Received5),
    Closed(String),
}

/// An MQTT 5 subscriber on one connection (no reconnects).
pub struct Device5 {
    client: AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    task: JoinHandle<()>,
    early: Vec<Received5>,
    pub session_present: bool,
}

impl Device5 {
    /// Connects with `clean_start` and a session expiry interval of `expiry` seconds.
    pub async fn connect(port: u16, client_id: &str, clean_start: bool, expiry: u32) -> Self {
        Self::connect_with_will(port, client_id, clean_start, expiry, None).await
    }

    /// [`connect`](Self::connect) with a last will (see [`delayed_will`]). Dropping the device
    /// then ends its connection without DISCONNECT, as a power cut does.
    pub async fn connect_with_will(
        port: u16,
        client_id: &str,
        clean_start: bool,
        expiry: u32,
        will: Option<LastWill>,
    ) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_start(clean_start)
            .set_session_expiry_interval(Some(expiry));
        if let Some(will) = will {
            options.set_last_will(will);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, notes) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let note = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => Note::ConnAck(ack.session_present),
                    Ok(Event::Incoming(Packet::SubAck(_))) => Note::SubAck,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Note::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Note::Message(Received5 {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        qos: p.qos,
                        retain: p.retain,
                        message_expiry: p.properties.and_then(|p| p.message_expiry_interval),
                    }),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Note::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(note).is_err() {
                    return;
                }
            }
        });
        let mut device = Device5 {
            client,
            notes,
            task,
            early: Vec::new(),
            session_present: false,
        };
        match device.next(Duration::from_secs(10)).await {
            Some(Note::ConnAck(present)) => device.session_present = present,
            Some(Note::Closed(e)) => panic!("MQTT 5 device {client_id}: {e}"),
            _ => panic!("MQTT 5 device {client_id}: no CONNACK within 10 s"),
        }
        device
    }

    async fn next(&mut self, timeout: Duration) -> Option<Note> {
        tokio::time::timeout(timeout, self.notes.recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queueing SUBSCRIBE");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Note::SubAck) => return,
                Some(Note::Message(m)) => self.early.push(m),
                Some(Note::Closed(e)) => panic!("subscribing to {filter}: {e}"),
                Some(Note::ConnAck(_) | Note::PubAck) => {}
                None => panic!("no SUBACK for {filter} within 10 s"),
            }
        }
    }

    /// Publishes at QoS 1 with a Message Expiry Interval of `expiry` seconds (None: the
    /// message never expires) and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &str, expiry: Option<u32>) {
        let properties = PublishProperties {
            message_expiry_interval: expiry,
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
                properties,
            )
            .await
            .expect("queueing PUBLISH");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Note::PubAck) => return,
                Some(Note::Message(m)) => self.early.push(m),
                Some(Note::Closed(e)) => panic!("publishing on {topic}: {e}"),
                Some(Note::ConnAck(_) | Note::SubAck) => {}
                None => panic!("no PUBACK for {topic} within 10 s"),
            }
        }
    }

    /// The next message within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Received5> {
        if !self.early.is_empty() {
            return Some(self.early.remove(0));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Note::Message(m) => return Some(m),
                Note::Closed(_) => return None,
                _ => {}
            }
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(note) = self.notes.recv().await {
                if matches!(note, Note::Closed(_)) {
                    break;
                }
            }
        })
        .await;
        self.task.abort();
    }
}

/// A QoS 1 will, not retained, published `delay` seconds after the connection is lost
/// (MQTT 5 Will Delay Interval).
pub fn delayed_will(topic: &str, payload: &str, delay: u32) -> LastWill {
    let properties = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    LastWill::new(topic, payload, QoS::AtLeastOnce, false, Some(properties))
}

impl Drop for Device5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 5 sensor that names `topic` once, by topic alias 1, and then publishes every
/// payload (QoS 1, retained) by the alias alone; returns once all are acknowledged.
pub async fn publish_by_alias(port: u16, client_id: &str, topic: &str, payloads: &[&str]) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    for (i, payload) in payloads.iter().enumerate() {
        let properties = PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        let named = if i == 0 { topic } else { "" };
        client
            .publish_with_properties(
                named,
                QoS::AtLeastOnce,
                true,
                payload.to_string(),
                properties,
            )
            .await
            .expect("queueing an aliased PUBLISH");
    }
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while acked < payloads.len() {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("aliased publisher: {e} after {acked} acknowledged"),
            Err(_) => panic!(
                "aliased publisher: {acked} of {} acknowledged",
                payloads.len()
            ),
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
}
