//! Telemetry goes up through the outbox and nothing the gateway accepted is lost: not in
//! a burst, not across a link cut, a cloud restart or a `kill -9` of the gateway.

mod support;

use std::time::{Duration, Instant};

use support::{
    retained, telemetry_burst, Collector, Gateway, GatewayConfig, Mosquitto, Proxy, STATUS_TOPIC,
    TELEMETRY_FILTER,
};

const MAX_INFLIGHT: usize = 100;
/// mosquitto's `max_inflight_messages` toward the collector (see support/mosquitto.rs).
const MOSQUITTO_INFLIGHT: usize = 100;

fn config(cloud_port: u16) -> GatewayConfig {
    GatewayConfig::new(cloud_port).set("cloud", "max_inflight", &MAX_INFLIGHT.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_20k_messages_from_four_devices_reaches_the_cloud_in_order() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(config(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let started = Instant::now();
    let expected = telemetry_burst(gateway.local_port, 4, 5_000, Duration::ZERO).await;
    let accepted = started.elapsed();
    let arrived = collector
        .wait_for_count(20_000, Duration::from_secs(60))
        .await;
    let elapsed = started.elapsed();

    assert!(
        arrived,
        "only {} of 20000 reached the cloud",
        collector.distinct()
    );
    println!(
        "20000 QoS 1 messages from 4 devices: accepted locally in {accepted:?}, all in the cloud \
         after {elapsed:?} ({:.0} msg/s end to end)",
        20_000.0 / elapsed.as_secs_f64()
    );
    let deliveries = collector.deliveries();
    deliveries.assert_exactly(&expected);
    println!("duplicates: {}", deliveries.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_of_three_seconds_mid_stream_loses_nothing() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let devices = tokio::spawn(telemetry_burst(
        gateway.local_port,
        4,
        2_000,
        Duration::from_millis(2),
    ));
    assert!(collector.wait_for_count(500, Duration::from_secs(20)).await);
    link.cut();
    gateway
        .wait_status(Duration::from_secs(5), "telemetry link down", |s| {
            s["cloud"]["telemetry"] != "up"
        })
        .await;
    // What was already in the cloud broker drains to the collector first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during_cut = collector.distinct();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        collector.distinct(),
        during_cut,
        "messages reached the cloud through a cut link"
    );
    link.restore();

    let expected = devices.await.expect("devices");
    assert!(
        collector
            .wait_for_count(8_000, Duration::from_secs(30))
            .await,
        "only {} of 8000 reached the cloud after the link came back",
        collector.distinct()
    );
    assert_nothing_lost_and_duplicates_bounded(&collector, &expected, &link, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_broker_restart_mid_stream_loses_nothing() {
    let _serial = support::serial().await;
    let mut cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    // Never cut: it only counts the gateway's connections.
    let link = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let devices = tokio::spawn(telemetry_burst(
        gateway.local_port,
        4,
        2_000,
        Duration::from_millis(2),
    ));
    assert!(collector.wait_for_count(500, Duration::from_secs(20)).await);
    cloud.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.restart();

    let expected = devices.await.expect("devices");
    assert!(
        collector
            .wait_for_count(8_000, Duration::from_secs(30))
            .await,
        "only {} of 8000 reached the cloud after its restart",
        collector.distinct()
    );
    // mosquitto may also redeliver its own in-flight window to the collector.
    assert_nothing_lost_and_duplicates_bounded(&collector, &expected, &link, MOSQUITTO_INFLIGHT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_accepted_while_offline_survive_a_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let mut gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    link.cut();
    // Not a multiple of queue.commit_batch (1000): the last group waits for the timer.
    let expected = telemetry_burst(gateway.local_port, 2, 2_450, Duration::ZERO).await;
    // Every message was PUBACKed by the local broker; give the outbox well over one group
    // commit (20 ms), then pull the plug.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill9();
    gateway.start_again();
    link.restore();

    assert!(
        collector
            .wait_for_count(4_900, Duration::from_secs(30))
            .await,
        "only {} of the 4900 accepted messages reached the cloud after kill -9",
        collector.distinct()
    );
    collector.deliveries().assert_exactly(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_topic_says_online_then_offline_after_sigterm() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(config(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    assert_eq!(
        retained(cloud.port, STATUS_TOPIC, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("online")
    );

    let (status, took) = gateway.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    assert_eq!(
        retained(cloud.port, STATUS_TOPIC, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("offline")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_topic_says_offline_after_a_crash() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(config(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    assert_eq!(
        retained(cloud.port, STATUS_TOPIC, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("online")
    );

    gateway.kill9();
    // The last will: mosquitto publishes it once it sees the socket close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while last.as_deref() != Some("offline") && Instant::now() < deadline {
        last = retained(cloud.port, STATUS_TOPIC, Duration::from_secs(1)).await;
    }
    assert_eq!(
        last.as_deref(),
        Some("offline"),
        "retained status after kill -9"
    );
}

fn assert_nothing_lost_and_duplicates_bounded(
    collector: &Collector,
    expected: &support::Expected,
    link: &Proxy,
    collector_redeliveries: usize,
) {
    let deliveries = collector.deliveries();
    deliveries.assert_exactly(expected);
    // Two connections (telemetry, commands) per connect: every connection after the
    // first two is at most one reconnect of the telemetry link.
    let reconnects = link.connections().saturating_sub(2).max(1);
    println!(
        "duplicates: {} over {reconnects} reconnect(s) ({} connections)",
        deliveries.duplicates,
        link.connections()
    );
    let bound = MAX_INFLIGHT * reconnects + collector_redeliveries;
    assert!(
        deliveries.duplicates <= bound,
        "{} duplicates, more than cloud.max_inflight ({MAX_INFLIGHT}) per reconnect \
         ({reconnects}) plus {collector_redeliveries} redelivered by the broker itself",
        deliveries.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_downlink_rules_forwards_and_keeps_running() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let mut gateway = Gateway::start(config(cloud.port).without_downlink());
    gateway
        .wait_status(Duration::from_secs(20), "telemetry up, commands off", |s| {
            s["cloud"]["telemetry"] == "up" && s["cloud"]["commands"] == "off"
        })
        .await;

    let expected = telemetry_burst(gateway.local_port, 1, 100, Duration::ZERO).await;
    assert!(collector.wait_for_count(100, Duration::from_secs(20)).await);
    collector.deliveries().assert_exactly(&expected);
    assert!(
        gateway.is_running(),
        "the gateway stopped:\n{}",
        gateway.log()
    );
    let (status, _) = gateway.terminate();
    assert!(status.success(), "exit status {status}");
}
