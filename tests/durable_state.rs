//! A restart forgets nothing: retained messages, persistent sessions and the commands (and
//! rules' decisions) waiting for offline actuators survive SIGTERM, kill -9 and MQTT 5
//! sessions, and none of it costs a disk write for plain telemetry.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{
    delayed_will, free_port, paho, publish_all, publish_by_alias, publish_paced, publish_retained,
    retained, Collector, Device5, Gateway, GatewayConfig, LocalSubscriber, Mosquitto, QoS, QoS5,
    Received, COMMAND_PREFIX, TELEMETRY_FILTER,
};

const FAN: &str = "warehouse/zone1/fan/command";
const FAN_STATE: &str = "warehouse/zone1/fan/state";

/// The operator sends `payload` to the fan from the cloud, QoS 1.
async fn send_command(cloud_port: u16, payload: &str) {
    let message = vec![(
        format!("{COMMAND_PREFIX}{FAN}"),
        payload.as_bytes().to_vec(),
    )];
    publish_all(cloud_port, "operator", QoS::AtLeastOnce, message).await;
}

/// Rows of `state.db` matching `sql` (a `SELECT count(*) ...`), read beside the gateway.
fn stored(data_dir: &Path, sql: &str) -> i64 {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        data_dir.join("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return -1;
    };
    db.query_row(sql, [], |r| r.get(0)).unwrap_or(-1)
}

/// Waits until `state.db` holds what `sql` counts (`n` rows): the durability window passed.
async fn wait_stored(gateway: &Gateway, sql: &str, n: i64) {
    let data_dir = gateway.data_dir.clone();
    assert!(
        support::wait_until(Duration::from_secs(10), || stored(&data_dir, sql) == n).await,
        "state.db does not hold {n} rows for {sql:?} within 10 s (has {}):\n{}",
        stored(&data_dir, sql),
        gateway.log()
    );
}

/// Waits until the gateway's MQTT 5 port accepts connections.
async fn v5_listens(port: u16) {
    assert!(
        support::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await,
        "the MQTT 5 port 127.0.0.1:{port} does not listen within 10 s"
    );
}

const QUEUED_FOR_FAN: &str = "SELECT count(*) FROM queued WHERE client_id = 'fan-actuator'";

/// The fan actuator: a persistent session subscribed to its command topic, then offline.
async fn fan_subscribes_and_leaves(gateway: &Gateway) {
    let fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan-actuator",
        false,
        Some((FAN, QoS::AtLeastOnce)),
    )
    .await;
    fan.disconnect().await;
    wait_stored(
        gateway,
        "SELECT count(*) FROM subscriptions WHERE client_id = 'fan-actuator'",
        1,
    )
    .await;
}

