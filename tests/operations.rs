//! Running the gateway as a service: systemd hears when it is ready, reloading and alive
//! (and stops hearing the watchdog when a task hangs), a task that stops takes the process
//! down for a restart, `bridgehead status` tells the truth of this moment, and the unit
//! file passes `systemd-analyze verify`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    accepts, counter, publish_many, Edit, Gateway, GatewayConfig, Mosquitto, Proxy, QoS,
};

/// A `NOTIFY_SOCKET` the test binds: every datagram the gateway sends, with when it came.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: String,
    heard: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = heard.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket {
            path: path.display().to_string(),
            _dir: dir,
            heard,
        }
    }

    fn heard(&self) -> Vec<(Instant, String)> {
        self.heard.lock().unwrap().clone()
    }

    /// When the first message containing `line` (as a whole line) came after `after`.
    async fn wait_for(&self, line: &str, after: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .heard()
                .into_iter()
                .find(|(at, text)| *at >= after && text.lines().any(|l| l == line));
            if let Some((at, _)) = found {
                return Some(at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn count(&self, line: &str, from: Instant) -> usize {
        self.heard()
            .iter()
            .filter(|(at, text)| *at >= from && text.lines().any(|l| l == line))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_reloads() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let notify = NotifySocket::bind();
    let config = GatewayConfig::new(cloud.port)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "2000000");
    let port = config.local_port;
    let started = Instant::now();
    let gateway = config.start();

    notify
        .wait_for("READY=1", started, Duration::from_secs(20))
        .await
        .expect("no READY=1 from the gateway");
    assert!(
        accepts(port),
        "READY=1 came before the device port listened"
    );

    let ready = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pings = notify.count("WATCHDOG=1", ready);
    assert!(
        pings >= 2,
        "{pings} watchdog pings in 4 s at WatchdogSec=2s"
    );
    assert!(
        notify
            .heard()
            .iter()
            .any(|(_, t)| t.starts_with("STATUS=cloud telemetry up")),
        "no STATUS= with the link state: {:?}",
        notify.heard()
    );

    let before_reload = Instant::now();
    gateway.write_config(
        &gateway
            .config_text()
            .replace("[queue]\n", "[queue]\nmax_age = \"6d\"\n"),
        Edit::Rename,
    );
    let reloading = notify
        .wait_for("RELOADING=1", before_reload, Duration::from_secs(10))
        .await
        .expect("no RELOADING=1 around the reload");
    let message = notify
        .heard()
        .into_iter()
        .find(|(at, t)| *at == reloading && t.contains("RELOADING=1"))
        .map(|(_, t)| t)
        .unwrap_or_default();
    assert!(
        message.contains("MONOTONIC_USEC="),
        "RELOADING=1 without MONOTONIC_USEC: {message:?}"
    );
    notify
        .wait_for("READY=1", reloading, Duration::from_secs(10))
        .await
        .expect("no READY=1 after the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_not_pinged_once_a_task_hangs() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let notify = NotifySocket::bind();
    let started = Instant::now();
    let gateway = GatewayConfig::new(cloud.port)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env("BRIDGEHEAD_TEST_FAULT", "broker:hang")
        .start();
    notify
        .wait_for("WATCHDOG=1", started, Duration::from_secs(20))
        .await
        .expect("no watchdog ping before the hang");

    // The broker's task stops being polled 3 s after it started; give the probes time to
    // notice.
    tokio::time::sleep_until((started + Duration::from_secs(5)).into()).await;
    let quiet_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        notify.count("WATCHDOG=1", quiet_from),
        0,
        "the watchdog was pinged while the broker's task hung"
    );
    assert!(
        gateway.log().contains("tasks not answering") && gateway.log().contains("broker"),
        "the log does not name the hung task:\n{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_task_that_stops_ends_the_process_non_zero() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = GatewayConfig::new(cloud.port)
        .env("BRIDGEHEAD_TEST_FAULT", "broker:exit")
        .start();
    let status = gateway
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "the gateway kept running without its broker task:\n{}",
                gateway.log()
            )
        });
    assert!(!status.success(), "exit status {status}");
    assert!(
        gateway
            .log()
            .contains("the broker task stopped while the gateway was running"),
        "{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_gives_exact_values_under_a_known_backlog() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let link = Proxy::start(cloud.port).await;
    let mut gateway = Gateway::start(GatewayConfig::new(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let (code, _) = gateway.status_command(true);
    assert_eq!(code, 0, "running and linked");

    link.cut();
    gateway.wait_telemetry_down().await;
    let topic = "warehouse/backlog";
    publish_many(gateway.local_port, "sensor", topic, 100, QoS::AtLeastOnce).await;
    // Each message counts local topic plus payload ("sensor:000042").
    let bytes = 100 * (topic.len() + "sensor:000000".len()) as u64;

    let (code, text) = gateway.status_command(true);
    let status: serde_json::Value = serde_json::from_str(&text).expect("status --json is JSON");
    assert_eq!(code, 2, "running with the link down: {text}");
    assert_eq!(status["running"], true);
    assert_eq!(status["queue"]["rows"], 100, "{status}");
    assert_eq!(status["queue"]["bytes"], bytes, "{status}");
    assert_eq!(counter(&status, "received"), 100, "{status}");
    assert_eq!(counter(&status, "forwarded"), 0, "{status}");
    assert_ne!(status["cloud"]["telemetry"], "up");
    let (code, text) = gateway.status_command(false);
    assert_eq!(code, 2);
    assert!(text.contains("outbox     100 rows"), "{text}");

    gateway.terminate();
    let (code, text) = gateway.status_command(true);
    let status: serde_json::Value = serde_json::from_str(&text).expect("status --json is JSON");
    assert_eq!(code, 3, "not running: {text}");
    assert_eq!(status["running"], false);
    assert!(status["written_ago_s"].as_u64().is_some(), "{status}");
    assert_eq!(status["queue"]["rows"], 100, "{status}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/bridgehead.service"),
    )
    .expect("reading systemd/bridgehead.service");
    for line in [
        "Type=notify",
        "WatchdogSec=30",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "LimitNOFILE=16384",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bridgehead.service");
    let local = unit.replace("/usr/bin/bridgehead", env!("CARGO_BIN_EXE_bridgehead"));
    std::fs::write(&path, local).expect("writing the unit");
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("bridgehead.service"),
        "systemd-analyze verify complains about the unit:\n{stderr}"
    );
}
