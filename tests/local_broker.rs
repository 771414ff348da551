//! The site's MQTT broker: every 3.1.1 device can connect (keepalive 0 included),
//! retained messages and QoS 2 work, the gateway's internal client ids cannot be taken,
//! and garbage on the port stops nobody else.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use support::raw::{connect_packet, publish_qos1_packet, RawClient};
use support::{
    publish_all, publish_many, publish_retained, Collector, Gateway, GatewayConfig,
    LocalSubscriber, Mosquitto, QoS, COMMAND_PREFIX, TELEMETRY_FILTER,
};

async fn gateway_with_cloud() -> (Mosquitto, Gateway) {
    let cloud = Mosquitto::start();
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    (cloud, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_keepalive_0_connects_and_publishes() {
    let _serial = support::serial().await;
    let (_cloud, gateway) = gateway_with_cloud().await;
    let topic = "warehouse/zone3/tiny-sensor";
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some((topic, QoS::AtLeastOnce)),
    )
    .await;

    let mut sensor = RawClient::connect(gateway.local_port).await;
    sensor.send(&connect_packet("tiny-sensor", 0)).await;
    let connack = sensor.read_packet(Duration::from_secs(5)).await;
    assert_eq!(
        connack.as_deref(),
        Some(&[0x20, 0x02, 0x00, 0x00][..]),
        "CONNACK"
    );
    sensor.send(&publish_qos1_packet(topic, 1, b"21.5")).await;
    let puback = sensor.read_packet(Duration::from_secs(5)).await;
    assert_eq!(
        puback.as_deref(),
        Some(&[0x40, 0x02, 0x00, 0x01][..]),
        "PUBACK"
    );
    let reading = dashboard
        .recv(Duration::from_secs(5))
        .await
        .expect("reading");
    assert_eq!(
        (reading.topic.as_str(), reading.payload.as_str()),
        (topic, "21.5")
    );

    // Silent for a while: with keepalive 0 nobody may time the device out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sensor.send(&publish_qos1_packet(topic, 2, b"21.6")).await;
    let puback = sensor.read_packet(Duration::from_secs(5)).await;
    assert_eq!(
        puback.as_deref(),
        Some(&[0x40, 0x02, 0x00, 0x02][..]),
        "second PUBACK"
    );
    let reading = dashboard
        .recv(Duration::from_secs(5))
        .await
        .expect("reading");
    assert_eq!(reading.payload, "21.6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_gets_the_retained_message() {
    let _serial = support::serial().await;
    let (_cloud, gateway) = gateway_with_cloud().await;

    publish_retained(
        gateway.local_port,
        "door-sensor",
        QoS::AtLeastOnce,
        "warehouse/zone1/door",
        "open",
    )
    .await;
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "late-dashboard",
        true,
        Some(("warehouse/zone1/#", QoS::AtLeastOnce)),
    )
    .await;

    let door = dashboard
        .recv(Duration::from_secs(5))
        .await
        .expect("no retained message");
    assert_eq!(door.topic, "warehouse/zone1/door");
    assert_eq!(door.payload, "open");
    assert!(door.retain, "delivered without the retain flag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_works_between_local_clients() {
    let _serial = support::serial().await;
    let (_cloud, gateway) = gateway_with_cloud().await;
    let mut subscriber = LocalSubscriber::connect(
        gateway.local_port,
        "qos2-subscriber",
        true,
        Some(("lab/qos2/#", QoS::ExactlyOnce)),
    )
    .await;

    let sent = publish_many(
        gateway.local_port,
        "qos2-publisher",
        "lab/qos2/flow",
        10,
        QoS::ExactlyOnce,
    )
    .await;

    let received = subscriber.recv_n(10, Duration::from_secs(10)).await;
    let payloads: Vec<&str> = received.iter().map(|m| m.payload.as_str()).collect();
    assert_eq!(payloads, sent);
    assert!(received.iter().all(|m| m.qos == QoS::ExactlyOnce));
    assert!(
        subscriber.recv(Duration::from_millis(500)).await.is_none(),
        "a QoS 2 message was delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_internal_client_ids_are_refused() {
    let _serial = support::serial().await;
    let (cloud, gateway) = gateway_with_cloud().await;
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    for client_id in [
        "bridgehead-internal-",
        "bridgehead-internal-intake",
        "bridgehead-internal-downlink",
        "bridgehead-internal-health",
    ] {
        let mut impostor = RawClient::connect(gateway.local_port).await;
        impostor.send(&connect_packet(client_id, 30)).await;
        match impostor.read_packet(Duration::from_secs(5)).await {
            None => {}
            Some(p) if p.len() == 4 && p[0] == 0x20 && p[3] != 0 => {}
            Some(p) => panic!("{client_id} was let in: {p:02x?}"),
        }
    }

    // The gateway's own links still work: telemetry goes up, commands come down.
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan",
        true,
        Some(("warehouse/zone1/fan/command", QoS::AtLeastOnce)),
    )
    .await;
    publish_many(
        gateway.local_port,
        "sensor",
        "warehouse/zone1/temp",
        5,
        QoS::AtLeastOnce,
    )
    .await;
    assert!(collector.wait_for_count(5, Duration::from_secs(10)).await);
    let command = vec![(
        format!("{COMMAND_PREFIX}warehouse/zone1/fan/command"),
        b"ON".to_vec(),
    )];
    publish_all(cloud.port, "operator", QoS::AtLeastOnce, command).await;
    assert!(
        fan.recv(Duration::from_secs(5)).await.is_some(),
        "no command"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_does_not_stop_other_clients() {
    let _serial = support::serial().await;
    let (_cloud, mut gateway) = gateway_with_cloud().await;
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("warehouse/#", QoS::AtLeastOnce)),
    )
    .await;

    let mut noise = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            noise as u8
        })
        .collect();
    let mut vandals = Vec::new();
    for junk in [
        &garbage[..],
        b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
        &[0x10, 0xff, 0xff, 0xff, 0x7f],
    ] {
        let mut vandal = RawClient::connect(gateway.local_port).await;
        let _ = vandal.stream.write_all(junk).await;
        vandals.push(vandal);
    }

    publish_many(
        gateway.local_port,
        "sensor",
        "warehouse/zone2/temp",
        3,
        QoS::AtLeastOnce,
    )
    .await;
    let readings = dashboard.recv_n(3, Duration::from_secs(5)).await;
    assert_eq!(readings.len(), 3, "the dashboard stopped getting readings");
    assert!(gateway.is_running(), "the gateway died:\n{}", gateway.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_a_wildcard_topic_is_not_forwarded_and_blocks_nothing() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    // Client libraries refuse such a topic; a broken device firmware does not. MQTT
    // forbids it ([MQTT-3.3.2-2]): the broker closes that connection, acknowledging
    // nothing.
    let mut device = RawClient::connect(gateway.local_port).await;
    device.send(&connect_packet("broken-firmware", 30)).await;
    assert!(
        device.read_packet(Duration::from_secs(5)).await.is_some(),
        "CONNACK"
    );
    device
        .send(&publish_qos1_packet("warehouse/zone1/te+mp", 1, b"25.5"))
        .await;
    assert!(
        device.closed_within(Duration::from_secs(5)).await,
        "the connection of the device publishing on a wildcard topic stays open"
    );
    let after = publish_many(
        gateway.local_port,
        "good-sensor",
        "warehouse/zone1/temp",
        3,
        QoS::AtLeastOnce,
    )
    .await;

    assert!(
        collector.wait_for_count(3, Duration::from_secs(20)).await,
        "the good readings did not arrive"
    );
    let status = gateway
        .wait_status(Duration::from_secs(5), "the bad packet counted", |s| {
            support::counter(s, "malformed_packets") == 1
        })
        .await;
    assert_eq!(support::counter(&status, "forwarded"), 3);
    let topics: Vec<String> = collector.messages().into_iter().map(|m| m.topic).collect();
    assert!(
        topics
            .iter()
            .all(|t| t == "fleet/gw-test/warehouse/zone1/temp"),
        "{topics:?}"
    );
    let payloads: Vec<String> = collector
        .messages()
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(payloads, after);
}
