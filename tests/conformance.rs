//! The local broker against the MQTT specifications: one test per normative statement a
//! broker with default settings implements, for MQTT 3.1.1 (OASIS, 29 October 2014) and
//! MQTT 5.0 (OASIS, 7 March 2019), and MQTT 3.1 (protocol name "MQIsdp", level 3) where it
//! differs. Each test is named after its statement (`mqtt_3_1_2_24_...` for [MQTT-3.1.2-24];
//! `sec_3_3_2_3_4_...` for a rule of section 3.3.2.3.4 that has no number) and ends in the
//! protocol version it speaks (`_v31`, `_v311`, `_v5`); statement numbers are those of that
//! version's specification. Packets are built and read by `support::wire`, a codec of its
//! own, so the broker is checked and not the gateway's codec against itself.
//!
//! Where the specification allows alternatives (MAY, SHOULD), every allowed behaviour
//! passes. A broker that closes a connection for a protocol error or a malformed packet must
//! keep serving everybody else: those tests end by checking that an already-connected
//! client still gets a message published by a third one.
//!
//! The broker under test is started once per test binary:
//! - by default the bridgehead gateway (with a mosquitto as its cloud); every topic here is
//!   outside `warehouse/`, so nothing goes up;
//! - with `CONFORMANCE_BROKER=mosquitto`, a mosquitto 2.0 with its default settings plus one
//!   anonymous listener on 127.0.0.1, the reference the suite is validated against.
//!
//! mosquitto 2.0.11 (Debian 12) fails the tests whose doc comment says "mosquitto 2.0.11
//! deviates": each is a MUST (or, for retained messages on a Shared Subscription, a plain
//! rule of the text) that it does not keep. Those tests accept only the specified
//! behaviour, so that the gateway's broker is held to the specification, not to mosquitto.
//!
//! `cargo test --profile ci --test conformance -- --test-threads 1`

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use support::wire::{
    binary, disconnect, options, prop, puback, pubrec, pubrel, string, subscribe, unsubscribe,
    varint, with_header, Client, Connect, Packet, Prop, Publish, Recv, Will, PINGREQ, QUIET, V31,
    V311, V5, WAIT,
};
use support::{accepts, free_port, GatewayConfig};
use tokio::time::{sleep, Instant};

// ---------------------------------------------------------------------------------------
// The broker under test

enum Process {
    Mosquitto {
        child: Child,
        conf: PathBuf,
        log: PathBuf,
    },
    /// Boxed: a gateway and its cloud are much larger than a mosquitto child.
    Gateway(Box<(support::Mosquitto, support::Gateway)>),
}

struct Target {
    port: u16,
    process: Process,
}

static TARGET: Mutex<Option<Target>> = Mutex::new(None);

/// The port of the broker under test: started on first use, and started again (with a note
/// on stderr) if an earlier test made it exit, so that one crash fails one test, not all.
fn broker() -> u16 {
    let mut target = TARGET.lock().unwrap_or_else(|e| e.into_inner());
    match target.as_mut() {
        None => *target = Some(Target::start()),
        Some(t) => t.revive(),
    }
    target.as_ref().expect("started above").port
}

impl Target {
    fn start() -> Target {
        match std::env::var("CONFORMANCE_BROKER").as_deref() {
            Ok("mosquitto") => Target::mosquitto(),
            Ok("") | Err(_) => Target::gateway(),
            Ok(other) => panic!("CONFORMANCE_BROKER={other}: expected `mosquitto` or nothing"),
        }
    }

    /// mosquitto 2.0 with its defaults, plus what a test needs to reach it.
    fn mosquitto() -> Target {
        let dir = tempfile::tempdir()
            .expect("a directory for mosquitto")
            .keep();
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .expect("writing mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let child = spawn_mosquitto(&conf, &log);
        watch(child.id(), &conf, Some(&dir));
        wait_accepting(port, &log);
        Target {
            port,
            process: Process::Mosquitto { child, conf, log },
        }
    }

    /// The gateway binary with the test suite's default config and a mosquitto cloud.
    fn gateway() -> Target {
        let cloud = support::Mosquitto::start();
        let cloud_dir = cloud
            .log_path()
            .parent()
            .expect("mosquitto's dir")
            .to_path_buf();
        let cloud_conf = cloud_dir.join("mosquitto.conf");
        if let Some(pid) = pid_of_child_with_arg(&cloud_conf) {
            watch(pid, &cloud_conf, Some(&cloud_dir));
        }
        let config = GatewayConfig::new(cloud.port);
        let port = config.local_port;
        let dir = config.dir();
        let mut gateway = config.start();
        let pid = gateway.pid().expect("the gateway runs");
        watch(pid, &gateway.config_path, Some(&dir));
        gateway.wait_ready();
        Target {
            port,
            process: Process::Gateway(Box::new((cloud, gateway))),
        }
    }

    fn revive(&mut self) {
        match &mut self.process {
            Process::Mosquitto { child, conf, log } => {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!(
                        "conformance: mosquitto exited ({status}) in an earlier test; restarting"
                    );
                    *child = spawn_mosquitto(conf, log);
                    watch(child.id(), conf, None);
                    wait_accepting(self.port, log);
                }
            }
            Process::Gateway(peers) => {
                let gateway = &mut peers.1;
                if let Some(status) = gateway.try_exit() {
                    eprintln!(
                        "conformance: the gateway exited ({status}) in an earlier test; restarting"
                    );
                    gateway.wait_exit(Duration::ZERO);
                    gateway.start_again();
                    let pid = gateway.pid().expect("the gateway runs again");
                    watch(pid, &gateway.config_path, None);
                }
            }
        }
    }
}

fn spawn_mosquitto(conf: &Path, log: &Path) -> Child {
    let log = fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("mosquitto log file");
    Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file handle"))
        .stderr(log)
        .spawn()
        .expect("starting mosquitto (apt-get install mosquitto)")
}

fn wait_accepting(port: u16, log: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !accepts(port) {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto does not accept on 127.0.0.1:{port}:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The broker lives in a static that is never dropped: a small shell process kills it (and
/// removes its directory) once this test process is gone, however it ended. mosquitto
/// changes its user at start, which would clear a PR_SET_PDEATHSIG. The process is killed
/// only if its command line still has `marker` (its config file), so a reused pid is safe.
#[allow(clippy::zombie_processes)] // the watcher outlives this process; init reaps it
fn watch(pid: u32, marker: &Path, dir: Option<&Path>) {
    let me = std::process::id();
    let cleanup = dir
        .map(|d| format!("; rm -rf '{}'", d.display()))
        .unwrap_or_default();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.2; done; \
         tr '\\0' '\\n' < /proc/{pid}/cmdline 2>/dev/null | grep -qxF '{}' && kill -9 {pid}{cleanup}",
        marker.display()
    );
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("starting the cleanup watcher");
}

/// The id of this process's child whose command line has `arg` (the cloud mosquitto, whose
/// handle does not expose its pid).
fn pid_of_child_with_arg(arg: &Path) -> Option<u32> {
    let me = std::process::id().to_string();
    let arg = arg.display().to_string();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
        let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        let has_arg = cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes());
        (ppid == me && has_arg).then_some(pid)
    })
}

// ---------------------------------------------------------------------------------------
// Names, clients and checks shared by the tests

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A client identifier unique to this run, 1 to 23 alphanumeric characters as
/// [MQTT-3.1.3-5] requires every server to accept.
fn cid(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    format!("c{n:04}{tag}")
}

/// A topic unique to this run, outside the gateway's `warehouse/` uplink rule.
fn topic(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("conf/{}/{n}/{tag}", std::process::id())
}

async fn connect(version: u8, tag: &str) -> Client {
    Client::connect(broker(), version, &cid(tag)).await
}

async fn connect_with(c: &Connect) -> (Client, bool, support::wire::Props) {
    Client::connect_with(broker(), c).await
}

/// A client subscribed to `filter` at `qos`.
async fn subscriber(version: u8, filter: &str, qos: u8) -> Client {
    let mut c = connect(version, "sub").await;
    c.subscribe(filter, qos).await;
    c
}

/// Publishes one message from a fresh client, completing its QoS flow.
async fn publish_once(version: u8, p: Publish) -> u8 {
    let mut c = connect(version, "pub").await;
    let reason = c.publish(p).await;
    c.disconnect().await;
    reason
}

/// A client already connected and subscribed before a misbehaving client shows up; at the
/// end a third client publishes and the witness must still get the message.
struct Witness {
    observer: Client,
    topic: String,
}

impl Witness {
    async fn new() -> Witness {
        let topic = topic("witness");
        let observer = subscriber(V311, &topic, 1).await;
        Witness { observer, topic }
    }

    async fn check(mut self, case: &str) {
        let payload = format!("still serving after: {case}");
        let mut third = Client::connect(broker(), V311, &cid("third")).await;
        third
            .publish(Publish::new(&self.topic, payload.as_bytes()).qos(1, 1))
            .await;
        let got = self.observer.receive_on(&self.topic).await;
        assert_eq!(got.payload_str(), payload, "the witness's message");
        third.disconnect().await;
        self.observer.disconnect().await;
    }
}

/// What the broker may send on a connection it closes for a protocol error or malformed
/// packet: in MQTT 5 a CONNACK (for an error in the CONNECT) or a DISCONNECT (otherwise)
/// whose reason code is one of `reasons`; in MQTT 3.1 and 3.1.1 nothing, or only the
/// packets named in `tolerate` (answers to packets sent before the bad one).
fn check_goodbye(version: u8, case: &str, before: &[Packet], reasons: &[u8], tolerate: &[&str]) {
    for p in before {
        if tolerate.contains(&p.name()) {
            continue;
        }
        match p {
            Packet::Connack {
                code,
                session_present,
                ..
            } if version == V5 && reasons.contains(code) => {
                assert!(
                    !session_present,
                    "{case}: a refusing CONNACK has Session Present 0 [MQTT-3.2.2-6]"
                );
            }
            Packet::Disconnect { reason, props } if version == V5 && reasons.contains(reason) => {
                assert!(
                    !props.has(prop::SESSION_EXPIRY_INTERVAL),
                    "{case}: the Session Expiry Interval MUST NOT be sent on a DISCONNECT by the Server [MQTT-3.14.2-2]"
                );
            }
            other => panic!(
                "{case}: before closing the connection the broker sent {other:?}; allowed: {} \
                 with a reason code in {reasons:02X?}{}",
                if version == V5 {
                    "CONNACK/DISCONNECT"
                } else {
                    "nothing"
                },
                if tolerate.is_empty() {
                    String::new()
                } else {
                    format!(", or {tolerate:?}")
                }
            ),
        }
    }
}

/// Reason codes for a Malformed Packet or a Protocol Error (MQTT 5.0, 4.13.1).
const BAD: &[u8] = &[0x81, 0x82];

/// Sends `bytes` on a fresh connection (after a successful CONNECT when `connected`) and
/// requires the broker to close that connection, saying at most a reason code of `reasons`
/// (MQTT 5), and to keep serving other clients.
async fn closes(case: &str, version: u8, connected: bool, bytes: &[u8], reasons: &[u8]) {
    closes_tolerating(case, version, connected, bytes, reasons, &[]).await;
}

async fn closes_tolerating(
    case: &str,
    version: u8,
    connected: bool,
    bytes: &[u8],
    reasons: &[u8],
    tolerate: &[&str],
) {
    let witness = Witness::new().await;
    let mut client = if connected {
        connect(version, "bad").await
    } else {
        // A refusal of an MQTT 5 CONNECT may come in either layout: decode as MQTT 5.
        Client::tcp(broker(), if version == V5 { V5 } else { version }).await
    };
    client.send(bytes).await;
    let before = client.expect_closed(case).await;
    check_goodbye(version, case, &before, reasons, tolerate);
    witness.check(case).await;
}

/// A CONNECT packet from raw variable header and payload bytes.
fn connect_packet(body: &[u8]) -> Vec<u8> {
    with_header(0x10, body)
}

/// The variable header of a CONNECT: "MQTT", `level`, `flags`, keep alive 60, and (MQTT 5)
/// an empty property list.
fn connect_header(level: u8, flags: u8) -> Vec<u8> {
    let mut body = string(if level == V31 { "MQIsdp" } else { "MQTT" });
    body.push(level);
    body.push(flags);
    body.extend(60u16.to_be_bytes());
    if level == V5 {
        body.push(0);
    }
    body
}

fn expect_connack(first: Recv, what: &str) -> (bool, u8, support::wire::Props) {
    match first {
        Recv::Packet(Packet::Connack {
            session_present,
            code,
            props,
        }) => (session_present, code, props),
        other => panic!("{what}: expected a CONNACK, got {other:?}"),
    }
}

// =======================================================================================
// CONNECT and CONNACK

async fn connack_success(version: u8) {
    let (mut c, session_present, _) = connect_with(&Connect::new(version, &cid("hello"))).await;
    assert!(!session_present, "Session Present on a clean session");
    assert!(c.ping().await, "the accepted connection works");
    c.disconnect().await;
}

/// [MQTT-3.1.4-4] "If CONNECT validation is successful the Server MUST acknowledge the
/// CONNECT Packet with a CONNACK Packet containing a zero return code." Here for MQTT 3.1:
/// protocol name "MQIsdp", protocol level 3.
#[tokio::test]
async fn mqtt_3_1_4_4_connack_success_v31() {
    connack_success(V31).await;
}

/// [MQTT-3.1.4-4] "If CONNECT validation is successful the Server MUST acknowledge the
/// CONNECT Packet with a CONNACK Packet containing a zero return code."
#[tokio::test]
async fn mqtt_3_1_4_4_connack_success_v311() {
    connack_success(V311).await;
}

/// [MQTT-3.1.4-5] "The Server MUST acknowledge the CONNECT packet with a CONNACK packet
/// containing a 0x00 (Success) Reason Code."
#[tokio::test]
async fn mqtt_3_1_4_5_connack_success_v5() {
    connack_success(V5).await;
}

/// [MQTT-3.1.2-2] "The Server MUST respond to the CONNECT Packet with a CONNACK return code
/// 0x01 (unacceptable protocol level) and then disconnect the Client if the Protocol Level
/// is not supported by the Server." Level 6 is none of 3, 4 and 5; an MQTT 5 server may
/// give the same refusal in the MQTT 5 layout, 0x84 (Unsupported Protocol Version).
#[tokio::test]
async fn mqtt_3_1_2_2_unsupported_protocol_level_v311() {
    let witness = Witness::new().await;
    let mut c = Client::tcp(broker(), V5).await;
    let mut body = connect_header(6, 0x02);
    body.extend(string(&cid("level6")));
    c.send(&connect_packet(&body)).await;
    let (session_present, code, _) = expect_connack(c.recv(WAIT).await, "level 6");
    assert!(
        code == 0x01 || code == 0x84,
        "CONNACK return code {code:#04x} for protocol level 6, expected 0x01"
    );
    assert!(
        !session_present,
        "[MQTT-3.2.2-4] Session Present 0 with a non-zero return code"
    );
    let after = c
        .expect_closed("[MQTT-3.2.2-5] close after a non-zero CONNACK")
        .await;
    assert!(after.is_empty(), "packets after the refusal: {after:?}");
    witness.check("CONNECT level 6").await;
}

/// [MQTT-3.1.2-2] (MQTT 5.0) "If the Protocol Version is not 5 and the Server does not want
/// to accept the CONNECT packet, the Server MAY send a CONNACK packet with Reason Code 0x84
/// (Unsupported Protocol Version) and then MUST close the Network Connection."
#[tokio::test]
async fn mqtt_3_1_2_2_unsupported_protocol_version_v5() {
    let mut body = connect_header(6, 0x02);
    body.push(0); // an MQTT 5 style property length
    body.extend(string(&cid("level6")));
    closes(
        "CONNECT level 6, MQTT 5 layout",
        V5,
        false,
        &connect_packet(&body),
        &[0x84, 0x01],
    )
    .await;
}

/// [MQTT-3.1.2-1] "If the protocol name is incorrect the Server MAY disconnect the Client,
/// or it MAY continue processing the CONNECT packet in accordance with some other
/// specification. In the latter case, the Server MUST NOT continue to process the CONNECT
/// packet in line with this specification." So: no CONNACK 0x00 for "MQTX".
#[tokio::test]
async fn mqtt_3_1_2_1_bad_protocol_name_v311() {
    let witness = Witness::new().await;
    let mut c = Client::tcp(broker(), V5).await;
    let mut body = string("MQTX");
    body.extend([4, 0x02, 0, 60]);
    body.extend(string(&cid("mqtx")));
    c.send(&connect_packet(&body)).await;
    let before = c.expect_closed("protocol name MQTX").await;
    for p in &before {
        assert!(
            matches!(p, Packet::Connack { code, .. } if *code != 0),
            "protocol name MQTX: the broker sent {p:?}"
        );
    }
    witness.check("protocol name MQTX").await;
}

/// [MQTT-3.1.2-1] (MQTT 5.0) "The protocol name MUST be the UTF-8 String "MQTT". If the
/// Server does not want to accept the CONNECT, and wishes to reveal that it is an MQTT
/// Server it MAY send a CONNACK packet with Reason Code of 0x84 (Unsupported Protocol
/// Version), and then it MUST close the Network Connection."
#[tokio::test]
async fn mqtt_3_1_2_1_bad_protocol_name_v5() {
    let mut body = string("MQTX");
    body.extend([5, 0x02, 0, 60, 0]);
    body.extend(string(&cid("mqtx")));
    closes(
        "protocol name MQTX",
        V5,
        false,
        &connect_packet(&body),
        &[0x84, 0x01],
    )
    .await;
}

