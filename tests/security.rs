//! A locked-down local broker: devices log in with passwords made by mosquitto_passwd or
//! with TLS certificates, each user touches only its topics, nobody walks around the
//! broker, and nothing a hostile client sends stops the others or loses a message.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::certs::{TestCa, Usage};
use support::raw::{self, Connect, RawClient};
use support::{
    counter, mosquitto_passwd, mosquitto_passwd_delete, publish_many, telemetry_burst, Collector,
    Gateway, GatewayConfig, LocalSubscriber, Mosquitto, PasswdHash, QoS, TELEMETRY_FILTER,
};

const ACCEPTED: Option<u8> = Some(0);

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path
}

async fn login(port: u16, connect: Connect) -> Option<u8> {
    RawClient::login(port, &connect).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_made_by_mosquitto_passwd_let_the_right_devices_in() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let config = GatewayConfig::new(cloud.port);
    let passwd = config.dir().join("passwd");
    mosquitto_passwd(&passwd, "alice", "secret", PasswdHash::Sha512);
    mosquitto_passwd(&passwd, "bob", "hunter2", PasswdHash::Pbkdf2);
    let text = std::fs::read_to_string(&passwd).unwrap();
    assert!(
        text.contains("alice:$6$") && text.contains("bob:$7$"),
        "{text}"
    );
    let config = config
        .set_str("local", "password_file", &passwd.display().to_string())
        .set_str(
            "local",
            "listen_v5",
            &format!("127.0.0.1:{}", support::free_port()),
        );
    let gateway = Gateway::start(config);
    let port = gateway.local_port;

    // Both hash types, both protocol versions.
    assert_eq!(
        login(port, Connect::new("a1").login("alice", "secret")).await,
        ACCEPTED
    );
    assert_eq!(
        login(port, Connect::new("b1").login("bob", "hunter2")).await,
        ACCEPTED
    );
    assert_eq!(
        login(port, Connect::new("b1").v5().login("bob", "hunter2")).await,
        ACCEPTED
    );

    // The file is re-read when it changes: a new user gets in, a removed one does not.
    // (Edited on a copy and renamed over, so that the gateway sees both changes at once.)
    let edited = passwd.with_extension("new");
    std::fs::copy(&passwd, &edited).unwrap();
    mosquitto_passwd(&edited, "carol", "s3cret", PasswdHash::Pbkdf2);
    mosquitto_passwd_delete(&edited, "bob");
    std::fs::rename(&edited, &passwd).unwrap();
    assert!(
        gateway
            .wait_log(Duration::from_secs(10), &["passwords and acl", "loaded"])
            .await
            .is_some(),
        "the changed password file was not reloaded:\n{}",
        gateway.log()
    );
    assert_eq!(
        login(port, Connect::new("c1").login("carol", "s3cret")).await,
        ACCEPTED
    );

    // Refusals carry MQTT's own codes.
    assert_eq!(
        login(port, Connect::new("b2").login("bob", "hunter2")).await,
        Some(4)
    );
    assert_eq!(
        login(port, Connect::new("a2").login("alice", "wrong")).await,
        Some(4)
    );
    assert_eq!(login(port, Connect::new("anon")).await, Some(5));
    assert_eq!(
        login(port, Connect::new("a3").v5().login("alice", "wrong")).await,
        Some(0x86)
    );
    assert_eq!(login(port, Connect::new("anon5").v5()).await, Some(0x87));
    let line = gateway
        .wait_log(
            Duration::from_secs(5),
            &["login refused", "127.0.0.1", "bad user name or password"],
        )
        .await;
    assert!(
        line.is_some(),
        "no log line with the peer address:\n{}",
        gateway.log()
    );

    // An address that keeps failing is slowed down.
    let started = Instant::now();
    assert_eq!(
        login(port, Connect::new("a4").login("alice", "wrong")).await,
        Some(4)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "the sixth failure in a row was answered in {:?}",
        started.elapsed()
    );
    let status = gateway
        .wait_status(Duration::from_secs(5), "refusals counted", |s| {
            counter(s, "auth_failures") >= 6
        })
        .await;
    assert_eq!(counter(&status, "auth_failures"), 6, "{status}");
}

