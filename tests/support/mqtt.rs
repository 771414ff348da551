//! MQTT clients playing the other parties: devices that publish, actuators that
//! subscribe, and the cloud-side collector that records what reached the cloud.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Large enough for every message a test sends (rumqttc's default is 10 KiB).
const MAX_PACKET: usize = 1 << 20;
/// Generous upper bound for a publisher to get every acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(120);

fn options(port: u16, client_id: &str, clean_session: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean_session)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(100);
    options
}

/// One message as a receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
    pub at: Instant,
}

impl Received {
    fn from(publish: &rumqttc::Publish) -> Self {
        Received {
            topic: publish.topic.clone(),
            payload: String::from_utf8_lossy(&publish.payload).into_owned(),
            qos: publish.qos,
            retain: publish.retain,
            at: Instant::now(),
        }
    }
}

/// The payload of message `seq` of `client_id`: `client-3:000123`.
pub fn seq_payload(client_id: &str, seq: usize) -> String {
    format!("{client_id}:{seq:06}")
}

/// Publishes `n` messages `client_id:000000`, `client_id:000001`, ... on `topic` and
/// returns once the broker acknowledged all of them (QoS 1/2) or all were written
/// (QoS 0). Returns the payloads in publish order.
pub async fn publish_many(
    port: u16,
    client_id: &str,
    topic: &str,
    n: usize,
    qos: QoS,
) -> Vec<String> {
    let payloads: Vec<String> = (0..n).map(|i| seq_payload(client_id, i)).collect();
    let messages = payloads
        .iter()
        .map(|p| (topic.to_string(), p.clone().into_bytes()))
        .collect();
    publish_all(port, client_id, qos, messages).await;
    payloads
}

/// Publishes `messages` (topic, payload) as fast as the in-flight window allows; returns
/// once all are acknowledged, with the instant each one was handed to the client.
pub async fn publish_all(
    port: u16,
    client_id: &str,
    qos: QoS,
    messages: Vec<(String, Vec<u8>)>,
) -> Vec<Instant> {
    run_publisher(port, client_id, qos, messages, Duration::ZERO, false).await
}

/// Like [`publish_all`], one message every `interval`.
pub async fn publish_paced(
    port: u16,
    client_id: &str,
    qos: QoS,
    messages: Vec<(String, Vec<u8>)>,
    interval: Duration,
) -> Vec<Instant> {
    run_publisher(port, client_id, qos, messages, interval, false).await
}

/// Publishes one retained message and waits for its acknowledgement.
pub async fn publish_retained(port: u16, client_id: &str, qos: QoS, topic: &str, payload: &str) {
    let message = vec![(topic.to_string(), payload.as_bytes().to_vec())];
    run_publisher(port, client_id, qos, message, Duration::ZERO, true).await;
}

async fn run_publisher(
    port: u16,
    client_id: &str,
    qos: QoS,
    messages: Vec<(String, Vec<u8>)>,
    interval: Duration,
    retain: bool,
) -> Vec<Instant> {
    let n = messages.len();
    let (client, mut eventloop) = AsyncClient::new(options(port, client_id, true), 100);
    let sender = client.clone();
    let publishing = tokio::spawn(async move {
        let mut sent = Vec::with_capacity(messages.len());
        for (topic, payload) in messages {
            sent.push(Instant::now());
            if sender.publish(topic, qos, retain, payload).await.is_err() {
                break;
            }
            if !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
        }
        sent
    });
    let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
    let mut done = 0;
    while done < n {
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => {
                panic!("publisher {client_id} on port {port}: {e} after {done} of {n} acknowledged")
            }
            Err(_) => {
                panic!(
                    "publisher {client_id}: only {done} of {n} acknowledged in {PUBLISH_TIMEOUT:?}"
                )
            }
        };
        done += match (qos, event) {
            (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_))) => 1,
            (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_))) => 1,
            (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_))) => 1,
            _ => 0,
        };
    }
    disconnect(&client, &mut eventloop).await;
    publishing.await.expect("publisher task")
}

/// Sends DISCONNECT and drives the event loop until it is written (2 s at most).
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

enum Note {
    ConnAck { session_present: bool },
    SubAck,
    Message(Received),
    Closed(String),
}

