//! The broker-alone workloads' clients, on raw MQTT 3.1.1 packets so that the broker, not
//! the bench, is what a run measures: publishers that write a window of messages per
//! system call, subscribers that acknowledge all the publishes of one read in one write,
//! and idle devices that connect, subscribe and sit.
//!
//! A payload is 64 bytes: `SSSS:QQQQQQQQQQ:` (source, sequence number) padded with `x`.
//! Every subscriber takes every source's messages, so each keeps a bit per sequence number
//! and source: losses and duplicates per subscriber, without keeping payloads.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::support::raw::{
    connect_packet, publish_qos1_packet, string, subscribe_packet, with_header, RawClient,
};

const PAYLOAD: usize = 64;
const KEEP_ALIVE: u16 = 60;
/// Most publishes one write carries.
const BATCH: usize = 64;
/// How long a publisher waits for a lagging subscriber before it counts the lag as lost
/// (QoS 0 messages a broker dropped never arrive) and goes on.
pub const STALL: Duration = Duration::from_millis(250);
/// Most a handshake (CONNACK, SUBACK) may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Most a publisher waits for its last acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// One bit per sequence number.
#[derive(Default, Clone)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; false if it was set already.
    fn set(&mut self, i: usize) -> bool {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }

    pub fn get(&self, i: usize) -> bool {
        self.0
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }
}

/// What keeps the publishers from outrunning the subscribers: they send only while the
/// messages published and not yet delivered to the slowest subscriber stay within `lag`,
/// below both brokers' queue per subscriber (1000 messages by default), so that a run
/// measures how fast messages pass, not how a broker sheds a flood.
pub struct Flow {
    lag: usize,
    published: AtomicUsize,
    /// Distinct messages each subscriber has.
    delivered: Vec<AtomicUsize>,
    /// Lag a publisher stopped waiting for after [`STALL`].
    forgiven: AtomicUsize,
    stalls: AtomicUsize,
    progress: Notify,
}

impl Flow {
    pub fn new(subscribers: usize, lag: usize) -> Arc<Self> {
        Arc::new(Flow {
            lag,
            published: AtomicUsize::new(0),
            delivered: (0..subscribers).map(|_| AtomicUsize::new(0)).collect(),
            forgiven: AtomicUsize::new(0),
            stalls: AtomicUsize::new(0),
            progress: Notify::new(),
        })
    }

    fn behind(&self) -> usize {
        let published = self.published.load(Ordering::SeqCst);
        let slowest = self
            .delivered
            .iter()
            .map(|d| d.load(Ordering::SeqCst))
            .min()
            .unwrap_or(published);
        published.saturating_sub(slowest + self.forgiven.load(Ordering::SeqCst))
    }

    fn room(&self) -> usize {
        self.lag.saturating_sub(self.behind())
    }

    fn stalled(&self) {
        self.stalls.fetch_add(1, Ordering::SeqCst);
        self.forgiven.fetch_add(self.behind(), Ordering::SeqCst);
    }

    /// Times a publisher waited [`STALL`] for a subscriber in vain.
    pub fn stalls(&self) -> usize {
        self.stalls.load(Ordering::SeqCst)
    }

    /// Distinct messages each subscriber has so far.
    pub fn delivered(&self) -> Vec<usize> {
        self.delivered
            .iter()
            .map(|d| d.load(Ordering::SeqCst))
            .collect()
    }
}

/// A reusable PUBLISH of `topic` whose packet id and sequence number are written in place.
struct Template {
    packet: Vec<u8>,
    /// Where the packet id is (QoS 1).
    id_at: Option<usize>,
    seq_at: usize,
}

impl Template {
    fn new(topic: &str, qos: u8, source: u32) -> Self {
        let mut payload = format!("{source:04}:{:010}:", 0).into_bytes();
        payload.resize(PAYLOAD, b'x');
        let mut body = string(topic);
        let id_at = (qos > 0).then(|| {
            body.extend_from_slice(&[0, 0]);
            body.len() - 2
        });
        let payload_at = body.len();
        body.extend_from_slice(&payload);
        let packet = with_header(0x30 | (qos << 1), &body);
        let header = packet.len() - body.len();
        Template {
            id_at: id_at.map(|at| header + at),
            seq_at: header + payload_at + 5,
            packet,
        }
    }

