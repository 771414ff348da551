//! The site's MQTT broker: every 3.1.1 device can connect (keepalive 0 included),
//! retained messages and QoS 2 work, the gateway's internal client ids cannot be taken,
//! garbage on the port stops nobody else, and MQTT 5 devices (Eclipse Paho, mosquitto's
//! clients) on `local.listen` get the properties their peers sent.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use support::raw::{connect_packet, publish_qos1_packet, RawClient};
use support::{
    paho5, paho_spawn, publish_all, publish_many, publish_retained, telemetry_burst, Collector,
    Deliveries, Expected, Gateway, GatewayConfig, LineProcess, LocalSubscriber, Mosquitto, QoS,
    CLOUD_PREFIX, COMMAND_PREFIX, TELEMETRY_FILTER,
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

/// `local.max_keep_alive`: an MQTT 5 device asking for a longer keep alive (or none) is
/// told the shorter one in CONNACK and held to it; an MQTT 3.1.1 device, which cannot be
/// told, is refused with a log line naming the key; one within the bound is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_keep_alive_is_imposed_on_mqtt5_and_refused_on_3_1_1() {
    use support::wire::{prop, Client, Connect, Packet, Recv};
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let gateway =
        Gateway::start(GatewayConfig::new(cloud.port).set_str("local", "max_keep_alive", "2s"));
    let port = gateway.local_port;

    for asked in [0, 600] {
        let id = format!("ka-v5-{asked}");
        let (mut device, _, props) =
            Client::connect_with(port, &Connect::new(5, &id).keep_alive(asked)).await;
        assert_eq!(
            props.int(prop::SERVER_KEEP_ALIVE),
            Some(2),
            "Server Keep Alive for an MQTT 5 device asking for {asked} s"
        );
        // Silent: closed after 1.5 times the server's keep alive, not the device's.
        let silent = Instant::now();
        loop {
            match device.recv(Duration::from_secs(8)).await {
                Recv::Closed => break,
                Recv::Packet(Packet::Disconnect { reason, .. }) => assert_eq!(reason, 0x8D),
                other => panic!("silent device with keep alive {asked}: {other:?}"),
            }
        }
        let after = silent.elapsed();
        assert!(
            after >= Duration::from_millis(2900) && after < Duration::from_secs(6),
            "closed after {after:?}; 1.5 x 2 s expected"
        );
    }
    let (_within, _, props) =
        Client::connect_with(port, &Connect::new(5, "ka-v5-1").keep_alive(1)).await;
    assert_eq!(props.int(prop::SERVER_KEEP_ALIVE), None, "within the bound");

    let (_v311, first) = Client::start(port, &Connect::new(4, "ka-v311").keep_alive(60)).await;
    match first {
        Recv::Packet(Packet::Connack { code, .. }) => assert_eq!(code, 0x02, "CONNACK code"),
        other => panic!("MQTT 3.1.1 device asking for 60 s: {other:?}"),
    }
    let (_v311, _, _) =
        Client::connect_with(port, &Connect::new(4, "ka-v311-ok").keep_alive(2)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.log().contains("local.max_keep_alive") {
        assert!(
            Instant::now() < deadline,
            "no log line names local.max_keep_alive:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway
        .wait_status(Duration::from_secs(10), "the refusal counted", |s| {
            support::counter(s, "connections_refused") >= 1
        })
        .await;
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

/// The MQTT 5 properties a publisher attaches that a broker passes on as they are.
const PASSED_ON: [&str; 5] = [
    "user_properties",
    "content_type",
    "payload_format_indicator",
    "response_topic",
    "correlation_data",
];

/// MQTT 5 devices on `local.listen`, played by Eclipse Paho (paho-mqtt 2.x): what a
/// publisher attaches to a message reaches the subscriber as it was sent (user properties
/// in order, a repeated name included), with the remaining expiry and the subscriber's own
/// subscription identifier; nothing is added to a message that has none; and a request
/// finds its way back to the requester by its response topic and correlation data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_paho_client_properties_pass_through() {
    let _serial = support::serial().await;
    let (_cloud, mut gateway) = gateway_with_cloud().await;
    let port = gateway.local_port;
    let wait = Duration::from_secs(10);

    let mut dashboard = paho_spawn(port, &["v5-sub", "dashboard-5", "lab/zone5/#", "7", "2"]);
    let subscribed = dashboard.event("subscribed", wait);
    assert_eq!(
        subscribed["reason_codes"],
        json!([1]),
        "SUBACK: {subscribed}\n{}",
        gateway.log()
    );
    let sent = json!({
        "user_properties": [["site", "plant-7"], ["unit", "°C"], ["site", "second"]],
        "content_type": "text/plain; charset=utf-8",
        "payload_format_indicator": 1,
        "response_topic": "lab/zone5/ack",
        "correlation_data": "reading-0042",
        "message_expiry_interval": 300,
    });
    for (topic, payload, properties) in [
        ("lab/zone5/temp", "21.5", sent.to_string()),
        ("lab/zone5/plain", "no properties", "{}".to_string()),
    ] {
        assert_eq!(
            paho5(port, &["v5-pub", "sensor-5", topic, payload, &properties]),
            [json!({"event": "published", "reason_code": 0})],
            "PUBACK:\n{}",
            gateway.log()
        );
    }
    let got = dashboard.event("message", wait);
    assert_eq!(
        (&got["topic"], &got["payload"], &got["qos"]),
        (&json!("lab/zone5/temp"), &json!("21.5"), &json!(1)),
        "{got}"
    );
    for key in PASSED_ON {
        assert_eq!(got[key], sent[key], "{key} changed on the way: {got}");
    }
    let expiry = got["message_expiry_interval"].as_u64();
    assert!(
        expiry.is_some_and(|left| (1..=300).contains(&left)),
        "the expiry interval left of 300 s: {got}"
    );
    assert_eq!(got["subscription_identifiers"], json!([7]), "{got}");
    let plain = dashboard.event("message", wait);
    let mut keys: Vec<&str> = plain
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "event",
            "payload",
            "qos",
            "retain",
            "subscription_identifiers",
            "topic"
        ],
        "properties appeared on a message sent without any: {plain}"
    );
    assert_eq!(plain["payload"], "no properties");

    // Request and response: the responder answers to the response topic it was given,
    // with the correlation data it was given.
    let mut responder = paho_spawn(port, &["v5-echo", "responder-5", "lab/zone5/request"]);
    responder.event("subscribed", wait);
    let exchange = paho5(
        port,
        &[
            "v5-request",
            "requester-5",
            "lab/zone5/request",
            "lab/zone5/reply/requester-5",
            "corr-42",
            "ping",
        ],
    );
    let request = responder.event("message", wait);
    assert_eq!(
        (&request["response_topic"], &request["correlation_data"]),
        (&json!("lab/zone5/reply/requester-5"), &json!("corr-42")),
        "{request}"
    );
    assert_eq!(
        responder.event("published", wait)["reason_code"],
        0,
        "{}",
        responder.output()
    );
    let reply = exchange
        .iter()
        .find(|line| line["event"] == "message")
        .unwrap_or_else(|| panic!("no reply: {exchange:?}"));
    assert_eq!(
        (
            &reply["topic"],
            &reply["payload"],
            &reply["correlation_data"]
        ),
        (
            &json!("lab/zone5/reply/requester-5"),
            &json!("ping"),
            &json!("corr-42")
        ),
        "{reply}"
    );
    assert!(gateway.is_running(), "{}", gateway.log());
}

/// mosquitto's own clients in MQTT 5 on `local.listen`, as a site admin tries the broker:
/// `mosquitto_pub -D publish ...` properties reach `mosquitto_sub -F` unchanged, and
/// `mosquitto_rr` gets its answer from an Eclipse Paho responder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_mosquitto_clients_on_local_listen() {
    let _serial = support::serial().await;
    let (_cloud, mut gateway) = gateway_with_cloud().await;
    let port = gateway.local_port.to_string();
    let wait = Duration::from_secs(10);
    // Run by stdbuf -oL: into a pipe, mosquitto_sub would hold its lines until it exits.
    let mqtt5 = |tool: &str, client_id: &str| {
        let mut command = Command::new("stdbuf");
        command.args(["-oL", tool]);
        command.args([
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            client_id,
        ]);
        command
    };

    // -d prints the SUBACK; -F prints a message: topic, payload, user properties (name:value,
    // space separated), content type, correlation data, response topic, payload format
    // indicator, expiry left, QoS.
    let mut sub = mqtt5("mosquitto_sub", "dashboard-m5");
    sub.args(["-q", "1", "-t", "lab/mosq/#", "-d", "-C", "1", "-W", "15"])
        .args(["-F", "%t|%p|%P|%C|%D|%R|%F|%E|%q"]);
    let mut dashboard = LineProcess::spawn("mosquitto_sub", sub);
    dashboard.expect(wait, |line| line == "Subscribed (mid: 1): 1");

    let mut publish = mqtt5("mosquitto_pub", "sensor-m5");
    publish.args(["-q", "1", "-t", "lab/mosq/temp", "-m", "21.5"]);
    for property in [
        &["user-property", "site", "plant-7"][..],
        &["user-property", "unit", "C"],
        &["content-type", "text/plain"],
        &["correlation-data", "corr-7"],
        &["response-topic", "lab/mosq/ack"],
        &["payload-format-indicator", "1"],
        &["message-expiry-interval", "300"],
    ] {
        publish.args(["-D", "publish"]).args(property);
    }
    let out = publish
        .output()
        .expect("running mosquitto_pub (apt-get install mosquitto-clients)");
    assert!(
        out.status.success(),
        "mosquitto_pub -V mqttv5: {}\n{}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    let line = dashboard.expect(wait, |line| line.starts_with("lab/mosq/temp|"));
    let fields: Vec<&str> = line.split('|').collect();
    assert_eq!(fields.len(), 9, "{line:?}\n{}", dashboard.output());
    assert_eq!(
        fields[..7],
        [
            "lab/mosq/temp",
            "21.5",
            "site:plant-7 unit:C",
            "text/plain",
            "corr-7",
            "lab/mosq/ack",
            "1"
        ],
        "{line:?}"
    );
    let expiry: u32 = fields[7].parse().unwrap_or(0);
    assert!(
        (1..=300).contains(&expiry),
        "expiry left of 300 s: {line:?}"
    );
    assert_eq!(fields[8], "1", "QoS: {line:?}");

    // mosquitto_rr asks, a Paho MQTT 5 device answers.
    let mut responder = paho_spawn(
        gateway.local_port,
        &["v5-echo", "responder-m5", "lab/mosq/request"],
    );
    responder.event("subscribed", wait);
    let mut rr = mqtt5("mosquitto_rr", "requester-m5");
    rr.args([
        "-q",
        "1",
        "-t",
        "lab/mosq/request",
        "-e",
        "lab/mosq/reply/requester-m5",
    ])
    .args([
        "-m",
        "ping",
        "-W",
        "10",
        "-D",
        "publish",
        "correlation-data",
        "rr-1",
    ])
    .args(["-F", "%t|%p|%D"]);
    let out = rr
        .output()
        .expect("running mosquitto_rr (apt-get install mosquitto-clients)");
    let request: Value = responder.event("message", wait);
    assert_eq!(
        (&request["response_topic"], &request["correlation_data"]),
        (&json!("lab/mosq/reply/requester-m5"), &json!("rr-1")),
        "{request}"
    );
    assert_eq!(
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (true, "lab/mosq/reply/requester-m5|ping|rr-1"),
        "mosquitto_rr: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    assert!(gateway.is_running(), "{}", gateway.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_dashboard_takes_the_100k_burst() {
    let _serial = support::serial().await;
    const DEVICES: usize = 4;
    const PER_DEVICE: usize = 25_000;
    const TOTAL: usize = DEVICES * PER_DEVICE;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("warehouse/#", QoS::AtLeastOnce)),
    )
    .await;

    let started = Instant::now();
    let port = gateway.local_port;
    let burst = tokio::spawn(async move {
        let expected = telemetry_burst(port, DEVICES, PER_DEVICE, Duration::ZERO).await;
        (expected, started.elapsed())
    });
    // Everything, or until the dashboard has heard nothing for 2 s.
    let deadline = started + Duration::from_secs(60);
    let mut seen = Vec::with_capacity(TOTAL);
    while seen.len() < TOTAL && Instant::now() < deadline {
        match dashboard.recv(Duration::from_secs(2)).await {
            Some(m) => seen.push(m),
            None => break,
        }
    }
    let on_dashboard = seen
        .last()
        .map_or(Duration::ZERO, |m| m.at.duration_since(started));
    let (expected, accepted) = burst.await.expect("the devices");
    let in_cloud = collector
        .wait_for_count(TOTAL, Duration::from_secs(60))
        .await;
    println!(
        "{TOTAL} QoS 1 messages from {DEVICES} devices, accepted in {accepted:?}: {} on the \
         dashboard (the last after {on_dashboard:?}), {} in the cloud after {:?}",
        seen.len(),
        collector.distinct(),
        started.elapsed()
    );

    let dashboard_expected: Expected = expected
        .iter()
        .map(|(topic, payloads)| {
            let local = topic.strip_prefix(CLOUD_PREFIX).expect("a cloud topic");
            (local.to_string(), payloads.clone())
        })
        .collect();
    if seen.len() < TOTAL {
        let status = gateway.status().expect("status.json");
        panic!(
            "the dashboard got {} of {TOTAL} ({} missing; the cloud got {}); the gateway \
             counts queued_dropped = {} (local.max_queued_messages: default)",
            seen.len(),
            TOTAL - seen.len(),
            collector.distinct(),
            support::counter(&status, "queued_dropped"),
        );
    }
    let deliveries = Deliveries::of(&seen);
    deliveries.assert_exactly(&dashboard_expected);
    assert_eq!(deliveries.duplicates, 0, "duplicates on one connection");
    assert!(
        in_cloud,
        "only {} of {TOTAL} reached the cloud",
        collector.distinct()
    );
    collector.deliveries().assert_exactly(&expected);
}
