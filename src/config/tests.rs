use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
[gateway]
id = "gw-9"

[cloud]
url = "mqtt://127.0.0.1"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_with(
        "test.toml",
        text,
        Some(OsStr::new("/state/bh:/state/other")),
    )
}

/// The problems as printed, one string per line.
fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(config) => panic!("expected problems, got {config:?}"),
        Err(error) => error.to_string().lines().map(str::to_owned).collect(),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

#[test]
fn a_minimal_file_gets_every_default() {
    let expected = Config {
        gateway: GatewayConfig {
            id: "gw-9".into(),
            data_dir: PathBuf::from("/state/bh"),
            metrics_topic: "bridgehead/gw-9/metrics".into(),
            metrics_interval: Duration::from_secs(10),
        },
        local: LocalConfig {
            listen: addr("0.0.0.0:1883"),
            listen_v5: None,
            max_payload: 256 * 1024,
            max_connections: 1000,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: None,
            security: LocalSecurity {
                password_file: None,
                allow_anonymous: true,
                acl_file: None,
                max_subscriptions: 1000,
                tls: None,
            },
            persistence: Persistence {
                max_retained_size: 16 << 20,
                max_queued_messages: 10_000,
                max_queued_bytes: 8 << 20,
            },
        },
        cloud: CloudConfig {
            url: CloudUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1883,
            },
            failover: vec![],
            client_id: "gw-9".into(),
            command_client_id: "gw-9-cmd".into(),
            keep_alive: Duration::from_secs(30),
            max_packet_size: 256 * 1024,
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            status_topic: "fleet/gw-9/status".into(),
            max_inflight: 100,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
        },
        queue: QueueConfig {
            max_size: 1 << 30,
            when_full: WhenFull::DropOldest,
            max_age: Duration::from_secs(7 * 86_400),
            commit_interval: Duration::from_secs(1),
            commit_batch: 1000,
            fsync: true,
            dead_letter_max_size: 16 << 20,
            drain_rate: None,
        },
        uplink: vec![],
        downlink: vec![],
        modbus: vec![],
        serial: vec![],
        rules: vec![],
    };
    assert_eq!(parse(MINIMAL), Ok(expected));
}

#[test]
fn the_contract_example_parses_with_the_gateway_id_substituted() {
    let text = format!(
        r##"{MINIMAL}
client_id = "{{gateway_id}}-telemetry"
status_topic = "fleet/{{gateway_id}}/state"

[local]
listen = "127.0.0.1:1883"
listen_v5 = "[::]:1884"
max_payload = 65536

[queue]
max_size = "10MB"
when_full = "reject-new"
synchronous = "normal"
commit_interval = "1ms"

[[uplink]]
topic = "warehouse/#"
remote_prefix = "fleet/{{gateway_id}}/"
qos = 1

[[uplink]]
topic = "dock/+/door"
qos = 0
drain = "live-first"

[[downlink]]
topic = "#"
remote_prefix = "fleet/{{gateway_id}}/cmd/"
local_prefix = "cmd/"
"##
    );
    let config = parse(&text).expect("valid config");
    assert_eq!(config.cloud.client_id, "gw-9-telemetry");
    assert_eq!(config.cloud.command_client_id, "gw-9-telemetry-cmd");
    assert_eq!(config.cloud.status_topic, "fleet/gw-9/state");
    assert_eq!(config.local.listen_v5, Some(addr("[::]:1884")));
    assert_eq!(config.local.max_payload, 65536);
    assert_eq!(config.queue.max_size, 10_000_000);
    assert_eq!(config.queue.when_full, WhenFull::RejectNew);
    assert!(!config.queue.fsync);
    assert_eq!(
        config.uplink,
        [
            UplinkRule {
                topic: "warehouse/#".into(),
                remote_prefix: "fleet/gw-9/".into(),
                qos: Qos::AtLeastOnce,
                drain: Lane::Strict,
            },
            UplinkRule {
                topic: "dock/+/door".into(),
                remote_prefix: "".into(),
                qos: Qos::AtMostOnce,
                drain: Lane::LiveFirst,
            },
        ]
    );
    assert_eq!(
        config.downlink,
        [DownlinkRule {
            topic: "#".into(),
            remote_prefix: "fleet/gw-9/cmd/".into(),
            local_prefix: "cmd/".into(),
            qos: Qos::AtLeastOnce,
        }]
    );
}

