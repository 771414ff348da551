//! The four ways devices reach the cloud, the local brokers the broker-alone workloads
//! compare, and what the gateway process costs, read from /proc of that process alone
//! (never the cloud broker's, never the bench's).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, Gateway, GatewayConfig};

/// Which gateway sits between the devices and the cloud.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    /// Devices publish to the cloud broker themselves: the ceiling.
    Direct,
    Bridgehead,
    /// mosquitto's bridge as its manual shows it, persistence on (as Debian ships it).
    MosquittoStock,
    /// The same, with the queue raised and the store saved every second.
    MosquittoTuned,
    /// bridgehead with an ACL file every device publish is checked against (what ACLs
    /// cost per message).
    BridgeheadAcl,
    /// bridgehead with 20 `[[rule]]`s, one of them on every device message (what the
    /// local automation costs per message).
    BridgeheadRules,
    /// mosquitto as a plain site broker on its defaults: no bridge, no persistence.
    MosquittoPlain,
    /// Today's main: the rumqttd-based release build named by `BENCH_BASELINE_BIN`, on the
    /// same config as [`Setup::Bridgehead`]. Its losses are reported, never a failure.
    Baseline,
}

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct (ceiling)",
            Setup::Bridgehead => "bridgehead",
            Setup::MosquittoStock => "mosquitto bridge, stock",
            Setup::MosquittoTuned => "mosquitto bridge, tuned",
            Setup::BridgeheadAcl => "bridgehead + acl_file",
            Setup::BridgeheadRules => "bridgehead + 20 rules",
            Setup::MosquittoPlain => "mosquitto, no bridge",
            Setup::Baseline => "bridgehead, today's main",
        }
    }

    /// Whether this is this branch's bridgehead (in some configuration): its losses fail
    /// the run.
    pub fn is_bridgehead(self) -> bool {
        matches!(
            self,
            Setup::Bridgehead | Setup::BridgeheadAcl | Setup::BridgeheadRules
        )
    }

    /// The topic prefix a device uses: the cloud topic when it publishes there itself.
    pub fn device_prefix(self) -> &'static str {
        match self {
            Setup::Direct => "fleet/gw-test/",
            _ => "",
        }
    }
}

/// A site's ACL: every device publish on `warehouse/...` is checked against it.
const BENCH_ACL: &str = "\
topic deny warehouse/+/fan/command
topic write warehouse/#
topic read dashboards/#
pattern readwrite devices/%c/#
pattern write clients/%c/status
";

/// `count` rules: the first on every device message of the burst, the others on topics it
/// does not use. The bench's payloads carry a time stamp, not a number: each message is
/// matched, handed to the rules task and read, then counted as not numeric.
fn bench_rules(count: usize) -> String {
    (0..count)
        .map(|i| {
            let topic = match i {
                0 => "warehouse/bench/+".to_owned(),
                _ => format!("warehouse/other-{i}/+"),
            };
            format!(
                "\n[[rule]]\nname = \"rule-{i}\"\ntopic = \"{topic}\"\npublish = \"site/rule-{i}/{{1}}/fan\"\n\
                 above = 30\nclear_below = 28\non = \"ON\"\noff = \"OFF\"\nvalue_path = \"value\"\n"
            )
        })
        .collect()
}

/// The tuned mosquitto's queue: large enough for the 1M backlog row.
const TUNED_MAX_QUEUED: usize = 2_000_000;

/// Room for the broker-alone workloads' connections: 1000 idle devices and the bench's
/// own (the gateway's default `local.max_connections` is 1000).
const ALONE_MAX_CONNECTIONS: usize = 2000;

