//! `mqtts://` to the cloud: the CA the user gives is trusted, any other is refused with
//! the reason in the log, and the gateway keeps running (and queueing).

mod support;

use std::time::Duration;

use support::{
    publish_many, wait_until, write_unrelated_ca, Collector, Expected, Gateway, GatewayConfig,
    Mosquitto, QoS, CLOUD_PREFIX, TELEMETRY_FILTER,
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