const ACL: &str = "\
# anonymous clients: nothing

user sensor
topic write warehouse/#
topic deny warehouse/+/fan/command

user operator
topic readwrite warehouse/#

user fan
topic read warehouse/zone1/fan/command

pattern readwrite devices/%u/#
pattern write clients/%c/status
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_keeps_each_user_to_its_topics() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let config = GatewayConfig::new(cloud.port);
    let passwd = config.dir().join("passwd");
    for user in ["sensor", "operator", "fan", "dave"] {
        mosquitto_passwd(&passwd, user, &format!("{user}-pw"), PasswdHash::Pbkdf2);
    }
    let acl = write(&config.dir(), "acl", ACL);
    let config = config
        .set_str("local", "password_file", &passwd.display().to_string())
        .set_str("local", "acl_file", &acl.display().to_string());
    let gateway = Gateway::start(config);
    let port = gateway.local_port;
    let command = "warehouse/zone1/fan/command";
    let mut fan = LocalSubscriber::connect_as(
        port,
        "fan-1",
        Some(("fan", "fan-pw")),
        true,
        Some((command, QoS::AtLeastOnce)),
    )
    .await;

    // The sensor may publish telemetry but not fan commands: acknowledged, never delivered.
    let (mut sensor, code) =
        RawClient::login(port, &Connect::new("sensor-1").login("sensor", "sensor-pw")).await;
    assert_eq!(code, ACCEPTED);
    sensor
        .send(&raw::publish_qos1_packet(command, 1, b"ON"))
        .await;
    assert_eq!(
        sensor.read_packet(Duration::from_secs(5)).await.as_deref(),
        Some(&[0x40, 0x02, 0x00, 0x01][..]),
        "a denied publish is acknowledged as mosquitto does"
    );
    assert!(
        fan.recv(Duration::from_secs(1)).await.is_none(),
        "a denied command reached the actuator"
    );
    // The operator may, and the fan gets it.
    let (mut operator, _) =
        RawClient::login(port, &Connect::new("op-1").login("operator", "operator-pw")).await;
    operator
        .send(&raw::publish_qos1_packet(command, 1, b"OFF"))
        .await;
    assert!(operator.read_packet(Duration::from_secs(5)).await.is_some());
    let got = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("the operator's command");
    assert_eq!(got.payload, "OFF");

    // A denied filter gets 0x80 and never reaches the broker; the allowed ones work.
    sensor.send(&raw::subscribe_packet(7, &["#"])).await;
    assert_eq!(
        sensor.read_packet(Duration::from_secs(5)).await.as_deref(),
        Some(&[0x90, 0x03, 0x00, 0x07, 0x80][..])
    );
    operator
        .send(&raw::subscribe_packet(
            8,
            &["warehouse/#", "#", "warehouse/zone2/+"],
        ))
        .await;
    assert_eq!(
        operator
            .read_packet(Duration::from_secs(5))
            .await
            .as_deref(),
        Some(&[0x90, 0x05, 0x00, 0x08, 0x01, 0x80, 0x01][..])
    );

    // %u and %c patterns.
    let mut own = LocalSubscriber::connect_as(
        port,
        "dave-sub",
        Some(("dave", "dave-pw")),
        true,
        Some(("devices/dave/#", QoS::AtLeastOnce)),
    )
    .await;
    let (mut dave, _) =
        RawClient::login(port, &Connect::new("cam-7").login("dave", "dave-pw")).await;
    for (id, topic) in [
        (1, "devices/dave/temp"),
        (2, "devices/erin/temp"),
        (3, "clients/cam-7/status"),
        (4, "clients/cam-8/status"),
    ] {
        dave.send(&raw::publish_qos1_packet(topic, id, b"x")).await;
        assert!(
            dave.read_packet(Duration::from_secs(5)).await.is_some(),
            "PUBACK {id}"
        );
    }
    let got = own
        .recv(Duration::from_secs(5))
        .await
        .expect("dave's own topic");
    assert_eq!(got.topic, "devices/dave/temp");
    let status = gateway
        .wait_status(Duration::from_secs(5), "denials counted", |s| {
            counter(s, "acl_denied") >= 3 && counter(s, "subscriptions_refused") >= 2
        })
        .await;
    assert_eq!(counter(&status, "acl_denied"), 3, "{status}");
    assert_eq!(counter(&status, "subscriptions_refused"), 2, "{status}");

    // The file is re-read when it changes, and applies to connections already open.
    std::fs::write(
        &acl,
        ACL.replace("topic deny warehouse/+/fan/command\n", ""),
    )
    .unwrap();
    assert!(
        gateway
            .wait_log(Duration::from_secs(10), &["passwords and acl", "loaded"])
            .await
            .is_some(),
        "the changed ACL file was not reloaded:\n{}",
        gateway.log()
    );
    sensor
        .send(&raw::publish_qos1_packet(command, 2, b"ON"))
        .await;
    assert!(sensor.read_packet(Duration::from_secs(5)).await.is_some());
    let got = fan
        .recv(Duration::from_secs(5))
        .await
        .expect("the sensor's command, allowed since the reload");
    assert_eq!(got.payload, "ON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_take_over_the_gateways_own_sessions() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway
        .wait_live(Duration::from_secs(10), "running", |_| true)
        .await;
    // The downlink's and the field's sessions: a device taking one would cut them off.
    for id in [
        "bridgehead-internal-downlink",
        "bridgehead-internal-field-commands",
    ] {
        for connect in [Connect::new(id), Connect::new(id).v5()] {
            let expected = if connect.v5 { 0x85 } else { 0x02 };
            assert_eq!(
                login(gateway.local_port, connect.clone()).await,
                Some(expected),
                "{connect:?} was let in"
            );
        }
    }
    // The same device under its own id is welcome.
    assert_eq!(
        login(gateway.local_port, Connect::new("sneaky")).await,
        ACCEPTED
    );
    // And commands still reach devices: the downlink's session is untouched.
    let mut fan = LocalSubscriber::connect(
        gateway.local_port,
        "fan",
        true,
        Some(("warehouse/fan", QoS::AtLeastOnce)),
    )
    .await;
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let command = format!("{}warehouse/fan", support::COMMAND_PREFIX);
    support::publish_all(
        cloud.port,
        "operator",
        QoS::AtLeastOnce,
        vec![(command, b"ON".to_vec())],
    )
    .await;
    assert_eq!(
        fan.recv(Duration::from_secs(5)).await.map(|r| r.payload),
        Some("ON".to_string())
    );
}

