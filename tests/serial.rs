//! Serial-line sensors appear as MQTT topics: kv, json and raw lines, garbage dropped and
//! counted, commands written to the port, and a port that disappears and comes back.

mod support;

use std::time::{Duration, Instant};

use support::{
    counter, free_port, latest, publish_all, Gateway, GatewayConfig, LocalSubscriber, PtyPair, QoS,
};

fn sensor(name: &str, line: &PtyPair, format: &str, topic: &str, extra: &str) -> String {
    format!(
        "[[serial]]\nname = \"{name}\"\ndevice = \"{}\"\nbaud = 115200\nformat = \"{format}\"\n\
         topic = \"{topic}\"\nmax_line = 64\n{extra}\n",
        line.device.display()
    )
}

async fn dashboard(gateway: &Gateway) -> LocalSubscriber {
    LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("warehouse/#", QoS::AtMostOnce)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_in_each_format_become_readings_and_garbage_is_counted() {
    let _serial = support::serial().await;
    let (kv, json, raw) = (PtyPair::new(), PtyPair::new(), PtyPair::new());
    let field = sensor("zone2-probe", &kv, "kv", "warehouse/zone2/{key}", "")
        + &sensor("zone3-probe", &json, "json", "warehouse/zone3/{key}", "")
        + &sensor(
            "scanner",
            &raw,
            "raw",
            "warehouse/dock/scan",
            "command_topic = \"warehouse/dock/scanner/command\"",
        );
    let gateway = Gateway::start(GatewayConfig::new(free_port()).append(&field));
    gateway
        .wait_status(Duration::from_secs(10), "the three ports open", |s| {
            ["serial/zone2-probe", "serial/zone3-probe", "serial/scanner"]
                .iter()
                .all(|d| s["devices"][d]["state"] == "online")
        })
        .await;
    let mut dashboard = dashboard(&gateway).await;
    let (mut kv_end, mut json_end, mut raw_end) = (kv.sensor(), json.sensor(), raw.sensor());

    kv_end.send(b"\xff\xfe garbage\n");
    kv_end.send(&[b'x'; 100]);
    kv_end.send(b"\nno pairs here\ntemp=21.5 hum=40\r\n");
    json_end.send(b"{\"temp\": 19.25, \"door\": \"open\"}\n[1,2]\n");
    raw_end.send(b"PALLET 0042 OK\n");

    let seen = latest(
        &mut dashboard,
        &[
            "warehouse/zone2/temp",
            "warehouse/zone2/hum",
            "warehouse/zone3/temp",
            "warehouse/zone3/door",
            "warehouse/dock/scan",
        ],
        Duration::from_secs(10),
    )
    .await;
    let get = |t: &str| seen.get(t).map(String::as_str);
    assert_eq!(get("warehouse/zone2/temp"), Some("21.5"));
    assert_eq!(get("warehouse/zone2/hum"), Some("40"));
    assert_eq!(get("warehouse/zone3/temp"), Some("19.25"));
    assert_eq!(get("warehouse/zone3/door"), Some("open"));
    assert_eq!(get("warehouse/dock/scan"), Some("PALLET 0042 OK"));
    assert_eq!(seen.len(), 5, "nothing else is published: {seen:?}");
    let status = gateway
        .wait_status(Duration::from_secs(5), "four lines dropped", |s| {
            counter(s, "serial_lines_dropped") == 4
        })
        .await;
    assert_eq!(status["devices"]["serial/zone2-probe"]["dropped"], 3);
    assert_eq!(status["devices"]["serial/zone3-probe"]["dropped"], 1);

    publish_all(
        gateway.local_port,
        "operator",
        QoS::AtLeastOnce,
        vec![(
            "warehouse/dock/scanner/command".to_owned(),
            b"BEEP 2".to_vec(),
        )],
    )
    .await;
    assert_eq!(
        raw_end.recv_line(Duration::from_secs(5)).as_deref(),
        Some("BEEP 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_disappears_is_read_again_when_it_returns() {
    let _serial = support::serial().await;
    let mut line = PtyPair::new();
    let field = sensor("zone2-probe", &line, "kv", "warehouse/zone2/{key}", "");
    let gateway = Gateway::start(GatewayConfig::new(free_port()).append(&field));
    let mut dashboard = dashboard(&gateway).await;
    let mut probe = line.sensor();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The gateway may open the port a moment after it is ready: repeat until heard.
    loop {
        probe.send(b"temp=20\n");
        if latest(
            &mut dashboard,
            &["warehouse/zone2/temp"],
            Duration::from_millis(500),
        )
        .await
        .contains_key("warehouse/zone2/temp")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the first reading never arrived");
    }

    drop(probe);
    line.close();
    gateway
        .wait_status(Duration::from_secs(10), "the probe unreachable", |s| {
            s["devices"]["serial/zone2-probe"]["state"] == "unreachable"
        })
        .await;
    line.open();
    gateway
        .wait_status(Duration::from_secs(15), "the probe open again", |s| {
            s["devices"]["serial/zone2-probe"]["state"] == "online"
        })
        .await;
    let mut probe = line.sensor();
    probe.send(b"temp=22.5\n");

    // Readings of the first port may still be on their way: wait for the new one.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = dashboard
            .recv(left)
            .await
            .expect("no reading after the port returned");
        if message.payload == "22.5" {
            break;
        }
    }
    assert!(gateway.log().contains("serial sensor unreachable"));
}