/// The baseline binary of [`Setup::Baseline`] (`BENCH_BASELINE_BIN`), if set.
pub fn baseline_bin() -> Option<PathBuf> {
    std::env::var_os("BENCH_BASELINE_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// bridgehead on its shipped defaults (commit interval, metrics interval, in-flight window),
/// run as its systemd unit runs it (`status.json` in the runtime directory, on tmpfs), except
/// what the test peers need: loopback ports, a data dir on disk, and reconnects as quick as
/// the mosquitto bridges' `restart_timeout 1`.
pub fn bridgehead_config(cloud_port: u16) -> GatewayConfig {
    GatewayConfig::new(cloud_port)
        .unset("queue", "commit_interval")
        .unset("gateway", "metrics_interval")
        .runtime_dir_on_tmpfs()
}

/// The local side: a running gateway of one kind.
pub enum Local {
    Direct(u16),
    Bridgehead(Gateway),
    Mosquitto(LocalMosquitto),
}

impl Local {
    pub fn start(setup: Setup, cloud_port: u16) -> Local {
        match setup {
            Setup::Direct => Local::Direct(cloud_port),
            Setup::Bridgehead => Local::Bridgehead(Gateway::start(bridgehead_config(cloud_port))),
            Setup::MosquittoStock => {
                Local::Mosquitto(LocalMosquitto::start(cloud_port, Bridge::Stock))
            }
            Setup::MosquittoTuned => {
                Local::Mosquitto(LocalMosquitto::start(cloud_port, Bridge::Tuned))
            }
            Setup::MosquittoPlain => Local::Mosquitto(LocalMosquitto::start(0, Bridge::None)),
            Setup::Baseline => {
                let program = baseline_bin().expect("BENCH_BASELINE_BIN is not set");
                Local::Bridgehead(Gateway::start(
                    bridgehead_config(cloud_port).program(&program),
                ))
            }
            Setup::BridgeheadAcl => {
                let config = bridgehead_config(cloud_port);
                let acl = config.dir().join("acl");
                fs::write(&acl, BENCH_ACL).expect("writing the bench ACL");
                let config = config.set_str("local", "acl_file", &acl.display().to_string());
                Local::Bridgehead(Gateway::start(config))
            }
            Setup::BridgeheadRules => Local::Bridgehead(Gateway::start(
                bridgehead_config(cloud_port).append(&bench_rules(20)),
            )),
        }
    }

    /// A local broker for the broker-alone workloads: room for
    /// [`ALONE_MAX_CONNECTIONS`]; a gateway still has its cloud link (to `cloud_port`),
    /// which the workloads' topics (outside `warehouse/`) never use. `None` for the
    /// baseline when `BENCH_BASELINE_BIN` is not set.
    pub fn alone(setup: Setup, cloud_port: u16) -> Option<Local> {
        let config = || {
            bridgehead_config(cloud_port).set(
                "local",
                "max_connections",
                &ALONE_MAX_CONNECTIONS.to_string(),
            )
        };
        Some(match setup {
            Setup::Bridgehead => Local::Bridgehead(Gateway::start(config())),
            Setup::Baseline => {
                Local::Bridgehead(Gateway::start(config().program(&baseline_bin()?)))
            }
            _ => Local::start(setup, cloud_port),
        })
    }

    /// Where devices connect (MQTT 3.1.1; bridgehead and mosquitto take MQTT 5 there too).
    pub fn port(&self) -> u16 {
        match self {
            Local::Direct(port) => *port,
            Local::Bridgehead(g) => g.local_port,
            Local::Mosquitto(m) => m.port,
        }
    }

    /// The gateway process; none for direct.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Local::Direct(_) => None,
            Local::Bridgehead(g) => g.pid(),
            Local::Mosquitto(m) => m.child.as_ref().map(Child::id),
        }
    }

    /// What the process logged so far (a gateway's log, mosquitto's).
    pub fn log(&self) -> String {
        match self {
            Local::Direct(_) => String::new(),
            Local::Bridgehead(g) => g.log(),
            Local::Mosquitto(m) => {
                fs::read_to_string(m.dir.path().join("mosquitto.log")).unwrap_or_default()
            }
        }
    }

    pub fn sample(&self) -> Option<ProcSample> {
        ProcSample::read(self.pid()?)
    }

    /// Resident set size now, MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        status_kib(self.pid()?, "VmRSS:").map(|k| k as f64 / 1024.0)
    }

    /// Peak resident set size since start or the last [`Local::reset_peak`], MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        status_kib(self.pid()?, "VmHWM:").map(|k| k as f64 / 1024.0)
    }

    /// Starts a new peak-RSS measurement (`/proc/PID/clear_refs` 5); false if the kernel
    /// refused.
    pub fn reset_peak(&self) -> bool {
        self.pid()
            .is_some_and(|pid| fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill9(&mut self) {
        match self {
            Local::Direct(_) => {}
            Local::Bridgehead(g) => g.kill9(),
            Local::Mosquitto(m) => m.kill9(),
        }
    }

    /// Starts again on the same config and data, and waits until devices can connect.
    pub fn restart(&mut self) {
        match self {
            Local::Direct(_) => {}
            Local::Bridgehead(g) => g.start_again(),
            Local::Mosquitto(m) => m.spawn(),
        }
    }
}

/// What a process has cost so far: bytes it caused to be written to storage, and CPU.
#[derive(Clone, Copy)]
pub struct ProcSample {
    pub write_bytes: u64,
    pub cpu_seconds: f64,
}

impl ProcSample {
    pub fn read(pid: u32) -> Option<ProcSample> {
        let io = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        let write_bytes = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))?
            .trim()
            .parse()
            .ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the parenthesised command name: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(ProcSample {
            write_bytes,
            cpu_seconds: ticks as f64 / hz,
        })
    }
}

