//! Fleet-safe reconnects: a fleet of gateway processes on loopback loses its cloud for a
//! while and gets it back. A proxy in front of the cloud mosquitto counts every connection
//! attempt (refused ones while the cloud is away included), so the table shows what the
//! cloud would see: attempts per second during the outage and after it, and how long until
//! every gateway is back.
//!
//! bridgehead runs on its shipped reconnect settings (`reconnect_min` 500 ms,
//! `reconnect_max` 30 s, full jitter); the baseline (`BENCH_BASELINE_BIN`), when set, is
//! an older build with the same settings; mosquitto's bridge with `restart_timeout 5`
//! retries every 5 s, without jitter.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::setups::baseline_bin;
use crate::support::{free_port, Gateway, GatewayConfig, Mosquitto, Proxy};

/// One fleet's run.
pub struct Storm {
    pub setup: String,
    /// Cloud connections the whole fleet holds when all is well.
    pub connections: usize,
    pub during: usize,
    pub during_peak_1s: usize,
    /// From the cloud's return until every connection was back, if within the wait.
    pub back_after: Option<Duration>,
    pub after: usize,
    pub after_peak_1s: usize,
    pub after_peak_100ms: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    Bridgehead,
    Baseline,
    MosquittoBridge,
}

impl Fleet {
    pub const ALL: [Fleet; 3] = [Fleet::Bridgehead, Fleet::Baseline, Fleet::MosquittoBridge];

    fn name(self) -> &'static str {
        match self {
            Fleet::Bridgehead => "bridgehead (full jitter)",
            Fleet::Baseline => "bridgehead, baseline build",
            Fleet::MosquittoBridge => "mosquitto bridge, restart_timeout 5",
        }
    }
}

/// A mosquitto bridging to the cloud through the proxy, as a fleet member.
struct Bridge {
    _dir: tempfile::TempDir,
    child: Child,
}

impl Bridge {
    fn start(index: usize, cloud_port: u16) -> Bridge {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
             connection cloud\naddress 127.0.0.1:{cloud_port}\nclientid storm-mosquitto-{index}\n\
             cleansession false\nrestart_timeout 5\n\
             topic warehouse/# out 1 \"\" fleet/storm-{index}/\n",
            port = free_port()
        );
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("writing mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto");
        Bridge { _dir: dir, child }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The most attempts in any `window` within `[from, to)`.
fn peak(times: &[Instant], from: Instant, to: Instant, window: Duration) -> usize {
    let inside: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= from && *t < to)
        .collect();
    let mut best = 0;
    let mut start = 0;
    for end in 0..inside.len() {
        while inside[end].duration_since(inside[start]) >= window {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

async fn wait_connections(proxy: &Proxy, at_least: usize, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if proxy.connections() >= at_least {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// `gateways` members of `fleet` connect, the cloud goes away for `outage`, comes back;
/// None when the fleet cannot run here (no baseline binary).
pub async fn run(fleet: Fleet, gateways: usize, outage: Duration) -> Option<Storm> {
    let cloud = Mosquitto::start();
    let proxy = Proxy::start(cloud.port).await;
    let mut processes: Vec<Gateway> = Vec::new();
    let mut bridges: Vec<Bridge> = Vec::new();
    let baseline = baseline_bin();
    if fleet == Fleet::Baseline && baseline.is_none() {
        return None;
    }
    for i in 0..gateways {
        match fleet {
            Fleet::MosquittoBridge => bridges.push(Bridge::start(i, proxy.port)),
            Fleet::Bridgehead | Fleet::Baseline => {
                let mut config = GatewayConfig::new(proxy.port)
                    .set_str("gateway", "id", &format!("storm-{i}"))
                    .unset("cloud", "reconnect_min")
                    .unset("cloud", "reconnect_max")
                    .runtime_dir_on_tmpfs();
                if let (Fleet::Baseline, Some(program)) = (fleet, &baseline) {
                    config = config.program(program);
                }
                processes.push(Gateway::start(config));
            }
        }
    }
    // Telemetry and commands for bridgehead, one bridge connection for mosquitto.
    let per_member = if fleet == Fleet::MosquittoBridge {
        1
    } else {
        2
    };
    let connections = gateways * per_member;
    wait_connections(&proxy, connections, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "{}: only {} of {connections} cloud connections came up",
                fleet.name(),
                proxy.connections()
            )
        });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proxy.connections();
    let cut = Instant::now();
    proxy.cut();
    tokio::time::sleep(outage).await;
    let restored = Instant::now();
    proxy.restore();
    // The longest a member can wait is its backoff ceiling (30 s; mosquitto's 5 s).
    let back = wait_connections(&proxy, before + connections, Duration::from_secs(45)).await;
    let end = back.unwrap_or_else(Instant::now);
    let attempts = proxy.attempts();
    let count =
        |from: Instant, to: Instant| attempts.iter().filter(|t| **t >= from && **t < to).count();
    drop(processes);
    drop(bridges);
    Some(Storm {
        setup: fleet.name().to_string(),
        connections,
        during: count(cut, restored),
        during_peak_1s: peak(&attempts, cut, restored, Duration::from_secs(1)),
        back_after: back.map(|b| b.duration_since(restored)),
        after: count(restored, end + Duration::from_millis(1)),
        after_peak_1s: peak(&attempts, restored, end, Duration::from_secs(1)),
        after_peak_100ms: peak(&attempts, restored, end, Duration::from_millis(100)),
    })
}

pub fn print(rows: &[Storm], gateways: usize, outage: Duration) {
    println!(
        "\n### 13. reconnect storm: {gateways} gateways on loopback, the cloud away for {} s, then back (connection attempts counted at the cloud, refused ones included)\n",
        outage.as_secs()
    );
    println!("| setup | cloud connections | attempts during the outage | most in 1 s, outage | all back after | attempts after its return | most in 1 s after | most in 100 ms after |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let back = r.back_after.map_or_else(
            || "not within 45 s".into(),
            |d| format!("{:.1} s", d.as_secs_f64()),
        );
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.setup,
            r.connections,
            r.during,
            r.during_peak_1s,
            back,
            r.after,
            r.after_peak_1s,
            r.after_peak_100ms
        );
    }
}