/// [MQTT-3.1.2-3] "The Server MUST validate that the reserved flag in the CONNECT Control
/// Packet is set to zero and disconnect the Client if it is not zero." [MQTT-3.1.4-1]: "...
/// and close the Network Connection without sending a CONNACK if it does not conform."
#[tokio::test]
async fn mqtt_3_1_2_3_reserved_connect_flag_v311() {
    let mut body = connect_header(V311, 0x03);
    body.extend(string(&cid("rsv")));
    closes(
        "CONNECT flags 0x03",
        V311,
        false,
        &connect_packet(&body),
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-3] (MQTT 5.0) "The Server MUST validate that the reserved flag in the
/// CONNECT packet is set to 0"; if it is not, the packet is malformed ([MQTT-3.1.4-1]: "The
/// Server MUST validate that the CONNECT packet matches the format described in section 3.1
/// and close the Network Connection if it does not match").
#[tokio::test]
async fn mqtt_3_1_2_3_reserved_connect_flag_v5() {
    let mut body = connect_header(V5, 0x03);
    body.extend(string(&cid("rsv")));
    closes("CONNECT flags 0x03", V5, false, &connect_packet(&body), BAD).await;
}

/// [MQTT-3.1.0-2] "The Server MUST process a second CONNECT Packet sent from a Client as a
/// protocol violation and disconnect the Client." (No second CONNACK either.)
#[tokio::test]
async fn mqtt_3_1_0_2_second_connect_v311() {
    let again = Connect::new(V311, &cid("again")).encode();
    closes("a second CONNECT", V311, true, &again, &[]).await;
}

/// [MQTT-3.1.0-2] (MQTT 5.0) "The Server MUST process a second CONNECT packet sent from a
/// Client as a Protocol Error and close the Network Connection." [MQTT-3.2.0-2]: "The
/// Server MUST NOT send more than one CONNACK in a Network Connection."
#[tokio::test]
async fn mqtt_3_1_0_2_second_connect_v5() {
    let again = Connect::new(V5, &cid("again")).encode();
    closes("a second CONNECT", V5, true, &again, BAD).await;
}

/// [MQTT-3.1.0-1] "After a Network Connection is established by a Client to a Server, the
/// first Packet sent from the Client to the Server MUST be a CONNECT Packet." A PINGREQ
/// first gets no PINGRESP, only a closed connection.
#[tokio::test]
async fn mqtt_3_1_0_1_first_packet_not_connect_v311() {
    closes("PINGREQ before CONNECT", V311, false, &PINGREQ, &[]).await;
}

/// [MQTT-3.1.0-1] (MQTT 5.0) "After a Network Connection is established by a Client to a
/// Server, the first packet sent from the Client to the Server MUST be a CONNECT packet."
/// [MQTT-3.14.0-1]: "A Server MUST NOT send a DISCONNECT until after it has sent a CONNACK
/// with Reason Code of less than 0x80."
#[tokio::test]
async fn mqtt_3_1_0_1_first_packet_not_connect_v5() {
    let sub = subscribe(V5, 1, &[(&topic("early"), 0)], &[]);
    closes("SUBSCRIBE before CONNECT", V5, false, &sub, &[]).await;
}

/// CONNECT payload bytes: the client id, then `rest` (will fields, user name, password).
fn connect_with_flags(level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut body = connect_header(level, flags);
    body.extend(string(&cid("flags")));
    body.extend_from_slice(rest);
    connect_packet(&body)
}

/// Will properties (MQTT 5, empty), will topic and will payload.
fn will_fields(level: u8) -> Vec<u8> {
    let mut out = if level == V5 { vec![0] } else { Vec::new() };
    out.extend(string(&topic("will")));
    out.extend(binary(b"gone"));
    out
}

/// [MQTT-3.1.2-13] "If the Will Flag is set to 0, then the Will QoS MUST be set to 0
/// (0x00)." ([MQTT-3.1.2-11]: "... the Will QoS and Will Retain fields in the Connect Flags
/// MUST be set to zero".)
#[tokio::test]
async fn mqtt_3_1_2_13_will_qos_without_will_flag_v311() {
    closes(
        "Will QoS 1, Will Flag 0",
        V311,
        false,
        &connect_with_flags(V311, 0x0A, &[]),
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-15] "If the Will Flag is set to 0, then the Will Retain Flag MUST be set to
/// 0."
#[tokio::test]
async fn mqtt_3_1_2_15_will_retain_without_will_flag_v311() {
    closes(
        "Will Retain 1, Will Flag 0",
        V311,
        false,
        &connect_with_flags(V311, 0x22, &[]),
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-14] "If the Will Flag is set to 1, the value of Will QoS can be 0 (0x00), 1
/// (0x01), or 2 (0x02). It MUST NOT be 3 (0x03)."
#[tokio::test]
async fn mqtt_3_1_2_14_will_qos_3_v311() {
    let packet = connect_with_flags(V311, 0x1E, &will_fields(V311));
    closes("Will QoS 3", V311, false, &packet, &[]).await;
}

/// [MQTT-3.1.2-9] "If the Will Flag is set to 1, the Will QoS and Will Retain fields in the
/// Connect Flags will be used by the Server, and the Will Topic and Will Message fields MUST
/// be present in the payload."
#[tokio::test]
async fn mqtt_3_1_2_9_will_fields_missing_v311() {
    closes(
        "Will Flag 1 without will fields",
        V311,
        false,
        &connect_with_flags(V311, 0x06, &[]),
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-11] (MQTT 5.0) "If the Will Flag is set to 0, then the Will QoS MUST be set
/// to 0 (0x00)."
#[tokio::test]
async fn mqtt_3_1_2_11_will_qos_without_will_flag_v5() {
    closes(
        "Will QoS 1, Will Flag 0",
        V5,
        false,
        &connect_with_flags(V5, 0x0A, &[]),
        BAD,
    )
    .await;
}

/// [MQTT-3.1.2-12] (MQTT 5.0) "If the Will Flag is set to 1, the value of Will QoS can be 0
/// (0x00), 1 (0x01), or 2 (0x02)." A value of 3 is a Malformed Packet.
#[tokio::test]
async fn mqtt_3_1_2_12_will_qos_3_v5() {
    let packet = connect_with_flags(V5, 0x1E, &will_fields(V5));
    closes("Will QoS 3", V5, false, &packet, BAD).await;
}

/// [MQTT-3.1.2-13] (MQTT 5.0) "If the Will Flag is set to 0, then Will Retain MUST be set to
/// 0."
#[tokio::test]
async fn mqtt_3_1_2_13_will_retain_without_will_flag_v5() {
    closes(
        "Will Retain 1, Will Flag 0",
        V5,
        false,
        &connect_with_flags(V5, 0x22, &[]),
        BAD,
    )
    .await;
}

/// [MQTT-3.1.2-9] (MQTT 5.0) "If the Will Flag is set to 1, the Will Properties, Will
/// Topic, and Will Payload fields MUST be present in the Payload."
#[tokio::test]
async fn mqtt_3_1_2_9_will_fields_missing_v5() {
    closes(
        "Will Flag 1 without will fields",
        V5,
        false,
        &connect_with_flags(V5, 0x06, &[]),
        BAD,
    )
    .await;
}

/// [MQTT-3.1.2-22] "If the User Name Flag is set to 0, the Password Flag MUST be set to 0."
#[tokio::test]
async fn mqtt_3_1_2_22_password_without_user_name_v311() {
    let packet = connect_with_flags(V311, 0x42, &binary(b"secret"));
    closes(
        "Password Flag 1, User Name Flag 0",
        V311,
        false,
        &packet,
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-19] "If the User Name Flag is set to 1, a user name MUST be present in the
/// payload."
#[tokio::test]
async fn mqtt_3_1_2_19_user_name_missing_v311() {
    closes(
        "User Name Flag 1 without a user name",
        V311,
        false,
        &connect_with_flags(V311, 0x82, &[]),
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-21] "If the Password Flag is set to 1, a password MUST be present in the
/// payload."
#[tokio::test]
async fn mqtt_3_1_2_21_password_missing_v311() {
    let packet = connect_with_flags(V311, 0xC2, &string("user"));
    closes(
        "Password Flag 1 without a password",
        V311,
        false,
        &packet,
        &[],
    )
    .await;
}

/// [MQTT-3.1.2-17] (MQTT 5.0) "If the User Name Flag is set to 1, a User Name MUST be
/// present in the Payload."
#[tokio::test]
async fn mqtt_3_1_2_17_user_name_missing_v5() {
    closes(
        "User Name Flag 1 without a user name",
        V5,
        false,
        &connect_with_flags(V5, 0x82, &[]),
        BAD,
    )
    .await;
}

/// [MQTT-3.1.3-5] "The Server MUST allow ClientIds which are between 1 and 23 UTF-8 encoded
/// bytes in length, and that contain only the characters
/// "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"."
#[tokio::test]
async fn mqtt_3_1_3_5_client_id_23_characters_v311() {
    for id in [
        cid("a").chars().take(2).collect::<String>(),
        format!("{:Z<23}", cid("Zz")),
    ] {
        let mut c = Client::connect(broker(), V311, &id).await;
        assert!(c.ping().await, "client id {id:?}");
        c.disconnect().await;
    }
}

/// [MQTT-3.1.3-5] (MQTT 5.0) "The Server MUST allow ClientID's which are between 1 and 23
/// UTF-8 encoded bytes in length, and that contain only the characters
/// "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"."
#[tokio::test]
async fn mqtt_3_1_3_5_client_id_23_characters_v5() {
    let id = format!("{:Z<23}", cid("Zz"));
    let mut c = Client::connect(broker(), V5, &id).await;
    assert!(c.ping().await, "client id {id:?}");
    c.disconnect().await;
}

/// [MQTT-3.1.3-6] "A Server MAY allow a Client to supply a ClientId that has a length of
/// zero bytes. However if it does so the Server MUST treat this as a special case and
/// assign a unique ClientId to that Client." Two such clients at once do not take each
/// other over; a server that does not allow it refuses with 0x02 ([MQTT-3.1.3-9]).
#[tokio::test]
async fn mqtt_3_1_3_6_zero_length_client_id_v311() {
    let (mut first, reply) = Client::start(broker(), &Connect::new(V311, "")).await;
    let (_, code, _) = expect_connack(reply, "zero-length client id, clean session");
    if code == 0x02 {
        first.expect_closed("refused zero-length client id").await;
        return;
    }
    assert_eq!(
        code, 0,
        "CONNACK for a zero-length client id with CleanSession 1"
    );
    let mut second = Client::connect(broker(), V311, "").await;
    assert!(
        first.ping().await,
        "the first anonymous client was disconnected by the second"
    );
    assert!(second.ping().await);
    first.disconnect().await;
    second.disconnect().await;
}

/// [MQTT-3.1.3-8] "If the Client supplies a zero-byte ClientId with CleanSession set to 0,
/// the Server MUST respond to the CONNECT Packet with a CONNACK return code 0x02 (Identifier
/// rejected) and then close the Network Connection."
#[tokio::test]
async fn mqtt_3_1_3_8_zero_length_client_id_persistent_v311() {
    let (mut c, reply) = Client::start(broker(), &Connect::new(V311, "").clean(false)).await;
    let (session_present, code, _) = expect_connack(reply, "zero-length client id, CleanSession 0");
    assert_eq!(code, 0x02, "CONNACK return code");
    assert!(!session_present, "[MQTT-3.2.2-4]");
    c.expect_closed("[MQTT-3.2.2-5] close after CONNACK 0x02")
        .await;
}

/// A refused CONNECT followed at once (same write) by a retained PUBLISH: after the close,
/// a new subscriber must find no retained message.
async fn nothing_processed_after_refusal(version: u8, refused: Vec<u8>) {
    let t = topic("afterrefusal");
    let mut bytes = refused;
    bytes.extend(
        Publish::new(&t, b"must not be stored")
            .retain()
            .encode(version),
    );
    let mut c = Client::tcp(broker(), V5).await;
    c.send(&bytes).await;
    let before = c.expect_closed("a refused CONNECT").await;
    for p in &before {
        assert!(
            matches!(p, Packet::Connack { code, .. } if *code != 0),
            "after a refused CONNECT: {p:?}"
        );
    }
    let mut late = subscriber(version, &t, 1).await;
    late.expect_no_publish_on(&t, "a PUBLISH sent after a refused CONNECT was processed")
        .await;
    late.disconnect().await;
}

/// [MQTT-3.1.4-5] "If the Server rejects the CONNECT, it MUST NOT process any data sent by
/// the Client after the CONNECT Packet." (Refused here with 0x02: a zero-byte ClientId with
/// CleanSession 0.)
#[tokio::test]
async fn mqtt_3_1_4_5_nothing_processed_after_refused_connect_v311() {
    let refused = Connect::new(V311, "").clean(false).encode();
    nothing_processed_after_refusal(V311, refused).await;
}

/// [MQTT-3.1.4-6] (MQTT 5.0) "If the Server rejects the CONNECT, it MUST NOT process any
/// data sent by the Client after the CONNECT packet except AUTH packets." (Refused here for
/// an Authentication Method the broker does not have.)
#[tokio::test]
async fn mqtt_3_1_4_6_nothing_processed_after_refused_connect_v5() {
    let refused = Connect::new(V5, &cid("refused"))
        .prop(Prop::Str(prop::AUTHENTICATION_METHOD, "SCRAM-SHA-1".into()))
        .encode();
    nothing_processed_after_refusal(V5, refused).await;
}

/// [MQTT-3.2.2-16] (MQTT 5.0) "If the Client connects using a zero length Client Identifier,
/// the Server MUST respond with a CONNACK containing an Assigned Client Identifier. The
/// Assigned Client Identifier MUST be a new Client Identifier not used by any other Session
/// currently in the Server." ([MQTT-3.1.3-7]: "... and MUST return the Assigned Client
/// Identifier in the CONNACK packet.")
#[tokio::test]
async fn mqtt_3_2_2_16_assigned_client_identifier_v5() {
    let (mut a, _, props_a) = connect_with(&Connect::new(V5, "")).await;
    let (mut b, _, props_b) = connect_with(&Connect::new(V5, "")).await;
    let id_a = props_a
        .str(prop::ASSIGNED_CLIENT_IDENTIFIER)
        .expect("CONNACK without an Assigned Client Identifier")
        .to_string();
    let id_b = props_b
        .str(prop::ASSIGNED_CLIENT_IDENTIFIER)
        .expect("CONNACK without an Assigned Client Identifier")
        .to_string();
    assert!(!id_a.is_empty(), "an empty Assigned Client Identifier");
    assert_ne!(
        id_a, id_b,
        "two sessions got the same Assigned Client Identifier"
    );
    assert!(
        a.ping().await && b.ping().await,
        "both clients stay connected"
    );
    a.disconnect().await;
    b.disconnect().await;
}

/// [MQTT-3.2.2-1] (MQTT 5.0) "Byte 1 is the "Connect Acknowledge Flags". Bits 7-1 are
/// reserved and MUST be set to 0." (The decoder rejects any other value; checked here on a
/// fresh and on a resumed session.)
#[tokio::test]
async fn mqtt_3_2_2_1_connack_reserved_flags_v5() {
    let id = cid("ackflags");
    let (c, _, _) = connect_with(&Connect::new(V5, &id).clean(false).session_expiry(30)).await;
    c.drop_connection();
    let (c, session_present, _) =
        connect_with(&Connect::new(V5, &id).clean(false).session_expiry(0)).await;
    assert!(session_present, "the session was not resumed");
    c.disconnect().await;
}

/// [MQTT-4.12.0-6] (MQTT 5.0) "If the Client does not include an Authentication Method in
/// the CONNECT, the Server MUST NOT send an AUTH packet, and it MUST NOT send an
/// Authentication Method in the CONNACK packet." [MQTT-3.1.2-28]: with Request Response
/// Information absent (0), "the Server MUST NOT return Response Information".
#[tokio::test]
async fn mqtt_4_12_0_6_no_authentication_method_in_connack_v5() {
    let (mut c, _, props) = connect_with(&Connect::new(V5, &cid("noauth"))).await;
    assert!(
        !props.has(prop::AUTHENTICATION_METHOD),
        "CONNACK properties {props:?}"
    );
    assert!(
        !props.has(prop::AUTHENTICATION_DATA),
        "CONNACK properties {props:?}"
    );
    assert!(
        !props.has(prop::RESPONSE_INFORMATION),
        "[MQTT-3.1.2-28] CONNACK properties {props:?}"
    );
    assert!(c.ping().await, "no AUTH before the PINGRESP");
    c.disconnect().await;
}

/// [MQTT-3.2.2-9] (MQTT 5.0) "If a Server does not support QoS 1 or QoS 2 PUBLISH packets
/// it MUST send a Maximum QoS in the CONNACK packet specifying the highest QoS it supports."
/// Without a Maximum QoS, a QoS 2 PUBLISH gets its PUBREC; with one, it says 0 or 1.
#[tokio::test]
async fn mqtt_3_2_2_9_maximum_qos_v5() {
    let (mut c, _, props) = connect_with(&Connect::new(V5, &cid("maxqos"))).await;
    match props.int(prop::MAXIMUM_QOS) {
        None => {
            let reason = c
                .publish(Publish::new(&topic("maxqos"), b"2").qos(2, 1))
                .await;
            assert!(reason < 0x80, "QoS 2 PUBLISH refused with {reason:#04x}");
        }
        Some(q) => assert!(q <= 1, "Maximum QoS {q}: only 0 or 1 may be sent"),
    }
    c.disconnect().await;
}

/// [MQTT-4.12.0-1] (MQTT 5.0) "If the Server does not support the Authentication Method
/// supplied by the Client, it MAY send a CONNACK with a Reason Code of 0x8C (Bad
/// authentication method) or 0x87 (Not Authorized) as described in section 4.13 and MUST
/// close the Network Connection." The broker under test has no authentication methods.
#[tokio::test]
async fn mqtt_4_12_0_1_unsupported_authentication_method_v5() {
    let packet = Connect::new(V5, &cid("auth"))
        .prop(Prop::Str(prop::AUTHENTICATION_METHOD, "SCRAM-SHA-1".into()))
        .prop(Prop::Bin(
            prop::AUTHENTICATION_DATA,
            b"client-first".to_vec(),
        ))
        .encode();
    closes(
        "Authentication Method SCRAM-SHA-1",
        V5,
        false,
        &packet,
        &[0x8C, 0x87],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Keep alive

/// How long after 1.5 × the keep alive a close may come. The specification says when the
/// server must give up on a client, not how soon after that it must act; mosquitto 2.0
/// sweeps its connections for keep alive every 5 s, so this allows 5.5 s.
const KEEP_ALIVE_SLACK: Duration = Duration::from_millis(5500);

/// Two connections with keep alive 1 s at once: one sends a PINGREQ every half period and
/// must stay open for 3 s; the other is silent and must be closed within 1.5 s (plus
/// [`KEEP_ALIVE_SLACK`]).
async fn keep_alive_enforced(version: u8) {
    let connect = |tag: &str| Connect::new(version, &cid(tag)).keep_alive(1);
    let (mut pinging, _, props) = connect_with(&connect("kaping")).await;
    let (mut silent, _, _) = connect_with(&connect("kasilent")).await;
    let silent_since = Instant::now();
    // [MQTT-3.2.2-21]/[MQTT-3.2.2-22]: a Server Keep Alive replaces the client's value.
    let ka = props.int(prop::SERVER_KEEP_ALIVE).unwrap_or(1);
    assert!(
        (1..=5).contains(&ka),
        "Server Keep Alive {ka}: this test cannot wait that long"
    );
    let period = Duration::from_secs(u64::from(ka));
    let keep_pinging = async {
        let until = Instant::now() + period * 3;
        while Instant::now() < until {
            sleep(period / 2).await;
            assert!(
                pinging.ping().await,
                "closed although a PINGREQ came every {:?}",
                period / 2
            );
        }
    };
    let watch_silent = async {
        let deadline = silent_since + period * 3 / 2 + KEEP_ALIVE_SLACK;
        loop {
            match silent
                .recv(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Recv::Closed => break,
                Recv::Packet(Packet::Disconnect { reason, .. }) if version == V5 => {
                    assert_eq!(reason, 0x8D, "DISCONNECT reason for a keep alive timeout");
                }
                other => panic!(
                    "silent for {:?} with keep alive {ka} s: {other:?}",
                    silent_since.elapsed()
                ),
            }
        }
    };
    tokio::join!(keep_pinging, watch_silent);
    pinging.disconnect().await;
}

/// [MQTT-3.1.2-24] "If the Keep Alive value is non-zero and the Server does not receive a
/// Control Packet from the Client within one and a half times the Keep Alive time period, it
/// MUST disconnect the Network Connection to the Client as if the network had failed."
#[tokio::test]
async fn mqtt_3_1_2_24_keep_alive_disconnect_v311() {
    keep_alive_enforced(V311).await;
}

/// [MQTT-3.1.2-22] (MQTT 5.0) "If the Keep Alive value is non-zero and the Server does not
/// receive an MQTT Control Packet from the Client within one and a half times the Keep Alive
/// time period, it MUST close the Network Connection to the Client as if the network had
/// failed." [MQTT-3.2.2-22]: "If the Server does not send the Server Keep Alive, the Server
/// MUST use the Keep Alive value set by the Client on CONNECT." A DISCONNECT before the
/// close, if any, says 0x8D (Keep Alive timeout).
#[tokio::test]
async fn mqtt_3_1_2_22_keep_alive_disconnect_v5() {
    keep_alive_enforced(V5).await;
}

async fn keep_alive_zero(version: u8) {
    let (mut c, _, props) = connect_with(&Connect::new(version, &cid("ka0")).keep_alive(0)).await;
    let server_ka = props.int(prop::SERVER_KEEP_ALIVE).unwrap_or(0);
    assert!(
        server_ka == 0 || server_ka >= 3,
        "Server Keep Alive {server_ka} for a client that asked for none"
    );
    sleep(Duration::from_millis(1600)).await;
    assert!(
        c.ping().await,
        "a keep alive 0 connection was closed after 1.6 s of silence"
    );
    c.disconnect().await;
}

/// Section 3.1.2.10: "A Keep Alive value of zero (0) has the effect of turning off the keep
/// alive mechanism. This means that, in this case, the Server is not required to disconnect
/// the Client on the grounds of inactivity." Silent for 1.6 s (longer than 1.5 × 1 s, what
/// a broker that took 0 for a small value would allow), the connection still works.
#[tokio::test]
async fn sec_3_1_2_10_keep_alive_zero_v311() {
    keep_alive_zero(V311).await;
}

/// Section 3.1.2.10 (MQTT 5.0): "A Keep Alive value of 0 has the effect of turning off the
/// Keep Alive mechanism. If Keep Alive is 0 the Client is not obliged to send MQTT Control
/// Packets on any particular schedule." A Server Keep Alive, if the broker sends one, is
/// honoured by this test's 1.6 s of silence only if it is at least 3 s.
#[tokio::test]
async fn sec_3_1_2_10_keep_alive_zero_v5() {
    keep_alive_zero(V5).await;
}

// ---------------------------------------------------------------------------------------
// Client takeover and Session Present

/// [MQTT-3.1.4-2] "If the ClientId represents a Client already connected to the Server then
/// the Server MUST disconnect the existing Client."
#[tokio::test]
async fn mqtt_3_1_4_2_session_takeover_v311() {
    let id = cid("takeover");
    let mut old = Client::connect(broker(), V311, &id).await;
    let mut new = Client::connect(broker(), V311, &id).await;
    let before = old
        .expect_closed("the existing connection of a client id that connects again")
        .await;
    assert!(before.is_empty(), "sent to the old connection: {before:?}");
    assert!(new.ping().await, "the new connection works");
    new.disconnect().await;
}

/// [MQTT-3.1.4-3] (MQTT 5.0) "If the ClientID represents a Client already connected to the
/// Server, the Server sends a DISCONNECT packet to the existing Client with Reason Code of
/// 0x8E (Session taken over) as described in section 4.13 and MUST close the Network
/// Connection of the existing Client." The close is the MUST; section 4.13 makes the
/// DISCONNECT a SHOULD, so its absence passes (mosquitto 2.0.11 sends none), but a
/// DISCONNECT with another reason code does not.
#[tokio::test]
async fn mqtt_3_1_4_3_session_takeover_v5() {
    let id = cid("takeover");
    let mut old = Client::connect(broker(), V5, &id).await;
    let mut new = Client::connect(broker(), V5, &id).await;
    let before = old
        .expect_closed("the existing connection of a client id that connects again")
        .await;
    assert!(
        matches!(
            before.as_slice(),
            [] | [Packet::Disconnect { reason: 0x8E, .. }]
        ),
        "expected DISCONNECT 0x8E (or nothing) before the close, got {before:?}"
    );
    assert!(new.ping().await, "the new connection works");
    new.disconnect().await;
}

/// A session with one subscription is left behind by `id` (3.1.1 CleanSession 0, MQTT 5
/// Session Expiry 60 s).
async fn leave_session(version: u8, id: &str, filter: &str) {
    let c = Connect::new(version, id).clean(false);
    let c = if version == V5 {
        c.session_expiry(60)
    } else {
        c
    };
    let (mut c, _, _) = connect_with(&c).await;
    c.subscribe(filter, 1).await;
    c.disconnect().await;
}

/// Reconnects `id` (clean or not; MQTT 5 keeps Session Expiry 60 s) and returns the client
/// and Session Present.
async fn resume(version: u8, id: &str, clean: bool) -> (Client, bool) {
    let c = Connect::new(version, id).clean(clean);
    let c = if version == V5 {
        c.session_expiry(60)
    } else {
        c
    };
    let (c, sp, _) = connect_with(&c).await;
    (c, sp)
}

/// [MQTT-3.2.2-1] "If the Server accepts a connection with CleanSession set to 1, the Server
/// MUST set Session Present to 0 in the CONNACK packet in addition to setting a zero return
/// code in the CONNACK packet." Even when a session was stored for the client id.
#[tokio::test]
async fn mqtt_3_2_2_1_session_present_0_on_clean_session_v311() {
    let id = cid("sp0");
    leave_session(V311, &id, &topic("sp")).await;
    let (c, sp) = resume(V311, &id, true).await;
    assert!(!sp, "Session Present 1 with CleanSession 1");
    c.disconnect().await;
}

/// [MQTT-3.2.2-2] "If the Server accepts a connection with CleanSession set to 0, the value
/// set in Session Present depends on whether the Server already has stored Session state for
/// the supplied client ID. If the Server has stored Session state, it MUST set Session
/// Present to 1 in the CONNACK packet."
#[tokio::test]
async fn mqtt_3_2_2_2_session_present_1_when_resuming_v311() {
    let id = cid("sp1");
    leave_session(V311, &id, &topic("sp")).await;
    let (c, sp) = resume(V311, &id, false).await;
    assert!(sp, "Session Present 0 although the session was stored");
    c.disconnect().await;
}

/// [MQTT-3.2.2-3] "If the Server does not have stored Session state, it MUST set Session
/// Present to 0 in the CONNACK packet. This is in addition to setting a zero return code in
/// the CONNACK packet."
#[tokio::test]
async fn mqtt_3_2_2_3_session_present_0_without_session_v311() {
    let (c, sp) = resume(V311, &cid("spnew"), false).await;
    assert!(!sp, "Session Present 1 for a client id never seen");
    c.disconnect().await;
}

/// [MQTT-3.2.2-4] "If a server sends a CONNACK packet containing a non-zero return code it
/// MUST set Session Present to 0." Even for a client id that has a stored session.
#[tokio::test]
async fn mqtt_3_2_2_4_refusal_session_present_0_v311() {
    let id = cid("sprefused");
    leave_session(V311, &id, &topic("sp")).await;
    let mut c = Client::tcp(broker(), V5).await;
    let mut body = connect_header(6, 0x00);
    body.extend(string(&id));
    c.send(&connect_packet(&body)).await;
    let (sp, code, _) = expect_connack(c.recv(WAIT).await, "level 6 for a stored session");
    assert_ne!(code, 0, "protocol level 6 accepted");
    assert!(!sp, "Session Present 1 on a refusal");
    c.expect_closed("[MQTT-3.2.2-5] close after a refusal")
        .await;
}

/// [MQTT-3.2.2-2] (MQTT 5.0) "If the Server accepts a connection with Clean Start set to 1,
/// the Server MUST set Session Present to 0 in the CONNACK packet in addition to setting a
/// 0x00 (Success) Reason Code in the CONNACK packet."
#[tokio::test]
async fn mqtt_3_2_2_2_session_present_0_on_clean_start_v5() {
    let id = cid("sp0");
    leave_session(V5, &id, &topic("sp")).await;
    let (c, sp) = resume(V5, &id, true).await;
    assert!(!sp, "Session Present 1 with Clean Start 1");
    c.disconnect().await;
}

/// [MQTT-3.2.2-3] (MQTT 5.0) "If the Server accepts a connection with Clean Start set to 0
/// and the Server has Session State for the ClientID, it MUST set Session Present to 1 in
/// the CONNACK packet, otherwise it MUST set Session Present to 0 in the CONNACK packet."
#[tokio::test]
async fn mqtt_3_2_2_3_session_present_v5() {
    let (c, sp) = resume(V5, &cid("spnew"), false).await;
    assert!(!sp, "Session Present 1 for a client id never seen");
    c.disconnect().await;
    let id = cid("sp1");
    leave_session(V5, &id, &topic("sp")).await;
    let (c, sp) = resume(V5, &id, false).await;
    assert!(sp, "Session Present 0 although the session was stored");
    c.disconnect().await;
}

async fn connack_first(version: u8) {
    let id = cid("first");
    let t = topic("first");
    leave_session(version, &id, &t).await;
    for i in 0..3u8 {
        publish_once(version, Publish::new(&t, &[i]).qos(1, 0)).await;
    }
    let c = Connect::new(version, &id).clean(false);
    let c = if version == V5 {
        c.session_expiry(60)
    } else {
        c
    };
    let (mut c, first) = Client::start(broker(), &c).await;
    let (_, code, _) = expect_connack(first, "the first packet of a resumed session");
    assert_eq!(code, 0);
    for i in 0..3u8 {
        assert_eq!(
            c.receive().await.payload,
            [i],
            "queued message after the CONNACK"
        );
    }
    c.disconnect().await;
}

/// [MQTT-3.2.0-1] "The first packet sent from the Server to the Client MUST be a CONNACK
/// Packet." Even when messages are waiting for the session.
#[tokio::test]
async fn mqtt_3_2_0_1_connack_first_v311() {
    connack_first(V311).await;
}

/// [MQTT-3.2.0-1] (MQTT 5.0) "The Server MUST send a CONNACK with a 0x00 (Success) Reason
/// Code before sending any Packet other than AUTH." Even when messages are waiting for the
/// session.
#[tokio::test]
async fn mqtt_3_2_0_1_connack_first_v5() {
    connack_first(V5).await;
}

// ---------------------------------------------------------------------------------------
// Will messages

/// A client with `will` whose connection is set up; the observer subscribed to the will's
/// topic at QoS 2.
async fn with_will(version: u8, will: Will, props: &[Prop]) -> (Client, Client) {
    let observer = subscriber(version, &will.topic, 2).await;
    let mut c = Connect::new(version, &cid("will")).will(will);
    for p in props {
        c = c.prop(p.clone());
    }
    let (client, _, _) = connect_with(&c).await;
    (client, observer)
}

async fn will_on_network_failure(version: u8) {
    let t = topic("will");
    let (client, mut observer) = with_will(version, Will::new(&t, b"gone", 1), &[]).await;
    client.drop_connection();
    let will = observer.receive_on(&t).await;
    assert_eq!(will.payload, b"gone");
    assert_eq!(will.qos, 1, "the will's QoS");
    assert!(
        !will.retain,
        "[MQTT-3.1.2-16] a non-retained will arrives with RETAIN 0"
    );
    observer.disconnect().await;
}

/// [MQTT-3.1.2-8] "If the Will Flag is set to 1 this indicates that, if the Connect request
/// is accepted, a Will Message MUST be stored on the Server and associated with the Network
/// Connection. The Will Message MUST be published when the Network Connection is
/// subsequently closed unless the Will Message has been deleted by the Server on receipt of
/// a DISCONNECT Packet."
#[tokio::test]
async fn mqtt_3_1_2_8_will_published_on_network_failure_v311() {
    will_on_network_failure(V311).await;
}

/// [MQTT-3.1.2-8] Here for MQTT 3.1 (same rule).
#[tokio::test]
async fn mqtt_3_1_2_8_will_published_on_network_failure_v31() {
    will_on_network_failure(V31).await;
}

/// [MQTT-3.1.2-8] (MQTT 5.0) "The Will Message MUST be published after the Network
/// Connection is subsequently closed and either the Will Delay Interval has elapsed or the
/// Session ends, unless the Will Message has been deleted by the Server on receipt of a
/// DISCONNECT packet with Reason Code 0x00 (Normal disconnection) or a new Network
/// Connection for the ClientID is opened before the Will Delay Interval has elapsed."
#[tokio::test]
async fn mqtt_3_1_2_8_will_published_on_network_failure_v5() {
    will_on_network_failure(V5).await;
}

async fn no_will_after_disconnect(version: u8) {
    let t = topic("will");
    let (client, mut observer) = with_will(version, Will::new(&t, b"gone", 1), &[]).await;
    client.disconnect().await;
    observer
        .expect_no_publish_on(&t, "a will after a normal DISCONNECT")
        .await;
    observer.disconnect().await;
}

/// [MQTT-3.14.4-3] "On receipt of DISCONNECT the Server MUST discard any Will Message
/// associated with the current connection without publishing it, as described in Section
/// 3.1.2.5." ([MQTT-3.1.2-10]: "The Will Message MUST be removed from the stored Session
/// state in the Server once it has been published or the Server has received a DISCONNECT
/// packet from the Client.")
#[tokio::test]
async fn mqtt_3_14_4_3_no_will_after_disconnect_v311() {
    no_will_after_disconnect(V311).await;
}

/// [MQTT-3.14.4-3] (MQTT 5.0) "On receipt of DISCONNECT with a Reason Code of 0x00
/// (Success) the Server MUST discard any Will Message associated with the current
/// Connection without publishing it."
#[tokio::test]
async fn mqtt_3_14_4_3_no_will_after_disconnect_v5() {
    no_will_after_disconnect(V5).await;
}

/// [MQTT-3.1.2-8] (MQTT 5.0): only a DISCONNECT with Reason Code 0x00 deletes the will;
/// 0x04 (Disconnect with Will Message) is "The Client wishes to disconnect but requires
/// that the Server also publishes its Will Message."
#[tokio::test]
async fn mqtt_3_1_2_8_will_published_after_disconnect_0x04_v5() {
    let t = topic("will");
    let (mut client, mut observer) = with_will(V5, Will::new(&t, b"gone", 0), &[]).await;
    client.send(&disconnect(V5, 0x04, &[])).await;
    client.expect_closed("after DISCONNECT 0x04").await;
    assert_eq!(observer.receive_on(&t).await.payload, b"gone");
    observer.disconnect().await;
}

async fn will_retained(version: u8) {
    let t = topic("will");
    let (client, mut observer) = with_will(version, Will::new(&t, b"gone", 1).retain(), &[]).await;
    client.drop_connection();
    let live = observer.receive_on(&t).await;
    assert_eq!(live.payload, b"gone");
    observer.disconnect().await;
    let mut late = subscriber(version, &t, 1).await;
    let stored = late.receive_on(&t).await;
    assert!(
        stored.retain,
        "the will was not stored as a retained message"
    );
    assert_eq!(stored.payload, b"gone");
    late.disconnect().await;
    publish_once(version, Publish::new(&t, b"").retain()).await;
}

/// [MQTT-3.1.2-17] "If the Will Flag is set to 1 and If Will Retain is set to 1, the Server
/// MUST publish the Will Message as a retained message."
#[tokio::test]
async fn mqtt_3_1_2_17_will_retained_v311() {
    will_retained(V311).await;
}

/// [MQTT-3.1.2-15] (MQTT 5.0) "If the Will Flag is set to 1 and Will Retain is set to 1, the
/// Server MUST publish the Will Message as a retained message."
#[tokio::test]
async fn mqtt_3_1_2_15_will_retained_v5() {
    will_retained(V5).await;
}

async fn will_not_retained(version: u8) {
    let t = topic("will");
    let (client, mut observer) = with_will(version, Will::new(&t, b"gone", 1), &[]).await;
    client.drop_connection();
    assert!(
        !observer.receive_on(&t).await.retain,
        "live will delivery with RETAIN 1"
    );
    observer.disconnect().await;
    let mut late = subscriber(version, &t, 1).await;
    late.expect_no_publish_on(&t, "a non-retained will kept as retained")
        .await;
    late.disconnect().await;
}

/// [MQTT-3.1.2-16] "If the Will Flag is set to 1 and If Will Retain is set to 0, the Server
/// MUST publish the Will Message as a non-retained message."
#[tokio::test]
async fn mqtt_3_1_2_16_will_not_retained_v311() {
    will_not_retained(V311).await;
}

/// [MQTT-3.1.2-14] (MQTT 5.0) "If the Will Flag is set to 1 and Will Retain is set to 0, the
/// Server MUST publish the Will Message as a non-retained message."
#[tokio::test]
async fn mqtt_3_1_2_14_will_not_retained_v5() {
    will_not_retained(V5).await;
}

/// [MQTT-3.1.3-10] (MQTT 5.0) "The Server MUST maintain the order of User Properties when
/// publishing the Will Message." Will properties such as the Content Type are part of the
/// Application Message too.
#[tokio::test]
async fn mqtt_3_1_3_10_will_user_property_order_v5() {
    let t = topic("will");
    let users = [("b", "1"), ("a", "2"), ("b", "3")];
    let mut will =
        Will::new(&t, b"gone", 1).prop(Prop::Str(prop::CONTENT_TYPE, "text/plain".into()));
    for (k, v) in users {
        will = will.prop(Prop::User(k.into(), v.into()));
    }
    let (client, mut observer) = with_will(V5, will, &[]).await;
    client.drop_connection();
    let got = observer.receive_on(&t).await;
    let expected: Vec<(String, String)> = users
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got.props.users(), expected, "will User Properties");
    assert_eq!(got.props.str(prop::CONTENT_TYPE), Some("text/plain"));
    observer.disconnect().await;
}

/// [MQTT-3.1.2-8] (MQTT 5.0): with a Will Delay Interval the will goes out once that
/// interval has elapsed after the connection closed (the session, 60 s, outlives it), not
/// at the close.
#[tokio::test]
async fn mqtt_3_1_2_8_will_delay_interval_v5() {
    let t = topic("will");
    let will = Will::new(&t, b"late", 1).prop(Prop::Four(prop::WILL_DELAY_INTERVAL, 1));
    let session = [Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 60)];
    let (client, mut observer) = with_will(V5, will, &session).await;
    client.drop_connection();
    let dropped = Instant::now();
    observer
        .expect_no_publish_on(&t, "the will before its Will Delay Interval (1 s)")
        .await;
    assert_eq!(observer.receive_on(&t).await.payload, b"late");
    assert!(
        dropped.elapsed() >= Duration::from_millis(900),
        "will after {:?}",
        dropped.elapsed()
    );
    observer.disconnect().await;
}

/// [MQTT-3.1.2-8] (MQTT 5.0): "... either the Will Delay Interval has elapsed or the Session
/// ends": a session that ends with its connection (Session Expiry Interval 0) publishes the
/// will at once, whatever the Will Delay Interval (section 3.1.3.2.2: "until the Will Delay
/// Interval has passed or the Session ends, whichever happens first"). mosquitto 2.0.11
/// deviates: it waits for the Will Delay Interval although the session is gone.
#[tokio::test]
async fn mqtt_3_1_2_8_will_sent_when_session_ends_first_v5() {
    let t = topic("will");
    let will = Will::new(&t, b"ended", 1).prop(Prop::Four(prop::WILL_DELAY_INTERVAL, 3600));
    let (client, mut observer) = with_will(V5, will, &[]).await;
    client.drop_connection();
    assert_eq!(observer.receive_on(&t).await.payload, b"ended");
    observer.disconnect().await;
}

/// [MQTT-3.1.3-9] (MQTT 5.0) "If a new Network Connection to this Session is made before the
/// Will Delay Interval has passed, the Server MUST NOT send the Will Message."
#[tokio::test]
async fn mqtt_3_1_3_9_will_delay_cancelled_by_reconnect_v5() {
    let t = topic("will");
    let mut observer = subscriber(V5, &t, 1).await;
    let id = cid("willdelay");
    let with_will = Connect::new(V5, &id)
        .clean(false)
        .session_expiry(60)
        .will(Will::new(&t, b"late", 1).prop(Prop::Four(prop::WILL_DELAY_INTERVAL, 1)));
    let (client, _, _) = connect_with(&with_will).await;
    client.drop_connection();
    let (again, sp, _) = connect_with(&Connect::new(V5, &id).clean(false).session_expiry(60)).await;
    assert!(sp, "the session was not resumed");
    sleep(Duration::from_millis(1600)).await;
    observer
        .expect_no_publish_on(
            &t,
            "a will whose session reconnected within the Will Delay Interval",
        )
        .await;
    again.disconnect().await;
    observer.disconnect().await;
}

// =======================================================================================
// PUBLISH: QoS flows

async fn qos0_flow(version: u8) {
    let t = topic("q0");
    let mut sub = subscriber(version, &t, 2).await;
    publish_once(version, Publish::new(&t, b"zero")).await;
    let got = sub.receive().await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        (t.as_str(), &b"zero"[..])
    );
    assert_eq!(
        (got.qos, got.dup, got.id),
        (0, false, 0),
        "QoS 0 delivery: QoS, DUP, packet id"
    );
    sub.disconnect().await;
}

/// [MQTT-4.3.1-1] "In the QoS 0 delivery protocol, the Sender MUST send a PUBLISH packet
/// with QoS=0, DUP=0." ([MQTT-3.3.1-2]: "The DUP flag MUST be set to 0 for all QoS 0
/// messages"; [MQTT-2.3.1-5]: no Packet Identifier at QoS 0.)
#[tokio::test]
async fn mqtt_4_3_1_1_qos0_delivery_v311() {
    qos0_flow(V311).await;
}

/// [MQTT-4.3.1-1] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_4_3_1_1_qos0_delivery_v31() {
    qos0_flow(V31).await;
}

/// [MQTT-4.3.1-1] (MQTT 5.0) "In the QoS 0 delivery protocol, the sender MUST send a PUBLISH
/// packet with QoS 0 and DUP flag set to 0."
#[tokio::test]
async fn mqtt_4_3_1_1_qos0_delivery_v5() {
    qos0_flow(V5).await;
}

async fn qos1_receiver(version: u8) {
    let mut c = connect(version, "q1pub").await;
    let t = topic("q1");
    for id in [1u16, 0x1234, 0xFFFF] {
        c.send(&Publish::new(&t, b"one").qos(1, id).encode(version))
            .await;
        match c.expect("PUBACK").await {
            Packet::Puback(a) => assert_eq!(a.id, id, "PUBACK packet identifier"),
            other => panic!("expected PUBACK {id}, got {other:?}"),
        }
    }
    c.disconnect().await;
}

/// [MQTT-4.3.2-2] "In the QoS 1 delivery protocol, the Receiver MUST respond with a PUBACK
/// Packet containing the Packet Identifier from the incoming PUBLISH Packet, having accepted
/// ownership of the Application Message." ([MQTT-2.3.1-6].)
#[tokio::test]
async fn mqtt_4_3_2_2_qos1_puback_v311() {
    qos1_receiver(V311).await;
}

/// [MQTT-4.3.2-2] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_4_3_2_2_qos1_puback_v31() {
    qos1_receiver(V31).await;
}

/// [MQTT-4.3.2-4] (MQTT 5.0) "In the QoS 1 delivery protocol, the receiver MUST respond with
/// a PUBACK packet containing the Packet Identifier from the incoming PUBLISH packet, having
/// accepted ownership of the Application Message."
#[tokio::test]
async fn mqtt_4_3_2_4_qos1_puback_v5() {
    qos1_receiver(V5).await;
}

async fn qos1_sender(version: u8) {
    let t = topic("q1");
    let mut sub = subscriber(version, &t, 1).await;
    let mut publisher = connect(version, "q1pub").await;
    publisher.publish(Publish::new(&t, b"a").qos(1, 0)).await;
    publisher.publish(Publish::new(&t, b"b").qos(1, 0)).await;
    let a = sub.expect_publish().await;
    let b = sub.expect_publish().await;
    for p in [&a, &b] {
        assert_eq!(
            (p.qos, p.dup),
            (1, false),
            "QoS 1 first delivery: QoS and DUP"
        );
        assert_ne!(p.id, 0, "QoS 1 delivery without a packet identifier");
    }
    assert_ne!(
        a.id, b.id,
        "two unacknowledged deliveries share a packet identifier"
    );
    sub.send(&puback(version, a.id)).await;
    sub.send(&puback(version, b.id)).await;
    sub.expect_nothing("after PUBACK for both deliveries").await;
    publisher.disconnect().await;
    sub.disconnect().await;
}

/// [MQTT-4.3.2-1] "In the QoS 1 delivery protocol, the Sender MUST assign an unused Packet
/// Identifier each time it has a new Application Message to publish. MUST send a PUBLISH
/// Packet containing this Packet Identifier with QoS=1, DUP=0. MUST treat the PUBLISH
/// Packet as "unacknowledged" until it has received the corresponding PUBACK packet from
/// the receiver."
#[tokio::test]
async fn mqtt_4_3_2_1_qos1_delivery_v311() {
    qos1_sender(V311).await;
}

/// [MQTT-4.3.2-1] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_4_3_2_1_qos1_delivery_v31() {
    qos1_sender(V31).await;
}

/// [MQTT-4.3.2-1] (MQTT 5.0) "... MUST assign an unused Packet Identifier each time it has a
/// new Application Message to publish." [MQTT-4.3.2-2]: "... MUST send a PUBLISH packet
/// containing this Packet Identifier with QoS 1 and DUP flag set to 0."
#[tokio::test]
async fn mqtt_4_3_2_2_qos1_delivery_v5() {
    qos1_sender(V5).await;
}

async fn qos2_receiver(version: u8) {
    let mut c = connect(version, "q2pub").await;
    let t = topic("q2");
    c.send(&Publish::new(&t, b"two").qos(2, 0x0202).encode(version))
        .await;
    match c.expect("PUBREC").await {
        Packet::Pubrec(a) => assert_eq!(a.id, 0x0202, "PUBREC packet identifier"),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    c.send(&pubrel(version, 0x0202)).await;
    match c.expect("PUBCOMP").await {
        Packet::Pubcomp(a) => assert_eq!(a.id, 0x0202, "PUBCOMP packet identifier"),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    c.disconnect().await;
}

/// [MQTT-4.3.3-2] "In the QoS 2 delivery protocol, the Receiver MUST respond with a PUBREC
/// containing the Packet Identifier from the incoming PUBLISH Packet, having accepted
/// ownership of the Application Message. ... MUST respond to a PUBREL packet by sending a
/// PUBCOMP packet containing the same Packet Identifier as the PUBREL."
#[tokio::test]
async fn mqtt_4_3_3_2_qos2_pubrec_pubcomp_v311() {
    qos2_receiver(V311).await;
}

/// [MQTT-4.3.3-2] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_4_3_3_2_qos2_pubrec_pubcomp_v31() {
    qos2_receiver(V31).await;
}

/// [MQTT-4.3.3-8] (MQTT 5.0) "In the QoS 2 delivery protocol, the receiver MUST respond with
/// a PUBREC containing the Packet Identifier from the incoming PUBLISH packet, having
/// accepted ownership of the Application Message." [MQTT-4.3.3-11]: "MUST respond to a
/// PUBREL packet by sending a PUBCOMP packet containing the same Packet Identifier as the
/// PUBREL."
#[tokio::test]
async fn mqtt_4_3_3_8_qos2_pubrec_pubcomp_v5() {
    qos2_receiver(V5).await;
}

async fn qos2_sender(version: u8) {
    let t = topic("q2");
    let mut sub = subscriber(version, &t, 2).await;
    publish_once(version, Publish::new(&t, b"two").qos(2, 0)).await;
    let p = sub.expect_publish().await;
    assert_eq!(
        (p.qos, p.dup),
        (2, false),
        "QoS 2 first delivery: QoS and DUP"
    );
    assert_ne!(p.id, 0);
    sub.expect_nothing("a second PUBLISH before PUBREC").await;
    sub.send(&pubrec(version, p.id)).await;
    match sub.expect("PUBREL").await {
        Packet::Pubrel(a) => assert_eq!(a.id, p.id, "PUBREL packet identifier"),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&support::wire::pubcomp(version, p.id)).await;
    sub.expect_nothing("after PUBCOMP").await;
    sub.disconnect().await;
}

/// [MQTT-4.3.3-1] "In the QoS 2 delivery protocol, the Sender MUST assign an unused Packet
/// Identifier when it has a new Application Message to publish. MUST send a PUBLISH packet
/// containing this Packet Identifier with QoS=2, DUP=0. ... MUST send a PUBREL packet when
/// it receives a PUBREC packet from the receiver. This PUBREL packet MUST contain the same
/// Packet Identifier as the original PUBLISH packet. ... MUST NOT re-send the PUBLISH once
/// it has sent the corresponding PUBREL packet." ([MQTT-3.6.1-1]: PUBREL flags 0,0,1,0.)
#[tokio::test]
async fn mqtt_4_3_3_1_qos2_delivery_v311() {
    qos2_sender(V311).await;
}

/// [MQTT-4.3.3-1] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_4_3_3_1_qos2_delivery_v31() {
    qos2_sender(V31).await;
}

/// [MQTT-4.3.3-2] (MQTT 5.0) "... MUST send a PUBLISH packet containing this Packet
/// Identifier with QoS 2 and DUP flag set to 0." [MQTT-4.3.3-4]: "MUST send a PUBREL
/// packet when it receives a PUBREC packet from the receiver with a Reason Code value less
/// than 0x80. This PUBREL packet MUST contain the same Packet Identifier as the original
/// PUBLISH packet."
#[tokio::test]
async fn mqtt_4_3_3_2_qos2_delivery_v5() {
    qos2_sender(V5).await;
}

async fn qos2_exactly_once(version: u8) {
    let t = topic("q2once");
    let mut sub = subscriber(version, &t, 2).await;
    let mut c = connect(version, "q2pub").await;
    let first = Publish::new(&t, b"once").qos(2, 7);
    for p in [first.clone(), first.clone().dup()] {
        c.send(&p.encode(version)).await;
        match c.expect("PUBREC").await {
            Packet::Pubrec(a) => assert_eq!(a.id, 7),
            other => panic!("expected PUBREC 7, got {other:?}"),
        }
    }
    c.send(&pubrel(version, 7)).await;
    assert!(matches!(c.expect("PUBCOMP").await, Packet::Pubcomp(a) if a.id == 7));
    assert_eq!(sub.receive().await.payload, b"once");
    sub.expect_no_publish_on(&t, "the duplicate QoS 2 PUBLISH delivered again")
        .await;
    // After PUBCOMP the same Packet Identifier is a new message.
    c.publish(Publish::new(&t, b"again").qos(2, 7)).await;
    assert_eq!(
        sub.receive().await.payload,
        b"again",
        "packet id 7 after PUBCOMP"
    );
    c.disconnect().await;
    sub.disconnect().await;
}

/// [MQTT-4.3.3-2] "Until it has received the corresponding PUBREL packet, the Receiver MUST
/// acknowledge any subsequent PUBLISH packet with the same Packet Identifier by sending a
/// PUBREC. It MUST NOT cause duplicate messages to be delivered to any onward recipients in
/// this case. ... After it has sent a PUBCOMP, the receiver MUST treat any subsequent
/// PUBLISH packet that contains that Packet Identifier as being a new publication."
#[tokio::test]
async fn mqtt_4_3_3_2_qos2_exactly_once_v311() {
    qos2_exactly_once(V311).await;
}

/// [MQTT-4.3.3-10] (MQTT 5.0) "Until it has received the corresponding PUBREL packet, the
/// receiver MUST acknowledge any subsequent PUBLISH packet with the same Packet Identifier
/// by sending a PUBREC. It MUST NOT cause duplicate messages to be delivered to any onward
/// recipients in this case." [MQTT-4.3.3-12]: "After it has sent a PUBCOMP, the receiver
/// MUST treat any subsequent PUBLISH packet that contains that Packet Identifier as being a
/// new Application Message."
#[tokio::test]
async fn mqtt_4_3_3_10_qos2_exactly_once_v5() {
    qos2_exactly_once(V5).await;
}

async fn qos1_id_reuse(version: u8) {
    let t = topic("q1again");
    let mut sub = subscriber(version, &t, 1).await;
    let mut c = connect(version, "q1pub").await;
    c.publish(Publish::new(&t, b"first").qos(1, 9)).await;
    c.publish(Publish::new(&t, b"second").qos(1, 9).dup()).await;
    assert_eq!(sub.receive().await.payload, b"first");
    assert_eq!(
        sub.receive().await.payload,
        b"second",
        "the second PUBLISH with packet id 9"
    );
    c.disconnect().await;
    sub.disconnect().await;
}

/// [MQTT-4.3.2-2] "After it has sent a PUBACK Packet the Receiver MUST treat any incoming
/// PUBLISH packet that contains the same Packet Identifier as being a new publication,
/// irrespective of the setting of its DUP flag."
#[tokio::test]
async fn mqtt_4_3_2_2_qos1_packet_id_reuse_v311() {
    qos1_id_reuse(V311).await;
}

/// [MQTT-4.3.2-5] (MQTT 5.0) "After it has sent a PUBACK packet the receiver MUST treat any
/// incoming PUBLISH packet that contains the same Packet Identifier as being a new
/// Application Message, irrespective of the setting of its DUP flag."
#[tokio::test]
async fn mqtt_4_3_2_5_qos1_packet_id_reuse_v5() {
    qos1_id_reuse(V5).await;
}

async fn dup_not_propagated(version: u8) {
    let t = topic("dup");
    let mut sub = subscriber(version, &t, 2).await;
    publish_once(version, Publish::new(&t, b"d1").qos(1, 0).dup()).await;
    publish_once(version, Publish::new(&t, b"d2").qos(2, 0).dup()).await;
    for _ in 0..2 {
        let p = sub.receive().await;
        assert!(!p.dup, "DUP copied from the incoming PUBLISH: {p:?}");
    }
    sub.disconnect().await;
}

/// [MQTT-3.3.1-3] "The value of the DUP flag from an incoming PUBLISH packet is not
/// propagated when the PUBLISH Packet is sent to subscribers by the Server. The DUP flag in
/// the outgoing PUBLISH packet is set independently to the incoming PUBLISH packet, its
/// value MUST be determined solely by whether the outgoing PUBLISH packet is a
/// retransmission."
#[tokio::test]
async fn mqtt_3_3_1_3_dup_not_propagated_v311() {
    dup_not_propagated(V311).await;
}

/// [MQTT-3.3.1-3] (MQTT 5.0) "The DUP flag in the outgoing PUBLISH packet is set
/// independently to the incoming PUBLISH packet, its value MUST be determined solely by
/// whether the outgoing PUBLISH packet is a retransmission."
#[tokio::test]
async fn mqtt_3_3_1_3_dup_not_propagated_v5() {
    dup_not_propagated(V5).await;
}

async fn ordered(version: u8) {
    let t = topic("order");
    let mut sub = subscriber(version, &t, 2).await;
    let mut c = connect(version, "orderpub").await;
    let qos_of = |i: u8| 1 + i % 2;
    for i in 0..30u8 {
        c.publish(Publish::new(&t, &[i]).qos(qos_of(i), 0)).await;
    }
    // Grouped by the QoS they were published at: the order holds per topic and QoS.
    let mut got = [Vec::new(), Vec::new()];
    for _ in 0..30 {
        let i = sub.receive().await.payload[0];
        got[usize::from(qos_of(i) - 1)].push(i);
    }
    for qos in [1u8, 2] {
        let sent: Vec<u8> = (0..30u8).filter(|i| qos_of(*i) == qos).collect();
        assert_eq!(
            got[usize::from(qos - 1)],
            sent,
            "QoS {qos} messages out of order"
        );
    }
    c.disconnect().await;
    sub.disconnect().await;
}

/// [MQTT-4.6.0-6] "When a Server processes a message that has been published to an Ordered
/// Topic, it MUST follow the rules listed above when delivering messages to each of its
/// subscribers. In addition it MUST send PUBLISH packets to consumers (for the same Topic
/// and QoS) in the order that they were received from any given Client." ([MQTT-4.6.0-5]:
/// every Topic is an Ordered Topic by default.)
#[tokio::test]
async fn mqtt_4_6_0_6_ordered_delivery_v311() {
    ordered(V311).await;
}

/// [MQTT-4.6.0-5] (MQTT 5.0) "When a Server processes a message that has been published to
/// an Ordered Topic, it MUST send PUBLISH packets to consumers (for the same Topic and QoS)
/// in the order that they were received from any given Client." [MQTT-4.6.0-6]: "A Server
/// MUST treat every, Topic as an Ordered Topic when it is forwarding messages on Non-shared
/// Subscriptions."
#[tokio::test]
async fn mqtt_4_6_0_5_ordered_delivery_v5() {
    ordered(V5).await;
}

async fn qos_downgrade(version: u8) {
    let t = topic("minqos");
    let mut sub0 = subscriber(version, &t, 0).await;
    let mut sub1 = subscriber(version, &t, 1).await;
    let mut sub2 = subscriber(version, &t, 2).await;
    for qos in [0u8, 1, 2] {
        publish_once(version, Publish::new(&t, &[qos]).qos(qos, 0)).await;
        for (granted, sub) in [(0u8, &mut sub0), (1, &mut sub1), (2, &mut sub2)] {
            let p = sub.receive().await;
            assert_eq!(p.payload, [qos]);
            assert_eq!(
                p.qos,
                qos.min(granted),
                "QoS {qos} message on a QoS {granted} subscription"
            );
        }
    }
    for sub in [sub0, sub1, sub2] {
        sub.disconnect().await;
    }
}

/// [MQTT-3.8.4-6] "The QoS of Payload Messages sent in response to a Subscription MUST be the
/// minimum of the QoS of the originally published message and the maximum QoS granted by the
/// Server."
#[tokio::test]
async fn mqtt_3_8_4_6_delivery_qos_is_minimum_v311() {
    qos_downgrade(V311).await;
}

/// [MQTT-3.8.4-8] (MQTT 5.0) "The QoS of Application Messages sent in response to a
/// Subscription MUST be the minimum of the QoS of the originally published message and the
/// Maximum QoS granted by the Server."
#[tokio::test]
async fn mqtt_3_8_4_8_delivery_qos_is_minimum_v5() {
    qos_downgrade(V5).await;
}

// ---------------------------------------------------------------------------------------
// PUBLISH: protocol errors

/// A QoS 2 PUBLISH (id 1) followed by a PUBREL whose fixed header is `first`.
fn publish_then_pubrel(version: u8, first: u8) -> Vec<u8> {
    let mut bytes = Publish::new(&topic("rel"), b"x").qos(2, 1).encode(version);
    let mut body = vec![0, 1];
    if version == V5 {
        body.extend([0, 0]);
    }
    bytes.extend(with_header(first, &body));
    bytes
}

/// [MQTT-3.6.1-1] "Bits 3,2,1 and 0 of the fixed header in the PUBREL Control Packet are
/// reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
/// value as malformed and close the Network Connection."
#[tokio::test]
async fn mqtt_3_6_1_1_pubrel_reserved_flags_v311() {
    for first in [0x60, 0x63, 0x6A] {
        let case = format!("PUBREL with fixed header {first:#04x}");
        closes_tolerating(
            &case,
            V311,
            true,
            &publish_then_pubrel(V311, first),
            &[],
            &["PUBREC"],
        )
        .await;
    }
}

/// [MQTT-3.6.1-1] (MQTT 5.0) "Bits 3,2,1 and 0 of the Fixed Header in the PUBREL packet are
/// reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
/// value as malformed and close the Network Connection."
#[tokio::test]
async fn mqtt_3_6_1_1_pubrel_reserved_flags_v5() {
    for first in [0x60, 0x63] {
        let case = format!("PUBREL with fixed header {first:#04x}");
        closes_tolerating(
            &case,
            V5,
            true,
            &publish_then_pubrel(V5, first),
            BAD,
            &["PUBREC"],
        )
        .await;
    }
}

fn publish_qos3(version: u8) -> Vec<u8> {
    let mut body = string(&topic("q3"));
    body.extend([0, 1]);
    if version == V5 {
        body.push(0);
    }
    body.extend(b"three");
    with_header(0x36, &body)
}

/// [MQTT-3.3.1-4] "A PUBLISH Packet MUST NOT have both QoS bits set to 1. If a Server or
/// Client receives a PUBLISH Packet which has both QoS bits set to 1 it MUST close the
/// Network Connection."
#[tokio::test]
async fn mqtt_3_3_1_4_publish_qos_3_v311() {
    closes("PUBLISH QoS 3", V311, true, &publish_qos3(V311), &[]).await;
}

/// [MQTT-3.3.1-4] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_3_3_1_4_publish_qos_3_v31() {
    closes("PUBLISH QoS 3", V31, true, &publish_qos3(V31), &[]).await;
}

/// [MQTT-3.3.1-4] (MQTT 5.0) "A PUBLISH Packet MUST NOT have both QoS bits set to 1." (A
/// QoS of 3 is a Malformed Packet.)
#[tokio::test]
async fn mqtt_3_3_1_4_publish_qos_3_v5() {
    closes("PUBLISH QoS 3", V5, true, &publish_qos3(V5), BAD).await;
}

/// [MQTT-3.3.2-2] "The Topic Name in the PUBLISH Packet MUST NOT contain wildcard
/// characters." ([MQTT-4.7.1-1]: "The wildcard characters can be used in Topic Filters, but
/// MUST NOT be used within a Topic Name.")
#[tokio::test]
async fn mqtt_3_3_2_2_publish_topic_with_wildcard_v311() {
    for (name, qos) in [("conf/+/x", 0u8), ("conf/#", 1), ("+", 0), ("conf/a#", 1)] {
        let p = Publish::new(name, b"w")
            .qos(qos, u16::from(qos))
            .encode(V311);
        closes(&format!("PUBLISH to {name:?}"), V311, true, &p, &[]).await;
    }
}

/// [MQTT-3.3.2-2] (MQTT 5.0) "The Topic Name in the PUBLISH packet MUST NOT contain wildcard
/// characters." A DISCONNECT, if any, says 0x90 (Topic Name invalid), 0x81 or 0x82.
#[tokio::test]
async fn mqtt_3_3_2_2_publish_topic_with_wildcard_v5() {
    for (name, qos) in [("conf/+/x", 0u8), ("conf/#", 1)] {
        let p = Publish::new(name, b"w").qos(qos, u16::from(qos)).encode(V5);
        closes(
            &format!("PUBLISH to {name:?}"),
            V5,
            true,
            &p,
            &[0x81, 0x82, 0x90],
        )
        .await;
    }
}

/// [MQTT-2.3.1-1] "SUBSCRIBE, UNSUBSCRIBE, and PUBLISH (in cases where QoS > 0) Control
/// Packets MUST contain a non-zero 16-bit Packet Identifier."
#[tokio::test]
async fn mqtt_2_3_1_1_publish_packet_id_0_v311() {
    for qos in [1u8, 2] {
        let p = Publish::new(&topic("id0"), b"0").qos(qos, 0).encode(V311);
        closes(
            &format!("QoS {qos} PUBLISH with packet id 0"),
            V311,
            true,
            &p,
            &[],
        )
        .await;
    }
}

/// [MQTT-2.2.1-3] (MQTT 5.0) "Each time a Client sends a new SUBSCRIBE, UNSUBSCRIBE, or
/// PUBLISH (where QoS > 0) MQTT Control Packet it MUST assign it a non-zero Packet
/// Identifier that is currently unused." Packet identifier 0 is a Protocol Error.
#[tokio::test]
async fn mqtt_2_2_1_3_publish_packet_id_0_v5() {
    for qos in [1u8, 2] {
        let p = Publish::new(&topic("id0"), b"0").qos(qos, 0).encode(V5);
        closes(
            &format!("QoS {qos} PUBLISH with packet id 0"),
            V5,
            true,
            &p,
            BAD,
        )
        .await;
    }
}

/// [MQTT-3.3.4-6] (MQTT 5.0) "A PUBLISH packet sent from a Client to a Server MUST NOT
/// contain a Subscription Identifier." (A Protocol Error: [MQTT-4.13.1-1] closes the
/// connection.) mosquitto 2.0.11 deviates: it accepts the PUBLISH.
#[tokio::test]
async fn mqtt_3_3_4_6_publish_with_subscription_identifier_v5() {
    let p = Publish::new(&topic("subid"), b"s")
        .qos(1, 1)
        .prop(Prop::Var(prop::SUBSCRIPTION_IDENTIFIER, 5))
        .encode(V5);
    closes("PUBLISH with a Subscription Identifier", V5, true, &p, BAD).await;
}

// ---------------------------------------------------------------------------------------
// Retained messages

/// Clears the retained message on `t` (a zero-byte retained PUBLISH).
async fn clear_retained(version: u8, t: &str) {
    publish_once(version, Publish::new(t, b"").retain()).await;
}

async fn retained_stored(version: u8) {
    let t = topic("ret");
    publish_once(version, Publish::new(&t, b"kept").qos(1, 0).retain()).await;
    let mut late = subscriber(version, &t, 2).await;
    let p = late.receive().await;
    assert_eq!(p.payload, b"kept");
    assert!(
        p.retain,
        "a retained message sent for a new subscription has RETAIN 0"
    );
    assert_eq!(p.qos, 1, "the retained message's stored QoS");
    late.disconnect().await;
    clear_retained(version, &t).await;
}

/// [MQTT-3.3.1-5] "If the RETAIN flag is set to 1, in a PUBLISH Packet sent by a Client to a
/// Server, the Server MUST store the Application Message and its QoS, so that it can be
/// delivered to future subscribers whose subscriptions match its topic name."
/// [MQTT-3.3.1-6]: "When a new subscription is established, the last retained message, if
/// any, on each matching topic name MUST be sent to the subscriber." [MQTT-3.3.1-8]: "...
/// the Server MUST set the RETAIN flag to 1 if a message is sent as a result of a new
/// subscription being made by a Client." [MQTT-3.1.2-7]: retained messages outlive the
/// publisher's session.
#[tokio::test]
async fn mqtt_3_3_1_5_retained_message_stored_v311() {
    retained_stored(V311).await;
}

/// [MQTT-3.3.1-5] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_3_3_1_5_retained_message_stored_v31() {
    retained_stored(V31).await;
}

