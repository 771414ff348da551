//! Commands come down from the cloud at QoS 1 and reach the site's actuators: online,
//! offline with a persistent session, sent while the link was down, and during a
//! telemetry burst without waiting behind it.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{
    counter, publish_all, publish_paced, telemetry_burst, Collector, Gateway, GatewayConfig,
    LocalSubscriber, Mosquitto, Proxy, QoS, COMMAND_PREFIX,
};

const FAN: &str = "warehouse/zone1/fan/command";

fn cloud_topic(local: &str) -> String {
    format!("{COMMAND_PREFIX}{local}")
}

/// The operator sends `payloads` to the fan from the cloud, QoS 1.
async fn send_commands(cloud_port: u16, payloads: &[&str]) {
    let messages = payloads
        .iter()
        .map(|p| (cloud_topic(FAN), p.as_bytes().to_vec()))
        .collect();
    publish_all(cloud_port, "operator", QoS::AtLeastOnce, messages).await;
}

fn payloads(received: &[support::Received]) -> Vec<&str> {
    received.iter().map(|m| m.payload.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_actuator_gets_a_cloud_command() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        true,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;

    send_commands(cloud.port, &["ON"]).await;

    let command = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("the fan got no command within 5 s");
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        (FAN, "ON")
    );
    assert_eq!(command.qos, QoS::AtLeastOnce);
    gateway
        .wait_status(Duration::from_secs(5), "counting the command", |s| {
            counter(s, "commands_received") == 1 && counter(s, "commands_delivered") == 1
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_actuator_gets_its_commands_when_it_comes_back() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        false,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;
    fan.disconnect().await;

    send_commands(cloud.port, &["ON", "OFF", "ON"]).await;
    gateway
        .wait_status(Duration::from_secs(10), "handing 3 commands over", |s| {
            counter(s, "commands_delivered") == 3
        })
        .await;

    let mut fan = LocalSubscriber::connect(gateway.local_port, "fan-actuator", false, None).await;
    assert!(
        fan.session_present,
        "the local broker forgot the fan's session"
    );
    let commands = fan.recv_n(3, Duration::from_secs(10)).await;
    assert_eq!(payloads(&commands), ["ON", "OFF", "ON"]);
    assert!(fan.recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_the_link_was_down_arrive_when_it_is_back() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let link = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(GatewayConfig::new(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        true,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;

    link.cut();
    gateway
        .wait_status(Duration::from_secs(5), "command link down", |s| {
            s["cloud"]["commands"] != "up"
        })
        .await;
    let sent = ["cmd-0", "cmd-1", "cmd-2", "cmd-3", "cmd-4"];
    send_commands(cloud.port, &sent).await;
    assert!(
        fan.recv(Duration::from_millis(500)).await.is_none(),
        "a command arrived through a cut link"
    );
    link.restore();

    let commands = fan.recv_n(sent.len(), Duration::from_secs(15)).await;
    assert_eq!(payloads(&commands), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_burst_during_a_telemetry_burst_is_delivered_promptly() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, "fleet/gw-test/warehouse/load/#").await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        true,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;

    let telemetry = tokio::spawn(telemetry_burst(
        gateway.local_port,
        4,
        5_000,
        Duration::ZERO,
    ));
    let commands: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (cloud_topic(FAN), format!("cmd-{i:03}").into_bytes()))
        .collect();
    let operator = tokio::spawn(publish_paced(
        cloud.port,
        "operator",
        QoS::AtLeastOnce,
        commands,
        Duration::from_millis(2),
    ));
    let received = fan.recv_n(200, Duration::from_secs(30)).await;
    let sent_at = operator.await.expect("operator");
    let telemetry_busy = collector.distinct();

    assert_eq!(
        received.len(),
        200,
        "only {} of 200 commands arrived",
        received.len()
    );
    let by_payload: HashMap<String, usize> = (0..200).map(|i| (format!("cmd-{i:03}"), i)).collect();
    let mut latencies: Vec<Duration> = received
        .iter()
        .map(|m| m.at.duration_since(sent_at[by_payload[&m.payload]]))
        .collect();
    latencies.sort();
    let (p50, p99) = (latencies[99], latencies[197]);
    println!(
        "command latency during a 20k telemetry burst (cloud publish -> actuator): p50 {p50:?}, \
         p99 {p99:?}, max {:?}; {telemetry_busy} telemetry messages in the cloud when the \
         last command arrived",
        latencies[199]
    );
    assert!(p99 < Duration::from_secs(1), "p99 command latency {p99:?}");

    let expected = telemetry.await.expect("devices");
    assert!(
        collector
            .wait_for_count(20_000, Duration::from_secs(60))
            .await,
        "only {} of 20000 telemetry messages reached the cloud",
        collector.distinct()
    );
    collector.deliveries().assert_exactly(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_after_a_crash_is_not_published_twice() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let link = Proxy::start(cloud.port).await;
    let mut gateway = Gateway::start(GatewayConfig::new(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        true,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;

    // The gateway's PUBACK never reaches the cloud, which will redeliver the command.
    link.mute();
    send_commands(cloud.port, &["ON"]).await;
    let command = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("the fan got no command");
    assert_eq!(command.payload, "ON");
    gateway
        .wait_status(Duration::from_secs(5), "handing the command over", |s| {
            counter(s, "commands_delivered") == 1
        })
        .await;
    // Its record is written and its (lost) PUBACK sent well within this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill9();
    drop(fan);

    link.cut();
    link.unmute();
    gateway.start_again();
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        true,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;
    link.restore();
    gateway
        .wait_status(Duration::from_secs(15), "recognising the redelivery", |s| {
            counter(s, "commands_duplicate") == 1
        })
        .await;
    assert!(
        fan.recv(Duration::from_secs(1)).await.is_none(),
        "the redelivered command was published again"
    );
    let status = gateway.status().expect("status.json");
    assert_eq!(counter(&status, "commands_delivered"), 0, "{status}");
}
