//! Field peers: pymodbus servers (TCP on loopback, RTU on a socat pty) as Modbus devices,
//! and socat pty pairs as serial lines. Each is a child process killed on drop.
//!
//! The interpreter with pymodbus is `$BRIDGEHEAD_TEST_PYTHON`, by default the repository's
//! `.venv-test/bin/python` (scripts/test creates it).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{accepts, free_port, tail, LocalSubscriber};

fn python() -> PathBuf {
    std::env::var_os("BRIDGEHEAD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/python"))
}

fn server_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/modbus_server.py")
}

/// Where a [`ModbusServer`] listens.
#[derive(Clone)]
pub enum Endpoint {
    Tcp(u16),
    /// The server's end of a pty pair, and the baud rate.
    Rtu(PathBuf, u32),
}

/// One request the server executed (reads, and the read-back of a write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed {
    pub unit: u8,
    pub function: u8,
    pub address: u16,
    pub count: u16,
}

/// A pymodbus server with known register contents:
/// `{"UNIT": {"hr"|"ir"|"co"|"di": {"ADDRESS": VALUE}}}`.
pub struct ModbusServer {
    dir: TempDir,
    pub endpoint: Endpoint,
    child: Option<Child>,
    starts: usize,
}

impl ModbusServer {
    pub fn tcp(registers: &serde_json::Value) -> Self {
        Self::tcp_on(free_port(), registers)
    }

    /// On a given port (a device switched on after the gateway started polling it).
    pub fn tcp_on(port: u16, registers: &serde_json::Value) -> Self {
        Self::start(Endpoint::Tcp(port), registers)
    }

    pub fn rtu(device: &Path, baud: u32, registers: &serde_json::Value) -> Self {
        Self::start(Endpoint::Rtu(device.to_path_buf(), baud), registers)
    }

    fn start(endpoint: Endpoint, registers: &serde_json::Value) -> Self {
        let dir = tempfile::tempdir().expect("modbus server tempdir");
        fs::write(dir.path().join("registers.json"), registers.to_string())
            .expect("writing the register contents");
        let mut server = ModbusServer {
            dir,
            endpoint,
            child: None,
            starts: 0,
        };
        server.spawn();
        server
    }

    /// Replaces the register contents for the next [`ModbusServer::restart`].
    pub fn set_registers(&self, registers: &serde_json::Value) {
        fs::write(
            self.dir.path().join("registers.json"),
            registers.to_string(),
        )
        .expect("writing the register contents");
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.dir.path().join(format!("server-{start}.log"))
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("server log");
        let mut command = Command::new(python());
        command
            .arg(server_script())
            .arg("--registers")
            .arg(self.dir.path().join("registers.json"));
        match &self.endpoint {
            Endpoint::Tcp(port) => command.arg("--tcp").arg(port.to_string()),
            Endpoint::Rtu(device, baud) => command
                .arg("--rtu")
                .arg(device)
                .arg("--baud")
                .arg(baud.to_string()),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} (set BRIDGEHEAD_TEST_PYTHON to a python with pymodbus 3.6.9): {e}",
                    python().display()
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match self.endpoint {
                Endpoint::Tcp(port) => accepts(port),
                Endpoint::Rtu(..) => self.log().contains("READY"),
            };
            if ready {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("the modbus server exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the modbus server is not ready within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the server printed since its last start.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// Read requests executed since the last start (function codes 1 to 4).
    pub fn reads(&self) -> Vec<Executed> {
        self.log()
            .lines()
            .filter_map(parse_request)
            .filter(|r| (1..=4).contains(&r.function))
            .collect()
    }

    /// `SET` lines: writes the server executed, as printed (`unit=1 fc=5 address=5 values=[True]`).
    pub fn writes(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| line.strip_prefix("SET "))
            .map(str::to_owned)
            .collect()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same endpoint, with the current register contents.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the modbus server is still running");
        self.spawn();
    }
}

fn parse_request(line: &str) -> Option<Executed> {
    let rest = line.strip_prefix("REQ ")?;
    let mut fields = rest
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(_, v)| v);
    Some(Executed {
        unit: fields.next()?.parse().ok()?,
        function: fields.next()?.parse().ok()?,
        address: fields.next()?.parse().ok()?,
        count: fields.next()?.parse().ok()?,
    })
}

impl Drop for ModbusServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- modbus server log ---\n{}",
                tail(&self.log_path(self.starts), 40)
            );
        }
        self.kill();
    }
}

/// Two connected pseudo-terminals made by socat: `device` for the gateway, `peer` for the
/// test's end (a sensor, or the Modbus server).
pub struct PtyPair {
    _dir: TempDir,
    pub device: PathBuf,
    pub peer: PathBuf,
    child: Option<Child>,
}