/// [MQTT-3.3.1-5] (MQTT 5.0) "If the RETAIN flag is set to 1 in a PUBLISH packet sent by a
/// Client to a Server, the Server MUST replace any existing retained message for this topic
/// and store the Application Message." Sent on a new subscription with RETAIN 1 (section
/// 3.3.1.3).
#[tokio::test]
async fn mqtt_3_3_1_5_retained_message_stored_v5() {
    retained_stored(V5).await;
}

async fn retained_replaced(version: u8) {
    let t = topic("ret");
    publish_once(version, Publish::new(&t, b"old").qos(1, 0).retain()).await;
    publish_once(version, Publish::new(&t, b"new").qos(1, 0).retain()).await;
    let mut late = subscriber(version, &t, 1).await;
    assert_eq!(late.receive().await.payload, b"new");
    late.expect_no_publish_on(&t, "a replaced retained message")
        .await;
    late.disconnect().await;
    clear_retained(version, &t).await;
}

/// [MQTT-3.3.1-6]: "... the last retained message, if any, on each matching topic name MUST
/// be sent to the subscriber": a second retained PUBLISH replaces the first.
#[tokio::test]
async fn mqtt_3_3_1_6_retained_message_replaced_v311() {
    retained_replaced(V311).await;
}

/// [MQTT-3.3.1-5] (MQTT 5.0) "... the Server MUST replace any existing retained message for
/// this topic and store the Application Message."
#[tokio::test]
async fn mqtt_3_3_1_5_retained_message_replaced_v5() {
    retained_replaced(V5).await;
}