    fn append(&mut self, seq: usize, out: &mut Vec<u8>) {
        if let Some(at) = self.id_at {
            self.packet[at..at + 2].copy_from_slice(&packet_id(seq).to_be_bytes());
        }
        let mut n = seq;
        for digit in self.packet[self.seq_at..self.seq_at + 10].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&self.packet);
    }
}

/// Packet ids 1..=65535 in turn; a window far below 65535 never reuses one in flight.
fn packet_id(seq: usize) -> u16 {
    (seq % 65535) as u16 + 1
}

/// The sequence number of the message in flight with `id`, `sent` messages sent so far.
fn seq_of(id: u16, sent: usize) -> Option<usize> {
    let last = sent.checked_sub(1)?;
    let back = (last % 65535 + 65535 - (usize::from(id) - 1) % 65535) % 65535;
    last.checked_sub(back)
}

/// A packet's first byte and body, if `buf` holds all of it, and its length in `buf`.
fn next_packet(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let mut length = 0usize;
    for i in 1..5 {
        let byte = *buf.get(i)?;
        length |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let end = i + 1 + length;
            return (buf.len() >= end).then(|| (buf[0], &buf[i + 1..end], end));
        }
    }
    None
}

/// Bytes read and not yet parsed.
struct ReadBuf {
    data: Vec<u8>,
    filled: usize,
}

impl ReadBuf {
    fn new() -> Self {
        ReadBuf {
            data: vec![0; 256 << 10],
            filled: 0,
        }
    }

    /// Reads once; false when the other side closed the connection.
    async fn fill(&mut self, stream: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<bool> {
        if self.filled == self.data.len() {
            self.data.resize(self.data.len() * 2, 0);
        }
        let n = stream.read(&mut self.data[self.filled..]).await?;
        self.filled += n;
        Ok(n > 0)
    }

    /// Calls `each` with every complete packet, then keeps the incomplete rest.
    fn packets(&mut self, mut each: impl FnMut(u8, &[u8])) {
        let mut at = 0;
        while let Some((first, body, length)) = next_packet(&self.data[at..self.filled]) {
            each(first, body);
            at += length;
        }
        self.data.copy_within(at..self.filled, 0);
        self.filled -= at;
    }
}

/// Connects as `client_id` (MQTT 3.1.1, clean session, keepalive 60 s) and waits for a
/// CONNACK that accepts.
async fn login(port: u16, client_id: &str) -> Result<RawClient, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("{client_id}: connecting: {e}"))?;
    stream.set_nodelay(true).ok();
    let mut client = RawClient { stream };
    client
        .stream
        .write_all(&connect_packet(client_id, KEEP_ALIVE))
        .await
        .map_err(|e| format!("{client_id}: sending CONNECT: {e}"))?;
    match client.read_packet(HANDSHAKE).await {
        Some(p) if p.first() == Some(&0x20) && p.get(3) == Some(&0) => Ok(client),
        Some(p) => Err(format!("{client_id}: refused: CONNACK {p:?}")),
        None => Err(format!("{client_id}: no CONNACK within {HANDSHAKE:?}")),
    }
}

/// Subscribes to `filter` at `qos` and waits for a SUBACK that grants it.
async fn subscribe(client: &mut RawClient, filter: &str, qos: u8) -> Result<(), String> {
    let packet = match qos {
        1 => subscribe_packet(1, &[filter]),
        _ => {
            let mut body = 1u16.to_be_bytes().to_vec();
            body.extend(string(filter));
            body.push(qos);
            with_header(0x82, &body)
        }
    };
    client
        .stream
        .write_all(&packet)
        .await
        .map_err(|e| format!("subscribing to {filter}: {e}"))?;
    match client.read_packet(HANDSHAKE).await {
        Some(p) if p.first() == Some(&0x90) && p.last().is_some_and(|c| *c < 0x80) => Ok(()),
        Some(p) => Err(format!("subscribing to {filter}: refused: SUBACK {p:?}")),
        None => Err(format!(
            "subscribing to {filter}: no SUBACK within {HANDSHAKE:?}"
        )),
    }
}

/// One publisher's run: messages of `source` on `topic` at `qos` for `run_for`, at most
/// `window` unacknowledged (QoS 1), within the [`Flow`]'s lag.
pub struct Publisher {
    pub port: u16,
    pub client_id: String,
    pub topic: String,
    pub source: u32,
    pub qos: u8,
    pub window: usize,
    pub run_for: Duration,
    pub flow: Arc<Flow>,
}