/// A CA, the gateway's certificate for localhost, and a client certificate for
/// `sensor-7`, in `dir`.
fn device_pki(dir: &Path) -> (PathBuf, (PathBuf, PathBuf), (PathBuf, PathBuf)) {
    let ca = TestCa::new(dir, "site");
    let server = ca.issue("gateway", &["localhost", "127.0.0.1"], Usage::Server, false);
    let client = ca.issue("sensor-7", &[], Usage::Client, false);
    (ca.ca_path("site"), server, client)
}

fn mosquitto_pub(
    port: u16,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    topic: &str,
    message: &str,
) -> bool {
    let mut command = std::process::Command::new("mosquitto_pub");
    command
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            message,
        ])
        .arg("--cafile")
        .arg(ca);
    if let Some((cert, key)) = client {
        command.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running mosquitto_pub (apt-get install mosquitto-clients)")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_use_tls_with_the_tools_they_know() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let config = GatewayConfig::new(cloud.port);
    let (ca, (cert, key), _) = device_pki(&config.dir());
    let tls_port = support::free_port();
    let config = config
        .set_str("local", "tls_listen", &format!("127.0.0.1:{tls_port}"))
        .set_str("local", "cert_file", &cert.display().to_string())
        .set_str("local", "key_file", &key.display().to_string())
        .set_str("local", "connect_timeout", "2s");
    let gateway = Gateway::start(config);
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("warehouse/#", QoS::AtLeastOnce)),
    )
    .await;

    // A client that stalls in its handshake holds up nobody.
    let mut staller = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    staller.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = Instant::now();
    let sent = tokio::task::spawn_blocking(move || {
        mosquitto_pub(tls_port, &ca, None, "warehouse/tls/temp", "21.5")
    })
    .await
    .unwrap();
    assert!(
        sent,
        "mosquitto_pub --cafile over tls_listen failed:\n{}",
        gateway.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let got = dashboard
        .recv(Duration::from_secs(5))
        .await
        .expect("the TLS device's message");
    assert_eq!(
        (got.topic.as_str(), got.payload.as_str()),
        ("warehouse/tls/temp", "21.5")
    );
    let mut staller = RawClient { stream: staller };
    assert!(
        staller.closed_within(Duration::from_secs(5)).await,
        "a stalled handshake was kept open past local.connect_timeout"
    );
    gateway
        .wait_status(
            Duration::from_secs(5),
            "the stalled handshake counted",
            |s| counter(s, "connect_timeouts") >= 1,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_required_and_names_the_user() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let config = GatewayConfig::new(cloud.port);
    let (ca, (cert, key), client) = device_pki(&config.dir());
    let acl = write(
        &config.dir(),
        "acl",
        "topic read warehouse/#\nuser sensor-7\ntopic write warehouse/#\n",
    );
    let tls_port = support::free_port();
    let path = |p: &Path| p.display().to_string();
    let config = config
        .set_str("local", "tls_listen", &format!("127.0.0.1:{tls_port}"))
        .set_str("local", "cert_file", &path(&cert))
        .set_str("local", "key_file", &path(&key))
        .set_str("local", "ca_file", &path(&ca))
        .set("local", "require_certificate", "true")
        .set("local", "use_identity_as_username", "true")
        .set_str("local", "acl_file", &path(&acl));
    let gateway = Gateway::start(config);
    let mut dashboard = LocalSubscriber::connect(
        gateway.local_port,
        "dashboard",
        true,
        Some(("warehouse/#", QoS::AtLeastOnce)),
    )
    .await;

    let ca_for_task = ca.clone();
    let without = tokio::task::spawn_blocking(move || {
        mosquitto_pub(tls_port, &ca_for_task, None, "warehouse/x", "no-cert")
    })
    .await
    .unwrap();
    assert!(!without, "a client without a certificate was let in");
    let with = tokio::task::spawn_blocking(move || {
        mosquitto_pub(
            tls_port,
            &ca,
            Some(&client),
            "warehouse/zone4/temp",
            "from-sensor-7",
        )
    })
    .await
    .unwrap();
    assert!(
        with,
        "the client certificate was refused:\n{}",
        gateway.log()
    );
    // Only the user sensor-7 may write: the message arriving shows the certificate's name
    // became the user name.
    let got = dashboard
        .recv(Duration::from_secs(5))
        .await
        .expect("the certified device's message");
    assert_eq!(got.payload, "from-sensor-7");
    let status = gateway
        .wait_status(
            Duration::from_secs(5),
            "the refused handshake counted",
            |s| counter(s, "tls_failures") >= 1,
        )
        .await;
    assert_eq!(counter(&status, "acl_denied"), 0, "{status}");
}

/// Hostile clients, each tried while four devices stream 20k messages to the cloud.
async fn hostile_clients(port: u16) -> Vec<RawClient> {
    let mut kept = Vec::new();
    let mut noise = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            noise as u8
        })
        .collect();
    let mut vandal = RawClient::connect(port).await;
    let _ = vandal.stream.write_all(&garbage).await;
    kept.push(vandal);
    // Idle sockets and 5-byte headers that claim huge packets.
    for i in 0..200 {
        let mut idle = RawClient::connect(port).await;
        if i % 2 == 0 {
            let _ = idle.stream.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]).await;
        }
        kept.push(idle);
    }
    // An oversize PUBLISH after a valid login; a topic that is not UTF-8.
    let (mut big, _) = RawClient::login(port, &Connect::new("hostile-big")).await;
    let _ = big.stream.write_all(&[0x30, 0x80, 0x80, 0x80, 0x01]).await;
    assert!(
        big.closed_within(Duration::from_secs(5)).await,
        "an oversize packet was kept"
    );
    let (mut utf8, _) = RawClient::login(port, &Connect::new("hostile-utf8")).await;
    let _ = utf8
        .stream
        .write_all(&raw::publish_qos1_raw(b"warehouse/\xff\xfe", 1, b"x"))
        .await;
    assert!(
        utf8.closed_within(Duration::from_secs(5)).await,
        "an invalid topic was kept"
    );
    // A subscription storm: 150 filters against a cap of 100.
    let (mut storm, _) = RawClient::login(port, &Connect::new("hostile-storm")).await;
    for i in 0..150u16 {
        let filter = format!("storm/{i}/#");
        storm.send(&raw::subscribe_packet(i + 1, &[&filter])).await;
    }
    let mut refused = 0;
    for _ in 0..150 {
        match storm.read_packet(Duration::from_secs(10)).await {
            Some(p) if p.last() == Some(&0x80) => refused += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(refused, 50, "filters over local.max_subscriptions");
    kept.push(storm);
    kept
}

/// A CONNECT dripped one byte at a time: never complete within connect_timeout.
async fn slow_loris(port: u16) -> bool {
    let mut client = RawClient::connect(port).await;
    for byte in Connect::new("slow-loris").packet() {
        if client.stream.write_all(&[byte]).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    client.closed_within(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_while_20k_messages_stream_loses_nothing() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let config = GatewayConfig::new(cloud.port)
        .set_str("local", "connect_timeout", "2s")
        .set_str("local", "max_payload", "64KiB")
        .set("local", "max_subscriptions", "100");
    let gateway = Gateway::start(config);
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let port = gateway.local_port;

    let stream = tokio::spawn(telemetry_burst(port, 4, 5000, Duration::from_micros(700)));
    let loris = tokio::spawn(slow_loris(port));
    let kept = hostile_clients(port).await;
    let expected = stream.await.expect("the devices' stream");
    assert!(loris.await.unwrap(), "a slow-loris CONNECT was kept open");

    assert!(
        collector
            .wait_for_count(20_000, Duration::from_secs(60))
            .await,
        "only {} of 20000 reached the cloud",
        collector.distinct()
    );
    collector.deliveries().assert_exactly(&expected);
    let status = gateway
        .wait_status(
            Duration::from_secs(10),
            "every hostile input counted",
            |s| {
                counter(s, "connect_timeouts") >= 101
                    && counter(s, "malformed_packets") >= 1
                    && counter(s, "oversize_packets") >= 101
                    && counter(s, "subscriptions_refused") >= 50
            },
        )
        .await;
    println!("counters after the hostile clients: {}", status["counters"]);
    drop(kept);
    let mut gateway = gateway;
    assert!(gateway.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sockets_claiming_huge_packets_cost_almost_nothing() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let config = GatewayConfig::new(cloud.port)
        .set("local", "max_connections", "1100")
        .set_str("local", "max_payload", "8MiB")
        .set_str("local", "connect_timeout", "30s");
    let gateway = Gateway::start(config);
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let port = gateway.local_port;
    publish_many(port, "warm-up", "warehouse/warm/up", 200, QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = gateway.rss_kib();

    // Each claims a CONNECT of 8 MiB (a 5-byte fixed header) and sends nothing more.
    let mut sockets = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        socket
            .write_all(&[0x10, 0x80, 0x80, 0x80, 0x04])
            .await
            .unwrap();
        sockets.push(socket);
    }
    let mut held = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        held = held.max(gateway.rss_kib());
    }
    let grown = held.saturating_sub(idle);
    println!(
        "RSS idle {idle} KiB, with 1000 sockets claiming 8 MiB each {held} KiB (+{grown} KiB)"
    );
    assert!(grown < 6 * 1024, "RSS grew by {grown} KiB");
    // Everyone else is still served.
    let sent = publish_many(port, "after", "warehouse/after/x", 10, QoS::AtLeastOnce).await;
    assert_eq!(sent.len(), 10);
    drop(sockets);
}