async fn retained_cleared(version: u8) {
    let t = topic("ret");
    let mut live = subscriber(version, &t, 1).await;
    publish_once(version, Publish::new(&t, b"soon gone").qos(1, 0).retain()).await;
    live.receive().await;
    publish_once(version, Publish::new(&t, b"").qos(1, 0).retain()).await;
    let cleared = live.receive().await;
    assert!(
        cleared.payload.is_empty(),
        "the zero-byte retained PUBLISH is delivered as usual"
    );
    live.disconnect().await;
    let mut late = subscriber(version, &t, 1).await;
    late.expect_no_publish_on(&t, "a retained message cleared by a zero-byte payload")
        .await;
    late.disconnect().await;
}

/// [MQTT-3.3.1-10] "A PUBLISH Packet with a RETAIN flag set to 1 and a payload containing
/// zero bytes will be processed as normal by the Server and sent to Clients with a
/// subscription matching the topic name. Additionally any existing retained message with
/// the same topic name MUST be removed and any future subscribers for the topic will not
/// receive a retained message." [MQTT-3.3.1-11]: "A zero byte retained message MUST NOT be
/// stored as a retained message on the Server."
#[tokio::test]
async fn mqtt_3_3_1_10_empty_retained_message_clears_v311() {
    retained_cleared(V311).await;
}

/// [MQTT-3.3.1-6] (MQTT 5.0) "If the Payload contains zero bytes it is processed normally by
/// the Server but any retained message with the same topic name MUST be removed and any
/// future subscribers for the topic will not receive a retained message." [MQTT-3.3.1-7]:
/// "A retained message with a Payload containing zero bytes MUST NOT be stored as a retained
/// message on the Server."
#[tokio::test]
async fn mqtt_3_3_1_6_empty_retained_message_clears_v5() {
    retained_cleared(V5).await;
}

async fn unretained_keeps_retained(version: u8) {
    let t = topic("ret");
    publish_once(version, Publish::new(&t, b"kept").qos(1, 0).retain()).await;
    publish_once(version, Publish::new(&t, b"passing").qos(1, 0)).await;
    publish_once(version, Publish::new(&t, b"").qos(1, 0)).await;
    let mut late = subscriber(version, &t, 1).await;
    let p = late.receive().await;
    assert_eq!((p.payload.as_slice(), p.retain), (&b"kept"[..], true));
    late.expect_no_publish_on(&t, "a non-retained message stored")
        .await;
    late.disconnect().await;
    clear_retained(version, &t).await;
}

/// [MQTT-3.3.1-12] "If the RETAIN flag is 0, in a PUBLISH Packet sent by a Client to a
/// Server, the Server MUST NOT store the message and MUST NOT remove or replace any existing
/// retained message." (Not even with a zero-byte payload.)
#[tokio::test]
async fn mqtt_3_3_1_12_unretained_publish_keeps_retained_v311() {
    unretained_keeps_retained(V311).await;
}

/// [MQTT-3.3.1-8] (MQTT 5.0) "If the RETAIN flag is 0 in a PUBLISH packet sent by a Client
/// to a Server, the Server MUST NOT store the message as a retained message and MUST NOT
/// remove or replace any existing retained message."
#[tokio::test]
async fn mqtt_3_3_1_8_unretained_publish_keeps_retained_v5() {
    unretained_keeps_retained(V5).await;
}

/// [MQTT-3.3.1-9] "It MUST set the RETAIN flag to 0 when a PUBLISH Packet is sent to a
/// Client because it matches an established subscription regardless of how the flag was
/// set in the message it received."
#[tokio::test]
async fn mqtt_3_3_1_9_live_delivery_has_retain_0_v311() {
    let t = topic("ret");
    let mut live = subscriber(V311, &t, 1).await;
    publish_once(V311, Publish::new(&t, b"now").qos(1, 0).retain()).await;
    let p = live.receive().await;
    assert!(
        !p.retain,
        "a live delivery of a retained PUBLISH with RETAIN 1"
    );
    live.disconnect().await;
    clear_retained(V311, &t).await;
}

/// [MQTT-3.3.1-7] "If the Server receives a QoS 0 message with the RETAIN flag set to 1 it
/// MUST discard any message previously retained for that topic. It SHOULD store the new QoS
/// 0 message as the new retained message for that topic, but MAY choose to discard it at
/// any time." The old message never comes back.
#[tokio::test]
async fn mqtt_3_3_1_7_qos0_retained_replaces_v311() {
    let t = topic("ret");
    publish_once(V311, Publish::new(&t, b"old").qos(1, 0).retain()).await;
    publish_once(V311, Publish::new(&t, b"new").retain()).await;
    let mut late = subscriber(V311, &t, 1).await;
    match late.recv(QUIET).await {
        Recv::Timeout => {}
        Recv::Packet(Packet::Publish(p)) => assert_eq!(p.payload, b"new", "{p:?}"),
        other => panic!("{other:?}"),
    }
    late.disconnect().await;
    clear_retained(V311, &t).await;
}

// =======================================================================================
// SUBSCRIBE, SUBACK, topic matching

/// [MQTT-3.8.1-1] "Bits 3,2,1 and 0 of the fixed header of the SUBSCRIBE Control Packet are
/// reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
/// value as malformed and close the Network Connection."
#[tokio::test]
async fn mqtt_3_8_1_1_subscribe_reserved_flags_v311() {
    for first in [0x80u8, 0x83, 0x8A] {
        let mut p = subscribe(V311, 1, &[(&topic("flags"), 0)], &[]);
        p[0] = first;
        closes(
            &format!("SUBSCRIBE with fixed header {first:#04x}"),
            V311,
            true,
            &p,
            &[],
        )
        .await;
    }
}

/// [MQTT-3.8.1-1] (MQTT 5.0) Same rule for MQTT 5.
#[tokio::test]
async fn mqtt_3_8_1_1_subscribe_reserved_flags_v5() {
    let mut p = subscribe(V5, 1, &[(&topic("flags"), 0)], &[]);
    p[0] = 0x80;
    closes("SUBSCRIBE with fixed header 0x80", V5, true, &p, BAD).await;
}

/// [MQTT-3.8.3-3] "The payload of a SUBSCRIBE packet MUST contain at least one Topic Filter
/// / QoS pair. A SUBSCRIBE packet with no payload is a protocol violation."
#[tokio::test]
async fn mqtt_3_8_3_3_subscribe_without_filters_v311() {
    closes(
        "SUBSCRIBE without filters",
        V311,
        true,
        &subscribe(V311, 1, &[], &[]),
        &[],
    )
    .await;
}

/// [MQTT-3.8.3-2] (MQTT 5.0) "The Payload MUST contain at least one Topic Filter and
/// Subscription Options pair." (A SUBSCRIBE without one is a Protocol Error.)
#[tokio::test]
async fn mqtt_3_8_3_2_subscribe_without_filters_v5() {
    closes(
        "SUBSCRIBE without filters",
        V5,
        true,
        &subscribe(V5, 1, &[], &[]),
        BAD,
    )
    .await;
}

/// Subscribes to a valid filter and `bad` in one SUBSCRIBE: either the SUBACK grants the
/// first and refuses `bad` (a failure code, 0x80 or above), or the broker treats `bad` as a
/// protocol violation and closes the connection (MQTT 5: saying 0x81, 0x82 or 0x8F).
async fn invalid_filter(version: u8, bad: &str) {
    let case = format!("SUBSCRIBE to {bad:?}");
    let witness = Witness::new().await;
    let mut c = connect(version, "badfilter").await;
    let good = topic("good");
    c.send(&subscribe(version, 3, &[(&good, 1), (bad, 1)], &[]))
        .await;
    let reply = c
        .try_wait_for(WAIT, |p| match p {
            Packet::Suback { id, codes, .. } => Some((*id, codes.clone())),
            _ => None,
        })
        .await;
    match reply {
        Ok((id, codes)) => {
            assert_eq!(id, 3, "{case}: SUBACK packet identifier");
            assert_eq!(codes.len(), 2, "{case}: SUBACK codes {codes:?}");
            assert!(
                codes[0] <= 1,
                "{case}: the valid filter was refused: {codes:?}"
            );
            if version == V5 {
                assert!(codes[1] >= 0x80, "{case}: granted {codes:?}");
            } else {
                assert_eq!(codes[1], 0x80, "{case}: SUBACK codes {codes:?}");
            }
            c.disconnect().await;
        }
        Err((Recv::Closed, before)) => {
            check_goodbye(version, &case, &before, &[0x81, 0x82, 0x8F], &[])
        }
        Err((other, _)) => panic!("{case}: neither SUBACK nor close: {other:?}"),
    }
    witness.check(&case).await;
}

/// [MQTT-4.7.1-2] "The multi-level wildcard character MUST be specified either on its own or
/// following a topic level separator. In either case it MUST be the last character
/// specified in the Topic Filter."
#[tokio::test]
async fn mqtt_4_7_1_2_invalid_multi_level_wildcard_v311() {
    for bad in ["conf/#/b", "conf#", "conf/b#"] {
        invalid_filter(V311, bad).await;
    }
}

/// [MQTT-4.7.1-3] "The single-level wildcard can be used at any level in the Topic Filter,
/// including first and last levels. Where it is used it MUST occupy an entire level of the
/// filter."
#[tokio::test]
async fn mqtt_4_7_1_3_invalid_single_level_wildcard_v311() {
    for bad in ["conf+", "conf/+b", "+a/b"] {
        invalid_filter(V311, bad).await;
    }
}

/// [MQTT-4.7.3-1] "All Topic Names and Topic Filters MUST be at least one character long."
#[tokio::test]
async fn mqtt_4_7_3_1_empty_topic_filter_v311() {
    invalid_filter(V311, "").await;
}

/// [MQTT-4.7.1-1] (MQTT 5.0) "The multi-level wildcard character MUST be specified either
/// on its own or following a topic level separator. In either case it MUST be the last
/// character specified in the Topic Filter."
#[tokio::test]
async fn mqtt_4_7_1_1_invalid_multi_level_wildcard_v5() {
    for bad in ["conf/#/b", "conf#"] {
        invalid_filter(V5, bad).await;
    }
}

/// [MQTT-4.7.1-2] (MQTT 5.0) "The single-level wildcard can be used at any level in the
/// Topic Filter, including first and last levels. Where it is used, it MUST occupy an
/// entire level of the filter."
#[tokio::test]
async fn mqtt_4_7_1_2_invalid_single_level_wildcard_v5() {
    for bad in ["conf+", "conf/+b"] {
        invalid_filter(V5, bad).await;
    }
}

async fn suback_in_order(version: u8) {
    let mut c = connect(version, "subackorder").await;
    let (a, b, d) = (topic("a"), topic("b"), topic("d"));
    let codes = c.subscribe_with(&[(&a, 2), (&b, 0), (&d, 1)], &[]).await;
    for (code, asked) in codes.iter().zip([2u8, 0, 1]) {
        assert!(*code <= asked, "granted {codes:?} for requested [2, 0, 1]");
    }
    // The grants are the ones in force: a QoS 2 message comes at most at each granted QoS.
    let mut publisher = connect(version, "subackpub").await;
    for (t, code) in [(&a, codes[0]), (&b, codes[1]), (&d, codes[2])] {
        publisher.publish(Publish::new(t, b"q").qos(2, 0)).await;
        let p = c.receive_on(t).await;
        assert_eq!(p.qos, code, "delivery QoS on {t} granted {code}");
    }
    publisher.disconnect().await;
    c.disconnect().await;
}

/// [MQTT-3.9.3-1] "The order of return codes in the SUBACK Packet MUST match the order of
/// Topic Filters in the SUBSCRIBE Packet." [MQTT-3.8.4-5]: "The SUBACK Packet sent by the
/// Server to the Client MUST contain a return code for each Topic Filter/QoS pair. This
/// return code MUST either show the maximum QoS that was granted for that Subscription or
/// indicate that the subscription failed." ([MQTT-3.8.4-4]: one SUBACK for several filters.)
#[tokio::test]
async fn mqtt_3_9_3_1_suback_codes_in_order_v311() {
    suback_in_order(V311).await;
}

/// [MQTT-3.9.3-1] (MQTT 5.0) "The order of Reason Codes in the SUBACK packet MUST match the
/// order of Topic Filters in the SUBSCRIBE packet." [MQTT-3.8.4-6], [MQTT-3.8.4-7]: a Reason
/// Code for each filter, showing the maximum QoS granted.
#[tokio::test]
async fn mqtt_3_9_3_1_suback_codes_in_order_v5() {
    suback_in_order(V5).await;
}

/// [MQTT-3-8.3-4] "The Server MUST treat a SUBSCRIBE packet as malformed and close the
/// Network Connection if any of Reserved bits in the payload are non-zero, or QoS is not 0,1
/// or 2."
#[tokio::test]
async fn mqtt_3_8_3_4_subscribe_bad_requested_qos_v311() {
    for options in [0x03u8, 0x04, 0x81] {
        let p = subscribe(V311, 1, &[(&topic("opts"), options)], &[]);
        closes(
            &format!("SUBSCRIBE options {options:#04x}"),
            V311,
            true,
            &p,
            &[],
        )
        .await;
    }
}

/// [MQTT-3.8.3-5] (MQTT 5.0) "The Server MUST treat a SUBSCRIBE packet as malformed if any
/// of Reserved bits in the Payload are non-zero." Maximum QoS 3 and Retain Handling 3 are
/// Protocol Errors (section 3.8.3.1).
#[tokio::test]
async fn mqtt_3_8_3_5_subscribe_bad_options_v5() {
    for options in [0x40u8, 0x80, 0x03, 0x30] {
        let p = subscribe(V5, 1, &[(&topic("opts"), options)], &[]);
        closes(
            &format!("SUBSCRIBE options {options:#04x}"),
            V5,
            true,
            &p,
            BAD,
        )
        .await;
    }
}

async fn replace_subscription(version: u8) {
    let t = topic("replace");
    publish_once(version, Publish::new(&t, b"kept").qos(2, 0).retain()).await;
    let mut c = connect(version, "replace").await;
    c.subscribe(&t, 0).await;
    assert_eq!(
        c.receive().await.qos,
        0,
        "retained message at the first subscription's QoS"
    );
    c.subscribe(&t, 2).await;
    let again = c.receive().await;
    assert!(
        again.retain && again.payload == b"kept",
        "retained message not re-sent: {again:?}"
    );
    assert_eq!(again.qos, 2, "re-sent at the new subscription's QoS");
    publish_once(version, Publish::new(&t, b"live").qos(2, 0)).await;
    let live = c.receive().await;
    assert_eq!((live.payload.as_slice(), live.qos), (&b"live"[..], 2));
    c.expect_no_publish_on(
        &t,
        "a second copy: the subscription was added, not replaced",
    )
    .await;
    c.disconnect().await;
    clear_retained(version, &t).await;
}

