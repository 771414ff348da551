//! bridgehead against mosquitto's bridge on the same workloads, with a real mosquitto as the
//! cloud on loopback: a 100k-message burst, a 4-second link cut mid-stream, and `kill -9`
//! with the link down. Prints one table; `scripts/bench` runs it, the README quotes it.
//!
//! Sizes can be changed with BENCH_MESSAGES (burst size, default 100000) and
//! BENCH_PUBLISHERS (default 4); BENCH_ONLY=burst runs the burst alone,
//! BENCH_ONLY=split measures the local side and the uplink apart; BENCH_ONLY=rules measures
//! what `[[rule]]`s cost per message; BENCH_INFLIGHT sets bridgehead's cloud.max_inflight.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    free_port, publish_all, publish_paced, Collector, Gateway, GatewayConfig, Mosquitto, Proxy, QoS,
};

const PAYLOAD: usize = 64;
const CLOUD_FILTER: &str = "fleet/gw-test/warehouse/#";

/// Which gateway sits between the devices and the cloud.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Direct,
    Bridgehead,
    MosquittoBridge,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Direct => "devices -> cloud directly",
            Setup::Bridgehead => "bridgehead",
            Setup::MosquittoBridge => "mosquitto bridge (stock)",
        }
    }
}

/// The local side: a running gateway of either kind, on `port`.
enum Local {
    Direct(u16),
    Bridgehead(Gateway),
    Mosquitto(LocalMosquitto),
}

impl Local {
    fn start(setup: Setup, cloud_port: u16) -> Local {
        match setup {
            Setup::Direct => Local::Direct(cloud_port),
            Setup::Bridgehead => Local::Bridgehead(Gateway::start(bench_config(cloud_port))),
            Setup::MosquittoBridge => Local::Mosquitto(LocalMosquitto::start(cloud_port)),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Local::Direct(port) => *port,
            Local::Bridgehead(g) => g.local_port,
            Local::Mosquitto(m) => m.port,
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Local::Direct(_) => None,
            Local::Bridgehead(g) => pgrep(&g.config_path.display().to_string()),
            Local::Mosquitto(m) => Some(m.child.as_ref()?.id()),
        }
    }

    /// CPU seconds (user + system) the gateway process has used so far.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    fn rss_mib(&self) -> Option<f64> {
        let pid = self.pid()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    fn kill9_and_restart(&mut self) {
        match self {
            Local::Direct(_) => {}
            Local::Bridgehead(g) => {
                g.kill9();
                g.start_again();
            }
            Local::Mosquitto(m) => {
                if let Some(mut child) = m.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                m.spawn();
            }
        }
    }
}

/// The test defaults; BENCH_INFLIGHT overrides cloud.max_inflight.
fn bench_config(cloud_port: u16) -> GatewayConfig {
    let config = GatewayConfig::new(cloud_port).set_str("gateway", "metrics_interval", "1s");
    match std::env::var("BENCH_INFLIGHT") {
        Ok(n) => config.set("cloud", "max_inflight", &n),
        Err(_) => config,
    }
}