/// What a publisher sent: the messages the broker took (acknowledged at QoS 1, written at
/// QoS 0).
pub struct Published {
    pub sent: usize,
    pub taken: Bits,
    pub taken_count: usize,
    pub started: Instant,
    pub error: Option<String>,
}

impl Publisher {
    pub async fn run(self) -> Published {
        let started = Instant::now();
        let mut published = Published {
            sent: 0,
            taken: Bits::default(),
            taken_count: 0,
            started,
            error: None,
        };
        if let Err(e) = self.publish(&mut published).await {
            published.error = Some(e);
        }
        if self.qos == 0 {
            published.taken_count = published.sent;
            for seq in 0..published.sent {
                published.taken.set(seq);
            }
        }
        published
    }

    async fn publish(&self, out: &mut Published) -> Result<(), String> {
        let client = login(self.port, &self.client_id).await?;
        let (mut rd, mut wr) = client.stream.into_split();
        let mut template = Template::new(&self.topic, self.qos, self.source);
        let mut batch = Vec::with_capacity(BATCH * template.packet.len());
        let mut incoming = ReadBuf::new();
        let end = tokio::time::Instant::now() + self.run_for;
        let acks_due = end + ACK_TIMEOUT;
        loop {
            let sending = tokio::time::Instant::now() < end;
            if !sending && (self.qos == 0 || out.taken_count == out.sent) {
                break;
            }
            if tokio::time::Instant::now() > acks_due {
                return Err(format!(
                    "{} acknowledgements missing after {ACK_TIMEOUT:?}",
                    out.sent - out.taken_count
                ));
            }
            let mut progress = pin!(self.flow.progress.notified());
            progress.as_mut().enable();
            let window_room = match self.qos {
                0 => BATCH,
                _ => self.window - (out.sent - out.taken_count),
            };
            let room = match sending {
                true => window_room.min(self.flow.room()).min(BATCH),
                false => 0,
            };
            if room > 0 {
                batch.clear();
                for seq in out.sent..out.sent + room {
                    template.append(seq, &mut batch);
                }
                self.flow.published.fetch_add(room, Ordering::SeqCst);
                out.sent += room;
                wr.write_all(&batch)
                    .await
                    .map_err(|e| format!("publishing: {e}"))?;
                continue;
            }
            let lagging = sending && window_room > 0;
            tokio::select! {
                read = incoming.fill(&mut rd) => {
                    if !read.map_err(|e| format!("reading acknowledgements: {e}"))? {
                        return Err("the broker closed the connection".into());
                    }
                    let sent = out.sent;
                    incoming.packets(|first, body| {
                        if first == 0x40 && body.len() >= 2 {
                            let id = u16::from_be_bytes([body[0], body[1]]);
                            if let Some(seq) = seq_of(id, sent) {
                                if out.taken.set(seq) {
                                    out.taken_count += 1;
                                }
                            }
                        }
                    });
                }
                _ = &mut progress, if lagging => {}
                _ = tokio::time::sleep(STALL), if lagging => self.flow.stalled(),
                _ = tokio::time::sleep_until(end), if sending => {}
                _ = tokio::time::sleep_until(acks_due), if !sending => {}
            }
        }
        let _ = wr.write_all(&[0xe0, 0]).await;
        Ok(())
    }
}

/// A subscriber connected and subscribed, not reading yet.
pub struct Subscriber {
    client: RawClient,
    index: usize,
    flow: Arc<Flow>,
}

/// What a subscriber received.
pub struct Received {
    /// Per source, the sequence numbers that arrived.
    pub seen: Vec<Bits>,
    pub distinct: usize,
    pub duplicates: usize,
    pub last_at: Option<Instant>,
    pub error: Option<String>,
}

impl Subscriber {
    /// Subscriber `index` of the [`Flow`]: connected and subscribed to `filter` at `qos`.
    pub async fn connect(
        port: u16,
        index: usize,
        filter: &str,
        qos: u8,
        flow: Arc<Flow>,
    ) -> Result<Self, String> {
        let mut client = login(port, &format!("bench-sub-{index}")).await?;
        subscribe(&mut client, filter, qos).await?;
        Ok(Subscriber {
            client,
            index,
            flow,
        })
    }