/// [MQTT-3.8.4-3] "If a Server receives a SUBSCRIBE Packet containing a Topic Filter that is
/// identical to an existing Subscription's Topic Filter then it MUST completely replace
/// that existing Subscription with a new Subscription. The Topic Filter in the new
/// Subscription will be identical to that in the previous Subscription, although its
/// maximum QoS value could be different. Any existing retained messages matching the Topic
/// Filter MUST be re-sent, but the flow of publications MUST NOT be interrupted."
#[tokio::test]
async fn mqtt_3_8_4_3_subscription_replaced_v311() {
    replace_subscription(V311).await;
}

/// [MQTT-3.8.4-3] (MQTT 5.0) "If a Server receives a SUBSCRIBE packet containing a Topic
/// Filter that is identical to a Non-shared Subscription's Topic Filter for the current
/// Session, then it MUST replace that existing Subscription with a new Subscription."
/// [MQTT-3.8.4-4]: "If the Retain Handling option is 0, any existing retained messages
/// matching the Topic Filter MUST be re-sent, but Application Messages MUST NOT be lost due
/// to replacing the Subscription."
#[tokio::test]
async fn mqtt_3_8_4_3_subscription_replaced_v5() {
    replace_subscription(V5).await;
}

/// Copies of one message that a client with overlapping subscriptions gets.
async fn overlapping_copies(
    version: u8,
    filters: &[(&str, u8)],
    props: &[&[Prop]],
    t: &str,
) -> Vec<Publish> {
    let mut c = connect(version, "overlap").await;
    for (i, (filter, qos)) in filters.iter().enumerate() {
        let sub_props = props.get(i).copied().unwrap_or(&[]);
        let codes = c.subscribe_with(&[(filter, *qos)], sub_props).await;
        assert_eq!(codes, vec![*qos], "SUBACK for {filter}");
    }
    publish_once(version, Publish::new(t, b"overlap").qos(2, 0)).await;
    let mut copies = vec![c.receive().await];
    loop {
        match c.recv(QUIET).await {
            Recv::Timeout => break,
            Recv::Packet(Packet::Publish(p)) => {
                c.ack(&p).await;
                copies.push(p);
            }
            other => panic!("overlapping subscriptions: {other:?}"),
        }
    }
    c.disconnect().await;
    assert!(
        copies.len() <= filters.len(),
        "more copies than matching subscriptions: {copies:?}"
    );
    copies
}

/// [MQTT-3.3.5-1] "The Server MUST deliver the message to the Client respecting the maximum
/// QoS of all the matching subscriptions." It "MAY deliver further copies of the message,
/// one for each additional matching subscription and respecting the subscription's QoS in
/// each case." mosquitto 2.0.11 deviates for MQTT 3.1.1 clients: with "#" at QoS 0, "+/x"
/// at QoS 2 and the exact topic at QoS 1 it sends one copy, at QoS 1 (with two of them it
/// gets the maximum right; MQTT 5 clients get a copy per subscription).
#[tokio::test]
async fn mqtt_3_3_5_1_overlapping_subscriptions_v311() {
    let t = topic("o/x");
    let base = t.trim_end_matches("/o/x").to_string();
    let filters = [
        (format!("{base}/#"), 0u8),
        (format!("{base}/+/x"), 2),
        (t.clone(), 1),
    ];
    let filters: Vec<(&str, u8)> = filters.iter().map(|(f, q)| (f.as_str(), *q)).collect();
    let copies = overlapping_copies(V311, &filters, &[], &t).await;
    assert!(
        copies.iter().any(|p| p.qos == 2),
        "no copy at the maximum QoS 2: {copies:?}"
    );
}

/// [MQTT-3.3.4-2] (MQTT 5.0) "In this case the Server MUST deliver the message to the
/// Client respecting the maximum QoS of all the matching subscriptions."
#[tokio::test]
async fn mqtt_3_3_4_2_overlapping_subscriptions_v5() {
    let t = topic("o/x");
    let base = t.trim_end_matches("/o/x").to_string();
    let filters = [
        (format!("{base}/#"), 0u8),
        (format!("{base}/+/x"), 2),
        (t.clone(), 1),
    ];
    let filters: Vec<(&str, u8)> = filters.iter().map(|(f, q)| (f.as_str(), *q)).collect();
    let copies = overlapping_copies(V5, &filters, &[], &t).await;
    assert!(
        copies.iter().any(|p| p.qos == 2),
        "no copy at the maximum QoS 2: {copies:?}"
    );
}

/// [MQTT-3.3.4-3] (MQTT 5.0) "If the Client specified a Subscription Identifier for any of
/// the overlapping subscriptions the Server MUST send those Subscription Identifiers in the
/// message which is published as the result of the subscriptions." [MQTT-3.3.4-4]: "If the
/// Server sends a single copy of the message it MUST include in the PUBLISH packet the
/// Subscription Identifiers for all matching subscriptions which have a Subscription
/// Identifiers, their order is not significant." [MQTT-3.3.4-5]: "If the Server sends
/// multiple PUBLISH packets it MUST send, in each of them, the Subscription Identifier of
/// the matching subscription if it has a Subscription Identifier."
#[tokio::test]
async fn mqtt_3_3_4_3_overlapping_subscription_identifiers_v5() {
    let t = topic("o/x");
    let base = t.trim_end_matches("/o/x").to_string();
    let filters = [
        (format!("{base}/#"), 1u8),
        (format!("{base}/+/x"), 1),
        (t.clone(), 1),
    ];
    let filters: Vec<(&str, u8)> = filters.iter().map(|(f, q)| (f.as_str(), *q)).collect();
    let ids: [&[Prop]; 3] = [
        &[Prop::Var(prop::SUBSCRIPTION_IDENTIFIER, 11)],
        &[Prop::Var(prop::SUBSCRIPTION_IDENTIFIER, 268_435_455)],
        &[],
    ];
    let copies = overlapping_copies(V5, &filters, &ids, &t).await;
    let mut all: Vec<u32> = copies
        .iter()
        .flat_map(|p| p.props.subscription_ids())
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        vec![11, 268_435_455],
        "Subscription Identifiers over all copies: {copies:?}"
    );
    if copies.len() > 1 {
        for p in &copies {
            assert!(
                p.props.subscription_ids().len() <= 1,
                "a copy with two identifiers: {p:?}"
            );
        }
    }
}

async fn wildcard_matching(version: u8) {
    let root = topic("m");
    let mut c = connect(version, "match").await;
    let plus = format!("{root}/+/c");
    let hash = format!("{root}/a/#");
    c.subscribe(&plus, 1).await;
    c.subscribe(&hash, 1).await;
    let cases = [
        (format!("{root}/a/c"), 2),   // both
        (format!("{root}/b/c"), 1),   // plus
        (format!("{root}//c"), 1),    // plus matches an empty level
        (format!("{root}/a"), 1),     // hash matches its parent level
        (format!("{root}/a/b/c"), 1), // hash, several levels
        (format!("{root}/b/c/d"), 0),
        (format!("{root}/b"), 0),
    ];
    let mut publisher = connect(version, "matchpub").await;
    for (name, _) in &cases {
        publisher
            .publish(Publish::new(name, name.as_bytes()).qos(1, 0))
            .await;
    }
    publisher
        .publish(Publish::new(&format!("{root}/a/end"), b"end").qos(1, 0))
        .await;
    let mut got = Vec::new();
    loop {
        let p = c.receive().await;
        if p.payload == b"end" {
            break;
        }
        assert_eq!(
            p.payload,
            p.topic.as_bytes(),
            "[MQTT-3.3.2-3] delivered under another name"
        );
        got.push(p.topic);
    }
    for (name, matches) in &cases {
        let n = got.iter().filter(|t| *t == name).count();
        // Overlapping matches may come as one copy or as two.
        let ok = match matches {
            0 => n == 0,
            1 => n == 1,
            _ => n == 1 || n == 2,
        };
        assert!(
            ok,
            "{name}: {n} deliveries for {plus:?} and {hash:?} (got {got:?})"
        );
    }
    publisher.disconnect().await;
    c.disconnect().await;
}

/// Sections 4.7.1.2 and 4.7.1.3: "#" matches the parent level and any number of child
/// levels; "+" matches exactly one level, an empty one included. [MQTT-3.3.2-3]: "The Topic
/// Name in a PUBLISH Packet sent by a Server to a subscribing Client MUST match the
/// Subscription's Topic Filter according to the matching process defined in Section 4.7."
#[tokio::test]
async fn sec_4_7_1_wildcard_matching_v311() {
    wildcard_matching(V311).await;
}

/// Sections 4.7.1.2 and 4.7.1.3 (MQTT 5.0), and [MQTT-3.3.2-3].
#[tokio::test]
async fn sec_4_7_1_wildcard_matching_v5() {
    wildcard_matching(V5).await;
}

async fn dollar_topics(version: u8) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!("$conf{}x{n}/dollar", std::process::id());
    let mut all = connect(version, "hash").await;
    all.subscribe("#", 0).await;
    let mut plus = connect(version, "plus").await;
    plus.subscribe("+/dollar", 0).await;
    let mut exact = connect(version, "dollar").await;
    let dollar_filter = format!("{}/#", name.split('/').next().expect("a first level"));
    exact.subscribe(&dollar_filter, 0).await;
    publish_once(version, Publish::new(&name, b"$").qos(1, 0)).await;
    assert_eq!(
        exact.receive_on(&name).await.payload,
        b"$",
        "{dollar_filter} matches {name}"
    );
    all.expect_no_publish_on(&name, "\"#\" matched a topic starting with $")
        .await;
    plus.expect_no_publish_on(&name, "\"+/dollar\" matched a topic starting with $")
        .await;
    for c in [all, plus, exact] {
        c.disconnect().await;
    }
}

/// [MQTT-4.7.2-1] "The Server MUST NOT match Topic Filters starting with a wildcard
/// character (# or +) with Topic Names beginning with a $ character."
#[tokio::test]
async fn mqtt_4_7_2_1_dollar_topics_not_matched_by_wildcards_v311() {
    dollar_topics(V311).await;
}

/// [MQTT-4.7.2-1] (MQTT 5.0) Same rule.
#[tokio::test]
async fn mqtt_4_7_2_1_dollar_topics_not_matched_by_wildcards_v5() {
    dollar_topics(V5).await;
}

/// [MQTT-4.7.3-4] "When it performs subscription matching the Server MUST NOT perform any
/// normalization of Topic Names or Topic Filters, or any modification or substitution of
/// unrecognized characters."
#[tokio::test]
async fn mqtt_4_7_3_4_no_topic_normalization_v311() {
    let t = topic("Case/ü");
    let mut c = subscriber(V311, &t, 1).await;
    let variants = [
        t.to_lowercase(),
        format!("{t}/"),
        t.replace('/', "//"),
        t.replace('ü', "u\u{308}"),
    ];
    for v in &variants {
        publish_once(V311, Publish::new(v, b"variant").qos(1, 0)).await;
    }
    publish_once(V311, Publish::new(&t, b"exact").qos(1, 0)).await;
    let p = c.receive().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        (t.as_str(), &b"exact"[..]),
        "a variant of {t:?} matched"
    );
    c.disconnect().await;
}

// ---------------------------------------------------------------------------------------
// MQTT 5 subscription options, identifiers, shared subscriptions

/// [MQTT-3.8.3-3] (MQTT 5.0) "Bit 2 of the Subscription Options represents the No Local
/// option. If the value is 1, Application Messages MUST NOT be forwarded to a connection
/// with a ClientID equal to the ClientID of the publishing connection."
#[tokio::test]
async fn mqtt_3_8_3_3_no_local_v5() {
    let t = topic("nolocal");
    let mut c = connect(V5, "nolocal").await;
    let codes = c
        .subscribe_with(&[(&t, options(1, true, false, 0))], &[])
        .await;
    assert_eq!(codes, vec![1]);
    c.publish(Publish::new(&t, b"own").qos(1, 0)).await;
    publish_once(V5, Publish::new(&t, b"other").qos(1, 0)).await;
    let p = c.receive().await;
    assert_eq!(
        p.payload, b"other",
        "No Local delivered the client's own message"
    );
    c.expect_no_publish_on(&t, "a message after the other client's")
        .await;
    c.disconnect().await;
}

async fn live_retain_flag(retain_as_published: bool) -> bool {
    let t = topic("rap");
    let mut c = connect(V5, "rap").await;
    let codes = c
        .subscribe_with(&[(&t, options(1, false, retain_as_published, 0))], &[])
        .await;
    assert_eq!(codes, vec![1]);
    publish_once(V5, Publish::new(&t, b"r").qos(1, 0).retain()).await;
    let retain = c.receive().await.retain;
    c.disconnect().await;
    clear_retained(V5, &t).await;
    retain
}

/// [MQTT-3.3.1-12] (MQTT 5.0) "If the value of Retain As Published subscription option is
/// set to 0, the Server MUST set the RETAIN flag to 0 when forwarding an Application Message
/// regardless of how the RETAIN flag was set in the received PUBLISH packet."
#[tokio::test]
async fn mqtt_3_3_1_12_retain_as_published_0_v5() {
    assert!(
        !live_retain_flag(false).await,
        "RETAIN 1 on a live delivery with Retain As Published 0"
    );
}

/// [MQTT-3.3.1-13] (MQTT 5.0) "If the value of Retain As Published subscription option is
/// set to 1, the Server MUST set the RETAIN flag equal to the RETAIN flag in the received
/// PUBLISH packet."
#[tokio::test]
async fn mqtt_3_3_1_13_retain_as_published_1_v5() {
    assert!(
        live_retain_flag(true).await,
        "RETAIN 0 on a live delivery with Retain As Published 1"
    );
}

/// How many retained messages each of two SUBSCRIBEs to the same filter with
/// `retain_handling` brings.
async fn retained_on_subscribe(retain_handling: u8) -> (usize, usize) {
    let t = topic("rh");
    publish_once(V5, Publish::new(&t, b"kept").qos(1, 0).retain()).await;
    let mut c = connect(V5, "rh").await;
    let mut counts = Vec::new();
    for _ in 0..2 {
        let codes = c
            .subscribe_with(&[(&t, options(1, false, false, retain_handling))], &[])
            .await;
        assert_eq!(codes, vec![1]);
        let mut n = 0;
        loop {
            match c.recv(QUIET).await {
                Recv::Timeout => break,
                Recv::Packet(Packet::Publish(p)) => {
                    assert!(p.retain && p.payload == b"kept", "{p:?}");
                    c.ack(&p).await;
                    n += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        counts.push(n);
    }
    c.disconnect().await;
    clear_retained(V5, &t).await;
    (counts[0], counts[1])
}

/// [MQTT-3.3.1-9] (MQTT 5.0) "If Retain Handling is set to 0 the Server MUST send the
/// retained messages matching the Topic Filter of the subscription to the Client." (At each
/// SUBSCRIBE, with the RETAIN flag set to 1.)
#[tokio::test]
async fn mqtt_3_3_1_9_retain_handling_0_v5() {
    assert_eq!(
        retained_on_subscribe(0).await,
        (1, 1),
        "retained messages at (first, second) SUBSCRIBE"
    );
}

/// [MQTT-3.3.1-10] (MQTT 5.0) "If Retain Handling is set to 1 then if the subscription did
/// not already exist, the Server MUST send all retained message matching the Topic Filter
/// of the subscription to the Client, and if the subscription did exist the Server MUST NOT
/// send the retained messages."
#[tokio::test]
async fn mqtt_3_3_1_10_retain_handling_1_v5() {
    assert_eq!(
        retained_on_subscribe(1).await,
        (1, 0),
        "retained messages at (first, second) SUBSCRIBE"
    );
}

/// [MQTT-3.3.1-11] (MQTT 5.0) "If Retain Handling is set to 2, the Server MUST NOT send the
/// retained messages."
#[tokio::test]
async fn mqtt_3_3_1_11_retain_handling_2_v5() {
    assert_eq!(
        retained_on_subscribe(2).await,
        (0, 0),
        "retained messages at (first, second) SUBSCRIBE"
    );
}

/// Section 3.8.2.1.2 (MQTT 5.0): the Subscription Identifier "... is associated with any
/// subscription created or modified as the result of this SUBSCRIBE packet"; [MQTT-3.3.4-3]
/// it is sent with the messages the subscription matches, and not with those of a
/// subscription without one.
#[tokio::test]
async fn mqtt_3_3_4_3_subscription_identifier_v5() {
    let (with, without) = (topic("subid"), topic("nosubid"));
    let mut c = connect(V5, "subid").await;
    c.subscribe_with(
        &[(&with, 1)],
        &[Prop::Var(prop::SUBSCRIPTION_IDENTIFIER, 42)],
    )
    .await;
    c.subscribe_with(&[(&without, 1)], &[]).await;
    publish_once(V5, Publish::new(&with, b"w").qos(1, 0)).await;
    assert_eq!(c.receive().await.props.subscription_ids(), vec![42]);
    publish_once(V5, Publish::new(&without, b"n").qos(1, 0)).await;
    assert_eq!(
        c.receive().await.props.subscription_ids(),
        Vec::<u32>::new()
    );
    c.disconnect().await;
}

/// Section 3.8.2.1.2 (MQTT 5.0): "The Subscription Identifier can have the value of 1 to
/// 268,435,455. It is a Protocol Error if the Subscription Identifier has a value of 0."
#[tokio::test]
async fn sec_3_8_2_1_2_subscription_identifier_0_v5() {
    let p = subscribe(
        V5,
        1,
        &[(&topic("subid0"), 1)],
        &[Prop::Var(prop::SUBSCRIPTION_IDENTIFIER, 0)],
    );
    closes(
        "SUBSCRIBE with Subscription Identifier 0",
        V5,
        true,
        &p,
        BAD,
    )
    .await;
}

/// [MQTT-4.8.2-1] / section 4.8.2 (MQTT 5.0): a message published to a topic that a Shared
/// Subscription's filter matches goes to one member of the share group, not to each.
#[tokio::test]
async fn sec_4_8_2_shared_subscription_one_member_each_v5() {
    let t = topic("shared");
    let group = format!("$share/g{}/{t}", SEQ.fetch_add(1, Ordering::Relaxed));
    let mut members = Vec::new();
    for _ in 0..2 {
        let mut m = connect(V5, "member").await;
        let codes = m.subscribe_with(&[(&group, 1)], &[]).await;
        assert_eq!(codes, vec![1], "SUBACK for {group}");
        members.push(m);
    }
    let mut publisher = connect(V5, "sharedpub").await;
    for i in 0..10u8 {
        publisher.publish(Publish::new(&t, &[i]).qos(1, 0)).await;
    }
    let mut got = Vec::new();
    for m in &mut members {
        loop {
            match m.recv(QUIET).await {
                Recv::Timeout => break,
                Recv::Packet(Packet::Publish(p)) => {
                    m.ack(&p).await;
                    got.push(p.payload[0]);
                }
                other => panic!("shared subscription member: {other:?}"),
            }
        }
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (0..10).collect::<Vec<u8>>(),
        "each message to exactly one member"
    );
    publisher.disconnect().await;
    for m in members {
        m.disconnect().await;
    }
}

/// [MQTT-4.8.2-6] (MQTT 5.0) "If a Client responds with a PUBACK or PUBREC containing a
/// Reason Code of 0x80 or greater to a PUBLISH packet from the Server, the Server MUST
/// discard the Application Message and not attempt to send it to any other Subscriber."
#[tokio::test]
async fn mqtt_4_8_2_6_refused_shared_delivery_not_sent_elsewhere_v5() {
    let t = topic("sharedrefused");
    let group = format!("$share/g{}/{t}", SEQ.fetch_add(1, Ordering::Relaxed));
    let mut members = [connect(V5, "member").await, connect(V5, "member").await];
    for m in &mut members {
        assert_eq!(m.subscribe_with(&[(&group, 1)], &[]).await, vec![1]);
    }
    publish_once(V5, Publish::new(&t, b"refused").qos(1, 0)).await;
    let (chosen, p) = match members[0].recv(QUIET).await {
        Recv::Packet(Packet::Publish(p)) => (0, p),
        Recv::Timeout => (1, members[1].expect_publish().await),
        other => panic!("shared subscription member: {other:?}"),
    };
    members[chosen]
        .send(&support::wire::ack(4, V5, p.id, 0x80))
        .await;
    members[1 - chosen]
        .expect_no_publish_on(&t, "a message refused by one member sent to another")
        .await;
    for m in members {
        m.disconnect().await;
    }
}

/// Section 3.3.1.3 (MQTT 5.0): "When a new Non-shared Subscription is made, the last
/// retained message, if any, on each matching topic name is sent to the Client": a Shared
/// Subscription gets no retained messages when it is made (as the Eclipse Paho MQTT 5 test
/// suite expects too). mosquitto 2.0.11 deviates: it sends them. No numbered statement says
/// so; the rule is the one sentence above.
#[tokio::test]
async fn sec_3_3_1_3_no_retained_on_shared_subscription_v5() {
    let t = topic("sharedret");
    publish_once(V5, Publish::new(&t, b"kept").qos(1, 0).retain()).await;
    let mut m = connect(V5, "member").await;
    let group = format!("$share/g{}/{t}", SEQ.fetch_add(1, Ordering::Relaxed));
    assert_eq!(m.subscribe_with(&[(&group, 1)], &[]).await, vec![1]);
    m.expect_no_publish_on(&t, "a retained message sent on a Shared Subscription")
        .await;
    m.disconnect().await;
    clear_retained(V5, &t).await;
}

/// [MQTT-4.8.2-1] (MQTT 5.0) "A Shared Subscription's Topic Filter MUST start with $share/
/// and MUST contain a ShareName that is at least one character long." Each filter without
/// a ShareName is refused in the SUBACK or closes the connection. mosquitto 2.0.11
/// deviates: it grants them.
#[tokio::test]
async fn mqtt_4_8_2_1_shared_subscription_without_share_name_v5() {
    for bad in ["$share//conf/x", "$share/"] {
        invalid_filter(V5, bad).await;
    }
}

/// [MQTT-4.8.2-2] (MQTT 5.0) "The ShareName MUST NOT contain the characters "/", "+" or
/// "#", but MUST be followed by a "/" character. This "/" character MUST be followed by a
/// Topic Filter." Each invalid form is refused in the SUBACK or closes the connection.
/// mosquitto 2.0.11 deviates for the two without a Topic Filter: it grants them.
#[tokio::test]
async fn mqtt_4_8_2_2_invalid_shared_subscriptions_v5() {
    for bad in [
        "$share/g+/conf/x",
        "$share/g#/conf/x",
        "$share/g",
        "$share/g/",
    ] {
        invalid_filter(V5, bad).await;
    }
}

/// [MQTT-3.8.3-4] (MQTT 5.0) "It is a Protocol Error to set the No Local bit to 1 on a
/// Shared Subscription." mosquitto 2.0.11 deviates: it grants the subscription.
#[tokio::test]
async fn mqtt_3_8_3_4_no_local_on_shared_subscription_v5() {
    let group = format!("$share/g/{}", topic("nl"));
    let p = subscribe(V5, 1, &[(&group, options(1, true, false, 0))], &[]);
    closes("No Local on a Shared Subscription", V5, true, &p, BAD).await;
}

// =======================================================================================
// UNSUBSCRIBE, UNSUBACK

/// [MQTT-3.10.1-1] "Bits 3,2,1 and 0 of the fixed header of the UNSUBSCRIBE Control Packet
/// are reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any
/// other value as malformed and close the Network Connection."
#[tokio::test]
async fn mqtt_3_10_1_1_unsubscribe_reserved_flags_v311() {
    for first in [0xA0u8, 0xA3] {
        let mut p = unsubscribe(V311, 1, &[&topic("flags")]);
        p[0] = first;
        closes(
            &format!("UNSUBSCRIBE with fixed header {first:#04x}"),
            V311,
            true,
            &p,
            &[],
        )
        .await;
    }
}

/// [MQTT-3.10.1-1] (MQTT 5.0) Same rule for MQTT 5.
#[tokio::test]
async fn mqtt_3_10_1_1_unsubscribe_reserved_flags_v5() {
    let mut p = unsubscribe(V5, 1, &[&topic("flags")]);
    p[0] = 0xA0;
    closes("UNSUBSCRIBE with fixed header 0xA0", V5, true, &p, BAD).await;
}

/// [MQTT-3.10.3-2] "The Payload of an UNSUBSCRIBE packet MUST contain at least one Topic
/// Filter. An UNSUBSCRIBE packet with no payload is a protocol violation."
#[tokio::test]
async fn mqtt_3_10_3_2_unsubscribe_without_filters_v311() {
    closes(
        "UNSUBSCRIBE without filters",
        V311,
        true,
        &unsubscribe(V311, 1, &[]),
        &[],
    )
    .await;
}

/// [MQTT-3.10.3-2] (MQTT 5.0) "The Payload of an UNSUBSCRIBE packet MUST contain at least
/// one Topic Filter."
#[tokio::test]
async fn mqtt_3_10_3_2_unsubscribe_without_filters_v5() {
    closes(
        "UNSUBSCRIBE without filters",
        V5,
        true,
        &unsubscribe(V5, 1, &[]),
        BAD,
    )
    .await;
}

/// [MQTT-3.10.4-5] "Even where no Topic Subscriptions are deleted, the Server MUST respond
/// with an UNSUBACK." [MQTT-3.10.4-4]: "The UNSUBACK Packet MUST have the same Packet
/// Identifier as the UNSUBSCRIBE Packet."
#[tokio::test]
async fn mqtt_3_10_4_5_unsuback_when_nothing_matched_v311() {
    let mut c = connect(V311, "unsub").await;
    let codes = c.unsubscribe(&[&topic("never")]).await;
    assert!(
        codes.is_empty(),
        "an MQTT 3.1.1 UNSUBACK has no payload: {codes:?}"
    );
    c.disconnect().await;
}

/// [MQTT-3.10.4-5] (MQTT 5.0) "The UNSUBACK packet MUST have the same Packet Identifier as
/// the UNSUBSCRIBE packet. Even where no Topic Subscriptions are deleted, the Server MUST
/// respond with an UNSUBACK." [MQTT-3.11.3-1]: "The order of Reason Codes in the UNSUBACK
/// packet MUST match the order of Topic Filters in the UNSUBSCRIBE packet." Reason 0x11 is
/// "No subscription existed", 0x00 "The subscription is deleted".
#[tokio::test]
async fn mqtt_3_10_4_5_unsuback_reason_codes_v5() {
    let mut c = connect(V5, "unsub").await;
    let (a, b) = (topic("a"), topic("b"));
    c.subscribe(&b, 1).await;
    assert_eq!(
        c.unsubscribe(&[&a, &b, &a]).await,
        vec![0x11, 0x00, 0x11],
        "UNSUBACK reason codes"
    );
    c.disconnect().await;
}

async fn unsubscribe_stops(version: u8) {
    let (a, b) = (topic("a"), topic("b"));
    let mut c = connect(version, "unsub").await;
    c.subscribe(&a, 1).await;
    c.subscribe(&b, 1).await;
    c.unsubscribe(&[&a, &b]).await;
    publish_once(version, Publish::new(&a, b"late").qos(1, 0)).await;
    publish_once(version, Publish::new(&b, b"late").qos(1, 0)).await;
    c.expect_nothing("a delivery after UNSUBSCRIBE").await;
    c.disconnect().await;
}

/// [MQTT-3.10.4-2] "If a Server deletes a Subscription It MUST stop adding any new messages
/// for delivery to the Client." [MQTT-3.10.4-6]: an UNSUBSCRIBE with several filters is
/// handled as a sequence of UNSUBSCRIBEs.
#[tokio::test]
async fn mqtt_3_10_4_2_unsubscribe_stops_deliveries_v311() {
    unsubscribe_stops(V311).await;
}

/// [MQTT-3.10.4-2] (MQTT 5.0) "It MUST stop adding any new messages which match the Topic
/// Filters, for delivery to the Client."
#[tokio::test]
async fn mqtt_3_10_4_2_unsubscribe_stops_deliveries_v5() {
    unsubscribe_stops(V5).await;
}

async fn unsubscribe_exact(version: u8) {
    let t = topic("x");
    let wildcard = format!("{}/+", t.rsplit_once('/').expect("a level").0);
    let mut c = subscriber(version, &wildcard, 1).await;
    c.unsubscribe(&[&t]).await;
    publish_once(version, Publish::new(&t, b"still").qos(1, 0)).await;
    assert_eq!(
        c.receive().await.payload,
        b"still",
        "UNSUBSCRIBE {t:?} removed {wildcard:?}"
    );
    c.disconnect().await;
}

/// [MQTT-3.10.4-1] "The Topic Filters (whether they contain wildcards or not) supplied in an
/// UNSUBSCRIBE packet MUST be compared character-by-character with the current set of Topic
/// Filters held by the Server for the Client. If any filter matches exactly then its owning
/// Subscription is deleted, otherwise no additional processing occurs."
#[tokio::test]
async fn mqtt_3_10_4_1_unsubscribe_compares_filters_exactly_v311() {
    unsubscribe_exact(V311).await;
}

/// [MQTT-3.10.4-1] (MQTT 5.0) Same rule.
#[tokio::test]
async fn mqtt_3_10_4_1_unsubscribe_compares_filters_exactly_v5() {
    unsubscribe_exact(V5).await;
}

// =======================================================================================
// PINGREQ

/// [MQTT-3.12.4-1] "The Server MUST send a PINGRESP Packet in response to a PINGREQ packet."
#[tokio::test]
async fn mqtt_3_12_4_1_pingresp_v311() {
    let mut c = connect(V311, "ping").await;
    c.send(&PINGREQ).await;
    assert_eq!(c.expect("PINGRESP").await, Packet::Pingresp);
    c.disconnect().await;
}

/// [MQTT-3.12.4-1] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_3_12_4_1_pingresp_v31() {
    let mut c = connect(V31, "ping").await;
    c.send(&PINGREQ).await;
    assert_eq!(c.expect("PINGRESP").await, Packet::Pingresp);
    c.disconnect().await;
}

/// [MQTT-3.12.4-1] (MQTT 5.0) "The Server MUST send a PINGRESP packet in response to a
/// PINGREQ packet."
#[tokio::test]
async fn mqtt_3_12_4_1_pingresp_v5() {
    let mut c = connect(V5, "ping").await;
    c.send(&PINGREQ).await;
    assert_eq!(c.expect("PINGRESP").await, Packet::Pingresp);
    c.disconnect().await;
}

// =======================================================================================
// Sessions

/// A persistent-session connection (3.1.1 CleanSession 0; MQTT 5 Clean Start 0 and Session
/// Expiry 60 s); returns it with Session Present.
async fn persistent(version: u8, id: &str) -> (Client, bool) {
    resume(version, id, false).await
}

async fn queued_for_offline_session(version: u8) {
    let id = cid("offline");
    let t = topic("queued");
    let (mut c, _) = persistent(version, &id).await;
    c.subscribe(&t, 2).await;
    c.disconnect().await;
    let mut publisher = connect(version, "offlinepub").await;
    publisher.publish(Publish::new(&t, b"q0")).await;
    publisher.publish(Publish::new(&t, b"q1").qos(1, 0)).await;
    publisher.publish(Publish::new(&t, b"q2").qos(2, 0)).await;
    publisher.disconnect().await;
    let (mut c, sp) = persistent(version, &id).await;
    // MQTT 3.1 has no Session Present flag.
    assert!(
        sp || version == V31,
        "Session Present 0 for a stored session"
    );
    let mut got = Vec::new();
    loop {
        match c.recv(QUIET).await {
            Recv::Timeout => break,
            Recv::Packet(Packet::Publish(p)) => {
                c.ack(&p).await;
                got.push((p.payload_str(), p.qos));
            }
            other => panic!("resumed session: {other:?}"),
        }
    }
    // QoS 0 messages may be queued too, but need not be.
    got.retain(|(payload, _)| payload != "q0");
    assert_eq!(
        got,
        vec![("q1".to_string(), 1), ("q2".to_string(), 2)],
        "messages queued while offline"
    );
    c.disconnect().await;
}

/// [MQTT-3.1.2-5] "After the disconnection of a Session that had CleanSession set to 0, the
/// Server MUST store further QoS 1 and QoS 2 messages that match any subscriptions that the
/// client had at the time of disconnection as part of the Session state." [MQTT-3.1.2-4]:
/// "If CleanSession is set to 0, the Server MUST resume communications with the Client based
/// on state from the current Session (as identified by the Client identifier)."
#[tokio::test]
async fn mqtt_3_1_2_5_messages_queued_for_offline_session_v311() {
    queued_for_offline_session(V311).await;
}

/// [MQTT-3.1.2-5] Here for MQTT 3.1.
#[tokio::test]
async fn mqtt_3_1_2_5_messages_queued_for_offline_session_v31() {
    queued_for_offline_session(V31).await;
}

/// [MQTT-3.1.2-23] (MQTT 5.0) "The Client and Server MUST store the Session State after the
/// Network Connection is closed if the Session Expiry Interval is greater than 0."
/// [MQTT-3.1.2-5]: "If a CONNECT packet is received with Clean Start set to 0 and there is a
/// Session associated with the Client Identifier, the Server MUST resume communications with
/// the Client based on state from the existing Session." [MQTT-4.5.0-1]: "When a Server
/// takes ownership of an incoming Application Message it MUST add it to the Session State
/// for those Clients that have matching Subscriptions."
#[tokio::test]
async fn mqtt_3_1_2_23_messages_queued_for_offline_session_v5() {
    queued_for_offline_session(V5).await;
}

async fn unacked_resent(version: u8) {
    let id = cid("resend");
    let t = topic("resend");
    let (mut c, _) = persistent(version, &id).await;
    c.subscribe(&t, 2).await;
    publish_once(version, Publish::new(&t, b"one").qos(1, 0)).await;
    publish_once(version, Publish::new(&t, b"two").qos(2, 0)).await;
    let first = [c.expect_publish().await, c.expect_publish().await];
    c.drop_connection();
    let (mut c, sp) = persistent(version, &id).await;
    assert!(sp, "Session Present 0 for a stored session");
    for original in &first {
        let again = c.expect_publish().await;
        assert_eq!(
            again.payload, original.payload,
            "redelivery order [MQTT-4.6.0-1]"
        );
        assert_eq!(
            again.id, original.id,
            "redelivery with another packet identifier"
        );
        assert!(again.dup, "[MQTT-3.3.1-1] redelivery with DUP 0: {again:?}");
        assert_eq!(again.qos, original.qos);
        c.ack(&again).await;
    }
    c.expect_nothing("after acknowledging the redeliveries")
        .await;
    c.disconnect().await;
}

/// [MQTT-4.4.0-1] "When a Client reconnects with CleanSession set to 0, both the Client and
/// Server MUST re-send any unacknowledged PUBLISH Packets (where QoS > 0) and PUBREL
/// Packets using their original Packet Identifiers." [MQTT-3.3.1-1]: "The DUP flag MUST be
/// set to 1 by the Client or Server when it attempts to re-deliver a PUBLISH Packet."
#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_publish_resent_v311() {
    unacked_resent(V311).await;
}

/// [MQTT-4.4.0-1] (MQTT 5.0) "When a Client reconnects with Clean Start set to 0 and a
/// session is present, both the Client and Server MUST resend any unacknowledged PUBLISH
/// packets (where QoS > 0) and PUBREL packets using their original Packet Identifiers."
/// [MQTT-3.3.1-1]: DUP 1 on a redelivery.
#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_publish_resent_v5() {
    unacked_resent(V5).await;
}

