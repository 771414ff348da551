//! An operator edits the config of a running gateway (or runs `systemctl reload`): the
//! change applies within a second or two, nothing is lost, reordered or sent twice, local
//! devices stay connected, and the cloud link drops only when `[cloud]` itself changed. A
//! typo is reported with line and key, and the old config keeps running.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::{
    counter, publish_all, publish_many, telemetry_burst, write_unrelated_ca, Collector, Edit,
    Expected, Gateway, GatewayConfig, LocalSubscriber, ModbusServer, Mosquitto, Proxy, QoS,
    CLOUD_PREFIX, COMMAND_PREFIX, TELEMETRY_FILTER,
};

const MAX_INFLIGHT: u64 = 100;

fn extra_rule(topic: &str) -> String {
    format!(
        "\n[[uplink]]\ntopic = \"{topic}\"\nremote_prefix = \"fleet/{{gateway_id}}/\"\nqos = 1\n"
    )
}

fn boiler(port: u16, poll: &str) -> String {
    format!(
        "\n[[modbus]]\nname = \"boiler\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\
         poll = \"{poll}\"\n\n  [[modbus.read]]\n  topic = \"plant/boiler/temp\"\n  kind = \"holding\"\n  address = 0\n"
    )
}

/// Writes `text` and waits until the gateway reports the next config generation; returns
/// how long that took (file written to change applied).
async fn apply(gateway: &Gateway, text: &str, edit: Edit) -> Duration {
    let before = gateway.generation();
    let written = Instant::now();
    gateway.write_config(text, edit);
    gateway
        .wait_live(Duration::from_secs(10), "applying the edit", |s| {
            s["config"]["generation"].as_u64() > Some(before)
        })
        .await;
    written.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_messages_flow_while_the_config_is_rewritten_ten_times() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let plc = ModbusServer::tcp(&serde_json::json!({"1": {"hr": {"0": 215}}}));
    let support::Endpoint::Tcp(plc_port) = plc.endpoint else {
        unreachable!()
    };
    let config = GatewayConfig::new(link.port)
        .set("cloud", "max_inflight", &MAX_INFLIGHT.to_string())
        .append(&boiler(plc_port, "200ms"));
    let gateway = Gateway::start(config);
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let base = gateway.config_text();
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("plant/#", QoS::AtMostOnce)),
    )
    .await;
    assert!(
        dashboard.recv(Duration::from_secs(10)).await.is_some(),
        "no boiler reading"
    );
    let cloud_connections = link.connections();

    let devices = tokio::spawn(telemetry_burst(
        gateway.local_port,
        4,
        5_000,
        Duration::from_millis(1),
    ));
    let mut took = Vec::new();
    for i in 0..10 {
        let mut text = base.clone();
        if i % 2 == 0 {
            text += &extra_rule("dock/#");
        }
        if i % 3 != 0 {
            text = text.replace(
                "[queue]\n",
                "[queue]\nmax_age = \"6d\"\nwhen_full = \"reject-new\"\n",
            );
        }
        if i % 4 >= 2 {
            text = text.replace("poll = \"200ms\"", "poll = \"300ms\"");
        }
        let edit = if i % 2 == 0 {
            Edit::Rename
        } else {
            Edit::InPlace
        };
        if i == 5 {
            // `systemctl reload` right after an edit: one of the two applies it.
            let before = gateway.generation();
            let written = Instant::now();
            gateway.write_config(&text, edit);
            gateway.sighup();
            gateway
                .wait_live(Duration::from_secs(10), "applying the edit", |s| {
                    s["config"]["generation"].as_u64() > Some(before)
                })
                .await;
            took.push(written.elapsed());
        } else {
            took.push(apply(&gateway, &text, edit).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expected = devices.await.expect("devices");
    assert!(
        collector
            .wait_for_count(20_000, Duration::from_secs(60))
            .await,
        "only {} of 20000 reached the cloud",
        collector.distinct()
    );

    took.sort();
    println!(
        "file written to change applied, 10 reloads under load: min {:?}, median {:?}, max {:?}",
        took[0], took[5], took[9]
    );
    let deliveries = collector.deliveries();
    deliveries.assert_exactly(&expected);
    assert!(
        deliveries.duplicates as u64 <= MAX_INFLIGHT,
        "{} duplicates",
        deliveries.duplicates
    );
    assert_eq!(
        link.connections(),
        cloud_connections,
        "the cloud saw a reconnect"
    );
    assert!(
        dashboard.still_connected(),
        "the dashboard was disconnected"
    );
    let status = gateway.live_status().expect("live status");
    assert_eq!(counter(&status, "reconnects"), 0, "{status}");
    assert_eq!(counter(&status, "reloads_failed"), 0, "{status}");
    assert!(counter(&status, "reloads") >= 10, "{status}");
    assert_eq!(
        status["devices"]["modbus/boiler"]["state"], "online",
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_uplink_rule_forwards_within_two_seconds_and_a_removed_one_stops() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, "fleet/gw-test/dock/#").await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let base = gateway.config_text();

    apply(
        &gateway,
        &(base.clone() + &extra_rule("dock/#")),
        Edit::Rename,
    )
    .await;
    let sent = Instant::now();
    publish_many(gateway.local_port, "door", "dock/door", 1, QoS::AtLeastOnce).await;
    assert!(
        collector.wait_for_count(1, Duration::from_secs(2)).await,
        "the new rule did not forward within 2 s:\n{}",
        gateway.log()
    );
    println!(
        "new rule: first message in the cloud {:?} after publishing",
        sent.elapsed()
    );
    assert!(gateway
        .log()
        .contains("reload: +1 uplink rule, cloud unchanged"));

    apply(&gateway, &base, Edit::InPlace).await;
    publish_many(gateway.local_port, "door", "dock/door", 5, QoS::AtLeastOnce).await;
    publish_many(
        gateway.local_port,
        "probe",
        "warehouse/x",
        1,
        QoS::AtLeastOnce,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(collector.distinct(), 1, "a removed rule still forwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_downlink_rule_receives_a_command() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let gateway = Gateway::start(GatewayConfig::new(cloud.port).without_downlink());
    gateway
        .wait_status(Duration::from_secs(20), "telemetry up", |s| {
            s["cloud"]["telemetry"] == "up" && s["cloud"]["commands"] == "off"
        })
        .await;
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan",
        true,
        Some(("zone1/fan", QoS::AtLeastOnce)),
    )
    .await;

    let rule = "\n[[downlink]]\ntopic = \"zone1/#\"\nremote_prefix = \"fleet/{gateway_id}/cmd/\"\nqos = 1\n";
    apply(&gateway, &(gateway.config_text() + rule), Edit::Rename).await;
    gateway
        .wait_live(Duration::from_secs(10), "command link up", |s| {
            s["cloud"]["commands"] == "up"
        })
        .await;
    // The SUBACK may trail the CONNACK a little: send until the fan hears one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let command = loop {
        let message = vec![(format!("{COMMAND_PREFIX}zone1/fan"), b"ON".to_vec())];
        publish_all(cloud.port, "operator", QoS::AtLeastOnce, message).await;
        if let Some(m) = fan.recv(Duration::from_millis(500)).await {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no command reached the fan:\n{}",
            gateway.log()
        );
    };
    assert_eq!(
        (command.topic.as_str(), command.payload.as_str()),
        ("zone1/fan", "ON")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_cloud_url_sends_the_backlog_to_the_new_cloud_in_order() {
    let _serial = support::serial().await;
    let old_cloud = Mosquitto::start();
    let link = Proxy::start(old_cloud.port).await;
    let new_cloud = Mosquitto::start();
    let collector = Collector::start(new_cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    link.cut();
    gateway.wait_telemetry_down().await;
    let topic = "warehouse/backlog";
    let sent = publish_many(gateway.local_port, "sensor", topic, 1_000, QoS::AtLeastOnce).await;
    gateway
        .wait_live(Duration::from_secs(10), "holding the backlog", |s| {
            s["queue"]["rows"] == 1_000
        })
        .await;

    let text = gateway.config_text().replace(
        &format!("mqtt://127.0.0.1:{}", link.port),
        &format!("mqtt://127.0.0.1:{}", new_cloud.port),
    );
    apply(&gateway, &text, Edit::Rename).await;

    assert!(
        collector
            .wait_for_count(1_000, Duration::from_secs(20))
            .await,
        "only {} of 1000 reached the new cloud:\n{}",
        collector.distinct(),
        gateway.log()
    );
    collector
        .deliveries()
        .assert_exactly(&Expected::from([(format!("{CLOUD_PREFIX}{topic}"), sent)]));
    assert!(gateway.log().contains("cloud reconnected (cloud.url)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_is_refused_with_line_and_key_and_fixing_it_applies() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let good = gateway.config_text();
    let bad = good.replace(
        "[queue]\n",
        "[queue]\nmax_sise = \"1MiB\"\nmax_age = \"soon\"\n",
    );
    let line = bad
        .lines()
        .position(|l| l.starts_with("max_sise"))
        .expect("the typo")
        + 1;

    gateway.write_config(&bad, Edit::InPlace);
    let status = gateway
        .wait_live(Duration::from_secs(10), "showing the failed reload", |s| {
            s["config"]["last_reload"]["result"] == "failed"
        })
        .await;
    let problems = status["config"]["last_reload"]["problems"].to_string();
    assert!(
        problems.contains(&format!(":{line}: queue.max_sise: unknown key")),
        "{problems}"
    );
    assert!(problems.contains("queue.max_age"), "{problems}");
    assert_eq!(counter(&status, "reloads_failed"), 1);
    assert!(gateway
        .log()
        .contains(&format!(":{line}: queue.max_sise: unknown key")));
    let (code, text) = gateway.status_command(false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("failed"), "{text}");

    let sent = publish_many(gateway.local_port, "s", "warehouse/t", 10, QoS::AtLeastOnce).await;
    assert!(
        collector.wait_for_count(10, Duration::from_secs(10)).await,
        "forwarding stopped"
    );
    collector.deliveries().assert_exactly(&Expected::from([(
        format!("{CLOUD_PREFIX}warehouse/t"),
        sent,
    )]));

    // Fixed, with one key that only a restart applies: the rest applies, that key is named.
    let fixed = good
        .replace("[queue]\n", "[queue]\nmax_size = \"1MiB\"\n")
        .replace("[local]\n", "[local]\nmax_payload = \"128KiB\"\n");
    apply(&gateway, &fixed, Edit::Rename).await;
    let status = gateway.live_status().expect("status");
    assert_eq!(
        status["config"]["last_reload"]["result"], "applied",
        "{status}"
    );
    assert_eq!(
        status["config"]["restart_needed"],
        serde_json::json!(["local.max_payload"]),
        "{status}"
    );
    let summary = status["config"]["last_reload"]["summary"].to_string();
    assert!(
        summary.contains("queue applied (queue.max_size)"),
        "{summary}"
    );
    assert!(
        summary.contains("restart needed for local.max_payload"),
        "{summary}"
    );
    let (_, text) = gateway.status_command(false);
    assert!(
        text.contains("restart    needed to apply local.max_payload"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_queue_max_size_drops_the_oldest_backlog_once_counted() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let link = Proxy::start(cloud.port).await;
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    link.cut();
    gateway.wait_telemetry_down().await;
    let topic = "warehouse/backlog";
    let sent = publish_many(gateway.local_port, "sensor", topic, 100, QoS::AtLeastOnce).await;
    // 30 bytes each (local topic plus payload): room for the newest 40.
    let text = gateway
        .config_text()
        .replace("[queue]\n", "[queue]\nmax_size = 1200\n");
    apply(&gateway, &text, Edit::InPlace).await;
    let status = gateway
        .wait_live(Duration::from_secs(5), "holding the newest 40", |s| {
            s["queue"]["rows"] == 40
        })
        .await;
    assert_eq!(counter(&status, "dropped_full"), 60, "{status}");

    link.restore();
    assert!(collector.wait_for_count(40, Duration::from_secs(20)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    collector.deliveries().assert_exactly(&Expected::from([(
        format!("{CLOUD_PREFIX}{topic}"),
        sent[60..].to_vec(),
    )]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_cloud_ca_file_is_picked_up_without_a_restart() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start_tls();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let certs = tempfile::tempdir().expect("tempdir");
    let ca_file = certs.path().join("cloud-ca.pem");
    write_unrelated_ca(&ca_file);
    let tls_port = cloud.tls_port.expect("a TLS listener");
    let gateway = Gateway::start(
        GatewayConfig::new(cloud.port)
            .set_str("cloud", "url", &format!("mqtts://127.0.0.1:{tls_port}"))
            .set_str("cloud", "ca_file", &ca_file.display().to_string()),
    );
    let sent = publish_many(
        gateway.local_port,
        "s",
        "warehouse/tls",
        20,
        QoS::AtLeastOnce,
    )
    .await;
    gateway
        .wait_live(Duration::from_secs(10), "refusing the unknown CA", |s| {
            s["cloud"]["telemetry"] != "up" && s["queue"]["rows"] == 20
        })
        .await;

    // The operator installs the right CA, as certificate tools do: write and rename.
    let staged = certs.path().join("cloud-ca.pem.new");
    std::fs::copy(cloud.ca_pem_path(), &staged).expect("staging the CA");
    std::fs::rename(&staged, &ca_file).expect("installing the CA");

    assert!(
        collector.wait_for_count(20, Duration::from_secs(15)).await,
        "the rotated CA was not picked up:\n{}",
        gateway.log()
    );
    collector.deliveries().assert_exactly(&Expected::from([(
        format!("{CLOUD_PREFIX}warehouse/tls"),
        sent,
    )]));
    assert!(
        gateway.log().contains("cloud.ca_file content"),
        "{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_changed_modbus_device_restarts_and_the_other_keeps_polling() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let registers = serde_json::json!({"1": {"hr": {"0": 215}}});
    let (boiler_plc, chiller_plc) = (ModbusServer::tcp(&registers), ModbusServer::tcp(&registers));
    let port = |server: &ModbusServer| match server.endpoint {
        support::Endpoint::Tcp(port) => port,
        _ => unreachable!(),
    };
    let (boiler_port, chiller_port) = (port(&boiler_plc), port(&chiller_plc));
    let chiller = boiler(chiller_port, "100ms")
        .replace("\"boiler\"", "\"chiller\"")
        .replace("plant/boiler", "plant/chiller");
    let gateway = Gateway::start(
        GatewayConfig::new(cloud.port)
            .append(&boiler(boiler_port, "100ms"))
            .append(&chiller),
    );
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("plant/chiller/temp", QoS::AtMostOnce)),
    )
    .await;
    gateway
        .wait_live(Duration::from_secs(20), "both devices online", |s| {
            s["devices"]["modbus/boiler"]["state"] == "online"
                && s["devices"]["modbus/chiller"]["state"] == "online"
        })
        .await;

    let text = gateway
        .config_text()
        .replacen("poll = \"100ms\"", "poll = \"150ms\"", 1);
    apply(&gateway, &text, Edit::Rename).await;
    // The chiller's readings keep coming every 100 ms through the reload.
    let readings = dashboard.recv_n(20, Duration::from_secs(5)).await;
    assert_eq!(readings.len(), 20, "the chiller stopped publishing");
    let gaps = readings.windows(2).map(|w| w[1].at - w[0].at);
    let longest = gaps.max().unwrap_or_default();
    assert!(
        longest < Duration::from_millis(600),
        "the chiller paused {longest:?}"
    );

    let log = gateway.log();
    assert!(log.contains(r#"modbus "boiler" restarted"#), "{log}");
    let starts = |port: u16| {
        log.lines()
            .filter(|l| {
                l.contains("modbus bus starting") && l.contains(&format!("127.0.0.1:{port}"))
            })
            .count()
    };
    assert_eq!((starts(boiler_port), starts(chiller_port)), (2, 1), "{log}");
    gateway
        .wait_live(Duration::from_secs(10), "the boiler online again", |s| {
            s["devices"]["modbus/boiler"]["state"] == "online"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_local_listen_keeps_connected_devices_connected() {
    let _serial = support::serial().await;
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

    let new_port = support::free_port();
    let text = gateway.config_text().replace(
        &format!("listen = \"127.0.0.1:{}\"", gateway.local_port),
        &format!("listen = \"127.0.0.1:{new_port}\""),
    );
    apply(&gateway, &text, Edit::Rename).await;
    assert!(
        !support::accepts(gateway.local_port),
        "the old port still listens"
    );
    let sent = publish_many(new_port, "sensor", "warehouse/moved", 5, QoS::AtLeastOnce).await;

    let seen = dashboard.recv_n(5, Duration::from_secs(5)).await;
    assert_eq!(
        seen.len(),
        5,
        "the dashboard connected before the move missed messages"
    );
    assert!(
        dashboard.still_connected(),
        "the move disconnected the dashboard"
    );
    assert!(collector.wait_for_count(5, Duration::from_secs(10)).await);
    collector.deliveries().assert_exactly(&Expected::from([(
        format!("{CLOUD_PREFIX}warehouse/moved"),
        sent,
    )]));
    assert!(
        gateway.log().contains("listeners applied (local.listen)"),
        "{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_during_a_burst_cost_little_throughput() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let base = gateway.config_text();

    // Alternating, so that neither kind of run always has the warmer (or fuller) gateway.
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let runs = [("quiet", false), ("reloading", true)];
    for (run, reloads) in runs.into_iter().chain(runs) {
        // The second burst repeats the first one's payloads: count deliveries, not distinct.
        let already = collector.messages().len();
        let started = Instant::now();
        let burst = tokio::spawn(telemetry_burst(
            gateway.local_port,
            4,
            5_000,
            Duration::ZERO,
        ));
        if reloads {
            for i in 0..10 {
                let text = match i % 2 {
                    0 => base.clone() + &extra_rule("dock/#"),
                    _ => base.clone(),
                };
                gateway.write_config(&text, Edit::Rename);
                gateway.sighup();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        burst.await.expect("burst");
        let arrived = support::wait_until(Duration::from_secs(60), || {
            collector.messages().len() >= already + 20_000
        })
        .await;
        assert!(
            arrived,
            "{run}: only {} arrived",
            collector.messages().len() - already
        );
        let rate = 20_000.0 / started.elapsed().as_secs_f64();
        println!("{run}: 20000 QoS 1 messages in the cloud at {rate:.0} msg/s");
        rates.entry(run).or_default().push(rate);
    }
    let status = gateway.live_status().expect("status");
    assert!(counter(&status, "reloads") >= 20, "{status}");
    let mean = |run: &str| rates[run].iter().sum::<f64>() / rates[run].len() as f64;
    println!(
        "mean: quiet {:.0} msg/s, with ten reloads {:.0} msg/s",
        mean("quiet"),
        mean("reloading")
    );
    assert!(
        mean("reloading") > mean("quiet") * 0.5,
        "ten reloads halved the throughput: {rates:?}"
    );
}
