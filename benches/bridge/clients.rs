//! The bench's own MQTT parties: devices that stamp each message with the moment it was
//! handed to the client, and a tally that reads those stamps where the messages arrive
//! (the cloud for telemetry, the local broker for commands). One monotonic time base for
//! both: [`base`], an `Instant` of this process.
//!
//! A payload is 64 bytes: `SSSS:QQQQQQQQQQ:TTTTTTTTTTTTTT:` (source, sequence number, send
//! time in µs since [`base`]) padded with `x`. Each source publishes its sequence in order,
//! so the tally sees losses, duplicates and reordering per source without keeping payloads.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;

pub const PAYLOAD: usize = 64;
/// The source of readiness probes; never part of a measurement.
pub const PROBE: u32 = 9999;

/// The instant all stamps count from.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn micros(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_micros() as u64
}

fn stamped(source: u32, seq: u32, at: Instant) -> Vec<u8> {
    let mut payload = format!("{source:04}:{seq:010}:{:014}:", micros(at)).into_bytes();
    payload.resize(PAYLOAD, b'x');
    payload
}

/// (source, sequence number, send time in µs since [`base`]).
fn parse(payload: &[u8]) -> Option<(u32, u32, u64)> {
    let text = std::str::from_utf8(payload.get(..31)?).ok()?;
    let mut parts = text.split(':');
    let source = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((source, seq, sent))
}

fn options(port: u16, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(100);
    options
}

/// One device's run: `count` messages of `source` on `topic`, one every `interval` (zero:
/// as fast as the in-flight window allows), until done, `stop` is set, or the connection
/// fails (a broker killed under it).
pub struct Device {
    pub port: u16,
    pub client_id: String,
    pub topic: String,
    pub source: u32,
    pub count: usize,
    pub interval: Duration,
    pub stop: Option<Arc<AtomicBool>>,
}

/// What a device sent: for each sequence number, when it was handed to the client and
/// whether the broker acknowledged it.
pub struct Sent {
    pub at: Vec<Instant>,
    pub acked: Vec<bool>,
    pub error: Option<String>,
}

impl Sent {
    pub fn acked_count(&self) -> usize {
        self.acked.iter().filter(|a| **a).count()
    }

    pub fn first(&self) -> Option<Instant> {
        self.at.first().copied()
    }
}

/// Most a device waits for its last acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(600);

impl Device {
    pub fn new(port: u16, client_id: &str, topic: &str, source: u32, count: usize) -> Self {
        Device {
            port,
            client_id: client_id.to_string(),
            topic: topic.to_string(),
            source,
            count,
            interval: Duration::ZERO,
            stop: None,
        }
    }

    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    pub fn until(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    pub fn spawn(self) -> JoinHandle<Sent> {
        tokio::spawn(self.run())
    }

    pub async fn run(self) -> Sent {
        let (client, mut eventloop) = AsyncClient::new(options(self.port, &self.client_id), 100);
        // Sequence numbers in the order they were handed to the client: rumqttc reports
        // outgoing publishes in that order, each with the packet id it gave it.
        let order: Arc<Mutex<VecDeque<u32>>> = Arc::default();
        let sent_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let queued = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let publishing = {
            let (client, order, sent_at) = (client.clone(), order.clone(), sent_at.clone());
            let (queued, finished) = (queued.clone(), finished.clone());
            let Device {
                topic,
                source,
                count,
                interval,
                stop,
                ..
            } = self;
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                for seq in 0..count as u32 {
                    if stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                        break;
                    }
                    if !interval.is_zero() {
                        tokio::time::sleep_until(start + interval * seq).await;
                    }
                    let now = Instant::now();
                    sent_at.lock().unwrap().push(now);
                    order.lock().unwrap().push_back(seq);
                    queued.fetch_add(1, Ordering::SeqCst);
                    let payload = stamped(source, seq, now);
                    if client
                        .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                finished.store(true, Ordering::SeqCst);
            })
        };
        let mut pkids: HashMap<u16, u32> = HashMap::new();
        let mut acked = vec![false; self.count];
        let mut acks = 0;
        let mut error = None;
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            if finished.load(Ordering::SeqCst) && acks == queued.load(Ordering::SeqCst) {
                break;
            }
            if Instant::now() > deadline {
                error = Some(format!("acknowledgements missing after {ACK_TIMEOUT:?}"));
                break;
            }
            let event =
                match tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await {
                    Err(_) => continue,
                    Ok(Err(e)) => {
                        error = Some(e.to_string());
                        break;
                    }
                    Ok(Ok(event)) => event,
                };
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    if let Some(seq) = order.lock().unwrap().pop_front() {
                        pkids.insert(pkid, seq);
                    }
                }
                Event::Incoming(Packet::PubAck(ack)) => {
                    if let Some(seq) = pkids.remove(&ack.pkid) {
                        acked[seq as usize] = true;
                        acks += 1;
                    }
                }
                _ => {}
            }
        }
        publishing.abort();
        let _ = publishing.await;
        if error.is_none() {
            disconnect(&client, &mut eventloop).await;
        }
        let at = std::mem::take(&mut *sent_at.lock().unwrap());
        acked.truncate(at.len());
        Sent { at, acked, error }
    }
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

/// One first delivery.
#[derive(Clone, Copy)]
pub struct Arrival {
    /// Send stamp, µs since [`base`].
    pub sent_us: u64,
    pub at: Instant,
}

impl Arrival {
    pub fn latency_us(&self) -> u64 {
        micros(self.at).saturating_sub(self.sent_us)
    }
}

