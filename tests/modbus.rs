//! Modbus devices appear as MQTT topics: every value type and word order, reads merged
//! into few requests, several units on one RTU line, a command switching a coil, and a
//! device that restarts.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    free_port, latest, publish_all, Gateway, GatewayConfig, LocalSubscriber, ModbusServer, PtyPair,
    QoS,
};

/// `bytes` (most significant first) laid out in registers as a device manual names it:
/// ABCD (big/big), CDAB (words swapped), BADC (bytes swapped), DCBA (both).
fn registers(order: &str, bytes: &[u8]) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    if order == "BADC" || order == "DCBA" {
        words = words.iter().map(|w| w.swap_bytes()).collect();
    }
    if order == "CDAB" || order == "DCBA" {
        words.reverse();
    }
    words
}

fn orders(order: &str) -> (&'static str, &'static str) {
    match order {
        "ABCD" => ("big", "big"),
        "CDAB" => ("big", "little"),
        "BADC" => ("little", "big"),
        _ => ("little", "little"),
    }
}

/// Holding registers from 0 up, one value after the other, and the `[[modbus.read]]`
/// tables reading them with the payload each must publish.
struct Device {
    holding: Vec<u16>,
    reads: String,
    expected: Vec<(String, String)>,
}

impl Device {
    fn new() -> Self {
        Device {
            holding: Vec::new(),
            reads: String::new(),
            expected: Vec::new(),
        }
    }

    fn value(&mut self, value_type: &str, order: &str, bytes: &[u8], extra: &str, expected: &str) {
        let address = self.holding.len();
        let topic = format!("warehouse/plc/{value_type}-{order}-{address}");
        let (byte_order, word_order) = orders(order);
        self.reads += &format!(
            "[[modbus.read]]\ntopic = \"{topic}\"\nkind = \"holding\"\naddress = {address}\n\
             type = \"{value_type}\"\nbyte_order = \"{byte_order}\"\nword_order = \"{word_order}\"\n{extra}\n"
        );
        self.holding.extend(registers(order, bytes));
        self.expected.push((topic, expected.to_owned()));
    }

    fn registers(&self) -> serde_json::Value {
        let hr: serde_json::Map<String, serde_json::Value> = self
            .holding
            .iter()
            .enumerate()
            .map(|(a, v)| (a.to_string(), json!(v)))
            .collect();
        json!({"1": {"hr": hr, "ir": {"0": 7}, "co": {"3": true}, "di": {"2": true}}})
    }
}

/// Every type, the four orders for 32-bit values, scale and offset, and the bit kinds.
fn every_type() -> Device {
    let mut device = Device::new();
    device.value("u16", "ABCD", &0xBEEFu16.to_be_bytes(), "", "48879");
    device.value("i16", "ABCD", &(-1234i16).to_be_bytes(), "", "-1234");
    device.value(
        "i16",
        "BADC",
        &255i16.to_be_bytes(),
        "scale = 0.1\noffset = -0.5",
        "25",
    );
    for order in ["ABCD", "CDAB", "BADC", "DCBA"] {
        device.value(
            "u32",
            order,
            &0xDEAD_BEEFu32.to_be_bytes(),
            "",
            "3735928559",
        );
        device.value(
            "i32",
            order,
            &(-123_456_789i32).to_be_bytes(),
            "",
            "-123456789",
        );
        device.value("f32", order, &25.5f32.to_be_bytes(), "", "25.5");
    }
    for order in ["ABCD", "DCBA"] {
        let u64_bytes = 0x0102_0304_0506_0708u64.to_be_bytes();
        device.value("u64", order, &u64_bytes, "", "72623859790382856");
        let i64_bytes = (-9_000_000_000_123i64).to_be_bytes();
        device.value("i64", order, &i64_bytes, "", "-9000000000123");
        device.value(
            "f64",
            order,
            &(-1234.5678f64).to_be_bytes(),
            "",
            "-1234.5678",
        );
    }
    device.value("bool", "ABCD", &1u16.to_be_bytes(), "", "true");
    device.reads +=
        "[[modbus.read]]\ntopic = \"warehouse/plc/input\"\nkind = \"input\"\naddress = 0\n\n\
        [[modbus.read]]\ntopic = \"warehouse/plc/coil\"\nkind = \"coil\"\naddress = 3\n\n\
        [[modbus.read]]\ntopic = \"warehouse/plc/discrete\"\nkind = \"discrete\"\naddress = 2\n\n";
    device.expected.extend([
        ("warehouse/plc/input".to_owned(), "7".to_owned()),
        ("warehouse/plc/coil".to_owned(), "true".to_owned()),
        ("warehouse/plc/discrete".to_owned(), "true".to_owned()),
    ]);
    device
}

