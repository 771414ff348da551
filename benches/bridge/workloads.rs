//! The workloads, each run against a fresh cloud mosquitto (the same config for every
//! setup) so that no run inherits another's sessions or backlog.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clients::{Device, Sent, Summary, Tally};
use crate::report::Row;
use crate::setups::{bridgehead_config, cost, Cost, Local, Setup};
use crate::support::{Gateway, Mosquitto, Proxy};

/// Everything the telemetry rows send reaches the cloud under this prefix.
const CLOUD_FILTER: &str = "fleet/gw-test/#";
const COMMAND_TOPIC: &str = "fleet/gw-test/cmd/bench/valve";
const COMMAND_PROBE: &str = "fleet/gw-test/cmd/bench/probe";
/// The live-first rule's topic (row 8) and its source number.
const LIVE_TOPIC: &str = "live/sensor";
const LIVE: u32 = 100;
/// How long a gateway may take to pass a first probe after it started.
const READY: Duration = Duration::from_secs(30);
/// Longer than bridgehead's default `queue.commit_interval` (1 s) and the tuned mosquitto's
/// `autosave_interval 1`: what either was given to make durable has been.
const DURABLE_AFTER: Duration = Duration::from_millis(1500);
/// The crash window allowed in row 7: `queue.commit_interval` and `autosave_interval`.
const CRASH_WINDOW: Duration = Duration::from_secs(1);
/// Scheduling slack on a loaded 2-core machine: a message this much older than the crash
/// window at the SIGKILL counts as lost; between the two it is only noted.
const CRASH_SLACK: Duration = Duration::from_millis(500);

/// How big each workload is: the full run, or `--quick` (seconds each, for CI).
pub struct Sizes {
    pub steady_slow: Duration,
    pub steady_fast: Duration,
    pub burst: usize,
    pub commands: usize,
    pub paced_commands: usize,
    pub cut_per_device: usize,
    pub cut_at: Duration,
    pub cut_for: Duration,
    pub kill9: usize,
    pub outage: Duration,
    pub backlog: usize,
    /// How long each broker-alone case publishes.
    pub alone_for: Duration,
    /// Idle device connections held open to weigh a broker's memory.
    pub idle_connections: usize,
    /// Gateway processes of the reconnect storm, and how long their cloud is away.
    pub storm_gateways: usize,
    pub storm_outage: Duration,
    /// How long without a new arrival ends a wait for stragglers.
    pub quiet: Duration,
    /// Longest any single wait for arrivals.
    pub max_wait: Duration,
}

impl Sizes {
    pub fn full() -> Self {
        Sizes {
            steady_slow: Duration::from_secs(60),
            steady_fast: Duration::from_secs(30),
            burst: 100_000,
            commands: 4_000,
            paced_commands: 200,
            cut_per_device: 4_000,
            cut_at: Duration::from_secs(2),
            cut_for: Duration::from_secs(4),
            kill9: 10_000,
            outage: Duration::from_secs(30),
            backlog: 1_000_000,
            alone_for: Duration::from_secs(8),
            idle_connections: 1_000,
            storm_gateways: 20,
            storm_outage: Duration::from_secs(20),
            quiet: Duration::from_secs(10),
            max_wait: Duration::from_secs(600),
        }
    }

    pub fn quick() -> Self {
        Sizes {
            steady_slow: Duration::from_secs(3),
            steady_fast: Duration::from_secs(2),
            burst: 10_000,
            commands: 400,
            paced_commands: 20,
            cut_per_device: 1_000,
            cut_at: Duration::from_millis(500),
            cut_for: Duration::from_secs(1),
            kill9: 2_000,
            outage: Duration::from_secs(3),
            backlog: 20_000,
            alone_for: Duration::from_secs(1),
            idle_connections: 50,
            storm_gateways: 3,
            storm_outage: Duration::from_secs(2),
            quiet: Duration::from_secs(5),
            max_wait: Duration::from_secs(60),
        }
    }
}

fn telemetry_topic(setup: Setup, source: u32) -> String {
    format!("{}warehouse/bench/device-{source}", setup.device_prefix())
}

fn probe_topic(setup: Setup) -> String {
    format!("{}warehouse/bench/probe", setup.device_prefix())
}

/// Acknowledged messages that never arrived; `sent[i]` is source `i`.
fn lost(tally: &Tally, sent: &[Sent]) -> usize {
    sent.iter()
        .enumerate()
        .map(|(source, s)| lost_of(tally, source as u32, s))
        .sum()
}

