//! Side by side, in one run, against the same cloud mosquitto (a fresh one per run, same
//! config): devices publishing to the cloud themselves (the ceiling), bridgehead, and
//! mosquitto's bridge stock and tuned. 64-byte QoS 1 messages stamped with their send time,
//! read where they arrive by this process (one monotonic clock). Storage writes
//! (`/proc/PID/io` write_bytes), CPU (`/proc/PID/stat` utime + stime) and peak RSS
//! (`VmHWM`) are the gateway process's alone.
//!
//! `scripts/bench` runs it and the README quotes its tables; `scripts/bench --quick` runs a
//! small version of every workload in seconds (CI). Either exits 1 if bridgehead lost a
//! QoS 1 message in any workload; performance figures are printed, never asserted.
//! `BENCH_ONLY=steady100,drain,...` runs only the named workloads (keys in [`WORKLOADS`]).
//!
//! The broker-alone workloads (`local`, `idle1000`) compare the local broker with a plain
//! mosquitto and, when `BENCH_BASELINE_BIN` names one, another bridgehead binary
//! (today's main); so does `storm`, a fleet of gateways losing and regaining its cloud.

#[path = "../../tests/support/mod.rs"]
mod support;

mod broker_alone;
mod clients;
mod raw_clients;
mod report;
mod setups;
mod storm;
mod workloads;

use std::process::Command;
use std::time::{Duration, Instant};

use report::{MemoryTable, Row, Table};
use setups::Setup;
use setups::Setup::{
    Bridgehead, BridgeheadAcl, BridgeheadRules, Direct, MosquittoStock, MosquittoTuned,
};
use workloads::Sizes;

const ALL: [Setup; 4] = [Direct, Bridgehead, MosquittoStock, MosquittoTuned];
const BRIDGES: [Setup; 3] = [Bridgehead, MosquittoStock, MosquittoTuned];