#[test]
fn every_problem_is_reported_with_line_and_key() {
    let text = r#"[gateway]
id = "gw 1"
metrics_interval = 10

[local]
listen = "localhost:1883"
max_connections = 0

[cloud]
url = "tcp://broker:1883"
keep_alive = "2s"
reconnect_min = "10s"
reconnect_max = "5s"
max_inflight = 70000
command_client_id = "same"
client_id = "same"
[queue]
max_size = "1 gigabyte"
when_full = "drop-newest"
commit_interval = "1m"
synchronous = "off"

[[uplink]]
remote_prefix = "up/+/"
qos = 2

[[downlink]]
topic = "a/#/b"
qos = 5
"#;
    let id_why = "contains whitespace or a control character; the id is used in topics and client ids, so it may not";
    assert_eq!(
        problems(text),
        [
            format!(r#"test.toml:2: gateway.id: "gw 1" {id_why}"#),
            r#"test.toml:3: gateway.metrics_interval: 10 has no unit; write a duration like "500ms", "30s", "5m", "2h" or "7d""#.into(),
            r#"test.toml:6: local.listen: "localhost:1883" is not an IP address and port like "0.0.0.0:1883" or "[::]:1883""#.into(),
            "test.toml:7: local.max_connections: 0 is out of range; accepted: 1 to 1000000".into(),
            r#"test.toml:10: cloud.url: "tcp://broker:1883" is not an MQTT URL; accepted: mqtt://host[:port] (plain TCP, default port 1883) or mqtts://host[:port] (TLS, default port 8883)"#.into(),
            r#"test.toml:11: cloud.keep_alive: "2s" is out of range; accepted: 5s to 18h 12m 15s"#.into(),
            r#"test.toml:13: cloud.reconnect_max: "5s" is out of range; accepted: at least 10s"#.into(),
            "test.toml:14: cloud.max_inflight: 70000 is out of range; accepted: 1 to 65535".into(),
            r#"test.toml:15: cloud.command_client_id: "same" is also cloud.client_id; the command connection needs a client id of its own"#.into(),
            r#"test.toml:18: queue.max_size: "1 gigabyte" is not a size like "64KiB", "256KiB", "1GiB", "10MB", or a number of bytes"#.into(),
            r#"test.toml:19: queue.when_full: "drop-newest" is not one of drop-oldest, reject-new"#.into(),
            r#"test.toml:20: queue.commit_interval: "1m" is out of range; accepted: 1ms to 10s"#.into(),
            r#"test.toml:21: queue.synchronous: "off" is not one of full, normal"#.into(),
            r#"test.toml:23: uplink[1].topic: missing; every rule needs a topic filter, like topic = "warehouse/#""#.into(),
            r#"test.toml:24: uplink[1].remote_prefix: "up/+/" contains '+', '#' or NUL; a prefix is plain topic text"#.into(),
            "test.toml:25: uplink[1].qos: 2 is not accepted: QoS 2 is not supported upstream: delivery to the cloud is at-least-once from the durable outbox (a message may be resent after a reconnect); accepted: 0 or 1".into(),
            r#"test.toml:28: downlink[1].topic: "a/#/b" is not a topic filter: it '#' is allowed only as the last level"#.into(),
            "test.toml:29: downlink[1].qos: 5 is not a QoS level; accepted: 0 or 1".into(),
        ]
    );
}

#[test]
fn max_keep_alive_is_seconds_up_to_mqtts_limit() {
    let with = |value: &str| {
        format!("[gateway]\nid = \"g\"\n[local]\nmax_keep_alive = {value}\n[cloud]\nurl = \"mqtt://127.0.0.1:1883\"\n")
    };
    assert_eq!(
        parse(&with("\"90s\"")).map(|c| c.local.max_keep_alive),
        Ok(Some(90))
    );
    assert_eq!(
        problems(&with("\"19h\"")),
        [
            r#"test.toml:4: local.max_keep_alive: "19h" is out of range; accepted: 1s to 18h 12m 15s"#
        ]
    );
}

#[test]
fn drain_rate_is_off_unless_set_and_at_least_one() {
    let with = |value: &str| {
        format!(
            "[gateway]\nid = \"g\"\n[cloud]\nurl = \"mqtt://127.0.0.1:1883\"\n[queue]\n{value}\n"
        )
    };
    assert_eq!(parse(&with("")).map(|c| c.queue.drain_rate), Ok(None));
    assert_eq!(
        parse(&with("drain_rate = 500")).map(|c| c.queue.drain_rate),
        Ok(Some(500))
    );
    assert_eq!(
        problems(&with("drain_rate = 0")),
        ["test.toml:6: queue.drain_rate: 0 is out of range; accepted: 1 to 1000000"]
    );
}

#[test]
fn missing_required_keys_point_at_their_table_or_line_one() {
    assert_eq!(
        problems("# nothing here\n\n[cloud]\nkeep_alive = \"30s\"\n"),
        [
            r#"test.toml:1: gateway.id: missing; every gateway needs a unique id, like id = "gw-001""#,
            r#"test.toml:3: cloud.url: missing; name the cloud broker, like url = "mqtts://iot.example.com:8883""#,
        ]
    );
}

#[test]
fn unknown_keys_are_all_reported_with_what_is_accepted() {
    let text = format!("{MINIMAL}urll = \"x\"\n[[uplink]]\ntopic = \"a\"\nprefix = \"b\"\n\n[[bacnet]]\nname = \"m\"\n");
    assert_eq!(
        problems(&text),
        [
            "test.toml:7: cloud.urll: unknown key; the keys accepted here are url, client_id, command_client_id, keep_alive, max_packet_size, ca_file, cert_file, key_file, username, password_file, status_topic, max_inflight, reconnect_min, reconnect_max",
            "test.toml:10: uplink[1].prefix: unknown key; the keys accepted here are topic, remote_prefix, qos, drain",
            "test.toml:12: bacnet: unknown key; the keys accepted here are gateway, local, cloud, queue, uplink, downlink, modbus, serial, rule",
        ]
    );
}

#[test]
fn a_wrong_toml_type_is_reported_with_the_unknown_keys_seen() {
    let text = format!(
        "{MINIMAL}bogus = 1\n[[uplink]]\ntopic = \"a\"\n[[uplink]]\ntopic = \"b\"\nqos = \"1\"\n"
    );
    assert_eq!(
        problems(&text),
        [
            "test.toml:7: cloud.bogus: unknown key; the keys accepted here are url, client_id, command_client_id, keep_alive, max_packet_size, ca_file, cert_file, key_file, username, password_file, status_topic, max_inflight, reconnect_min, reconnect_max",
            r#"test.toml:12: uplink[2].qos: invalid type: string "1", expected an integer"#,
        ]
    );
}

#[test]
fn a_syntax_error_names_line_and_column() {
    assert_eq!(
        problems("[gateway]\nid = \"gw\"\nlisten = 0.0.0.0:1883\n"),
        ["test.toml:3: not valid TOML at column 13: expected newline, `#`"]
    );
}

#[test]
fn a_loop_between_uplink_and_downlink_names_both_rules() {
    let text = format!(
        r##"{MINIMAL}
[[uplink]]
topic = "warehouse/#"
remote_prefix = "fleet/{{gateway_id}}/"

[[uplink]]
topic = "cmd/#"
remote_prefix = "fleet/{{gateway_id}}/"

[[downlink]]
topic = "#"
remote_prefix = "fleet/{{gateway_id}}/cmd/"

[[downlink]]
topic = "+/status"
remote_prefix = "fleet/"
"##
    );
    assert_eq!(
        problems(&text),
        [
            r#"test.toml:13: uplink[2].topic: the cloud topics of this rule, "fleet/gw-9/cmd/#" (remote_prefix + topic), can match downlink[1]'s cloud subscription "fleet/gw-9/cmd/#" (line 17): a message sent up would come back down as a command and be sent up again; change a remote_prefix or narrow a topic"#,
            r#"test.toml:21: downlink[2].topic: the cloud subscription "fleet/+/status" matches cloud.status_topic "fleet/gw-9/status": the gateway's own online/offline messages would arrive as commands"#,
        ]
    );
}

#[test]
fn a_downlink_subscription_must_be_a_valid_filter_once_prefixed() {
    let text = format!("{MINIMAL}\n[[downlink]]\ntopic = \"#\"\nremote_prefix = \"cmd\"\n");
    assert_eq!(
        problems(&text),
        [
            r#"test.toml:9: downlink[1].topic: the cloud subscription "cmd#" (remote_prefix + topic) level "cmd#" mixes a wildcard with other characters; '+' and '#' must stand alone between '/'; end remote_prefix with '/' or start topic with one"#
        ]
    );
}

#[test]
fn tls_files_must_exist_hold_pem_and_need_mqtts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("test certificate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let garbage = dir.path().join("garbage.pem");
    let missing = dir.path().join("missing.pem");
    std::fs::write(&cert, generated.cert.pem()).expect("write cert");
    std::fs::write(&key, generated.key_pair.serialize_pem()).expect("write key");
    std::fs::write(&garbage, "not a certificate\n").expect("write garbage");

    let tls = |extra: &str| {
        format!("[gateway]\nid = \"gw\"\n[cloud]\nurl = \"mqtts://localhost\"\n{extra}")
    };
    let good = tls(&format!("ca_file = {cert:?}\ncert_file = {cert:?}\nkey_file = {key:?}\nusername = \"u\"\npassword_file = {key:?}\n"));
    let config = parse(&good).expect("valid TLS config");
    assert_eq!(config.cloud.ca_file, Some(cert.clone()));
    assert_eq!(config.cloud.key_file, Some(key.clone()));
    assert_eq!(config.cloud.password_file, Some(key.clone()));

    let bad = tls(&format!(
        "ca_file = {garbage:?}\ncert_file = {key:?}\npassword_file = {missing:?}\n"
    ));
    assert_eq!(
        problems(&bad),
        [
            format!("test.toml:5: cloud.ca_file: {garbage:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
            format!("test.toml:6: cloud.cert_file: {key:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
            "test.toml:6: cloud.cert_file: set alone; a client certificate needs its private key: set both cert_file and key_file, or neither".into(),
            "test.toml:7: cloud.password_file: set without cloud.username; MQTT sends a password only with a user name".into(),
            format!("test.toml:7: cloud.password_file: cannot read {missing:?}: No such file or directory (os error 2)"),
        ]
    );

    let plain = format!("{MINIMAL}ca_file = {cert:?}\n");
    assert_eq!(
        problems(&plain),
        ["test.toml:7: cloud.ca_file: has no effect with a plain mqtt:// cloud.url; use mqtts:// for TLS, or remove ca_file"]
    );
}

#[test]
fn an_unreadable_file_is_named() {
    let error =
        load(std::path::Path::new("/nonexistent/bridgehead.toml")).expect_err("no such file");
    assert_eq!(
        error.to_string(),
        "/nonexistent/bridgehead.toml: cannot read the config file: No such file or directory (os error 2)"
    );
    assert_eq!(error.problems[0].line, None);
}

/// The shipped file is the manual: every default it shows must be the real one.
#[test]
fn the_shipped_file_is_valid_and_shows_the_real_defaults() {
    let shipped = include_str!("../../config/bridgehead.toml");
    let examples = [
        "data_dir",
        "listen_v5",
        "max_keep_alive",
        "drain_rate",
        "ca_file",
        "cert_file",
        "key_file",
        "username",
        "password_file",
        "acl_file",
        "tls_listen",
        "require_certificate",
        "use_identity_as_username",
    ];
    let mut uncommented_keys = 0;
    let with_defaults: String = shipped
        .lines()
        .map(|line| {
            let setting = line.strip_prefix("# ").filter(|rest| {
                let key = rest.split(" = ").next().unwrap_or_default();
                rest.contains(" = ")
                    && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    && !examples.contains(&key)
            });
            uncommented_keys += usize::from(setting.is_some());
            format!("{}\n", setting.unwrap_or(line))
        })
        .collect();
    assert_eq!(uncommented_keys, 27);
    let config = parse(shipped).expect("the shipped config is valid");
    assert_eq!(parse(&with_defaults), Ok(config));
}

const FIELD: &str = r#"
[[modbus]]
name = "zone1-climate"
transport = "rtu"
device = "/dev/ttyUSB0"
baud = 19200
parity = "even"
unit = 3
poll = "2s"

  [[modbus.read]]
  topic = "warehouse/{gateway_id}/temp"
  kind = "holding"
  address = 10
  type = "f32"
  word_order = "little"
  scale = 0.1
  offset = -40
  payload = "json"
  on_change = true
  deadband = 0.5
  heartbeat = "1m"

  [[modbus.write]]
  topic = "warehouse/zone1/fan/command"
  kind = "coil"
  address = 5

[[modbus]]
name = "meter"
transport = "tcp"
address = "meter.local:502"

  [[modbus.read]]
  topic = "warehouse/meter/on"
  kind = "coil"
  address = 0

[[serial]]
name = "zone2-probe"
device = "/dev/ttyACM0"
format = "kv"
topic = "warehouse/zone2/{key}"
command_topic = "warehouse/zone2/probe/command"
"#;

#[test]
fn field_devices_are_read_with_their_defaults() {
    let config = parse(&format!("{MINIMAL}{FIELD}")).expect("a valid field config");
    let climate = &config.modbus[0];
    assert_eq!(
        climate.transport,
        Transport::Rtu(SerialLine {
            device: "/dev/ttyUSB0".into(),
            baud: 19200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
        })
    );
    assert_eq!(
        (climate.unit, climate.poll, climate.timeout),
        (3, Duration::from_secs(2), Duration::from_millis(500))
    );
    assert_eq!(
        climate.reads[0],
        ModbusRead {
            topic: "warehouse/gw-9/temp".into(),
            kind: RegisterKind::Holding,
            address: 10,
            layout: Layout {
                value_type: ValueType::F32,
                byte_order: Order::Big,
                word_order: Order::Little,
            },
            scale: 0.1,
            offset: -40.0,
            payload: PayloadFormat::Json,
            on_change: Some(OnChange {
                deadband: 0.5,
                heartbeat: Some(Duration::from_secs(60)),
            }),
        }
    );
    assert_eq!(climate.max_gap, 16);
    assert_eq!(climate.writes[0].kind, WriteKind::Coil);
    assert_eq!(climate.writes[0].layout.value_type, ValueType::Bool);
    let meter = &config.modbus[1];
    assert_eq!(meter.transport, Transport::Tcp("meter.local:502".into()));
    assert_eq!(meter.reads[0].layout.value_type, ValueType::Bool);
    assert_eq!(meter.unit, 1);
    let probe = &config.serial[0];
    assert_eq!(
        (probe.line.baud, probe.format, probe.max_line),
        (115_200, LineFormat::Kv, 1024)
    );
    assert_eq!(
        probe.command_topic.as_deref(),
        Some("warehouse/zone2/probe/command")
    );
}

#[test]
fn field_problems_name_their_line_and_key() {
    let text = format!(
        "{MINIMAL}\n[[modbus]]\nname = \"a\"\ntransport = \"rtu\"\ndevice = \"/dev/ttyUSB0\"\n\
         address = \"1.2.3.4:502\"\n\
         [[modbus.read]]\ntopic = \"t/#\"\nkind = \"coil\"\naddress = 70000\ntype = \"f32\"\n\
         [[modbus.read]]\ntopic = \"t/x\"\nkind = \"register\"\naddress = 0\nword_order = \"middle\"\n\
         [[modbus]]\nname = \"a\"\ntransport = \"rtu\"\ndevice = \"/dev/ttyUSB0\"\nbaud = 19200\n\
         [[modbus.write]]\ntopic = \"w\"\nkind = \"holding\"\naddress = 1\nscale = 0\n\
         [[modbus]]\nname = \"t\"\ntransport = \"tcp\"\naddress = \"nohost\"\n\
         [[serial]]\nname = \"s\"\ndevice = \"/dev/ttyUSB0\"\nformat = \"kv\"\ntopic = \"s/all\"\n"
    );
    assert_eq!(
        problems(&text),
        [
            r#"test.toml:12: modbus[1].address: is for transport = "tcp"; an RTU device is reached through device (its serial port)"#,
            r#"test.toml:14: modbus[1].read[1].topic: "t/#" is not a topic to publish to: it contains a wildcard ('+' or '#'), which only filters may use"#,
            "test.toml:16: modbus[1].read[1].address: 70000 is out of range; accepted: 0 to 65534",
            "test.toml:17: modbus[1].read[1].type: a coil is one bit: its type is bool",
            r#"test.toml:20: modbus[1].read[2].kind: "register" is not one of holding, input, coil, discrete"#,
            r#"test.toml:22: modbus[1].read[2].word_order: "middle" is not one of big, little"#,
            "test.toml:23: modbus[2].unit: unit 1 on /dev/ttyUSB0 is also another [[modbus]] device's; give each device on a bus its own unit id",
            r#"test.toml:24: modbus[2].name: "a" names another [[modbus]] device too; names must be unique"#,
            "test.toml:27: modbus[2].baud: /dev/ttyUSB0 is shared with another [[modbus]] device with other serial settings (baud, parity, data_bits, stop_bits); devices on one line must agree",
            "test.toml:32: modbus[2].write[1].scale: is 0; register value = command / scale",
            "test.toml:33: modbus[3].read: no [[modbus.read]] or [[modbus.write]] under this device; it would do nothing",
            r#"test.toml:36: modbus[3].address: "nohost" is not a host and port like "192.168.1.50:502""#,
            "test.toml:39: serial[1].device: /dev/ttyUSB0 is already used by another [[serial]] or [[modbus]] entry; a port has one owner",
            "test.toml:41: serial[1].topic: has no {key}: every key of a line would go to the same topic; add {key} where the key's name goes",
        ]
    );
}

#[test]
fn the_shipped_field_examples_are_valid_once_uncommented() {
    let shipped = include_str!("../../config/bridgehead.toml");
    let start = shipped
        .find("#  [[modbus]]")
        .expect("the shipped config documents [[modbus]]");
    let examples: String = shipped[start..]
        .lines()
        .filter(|line| !line.starts_with("#  # "))
        // Example lines are indented ("#  name = ..."); other comments are prose.
        .map(|line| match line.starts_with("#  ") {
            true => &line[2..],
            false => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let config =
        parse(&format!("{MINIMAL}{examples}")).unwrap_or_else(|e| panic!("{e}\n{examples}"));
    assert_eq!(config.modbus.len(), 1);
    assert_eq!(config.modbus[0].reads.len(), 1);
    assert_eq!(config.modbus[0].writes.len(), 1);
    assert_eq!(config.serial.len(), 1);
    assert_eq!(config.rules.len(), 1);
}

#[test]
fn device_security_files_are_checked_line_by_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let passwd = dir.path().join("passwd");
    let acl = dir.path().join("acl");
    std::fs::write(&passwd, "# users\nalice:plaintext\n").expect("write passwd");
    std::fs::write(&acl, "user alice\ntopic reed warehouse/#\n").expect("write acl");
    let text = format!(
        "{MINIMAL}[local]\npassword_file = {passwd:?}\nacl_file = {acl:?}\nmax_subscriptions = 0\n"
    );
    let passwd_why = "line 2: the hash of \"alice\" is not a mosquitto_passwd hash ($6$... or $7$...); plain-text passwords are not accepted: run mosquitto_passwd -U on the file";
    assert_eq!(
        problems(&text),
        [
            format!("test.toml:8: local.password_file: {} {passwd_why}", passwd.display()),
            format!("test.toml:9: local.acl_file: {} line 2: \"reed\" is not an access type; use read, write, readwrite or deny", acl.display()),
            "test.toml:10: local.max_subscriptions: 0 is out of range; accepted: 1 to 1000000".into(),
        ]
    );

    std::fs::write(&passwd, "bob:$7$101$X9iqBpnGtsPiiO4D$yg5DjApOdMvQ7Y4+mf7oToo015X4uSnZSPfUmbYX7HL7ps7uoz9FsFFCobiuKLMVUnptbwW31+JOIRCHEFVakA==\n").expect("write passwd");
    std::fs::write(&acl, "user bob\ntopic readwrite warehouse/#\n").expect("write acl");
    let config = parse(&text.replace("max_subscriptions = 0", "")).expect("valid");
    let security = config.local.security;
    assert_eq!(security.password_file, Some(passwd.clone()));
    assert!(
        !security.allow_anonymous,
        "a password file turns anonymous clients away by default"
    );
    assert_eq!(security.acl_file, Some(acl));
}

#[test]
fn device_tls_needs_its_files_and_consistent_options() {
    let dir = tempfile::tempdir().expect("temp dir");
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("test certificate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).expect("write cert");
    std::fs::write(&key, generated.key_pair.serialize_pem()).expect("write key");

    let good = format!("{MINIMAL}[local]\ntls_listen = \"0.0.0.0:8883\"\ncert_file = {cert:?}\nkey_file = {key:?}\nca_file = {cert:?}\nrequire_certificate = true\nuse_identity_as_username = true\n");
    let tls = parse(&good)
        .expect("valid")
        .local
        .security
        .tls
        .expect("a TLS listener");
    assert_eq!(
        (
            tls.listen,
            tls.require_certificate,
            tls.use_identity_as_username
        ),
        (addr("0.0.0.0:8883"), true, true)
    );

    let bad = format!("{MINIMAL}[local]\nlisten = \"0.0.0.0:1883\"\ntls_listen = \"127.0.0.1:1883\"\nrequire_certificate = true\nuse_identity_as_username = true\n");
    assert_eq!(
        problems(&bad),
        [
            "test.toml:7: local.cert_file: missing; local.tls_listen needs the gateway's cert_file (PEM)".to_string(),
            "test.toml:7: local.key_file: missing; local.tls_listen needs the gateway's key_file (PEM)".into(),
            "test.toml:9: local.tls_listen: 127.0.0.1:1883 collides with local.listen 0.0.0.0:1883; TLS needs a port of its own".into(),
            "test.toml:10: local.require_certificate: needs local.ca_file, the CA that client certificates must chain to".into(),
        ]
    );

    let stray = format!("{MINIMAL}[local]\ncert_file = {cert:?}\n");
    assert_eq!(
        problems(&stray),
        ["test.toml:8: local.cert_file: has no effect without local.tls_listen; set tls_listen for a TLS listener, or remove this key"]
    );
}

#[test]
fn the_cloud_url_may_list_failover_nodes() {
    let text = MINIMAL.replace(
        "url = \"mqtt://127.0.0.1\"",
        "url = [\"mqtt://a.example.com\", \"mqtt://b.example.com:1884\"]",
    );
    let cloud = parse(&text).expect("valid").cloud;
    assert_eq!(cloud.url.host, "a.example.com");
    assert_eq!(cloud.failover.len(), 1);
    assert_eq!(cloud.failover[0].to_string(), "mqtt://b.example.com:1884");
    let mixed = MINIMAL.replace(
        "url = \"mqtt://127.0.0.1\"",
        "url = [\"mqtt://a\", \"mqtts://b\"]",
    );
    assert_eq!(
        problems(&mixed),
        ["test.toml:6: cloud.url: mixes mqtt:// and mqtts://; all nodes of the list must use the same scheme"]
    );
}

#[test]
fn status_finds_the_packaged_gateway_from_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    let (local, packaged) = (dir.path().join("local"), dir.path().join("packaged"));
    std::fs::create_dir_all(&packaged).unwrap();
    let config = dir.path().join("bridgehead.toml");
    std::fs::write(&config, MINIMAL).unwrap();
    let dirs = [local.as_path(), packaged.as_path()];
    // Nothing anywhere: the shell's default.
    assert_eq!(data_dir_from(&config, None, dirs), local);
    // The unit's gateway left its files: that is the one asked.
    std::fs::write(packaged.join("status.json"), "{}").unwrap();
    assert_eq!(data_dir_from(&config, None, dirs), packaged);
    // A gateway run from this directory wins.
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("outbox.db"), "").unwrap();
    assert_eq!(data_dir_from(&config, None, dirs), local);
    // Under systemd, and a file that names its directory, no guessing.
    let state = OsStr::new("/var/lib/elsewhere");
    assert_eq!(
        data_dir_from(&config, Some(state), dirs),
        PathBuf::from("/var/lib/elsewhere")
    );
    let named = dir.path().join("named.toml");
    std::fs::write(
        &named,
        "[gateway]\nid = \"gw-9\"\ndata_dir = \"/srv/bh\"\n[cloud]\nurl = \"mqtt://127.0.0.1\"\n",
    )
    .unwrap();
    assert_eq!(
        data_dir_from(&named, Some(state), dirs),
        PathBuf::from("/srv/bh")
    );
}