#[derive(Default)]
struct SourceLog {
    seen: Vec<bool>,
    /// Highest sequence number seen so far.
    highest: Option<u32>,
    duplicates: usize,
    /// First deliveries that came after a higher sequence number of the same source.
    reordered: usize,
    arrivals: Vec<Arrival>,
}

#[derive(Default)]
struct Log {
    sources: HashMap<u32, SourceLog>,
}

/// A QoS 1 subscriber that records, per source, the first delivery of each sequence
/// number with its arrival time, the duplicates and the reordering. Reconnects (and
/// subscribes again) if its connection drops.
pub struct Tally {
    log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

/// What one or more sources delivered.
pub struct Summary {
    pub distinct: usize,
    pub duplicates: usize,
    pub reordered: usize,
    pub latencies_us: Vec<u64>,
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
}

impl Summary {
    /// `q` in 0..=1 of the latencies, in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> Option<f64> {
        percentile(&self.latencies_us, q).map(|us| us as f64 / 1000.0)
    }
}

pub fn percentile(values: &[u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Tally {
    /// Connects to the broker on `port`, subscribes to `filter` at QoS 1, and returns
    /// once the subscription is acknowledged.
    pub async fn start(port: u16, filter: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!("tally-{port}-{}", NEXT.fetch_add(1, Ordering::SeqCst));
        let (client, mut eventloop) = AsyncClient::new(options(port, &id), 100);
        let log: Arc<Mutex<Log>> = Arc::default();
        let (subscribed_tx, mut subscribed) = tokio::sync::mpsc::unbounded_channel();
        let sink = log.clone();
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
                        let at = Instant::now();
                        if let Some((source, seq, sent_us)) = parse(&p.payload) {
                            sink.lock().unwrap().record(source, seq, sent_us, at);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.recv())
            .await
            .expect("tally: no SUBACK within 10 s");
        Tally { log, task }
    }

    /// Distinct messages of `sources` received so far.
    pub fn distinct(&self, sources: &[u32]) -> usize {
        let log = self.log.lock().unwrap();
        sources
            .iter()
            .filter_map(|s| log.sources.get(s))
            .map(|s| s.arrivals.len())
            .sum()
    }

    pub fn seen(&self, source: u32, seq: u32) -> bool {
        let log = self.log.lock().unwrap();
        log.sources
            .get(&source)
            .and_then(|s| s.seen.get(seq as usize).copied())
            .unwrap_or(false)
    }

    pub fn summary(&self, sources: &[u32]) -> Summary {
        let log = self.log.lock().unwrap();
        let mut summary = Summary {
            distinct: 0,
            duplicates: 0,
            reordered: 0,
            latencies_us: Vec::new(),
            first_at: None,
            last_at: None,
        };
        for s in sources.iter().filter_map(|s| log.sources.get(s)) {
            summary.distinct += s.arrivals.len();
            summary.duplicates += s.duplicates;
            summary.reordered += s.reordered;
            summary
                .latencies_us
                .extend(s.arrivals.iter().map(Arrival::latency_us));
            if let (Some(first), Some(last)) = (s.arrivals.first(), s.arrivals.last()) {
                summary.first_at = Some(summary.first_at.map_or(first.at, |f| f.min(first.at)));
                summary.last_at = Some(summary.last_at.map_or(last.at, |l| l.max(last.at)));
            }
        }
        summary
    }

    /// Waits until `expected` distinct messages of `sources` arrived, or nothing new came
    /// for `quiet` (three times that before the first new one: a gateway reconnecting
    /// with a large backlog may take a while to start), or `max` passed.
    pub async fn settle(&self, sources: &[u32], expected: usize, quiet: Duration, max: Duration) {
        let start = Instant::now();
        let initial = self.distinct(sources);
        let mut last = (initial, start);
        loop {
            let n = self.distinct(sources);
            if n != last.0 {
                last = (n, Instant::now());
            }
            let idle = if n == initial { quiet * 3 } else { quiet };
            if n >= expected || last.1.elapsed() > idle || start.elapsed() > max {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes probes to `topic` on `port` until one reaches this tally: the path
    /// from there to here works end to end. Panics after `max`.
    pub async fn wait_path(&self, port: u16, topic: &str, max: Duration) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let start = Instant::now();
        let mut seq = 0u32;
        while self.distinct(&[PROBE]) == 0 {
            assert!(
                start.elapsed() < max,
                "no probe on {topic} (port {port}) came through within {max:?}"
            );
            let id = format!("probe-{}", NEXT.fetch_add(1, Ordering::SeqCst));
            let (client, mut eventloop) = AsyncClient::new(options(port, &id), 10);
            let _ = client.try_publish(
                topic,
                QoS::AtLeastOnce,
                false,
                stamped(PROBE, seq, Instant::now()),
            );
            seq += 1;
            let _ = tokio::time::timeout(Duration::from_millis(300), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Incoming(Packet::PubAck(_))) {
                        break;
                    }
                }
            })
            .await;
            disconnect(&client, &mut eventloop).await;
            let deadline = Instant::now() + Duration::from_millis(300);
            while self.distinct(&[PROBE]) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

impl Log {
    fn record(&mut self, source: u32, seq: u32, sent_us: u64, at: Instant) {
        let s = self.sources.entry(source).or_default();
        let i = seq as usize;
        if s.seen.len() <= i {
            s.seen.resize(i + 1, false);
        }
        if s.seen[i] {
            s.duplicates += 1;
            return;
        }
        s.seen[i] = true;
        if s.highest.is_some_and(|h| h > seq) {
            s.reordered += 1;
        }
        s.highest = Some(s.highest.map_or(seq, |h| h.max(seq)));
        s.arrivals.push(Arrival { sent_us, at });
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.task.abort();
    }
}
