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
    /// The largest file the gateway may write (RLIMIT_FSIZE, as `prlimit --fsize`).
    file_size_limit: Option<u64>,
    sections: Vec<(String, Vec<(String, String)>)>,
    tail: Vec<String>,
    env: Vec<(String, String)>,
    /// `$RUNTIME_DIRECTORY` on tmpfs, as the systemd unit gives it.
    runtime: Option<TempDir>,
    /// Another gateway binary than this build's (see [`GatewayConfig::program`]).
    program: Option<PathBuf>,
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
            file_size_limit: None,
            sections,
            tail,
            env: Vec::new(),
            runtime: None,
            program: None,
        }
    }

    /// Runs `program` instead of this build's binary (the bench's baseline: another
    /// build of bridgehead that takes the same config).
    pub fn program(mut self, program: &std::path::Path) -> Self {
        self.program = Some(program.to_path_buf());
        self
    }

    /// An environment variable for the gateway process (`NOTIFY_SOCKET`, ...).
    /// Runs the gateway as the systemd unit does: `$RUNTIME_DIRECTORY` on tmpfs
    /// (/dev/shm), where it keeps `status.json`.
    pub fn runtime_dir_on_tmpfs(mut self) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bridgehead-run-")
            .tempdir_in("/dev/shm")
            .expect("a runtime directory on /dev/shm");
        let path = dir.path().display().to_string();
        self.runtime = Some(dir);
        self.env("RUNTIME_DIRECTORY", &path)
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
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

    /// Removes `[section] key`, so the gateway runs on its own default for it.
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        if let Some((_, keys)) = self.sections.iter_mut().find(|(s, _)| s == section) {
            keys.retain(|(k, _)| k != key);
        }
        self
    }

    /// Runs the gateway with a file size limit: its writes beyond `bytes` fail, as on a
    /// full disk (see [`Gateway::lift_file_size_limit`]).
    pub fn file_size_limit(mut self, bytes: u64) -> Self {
        self.file_size_limit = Some(bytes);
        self
    }

    /// Drops the default `[[downlink]]` rule: no command connection.
    pub fn without_downlink(mut self) -> Self {
        self.tail.retain(|t| !t.starts_with("[[downlink]]"));
        self
    }

    /// Drops the default `[[uplink]]` rule: nothing goes to the cloud.
    pub fn without_uplink(mut self) -> Self {
        self.tail.retain(|t| !t.starts_with("[[uplink]]"));
        self
    }

    /// Puts raw TOML (an `[[uplink]]` table, say) before the default rules, so that it is
    /// the first to match.
    pub fn prepend_rule(mut self, raw: &str) -> Self {
        self.tail.insert(0, raw.to_string());
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
            file_size_limit: self.file_size_limit,
            local_port: self.local_port,
            data_dir: self.data_dir(),
            log_path: self.dir.path().join("gateway.log"),
            config_path,
            env: self.env,
            _dir: self.dir,
            _runtime: self.runtime,
            program: self
                .program
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bridgehead"))),
            child: None,
        };
        gateway.spawn();
        gateway
    }
}

/// A running (or stopped) `bridgehead run --config FILE`.
pub struct Gateway {
    file_size_limit: Option<u64>,
    pub local_port: u16,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    _dir: TempDir,
    _runtime: Option<TempDir>,
    program: PathBuf,
    child: Option<Child>,
}

/// How a test changes the config file: as editors and config tools do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Written to a temporary file in the same directory and renamed over the config.
    Rename,
    /// Truncated and rewritten in place.
    InPlace,
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
        let mut command = match self.file_size_limit {
            Some(bytes) => {
                let mut prlimit = Command::new("prlimit");
                prlimit
                    .arg(format!("--fsize={bytes}:unlimited"))
                    .arg("--")
                    .arg(&self.program);
                prlimit
            }
            None => Command::new(&self.program),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

    /// The config file as it is now.
    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.config_path).expect("reading the gateway config")
    }

    /// Replaces the config file with `text`, the way `edit` says.
    pub fn write_config(&self, text: &str, edit: Edit) {
        match edit {
            Edit::Rename => {
                let tmp = self.config_path.with_extension("toml.new");
                fs::write(&tmp, text).expect("writing the new config");
                fs::rename(&tmp, &self.config_path).expect("renaming the new config");
            }
            Edit::InPlace => fs::write(&self.config_path, text).expect("rewriting the config"),
        }
    }

    /// `systemctl reload`: SIGHUP.
    pub fn sighup(&self) {
        let child = self.child.as_ref().expect("the gateway is not running");
        signal(child.id(), libc::SIGHUP);
    }

    /// The live status document from the gateway's status socket, if it answers.
    pub fn live_status(&self) -> Option<Value> {
        use std::io::{Read, Write};
        let mut stream =
            std::os::unix::net::UnixStream::connect(self.data_dir.join("status.sock")).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        stream.write_all(b"status\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The config generation the running gateway reports (1 at start).
    pub fn generation(&self) -> u64 {
        self.live_status()
            .and_then(|s| s["config"]["generation"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until the live status satisfies `pred`; panics with the log if it does not.
    pub async fn wait_live(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_doc("live status", || self.live_status(), timeout, what, pred)
            .await
    }

    /// Polls `read` until its document satisfies `pred`; panics with the last document
    /// and the log if it does not within `timeout`.
    async fn wait_doc(
        &self,
        source: &str,
        read: impl Fn() -> Option<Value>,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = read();
            if let Some(status) = status.as_ref().filter(|s| pred(s)) {
                return status.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "{source}: not {what} within {timeout:?}; last: {}\n\
                     --- gateway log ---\n{}",
                    status.map_or("none".to_string(), |s| s.to_string()),
                    tail(&self.log_path, 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the live status says the telemetry link is not up (after a cut).
    pub async fn wait_telemetry_down(&self) -> Value {
        self.wait_live(Duration::from_secs(10), "telemetry link down", |s| {
            s["cloud"]["telemetry"] != "up"
        })
        .await
    }

    /// `bridgehead ARGS... --config FILE`: exit code, standard output and standard error.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_bridgehead"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("running the bridgehead command line");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `bridgehead status --config FILE [--json]`: exit code and standard output.
    pub fn status_command(&self, json: bool) -> (i32, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bridgehead"));
        command.arg("status").arg("--config").arg(&self.config_path);
        if json {
            command.arg("--json");
        }
        let output = command.output().expect("running bridgehead status");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    /// Waits (up to `timeout`) for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("the gateway is not running");
        let status = wait_child(child, timeout);
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Space comes back: the running gateway may write files of any size again.
    pub fn lift_file_size_limit(&self) {
        let pid = self.pid().expect("the gateway is not running");
        let status = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg("--fsize=unlimited:unlimited")
            .status()
            .expect("running prlimit");
        assert!(status.success(), "prlimit --pid {pid}: {status}");
    }

    /// Bytes the gateway process has caused to be written to storage so far
    /// (`write_bytes` of /proc/PID/io).
    pub fn write_bytes(&self) -> u64 {
        let pid = self.pid().expect("the gateway is not running");
        let io = fs::read_to_string(format!("/proc/{pid}/io")).expect("reading /proc/PID/io");
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("write_bytes in /proc/PID/io")
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
        self.wait_doc("gateway status.json", || self.status(), timeout, what, pred)
            .await
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
