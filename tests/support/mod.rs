//! Real peers for the story tests: a mosquitto "cloud", a cuttable TCP proxy, the gateway
//! binary as a child process, and MQTT clients playing devices, actuators and the cloud
//! side. Everything listens on free 127.0.0.1 ports and is stopped when dropped.
//!
//! Each test binary uses a subset of this module.
#![allow(dead_code, unused_imports)]

pub mod certs;
mod field;
mod gateway;
mod mosquitto;
mod mqtt;
mod mqtt5;
mod proxy;
pub mod raw;
pub mod wire;

use std::net::TcpListener;
use std::time::{Duration, Instant};

pub use certs::write_unrelated_ca;
pub use field::{
    latest, paho, paho5, paho_spawn, Endpoint, Executed, LineProcess, ModbusServer, PtyPair, Sensor,
};
pub use gateway::{counter, Edit, Gateway, GatewayConfig};
pub use mosquitto::{mosquitto_passwd, mosquitto_passwd_delete, Mosquitto, PasswdHash};
pub use mqtt::{
    publish_all, publish_many, publish_paced, publish_retained, retained, seq_payload,
    telemetry_burst, Collector, Deliveries, Expected, LocalSubscriber, Received,
};
pub use mqtt5::{publish_by_alias, Device5, QoS5, Received5};
pub use proxy::Proxy;
pub use rumqttc::QoS;

/// `cloud.*` topics of the default [`GatewayConfig`] (gateway id `gw-test`).
pub const CLOUD_PREFIX: &str = "fleet/gw-test/";
pub const COMMAND_PREFIX: &str = "fleet/gw-test/cmd/";
pub const STATUS_TOPIC: &str = "fleet/gw-test/status";
/// The collector's filter for everything the default uplink rule forwards.
pub const TELEMETRY_FILTER: &str = "fleet/gw-test/warehouse/#";

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port on 127.0.0.1")
        .port()
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The tests of one binary start heavy peers (a broker, the gateway, tens of thousands of
/// messages): run them one at a time so that timings on a 2-core machine stay meaningful.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Waits for `child` to exit within `timeout`; `None` if it is still running.
fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

/// The last `lines` lines of a log file, for failure reports.
fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// The own-broker story tests' helpers (kept apart: others edit the lines above).
pub use mqtt5::delayed_will;
mod acked;
pub use acked::{stream_until_closed, Streamed};