fn tcp_device(name: &str, port: u16, unit: u8, body: &str) -> String {
    format!(
        "[[modbus]]\nname = \"{name}\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\
         unit = {unit}\npoll = \"200ms\"\ntimeout = \"500ms\"\n\n{body}"
    )
}

fn gateway(field: &str) -> Gateway {
    // No cloud is needed: readings only have to reach the local broker.
    Gateway::start(GatewayConfig::new(free_port()).append(field))
}

async fn subscriber(gateway: &Gateway, filter: &str) -> LocalSubscriber {
    LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some((filter, QoS::AtMostOnce)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_order_decodes_to_its_value() {
    let _serial = support::serial().await;
    let device = every_type();
    let server = ModbusServer::tcp(&device.registers());
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    let gateway = gateway(&tcp_device("plc", port, 1, &device.reads));
    let mut dashboard = subscriber(&gateway, "warehouse/plc/#").await;

    let topics: Vec<&str> = device.expected.iter().map(|(t, _)| t.as_str()).collect();
    let seen = latest(&mut dashboard, &topics, Duration::from_secs(10)).await;

    for (topic, expected) in &device.expected {
        assert_eq!(
            seen.get(topic).map(String::as_str),
            Some(expected.as_str()),
            "{topic}; everything seen: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearby_reads_share_one_request() {
    let _serial = support::serial().await;
    let device = every_type();
    let server = ModbusServer::tcp(&device.registers());
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    let gateway = gateway(&tcp_device("plc", port, 1, &device.reads));
    let mut dashboard = subscriber(&gateway, "warehouse/plc/#").await;
    let topics: Vec<&str> = device.expected.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        latest(&mut dashboard, &topics, Duration::from_secs(10))
            .await
            .len(),
        topics.len()
    );

    let holding = server
        .reads()
        .into_iter()
        .filter(|r| r.function == 3)
        .collect::<Vec<_>>();
    let span = device.holding.len() as u16;
    assert!(!holding.is_empty());
    assert!(
        holding.iter().all(|r| r.address == 0 && r.count == span),
        "{} holding reads should be one request of {span} registers per poll: {holding:?}",
        device.expected.len() - 3
    );
    let cycles = holding.len();
    let all = server.reads();
    assert!(
        all.len() <= cycles * 4 + 3,
        "4 requests per poll cycle (holding, input, coil, discrete) expected, got {} in {cycles} cycles",
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_share_one_rtu_line() {
    let _serial = support::serial().await;
    let line = PtyPair::new();
    let registers = json!({"1": {"hr": {"0": 215}}, "2": {"hr": {"0": 42}}});
    let _server = ModbusServer::rtu(&line.peer, 19200, &registers);
    let device = |name: &str, unit: u8, topic: &str| {
        format!(
            "[[modbus]]\nname = \"{name}\"\ntransport = \"rtu\"\ndevice = \"{}\"\nbaud = 19200\n\
             unit = {unit}\npoll = \"200ms\"\ntimeout = \"500ms\"\n\n\
             [[modbus.read]]\ntopic = \"{topic}\"\nkind = \"holding\"\naddress = 0\ntype = \"i16\"\nscale = 0.1\n\n",
            line.device.display()
        )
    };
    let field = device("zone1-climate", 1, "warehouse/zone1/temp")
        + &device("zone2-climate", 2, "warehouse/zone2/temp");
    let gateway = gateway(&field);
    let mut dashboard = subscriber(&gateway, "warehouse/+/temp").await;

    let seen = latest(
        &mut dashboard,
        &["warehouse/zone1/temp", "warehouse/zone2/temp"],
        Duration::from_secs(10),
    )
    .await;

    assert_eq!(
        seen.get("warehouse/zone1/temp").map(String::as_str),
        Some("21.5")
    );
    assert_eq!(
        seen.get("warehouse/zone2/temp").map(String::as_str),
        Some("4.2")
    );
    gateway
        .wait_status(Duration::from_secs(5), "both units online", |s| {
            s["devices"]["modbus/zone1-climate"]["state"] == "online"
                && s["devices"]["modbus/zone2-climate"]["state"] == "online"
        })
        .await;
}

const FAN: &str = "warehouse/zone1/fan/command";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_switches_a_coil_and_its_result_is_published() {
    let _serial = support::serial().await;
    let server = ModbusServer::tcp(&json!({"1": {"co": {"5": false}}}));
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    let body = format!(
        "[[modbus.read]]\ntopic = \"warehouse/zone1/fan/state\"\nkind = \"coil\"\naddress = 5\n\n\
         [[modbus.write]]\ntopic = \"{FAN}\"\nkind = \"coil\"\naddress = 5\n\n"
    );
    let gateway = gateway(&tcp_device("zone1-fan", port, 1, &body));
    let mut dashboard = subscriber(&gateway, "warehouse/zone1/fan/#").await;
    let state = latest(
        &mut dashboard,
        &["warehouse/zone1/fan/state"],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        state.get("warehouse/zone1/fan/state").map(String::as_str),
        Some("false")
    );

    // The downlink publishes a cloud command locally, as this device does.
    publish_all(
        gateway.local_port,
        "operator",
        QoS::AtLeastOnce,
        vec![(FAN.to_owned(), b"ON".to_vec())],
    )
    .await;

    let result = wait_for(
        &mut dashboard,
        &format!("{FAN}/result"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(result.as_deref(), Some("ok"));
    assert_eq!(server.writes(), ["unit=1 fc=5 address=5 values=[True]"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = wait_for(
            &mut dashboard,
            "warehouse/zone1/fan/state",
            Duration::from_secs(5),
        )
        .await;
        if state.as_deref() == Some("true") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the coil does not read back true: {state:?}"
        );
    }

    publish_all(
        gateway.local_port,
        "operator",
        QoS::AtLeastOnce,
        vec![(FAN.to_owned(), b"maybe".to_vec())],
    )
    .await;

    let result = wait_for(
        &mut dashboard,
        &format!("{FAN}/result"),
        Duration::from_secs(5),
    )
    .await;
    let result = result.expect("no result for an unparseable command");
    assert!(
        result.starts_with("error: ") && result.contains("maybe"),
        "{result}"
    );
    assert_eq!(
        server.writes().len(),
        1,
        "an unparseable command must not write"
    );
}

/// The next payload on `topic` within `timeout`, skipping other topics.
async fn wait_for(
    subscriber: &mut LocalSubscriber,
    topic: &str,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = subscriber.recv(left).await?;
        if message.topic == topic {
            return Some(message.payload);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_resumes_when_the_device_comes_back() {
    let _serial = support::serial().await;
    let mut server = ModbusServer::tcp(&json!({"1": {"hr": {"0": 1}}}));
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    let body =
        "[[modbus.read]]\ntopic = \"warehouse/meter/count\"\nkind = \"holding\"\naddress = 0\n\n";
    let gateway = gateway(&tcp_device("meter", port, 1, body));
    let mut dashboard = subscriber(&gateway, "warehouse/meter/#").await;
    assert_eq!(
        wait_for(
            &mut dashboard,
            "warehouse/meter/count",
            Duration::from_secs(10)
        )
        .await
        .as_deref(),
        Some("1")
    );

    server.kill();
    gateway
        .wait_status(Duration::from_secs(10), "the meter unreachable", |s| {
            s["devices"]["modbus/meter"]["state"] == "unreachable"
        })
        .await;
    server.set_registers(&json!({"1": {"hr": {"0": 2}}}));
    server.restart();

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = wait_for(
            &mut dashboard,
            "warehouse/meter/count",
            Duration::from_secs(15),
        )
        .await;
        if value.as_deref() == Some("2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "polling did not resume: last {value:?}"
        );
    }
    let status = gateway
        .wait_status(Duration::from_secs(5), "the meter online again", |s| {
            s["devices"]["modbus/meter"]["state"] == "online"
        })
        .await;
    assert!(status["devices"]["modbus/meter"]["errors"].as_u64() > Some(0));
    assert!(gateway.log().contains("modbus device unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_read_is_counted_and_the_other_values_still_arrive() {
    let _serial = support::serial().await;
    let server = ModbusServer::tcp(&json!({"1": {"hr": {"0": 7}}}));
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    // The server has 4096 registers: address 5000 gets an "illegal data address" exception.
    let body = "[[modbus.read]]\ntopic = \"warehouse/plc/good\"\nkind = \"holding\"\naddress = 0\n\n\
                [[modbus.read]]\ntopic = \"warehouse/plc/bad\"\nkind = \"holding\"\naddress = 5000\n\n\
                [[modbus.write]]\ntopic = \"warehouse/plc/setpoint\"\nkind = \"holding\"\naddress = 5000\n\n";
    let gateway = gateway(&tcp_device("plc", port, 1, body));
    let mut dashboard = subscriber(&gateway, "warehouse/plc/#").await;

    for _ in 0..3 {
        let good = wait_for(&mut dashboard, "warehouse/plc/good", Duration::from_secs(5)).await;
        assert_eq!(good.as_deref(), Some("7"));
    }
    let status = gateway
        .wait_status(Duration::from_secs(5), "the exceptions counted", |s| {
            s["devices"]["modbus/plc"]["exceptions"].as_u64() >= Some(3)
        })
        .await;
    assert_eq!(status["devices"]["modbus/plc"]["state"], "failing");
    assert_eq!(status["devices"]["modbus/plc"]["timeouts"], 0);
    let log = gateway.log();
    assert_eq!(
        log.matches("modbus device failing").count(),
        1,
        "the state change is logged once, not on every poll"
    );
    assert!(
        log.contains("Modbus exception: Illegal data address"),
        "{log}"
    );

    publish_all(
        gateway.local_port,
        "operator",
        QoS::AtLeastOnce,
        vec![("warehouse/plc/setpoint".to_owned(), b"12".to_vec())],
    )
    .await;
    let result = wait_for(
        &mut dashboard,
        "warehouse/plc/setpoint/result",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        result.as_deref(),
        Some("error: Modbus exception: Illegal data address")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_off_at_boot_is_polled_once_it_is_switched_on() {
    let _serial = support::serial().await;
    let port = free_port();
    let body =
        "[[modbus.read]]\ntopic = \"warehouse/meter/count\"\nkind = \"holding\"\naddress = 0\n\n";
    let gateway = gateway(&tcp_device("meter", port, 1, body));
    gateway
        .wait_status(Duration::from_secs(10), "the meter unreachable", |s| {
            s["devices"]["modbus/meter"]["state"] == "unreachable"
        })
        .await;
    let mut dashboard = subscriber(&gateway, "warehouse/meter/#").await;

    let _server = ModbusServer::tcp_on(port, &json!({"1": {"hr": {"0": 99}}}));

    let value = wait_for(
        &mut dashboard,
        "warehouse/meter/count",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(value.as_deref(), Some("99"));
    let errors = gateway.log().matches("modbus device unreachable").count();
    assert_eq!(
        errors, 1,
        "an unreachable device is logged once, not on every retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_goes_ahead_of_the_polls_waiting_on_the_bus() {
    let _serial = support::serial().await;
    let server = ModbusServer::tcp(&json!({"1": {"co": {"5": false}}}));
    let support::Endpoint::Tcp(port) = server.endpoint else {
        unreachable!("a TCP server")
    };
    // 500 reads that cannot share a request: a poll cycle is 500 transactions, far longer
    // than the poll period, so the bus is never idle.
    let mut body = String::new();
    for address in (0..1000).step_by(2) {
        body += &format!(
            "[[modbus.read]]\ntopic = \"warehouse/plc/r{address}\"\nkind = \"holding\"\naddress = {address}\n\n"
        );
    }
    body += &format!("[[modbus.write]]\ntopic = \"{FAN}\"\nkind = \"coil\"\naddress = 5\n\n");
    let device = tcp_device("plc", port, 1, &body)
        .replace("poll = \"200ms\"", "poll = \"10ms\"\nmax_gap = 0");
    let gateway = gateway(&device);
    let mut dashboard = subscriber(&gateway, &format!("{FAN}/result")).await;

    for payload in ["ON", "OFF", "ON"] {
        publish_all(
            gateway.local_port,
            "operator",
            QoS::AtLeastOnce,
            vec![(FAN.to_owned(), payload.as_bytes().to_vec())],
        )
        .await;
        let result = wait_for(
            &mut dashboard,
            &format!("{FAN}/result"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(result.as_deref(), Some("ok"));
    }

    // Where each write landed among the holding reads of the cycle in progress, once the
    // read after the last write is in the server's log.
    let deadline = Instant::now() + Duration::from_secs(5);
    let landed = loop {
        let landed = writes_among_reads(&server.log());
        if landed.iter().all(|(_, after)| after.is_some()) || Instant::now() > deadline {
            break landed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(landed.len(), 3, "three writes expected: {landed:?}");
    let mid_cycle = landed
        .iter()
        .filter(|(before, after)| matches!((before, after), (Some(b), Some(a)) if *a == b + 2))
        .count();
    assert!(
        mid_cycle >= 2,
        "writes must not wait for the end of a poll cycle; (read before, read after) each write: {landed:?}"
    );
}

/// For each write in a server log: the address of the holding read before it and after it.
fn writes_among_reads(log: &str) -> Vec<(Option<u16>, Option<u16>)> {
    let mut previous = None;
    let mut landed: Vec<(Option<u16>, Option<u16>)> = Vec::new();
    for line in log.lines() {
        if line.starts_with("SET ") {
            landed.push((previous, None));
        } else if let Some(address) = line
            .strip_prefix("REQ unit=1 fc=3 address=")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|a| a.parse::<u16>().ok())
        {
            if let Some(last) = landed.last_mut().filter(|l| l.1.is_none()) {
                last.1 = Some(address);
            }
            previous = Some(address);
        }
    }
    landed
}