/// The fan comes back without subscribing: its session must be there.
async fn fan_returns(gateway: &Gateway) -> LocalSubscriber {
    LocalSubscriber::connect(gateway.local_port, "fan-actuator", false, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_state_survives_sigterm_and_kill_9_and_its_clearing_too() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let port = gateway.local_port;
    publish_retained(port, "fan-1", QoS::AtLeastOnce, FAN_STATE, "ON").await;
    assert_eq!(
        retained(port, FAN_STATE, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("ON")
    );

    let (status, _) = gateway.terminate();
    assert!(status.success(), "{status}:\n{}", gateway.log());
    gateway.start_again();
    assert_eq!(
        retained(gateway.local_port, FAN_STATE, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("ON"),
        "the retained state is gone after SIGTERM and a restart:\n{}",
        gateway.log()
    );

    publish_retained(port, "fan-1", QoS::AtLeastOnce, FAN_STATE, "OFF").await;
    wait_stored(
        &gateway,
        "SELECT count(*) FROM retained WHERE payload = CAST('OFF' AS BLOB)",
        1,
    )
    .await;
    gateway.kill9();
    gateway.start_again();
    assert_eq!(
        retained(port, FAN_STATE, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("OFF"),
        "the retained state is not the latest after kill -9:\n{}",
        gateway.log()
    );
    let status = gateway
        .wait_status(Duration::from_secs(5), "the retained count", |s| {
            s["local"]["retained"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    assert!(status["local"]["retained_bytes"].as_u64().unwrap_or(0) >= FAN_STATE.len() as u64);

    // An empty retained payload clears it, for good.
    publish_retained(port, "fan-1", QoS::AtLeastOnce, FAN_STATE, "").await;
    wait_stored(&gateway, "SELECT count(*) FROM retained", 0).await;
    gateway.kill9();
    gateway.start_again();
    assert_eq!(
        retained(port, FAN_STATE, Duration::from_secs(2)).await,
        None,
        "a cleared retained message came back after kill -9"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_actuator_gets_a_command_sent_after_a_restart() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    fan_subscribes_and_leaves(&gateway).await;

    let (status, _) = gateway.terminate();
    assert!(status.success());
    gateway.start_again();
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    send_command(cloud.port, "ON").await;

    let mut fan = fan_returns(&gateway).await;
    assert!(
        fan.session_present,
        "the fan's session is gone after a restart"
    );
    let command = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("the fan got no command after the restart");
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        (FAN, "ON")
    );
    assert_eq!(command.qos, QoS::AtLeastOnce);
    assert!(fan.recv(Duration::from_millis(500)).await.is_none());
    let status = gateway.status().expect("status.json");
    assert!(
        status["local"]["sessions"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_before_kill_9_is_delivered_once_after_the_restart() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    fan_subscribes_and_leaves(&gateway).await;
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    send_command(cloud.port, "ON").await;
    wait_stored(&gateway, QUEUED_FOR_FAN, 1).await;

    gateway.kill9();
    gateway.start_again();
    let mut fan = fan_returns(&gateway).await;
    assert!(fan.session_present);
    let command = fan
        .recv(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the fan got no command after kill -9:\n{}", gateway.log()));
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        (FAN, "ON")
    );
    assert!(
        fan.recv(Duration::from_secs(1)).await.is_none(),
        "the command came twice"
    );
    fan.disconnect().await;
    wait_stored(&gateway, QUEUED_FOR_FAN, 0).await;

    // Acknowledged: never again, neither on a reconnect nor after another restart.
    let mut fan = fan_returns(&gateway).await;
    assert!(fan.recv(Duration::from_secs(1)).await.is_none());
    fan.disconnect().await;
    gateway.kill9();
    gateway.start_again();
    let mut fan = fan_returns(&gateway).await;
    assert!(fan.session_present);
    assert!(
        fan.recv(Duration::from_secs(1)).await.is_none(),
        "an acknowledged command was replayed after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_decision_for_an_offline_fan_survives_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port).append(
        r#"
[[rule]]
name = "zone fans"
topic = "warehouse/+/temp"
publish = "warehouse/{1}/fan/command"
above = 30.0
clear_below = 28.0
on = "ON"
off = "OFF"
"#,
    ));
    fan_subscribes_and_leaves(&gateway).await;
    // The zone heats up while the fan is away: the rule switches it on, queued for it.
    let reading = vec![("warehouse/zone1/temp".to_owned(), b"31.5".to_vec())];
    publish_all(gateway.local_port, "sensor-1", QoS::AtLeastOnce, reading).await;
    wait_stored(&gateway, QUEUED_FOR_FAN, 1).await;

    gateway.kill9();
    gateway.start_again();
    let mut fan = fan_returns(&gateway).await;
    assert!(fan.session_present);
    let command = fan.recv(Duration::from_secs(5)).await.unwrap_or_else(|| {
        panic!(
            "the fan never got the rule's ON after kill -9:\n{}",
            gateway.log()
        )
    });
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        (FAN, "ON")
    );
    assert!(
        fan.recv(Duration::from_secs(1)).await.is_none(),
        "the rule's decision came twice"
    );
}

/// The Eclipse Paho 3.1.1 client, as devices on the plant floor run it: a retained state,
/// a retained will and a persistent session with a message queued for it, across kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_devices_keep_retained_will_and_session_across_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let port = gateway.local_port;
    const DOOR: &str = "warehouse/zone1/door/state";
    paho(port, &["retain-set", FAN_STATE, "ON"]);
    paho(port, &["will-arm", "door-sensor", DOOR, "offline"]);
    paho(port, &["sub-leave", "fan-paho", FAN]);
    // Before the restart, as a broker must.
    assert_eq!(
        paho(port, &["retain-get", DOOR]),
        [format!(
            "message topic={DOOR} payload=offline qos=1 retain=1 dup=0"
        )],
        "the will did not become the retained state:\n{}",
        gateway.log()
    );
    paho(port, &["publish", FAN, "ON"]);
    wait_stored(&gateway, "SELECT count(*) FROM retained", 2).await;
    wait_stored(
        &gateway,
        "SELECT count(*) FROM queued WHERE client_id = 'fan-paho'",
        1,
    )
    .await;

    gateway.kill9();
    gateway.start_again();
    assert_eq!(
        paho(port, &["retain-get", FAN_STATE]),
        [format!(
            "message topic={FAN_STATE} payload=ON qos=1 retain=1 dup=0"
        )],
        "the retained state is gone after kill -9:\n{}",
        gateway.log()
    );
    assert_eq!(
        paho(port, &["retain-get", DOOR]),
        [format!(
            "message topic={DOOR} payload=offline qos=1 retain=1 dup=0"
        )]
    );
    let resumed = paho(port, &["resume", "fan-paho", "1.5"]);
    assert_eq!(
        resumed.first().map(String::as_str),
        Some("session_present=1"),
        "{resumed:?}:\n{}",
        gateway.log()
    );
    let fan: Vec<_> = resumed[1..]
        .iter()
        .filter(|l| l.starts_with(&format!("message topic={FAN} payload=ON qos=1")))
        .collect();
    assert_eq!(
        (fan.len(), resumed.len()),
        (1, 2),
        "the queued command once and nothing else: {resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_session_after_a_restart_starts_afresh() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    fan_subscribes_and_leaves(&gateway).await;
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    send_command(cloud.port, "ON").await;
    wait_stored(&gateway, QUEUED_FOR_FAN, 1).await;
    let (status, _) = gateway.terminate();
    assert!(status.success());
    gateway.start_again();

    let mut fan = LocalSubscriber::connect(gateway.local_port, "fan-actuator", true, None).await;
    assert!(!fan.session_present);
    assert!(fan.recv(Duration::from_secs(1)).await.is_none());
    fan.disconnect().await;
    wait_stored(&gateway, "SELECT count(*) FROM sessions", 0).await;
    let mut fan = fan_returns(&gateway).await;
    assert!(!fan.session_present, "a clean start left the old session");
    assert!(fan.recv(Duration::from_secs(1)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_session_gets_what_came_while_it_was_away_before_and_after_a_restart() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let v5_port = free_port();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port).set_str(
        "local",
        "listen_v5",
        &format!("127.0.0.1:{v5_port}"),
    ));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    v5_listens(v5_port).await;
    // Retained at QoS 0: a QoS 1 subscriber gets it at QoS 0.
    publish_retained(
        gateway.local_port,
        "fan-1",
        QoS::AtMostOnce,
        FAN_STATE,
        "idle",
    )
    .await;

    let mut fan = Device5::connect(v5_port, "fan-v5", true, 3600).await;
    assert!(!fan.session_present);
    fan.subscribe(FAN, QoS5::AtLeastOnce).await;
    fan.subscribe(FAN_STATE, QoS5::AtLeastOnce).await;
    let state = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("retained state");
    assert_eq!(
        (state.payload.as_str(), state.qos, state.retain),
        ("idle", QoS5::AtMostOnce, true)
    );
    fan.disconnect().await;

    send_command(cloud.port, "ON").await;
    let mut fan = Device5::connect(v5_port, "fan-v5", false, 3600).await;
    assert!(fan.session_present, "the MQTT 5 session is gone");
    let command = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("the command sent while away");
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        (FAN, "ON")
    );
    fan.disconnect().await;

    send_command(cloud.port, "OFF").await;
    wait_stored(
        &gateway,
        "SELECT count(*) FROM queued WHERE client_id = 'fan-v5'",
        1,
    )
    .await;
    let (status, _) = gateway.terminate();
    assert!(status.success());
    gateway.start_again();
    // The gateway is ready once its first port listens; the MQTT 5 port follows.
    v5_listens(v5_port).await;
    let mut fan = Device5::connect(v5_port, "fan-v5", false, 3600).await;
    assert!(
        fan.session_present,
        "the MQTT 5 session is gone after a restart"
    );
    let command = fan
        .recv(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no command after the restart:\n{}", gateway.log()));
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        (FAN, "OFF")
    );
    assert!(fan.recv(Duration::from_secs(1)).await.is_none());
    fan.disconnect().await;

    // Topic aliases from a device: the broker keeps the topic they stand for.
    publish_by_alias(v5_port, "fan-v5-state", FAN_STATE, &["starting", "running"]).await;
    assert_eq!(
        retained(gateway.local_port, FAN_STATE, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("running")
    );

    // A clean start with an expiry interval is a new session, without the old one's
    // subscriptions.
    let fan = Device5::connect(v5_port, "fan-v5", true, 3600).await;
    assert!(!fan.session_present);
    fan.disconnect().await;
    send_command(cloud.port, "ON").await;
    let mut fan = Device5::connect(v5_port, "fan-v5", false, 3600).await;
    assert!(fan.session_present);
    assert!(fan.recv(Duration::from_secs(1)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_telemetry_adds_no_disk_writes() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(
        GatewayConfig::new(cloud.port)
            .set_str("queue", "commit_interval", "1s")
            .set_str("gateway", "metrics_interval", "10s"),
    );
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    // The state is in use: a retained message and an offline persistent session.
    publish_retained(
        gateway.local_port,
        "fan-1",
        QoS::AtLeastOnce,
        FAN_STATE,
        "ON",
    )
    .await;
    fan_subscribes_and_leaves(&gateway).await;
    wait_stored(&gateway, "SELECT count(*) FROM retained", 1).await;
    let state_files = || {
        ["state.db", "state.db-wal"].map(|name| {
            std::fs::metadata(gateway.data_dir.join(name))
                .and_then(|m| m.modified())
                .ok()
        })
    };
    let before_files = state_files();
    let before = gateway.write_bytes();

    let messages = (0..500)
        .map(|i| {
            (
                "warehouse/zone1/temp".to_owned(),
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    publish_paced(
        gateway.local_port,
        "sensor",
        QoS::AtLeastOnce,
        messages,
        Duration::from_millis(10),
    )
    .await;
    assert!(collector.wait_for_count(500, Duration::from_secs(20)).await);
    let written = gateway.write_bytes() - before;
    println!(
        "100 msg/s for 5 s with a retained message and a stored session: {written} bytes written"
    );
    assert_eq!(
        state_files(),
        before_files,
        "state.db was written for telemetry"
    );
    assert!(
        written <= 500 * 50,
        "{written} bytes written for 500 messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_that_became_the_retained_state_survives_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let status_topic = "warehouse/zone1/fan/status";
    let mut options = rumqttc::MqttOptions::new("fan-1", "127.0.0.1", gateway.local_port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_last_will(rumqttc::LastWill::new(
        status_topic,
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(status_topic, QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("publishing the online status: {other:?}"),
        }
    }
    assert_eq!(
        retained(gateway.local_port, status_topic, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("online")
    );
    // The fan loses power: its connection ends without DISCONNECT, and the broker
    // publishes its will.
    drop(eventloop);
    drop(client);
    let port = gateway.local_port;
    assert!(
        support::wait_until(Duration::from_secs(10), || {
            stored(
                &gateway.data_dir,
                "SELECT count(*) FROM retained WHERE payload = CAST('offline' AS BLOB)",
            ) == 1
        })
        .await,
        "the will did not become the stored retained state:\n{}",
        gateway.log()
    );
    gateway.kill9();
    gateway.start_again();
    assert_eq!(
        retained(port, status_topic, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("offline"),
        "after kill -9 the fan's status is not its will"
    );
}

/// A device's command topic: `warehouse/<device>/command`.
fn command_topic(device: &str) -> String {
    format!("warehouse/{device}/command")
}

/// MQTT 5 devices on `local.listen`, each on a persistent session with a Session Expiry
/// Interval, subscribed QoS 1 to its command topic, then offline.
async fn devices5_subscribe_and_leave(port: u16, devices: &[(&str, u32)]) {
    for &(id, expiry) in devices {
        let mut device = Device5::connect(port, id, true, expiry).await;
        assert!(
            !device.session_present,
            "{id}: a clean start found a session"
        );
        device
            .subscribe(&command_topic(id), QoS5::AtLeastOnce)
            .await;
        device.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_expiry_counts_across_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let port = gateway.local_port;
    devices5_subscribe_and_leave(
        port,
        &[("scanner", 4), ("badge-reader", 2), ("label-printer", 2)],
    )
    .await;
    let command = vec![(command_topic("scanner"), b"rescan".to_vec())];
    publish_all(port, "operator-panel", QoS::AtLeastOnce, command).await;
    wait_stored(
        &gateway,
        "SELECT count(*) FROM queued WHERE client_id = 'scanner'",
        1,
    )
    .await;
    wait_stored(&gateway, "SELECT count(*) FROM subscriptions", 3).await;

    gateway.kill9();
    // Down for longer than the 2 s sessions' expiry: that time is not the gateway's.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let restarted = Instant::now();
    gateway.start_again();

    let badge_reader = Device5::connect(port, "badge-reader", false, 2).await;
    assert!(
        badge_reader.session_present,
        "a 2 s session expired while the gateway was down 2.5 s: expiry counted the wall clock"
    );
    badge_reader.disconnect().await;
    let mut scanner = Device5::connect(port, "scanner", false, 4).await;
    assert!(
        scanner.session_present,
        "the scanner's 4 s session is gone after kill -9:\n{}",
        gateway.log()
    );
    let got = scanner
        .recv(Duration::from_secs(5))
        .await
        .expect("the scanner got no command after kill -9");
    assert_eq!(
        (got.topic, got.payload.as_str()),
        (command_topic("scanner"), "rescan")
    );
    assert!(
        scanner.recv(Duration::from_secs(1)).await.is_none(),
        "the command came twice"
    );
    scanner.disconnect().await;

    // 3 s of running time after the restart, more than its 2 s: the printer's session is over.
    tokio::time::sleep_until((restarted + Duration::from_secs(3)).into()).await;
    let printer = Device5::connect(port, "label-printer", false, 2).await;
    assert!(
        !printer.session_present,
        "a 2 s session is still there after 3 s of gateway running time:\n{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_message_expiry_counts_across_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let port = gateway.local_port;
    devices5_subscribe_and_leave(port, &[("label-printer", 3600)]).await;
    let labels = command_topic("label-printer");
    let mut wms = Device5::connect(port, "wms", true, 0).await;
    wms.publish(&labels, "print-now", Some(3)).await;
    wms.publish(&labels, "print-today", Some(60)).await;
    wms.disconnect().await;
    wait_stored(
        &gateway,
        "SELECT count(*) FROM queued WHERE client_id = 'label-printer'",
        2,
    )
    .await;

    gateway.kill9();
    gateway.start_again();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut printer = Device5::connect(port, "label-printer", false, 3600).await;
    assert!(printer.session_present, "the printer's session is gone");
    let got = printer
        .recv(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no message after kill -9:\n{}", gateway.log()));
    assert_eq!(
        got.payload, "print-today",
        "not the message with 60 s to live (the one with 3 s expired after 3 s of running time)"
    );
    // 3 s and more of running time went by: what is left is less, and says so.
    let left = got
        .message_expiry
        .expect("delivered without its Message Expiry Interval");
    println!("delivered after the restart with {left} s of its 60 s left");
    assert!(
        (50..=57).contains(&left),
        "Message Expiry Interval {left} s after 3 s and more of running time (sent with 60)"
    );
    assert!(
        printer.recv(Duration::from_secs(1)).await.is_none(),
        "more than the unexpired message arrived"
    );
}

const DOOR_STATE: &str = "warehouse/door/state";
const DOCK_DOOR_STATE: &str = "warehouse/door/dock2/state";
const WILL_DELAY: Duration = Duration::from_secs(3);

/// A door sensor with a will `offline` 3 s after its connection is lost and a 60 s
/// session, which then loses power (no DISCONNECT).
async fn door_sensor_loses_power(port: u16, client_id: &str, will_topic: &str) {
    let will = delayed_will(will_topic, "offline", WILL_DELAY.as_secs() as u32);
    let sensor = Device5::connect_with_will(port, client_id, true, 60, Some(will)).await;
    drop(sensor);
}

/// A dashboard on every door's state.
async fn door_panel(port: u16) -> LocalSubscriber {
    LocalSubscriber::connect(
        port,
        "door-panel",
        true,
        Some(("warehouse/door/#", QoS::AtLeastOnce)),
    )
    .await
}

/// A kill -9 and the restart after it, as the test saw them.
struct Outage {
    killing: Instant,
    killed: Instant,
    starting: Instant,
    ready: Instant,
}

impl Outage {
    /// kill -9, `down` without the gateway, then start it again.
    async fn of(gateway: &mut Gateway, down: Duration) -> Self {
        let killing = Instant::now();
        gateway.kill9();
        let killed = Instant::now();
        tokio::time::sleep(down).await;
        let starting = Instant::now();
        gateway.start_again();
        Outage {
            killing,
            killed,
            starting,
            ready: Instant::now(),
        }
    }

    /// The gateway's running time from `from` (before the kill) to `to` (after the
    /// restart): at least, at most.
    fn running(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        (
            (self.killing - from) + to.saturating_duration_since(self.ready),
            (self.killed - from) + (to - self.starting),
        )
    }
}

/// Asserts that `will` came after 3 s of gateway running time since `dropped`, as far as
/// the test can tell (50 ms for the time the gateway takes to see a connection end), and
/// no more than `late` after that.
fn assert_will_on_time(will: &Received, dropped: Instant, outage: &Outage, late: Duration) {
    let (least, most) = outage.running(dropped, will.at);
    println!(
        "the will came {:?} after the restart, after {least:?} to {most:?} of gateway \
         running time since the connection dropped",
        will.at - outage.starting
    );
    assert!(
        most + Duration::from_millis(50) >= WILL_DELAY,
        "the will came after at most {most:?} of gateway running time, before its 3 s delay"
    );
    assert!(
        least <= WILL_DELAY + late,
        "the will came {:?} after the restart: after at least {least:?} of gateway running \
         time since the connection dropped, not 3 s ({:?} of it before kill -9)",
        will.at - outage.starting,
        outage.killing - dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_will_delay_across_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let port = gateway.local_port;
    door_sensor_loses_power(port, "door", DOOR_STATE).await;
    door_sensor_loses_power(port, "dock-door", DOCK_DOOR_STATE).await;
    let dropped = Instant::now();
    wait_stored(
        &gateway,
        "SELECT count(*) FROM sessions WHERE will_at IS NOT NULL",
        2,
    )
    .await;
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "the wills took {:?} to reach state.db",
        dropped.elapsed()
    );
    // Down for a second: that second is not the gateway's running time.
    let outage = Outage::of(&mut gateway, Duration::from_secs(1)).await;
    let mut panel = door_panel(port).await;
    // The dock sensor is back within the delay: its will must never be published.
    let dock = Device5::connect(port, "dock-door", false, 60).await;
    assert!(dock.session_present, "the dock sensor's session is gone");

    let will = panel
        .recv(WILL_DELAY + Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("the door's will never came after kill -9"));
    assert_eq!(
        (will.topic.as_str(), will.payload.as_str()),
        (DOOR_STATE, "offline")
    );
    assert_will_on_time(&will, dropped, &outage, Duration::from_millis(500));
    let until = outage.starting + WILL_DELAY + Duration::from_secs(2);
    let late = panel
        .recv(until.saturating_duration_since(Instant::now()))
        .await;
    assert!(
        late.is_none(),
        "a will came though its device was back within the delay: {late:?}"
    );
    drop(dock);
}

/// After a `kill -9`, the gateway's running time since the state clock was last written
/// (with every commit, and every minute while a will or an expiry is pending) is not
/// counted: a will comes that much late, never early. Here nothing is written for half the
/// delay before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_will_after_kill_9_is_never_early_and_late_at_most_what_was_not_written() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(GatewayConfig::new(cloud.port));
    let port = gateway.local_port;
    door_sensor_loses_power(port, "door", DOOR_STATE).await;
    let dropped = Instant::now();
    wait_stored(
        &gateway,
        "SELECT count(*) FROM sessions WHERE will_at IS NOT NULL",
        1,
    )
    .await;
    let written = Instant::now();
    // Half the delay goes by with nothing to write; then the gateway loses power.
    tokio::time::sleep_until((dropped + WILL_DELAY / 2).into()).await;
    let outage = Outage::of(&mut gateway, Duration::ZERO).await;
    let mut panel = door_panel(port).await;
    let will = panel
        .recv(WILL_DELAY + Duration::from_secs(2))
        .await
        .expect("the door's will never came after kill -9");
    let unwritten = outage.killing.saturating_duration_since(written);
    assert_will_on_time(
        &will,
        dropped,
        &outage,
        unwritten + Duration::from_millis(500),
    );
}