/// A subscriber (an actuator or a dashboard), on one connection: no reconnects, so a
/// test sees exactly what one session got.
pub struct LocalSubscriber {
    client: AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    task: JoinHandle<()>,
    /// Messages that arrived while waiting for a SUBACK.
    early: VecDeque<Received>,
    pub session_present: bool,
}

impl LocalSubscriber {
    /// Connects and, if `subscription` is given, subscribes and waits for the SUBACK.
    pub async fn connect(
        port: u16,
        client_id: &str,
        clean_session: bool,
        subscription: Option<(&str, QoS)>,
    ) -> Self {
        Self::connect_as(port, client_id, None, clean_session, subscription).await
    }

    /// [`connect`](Self::connect) with a user name and password.
    pub async fn connect_as(
        port: u16,
        client_id: &str,
        login: Option<(&str, &str)>,
        clean_session: bool,
        subscription: Option<(&str, QoS)>,
    ) -> Self {
        let mut options = options(port, client_id, clean_session);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, notes) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let note = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => Note::ConnAck {
                        session_present: ack.session_present,
                    },
                    Ok(Event::Incoming(Packet::SubAck(_))) => Note::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Note::Message(Received::from(&p)),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        let _ = tx.send(Note::Closed("disconnected".into()));
                        return;
                    }
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
        let mut subscriber = LocalSubscriber {
            client,
            notes,
            task,
            early: VecDeque::new(),
            session_present: false,
        };
        match subscriber.next_note(Duration::from_secs(10)).await {
            Some(Note::ConnAck { session_present }) => subscriber.session_present = session_present,
            Some(Note::Closed(e)) => panic!("subscriber {client_id} on port {port}: {e}"),
            _ => panic!("subscriber {client_id} on port {port}: no CONNACK within 10 s"),
        }
        if let Some((filter, qos)) = subscription {
            subscriber.subscribe(filter, qos).await;
        }
        subscriber
    }

    /// Subscribes and waits for the SUBACK; messages that arrive first are kept.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queueing SUBSCRIBE");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_note(left).await {
                Some(Note::SubAck) => return,
                Some(Note::Message(m)) => self.early.push_back(m),
                Some(Note::Closed(e)) => panic!("subscribing to {filter}: {e}"),
                Some(Note::ConnAck { .. }) => {}
                None => panic!("no SUBACK for {filter} within 10 s"),
            }
        }
    }

    async fn next_note(&mut self, timeout: Duration) -> Option<Note> {
        tokio::time::timeout(timeout, self.notes.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message within `timeout`, or `None` (also if the connection closed).
    pub async fn recv(&mut self, timeout: Duration) -> Option<Received> {
        if let Some(m) = self.early.pop_front() {
            return Some(m);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_note(left).await? {
                Note::Message(m) => return Some(m),
                Note::Closed(_) => return None,
                _ => {}
            }
        }
    }

    /// Up to `n` messages, waiting at most `timeout` in total.
    pub async fn recv_n(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }

    /// True while the connection has not been closed (messages that came meanwhile are
    /// kept for `recv`).
    pub fn still_connected(&mut self) -> bool {
        while let Ok(note) = self.notes.try_recv() {
            match note {
                Note::Closed(_) => return false,
                Note::Message(m) => self.early.push_back(m),
                _ => {}
            }
        }
        !self.task.is_finished()
    }

    /// A clean MQTT DISCONNECT (a persistent session stays on the broker).
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

impl Drop for LocalSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The retained message on `topic` at the broker on `port`, if one arrives in `timeout`.
pub async fn retained(port: u16, topic: &str, timeout: Duration) -> Option<String> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = format!(
        "retained-probe-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let mut probe =
        LocalSubscriber::connect(port, &id, true, Some((topic, QoS::AtLeastOnce))).await;
    let deadline = Instant::now() + timeout;
    let mut found = None;
    while let Some(m) = probe
        .recv(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        if m.retain {
            found = Some(m.payload);
            break;
        }
    }
    probe.disconnect().await;
    found
}

/// What reached the cloud: a persistent QoS 1 subscriber on the cloud broker that
/// records every message in arrival order, reconnects (with a small backoff) across
/// broker restarts and subscribes again when the broker lost its session.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

/// The first delivery of each message, per topic, and how many deliveries repeated one.
pub struct Deliveries {
    pub first: HashMap<String, Vec<String>>,
    pub duplicates: usize,
}

impl Collector {
    /// Connects to the broker on `port`, subscribes to `filter` at QoS 1 and returns
    /// once the subscription is acknowledged.
    pub async fn start(port: u16, filter: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = format!(
            "collector-{port}-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let (client, mut eventloop) = AsyncClient::new(options(port, &id, false), 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        let sink = received.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().unwrap().push(Received::from(&p));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.recv())
            .await
            .expect("collector: no SUBACK from the cloud broker within 10 s");
        Collector { received, task }
    }

    /// Every delivery so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Number of distinct (topic, payload) messages received.
    pub fn distinct(&self) -> usize {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .map(|m| (&m.topic, &m.payload))
            .collect::<HashSet<_>>()
            .len()
    }

    /// Waits until `n` distinct messages arrived; false if not within `timeout`.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.distinct() >= n).await
    }

    /// Per topic, payloads in the order of their first delivery; and the duplicates.
    pub fn deliveries(&self) -> Deliveries {
        Deliveries::of(self.received.lock().unwrap().iter())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Deliveries {
    /// First deliveries and duplicates of `messages`, taken in the order given.
    pub fn of<'a>(messages: impl IntoIterator<Item = &'a Received>) -> Self {
        let mut seen = HashSet::new();
        let mut first: HashMap<String, Vec<String>> = HashMap::new();
        let mut duplicates = 0;
        for m in messages {
            if seen.insert((m.topic.clone(), m.payload.clone())) {
                first
                    .entry(m.topic.clone())
                    .or_default()
                    .push(m.payload.clone());
            } else {
                duplicates += 1;
            }
        }
        Deliveries { first, duplicates }
    }

    /// Panics unless each topic's first deliveries are exactly `expected` for it:
    /// nothing lost, nothing extra, in the order sent.
    pub fn assert_exactly(&self, expected: &HashMap<String, Vec<String>>) {
        for (topic, want) in expected {
            let got = self.first.get(topic).map(Vec::as_slice).unwrap_or(&[]);
            if got != want.as_slice() {
                let got_set: HashSet<&String> = got.iter().collect();
                let want_set: HashSet<&String> = want.iter().collect();
                let missing = want_set.difference(&got_set).count();
                let extra = got_set.difference(&want_set).count();
                let first_difference = got.iter().zip(want).position(|(g, w)| g != w);
                panic!(
                    "{topic}: {} delivered, {} expected: {missing} missing, {extra} unexpected; \
                     first out-of-place delivery at index {first_difference:?} \
                     (got {:?}, expected {:?})",
                    got.len(),
                    want.len(),
                    first_difference.map(|i| &got[i]),
                    first_difference.map(|i| &want[i]),
                );
            }
        }
        let unexpected: Vec<&String> = self
            .first
            .keys()
            .filter(|t| !expected.contains_key(*t))
            .collect();
        assert!(
            unexpected.is_empty(),
            "messages on unexpected topics: {unexpected:?}"
        );
    }
}

/// What the cloud should see: cloud topic -> payloads in publish order.
pub type Expected = HashMap<String, Vec<String>>;

/// `devices` clients `device-0`, `device-1`, ... publish `per_device` sequenced QoS 1
/// messages each on `warehouse/load/device-N`, all at once, one every `interval` (zero:
/// as fast as their in-flight windows allow). Returns when every message was PUBACKed
/// by the local broker, with what the cloud should then receive.
pub async fn telemetry_burst(
    port: u16,
    devices: usize,
    per_device: usize,
    interval: Duration,
) -> Expected {
    let publishers: Vec<_> = (0..devices)
        .map(|d| {
            tokio::spawn(async move {
                let id = format!("device-{d}");
                let topic = format!("warehouse/load/{id}");
                let payloads: Vec<String> = (0..per_device).map(|i| seq_payload(&id, i)).collect();
                let messages = payloads
                    .iter()
                    .map(|p| (topic.clone(), p.clone().into_bytes()))
                    .collect();
                run_publisher(port, &id, QoS::AtLeastOnce, messages, interval, false).await;
                (format!("{}{topic}", super::CLOUD_PREFIX), payloads)
            })
        })
        .collect();
    let mut expected = Expected::new();
    for publisher in publishers {
        let (topic, payloads) = publisher.await.expect("a device publisher panicked");
        expected.insert(topic, payloads);
    }
    expected
}
