//! The gateway as its real binary: a child process with a config and data dir of its own.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{accepts, free_port, signal, tail, wait_child};

/// The TOML a test runs the gateway with: good defaults for tests, each key overridable.
pub struct GatewayConfig {
    dir: TempDir,
    pub local_port: u16,
    sections: Vec<(String, Vec<(String, String)>)>,
    tail: Vec<String>,
}

impl GatewayConfig {
    /// Defaults: gateway `gw-test`, local broker on a free port, cloud at
    /// `mqtt://127.0.0.1:cloud_port`, fast reconnects, metrics every 200 ms, one uplink
    /// rule `warehouse/#` -> `fleet/gw-test/...` and one downlink rule
    /// `fleet/gw-test/cmd/#` -> local topics, both QoS 1.
    pub fn new(cloud_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("gateway tempdir");
        let local_port = free_port();
        let data_dir = dir.path().join("data");
        let q = |s: &str| format!("\"{s}\"");
        let sections = vec![
            (
                "gateway".to_string(),
                vec![
                    ("id".to_string(), q("gw-test")),
                    ("data_dir".into(), q(&data_dir.display().to_string())),
                    ("metrics_interval".into(), q("200ms")),
                ],
            ),
            (
                "local".into(),
                vec![("listen".into(), q(&format!("127.0.0.1:{local_port}")))],
            ),
            (
                "cloud".into(),
                vec![
                    ("url".into(), q(&format!("mqtt://127.0.0.1:{cloud_port}"))),
                    ("reconnect_min".into(), q("100ms")),
                    ("reconnect_max".into(), q("1s")),
                ],
            ),
            ("queue".into(), vec![("commit_interval".into(), q("20ms"))]),
        ];
        let tail = vec![
            "[[uplink]]\n\
             topic = \"warehouse/#\"\n\
             remote_prefix = \"fleet/{gateway_id}/\"\n\
             qos = 1\n"
                .to_string(),
            "[[downlink]]\n\
             topic = \"#\"\n\
             remote_prefix = \"fleet/{gateway_id}/cmd/\"\n\
             local_prefix = \"\"\n\
             qos = 1\n"
                .to_string(),
        ];
        GatewayConfig {
            dir,
            local_port,
            sections,
            tail,
        }
    }

    /// Sets `[section] key = value`, `value` being raw TOML (`"\"64KiB\""`, `100`).
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        let index = match self.sections.iter().position(|(s, _)| s == section) {
            Some(index) => index,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[index].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Sets a string value: `set_str("queue", "max_size", "64KiB")`.
    pub fn set_str(self, section: &str, key: &str, value: &str) -> Self {
        let quoted = format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""));
        self.set(section, key, &quoted)
    }

    /// Drops the default `[[downlink]]` rule: no command connection.
    pub fn without_downlink(mut self) -> Self {
        self.tail.retain(|t| !t.starts_with("[[downlink]]"));
        self
    }

    /// Appends raw TOML after the rules (more `[[uplink]]` tables, say).
    pub fn append(mut self, raw: &str) -> Self {
        self.tail.push(raw.to_string());
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The gateway's temporary directory, for files its config names.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn toml(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            out += &format!("[{section}]\n");
            for (key, value) in keys {
                out += &format!("{key} = {value}\n");
            }
            out += "\n";
        }
        out += &self.tail.join("\n");
        out
    }

    /// Writes the config and starts `bridgehead run` on it (not waiting for readiness).
    pub fn start(self) -> Gateway {
        let config_path = self.dir.path().join("bridgehead.toml");
        fs::write(&config_path, self.toml()).expect("writing the gateway config");
        let mut gateway = Gateway {
            local_port: self.local_port,
            data_dir: self.data_dir(),
            log_path: self.dir.path().join("gateway.log"),
            config_path,
            _dir: self.dir,
            child: None,
        };
        gateway.spawn();
        gateway
    }
}

/// A running (or stopped) `bridgehead run --config FILE`.
pub struct Gateway {
    pub local_port: u16,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    _dir: TempDir,
    child: Option<Child>,
}

impl Gateway {
    /// Starts with `config`, waits until the local broker accepts TCP.
    pub fn start(config: GatewayConfig) -> Self {
        let mut gateway = config.start();
        gateway.wait_ready();
        gateway
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("gateway log file");
        let child = Command::new(env!("CARGO_BIN_EXE_bridgehead"))
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .expect("starting the bridgehead binary");
        self.child = Some(child);
    }

    /// Waits (20 s at most) until the local MQTT port accepts TCP connections.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !accepts(self.local_port) {
            if let Some(status) = self.try_exit() {
                panic!(
                    "the gateway exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the gateway's local broker does not accept on 127.0.0.1:{} within 20 s:\n{}",
                self.local_port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().expect("polling the gateway process"))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit().is_none()
    }

    /// SIGTERM; returns the exit status and how long the exit took. Panics (after a
    /// SIGKILL) if the gateway is still running 15 s later.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("the gateway is not running");
        let start = Instant::now();
        signal(child.id(), libc::SIGTERM);
        match wait_child(&mut child, Duration::from_secs(15)) {
            Some(status) => (status, start.elapsed()),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway ignored SIGTERM for 15 s:\n{}", self.log());
            }
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the gateway is not running");
        child.kill().expect("SIGKILL to the gateway");
        child.wait().expect("reaping the gateway");
    }

    /// Runs again with the same config and data dir, and waits until ready.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the gateway is still running");
        self.spawn();
        self.wait_ready();
    }

    /// Everything the gateway printed, across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The first log line holding every one of `words` (case-insensitive) within
    /// `timeout`, or None.
    pub async fn wait_log(&self, timeout: Duration, words: &[&str]) -> Option<String> {
        let find = || {
            self.log()
                .lines()
                .find(|line| {
                    let line = line.to_lowercase();
                    words.iter().all(|w| line.contains(&w.to_lowercase()))
                })
                .map(str::to_string)
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = find() {
                return Some(line);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory of the gateway process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let pid = self
            .child
            .as_ref()
            .expect("the gateway is not running")
            .id();
        let status =
            fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// `DATA_DIR/status.json`, if it exists and parses.
    pub fn status(&self) -> Option<Value> {
        let text = fs::read_to_string(self.data_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until `status.json` satisfies `pred`; panics with the last status and the
    /// log if it does not within `timeout`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if let Some(status) = status.as_ref().filter(|s| pred(s)) {
                return status.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "gateway status: not {what} within {timeout:?}; last status.json: {}\n\
                     --- gateway log ---\n{}",
                    status.map_or("none".to_string(), |s| s.to_string()),
                    tail(&self.log_path, 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until both cloud links report `up`.
    pub async fn wait_cloud_up(&self, timeout: Duration) -> Value {
        self.wait_status(timeout, "connected to the cloud", |s| {
            s["cloud"]["telemetry"] == "up" && s["cloud"]["commands"] == "up"
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ({}), last lines ---\n{}",
                self.log_path.display(),
                tail(&self.log_path, 80)
            );
            if let Some(status) = self.status() {
                eprintln!("--- gateway status.json ---\n{status}");
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `status["counters"][name]`; panics if the gateway does not report that counter.
pub fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status.json has no counters.{name}: {status}"))
}