fn lost_of(tally: &Tally, source: u32, sent: &Sent) -> usize {
    sent.acked
        .iter()
        .enumerate()
        .filter(|(seq, acked)| **acked && !tally.seen(source, *seq as u32))
        .count()
}

fn sources(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// The common part of a row: counts, rate from the first send to the last arrival,
/// latencies, costs.
fn row(setup: Setup, tally: &Tally, sent: &[Sent], cost: Option<Cost>) -> Row {
    let summary = tally.summary(&sources(sent.len()));
    let accepted: usize = sent.iter().map(Sent::acked_count).sum();
    let first_send = sent.iter().filter_map(Sent::first).min();
    let mut row = Row::new(setup);
    row.sent = accepted;
    row.arrived = summary.distinct;
    row.lost = lost(tally, sent);
    row.duplicates = summary.duplicates;
    row.rate = rate(summary.distinct, first_send, summary.last_at);
    row.p50_ms = summary.percentile_ms(0.50);
    row.p99_ms = summary.percentile_ms(0.99);
    if let Some(c) = cost {
        row.bytes_per_msg = Some(c.bytes_per_msg);
        row.cpu_us_per_msg = Some(c.cpu_us_per_msg);
    }
    note_trouble(&mut row, &summary, sent);
    row
}

fn note_trouble(row: &mut Row, summary: &Summary, sent: &[Sent]) {
    if summary.reordered > 0 {
        row.notes.push(format!("{} reordered", summary.reordered));
    }
    for error in sent.iter().filter_map(|s| s.error.as_ref()) {
        row.notes.push(format!("device: {error}"));
    }
}

fn rate(n: usize, from: Option<Instant>, to: Option<Instant>) -> Option<f64> {
    let seconds = to?.saturating_duration_since(from?).as_secs_f64();
    (seconds > 0.0).then(|| n as f64 / seconds)
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Sent>>) -> Vec<Sent> {
    let mut sent = Vec::with_capacity(tasks.len());
    for task in tasks {
        sent.push(task.await.expect("a device task panicked"));
    }
    sent
}

/// Rows 1 and 2: one device at `rate` msg/s for `duration`, link up.
pub async fn steady(setup: Setup, rate: u32, duration: Duration, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    let local = Local::start(setup, cloud.port);
    tally
        .wait_path(local.port(), &probe_topic(setup), READY)
        .await;
    let count = (rate as f64 * duration.as_secs_f64()) as usize;
    let before = local.sample();
    let topic = telemetry_topic(setup, 0);
    let sent = Device::new(local.port(), "device-0", &topic, 0, count)
        .every(Duration::from_secs(1) / rate)
        .run()
        .await;
    tally.settle(&[0], count, sizes.quiet, sizes.max_wait).await;
    let after = local.sample();
    let mut row = row(setup, &tally, &[sent], cost(before, after, count));
    row.rss_mib = local.peak_rss_mib();
    row
}

/// Idle RSS of a gateway after start and after the burst (row 9).
pub struct Idle {
    pub setup: Setup,
    pub after_start_mib: Option<f64>,
    pub after_burst_mib: Option<f64>,
}

/// Row 3: `total` messages from 4 devices as fast as they can; row 9 on the way.
pub async fn burst(setup: Setup, total: usize, sizes: &Sizes) -> (Row, Idle) {
    burst_watched(setup, total, sizes, false).await
}

/// The burst of row 3, with (`dashboard`) or without a dashboard on a persistent session
/// (QoS 1, clean session 0) subscribed to every burst topic on the gateway: the most the
/// local broker's bookkeeping of sessions does per message (each is queued for the
/// session, written to `state.db` if the dashboard has not acknowledged it within
/// `queue.commit_interval`, and forgotten when it does).
pub async fn burst_watched(
    setup: Setup,
    total: usize,
    sizes: &Sizes,
    dashboard: bool,
) -> (Row, Idle) {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    let local = Local::start(setup, cloud.port);
    tally
        .wait_path(local.port(), &probe_topic(setup), READY)
        .await;
    let watcher = match dashboard {
        true => Some(
            crate::support::LocalSubscriber::connect(
                local.port(),
                "dashboard",
                false,
                Some(("warehouse/bench/#", crate::support::QoS::AtLeastOnce)),
            )
            .await,
        ),
        false => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_start_mib = local.rss_mib();
    let devices = 4;
    let before = local.sample();
    let tasks = (0..devices)
        .map(|d| {
            Device::new(
                local.port(),
                &format!("device-{d}"),
                &telemetry_topic(setup, d as u32),
                d as u32,
                total / devices,
            )
            .spawn()
        })
        .collect();
    let sent = join(tasks).await;
    tally
        .settle(&sources(devices), total, sizes.quiet, sizes.max_wait)
        .await;
    let after = local.sample();
    let mut row = row(setup, &tally, &sent, cost(before, after, total));
    row.rss_mib = local.peak_rss_mib();
    if let Some(mut watcher) = watcher {
        let seen = watcher
            .recv_n(total + 1, Duration::from_secs(1))
            .await
            .len();
        row.label = Some("bridgehead, persistent dashboard".into());
        row.notes.push(format!("dashboard got {seen}"));
    }
    if let Local::Bridgehead(gateway) = &local {
        // The losses the gateway itself can name: messages a subscriber's queue could not
        // take, and state.db errors.
        let status = gateway.live_status().unwrap_or_default();
        for counter in ["queued_dropped", "state_errors"] {
            let n = status["counters"][counter].as_u64().unwrap_or(0);
            if n > 0 {
                row.notes.push(format!("{counter} {n}"));
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = Idle {
        setup,
        after_start_mib,
        after_burst_mib: local.rss_mib(),
    };
    (row, idle)
}

/// Rows 4 and 5: `count` commands published on the cloud, one every `interval` (zero: as
/// fast as the cloud takes them), to a local subscriber on the gateway.
pub async fn commands(setup: Setup, count: usize, interval: Duration, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let local = Local::start(setup, cloud.port);
    let tally = match setup {
        Setup::Direct => Tally::start(cloud.port, "fleet/gw-test/cmd/bench/#").await,
        _ => Tally::start(local.port(), "bench/#").await,
    };
    tally.wait_path(cloud.port, COMMAND_PROBE, READY).await;
    let before = local.sample();
    let sent = Device::new(cloud.port, "cloud-app", COMMAND_TOPIC, 0, count)
        .every(interval)
        .run()
        .await;
    tally.settle(&[0], count, sizes.quiet, sizes.max_wait).await;
    let after = local.sample();
    let mut row = row(setup, &tally, &[sent], cost(before, after, count));
    row.rss_mib = local.peak_rss_mib();
    row
}

/// Row 6a: 4 devices at 500 msg/s each; the link is cut for `cut_for` after `cut_at`.
pub async fn link_cut(setup: Setup, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let local = Local::start(setup, proxy.port);
    tally
        .wait_path(local.port(), &probe_topic(setup), READY)
        .await;
    let devices = 4;
    let before = local.sample();
    let tasks = (0..devices)
        .map(|d| {
            Device::new(
                local.port(),
                &format!("device-{d}"),
                &telemetry_topic(setup, d as u32),
                d as u32,
                sizes.cut_per_device,
            )
            .every(Duration::from_millis(2))
            .spawn()
        })
        .collect();
    tokio::time::sleep(sizes.cut_at).await;
    proxy.cut();
    tokio::time::sleep(sizes.cut_for).await;
    proxy.restore();
    let sent = join(tasks).await;
    let total = devices * sizes.cut_per_device;
    tally
        .settle(&sources(devices), total, sizes.quiet, sizes.max_wait)
        .await;
    let after = local.sample();
    let mut row = row(setup, &tally, &sent, cost(before, after, total));
    row.rss_mib = local.peak_rss_mib();
    row
}

/// Row 6b: link down, `count` messages accepted, given [`DURABLE_AFTER`] to reach the
/// gateway's storage, then SIGKILL, restart, link back.
pub async fn kill9(setup: Setup, count: usize, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let mut local = Local::start(setup, proxy.port);
    tally
        .wait_path(local.port(), &probe_topic(setup), READY)
        .await;
    proxy.cut();
    let topic = telemetry_topic(setup, 0);
    let sent = Device::new(local.port(), "device-0", &topic, 0, count)
        .run()
        .await;
    tokio::time::sleep(DURABLE_AFTER).await;
    local.kill9();
    local.restart();
    proxy.restore();
    tally.settle(&[0], count, sizes.quiet, sizes.max_wait).await;
    // The process was replaced: its costs are not comparable.
    let mut row = row(setup, &tally, &[sent], None);
    row.p50_ms = None;
    row.p99_ms = None;
    row.notes.push(format!(
        "SIGKILL {:.1} s after the last message was accepted",
        DURABLE_AFTER.as_secs_f64()
    ));
    row
}

/// Row 7: 100 msg/s with the link cut for the whole measurement; SIGKILL while the device
/// still publishes, restart with the link back. Messages accepted more than
/// [`CRASH_WINDOW`] before the kill must all arrive (counted as lost past
/// [`CRASH_SLACK`] more); the younger ones may be lost.
pub async fn outage(setup: Setup, duration: Duration, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let mut local = match setup {
        Setup::Bridgehead => Local::Bridgehead(Gateway::start(
            bridgehead_config(proxy.port).set_str("queue", "commit_interval", "1s"),
        )),
        _ => Local::start(setup, proxy.port),
    };
    tally
        .wait_path(local.port(), &probe_topic(setup), READY)
        .await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = 100;
    let before = local.sample();
    let device = Device::new(
        local.port(),
        "device-0",
        &telemetry_topic(setup, 0),
        0,
        rate * (duration.as_secs() as usize + 60),
    )
    .every(Duration::from_secs(1) / rate as u32)
    .spawn();
    tokio::time::sleep(duration).await;
    let after = local.sample();
    let killed_at = Instant::now();
    local.kill9();
    let sent = device.await.expect("the device task panicked");
    local.restart();
    proxy.restore();
    let accepted = sent.acked_count();
    tally
        .settle(&[0], accepted, sizes.quiet, sizes.max_wait)
        .await;
    let (mut in_window, mut in_slack, mut older) = (0, 0, 0);
    let mut oldest_lost = Duration::ZERO;
    for (seq, at) in sent.at.iter().enumerate() {
        if sent.acked[seq] && !tally.seen(0, seq as u32) {
            let age = killed_at.saturating_duration_since(*at);
            oldest_lost = oldest_lost.max(age);
            if age <= CRASH_WINDOW {
                in_window += 1;
            } else if age <= CRASH_WINDOW + CRASH_SLACK {
                in_slack += 1;
            } else {
                older += 1;
            }
        }
    }
    let summary = tally.summary(&[0]);
    let mut row = Row::new(setup);
    row.sent = accepted;
    row.arrived = summary.distinct;
    row.lost = older;
    row.duplicates = summary.duplicates;
    if let Some(c) = cost(before, after, accepted) {
        row.bytes_per_msg = Some(c.bytes_per_msg);
        row.cpu_us_per_msg = Some(c.cpu_us_per_msg);
    }
    row.notes.push(format!(
        "lost: accepted over {:.1} s before the SIGKILL; within the last {:.0} s: {in_window} lost, \
         {:.0} to {:.1} s: {in_slack}{}",
        (CRASH_WINDOW + CRASH_SLACK).as_secs_f64(),
        CRASH_WINDOW.as_secs_f64(),
        CRASH_WINDOW.as_secs_f64(),
        (CRASH_WINDOW + CRASH_SLACK).as_secs_f64(),
        if in_window + in_slack + older > 0 {
            format!(" (oldest lost {:.0} ms)", oldest_lost.as_secs_f64() * 1000.0)
        } else {
            String::new()
        }
    ));
    if summary.reordered > 0 {
        row.notes.push(format!("{} reordered", summary.reordered));
    }
    row
}

/// Whether this build takes `drain = "live-first"` on an `[[uplink]]` rule.
pub fn supports_live_first() -> bool {
    let config = bridgehead_config(1883).append(&live_rule());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("check.toml");
    std::fs::write(&path, config.toml()).expect("writing a config to check");
    std::process::Command::new(env!("CARGO_BIN_EXE_bridgehead"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn live_rule() -> String {
    format!(
        "[[uplink]]\n\
         topic = \"{LIVE_TOPIC}\"\n\
         remote_prefix = \"fleet/{{gateway_id}}/\"\n\
         qos = 1\n\
         drain = \"live-first\"\n"
    )
}

/// Row 8: link down, `count` messages from 4 devices accepted, link restored: how fast the
/// backlog reaches the cloud, the gateway's peak RSS meanwhile, and (bridgehead with
/// `live_first`) the latency of a live-first rule's messages published at 10 msg/s
/// during the drain.
pub async fn drain(setup: Setup, count: usize, live_first: bool, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let live = live_first && setup == Setup::Bridgehead;
    let local = if live {
        Local::Bridgehead(Gateway::start(
            bridgehead_config(proxy.port).append(&live_rule()),
        ))
    } else {
        Local::start(setup, proxy.port)
    };
    tally
        .wait_path(local.port(), &probe_topic(setup), READY)
        .await;
    proxy.cut();
    let devices = 4;
    let accepting = Instant::now();
    let tasks = (0..devices)
        .map(|d| {
            Device::new(
                local.port(),
                &format!("device-{d}"),
                &telemetry_topic(setup, d as u32),
                d as u32,
                count / devices,
            )
            .spawn()
        })
        .collect();
    let sent = join(tasks).await;
    let accept_seconds = accepting.elapsed().as_secs_f64();
    tokio::time::sleep(DURABLE_AFTER).await;
    let accept_peak = local.peak_rss_mib();
    let peak_reset = local.reset_peak();
    let before = local.sample();
    let stop = Arc::new(AtomicBool::new(false));
    let live_device = live.then(|| {
        Device::new(local.port(), "live-sensor", LIVE_TOPIC, LIVE, 1_000_000)
            .every(Duration::from_millis(100))
            .until(stop.clone())
            .spawn()
    });
    let restored = Instant::now();
    proxy.restore();
    tally
        .settle(&sources(devices), count, sizes.quiet, sizes.max_wait)
        .await;
    stop.store(true, Ordering::SeqCst);
    let live_sent = match live_device {
        Some(task) => {
            let sent = task.await.expect("the live device panicked");
            // The last live messages were accepted just now: give them their way up.
            tally
                .settle(&[LIVE], sent.acked_count(), sizes.quiet, sizes.max_wait)
                .await;
            Some(sent)
        }
        None => None,
    };
    let after = local.sample();
    let backlog = tally.summary(&sources(devices));
    let mut row = Row::new(setup);
    row.sent = sent.iter().map(Sent::acked_count).sum();
    row.arrived = backlog.distinct;
    row.lost = lost(&tally, &sent);
    row.duplicates = backlog.duplicates;
    row.rate = rate(backlog.distinct, backlog.first_at, backlog.last_at);
    row.rss_mib = local.peak_rss_mib();
    if let Some(c) = cost(before, after, count) {
        row.bytes_per_msg = Some(c.bytes_per_msg);
        row.cpu_us_per_msg = Some(c.cpu_us_per_msg);
    }
    row.notes.push(format!(
        "accepted with the link down at {:.0} msg/s; {}",
        row.sent as f64 / accept_seconds,
        match (backlog.first_at, backlog.last_at) {
            (Some(first), Some(last)) => format!(
                "first arrival {:.1} s after the link was restored, last {:.1} s",
                first.saturating_duration_since(restored).as_secs_f64(),
                last.saturating_duration_since(restored).as_secs_f64()
            ),
            _ => format!(
                "nothing arrived within {:.0} s of the link restored",
                restored.elapsed().as_secs_f64()
            ),
        }
    ));
    if !peak_reset {
        row.notes
            .push("peak RSS since start (could not reset VmHWM)".into());
    } else if let Some(peak) = accept_peak {
        row.notes
            .push(format!("peak RSS while accepting {peak:.1} MiB"));
    }
    note_trouble(&mut row, &backlog, &sent);
    match live_sent {
        Some(live_sent) => {
            let summary = tally.summary(&[LIVE]);
            row.p50_ms = summary.percentile_ms(0.50);
            row.p99_ms = summary.percentile_ms(0.99);
            let live_lost = lost_of(&tally, LIVE, &live_sent);
            row.notes.push(format!(
                "p50/p99: {} live-first messages at 10 msg/s during the drain ({} lost)",
                live_sent.acked_count(),
                live_lost
            ));
            row.lost += live_lost;
        }
        None if setup == Setup::Bridgehead => row
            .notes
            .push("no live-first rule: this build refuses drain = \"live-first\"".into()),
        None => {}
    }
    row
}

/// Row 8's yardstick: one publisher straight to the cloud, as fast as it can.
pub async fn direct_single(count: usize, sizes: &Sizes) -> Row {
    let cloud = Mosquitto::start();
    let tally = Tally::start(cloud.port, CLOUD_FILTER).await;
    tally
        .wait_path(cloud.port, &probe_topic(Setup::Direct), READY)
        .await;
    let topic = telemetry_topic(Setup::Direct, 0);
    let sent = Device::new(cloud.port, "device-0", &topic, 0, count)
        .run()
        .await;
    tally.settle(&[0], count, sizes.quiet, sizes.max_wait).await;
    let mut row = row(Setup::Direct, &tally, &[sent], None);
    row.label = Some("direct, one publisher".into());
    row.p50_ms = None;
    row.p99_ms = None;
    row
}