impl PtyPair {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("pty tempdir");
        let mut pair = PtyPair {
            device: dir.path().join("device"),
            peer: dir.path().join("peer"),
            _dir: dir,
            child: None,
        };
        pair.open();
        pair
    }

    /// Starts socat (again), with the same link names.
    pub fn open(&mut self) {
        assert!(self.child.is_none(), "socat is still running");
        let _ = fs::remove_file(&self.device);
        let _ = fs::remove_file(&self.peer);
        let pty = |link: &Path| format!("pty,raw,echo=0,link={}", link.display());
        let child = Command::new("socat")
            .arg(pty(&self.peer))
            .arg(pty(&self.device))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting socat (apt-get install socat)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.device.exists() && self.peer.exists()) {
            assert!(
                Instant::now() < deadline,
                "socat made no pty pair within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills socat: both ptys go away, like an unplugged USB adapter.
    pub fn close(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The sensor's side: lines written here reach the gateway.
    pub fn sensor(&self) -> Sensor {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.peer)
            .expect("opening the sensor end of the pty");
        let reader = file.try_clone().expect("pty handle");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                match line {
                    Ok(line) => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Sensor { file, lines }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.close();
    }
}

/// The test's end of a serial line.
pub struct Sensor {
    file: File,
    lines: mpsc::Receiver<String>,
}

impl Sensor {
    /// Writes raw bytes (a line needs its own `\n`).
    pub fn send(&mut self, bytes: &[u8]) {
        self.file.write_all(bytes).expect("writing to the pty");
        self.file.flush().expect("flushing the pty");
    }

    /// The next line the gateway wrote to the port, within `timeout`.
    pub fn recv_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }
}

/// The latest payload of each of `topics` seen within `timeout`; returns as soon as every
/// topic has been seen once (and the latest of each afterwards is what the map holds).
pub async fn latest(
    subscriber: &mut LocalSubscriber,
    topics: &[&str],
    timeout: Duration,
) -> std::collections::HashMap<String, String> {
    let deadline = Instant::now() + timeout;
    let mut seen = std::collections::HashMap::new();
    while !topics.iter().all(|t| seen.contains_key(*t)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match subscriber.recv(left).await {
            Some(m) => {
                seen.insert(m.topic, m.payload);
            }
            None => break,
        }
    }
    seen
}

fn paho_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/paho_client.py")
}

/// One step of `tests/support/paho_client.py` (the Eclipse Paho client playing a device)
/// against the local broker on `port`: its output lines. Panics when the step fails, with
/// what it printed.
pub fn paho(port: u16, args: &[&str]) -> Vec<String> {
    let out = Command::new(python())
        .arg(paho_script())
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "starting {} (set BRIDGEHEAD_TEST_PYTHON to a python with paho-mqtt 2.1.0): {e}",
                python().display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "paho {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// One MQTT 5 step of `paho_client.py` (`v5-pub`, `v5-request`...): its JSON lines.
pub fn paho5(port: u16, args: &[&str]) -> Vec<serde_json::Value> {
    paho(port, args)
        .iter()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("paho {args:?} printed {line:?}, not JSON: {e}"))
        })
        .collect()
}

/// A `paho_client.py` step left running (an MQTT 5 subscriber or responder) while the
/// test acts: see [`LineProcess`].
pub fn paho_spawn(port: u16, args: &[&str]) -> LineProcess {
    let mut command = Command::new(python());
    command.arg(paho_script()).arg(port.to_string()).args(args);
    LineProcess::spawn(&format!("paho {args:?}"), command)
}

/// A child process whose output lines the test reads as they come (a `paho_client.py`
/// step, `mosquitto_sub`); stderr lines come too, marked `stderr: `. Stopped by its PID
/// (SIGTERM, then SIGKILL) when dropped.
pub struct LineProcess {
    what: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LineProcess {
    pub fn spawn(what: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if out_tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        LineProcess {
            what: what.to_string(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line from now on that `wanted` accepts, waiting until `timeout` for it;
    /// panics with everything the process printed when none came.
    pub fn expect(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: not the line expected within {timeout:?}:\n{}",
                        self.what,
                        self.output()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = super::wait_child(&mut self.child, Duration::from_secs(2));
                    panic!(
                        "{}: ended ({status:?}) without the line expected:\n{}",
                        self.what,
                        self.output()
                    )
                }
            }
        }
    }

    /// The next JSON line of a `paho_client.py` step whose "event" is `event`.
    pub fn event(&mut self, event: &str, timeout: Duration) -> serde_json::Value {
        let line = self.expect(timeout, |line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|value| value["event"] == event)
        });
        serde_json::from_str(&line).expect("checked above")
    }

    /// Everything it printed so far, for failure messages.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for LineProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        super::signal(self.child.id(), libc::SIGTERM);
        if super::wait_child(&mut self.child, Duration::from_secs(2)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