async fn pubrel_resent(version: u8) {
    let id = cid("relresend");
    let t = topic("relresend");
    let (mut c, _) = persistent(version, &id).await;
    c.subscribe(&t, 2).await;
    publish_once(version, Publish::new(&t, b"two").qos(2, 0)).await;
    let p = c.expect_publish().await;
    c.send(&pubrec(version, p.id)).await;
    match c.expect("PUBREL").await {
        Packet::Pubrel(a) => assert_eq!(a.id, p.id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    c.drop_connection();
    let (mut c, sp) = persistent(version, &id).await;
    assert!(sp, "Session Present 0 for a stored session");
    match c.expect("the PUBREL again").await {
        Packet::Pubrel(a) => assert_eq!(a.id, p.id, "PUBREL resent with another packet identifier"),
        other => panic!("[MQTT-4.3.3-1] expected the PUBREL, not the PUBLISH again: {other:?}"),
    }
    c.send(&support::wire::pubcomp(version, p.id)).await;
    c.expect_nothing("after PUBCOMP").await;
    c.disconnect().await;
}

/// [MQTT-4.4.0-1] "... MUST re-send any unacknowledged PUBLISH Packets (where QoS > 0) and
/// PUBREL Packets using their original Packet Identifiers." (And [MQTT-4.3.3-1]: "MUST NOT
/// re-send the PUBLISH once it has sent the corresponding PUBREL packet.")
#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_pubrel_resent_v311() {
    pubrel_resent(V311).await;
}

/// [MQTT-4.4.0-1] (MQTT 5.0), for PUBREL; [MQTT-4.3.3-6]: "MUST NOT re-send the PUBLISH
/// once it has sent the corresponding PUBREL packet."
#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_pubrel_resent_v5() {
    pubrel_resent(V5).await;
}

/// [MQTT-4.4.0-2] (MQTT 5.0) "If PUBACK or PUBREC is received containing a Reason Code of
/// 0x80 or greater the corresponding PUBLISH packet is treated as acknowledged, and MUST NOT
/// be retransmitted." Not even to the resumed session.
#[tokio::test]
async fn mqtt_4_4_0_2_refused_delivery_not_resent_v5() {
    let id = cid("refuser");
    let t = topic("refused");
    let (mut c, _) = persistent(V5, &id).await;
    c.subscribe(&t, 2).await;
    publish_once(V5, Publish::new(&t, b"q1").qos(1, 0)).await;
    publish_once(V5, Publish::new(&t, b"q2").qos(2, 0)).await;
    for kind in [4u8, 5] {
        let p = c.expect_publish().await;
        c.send(&support::wire::ack(kind, V5, p.id, 0x80)).await;
    }
    c.expect_nothing("a PUBREL after PUBREC 0x80").await;
    c.drop_connection();
    let (mut c, sp) = persistent(V5, &id).await;
    assert!(sp, "Session Present 0 for a stored session");
    c.expect_nothing("a delivery refused with 0x80 sent again")
        .await;
    c.disconnect().await;
}

/// [MQTT-4.4.0-1] (MQTT 5.0) "This is the only circumstance where a Client or Server is
/// REQUIRED to resend messages. Clients and Servers MUST NOT resend messages at any other
/// time." An unacknowledged delivery is not repeated on an open connection.
#[tokio::test]
async fn mqtt_4_4_0_1_no_resend_on_open_connection_v5() {
    let t = topic("noresend");
    let mut c = subscriber(V5, &t, 1).await;
    publish_once(V5, Publish::new(&t, b"once").qos(1, 0)).await;
    let p = c.expect_publish().await;
    c.expect_nothing("a resend on the same connection").await;
    c.send(&puback(V5, p.id)).await;
    c.disconnect().await;
}

async fn clean_discards(version: u8) {
    let id = cid("cleaned");
    let t = topic("cleaned");
    let (mut c, _) = persistent(version, &id).await;
    c.subscribe(&t, 1).await;
    c.disconnect().await;
    publish_once(version, Publish::new(&t, b"queued").qos(1, 0)).await;
    let (mut c, sp) = resume(version, &id, true).await;
    assert!(!sp, "Session Present 1 with a clean session");
    c.expect_nothing("a message queued for the discarded session")
        .await;
    publish_once(version, Publish::new(&t, b"after").qos(1, 0)).await;
    c.expect_nothing("a delivery for the discarded session's subscription")
        .await;
    c.disconnect().await;
    if version != V5 {
        // The clean session ended with its connection and is not reused.
        let (c, sp) = persistent(version, &id).await;
        assert!(!sp, "the state of a CleanSession 1 session was kept");
        c.disconnect().await;
    }
}

/// [MQTT-3.1.2-6] "If CleanSession is set to 1, the Client and Server MUST discard any
/// previous Session and start a new one. This Session lasts as long as the Network
/// Connection. State data associated with this Session MUST NOT be reused in any subsequent
/// Session."
#[tokio::test]
async fn mqtt_3_1_2_6_clean_session_discards_state_v311() {
    clean_discards(V311).await;
}

/// [MQTT-3.1.2-4] (MQTT 5.0) "If a CONNECT packet is received with Clean Start is set to 1,
/// the Client and Server MUST discard any existing Session and start a new Session." (Here
/// with a Session Expiry Interval of 60 s on the new one.)
#[tokio::test]
async fn mqtt_3_1_2_4_clean_start_discards_session_v5() {
    clean_discards(V5).await;
}

