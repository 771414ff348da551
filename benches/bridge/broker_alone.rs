//! The local broker alone, no cloud traffic: messages between local clients on `bench/...`
//! topics (no `[[uplink]]` rule takes them), and idle device connections. For bridgehead,
//! a plain mosquitto, and today's main when `BENCH_BASELINE_BIN` names its binary. A
//! gateway still keeps its cloud link up, to a cloud mosquitto of its own, which these
//! workloads never use.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::raw_clients::{
    command_reaches, idle_devices, Bits, Flow, Published, Publisher, Subscriber, STALL,
};
use crate::report::{MemoryRow, Row};
use crate::setups::{cost, Local, ProcSample, Setup};
use crate::support::Mosquitto;
use crate::workloads::Sizes;

/// The local broker setups, in the order their rows are printed.
pub const SETUPS: [Setup; 3] = [Setup::Bridgehead, Setup::MosquittoPlain, Setup::Baseline];

/// Unacknowledged QoS 1 messages a publisher keeps in flight.
const WINDOW: usize = 100;
/// Messages the publishers may be ahead of the slowest subscriber (see [`Flow`]).
const LAG: usize = 500;
/// How long with no new delivery ends the wait for the last ones.
const QUIET: Duration = Duration::from_secs(2);
/// How long a freshly connected broker is left alone before its RSS counts as "before".
const SETTLE: Duration = Duration::from_secs(2);
/// Device handshakes under way at once.
const PARALLEL_HANDSHAKES: usize = 50;

/// One case of the `local` workload: publishers and subscribers, all on `bench/local/`.
#[derive(Clone, Copy)]
pub struct Fan {
    /// Its number in the printed tables.
    pub label: &'static str,
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: u8,
}

/// The `local` workload's cases, in the order they run.
pub const FANS: [Fan; 3] = [
    Fan {
        label: "11a",
        publishers: 4,
        subscribers: 1,
        qos: 1,
    },
    Fan {
        label: "11b",
        publishers: 1,
        subscribers: 20,
        qos: 0,
    },
    Fan {
        label: "11c",
        publishers: 1,
        subscribers: 20,
        qos: 1,
    },
];

impl Fan {
    pub fn title(self, run_for: Duration) -> String {
        format!(
            "{}. broker alone: {} publisher{} -> {} subscriber{}, QoS {}, 64-byte payloads, publishing for {:.0} s \
             (QoS 1: window {WINDOW} per publisher; at most {LAG} messages ahead of the slowest subscriber; \
             arrived and msg/s: deliveries, first send to last delivery; CPU, B written: per delivery, broker process)",
            self.label,
            self.publishers,
            if self.publishers == 1 { "" } else { "s" },
            self.subscribers,
            if self.subscribers == 1 { "" } else { "s" },
            self.qos,
            run_for.as_secs_f64()
        )
    }
}

fn not_run(setup: Setup) -> Row {
    let mut row = Row::new(setup);
    row.not_run = true;
    row.notes.push("BENCH_BASELINE_BIN not set".into());
    row
}

/// A `local` case against `setup`: every subscriber has every publisher's messages.
pub async fn fan(setup: Setup, fan: Fan, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let Some(local) = Local::alone(setup, cloud.port) else {
        return not_run(setup);
    };
    let flow = Flow::new(fan.subscribers, LAG);
    let (stop, stopped) = watch::channel(false);
    let mut listening = Vec::new();
    for index in 0..fan.subscribers {
        match Subscriber::connect(local.port(), index, "bench/local/#", fan.qos, flow.clone()).await
        {
            Ok(subscriber) => listening.push(tokio::spawn(subscriber.run(stopped.clone()))),
            Err(e) => {
                let mut row = Row::new(setup);
                row.notes.push(format!("subscriber: {e}"));
                return row;
            }
        }
    }
    let before = local.sample();
    let bench_before = ProcSample::read(std::process::id());
    let publishing: Vec<_> = (0..fan.publishers)
        .map(|p| {
            tokio::spawn(
                Publisher {
                    port: local.port(),
                    client_id: format!("bench-pub-{p}"),
                    topic: format!("bench/local/pub-{p}"),
                    source: p as u32,
                    qos: fan.qos,
                    window: WINDOW,
                    run_for: sizes.alone_for,
                    flow: flow.clone(),
                }
                .run(),
            )
        })
        .collect();
    let mut published = Vec::new();
    for task in publishing {
        published.push(task.await.expect("a publisher task panicked"));
    }
    let expected: usize = published.iter().map(|p| p.taken_count).sum();
    wait_deliveries(&flow, expected, sizes.max_wait).await;
    let after = local.sample();
    let bench_after = ProcSample::read(std::process::id());
    let _ = stop.send(true);
    let mut received = Vec::new();
    for task in listening {
        received.push(task.await.expect("a subscriber task panicked"));
    }

    let mut row = Row::new(setup);
    row.best_effort = fan.qos == 0;
    row.sent = published.iter().map(|p| p.taken_count).sum();
    row.arrived = received.iter().map(|r| r.distinct).sum();
    row.duplicates = received.iter().map(|r| r.duplicates).sum();
    row.lost = received.iter().map(|r| missing(&published, &r.seen)).sum();
    let first_send = published.iter().map(|p| p.started).min();
    let last_delivery = received.iter().filter_map(|r| r.last_at).max();
    row.rate = rate(row.arrived, first_send, last_delivery);
    if let Some(c) = cost(before, after, row.arrived) {
        row.bytes_per_msg = Some(c.bytes_per_msg);
        row.cpu_us_per_msg = Some(c.cpu_us_per_msg);
    }
    row.rss_mib = local.peak_rss_mib();
    if let Some(c) = cost(bench_before, bench_after, row.arrived) {
        row.notes.push(format!(
            "the bench's clients: {:.1} µs CPU per delivery",
            c.cpu_us_per_msg
        ));
    }
    if fan.subscribers > 1 {
        row.notes.push(format!(
            "{} messages x {} subscribers",
            row.sent, fan.subscribers
        ));
    }
    if flow.stalls() > 0 {
        row.notes.push(format!(
            "publishers waited {} times {} ms for a subscriber in vain",
            flow.stalls(),
            STALL.as_millis()
        ));
    }
    for e in published.iter().filter_map(|p| p.error.as_ref()) {
        row.notes.push(format!("publisher: {e}"));
    }
    for e in received.iter().filter_map(|r| r.error.as_ref()) {
        row.notes.push(format!("subscriber: {e}"));
    }
    row.notes.extend(broker_notes(setup, &local));
    row
}

