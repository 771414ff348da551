//! The cloud side: `mqtts://` with the CA the user gives, mutual TLS, SNI, a password, any
//! refused certificate logged with its reason while the gateway keeps running (and
//! queueing), and failover across the nodes `cloud.url` lists without a message lost or
//! out of order.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::certs::{TestCa, Usage};
use support::{
    counter, mosquitto_passwd, publish_many, telemetry_burst, wait_until, write_unrelated_ca,
    Collector, Deliveries, Expected, Gateway, GatewayConfig, Mosquitto, PasswdHash, QoS,
    CLOUD_PREFIX, TELEMETRY_FILTER,
};

fn tls_config(cloud: &Mosquitto, ca_file: &std::path::Path) -> GatewayConfig {
    let tls_port = cloud.tls_port.expect("a TLS listener");
    GatewayConfig::new(cloud.port)
        .set_str("cloud", "url", &format!("mqtts://127.0.0.1:{tls_port}"))
        .set_str("cloud", "ca_file", &ca_file.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_goes_up_over_tls_with_the_users_ca() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start_tls();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(tls_config(&cloud, &cloud.ca_pem_path()));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let topic = "warehouse/tls/temp";
    let sent = publish_many(gateway.local_port, "sensor", topic, 100, QoS::AtLeastOnce).await;

    assert!(
        collector.wait_for_count(100, Duration::from_secs(20)).await,
        "only {} of 100 arrived over TLS",
        collector.distinct()
    );
    let expected = Expected::from([(format!("{CLOUD_PREFIX}{topic}"), sent)]);
    collector.deliveries().assert_exactly(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_certificate_from_another_ca_is_refused_with_the_reason_logged() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start_tls();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let wrong_ca = elsewhere.path().join("other-ca.pem");
    write_unrelated_ca(&wrong_ca);
    let mut gateway = Gateway::start(tls_config(&cloud, &wrong_ca));

    publish_many(
        gateway.local_port,
        "sensor",
        "warehouse/tls/temp",
        10,
        QoS::AtLeastOnce,
    )
    .await;

    let refused_line = |log: &str| {
        log.lines()
            .find(|line| {
                let line = line.to_lowercase();
                line.contains("certificate")
                    && (line.contains("unknownissuer") || line.contains("unknown issuer"))
            })
            .map(str::to_string)
    };
    let logged = wait_until(Duration::from_secs(15), || {
        refused_line(&gateway.log()).is_some()
    })
    .await;
    assert!(
        logged,
        "no log line says the certificate was refused for an unknown issuer:\n{}",
        gateway.log()
    );
    println!(
        "refusal logged: {}",
        refused_line(&gateway.log()).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        collector.distinct(),
        0,
        "messages went up over an untrusted TLS link"
    );
    assert!(
        gateway.is_running(),
        "the gateway gave up:\n{}",
        gateway.log()
    );
    let status = gateway
        .wait_status(Duration::from_secs(5), "holding the 10 messages", |s| {
            s["queue"]["rows"] == 10
        })
        .await;
    assert_ne!(status["cloud"]["telemetry"], "up", "{status}");
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A cloud broker whose second listener speaks TLS with a certificate for `names`
/// (expired if asked), made by a CA of the test; `extra` adds listener settings.
fn tls_cloud(dir: &Path, names: &[&str], expired: bool, extra: &str) -> (Mosquitto, TestCa) {
    let ca = TestCa::new(dir, "cloud");
    let (cert, key) = ca.issue("cloud-broker", names, Usage::Server, expired);
    let conf = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n{extra}\n",
        path(&ca.ca_path("cloud")),
        path(&cert),
        path(&key)
    );
    (Mosquitto::start_with_listener(&conf), ca)
}

fn to_tls_cloud(cloud: &Mosquitto, host: &str, ca: &TestCa) -> GatewayConfig {
    let port = cloud.tls_port.expect("a second listener");
    GatewayConfig::new(cloud.port)
        .set_str("cloud", "url", &format!("mqtts://{host}:{port}"))
        .set_str("cloud", "ca_file", &path(&ca.ca_path("cloud")))
}

async fn telemetry_arrives(cloud: &Mosquitto, gateway: &Gateway, collector: &Collector) {
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let topic = "warehouse/secure/temp";
    let sent = publish_many(gateway.local_port, "sensor", topic, 50, QoS::AtLeastOnce).await;
    assert!(
        collector.wait_for_count(50, Duration::from_secs(20)).await,
        "only {} of 50 arrived:\n{}",
        collector.distinct(),
        cloud.log()
    );
    let expected = Expected::from([(format!("{CLOUD_PREFIX}{topic}"), sent)]);
    collector.deliveries().assert_exactly(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_gateways_own_certificate() {
    let _serial = support::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let (cloud, ca) = tls_cloud(
        dir.path(),
        &["localhost", "127.0.0.1"],
        false,
        "require_certificate true\nuse_identity_as_username true",
    );
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let (cert, key) = ca.issue("gw-test", &[], Usage::Client, false);

    // Without a client certificate the cloud hangs up, and the gateway says so.
    let mut without = Gateway::start(to_tls_cloud(&cloud, "localhost", &ca));
    let line = without
        .wait_log(Duration::from_secs(15), &["cloud telemetry link down"])
        .await;
    assert!(line.is_some(), "no refusal logged:\n{}", without.log());
    assert!(without.is_running());
    drop(without);

    let gateway = Gateway::start(
        to_tls_cloud(&cloud, "localhost", &ca)
            .set_str("cloud", "cert_file", &path(&cert))
            .set_str("cloud", "key_file", &path(&key)),
    );
    telemetry_arrives(&cloud, &gateway, &collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_or_expired_is_refused_with_the_reason() {
    let _serial = support::serial().await;
    for (names, expired, host, reason) in [
        (&["localhost"][..], false, "127.0.0.1", "wrong name"),
        (
            &["localhost", "127.0.0.1"][..],
            true,
            "localhost",
            "expired",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (cloud, ca) = tls_cloud(dir.path(), names, expired, "allow_anonymous true");
        let mut gateway = Gateway::start(to_tls_cloud(&cloud, host, &ca));
        let line = gateway
            .wait_log(Duration::from_secs(15), &["certificate", reason])
            .await;
        assert!(
            line.is_some(),
            "no log line says {reason:?}:\n{}",
            gateway.log()
        );
        println!("refusal logged: {}", line.unwrap_or_default());
        assert!(gateway.is_running());
        assert_ne!(
            gateway.status().unwrap_or_default()["cloud"]["telemetry"],
            "up"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_host_name_is_sent_as_sni() {
    let _serial = support::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "sni");
    let (cert, key) = ca.issue("sni-server", &["localhost"], Usage::Server, false);
    let server = SniRecorder::start(&cert, &key).await;
    let gateway = Gateway::start(
        GatewayConfig::new(1)
            .set_str(
                "cloud",
                "url",
                &format!("mqtts://localhost:{}", server.port),
            )
            .set_str("cloud", "ca_file", &path(&ca.ca_path("sni"))),
    );
    let seen = wait_until(Duration::from_secs(15), || !server.names().is_empty()).await;
    assert!(
        seen,
        "no TLS handshake reached the server:\n{}",
        gateway.log()
    );
    assert!(
        server
            .names()
            .iter()
            .all(|n| n.as_deref() == Some("localhost")),
        "{:?}",
        server.names()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_logs_in_to_the_cloud_with_its_password() {
    let _serial = support::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("cloud-passwd");
    mosquitto_passwd(&passwd, "gw-test", "cloud-secret", PasswdHash::Pbkdf2);
    let cloud = Mosquitto::start_with_listener(&format!(
        "allow_anonymous false\npassword_file {}",
        path(&passwd)
    ));
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let login = |password: &str| {
        let file = dir.path().join(format!("pw-{password}"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        GatewayConfig::new(cloud.port)
            .set_str(
                "cloud",
                "url",
                &format!("mqtt://127.0.0.1:{}", cloud.tls_port.unwrap()),
            )
            .set_str("cloud", "username", "gw-test")
            .set_str("cloud", "password_file", &path(&file))
    };

    let wrong = Gateway::start(login("guess"));
    let line = wrong
        .wait_log(Duration::from_secs(15), &["link down", "refused"])
        .await;
    assert!(line.is_some(), "no refusal logged:\n{}", wrong.log());
    drop(wrong);

    let gateway = Gateway::start(login("cloud-secret"));
    telemetry_arrives(&cloud, &gateway, &collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_fails_over_to_the_second_cloud_node_without_loss_or_reordering() {
    let _serial = support::serial().await;
    let mut first = Mosquitto::start();
    let second = Mosquitto::start();
    let on_first = Collector::start(first.port, TELEMETRY_FILTER).await;
    let on_second = Collector::start(second.port, TELEMETRY_FILTER).await;
    let nodes = format!(
        "[\"mqtt://127.0.0.1:{}\", \"mqtt://127.0.0.1:{}\"]",
        first.port, second.port
    );
    let gateway = Gateway::start(GatewayConfig::new(first.port).set("cloud", "url", &nodes));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let stream = tokio::spawn(telemetry_burst(
        gateway.local_port,
        2,
        5000,
        Duration::from_micros(800),
    ));
    assert!(
        on_first.wait_for_count(2000, Duration::from_secs(30)).await,
        "the stream did not start on the first node"
    );
    // The first node goes down mid-stream (it saves what it holds for its subscribers).
    first.stop();
    let expected = stream.await.expect("the devices' stream");
    let line = gateway
        .wait_log(
            Duration::from_secs(15),
            &["failing over to the next cloud node"],
        )
        .await;
    assert!(line.is_some(), "no failover logged:\n{}", gateway.log());
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    // Back up, the first node hands its subscriber what it had accepted before it stopped.
    first.restart();
    let all_arrived = wait_until(Duration::from_secs(60), || {
        let both: Vec<_> = on_first
            .messages()
            .into_iter()
            .chain(on_second.messages())
            .collect();
        Deliveries::of(&both)
            .first
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= 10_000
    })
    .await;
    let both: Vec<_> = on_first
        .messages()
        .into_iter()
        .chain(on_second.messages())
        .collect();
    let deliveries = Deliveries::of(&both);
    assert!(
        all_arrived,
        "{} of 10000 arrived across both nodes",
        deliveries.first.values().map(Vec::len).sum::<usize>()
    );
    deliveries.assert_exactly(&expected);
    println!(
        "first node: {} deliveries, second node: {}, duplicates across both: {}",
        on_first.messages().len(),
        on_second.messages().len(),
        deliveries.duplicates
    );
    gateway
        .wait_status(Duration::from_secs(5), "every message forwarded", |s| {
            counter(s, "forwarded") == 10_000
        })
        .await;
}

/// A TLS server that records the server name each client hello asks for, then hangs up.
struct SniRecorder {
    port: u16,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Recorder {
    seen: Arc<Mutex<Vec<Option<String>>>>,
    key: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for Recorder {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.seen
            .lock()
            .unwrap()
            .push(hello.server_name().map(str::to_owned));
        Some(self.key.clone())
    }
}

impl SniRecorder {
    async fn start(cert: &PathBuf, key: &PathBuf) -> Self {
        let certs = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
            .unwrap()
            .unwrap();
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let resolver = Recorder {
            seen: seen.clone(),
            key: Arc::new(rustls::sign::CertifiedKey::new(certs, signing)),
        };
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = acceptor.accept(stream).await;
            }
        });
        SniRecorder { port, seen, task }
    }

    fn names(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for SniRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
