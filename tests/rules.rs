//! Local automation: `[[rule]]` threshold rules keep the warehouse safe while the cloud is
//! away. A rising then falling temperature switches a fan on once and off once, a Modbus
//! coil follows a Modbus temperature, a silent sensor gets the fail-safe payload, JSON
//! readings are read through value_path, a reload keeps the state of the rules it did not
//! change, and `check` names every problem of a bad rule.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    counter, free_port, publish_all, Collector, Gateway, GatewayConfig, LocalSubscriber,
    ModbusServer, Mosquitto, Proxy, QoS, Received, CLOUD_PREFIX,
};

/// The issue's warehouse fans: each zone's temperature drives that zone's fan.
const FANS: &str = r#"
[[rule]]
name = "zone fans"
topic = "warehouse/+/temp"
publish = "warehouse/{1}/fan/command"
above = 30.0
clear_below = 28.0
on = "ON"
off = "OFF"
"#;

const ZONE1_FAN: &str = "warehouse/zone1/fan/command";

/// `(topic, payload)` pairs for [`publish_all`].
fn readings(topic: &str, values: &[&str]) -> Vec<(String, Vec<u8>)> {
    values
        .iter()
        .map(|v| (topic.to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// An actuator (or a dashboard) on the local broker.
async fn actuator(gateway: &Gateway, id: &str, filter: &str) -> LocalSubscriber {
    LocalSubscriber::connect(
        gateway.local_port,
        id,
        true,
        Some((filter, QoS::AtLeastOnce)),
    )
    .await
}

/// The next `n` messages on topics ending with `suffix`, others skipped.
async fn next_on(
    subscriber: &mut LocalSubscriber,
    suffix: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match subscriber.recv(left).await {
            Some(m) if m.topic.ends_with(suffix) => got.push(m),
            Some(_) => {}
            None => break,
        }
    }
    got
}

fn payloads(messages: &[Received]) -> Vec<(&str, &str)> {
    messages
        .iter()
        .map(|m| (m.topic.as_str(), m.payload.as_str()))
        .collect()
}

/// Saves `text` as the config, signals a reload (as `systemctl reload` after an edit) and
/// waits until the gateway applied it; returns the status then.
async fn reload(gateway: &Gateway, text: &str) -> Value {
    // The file watcher and the SIGHUP handler are in place once the gateway says it runs.
    let running = support::wait_until(Duration::from_secs(10), || {
        gateway.log().contains("bridgehead running")
    })
    .await;
    assert!(running, "{}", gateway.log());
    let generation = gateway.generation();
    gateway.write_config(text, support::Edit::Rename);
    gateway.sighup();
    gateway
        .wait_live(Duration::from_secs(10), "applying the edit", |s| {
            s["config"]["generation"].as_u64() > Some(generation)
        })
        .await
}

fn output<'a>(status: &'a Value, rule: &str, topic: &str) -> &'a Value {
    &status["rules"][rule]["outputs"][topic]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cloud_cut_a_rising_then_falling_temperature_switches_the_fan_on_once_and_off_once(
) {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, &format!("{CLOUD_PREFIX}warehouse/#")).await;
    let proxy = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(GatewayConfig::new(proxy.port).append(FANS));
    gateway.wait_cloud_up(Duration::from_secs(10)).await;
    proxy.cut();
    gateway.wait_telemetry_down().await;
    let mut fans = actuator(&gateway, "fans", "warehouse/+/fan/command").await;

    let zone1 = [
        "25", "27", "29", "31", "29.5", "30.5", "32", "29", "28.5", "27", "26",
    ];
    publish_all(
        gateway.local_port,
        "zone1-sensor",
        QoS::AtLeastOnce,
        readings("warehouse/zone1/temp", &zone1),
    )
    .await;
    publish_all(
        gateway.local_port,
        "zone2-sensor",
        QoS::AtLeastOnce,
        readings("warehouse/zone2/temp", &["35", "33"]),
    )
    .await;

    // The first reading settles the unknown state (the fan may have been left on), then
    // one ON and one OFF however the temperature wavers between 28 and 30.
    let got = fans.recv_n(4, Duration::from_secs(10)).await;
    assert_eq!(
        payloads(&got),
        [
            (ZONE1_FAN, "OFF"),
            (ZONE1_FAN, "ON"),
            (ZONE1_FAN, "OFF"),
            ("warehouse/zone2/fan/command", "ON")
        ]
    );
    assert!(
        fans.recv(Duration::from_millis(500)).await.is_none(),
        "no chatter"
    );

    let status = gateway
        .wait_live(Duration::from_secs(5), "showing both fans", |s| {
            s["rules"]["zone fans"]["readings"] == 13
        })
        .await;
    let fan1 = output(&status, "zone fans", ZONE1_FAN);
    assert_eq!(
        (&fan1["state"], &fan1["value"]),
        (&json!("off"), &json!(26.0))
    );
    assert_eq!(
        output(&status, "zone fans", "warehouse/zone2/fan/command")["state"],
        "on"
    );
    assert_eq!(status["rules"]["zone fans"]["publications"], 4);
    assert_eq!(counter(&status, "rule_publications"), 4);
    assert_eq!(counter(&status, "rule_errors"), 0);
    assert_ne!(status["cloud"]["telemetry"], "up", "the cloud is still cut");
    let (_, text) = gateway.status_command(false);
    assert!(
        text.contains("rule       zone fans: readings=13 not_numeric=0 publications=4"),
        "{text}"
    );
    assert!(
        text.contains("             warehouse/zone2/fan/command on for "),
        "{text}"
    );
    let log = gateway.log();
    assert_eq!(log.matches("rule decision: on").count(), 2, "{log}");

    // Back online, the cloud learns what the site did meanwhile (the uplink rule
    // `warehouse/#` forwards the decisions like any local message).
    proxy.restore();
    let fan_up = format!("{CLOUD_PREFIX}{ZONE1_FAN}");
    let fan_commands = || -> Vec<String> {
        let messages = collector.messages().into_iter();
        messages
            .filter(|m| m.topic == fan_up)
            .map(|m| m.payload)
            .collect()
    };
    let arrived = support::wait_until(Duration::from_secs(20), || fan_commands().len() >= 3).await;
    assert!(arrived, "the fan commands did not reach the cloud");
    assert_eq!(fan_commands(), ["OFF", "ON", "OFF"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_coil_follows_a_modbus_temperature_through_the_rule() {
    let _serial = support::serial().await;
    // Register 0 holds the temperature in tenths of a degree; coil 5 is the fan.
    let server = ModbusServer::tcp(&json!({"1": {"hr": {"0": 250}, "co": {"5": false}}}));
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    let device = format!(
        "[[modbus]]\nname = \"zone1-climate\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\
         poll = \"200ms\"\n\n\
         [[modbus.read]]\ntopic = \"warehouse/zone1/temp\"\nkind = \"holding\"\naddress = 0\ntype = \"i16\"\nscale = 0.1\n\n\
         [[modbus.read]]\ntopic = \"warehouse/zone1/fan/state\"\nkind = \"coil\"\naddress = 5\n\n\
         [[modbus.write]]\ntopic = \"{ZONE1_FAN}\"\nkind = \"coil\"\naddress = 5\n\n\
         [[modbus.write]]\ntopic = \"warehouse/zone1/temp/set\"\nkind = \"holding\"\naddress = 0\ntype = \"i16\"\nscale = 0.1\n"
    );
    // Nothing listens on the cloud's port: the link is down all along.
    let gateway = Gateway::start(GatewayConfig::new(free_port()).append(FANS).append(&device));
    let coil_writes = || {
        server
            .writes()
            .into_iter()
            .filter(|w| w.contains("fc=5"))
            .collect::<Vec<_>>()
    };
    let off = "unit=1 fc=5 address=5 values=[False]";
    let on = "unit=1 fc=5 address=5 values=[True]";
    assert!(
        support::wait_until(Duration::from_secs(10), || coil_writes() == [off]).await,
        "25.0 polled: the fan coil is switched off once: {:?}",
        server.writes()
    );

    // The site warms up (the test sets the register through the gateway itself).
    for (temperature, expected) in [("31", vec![off, on]), ("27", vec![off, on, off])] {
        publish_all(
            gateway.local_port,
            "test",
            QoS::AtLeastOnce,
            readings("warehouse/zone1/temp/set", &[temperature]),
        )
        .await;
        assert!(
            support::wait_until(Duration::from_secs(10), || coil_writes() == expected).await,
            "{temperature} polled: coil writes {:?} expected, the server executed {:?}",
            expected,
            server.writes()
        );
    }
    // Every poll publishes 27.0 again (5 a second): the coil is not written again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(coil_writes(), [off, on, off]);
    let status = gateway
        .wait_live(Duration::from_secs(5), "the fan off", |s| {
            output(s, "zone fans", ZONE1_FAN)["state"] == "off"
        })
        .await;
    assert!(
        status["rules"]["zone fans"]["readings"].as_u64() > Some(5),
        "{status}"
    );
    assert_eq!(status["devices"]["modbus/zone1-climate"]["write_errors"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_gets_the_stale_payload() {
    let _serial = support::serial().await;
    // No cloud and no uplink rule at all: the rules run on their own.
    let rules = format!(
        "{}stale_after = \"1500ms\"\nstale_payload = \"ON\"\n\n\
         [[rule]]\nname = \"dock heater\"\ntopic = \"warehouse/dock/temp\"\npublish = \"warehouse/dock/heater\"\n\
         below = 5\nclear_above = 7\non = \"ON\"\noff = \"OFF\"\nretain = true\n\
         stale_after = \"2s\"\nstale_payload = \"ON\"\n",
        FANS
    );
    let gateway = Gateway::start(
        GatewayConfig::new(free_port())
            .without_uplink()
            .without_downlink()
            .append(&rules),
    );
    let mut fans = actuator(&gateway, "fans", "warehouse/+/fan/command").await;
    let before = Instant::now();
    publish_all(
        gateway.local_port,
        "zone1-sensor",
        QoS::AtLeastOnce,
        readings("warehouse/zone1/temp", &["25"]),
    )
    .await;
    let off = fans.recv(Duration::from_secs(5)).await.expect("OFF");
    assert_eq!(off.payload, "OFF");

    let stale = fans.recv(Duration::from_secs(10)).await.expect("stale ON");
    assert_eq!(stale.payload, "ON");
    let silent = stale.at.duration_since(before);
    assert!(
        silent >= Duration::from_millis(1500),
        "stale after {silent:?}, before stale_after"
    );
    let status = gateway
        .wait_live(Duration::from_secs(5), "the output stale", |s| {
            output(s, "zone fans", ZONE1_FAN)["state"] == "stale"
        })
        .await;
    assert_eq!(status["rules"]["zone fans"]["stale"], 1);
    assert!(gateway.log().contains("rule output stale"));

    // A dock sensor that never reported since the start: its output (the rule names it
    // without a wildcard) went stale too, and the retained decision waits for the heater.
    gateway
        .wait_live(Duration::from_secs(5), "the dock heater stale", |s| {
            output(s, "dock heater", "warehouse/dock/heater")["state"] == "stale"
        })
        .await;
    let heater = support::retained(
        gateway.local_port,
        "warehouse/dock/heater",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(heater.as_deref(), Some("ON"));

    // The sensor is back: the last decision (off) holds again.
    publish_all(
        gateway.local_port,
        "zone1-sensor",
        QoS::AtLeastOnce,
        readings("warehouse/zone1/temp", &["29"]),
    )
    .await;
    let back = fans.recv(Duration::from_secs(5)).await.expect("OFF again");
    assert_eq!(back.payload, "OFF");
    let status = gateway
        .wait_live(Duration::from_secs(5), "the output off", |s| {
            output(s, "zone fans", ZONE1_FAN)["state"] == "off"
        })
        .await;
    assert_eq!(counter(&status, "rule_stale"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_readings_are_read_through_value_path_and_the_rest_is_counted() {
    let _serial = support::serial().await;
    let vents = "\n[[rule]]\nname = \"vents\"\ntopic = \"warehouse/+/climate\"\n\
                 publish = \"warehouse/{1}/vent\"\nabove = 30\nclear_below = 28\n\
                 on = \"open\"\noff = \"closed\"\nvalue_path = \"value\"\nqos = 0\n";
    let gateway = Gateway::start(GatewayConfig::new(free_port()).append(vents));
    let mut vent = actuator(&gateway, "vent", "warehouse/+/vent").await;
    publish_all(
        gateway.local_port,
        "zone1-probe",
        QoS::AtLeastOnce,
        readings(
            "warehouse/zone1/climate",
            &[
                r#"{"value":31.5,"ts":1732550000000}"#,
                r#"{"value":"n/a"}"#,
                "garbage",
                r#"{"value":20,"ts":1732550001000}"#,
            ],
        ),
    )
    .await;
    let got = vent.recv_n(2, Duration::from_secs(10)).await;
    assert_eq!(
        payloads(&got),
        [
            ("warehouse/zone1/vent", "open"),
            ("warehouse/zone1/vent", "closed")
        ]
    );
    let status = gateway
        .wait_live(Duration::from_secs(5), "counting the bad readings", |s| {
            s["rules"]["vents"]["readings"] == 4
        })
        .await;
    assert_eq!(status["rules"]["vents"]["not_numeric"], 2);
    assert_eq!(counter(&status, "rule_not_numeric"), 2);
    let log = gateway.log();
    assert_eq!(
        log.matches("rule: reading ignored, no number in it")
            .count(),
        1,
        "the second is held back by the rate limit: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_one_rule_keeps_the_others_state() {
    let _serial = support::serial().await;
    let dehumidifier = |above: u32| {
        format!(
            "\n[[rule]]\nname = \"dehumidifier\"\ntopic = \"warehouse/+/humidity\"\n\
             publish = \"warehouse/{{1}}/dehumidifier\"\nabove = {above}\nclear_below = 60\n\
             on = \"ON\"\noff = \"OFF\"\n"
        )
    };
    let gateway = Gateway::start(
        GatewayConfig::new(free_port())
            .append(FANS)
            .append(&dehumidifier(70)),
    );
    let mut site = actuator(&gateway, "site", "warehouse/#").await;
    let sensor = |values: Vec<(String, Vec<u8>)>| {
        publish_all(gateway.local_port, "zone1-sensor", QoS::AtLeastOnce, values)
    };
    sensor(
        [
            readings("warehouse/zone1/temp", &["31"]),
            readings("warehouse/zone1/humidity", &["75"]),
        ]
        .concat(),
    )
    .await;
    let got = next_on(&mut site, "/command", 1, Duration::from_secs(5)).await;
    assert_eq!(payloads(&got), [(ZONE1_FAN, "ON")]);
    let got = next_on(&mut site, "/dehumidifier", 1, Duration::from_secs(5)).await;
    assert_eq!(payloads(&got), [("warehouse/zone1/dehumidifier", "ON")]);

    let edited = gateway.config_text().replace("above = 70", "above = 80");
    let status = reload(&gateway, &edited).await;
    assert!(gateway
        .log()
        .contains(r#"reload: cloud unchanged, rule "dehumidifier" changed"#));
    assert_eq!(output(&status, "zone fans", ZONE1_FAN)["state"], "on");
    assert_eq!(status["rules"]["dehumidifier"]["outputs"], json!({}));

    // The fans remember they are on: 31 again publishes nothing. The dehumidifier starts
    // over with its new threshold: 75 is between 60 and 80 (undecided), 85 switches it on.
    sensor(
        [
            readings("warehouse/zone1/temp", &["31"]),
            readings("warehouse/zone1/humidity", &["75", "85"]),
        ]
        .concat(),
    )
    .await;
    // Decisions come in the order of the readings: a fan decision would come first.
    let mut decisions = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(m) = site
        .recv(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        if m.topic.ends_with("/command") || m.topic.ends_with("/dehumidifier") {
            decisions.push(m);
        }
        if decisions.iter().any(|m| m.topic.ends_with("/dehumidifier")) {
            break;
        }
    }
    assert_eq!(
        payloads(&decisions),
        [("warehouse/zone1/dehumidifier", "ON")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_added_by_a_reload_to_a_gateway_without_rules_runs() {
    let _serial = support::serial().await;
    let gateway = Gateway::start(
        GatewayConfig::new(free_port())
            .without_uplink()
            .without_downlink(),
    );
    let edited = gateway.config_text() + FANS;
    reload(&gateway, &edited).await;
    assert!(gateway
        .log()
        .contains(r#"reload: cloud unchanged, rule "zone fans" added"#));
    let mut fans = actuator(&gateway, "fans", "warehouse/+/fan/command").await;
    publish_all(
        gateway.local_port,
        "zone1-sensor",
        QoS::AtLeastOnce,
        readings("warehouse/zone1/temp", &["31"]),
    )
    .await;
    let on = fans.recv(Duration::from_secs(5)).await.expect("ON");
    assert_eq!((on.topic.as_str(), on.payload.as_str()), (ZONE1_FAN, "ON"));
}

#[test]
fn check_names_every_problem_of_a_bad_rule() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bridgehead.toml");
    let text = r#"[gateway]
id = "gw-001"
[cloud]
url = "mqtt://127.0.0.1"

[[rule]]
name = "zone fans"
topic = "warehouse/+/temp"
publish = "warehouse/{1}/temp"
above = 30
clear_below = 28
on = "ON"
off = "OFF"

[[rule]]
name = "pumps"
topic = "pit/level"
publish = "pit/{1}/pump"
below = 5
clear_above = 7
on = "ON"
off = "OFF"
stale_payload = "ON"

[[rule]]
name = "vents"
topic = "warehouse/+/climate"
publish = "warehouse/{1}/vent"
above = 28
clear_below = 30
on = "open"
"#;
    std::fs::write(&path, text).expect("writing the config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bridgehead"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("running bridgehead check");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display();
    let expected = [
        format!(
            r#"{file}:9: rule[1].publish: "warehouse/{{1}}/temp" can match this rule's own topic "warehouse/+/temp": a decision would be read as a reading"#
        ),
        format!(
            r#"{file}:18: rule[2].publish: "pit/{{1}}/pump" uses {{1}}, but the topic filter has no wildcard"#
        ),
        format!("{file}:23: rule[2].stale_payload: has no effect without stale_after"),
        format!(r#"{file}:25: rule[3].off: missing; like off = "OFF""#),
        format!("{file}:30: rule[3].clear_below: 30 is above `above` (28)"),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(expected.as_str()),
            "expected {expected:?}..., got {line:?}"
        );
    }
}