    /// Reads and acknowledges until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Received {
        let mut received = Received {
            seen: Vec::new(),
            distinct: 0,
            duplicates: 0,
            last_at: None,
            error: None,
        };
        let mut stream = self.client.stream;
        let mut incoming = ReadBuf::new();
        let mut acks = Vec::with_capacity(64 << 10);
        loop {
            tokio::select! {
                read = incoming.fill(&mut stream) => match read {
                    Ok(true) => {}
                    Ok(false) => {
                        received.error = Some("the broker closed the connection".into());
                        break;
                    }
                    Err(e) => {
                        received.error = Some(format!("reading: {e}"));
                        break;
                    }
                },
                _ = stop.changed() => break,
            }
            let before = received.distinct + received.duplicates;
            incoming.packets(|first, body| {
                if first >> 4 == 3 {
                    received.record(first, body, &mut acks);
                }
            });
            if received.distinct + received.duplicates > before {
                received.last_at = Some(Instant::now());
            }
            if !acks.is_empty() {
                if let Err(e) = stream.write_all(&acks).await {
                    received.error = Some(format!("acknowledging: {e}"));
                    break;
                }
                acks.clear();
            }
            self.flow.delivered[self.index].store(received.distinct, Ordering::SeqCst);
            self.flow.progress.notify_waiters();
        }
        received
    }
}

impl Received {
    /// Records one PUBLISH (`first`: its fixed header's first byte) and queues its PUBACK.
    fn record(&mut self, first: u8, body: &[u8], acks: &mut Vec<u8>) {
        let Some(topic_len) = body
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return;
        };
        let mut at = 2 + topic_len;
        if (first >> 1) & 3 > 0 {
            if let Some(id) = body.get(at..at + 2) {
                acks.extend_from_slice(&[0x40, 2, id[0], id[1]]);
            }
            at += 2;
        }
        let Some((source, seq)) = body.get(at..at + 15).and_then(parse) else {
            return;
        };
        if self.seen.len() <= source {
            self.seen.resize(source + 1, Bits::default());
        }
        if self.seen[source].set(seq) {
            self.distinct += 1;
        } else {
            self.duplicates += 1;
        }
    }
}

/// (source, sequence number) of a payload's `SSSS:QQQQQQQQQQ` head.
fn parse(head: &[u8]) -> Option<(usize, usize)> {
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0usize, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + usize::from(d - b'0'))
        })
    };
    Some((number(&head[..4])?, number(&head[5..15])?))
}

/// `count` devices `dev-0` ... connected and each subscribed at QoS 1 to `cmd/dev-N`, at
/// most `parallel` handshakes at a time; then they sit idle. Gives up at the first
/// device that cannot.
pub async fn idle_devices(
    port: u16,
    count: usize,
    parallel: usize,
) -> Result<Vec<RawClient>, String> {
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _turn = gate.acquire().await.expect("the semaphore is never closed");
                let mut device = login(port, &format!("dev-{n}")).await?;
                subscribe(&mut device, &format!("cmd/dev-{n}"), 1).await?;
                Ok::<_, String>(device)
            })
        })
        .collect();
    let mut devices = Vec::with_capacity(count);
    for task in tasks {
        devices.push(task.await.map_err(|e| format!("a device task: {e}"))??);
    }
    Ok(devices)
}

/// Publishes one command at QoS 1 on `cmd/dev-N` from a client of its own and waits
/// (`within`) for `device` to have it; acknowledges it. The time it took.
pub async fn command_reaches(
    port: u16,
    device: &mut RawClient,
    n: usize,
    within: Duration,
) -> Result<Duration, String> {
    let topic = format!("cmd/dev-{n}");
    let mut sender = login(port, "bench-commander").await?;
    let start = Instant::now();
    sender
        .stream
        .write_all(&publish_qos1_packet(&topic, 1, b"open"))
        .await
        .map_err(|e| format!("publishing on {topic}: {e}"))?;
    loop {
        let Some(packet) = device
            .read_packet(within.saturating_sub(start.elapsed()))
            .await
        else {
            return Err(format!("nothing on {topic} within {within:?}"));
        };
        let Some((first, body, _)) = next_packet(&packet) else {
            continue;
        };
        if first >> 4 != 3 {
            continue;
        }
        let took = start.elapsed();
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let got = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
        if (first >> 1) & 3 > 0 {
            let id = &body[2 + topic_len..4 + topic_len];
            let _ = device.stream.write_all(&[0x40, 2, id[0], id[1]]).await;
        }
        let _ = sender.stream.write_all(&[0xe0, 0]).await;
        return match got == topic {
            true => Ok(took),
            false => Err(format!("dev-{n} got a message on {got}, not {topic}")),
        };
    }
}