/// The workloads' keys for BENCH_ONLY, in the order they run.
const WORKLOADS: [&str; 14] = [
    "steady100",
    "steady2k",
    "burst",
    "commands",
    "command-pace",
    "cut",
    "kill9",
    "outage",
    "drain",
    "features",
    "sessions",
    "local",
    "idle1000",
    "storm",
];

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = command_line("uname", &["-sr"]);
    format!("{cores} cores (nproc), {cpu}, {kernel}")
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn print_header(quick: bool) {
    println!(
        "# bridgehead side-by-side benchmark{}",
        if quick {
            " (--quick: small sizes, figures not meaningful)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "- date: {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    println!("- machine: {}", machine());
    println!(
        "- bridgehead {} ({}); cloud and bridges: {}",
        command_line(env!("CARGO_BIN_EXE_bridgehead"), &["--version"]),
        command_line("git", &["describe", "--always", "--dirty"]),
        command_line("mosquitto", &["-h"])
    );
    println!(
        "- everything on this machine at once over loopback: devices, gateway, cloud broker, cloud subscriber"
    );
    println!("- 64-byte QoS 1 messages; latency = device hands the message to its client -> the subscriber on the other side has it");
    println!("- B written/msg, CPU µs/msg, peak RSS: the gateway process alone (bridgehead, or the local mosquitto that bridges)");
    match setups::baseline_bin() {
        Some(bin) => println!(
            "- today's main (broker-alone workloads): {} ({})",
            bin.display(),
            command_line(&bin.display().to_string(), &["--version"])
        ),
        None => println!("- today's main (broker-alone workloads): BENCH_BASELINE_BIN not set"),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; --quick is ours.
    let quick = std::env::args().any(|a| a == "--quick");
    let only: Vec<String> = std::env::var("BENCH_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if let Some(unknown) = only.iter().find(|w| !WORKLOADS.contains(&w.as_str())) {
        eprintln!("BENCH_ONLY: unknown workload {unknown:?}; known: {WORKLOADS:?}");
        std::process::exit(2);
    }
    let runs = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let sizes = if quick { Sizes::quick() } else { Sizes::full() };
    let started = Instant::now();
    clients::base();
    print_header(quick);
    let mut tables: Vec<Table> = Vec::new();
    let mut show = |table: Table| {
        table.print();
        tables.push(table);
    };

    if runs("steady100") {
        let mut rows = Vec::new();
        for setup in ALL {
            rows.push(workloads::steady(setup, 100, sizes.steady_slow, &sizes).await);
        }
        show(Table {
            title: format!(
                "1. 100 msg/s steady, link up: one device, {} s",
                sizes.steady_slow.as_secs()
            ),
            rows,
        });
    }
    if runs("steady2k") {
        let mut rows = Vec::new();
        for setup in ALL {
            rows.push(workloads::steady(setup, 2_000, sizes.steady_fast, &sizes).await);
        }
        show(Table {
            title: format!(
                "2. 2,000 msg/s steady, link up: one device, {} s",
                sizes.steady_fast.as_secs()
            ),
            rows,
        });
    }
    let mut idle = Vec::new();
    if runs("burst") {
        let mut rows = Vec::new();
        for setup in ALL {
            let (row, i) = workloads::burst(setup, sizes.burst, &sizes).await;
            rows.push(row);
            idle.push(i);
        }
        show(Table {
            title: format!(
                "3. burst: {} messages from 4 devices as fast as they go (msg/s: first send to last arrival)",
                sizes.burst
            ),
            rows,
        });
    }
    if runs("sessions") {
        // Interleaved, so that the machine's drift hits both alike.
        let mut rows = Vec::new();
        for _ in 0..3 {
            for dashboard in [false, true] {
                let (row, _) =
                    workloads::burst_watched(Bridgehead, sizes.burst, &sizes, dashboard).await;
                rows.push(row);
            }
        }
        show(Table {
            title: format!(
                "sessions: the burst of 3. ({} messages) through bridgehead, alone and with a dashboard on a persistent session subscribed to it, 3 runs each",
                sizes.burst
            ),
            rows,
        });
    }
    if runs("commands") {
        let mut rows = Vec::new();
        for setup in ALL {
            rows.push(workloads::commands(setup, sizes.commands, Duration::ZERO, &sizes).await);
        }
        show(Table {
            title: format!(
                "4. {} commands cloud -> local subscriber, as fast as the cloud side sends (latency: cloud publish -> local delivery)",
                sizes.commands
            ),
            rows,
        });
    }
    if runs("command-pace") {
        let mut rows = Vec::new();
        for setup in ALL {
            let interval = Duration::from_millis(50);
            rows.push(workloads::commands(setup, sizes.paced_commands, interval, &sizes).await);
        }
        show(Table {
            title: format!(
                "5. one command every 50 ms, {} commands cloud -> local subscriber",
                sizes.paced_commands
            ),
            rows,
        });
    }
    if runs("cut") {
        let mut rows = Vec::new();
        for setup in BRIDGES {
            rows.push(workloads::link_cut(setup, &sizes).await);
        }
        show(Table {
            title: format!(
                "6a. link cut: 4 devices x 500 msg/s, {} messages, link cut for {:.0} s after {:.1} s",
                4 * sizes.cut_per_device,
                sizes.cut_for.as_secs_f64(),
                sizes.cut_at.as_secs_f64()
            ),
            rows,
        });
    }
    if runs("kill9") {
        let mut rows = Vec::new();
        for setup in BRIDGES {
            rows.push(workloads::kill9(setup, sizes.kill9, &sizes).await);
        }
        show(Table {
            title: format!(
                "6b. kill -9: link down, {} messages accepted, gateway SIGKILLed and restarted, link back",
                sizes.kill9
            ),
            rows,
        });
    }
    if runs("outage") {
        let mut rows = Vec::new();
        for setup in [Bridgehead, MosquittoTuned] {
            rows.push(workloads::outage(setup, sizes.outage, &sizes).await);
        }
        show(Table {
            title: format!(
                "7. 100 msg/s during an outage ({} s, link cut throughout; bridgehead queue.commit_interval = 1s), then kill -9 while publishing and restart with the link back",
                sizes.outage.as_secs()
            ),
            rows,
        });
    }
    if runs("drain") {
        let live_first = workloads::supports_live_first();
        let mut rows = vec![workloads::direct_single(sizes.backlog, &sizes).await];
        for setup in [Bridgehead, MosquittoTuned] {
            rows.push(workloads::drain(setup, sizes.backlog, live_first, &sizes).await);
        }
        show(Table {
            title: format!(
                "8. backlog drain: link down, {} messages accepted from 4 devices, link restored (msg/s: first to last backlog arrival; peak RSS: during the drain; p50/p99: live-first rule's messages during the drain)",
                sizes.backlog
            ),
            rows,
        });
    }
    if runs("features") && !quick {
        // What a feature costs per message: the burst with and without it, interleaved
        // runs so that the machine's drift hits both alike.
        let mut rows = Vec::new();
        for _ in 0..3 {
            for setup in [Bridgehead, BridgeheadAcl, BridgeheadRules] {
                rows.push(workloads::burst(setup, sizes.burst, &sizes).await.0);
            }
        }
        show(Table {
            title: format!(
                "10. what features cost: the {}-message burst, interleaved runs with and without",
                sizes.burst
            ),
            rows,
        });
    }
    if runs("local") {
        for fan in broker_alone::FANS {
            let mut rows = Vec::new();
            for setup in broker_alone::SETUPS {
                rows.push(broker_alone::fan(setup, fan, &sizes).await);
            }
            show(Table {
                title: fan.title(sizes.alone_for),
                rows,
            });
        }
    }
    if runs("idle1000") {
        broker_alone::raise_open_files();
        let mut rows = Vec::new();
        for setup in broker_alone::SETUPS {
            rows.push(broker_alone::idle(setup, sizes.idle_connections).await);
        }
        MemoryTable {
            title: format!(
                "12. {} idle device connections (keepalive 60 s), each subscribed at QoS 1 to its own cmd/dev-N: RSS of the broker process",
                sizes.idle_connections
            ),
            rows,
        }
        .print();
    }
    if runs("storm") {
        let mut rows = Vec::new();
        for fleet in storm::Fleet::ALL {
            match storm::run(fleet, sizes.storm_gateways, sizes.storm_outage).await {
                Some(row) => rows.push(row),
                None => println!("- reconnect storm, baseline: BENCH_BASELINE_BIN not set"),
            }
        }
        storm::print(&rows, sizes.storm_gateways, sizes.storm_outage);
    }
    if !idle.is_empty() {
        println!("\n### 9. RSS of the gateway process, idle\n");
        println!("| setup                     | after start MiB | after the burst MiB |");
        println!("|---------------------------|----------------:|--------------------:|");
        for i in idle.iter().filter(|i| i.setup != Direct) {
            let mib = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
            println!(
                "| {:<25} | {:>15} | {:>19} |",
                i.setup.name(),
                mib(i.after_start_mib),
                mib(i.after_burst_mib)
            );
        }
    }

    println!("\n(ran {:.0} s)", started.elapsed().as_secs_f64());
    let failures: Vec<String> = tables
        .iter()
        .flat_map(|t| {
            t.rows
                .iter()
                .filter(|r| {
                    r.setup.is_some_and(Setup::is_bridgehead) && !r.best_effort && r.lost > 0
                })
                .map(move |r: &Row| format!("{}: bridgehead lost {} messages", t.title, r.lost))
        })
        .collect();
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        std::process::exit(1);
    }
}