/// Messages the broker took from `published` that a subscriber's `seen` lacks.
fn missing(published: &[Published], seen: &[Bits]) -> usize {
    published
        .iter()
        .enumerate()
        .map(|(source, p)| {
            (0..p.sent)
                .filter(|seq| p.taken.get(*seq) && !seen.get(source).is_some_and(|s| s.get(*seq)))
                .count()
        })
        .sum()
}

/// Waits until every subscriber has `expected` messages, or none had a new one for
/// [`QUIET`], or `max` passed.
async fn wait_deliveries(flow: &Flow, expected: usize, max: Duration) {
    let start = Instant::now();
    let mut last = (flow.delivered(), Instant::now());
    loop {
        let now = flow.delivered();
        if now.iter().all(|n| *n >= expected) || last.1.elapsed() > QUIET || start.elapsed() > max {
            return;
        }
        if now != last.0 {
            last = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rate(n: usize, from: Option<Instant>, to: Option<Instant>) -> Option<f64> {
    let seconds = to?.saturating_duration_since(from?).as_secs_f64();
    (seconds > 0.0).then(|| n as f64 / seconds)
}

/// The losses a broker counts or logs itself, and what a gateway's log warned about.
fn broker_notes(setup: Setup, local: &Local) -> Vec<String> {
    let mut notes = Vec::new();
    let gateway = match local {
        Local::Bridgehead(gateway) => gateway,
        _ => {
            let log = local.log();
            if let Some(line) = log.lines().find(|l| l.contains("are being dropped")) {
                let line = line.split_once(": ").map_or(line, |(_, text)| text);
                notes.push(format!("its log: {line}"));
            }
            return notes;
        }
    };
    let status = gateway.live_status().unwrap_or_default();
    // Messages dropped, and device connections refused or closed. Today's main names them
    // as its rumqttd and front door did (`local_overruns`: messages rumqttd skipped for a
    // lagging subscriber).
    let counters: &[&str] = match setup {
        Setup::Baseline => &[
            "queued_dropped",
            "state_errors",
            "local_overruns",
            "front_door_refused",
            "front_door_timeouts",
            "front_door_malformed",
            "front_door_oversize",
        ],
        _ => &[
            "queued_dropped",
            "state_errors",
            "connections_refused",
            "connect_timeouts",
            "malformed_packets",
            "oversize_packets",
            "keepalive_timeouts",
        ],
    };
    for counter in counters {
        let n = status["counters"][counter].as_u64().unwrap_or(0);
        if n > 0 {
            notes.push(format!("{counter} {n}"));
        }
    }
    let log = local.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if let Some(first) = warnings.first() {
        // Without its time stamp.
        let first = first.split_once(' ').map_or(*first, |(_, rest)| rest);
        let first: String = first.chars().take(160).collect();
        notes.push(format!(
            "log: {} WARN/ERROR lines, the first: {first}",
            warnings.len()
        ));
    }
    notes
}

/// Raises this process's open-files soft limit to its hard limit, so that it (and the
/// brokers it starts, which inherit it) can hold the idle devices' sockets.
pub fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The `idle1000` workload against `setup`: the broker's RSS before and with `count` idle
/// devices, each subscribed (QoS 1) to its own `cmd/dev-N`; then whether a command on
/// `cmd/dev-{count/2}` reaches its device (printed, not asserted).
pub async fn idle(setup: Setup, count: usize) -> MemoryRow {
    let mut row = MemoryRow {
        setup,
        connections: None,
        before_mib: None,
        with_mib: None,
        notes: Vec::new(),
    };
    let cloud = Mosquitto::start();
    let Some(local) = Local::alone(setup, cloud.port) else {
        row.notes.push("BENCH_BASELINE_BIN not set".into());
        return row;
    };
    tokio::time::sleep(SETTLE).await;
    row.before_mib = local.rss_mib();
    let started = Instant::now();
    let mut devices = match idle_devices(local.port(), count, PARALLEL_HANDSHAKES).await {
        Ok(devices) => devices,
        Err(e) => {
            row.notes.push(format!("devices: {e}"));
            return row;
        }
    };
    let connecting = started.elapsed();
    row.connections = Some(devices.len());
    tokio::time::sleep(SETTLE).await;
    row.with_mib = local.rss_mib();
    row.notes.push(format!(
        "connected and subscribed in {:.1} s",
        connecting.as_secs_f64()
    ));
    let n = count / 2;
    let check =
        match command_reaches(local.port(), &mut devices[n], n, Duration::from_secs(5)).await {
            Ok(took) => format!(
                "a command on cmd/dev-{n} reached dev-{n} in {:.1} ms",
                took.as_secs_f64() * 1000.0
            ),
            Err(e) => format!("CHECK FAILED: {e}"),
        };
    println!("- idle connections, {}: {check}", setup.name());
    row.notes.push(check);
    row.notes.extend(broker_notes(setup, &local));
    row
}