fn pgrep(pattern: &str) -> Option<u32> {
    let out = Command::new("pgrep").arg("-f").arg(pattern).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// mosquitto as a site broker bridging `warehouse/#` to the cloud the way its manual shows,
/// everything else at mosquitto's defaults (persistence on, as Debian ships it).
struct LocalMosquitto {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl LocalMosquitto {
    fn start(cloud_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
             persistence true\npersistence_location {dir}/\n\
             connection cloud\naddress 127.0.0.1:{cloud_port}\nclientid gw-test-mosquitto\n\
             cleansession false\nrestart_timeout 1\n\
             topic warehouse/# out 1 \"\" fleet/gw-test/\n",
            dir = dir.path().display()
        );
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("writing mosquitto.conf");
        let mut m = LocalMosquitto {
            dir,
            port,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = fs::File::create(self.dir.path().join("mosquitto.log")).expect("log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LocalMosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Outcome {
    sent: usize,
    arrived: usize,
    duplicates: usize,
    seconds: f64,
    rss_mib: Option<f64>,
    /// Gateway CPU microseconds per message over the workload.
    cpu_us: Option<f64>,
}

fn messages(prefix: &str, publisher: usize, n: usize) -> Vec<(String, Vec<u8>)> {
    let topic = format!("{prefix}warehouse/bench/device-{publisher}");
    (0..n)
        .map(|i| {
            let mut payload = format!("device-{publisher}:{i:08}:").into_bytes();
            payload.resize(PAYLOAD, b'x');
            (topic.clone(), payload)
        })
        .collect()
}

/// Waits until `expected` messages arrived, or until nothing new arrived for `quiet`.
async fn settle(collector: &Collector, expected: usize, quiet: Duration, max: Duration) -> Instant {
    let start = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let n = collector.distinct();
        if n != last.0 {
            last = (n, Instant::now());
        }
        if n >= expected || last.1.elapsed() > quiet || start.elapsed() > max {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn outcome(
    collector: &Collector,
    sent: usize,
    seconds: f64,
    local: &Local,
    cpu_before: Option<f64>,
) -> Outcome {
    let deliveries = collector.deliveries();
    Outcome {
        sent,
        arrived: deliveries.first.values().map(Vec::len).sum(),
        duplicates: deliveries.duplicates,
        seconds,
        rss_mib: local.rss_mib(),
        cpu_us: cpu_before
            .zip(local.cpu_seconds())
            .map(|(before, after)| (after - before) * 1e6 / sent as f64),
    }
}

async fn burst(setup: Setup, total: usize, publishers: usize) -> Outcome {
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, CLOUD_FILTER).await;
    let local = Local::start(setup, cloud.port);
    // Published straight to the cloud, devices use the cloud topics themselves.
    let prefix = if setup == Setup::Direct {
        "fleet/gw-test/"
    } else {
        ""
    };
    let batches = (0..publishers)
        .map(|p| messages(prefix, p, total / publishers))
        .collect();
    drive_burst(&collector, &local, total, batches).await
}

/// Each of `batches` published by a device of its own, all at once, into `local`; returns
/// once the cloud has them all (or nothing new came for 5 s).
async fn drive_burst(
    collector: &Collector,
    local: &Local,
    total: usize,
    batches: Vec<Vec<(String, Vec<u8>)>>,
) -> Outcome {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = local.port();
    let cpu_before = local.cpu_seconds();
    let start = Instant::now();
    let tasks: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(p, batch)| {
            tokio::spawn(async move {
                publish_all(port, &format!("device-{p}"), QoS::AtLeastOnce, batch).await
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let done = settle(
        collector,
        total,
        Duration::from_secs(5),
        Duration::from_secs(120),
    )
    .await;
    outcome(
        collector,
        total,
        done.duration_since(start).as_secs_f64(),
        local,
        cpu_before,
    )
}

/// 4 publishers at 500 msg/s each for 8 s; the link is cut from second 2 to second 6.
async fn link_cut(setup: Setup) -> Outcome {
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let local = Local::start(setup, proxy.port);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let port = local.port();
    let per = 4000;
    let cpu_before = local.cpu_seconds();
    let start = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|p| {
            let batch = messages("", p, per);
            tokio::spawn(async move {
                publish_paced(
                    port,
                    &format!("device-{p}"),
                    QoS::AtLeastOnce,
                    batch,
                    Duration::from_millis(2),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    for t in tasks {
        let _ = t.await;
    }
    let done = settle(
        &collector,
        4 * per,
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
    .await;
    outcome(
        &collector,
        4 * per,
        done.duration_since(start).as_secs_f64(),
        &local,
        cpu_before,
    )
}

/// Link down, 10k messages accepted by the local broker, the gateway killed with SIGKILL
/// and restarted, link back.
async fn kill9(setup: Setup) -> Outcome {
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let mut local = Local::start(setup, proxy.port);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.cut();
    let total = 10_000;
    // The process is replaced mid-way: its CPU time is not comparable.
    let cpu_before = None;
    let start = Instant::now();
    publish_all(
        local.port(),
        "device-0",
        QoS::AtLeastOnce,
        messages("", 0, total),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    local.kill9_and_restart();
    proxy.restore();
    let done = settle(
        &collector,
        total,
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
    .await;
    outcome(
        &collector,
        total,
        done.duration_since(start).as_secs_f64(),
        &local,
        cpu_before,
    )
}

/// What bounds bridgehead: the local side alone (link down: devices -> outbox on disk), then
/// the uplink alone (link restored: outbox -> cloud).
async fn split(total: usize, publishers: usize) {
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, CLOUD_FILTER).await;
    let proxy = Proxy::start(cloud.port).await;
    let gateway =
        Gateway::start(bench_config(proxy.port).set_str("gateway", "metrics_interval", "100ms"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    let port = gateway.local_port;
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let batch = messages("", p, total / publishers);
            tokio::spawn(async move {
                publish_all(port, &format!("device-{p}"), QoS::AtLeastOnce, batch).await
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let accepted = start.elapsed().as_secs_f64();
    let enqueued = || {
        gateway
            .status()
            .map(|s| support::counter(&s, "enqueued"))
            .unwrap_or(0)
    };
    support::wait_until(Duration::from_secs(60), || enqueued() >= total as u64).await;
    let on_disk = start.elapsed().as_secs_f64();
    let start = Instant::now();
    proxy.restore();
    let done = settle(
        &collector,
        total,
        Duration::from_secs(5),
        Duration::from_secs(120),
    )
    .await;
    let drained = done.duration_since(start).as_secs_f64();
    println!(
        "local side, link down: {total} accepted by the broker in {accepted:.2} s ({:.0} msg/s), all on disk after {on_disk:.2} s ({:.0} msg/s)",
        total as f64 / accepted,
        total as f64 / on_disk
    );
    println!(
        "uplink alone: backlog of {} delivered to the cloud in {drained:.2} s ({:.0} msg/s, incl. reconnect)",
        collector.distinct(),
        collector.distinct() as f64 / drained
    );
}

/// Numeric readings, `PAYLOAD` bytes each: a plain number padded with spaces, or JSON
/// `{"value":21.5,"seq":N,"pad":"xx.."}`. Each value is another (the cloud side counts
/// distinct messages), all under 28.
fn readings(publisher: usize, n: usize, json: bool) -> Vec<(String, Vec<u8>)> {
    let topic = format!("warehouse/bench/device-{publisher}");
    (0..n)
        .map(|i| {
            let value = 15.0 + i as f64 / 10_000.0;
            let payload = if json {
                let mut p = format!("{{\"value\":{value:.4},\"seq\":{i},\"pad\":\"").into_bytes();
                p.resize(PAYLOAD - 2, b'x');
                p.extend_from_slice(b"\"}");
                p
            } else {
                let mut p = format!("{value:.4}").into_bytes();
                p.resize(PAYLOAD, b' ');
                p
            };
            (topic.clone(), payload)
        })
        .collect()
}

/// `count` rules: the first reads every burst message (above 30, so after each device's
/// first reading nothing changes), the others watch topics the burst does not use.
fn bench_rules(count: usize, json: bool) -> String {
    (0..count)
        .map(|i| {
            let topic = match i {
                0 => "warehouse/bench/+".to_owned(),
                _ => format!("warehouse/other-{i}/+"),
            };
            let path = if json { "value_path = \"value\"\n" } else { "" };
            format!(
                "\n[[rule]]\nname = \"rule-{i}\"\ntopic = \"{topic}\"\npublish = \"site/rule-{i}/{{1}}/fan\"\n\
                 above = 30\nclear_below = 28\non = \"ON\"\noff = \"OFF\"\n{path}"
            )
        })
        .collect()
}

/// The bridgehead burst with numeric readings, with `rules` rules: throughput and the
/// gateway's CPU per message.
async fn rules_burst(total: usize, publishers: usize, rules: usize, json: bool) -> Outcome {
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, CLOUD_FILTER).await;
    let local = Local::Bridgehead(Gateway::start(
        bench_config(cloud.port).append(&bench_rules(rules, json)),
    ));
    let batches = (0..publishers)
        .map(|p| readings(p, total / publishers, json))
        .collect();
    let outcome = drive_burst(&collector, &local, total, batches).await;
    if let Local::Bridgehead(gateway) = &local {
        let status = gateway.live_status().unwrap_or_default();
        let evaluated = status["counters"]["rule_readings"].as_u64().unwrap_or(0);
        let overruns = status["counters"]["rule_overruns"].as_u64().unwrap_or(0);
        assert_eq!(
            (evaluated, overruns),
            ((if rules > 0 { total } else { 0 }) as u64, 0),
            "every reading evaluated once by the matching rule"
        );
    }
    outcome
}

/// CPU time of this thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The rule engine alone, in this process: CPU µs per reading for `total` readings of the
/// burst, each offered to the intake's match (every rule's filter) and evaluated.
fn engine_cost(total: usize, publishers: usize, rules: usize, json: bool) -> f64 {
    use bridgehead::automation::engine::Engine;
    let text = format!(
        "[gateway]\nid = \"bench\"\n[cloud]\nurl = \"mqtt://127.0.0.1\"\n{}",
        bench_rules(rules, json)
    );
    let config = bridgehead::config::parse("bench.toml", &text).expect("bench rules are valid");
    let mut engine = Engine::new(Default::default());
    engine.apply(&config.rules, Instant::now());
    let batches: Vec<_> = (0..publishers)
        .map(|p| readings(p, total / publishers, json))
        .collect();
    let mut out = Vec::new();
    let mut matched = 0;
    let start = thread_cpu_seconds();
    let now = Instant::now();
    for (topic, payload) in batches.iter().flatten() {
        if config
            .rules
            .iter()
            .any(|r| bridgehead::topics::matches(&r.topic, topic))
        {
            matched += 1;
            engine.reading(topic, payload, now, &mut out);
        }
    }
    let spent = thread_cpu_seconds() - start;
    assert_eq!((matched, out.len()), (total, publishers));
    spent * 1e6 / total as f64
}

/// What `[[rule]]`s cost: the same burst of numeric readings without and with rules,
/// alternating, `BENCH_RUNS` (default 3) times each; then the rule engine alone.
async fn rules_cost(total: usize, publishers: usize) {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let setups = [
        ("no rules", 0, false),
        ("1 rule, plain numbers", 1, false),
        ("no rules", 0, true),
        ("1 rule, value_path", 1, true),
        ("20 rules, value_path", 20, true),
    ];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for _ in 0..runs {
        for (i, (_, rules, json)) in setups.iter().enumerate() {
            let o = rules_burst(total, publishers, *rules, *json).await;
            assert_eq!(o.arrived, total, "a message was lost");
            cpu[i].extend(o.cpu_us);
            rate[i].push(o.arrived as f64 / o.seconds);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!("| burst {total} x {PAYLOAD} B QoS 1       | payload | msg/s  | CPU µs/msg, each run | mean |");
    println!("|--------------------------------|---------|--------|----------------------|------|");
    for (i, (name, _, json)) in setups.iter().enumerate() {
        let each: Vec<String> = cpu[i].iter().map(|c| format!("{c:.1}")).collect();
        println!(
            "| {name:<30} | {:<7} | {:>6.0} | {:<20} | {:>4.1} |",
            if *json { "JSON" } else { "plain" },
            mean(&rate[i]),
            each.join(" "),
            mean(&cpu[i]),
        );
    }
    for (name, rules, json) in setups.iter().filter(|(_, rules, _)| *rules > 0) {
        let each: Vec<f64> = (0..runs)
            .map(|_| engine_cost(total, publishers, *rules, *json))
            .collect();
        let each: Vec<String> = each.iter().map(|c| format!("{c:.2}")).collect();
        println!(
            "rule engine alone, {name}: CPU µs per reading {}",
            each.join(" ")
        );
    }
}

fn print_row(workload: &str, setup: Setup, o: &Outcome) {
    let lost = o.sent.saturating_sub(o.arrived);
    println!(
        "| {workload:<26} | {:<27} | {:>7} | {:>7} | {:>6} ({:>5.1} %) | {:>4} | {:>7.1} | {:>8.0} | {:>6} | {:>9} |",
        setup.name(),
        o.sent,
        o.arrived,
        lost,
        100.0 * lost as f64 / o.sent as f64,
        o.duplicates,
        o.seconds,
        o.arrived as f64 / o.seconds,
        o.rss_mib.map(|m| format!("{m:.0}")).unwrap_or_else(|| "-".into()),
        o.cpu_us.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; there are no filters to honour.
    let total: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let publishers: usize = std::env::var("BENCH_PUBLISHERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only == "split" {
        split(total, publishers).await;
        return;
    }
    if only == "rules" {
        rules_cost(total, publishers).await;
        return;
    }
    println!("| workload                   | setup                       |    sent | arrived |    lost          | dups |  secs   |  msg/s   | RSS MiB | CPU µs/msg |");
    println!("|----------------------------|-----------------------------|---------|---------|------------------|------|---------|----------|---------|-----------|");
    let burst_name = format!("burst {total} x {PAYLOAD} B QoS 1");
    for setup in [Setup::Direct, Setup::Bridgehead, Setup::MosquittoBridge] {
        let o = burst(setup, total, publishers).await;
        print_row(&burst_name, setup, &o);
    }
    if only == "burst" {
        return;
    }
    for setup in [Setup::Bridgehead, Setup::MosquittoBridge] {
        let o = link_cut(setup).await;
        print_row("2k msg/s, 4 s link cut", setup, &o);
    }
    for setup in [Setup::Bridgehead, Setup::MosquittoBridge] {
        let o = kill9(setup).await;
        print_row("link down, kill -9, 10k", setup, &o);
    }
}