/// Cost between two samples, per message.
pub struct Cost {
    pub bytes_per_msg: f64,
    pub cpu_us_per_msg: f64,
}

pub fn cost(
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    messages: usize,
) -> Option<Cost> {
    let (before, after) = (before?, after?);
    let n = messages.max(1) as f64;
    Some(Cost {
        bytes_per_msg: after.write_bytes.saturating_sub(before.write_bytes) as f64 / n,
        cpu_us_per_msg: (after.cpu_seconds - before.cpu_seconds).max(0.0) * 1e6 / n,
    })
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Which bridge a [`LocalMosquitto`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bridge {
    /// No bridge, no persistence: a plain site broker on mosquitto's defaults.
    None,
    Stock,
    Tuned,
}

/// mosquitto as a site broker bridging `warehouse/#` up and the command topics down, the
/// way its manual shows. Stock: everything else at mosquitto's defaults, persistence on
/// (as Debian ships it). Tuned: `max_queued_messages` raised and the store saved every
/// second (`autosave_interval 1`). Or no bridge at all.
pub struct LocalMosquitto {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl LocalMosquitto {
    fn start(cloud_port: u16, bridge: Bridge) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let tuning = match bridge {
            Bridge::Tuned => {
                format!("max_queued_messages {TUNED_MAX_QUEUED}\nautosave_interval 1\n")
            }
            _ => String::new(),
        };
        let listener = format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n");
        let conf = match bridge {
            // max_connections -1 is mosquitto's default; said here because 1000 idle
            // devices rely on it.
            Bridge::None => format!("{listener}max_connections -1\n"),
            _ => format!(
                "{listener}persistence true\npersistence_location {dir}/\n{tuning}\
                 connection cloud\naddress 127.0.0.1:{cloud_port}\nclientid gw-test-mosquitto\n\
                 cleansession false\nrestart_timeout 1\n\
                 topic warehouse/# out 1 \"\" fleet/gw-test/\n\
                 topic # in 1 \"\" fleet/gw-test/cmd/\n",
                dir = dir.path().display()
            ),
        };
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
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .expect("log");
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
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the local mosquitto does not accept within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalMosquitto {
    fn drop(&mut self) {
        self.kill9();
    }
}