/// [MQTT-3.1.2-6] (MQTT 5.0) "If a CONNECT packet is received with Clean Start set to 0 and
/// there is no Session associated with the Client Identifier, the Server MUST create a new
/// Session." Section 3.1.2.11.2: an absent Session Expiry Interval is 0 and "the Session
/// ends when the Network Connection is closed."
#[tokio::test]
async fn mqtt_3_1_2_6_session_expiry_0_ends_with_connection_v5() {
    let id = cid("exp0");
    let t = topic("exp0");
    let (mut c, sp, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    assert!(!sp);
    c.subscribe(&t, 1).await;
    c.disconnect().await;
    publish_once(V5, Publish::new(&t, b"lost").qos(1, 0)).await;
    let (mut c, sp, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    assert!(
        !sp,
        "a session with Session Expiry Interval 0 outlived its connection"
    );
    c.expect_nothing("a message for the ended session").await;
    c.disconnect().await;
}

/// [MQTT-4.1.0-2] (MQTT 5.0) "The Server MUST discard the Session State when the Network
/// Connection is closed and the Session Expiry Interval has passed." (1 s here.)
#[tokio::test]
async fn mqtt_4_1_0_2_session_discarded_after_expiry_v5() {
    let id = cid("exp1");
    let (c, _, _) = connect_with(&Connect::new(V5, &id).clean(false).session_expiry(1)).await;
    c.disconnect().await;
    sleep(Duration::from_millis(2500)).await;
    let (c, sp, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    assert!(
        !sp,
        "the session outlived its 1 s Session Expiry Interval by 1.5 s"
    );
    c.disconnect().await;
}

/// Section 3.14.2.2.2 (MQTT 5.0): the Session Expiry Interval of a DISCONNECT replaces the
/// one of the CONNECT. A session connected with 60 s and disconnected with 0 ends at once.
#[tokio::test]
async fn sec_3_14_2_2_2_disconnect_sets_session_expiry_v5() {
    let id = cid("expdisc");
    let (mut c, _, _) = connect_with(&Connect::new(V5, &id).clean(false).session_expiry(60)).await;
    c.send(&disconnect(
        V5,
        0,
        &[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 0)],
    ))
    .await;
    let before = c.expect_closed("after DISCONNECT").await;
    assert!(before.is_empty(), "{before:?}");
    let (c, sp, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    assert!(
        !sp,
        "the session outlived a DISCONNECT with Session Expiry Interval 0"
    );
    c.disconnect().await;
}

/// Section 3.14.2.2.2 (MQTT 5.0): "If the Session Expiry Interval in the CONNECT packet was
/// zero, then it is a Protocol Error to set a non-zero Session Expiry Interval in the
/// DISCONNECT packet sent by the Client." The session still ends with the connection.
#[tokio::test]
async fn sec_3_14_2_2_2_disconnect_expiry_from_zero_is_protocol_error_v5() {
    let witness = Witness::new().await;
    let id = cid("expzero");
    let (mut c, _, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    c.send(&disconnect(
        V5,
        0,
        &[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 60)],
    ))
    .await;
    let before = c
        .expect_closed("DISCONNECT with Session Expiry Interval 60 after 0")
        .await;
    check_goodbye(V5, "DISCONNECT expiry 0 -> 60", &before, BAD, &[]);
    let (c, sp, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    assert!(
        !sp,
        "the DISCONNECT made a session with Session Expiry Interval 0 persistent"
    );
    c.disconnect().await;
    witness.check("DISCONNECT expiry 0 -> 60").await;
}

// =======================================================================================
// MQTT 5: message expiry, topic aliases, flow control, packet size, properties

/// A persistent subscriber to `t` that is offline when this returns.
async fn offline_subscriber(t: &str) -> String {
    let id = cid("expiry");
    let (mut c, _) = persistent(V5, &id).await;
    c.subscribe(t, 1).await;
    c.disconnect().await;
    id
}

/// [MQTT-3.3.2-5] (MQTT 5.0) "If the Message Expiry Interval has passed and the Server has
/// not managed to start onward delivery to a matching subscriber, then it MUST delete the
/// copy of the message for that subscriber."
#[tokio::test]
async fn mqtt_3_3_2_5_expired_message_not_delivered_v5() {
    let t = topic("expired");
    let id = offline_subscriber(&t).await;
    let mut publisher = connect(V5, "expirypub").await;
    publisher
        .publish(
            Publish::new(&t, b"expires")
                .qos(1, 0)
                .prop(Prop::Four(prop::MESSAGE_EXPIRY_INTERVAL, 1)),
        )
        .await;
    publisher
        .publish(Publish::new(&t, b"stays").qos(1, 0))
        .await;
    publisher.disconnect().await;
    sleep(Duration::from_millis(2200)).await;
    let (mut c, sp) = persistent(V5, &id).await;
    assert!(sp);
    assert_eq!(
        c.receive().await.payload,
        b"stays",
        "the expired message was delivered"
    );
    c.expect_nothing("a message after the unexpired one").await;
    c.disconnect().await;
}

/// [MQTT-3.3.2-6] (MQTT 5.0) "The PUBLISH packet sent to a Client by the Server MUST contain
/// a Message Expiry Interval set to the received value minus the time that the Application
/// Message has been waiting in the Server."
#[tokio::test]
async fn mqtt_3_3_2_6_message_expiry_interval_decremented_v5() {
    let t = topic("expiring");
    let id = offline_subscriber(&t).await;
    let expiry = Prop::Four(prop::MESSAGE_EXPIRY_INTERVAL, 60);
    publish_once(V5, Publish::new(&t, b"waits").qos(1, 0).prop(expiry)).await;
    sleep(Duration::from_millis(1100)).await;
    let (mut c, _) = persistent(V5, &id).await;
    let p = c.receive().await;
    let left = p
        .props
        .int(prop::MESSAGE_EXPIRY_INTERVAL)
        .expect("the Message Expiry Interval was dropped");
    assert!(
        (55..=59).contains(&left),
        "Message Expiry Interval {left} after waiting 1.1 s of 60"
    );
    c.disconnect().await;
}

/// A connection's Topic Alias Maximum from its CONNACK (0 when absent).
async fn alias_client(tag: &str) -> (Client, u32) {
    let (c, _, props) = connect_with(&Connect::new(V5, &cid(tag))).await;
    let max = props.int(prop::TOPIC_ALIAS_MAXIMUM).unwrap_or(0);
    (c, max)
}

fn aliased(topic: &str, alias: u16, id: u16) -> Vec<u8> {
    Publish::new(topic, b"aliased")
        .qos(1, id)
        .prop(Prop::Two(prop::TOPIC_ALIAS, alias))
        .encode(V5)
}

/// [MQTT-3.3.2-12] (MQTT 5.0) "A Server MUST accept all Topic Alias values greater than 0 and
/// less than or equal to the Topic Alias Maximum value that it returned in the CONNACK
/// packet." An alias set with a topic stands for it in later PUBLISHes with an empty Topic
/// Name, and can be mapped again; subscribers get the full topic (section 3.3.2.3.4). A
/// broker that returns no Topic Alias Maximum accepts no aliases: nothing to check then.
#[tokio::test]
async fn mqtt_3_3_2_12_topic_alias_resolved_v5() {
    let (a, b) = (topic("alias/a"), topic("alias/b"));
    let mut sub = connect(V5, "aliassub").await;
    sub.subscribe(&a, 1).await;
    sub.subscribe(&b, 1).await;
    let (mut c, max) = alias_client("alias").await;
    if max == 0 {
        eprintln!("the broker accepts no Topic Aliases (Topic Alias Maximum 0)");
        return;
    }
    let alias = u16::try_from(max).expect("a u16");
    for (name, id) in [(a.as_str(), 1u16), ("", 2), (b.as_str(), 3), ("", 4)] {
        c.send(&aliased(name, alias, id)).await;
        assert!(
            matches!(c.expect("PUBACK").await, Packet::Puback(x) if x.id == id && x.reason < 0x80)
        );
    }
    for expected in [&a, &a, &b, &b] {
        let p = sub.receive().await;
        assert_eq!(
            &p.topic, expected,
            "aliased PUBLISH delivered under the wrong name"
        );
        assert!(
            !p.props.has(prop::TOPIC_ALIAS),
            "[MQTT-3.1.2-27] the subscriber sent no Topic Alias Maximum"
        );
    }
    c.disconnect().await;
    sub.disconnect().await;
}

/// The DISCONNECT for an invalid Topic Alias: 0x94 (Topic Alias invalid) is the specific
/// code; section 4.13 makes the DISCONNECT itself a SHOULD and names 0x81 and 0x82 for
/// errors in general (mosquitto 2.0.11 says 0x81 for alias 0).
const ALIAS_INVALID: &[u8] = &[0x94, 0x81, 0x82];

/// [MQTT-3.3.2-8] (MQTT 5.0) "A sender MUST NOT send a PUBLISH packet containing a Topic
/// Alias which has the value 0." Section 3.3.2.3.4: "A Topic Alias value of 0 or greater
/// than the Maximum Topic Alias is a Protocol Error, the receiver uses DISCONNECT with
/// Reason Code of 0x94 (Topic Alias invalid)".
#[tokio::test]
async fn mqtt_3_3_2_8_topic_alias_0_v5() {
    closes(
        "Topic Alias 0",
        V5,
        true,
        &aliased(&topic("alias0"), 0, 1),
        ALIAS_INVALID,
    )
    .await;
}

/// [MQTT-3.3.2-9] (MQTT 5.0) "A Client MUST NOT send a PUBLISH packet with a Topic Alias
/// greater than the Topic Alias Maximum value returned by the Server in the CONNACK
/// packet." (DISCONNECT 0x94, section 3.3.2.3.4.) [MQTT-3.2.2-18]: with no Topic Alias
/// Maximum, no alias at all is allowed.
#[tokio::test]
async fn mqtt_3_3_2_9_topic_alias_above_maximum_v5() {
    let (probe, max) = alias_client("aliasmax").await;
    probe.disconnect().await;
    let alias = u16::try_from(max + 1).unwrap_or(u16::MAX);
    closes(
        &format!("Topic Alias {alias}, maximum {max}"),
        V5,
        true,
        &aliased(&topic("aliasmax"), alias, 1),
        ALIAS_INVALID,
    )
    .await;
}

/// Section 3.3.2.3.4 (MQTT 5.0): "It is a Protocol Error if the Topic Name is zero length and
/// there is no Topic Alias", and an alias with an empty Topic Name needs an established
/// mapping. [MQTT-3.3.2-7]: "A receiver MUST NOT carry forward any Topic Alias mappings from
/// one Network Connection to another."
#[tokio::test]
async fn mqtt_3_3_2_7_topic_alias_not_carried_across_connections_v5() {
    let id = cid("aliasconn");
    let (mut c, _, props) =
        connect_with(&Connect::new(V5, &id).clean(false).session_expiry(60)).await;
    if props.int(prop::TOPIC_ALIAS_MAXIMUM).unwrap_or(0) > 0 {
        c.send(&aliased(&topic("aliasconn"), 1, 1)).await;
        assert!(matches!(c.expect("PUBACK").await, Packet::Puback(_)));
    }
    c.disconnect().await;
    let witness = Witness::new().await;
    let (mut c, _, _) = connect_with(&Connect::new(V5, &id).clean(false)).await;
    c.send(&aliased("", 1, 2)).await;
    let before = c
        .expect_closed("an alias mapped on the previous connection")
        .await;
    check_goodbye(
        V5,
        "alias of the previous connection",
        &before,
        &[0x81, 0x82, 0x94],
        &[],
    );
    witness.check("alias of the previous connection").await;
    closes(
        "empty Topic Name without a Topic Alias",
        V5,
        true,
        &Publish::new("", b"e").qos(1, 1).encode(V5),
        BAD,
    )
    .await;
}

/// [MQTT-3.1.2-26] (MQTT 5.0) "The Server MUST NOT send a Topic Alias in a PUBLISH packet to
/// the Client greater than Topic Alias Maximum." A Topic Alias the server does send maps a
/// topic before it is used alone ([MQTT-3.3.2-11]).
#[tokio::test]
async fn mqtt_3_1_2_26_topic_alias_to_client_within_maximum_v5() {
    let root = topic("toalias");
    let connect = Connect::new(V5, &cid("toalias")).prop(Prop::Two(prop::TOPIC_ALIAS_MAXIMUM, 2));
    let (mut c, _, _) = connect_with(&connect).await;
    c.subscribe(&format!("{root}/#"), 1).await;
    let mut publisher = connect_client(V5).await;
    let names: Vec<String> = (0..12).map(|i| format!("{root}/{}", i % 4)).collect();
    for n in &names {
        publisher
            .publish(Publish::new(n, n.as_bytes()).qos(1, 0))
            .await;
    }
    let mut map = std::collections::HashMap::new();
    for n in &names {
        let p = c.receive().await;
        let name = match p.props.int(prop::TOPIC_ALIAS) {
            Some(alias) => {
                assert!(
                    (1..=2).contains(&alias),
                    "Topic Alias {alias} above the client's maximum 2"
                );
                if p.topic.is_empty() {
                    map.get(&alias)
                        .cloned()
                        .expect("an alias used before it was mapped")
                } else {
                    map.insert(alias, p.topic.clone());
                    p.topic.clone()
                }
            }
            None => p.topic.clone(),
        };
        assert_eq!(&name, n, "message delivered under another topic");
    }
    publisher.disconnect().await;
    c.disconnect().await;
}

async fn connect_client(version: u8) -> Client {
    connect(version, "pub").await
}

/// [MQTT-3.3.4-9] (MQTT 5.0) "The Server MUST NOT send more than Receive Maximum QoS 1 and
/// QoS 2 PUBLISH packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a
/// Reason Code of 128 or greater from the Client." [MQTT-4.9.0-2]: at a send quota of zero
/// "the Client or Server MUST NOT send any more PUBLISH packets with QoS > 0".
/// mosquitto 2.0.11 deviates: with a QoS 2 delivery outstanding, one PUBACK lets it send
/// two more PUBLISHes, three unacknowledged for a Receive Maximum of 2.
#[tokio::test]
async fn mqtt_3_3_4_9_receive_maximum_respected_v5() {
    let t = topic("recvmax");
    let connect = Connect::new(V5, &cid("recvmax")).prop(Prop::Two(prop::RECEIVE_MAXIMUM, 2));
    let (mut c, _, _) = connect_with(&connect).await;
    c.subscribe(&t, 2).await;
    let mut publisher = connect_client(V5).await;
    for i in 0..6u8 {
        publisher
            .publish(Publish::new(&t, &[i]).qos(1 + i % 2, 0))
            .await;
    }
    let mut in_flight = vec![c.expect_publish().await, c.expect_publish().await];
    let mut got = Vec::new();
    while !in_flight.is_empty() {
        c.expect_nothing("a PUBLISH beyond Receive Maximum 2").await;
        let done = in_flight.remove(0);
        got.push(done.payload[0]);
        c.ack(&done).await;
        if got.len() + in_flight.len() < 6 {
            in_flight.push(c.expect_publish().await);
        }
    }
    assert_eq!(
        got,
        (0..6).collect::<Vec<u8>>(),
        "deliveries under Receive Maximum 2"
    );
    publisher.disconnect().await;
    c.disconnect().await;
}

/// [MQTT-3.3.4-10] (MQTT 5.0) "The Server MUST NOT delay the sending of any packets other
/// than PUBLISH packets due to having sent Receive Maximum PUBLISH packets without receiving
/// acknowledgements for them." [MQTT-4.9.0-3]: "The Client and Server MUST continue to
/// process and respond to all other MQTT Control Packets even if the quota is zero."
#[tokio::test]
async fn mqtt_3_3_4_10_other_packets_flow_at_zero_quota_v5() {
    let t = topic("quota0");
    let connect = Connect::new(V5, &cid("quota0")).prop(Prop::Two(prop::RECEIVE_MAXIMUM, 1));
    let (mut c, _, _) = connect_with(&connect).await;
    c.subscribe(&t, 1).await;
    publish_once(V5, Publish::new(&t, b"1").qos(1, 0)).await;
    publish_once(V5, Publish::new(&t, b"2").qos(1, 0)).await;
    let first = c.expect_publish().await;
    assert!(c.ping().await, "no PINGRESP at send quota 0");
    c.subscribe(&topic("quota0other"), 1).await;
    c.unsubscribe(&[&topic("quota0none")]).await;
    c.publish(Publish::new(&topic("quota0out"), b"o").qos(1, 0))
        .await;
    c.ack(&first).await;
    assert_eq!(c.receive().await.payload, b"2");
    c.disconnect().await;
}

/// Section 3.2.2.3.3 (MQTT 5.0), Receive Maximum in the CONNACK: a Client that sends more
/// than that many QoS 1 and QoS 2 PUBLISH packets the Server has not completed gets
/// "DISCONNECT with Reason Code 0x93 (Receive Maximum exceeded)" (section 3.3.4). QoS 2
/// PUBLISHes whose PUBREL is never sent stay incomplete. It is a Protocol Error with a
/// Reason Code, so [MQTT-4.13.1-1] applies: the Server "MUST close the Network Connection"
/// (the DISCONNECT before it is a SHOULD). mosquitto 2.0.11 deviates: it answers the excess
/// PUBLISH with PUBREC 0x97 (Quota exceeded) and keeps the connection.
#[tokio::test]
async fn sec_3_3_4_receive_maximum_exceeded_v5() {
    let witness = Witness::new().await;
    let (mut c, _, props) = connect_with(&Connect::new(V5, &cid("toomany"))).await;
    let max = props.int(prop::RECEIVE_MAXIMUM).unwrap_or(65_535);
    if max > 1000 {
        eprintln!("Receive Maximum {max}: too many in-flight PUBLISHes to exceed in a test");
        c.disconnect().await;
        return;
    }
    let t = topic("toomany");
    let mut bytes = Vec::new();
    for id in 1..=max + 1 {
        bytes.extend(Publish::new(&t, b"x").qos(2, id as u16).encode(V5));
    }
    c.send(&bytes).await;
    let before = c
        .expect_closed("one QoS 2 PUBLISH over the server's Receive Maximum")
        .await;
    let (recs, rest): (Vec<_>, Vec<_>) = before
        .into_iter()
        .partition(|p| matches!(p, Packet::Pubrec(_)));
    assert!(
        recs.len() as u32 <= max,
        "{} PUBRECs for Receive Maximum {max}",
        recs.len()
    );
    assert!(
        matches!(
            rest.as_slice(),
            [] | [Packet::Disconnect { reason: 0x93, .. }]
        ),
        "expected DISCONNECT 0x93 (Receive Maximum exceeded) and the close, got {rest:?}"
    );
    witness.check("Receive Maximum exceeded").await;
}

/// [MQTT-3.1.2-24] (MQTT 5.0) "The Server MUST NOT send packets exceeding Maximum Packet
/// Size to the Client." (Section 3.1.2.11.4: "The packet size is the total number of bytes
/// in an MQTT Control Packet".) mosquitto 2.0.11 deviates by one byte: it leaves the first
/// byte of the fixed header out of its count and sends 129-byte packets to a client whose
/// maximum is 128.
#[tokio::test]
async fn mqtt_3_1_2_24_maximum_packet_size_respected_v5() {
    let t = topic("maxsize");
    let max = 128usize;
    let connect =
        Connect::new(V5, &cid("maxsize")).prop(Prop::Four(prop::MAXIMUM_PACKET_SIZE, max as u32));
    let (mut c, _, _) = connect_with(&connect).await;
    c.subscribe(&t, 1).await;
    let overhead = Publish::new(&t, b"").qos(1, 1).encode(V5).len();
    let mut publisher = connect_client(V5).await;
    for size in [max - overhead - 1, max - overhead, max - overhead + 1, 1000] {
        publisher
            .publish(Publish::new(&t, &vec![b'x'; size]).qos(1, 0))
            .await;
    }
    publisher.publish(Publish::new(&t, b"end").qos(1, 0)).await;
    let mut sizes = Vec::new();
    loop {
        let p = c.receive().await;
        if p.payload == b"end" {
            break;
        }
        sizes.push(p.payload.len());
    }
    // A broker that adds properties may have to drop the message that fits exactly too.
    assert!(
        sizes.iter().all(|s| *s <= max - overhead),
        "payload sizes {sizes:?} delivered under a {max} byte limit"
    );
    assert!(
        c.sizes.iter().all(|s| *s <= max),
        "packets received: {:?} bytes",
        c.sizes
    );
    publisher.disconnect().await;
    c.disconnect().await;
}

/// [MQTT-3.1.2-25] (MQTT 5.0) "Where a Packet is too large to send, the Server MUST discard
/// it without sending it and then behave as if it had completed sending that Application
/// Message." With Receive Maximum 1, a discarded QoS 1 message must not hold the only slot.
/// mosquitto 2.0.11 deviates: the discarded message keeps its slot (and packet identifier)
/// for good, and nothing more is delivered to that client.
#[tokio::test]
async fn mqtt_3_1_2_25_oversized_message_discarded_as_sent_v5() {
    let t = topic("maxsize");
    let connect = Connect::new(V5, &cid("maxsize"))
        .prop(Prop::Four(prop::MAXIMUM_PACKET_SIZE, 200))
        .prop(Prop::Two(prop::RECEIVE_MAXIMUM, 1));
    let (mut c, _, _) = connect_with(&connect).await;
    c.subscribe(&t, 1).await;
    let mut publisher = connect_client(V5).await;
    publisher
        .publish(Publish::new(&t, &[b'x'; 500]).qos(1, 0))
        .await;
    publisher
        .publish(Publish::new(&t, b"small").qos(1, 0))
        .await;
    assert_eq!(
        c.receive().await.payload,
        b"small",
        "the message after the oversized one"
    );
    c.expect_nothing("after the small message").await;
    publisher.disconnect().await;
    c.disconnect().await;
}

/// One message from `p` to a fresh subscriber; returns what the subscriber got.
async fn forwarded(p: Publish) -> Publish {
    let t = p.topic.clone();
    let mut sub = subscriber(V5, &t, 1).await;
    publish_once(V5, p).await;
    let got = sub.receive().await;
    sub.disconnect().await;
    got
}

/// [MQTT-3.3.2-4] (MQTT 5.0) "A Server MUST send the Payload Format Indicator unaltered to
/// all subscribers receiving the Application Message."
#[tokio::test]
async fn mqtt_3_3_2_4_payload_format_indicator_forwarded_v5() {
    for value in [0u8, 1] {
        let p = Publish::new(&topic("pfi"), "ünïcode".as_bytes())
            .qos(1, 0)
            .prop(Prop::Byte(prop::PAYLOAD_FORMAT_INDICATOR, value));
        let got = forwarded(p).await;
        assert_eq!(
            got.props.int(prop::PAYLOAD_FORMAT_INDICATOR),
            Some(u32::from(value))
        );
    }
}

/// [MQTT-3.3.2-20] (MQTT 5.0) "A Server MUST send the Content Type unaltered to all
/// subscribers receiving the Application Message."
#[tokio::test]
async fn mqtt_3_3_2_20_content_type_forwarded_v5() {
    let ct = "application/vnd.bridgehead+json; charset=utf-8";
    let got = forwarded(
        Publish::new(&topic("ct"), b"{}")
            .qos(1, 0)
            .prop(Prop::Str(prop::CONTENT_TYPE, ct.into())),
    )
    .await;
    assert_eq!(got.props.str(prop::CONTENT_TYPE), Some(ct));
}

/// [MQTT-3.3.2-15] (MQTT 5.0) "The Server MUST send the Response Topic unaltered to all
/// subscribers receiving the Application Message."
#[tokio::test]
async fn mqtt_3_3_2_15_response_topic_forwarded_v5() {
    let rt = topic("reply/here");
    let got = forwarded(
        Publish::new(&topic("rt"), b"?")
            .qos(1, 0)
            .prop(Prop::Str(prop::RESPONSE_TOPIC, rt.clone())),
    )
    .await;
    assert_eq!(got.props.str(prop::RESPONSE_TOPIC), Some(rt.as_str()));
}

/// [MQTT-3.3.2-16] (MQTT 5.0) "The Server MUST send the Correlation Data unaltered to all
/// subscribers receiving the Application Message."
#[tokio::test]
async fn mqtt_3_3_2_16_correlation_data_forwarded_v5() {
    let data = vec![0u8, 0xFF, 0x10, 0x00, 0x7F];
    let got = forwarded(
        Publish::new(&topic("cd"), b"?")
            .qos(1, 0)
            .prop(Prop::Bin(prop::CORRELATION_DATA, data.clone())),
    )
    .await;
    assert_eq!(got.props.bin(prop::CORRELATION_DATA), Some(data.as_slice()));
}

/// [MQTT-3.3.2-17] (MQTT 5.0) "The Server MUST send all User Properties unaltered in a
/// PUBLISH packet when forwarding the Application Message to a Client." [MQTT-3.3.2-18]:
/// "The Server MUST maintain the order of User Properties when forwarding the Application
/// Message." (Repeated names are allowed.)
#[tokio::test]
async fn mqtt_3_3_2_17_user_properties_forwarded_in_order_v5() {
    let users = [
        ("zone", "1"),
        ("a", ""),
        ("zone", "2"),
        ("ключ", "значение"),
    ];
    let mut p = Publish::new(&topic("up"), b"u").qos(1, 0);
    for (k, v) in users {
        p = p.prop(Prop::User(k.into(), v.into()));
    }
    let got = forwarded(p).await;
    let expected: Vec<(String, String)> = users
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got.props.users(), expected);
}

/// Section 4.10 (MQTT 5.0), Request / Response: the responder gets the request's Response
/// Topic and Correlation Data and answers there; the requester gets the Correlation Data
/// back.
#[tokio::test]
async fn sec_4_10_request_response_v5() {
    let (request_topic, response_topic) = (topic("req"), topic("resp"));
    let mut requester = subscriber(V5, &response_topic, 1).await;
    let mut responder = subscriber(V5, &request_topic, 1).await;
    requester
        .publish(
            Publish::new(&request_topic, b"what time is it")
                .qos(1, 0)
                .prop(Prop::Str(prop::RESPONSE_TOPIC, response_topic.clone()))
                .prop(Prop::Bin(prop::CORRELATION_DATA, b"req-7".to_vec())),
        )
        .await;
    let request = responder.receive().await;
    let reply_to = request
        .props
        .str(prop::RESPONSE_TOPIC)
        .expect("Response Topic")
        .to_string();
    let correlation = request
        .props
        .bin(prop::CORRELATION_DATA)
        .expect("Correlation Data")
        .to_vec();
    responder
        .publish(
            Publish::new(&reply_to, b"noon")
                .qos(1, 0)
                .prop(Prop::Bin(prop::CORRELATION_DATA, correlation)),
        )
        .await;
    let response = requester.receive().await;
    assert_eq!(response.payload, b"noon");
    assert_eq!(
        response.props.bin(prop::CORRELATION_DATA),
        Some(&b"req-7"[..])
    );
    requester.disconnect().await;
    responder.disconnect().await;
}

/// [MQTT-3.4.2-1] (MQTT 5.0) "The Client or Server sending the PUBACK packet MUST use one of
/// the PUBACK Reason Codes." For a message nobody subscribed to: 0x00 (Success) or 0x10 (No
/// matching subscribers); [MQTT-3.5.2-1] likewise for PUBREC.
#[tokio::test]
async fn mqtt_3_4_2_1_puback_reason_without_subscribers_v5() {
    let mut c = connect(V5, "nosubs").await;
    let nobody = topic("nobody");
    for qos in [1u8, 2] {
        let reason = c.publish(Publish::new(&nobody, b"n").qos(qos, 0)).await;
        assert!(
            reason == 0x00 || reason == 0x10,
            "QoS {qos} acknowledgement reason {reason:#04x}"
        );
    }
    let t = topic("somebody");
    let mut sub = subscriber(V5, &t, 1).await;
    assert_eq!(
        c.publish(Publish::new(&t, b"s").qos(1, 0)).await,
        0x00,
        "PUBACK with a subscriber"
    );
    sub.receive().await;
    sub.disconnect().await;
    c.disconnect().await;
}

/// [MQTT-3.1.2-29] (MQTT 5.0) "If the value of Request Problem Information is 0, the Server
/// MAY return a Reason String or User Properties on a CONNACK or DISCONNECT packet, but MUST
/// NOT send a Reason String or User Properties on any packet other than PUBLISH, CONNACK, or
/// DISCONNECT." Exercised with a PUBACK and a PUBREC without subscribers, a refused
/// subscription and an UNSUBACK for nothing.
#[tokio::test]
async fn mqtt_3_1_2_29_request_problem_information_0_v5() {
    let connect =
        Connect::new(V5, &cid("noproblem")).prop(Prop::Byte(prop::REQUEST_PROBLEM_INFORMATION, 0));
    let (mut c, _, _) = connect_with(&connect).await;
    let nobody = topic("nobody");
    c.send(&Publish::new(&nobody, b"1").qos(1, 1).encode(V5))
        .await;
    c.send(&Publish::new(&nobody, b"2").qos(2, 2).encode(V5))
        .await;
    c.send(&pubrel(V5, 2)).await;
    c.send(&subscribe(
        V5,
        3,
        &[(&format!("$share/g/{nobody}"), 0)],
        &[],
    ))
    .await;
    c.send(&unsubscribe(V5, 4, &[&topic("none")])).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let p = c.expect("acknowledgements").await;
        let props = match &p {
            Packet::Puback(a) | Packet::Pubrec(a) | Packet::Pubcomp(a) => a.props.clone(),
            Packet::Suback { props, .. } | Packet::Unsuback { props, .. } => props.clone(),
            other => panic!("unexpected {other:?}"),
        };
        assert!(
            !props.has(prop::REASON_STRING) && !props.has(prop::USER_PROPERTY),
            "Reason String or User Property with Request Problem Information 0: {p:?}"
        );
        if !matches!(p, Packet::Pubrec(_)) {
            seen.push(p);
        }
    }
    c.disconnect().await;
}

/// [MQTT-4.12.0-7] (MQTT 5.0) "If the Client does not include an Authentication Method in
/// the CONNECT, the Client MUST NOT send an AUTH packet to the Server." (A Protocol Error.)
#[tokio::test]
async fn mqtt_4_12_0_7_auth_without_authentication_method_v5() {
    let auth = with_header(0xF0, &[0x19, 0]);
    closes(
        "AUTH without an Authentication Method",
        V5,
        true,
        &auth,
        BAD,
    )
    .await;
}

// =======================================================================================
// DISCONNECT with a malformed packet: the connection closes like a network failure, so the
// will goes out

async fn malformed_disconnect_publishes_will(version: u8, bytes: &[u8], case: &str) {
    let witness = Witness::new().await;
    let t = topic("will");
    let (mut client, mut observer) = with_will(version, Will::new(&t, b"gone", 1), &[]).await;
    client.send(bytes).await;
    let before = client.expect_closed(case).await;
    check_goodbye(version, case, &before, BAD, &[]);
    assert_eq!(
        observer.receive_on(&t).await.payload,
        b"gone",
        "{case}: no will"
    );
    observer.disconnect().await;
    witness.check(case).await;
}

/// [MQTT-3.14.1-1] "The Server MUST validate that reserved bits are set to zero and
/// disconnect the Client if they are not zero." The connection then ends without a valid
/// DISCONNECT, so the will is published ([MQTT-3.1.2-8], section 3.1.2.5: "The Server
/// closes the Network Connection because of a protocol error").
#[tokio::test]
async fn mqtt_3_14_1_1_disconnect_reserved_flags_v311() {
    malformed_disconnect_publishes_will(V311, &[0xE1, 0x00], "DISCONNECT with fixed header 0xE1")
        .await;
}

/// [MQTT-4.8.0-1] "Unless stated otherwise, if either the Server or Client encounters a
/// protocol violation, it MUST close the Network Connection on which it received that
/// Control Packet which caused the protocol violation." An MQTT 3.1.1 DISCONNECT has no
/// variable header; the will is published (section 3.1.2.5).
#[tokio::test]
async fn mqtt_4_8_0_1_disconnect_with_body_v311() {
    malformed_disconnect_publishes_will(
        V311,
        &[0xE0, 0x01, 0x00],
        "DISCONNECT with Remaining Length 1",
    )
    .await;
}

/// [MQTT-3.14.1-1] (MQTT 5.0) "The Client or Server MUST validate that reserved bits are set
/// to 0. If they are not zero it sends a DISCONNECT packet with a Reason code of 0x81
/// (Malformed Packet)." The will is published ([MQTT-3.1.2-8]: only a DISCONNECT with
/// Reason Code 0x00 deletes it).
#[tokio::test]
async fn mqtt_3_14_1_1_disconnect_reserved_flags_v5() {
    malformed_disconnect_publishes_will(V5, &[0xE1, 0x00], "DISCONNECT with fixed header 0xE1")
        .await;
}

/// [MQTT-4.13.1-1] (MQTT 5.0) "When a Server detects a Malformed Packet or Protocol Error,
/// and a Reason Code is given in the specification, it MUST close the Network Connection."
/// A DISCONNECT whose properties run past its end is malformed; the will is published.
#[tokio::test]
async fn mqtt_4_13_1_1_disconnect_malformed_properties_v5() {
    malformed_disconnect_publishes_will(
        V5,
        &[0xE0, 0x03, 0x00, 0x05, 0x11],
        "DISCONNECT with a property overrun",
    )
    .await;
}

// =======================================================================================
// Malformed packets of every type: the broker closes that connection (MQTT 5: a
// CONNACK or DISCONNECT first may say 0x81 or 0x82) and keeps serving everybody else.

/// A CONNECT with a raw client identifier.
fn connect_with_raw_id(level: u8, id: &[u8]) -> Vec<u8> {
    let mut body = connect_header(level, 0x02);
    body.extend(binary(id));
    connect_packet(&body)
}

/// An MQTT 5 CONNECT with raw property bytes (Property Length included).
fn connect_with_raw_props(props: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend([5, 0x02, 0, 60]);
    body.extend_from_slice(props);
    body.extend(string(&cid("props")));
    connect_packet(&body)
}

/// Property bytes with their Property Length.
fn raw_props(bytes: &[u8]) -> Vec<u8> {
    let mut out = varint(bytes.len());
    out.extend_from_slice(bytes);
    out
}

/// A PUBLISH with a raw Topic Name and (MQTT 5) raw property bytes.
fn publish_raw(version: u8, qos: u8, topic: &[u8], props: &[u8]) -> Vec<u8> {
    let mut body = binary(topic);
    if qos > 0 {
        body.extend([0, 1]);
    }
    if version == V5 {
        body.extend_from_slice(props);
    }
    body.extend(b"payload");
    with_header(0x30 | (qos << 1), &body)
}

fn under_conf(tail: &[u8]) -> Vec<u8> {
    [b"conf/".as_slice(), tail].concat()
}

/// A SUBSCRIBE with a raw filter, its options byte and (MQTT 5) raw property bytes.
fn subscribe_raw(version: u8, id: u16, filter: &[u8], options: u8, props: &[u8]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 {
        body.extend_from_slice(props);
    }
    body.extend(binary(filter));
    body.push(options);
    with_header(0x82, &body)
}

/// An UNSUBSCRIBE with a raw filter and (MQTT 5) raw property bytes.
fn unsubscribe_raw(version: u8, id: u16, filter: &[u8], props: &[u8]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 {
        body.extend_from_slice(props);
    }
    body.extend(binary(filter));
    with_header(0xA2, &body)
}

/// Ill-formed UTF-8: a lead byte without its continuation, an encoded surrogate (U+D800),
/// and an overlong encoding of "/".
const BAD_UTF8: [&[u8]; 3] = [b"a\xC3(", b"a\xED\xA0\x80", b"a\xC0\xAF"];

/// One case per entry: `name: version, connected, bytes, reason codes;` with the doc comment
/// quoting the statement it checks.
macro_rules! malformed {
    ($($(#[$doc:meta])* $name:ident: $version:expr, $connected:expr, $bytes:expr, $reasons:expr;)*) => {
        $(
            $(#[$doc])*
            #[tokio::test]
            async fn $name() {
                let variants: Vec<Vec<u8>> = $bytes;
                for (i, bytes) in variants.iter().enumerate() {
                    let case = format!("{} #{i}: {bytes:02X?}", stringify!($name));
                    closes(&case, $version, $connected, bytes, $reasons).await;
                }
            }
        )*
    };
}

malformed! {
    // ---- CONNECT, MQTT 3.1.1 (no CONNACK: [MQTT-3.1.4-1] "... close the Network Connection
    // without sending a CONNACK if it does not conform")

    /// [MQTT-3.1.4-1] "The Server MUST validate that the CONNECT Packet conforms to section
    /// 3.1 and close the Network Connection without sending a CONNACK if it does not
    /// conform." Here the Remaining Length ends inside the Client Identifier.
    mqtt_3_1_4_1_connect_truncated_v311: V311, false, {
        let mut cut = connect_header(V311, 0x02);
        cut.push(0);
        let mut short = connect_header(V311, 0x02);
        short.extend([0, 10, b'a', b'b']);
        vec![connect_packet(&cut), connect_packet(&short), connect_packet(&connect_header(V311, 0x02)[..7])]
    }, &[];

    /// [MQTT-3.1.4-1] Here for MQTT 3.1 ("MQIsdp", level 3).
    mqtt_3_1_4_1_connect_truncated_v31: V31, false, {
        let mut cut = connect_header(V31, 0x02);
        cut.push(0);
        vec![connect_packet(&cut)]
    }, &[];

    /// [MQTT-4.8.0-1] "Unless stated otherwise, if either the Server or Client encounters a
    /// protocol violation, it MUST close the Network Connection on which it received that
    /// Control Packet which caused the protocol violation." Section 2.2.3: the Remaining
    /// Length takes at most four bytes.
    mqtt_4_8_0_1_remaining_length_over_4_bytes_v311: V311, false,
        vec![vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]], &[];

    /// [MQTT-1.5.3-1] "The character data in a UTF-8 encoded string MUST be well-formed
    /// UTF-8 as defined by the Unicode specification and restated in RFC 3629. In
    /// particular this data MUST NOT include encodings of code points between U+D800 and
    /// U+DFFF. If a Server or Client receives a Control Packet containing ill-formed UTF-8
    /// it MUST close the Network Connection." (The Client Identifier, [MQTT-3.1.3-4].)
    mqtt_1_5_3_1_client_id_ill_formed_utf8_v311: V311, false,
        BAD_UTF8.iter().map(|id| connect_with_raw_id(V311, id)).collect(), &[];

    /// [MQTT-1.5.3-2] "A UTF-8 encoded string MUST NOT include an encoding of the null
    /// character U+0000. If a receiver (Server or Client) receives a Control Packet
    /// containing U+0000 it MUST close the Network Connection."
    mqtt_1_5_3_2_client_id_null_character_v311: V311, false,
        vec![connect_with_raw_id(V311, b"a\0b")], &[];

    /// [MQTT-3.1.3-10] "The Will Topic MUST be a UTF-8 encoded string as defined in Section
    /// 1.5.3."
    mqtt_3_1_3_10_will_topic_ill_formed_utf8_v311: V311, false, {
        let mut rest = binary(b"conf/\xC3(");
        rest.extend(binary(b"gone"));
        vec![connect_with_flags(V311, 0x06, &rest)]
    }, &[];

    /// [MQTT-3.1.3-11] "The User Name MUST be a UTF-8 encoded string as defined in Section
    /// 1.5.3."
    mqtt_3_1_3_11_user_name_ill_formed_utf8_v311: V311, false,
        vec![connect_with_flags(V311, 0x82, &binary(b"user\xED\xA0\x80"))], &[];

    /// [MQTT-3.1.2-18] "If the User Name Flag is set to 0, a user name MUST NOT be present in
    /// the payload." [MQTT-3.1.2-20]: "If the Password Flag is set to 0, a password MUST NOT
    /// be present in the payload."
    mqtt_3_1_2_18_user_name_without_flag_v311: V311, false,
        vec![connect_with_flags(V311, 0x02, &string("user")), connect_with_flags(V311, 0x82, &[string("user"), binary(b"pw")].concat())], &[];

    // ---- CONNECT, MQTT 5 (a CONNACK with 0x81 or 0x82 may come first)

    /// [MQTT-3.1.4-1] (MQTT 5.0) "The Server MUST validate that the CONNECT packet matches
    /// the format described in section 3.1 and close the Network Connection if it does not
    /// match." Here the Remaining Length ends inside a field.
    mqtt_3_1_4_1_connect_truncated_v5: V5, false, {
        let mut cut = connect_header(V5, 0x02);
        cut.push(0);
        let mut short = connect_header(V5, 0x02);
        short.extend([0, 10, b'a']);
        let mut props = string("MQTT");
        props.extend([5, 0x02, 0, 60, 5, 0x11, 0, 0]);
        vec![connect_packet(&cut), connect_packet(&short), connect_packet(&props)]
    }, BAD;

    /// [MQTT-1.5.4-1] (MQTT 5.0) "The character data in a UTF-8 Encoded String MUST be
    /// well-formed UTF-8 as defined by the Unicode specification and restated in RFC 3629.
    /// In particular, the character data MUST NOT include encodings of code points between
    /// U+D800 and U+DFFF." (A Malformed Packet.)
    mqtt_1_5_4_1_client_id_ill_formed_utf8_v5: V5, false,
        BAD_UTF8.iter().map(|id| connect_with_raw_id(V5, id)).collect(), BAD;

    /// [MQTT-1.5.4-2] (MQTT 5.0) "A UTF-8 Encoded String MUST NOT include an encoding of the
    /// null character U+0000."
    mqtt_1_5_4_2_client_id_null_character_v5: V5, false,
        vec![connect_with_raw_id(V5, b"a\0b")], BAD;

    /// Section 2.2.2.2 (MQTT 5.0): a property identifier that is not in the table, or that
    /// does not belong in a CONNECT (Topic Alias, 0x23), is a Malformed Packet or a
    /// Protocol Error.
    sec_2_2_2_2_connect_bad_property_v5: V5, false,
        vec![connect_with_raw_props(&raw_props(&[0x7F, 0])), connect_with_raw_props(&raw_props(&[0x23, 0, 1]))], BAD;

    /// Section 3.1.2.11 (MQTT 5.0): "It is a Protocol Error to include the Session Expiry
    /// Interval more than once", "... to include the Receive Maximum value more than once or
    /// for it to have the value 0", "... to include the Maximum Packet Size more than once,
    /// or for the value to be set to zero", "... to include Request Problem Information more
    /// than once, or to have a value other than 0 or 1".
    sec_3_1_2_11_connect_property_protocol_errors_v5: V5, false, vec![
        connect_with_raw_props(&raw_props(&[0x11, 0, 0, 0, 5, 0x11, 0, 0, 0, 6])),
        connect_with_raw_props(&raw_props(&[0x21, 0, 0])),
        connect_with_raw_props(&raw_props(&[0x27, 0, 0, 0, 0])),
        connect_with_raw_props(&raw_props(&[0x17, 2])),
    ], BAD;

    /// [MQTT-3.1.3-11] (MQTT 5.0) "The Will Topic MUST be a UTF-8 Encoded String."
    mqtt_3_1_3_11_will_topic_ill_formed_utf8_v5: V5, false, {
        let mut rest = vec![0];
        rest.extend(binary(b"conf/\xC3("));
        rest.extend(binary(b"gone"));
        vec![connect_with_flags(V5, 0x06, &rest)]
    }, BAD;

    // ---- PUBLISH

    /// [MQTT-3.3.2-1] "The Topic Name MUST be present as the first field in the PUBLISH
    /// Packet Variable header. It MUST be a UTF-8 encoded string." Here the Remaining Length
    /// ends inside the Topic Name or the Packet Identifier.
    mqtt_3_3_2_1_publish_truncated_v311: V311, true,
        vec![vec![0x30, 0x03, 0x00, 0x05, b'a'], vec![0x32, 0x04, 0x00, 0x01, b'a', 0x00], vec![0x30, 0x01, 0x00]], &[];

    /// [MQTT-3.3.2-1] Here for MQTT 3.1.
    mqtt_3_3_2_1_publish_truncated_v31: V31, true,
        vec![vec![0x30, 0x03, 0x00, 0x05, b'a']], &[];

    /// [MQTT-4.8.0-1] "... if either the Server or Client encounters a protocol violation,
    /// it MUST close the Network Connection". A Remaining Length of five bytes.
    mqtt_4_8_0_1_publish_remaining_length_over_4_bytes_v311: V311, true,
        vec![vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]], &[];

    /// [MQTT-1.5.3-1] "If a Server or Client receives a Control Packet containing ill-formed
    /// UTF-8 it MUST close the Network Connection." (The Topic Name.)
    mqtt_1_5_3_1_publish_topic_ill_formed_utf8_v311: V311, true,
        BAD_UTF8.iter().map(|t| publish_raw(V311, 1, &under_conf(t), &[])).collect(), &[];

    /// [MQTT-1.5.3-2] "If a receiver (Server or Client) receives a Control Packet containing
    /// U+0000 it MUST close the Network Connection." [MQTT-4.7.3-2]: "Topic Names and Topic
    /// Filters MUST NOT include the null character (Unicode U+0000)."
    mqtt_1_5_3_2_publish_topic_null_character_v311: V311, true,
        vec![publish_raw(V311, 0, &under_conf(b"a\0b"), &[])], &[];

    /// [MQTT-4.7.3-1] "All Topic Names and Topic Filters MUST be at least one character
    /// long."
    mqtt_4_7_3_1_publish_empty_topic_v311: V311, true,
        vec![publish_raw(V311, 1, b"", &[])], &[];

    /// [MQTT-4.13.1-1] (MQTT 5.0) "When a Server detects a Malformed Packet or Protocol
    /// Error, and a Reason Code is given in the specification, it MUST close the Network
    /// Connection." Here the Remaining Length ends inside a field, or is five bytes long.
    mqtt_4_13_1_1_publish_truncated_v5: V5, true, vec![
        vec![0x30, 0x03, 0x00, 0x05, b'a'],
        vec![0x30, 0x03, 0x00, 0x01, b'a'],
        vec![0x32, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x05],
        vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
    ], BAD;

    /// [MQTT-1.5.4-1] (MQTT 5.0): ill-formed UTF-8 in the Topic Name ([MQTT-3.3.2-1]: "It
    /// MUST be a UTF-8 Encoded String").
    mqtt_1_5_4_1_publish_topic_ill_formed_utf8_v5: V5, true,
        BAD_UTF8.iter().map(|t| publish_raw(V5, 1, &under_conf(t), &[0])).collect(), &[0x81, 0x82, 0x90];

    /// [MQTT-1.5.4-2] (MQTT 5.0) "A UTF-8 Encoded String MUST NOT include an encoding of the
    /// null character U+0000." (The Topic Name.)
    mqtt_1_5_4_2_publish_topic_null_character_v5: V5, true,
        vec![publish_raw(V5, 0, &under_conf(b"a\0b"), &[0])], &[0x81, 0x82, 0x90];

    /// Section 2.2.2.2 (MQTT 5.0): an unknown property identifier, a property that does not
    /// belong in a PUBLISH (Session Expiry Interval), and a Property Length past the end of
    /// the packet are malformed.
    sec_2_2_2_2_publish_bad_property_v5: V5, true, vec![
        publish_raw(V5, 1, &under_conf(b"p"), &raw_props(&[0x7F, 0])),
        publish_raw(V5, 1, &under_conf(b"p"), &raw_props(&[0x11, 0, 0, 0, 1])),
        publish_raw(V5, 1, &under_conf(b"p"), &[0x40]),
    ], BAD;

    /// Section 3.3.2.3 (MQTT 5.0): "It is a Protocol Error to include the Payload Format
    /// Indicator more than once", likewise the Message Expiry Interval, the Topic Alias, the
    /// Content Type, the Response Topic and the Correlation Data.
    sec_3_3_2_3_publish_duplicate_property_v5: V5, true, vec![
        publish_raw(V5, 1, &under_conf(b"p"), &raw_props(&[0x01, 0, 0x01, 1])),
        publish_raw(V5, 1, &under_conf(b"p"), &raw_props(&[0x02, 0, 0, 0, 9, 0x02, 0, 0, 0, 9])),
        publish_raw(V5, 1, &under_conf(b"p"), &raw_props(&[0x03, 0, 1, b'a', 0x03, 0, 1, b'b'])),
    ], BAD;

    // ---- PUBACK, PUBREC, PUBREL, PUBCOMP

    /// [MQTT-2.2.2-2] "If invalid flags are received, the receiver MUST close the Network
    /// Connection." ([MQTT-2.2.2-1]: PUBACK, PUBREC and PUBCOMP have flags 0000.)
    /// mosquitto 2.0.11 deviates: it ignores the flags of these three (and answers the
    /// PUBREC with a PUBREL).
    mqtt_2_2_2_2_ack_reserved_flags_v311: V311, true,
        vec![vec![0x41, 0x02, 0x00, 0x01], vec![0x58, 0x02, 0x00, 0x01], vec![0x72, 0x02, 0x00, 0x01]], &[];

    /// [MQTT-4.8.0-1] "... MUST close the Network Connection": an MQTT 3.1.1
    /// acknowledgement has a Remaining Length of exactly 2.
    mqtt_4_8_0_1_ack_wrong_length_v311: V311, true, vec![
        vec![0x40, 0x01, 0x00],
        vec![0x50, 0x01, 0x00],
        vec![0x62, 0x01, 0x00],
        vec![0x70, 0x01, 0x00],
    ], &[];

    /// [MQTT-2.1.3-1] (MQTT 5.0) "Where a flag bit is marked as "Reserved", it is reserved
    /// for future use and MUST be set to the value listed." (A Malformed Packet otherwise,
    /// which [MQTT-4.13.1-1] closes.) mosquitto 2.0.11 deviates as in 3.1.1.
    mqtt_2_1_3_1_ack_reserved_flags_v5: V5, true,
        vec![vec![0x41, 0x02, 0x00, 0x01], vec![0x58, 0x02, 0x00, 0x01], vec![0x72, 0x02, 0x00, 0x01]], BAD;

    /// [MQTT-4.13.1-1] (MQTT 5.0): acknowledgements cut short, with a property past the end,
    /// or with an unknown property.
    mqtt_4_13_1_1_ack_malformed_v5: V5, true, vec![
        vec![0x40, 0x01, 0x00],
        vec![0x62, 0x01, 0x00],
        vec![0x40, 0x04, 0x00, 0x01, 0x00, 0x09],
        vec![0x70, 0x06, 0x00, 0x01, 0x00, 0x02, 0x7F, 0x00],
    ], BAD;

    // ---- SUBSCRIBE

    /// [MQTT-3.8.3-1] "The Topic Filters in a SUBSCRIBE packet payload MUST be UTF-8 encoded
    /// strings as defined in Section 1.5.3." ([MQTT-1.5.3-1], [MQTT-1.5.3-2]: close.)
    mqtt_3_8_3_1_subscribe_filter_not_utf8_v311: V311, true,
        BAD_UTF8.iter().chain([&b"a\0b"[..]].iter()).map(|f| subscribe_raw(V311, 1, &under_conf(f), 0, &[])).collect(), &[];

    /// [MQTT-2.3.1-1] "SUBSCRIBE, UNSUBSCRIBE, and PUBLISH (in cases where QoS > 0) Control
    /// Packets MUST contain a non-zero 16-bit Packet Identifier."
    mqtt_2_3_1_1_subscribe_packet_id_0_v311: V311, true,
        vec![subscribe_raw(V311, 0, b"conf/x", 0, &[])], &[];

    /// [MQTT-4.8.0-1] "... MUST close the Network Connection": a SUBSCRIBE cut inside its
    /// filter, or without the requested QoS byte.
    mqtt_4_8_0_1_subscribe_truncated_v311: V311, true,
        vec![vec![0x82, 0x05, 0x00, 0x01, 0x00, 0x05, b'a'], vec![0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], vec![0x82, 0x01, 0x00]], &[];

    /// [MQTT-3.8.3-1] (MQTT 5.0) "The Topic Filters MUST be a UTF-8 Encoded String."
    mqtt_3_8_3_1_subscribe_filter_not_utf8_v5: V5, true,
        BAD_UTF8.iter().chain([&b"a\0b"[..]].iter()).map(|f| subscribe_raw(V5, 1, &under_conf(f), 0, &[0])).collect(), BAD;

    /// [MQTT-2.2.1-3] (MQTT 5.0): a SUBSCRIBE "MUST assign it a non-zero Packet Identifier".
    mqtt_2_2_1_3_subscribe_packet_id_0_v5: V5, true,
        vec![subscribe_raw(V5, 0, b"conf/x", 0, &[0])], BAD;

    /// [MQTT-4.13.1-1] (MQTT 5.0): a SUBSCRIBE cut short, with an unknown property, or with
    /// two Subscription Identifiers (section 3.8.2.1.2: "It is a Protocol Error to include
    /// the Subscription Identifier more than once").
    mqtt_4_13_1_1_subscribe_malformed_v5: V5, true, vec![
        vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x00, 0x05, b'a'],
        vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'],
        subscribe_raw(V5, 1, b"conf/x", 0, &raw_props(&[0x7F, 0])),
        subscribe_raw(V5, 1, b"conf/x", 0, &raw_props(&[0x0B, 1, 0x0B, 2])),
    ], BAD;

    // ---- UNSUBSCRIBE

    /// [MQTT-3.10.3-1] "The Topic Filters in an UNSUBSCRIBE packet MUST be UTF-8 encoded
    /// strings as defined in Section 1.5.3, packed contiguously."
    mqtt_3_10_3_1_unsubscribe_filter_not_utf8_v311: V311, true,
        BAD_UTF8.iter().chain([&b"a\0b"[..]].iter()).map(|f| unsubscribe_raw(V311, 1, &under_conf(f), &[])).collect(), &[];

    /// [MQTT-2.3.1-1] An UNSUBSCRIBE "MUST contain a non-zero 16-bit Packet Identifier".
    /// Also cut short inside its filter.
    mqtt_2_3_1_1_unsubscribe_packet_id_0_v311: V311, true,
        vec![unsubscribe_raw(V311, 0, b"conf/x", &[]), vec![0xA2, 0x05, 0x00, 0x01, 0x00, 0x05, b'a']], &[];

    /// [MQTT-3.10.2-1] (MQTT 5.0) "The Topic Filters in an UNSUBSCRIBE packet MUST be UTF-8
    /// Encoded Strings."
    mqtt_3_10_2_1_unsubscribe_filter_not_utf8_v5: V5, true,
        BAD_UTF8.iter().chain([&b"a\0b"[..]].iter()).map(|f| unsubscribe_raw(V5, 1, &under_conf(f), &[0])).collect(), BAD;

    /// [MQTT-4.13.1-1] (MQTT 5.0): an UNSUBSCRIBE with packet identifier 0
    /// ([MQTT-2.2.1-3]), cut short, or with an unknown property.
    mqtt_4_13_1_1_unsubscribe_malformed_v5: V5, true, vec![
        unsubscribe_raw(V5, 0, b"conf/x", &[0]),
        vec![0xA2, 0x06, 0x00, 0x01, 0x00, 0x00, 0x05, b'a'],
        unsubscribe_raw(V5, 1, b"conf/x", &raw_props(&[0x7F, 0])),
    ], BAD;

    // ---- PINGREQ

    /// [MQTT-2.2.2-2] "If invalid flags are received, the receiver MUST close the Network
    /// Connection." A PINGREQ also has no variable header or payload ([MQTT-4.8.0-1]).
    /// mosquitto 2.0.11 deviates: it answers both with a PINGRESP.
    mqtt_2_2_2_2_pingreq_malformed_v311: V311, true,
        vec![vec![0xC1, 0x00], vec![0xC0, 0x01, 0x00]], &[];

    /// [MQTT-2.1.3-1] (MQTT 5.0): PINGREQ flags are reserved (0000), and it has no variable
    /// header or payload. mosquitto 2.0.11 deviates: it answers both with a PINGRESP.
    mqtt_2_1_3_1_pingreq_malformed_v5: V5, true,
        vec![vec![0xC1, 0x00], vec![0xC0, 0x01, 0x00]], BAD;

    // ---- Packets only a server sends, and reserved packet types

    /// [MQTT-4.8.0-1] "Unless stated otherwise, if either the Server or Client encounters a
    /// protocol violation, it MUST close the Network Connection on which it received that
    /// Control Packet which caused the protocol violation." A client never sends a CONNACK,
    /// well-formed or not (`29 02 00 01`); types 0 and 15 are reserved in 3.1.1.
    mqtt_4_8_0_1_connack_from_client_v311: V311, true, vec![
        vec![0x20, 0x02, 0x00, 0x00],
        vec![0x29, 0x02, 0x00, 0x01],
        vec![0x00, 0x00],
        vec![0xF0, 0x00],
    ], &[];

    /// [MQTT-4.8.0-1] Here for MQTT 3.1.
    mqtt_4_8_0_1_connack_from_client_v31: V31, true,
        vec![vec![0x29, 0x02, 0x00, 0x01], vec![0x20, 0x02, 0x00, 0x00]], &[];

    /// [MQTT-4.8.0-1] "... if either the Server or Client encounters a protocol violation,
    /// it MUST close the Network Connection": a client never sends SUBACK, UNSUBACK or
    /// PINGRESP. mosquitto 2.0.11 deviates: it ignores these three (its broker shares their
    /// handlers with its bridge client) and keeps the connection.
    mqtt_4_8_0_1_suback_unsuback_pingresp_from_client_v311: V311, true, vec![
        vec![0x90, 0x03, 0x00, 0x01, 0x00],
        vec![0xB0, 0x02, 0x00, 0x01],
        vec![0xD0, 0x00],
    ], &[];

    /// [MQTT-4.8.0-1] Here for MQTT 3.1. mosquitto 2.0.11 deviates as in 3.1.1.
    mqtt_4_8_0_1_suback_unsuback_pingresp_from_client_v31: V31, true,
        vec![vec![0xD0, 0x00], vec![0x90, 0x03, 0x00, 0x01, 0x00]], &[];

    /// [MQTT-4.13.1-1] (MQTT 5.0) "When a Server detects a Malformed Packet or Protocol
    /// Error, and a Reason Code is given in the specification, it MUST close the Network
    /// Connection." A client never sends a CONNACK (also the malformed `29 02 00 01`);
    /// type 0 is reserved.
    mqtt_4_13_1_1_connack_from_client_v5: V5, true, vec![
        vec![0x20, 0x03, 0x00, 0x00, 0x00],
        vec![0x29, 0x02, 0x00, 0x01],
        vec![0x00, 0x00],
    ], BAD;

    /// [MQTT-4.13.1-1] (MQTT 5.0): a client never sends SUBACK, UNSUBACK or PINGRESP (a
    /// Protocol Error, 0x82: "An unexpected or out of order packet was received").
    /// mosquitto 2.0.11 deviates: it ignores them and keeps the connection.
    mqtt_4_13_1_1_suback_unsuback_pingresp_from_client_v5: V5, true, vec![
        vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00],
        vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x00],
        vec![0xD0, 0x00],
    ], BAD;

    /// [MQTT-3.15.1-1] (MQTT 5.0) "Bits 3,2,1 and 0 of the Fixed Header of the AUTH packet
    /// are reserved and MUST all be set to 0. The Client or Server MUST treat any other
    /// value as malformed and close the Network Connection."
    mqtt_3_15_1_1_auth_reserved_flags_v5: V5, true,
        vec![vec![0xF1, 0x00]], BAD;
}
