//! The outbox is bounded: by size (drop-oldest or reject-new), by age, and a message the
//! cloud can never take is dead-lettered instead of blocking the rest. Counts are exact.
//! A damaged database file or a full disk never stops the gateway.
//!
//! A row's size is its local topic plus its payload, in bytes.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    counter, publish_all, Collector, Expected, Gateway, GatewayConfig, Mosquitto, Proxy, QoS,
    CLOUD_PREFIX, TELEMETRY_FILTER,
};

/// 11 bytes of topic + 989 of payload = 1000-byte rows: 65 fit in 64 KiB (65 536
/// bytes), 66 do not, whichever side of the boundary the gateway counts on.
const TOPIC: &str = "warehouse/q";
const ROW: usize = 1000;
const MAX_SIZE: &str = "64KiB";
const FIT: usize = 65_536 / ROW;

/// A payload of `len` bytes that starts with its sequence number.
fn payload(seq: usize, len: usize) -> Vec<u8> {
    let mut payload = format!("{seq:06}").into_bytes();
    payload.resize(len, b'x');
    payload
}

fn rows(topic: &str, seqs: impl Iterator<Item = usize>, len: usize) -> Vec<(String, Vec<u8>)> {
    seqs.map(|seq| (topic.to_string(), payload(seq, len)))
        .collect()
}

fn expected(messages: &[(String, Vec<u8>)]) -> Expected {
    let mut expected = Expected::new();
    for (topic, payload) in messages {
        expected
            .entry(format!("{CLOUD_PREFIX}{topic}"))
            .or_default()
            .push(String::from_utf8(payload.clone()).expect("ASCII payload"));
    }
    expected
}

/// The cloud, a collector, and a gateway behind a link that starts cut.
struct Site {
    _cloud: Mosquitto,
    collector: Collector,
    link: Proxy,
    gateway: Gateway,
}

impl Site {
    async fn offline(configure: impl FnOnce(GatewayConfig) -> GatewayConfig) -> Self {
        let cloud = Mosquitto::start();
        let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
        let link = Proxy::start(cloud.port).await;
        link.cut();
        let gateway = Gateway::start(configure(GatewayConfig::new(link.port)));
        Site {
            _cloud: cloud,
            collector,
            link,
            gateway,
        }
    }

    async fn publish(&self, messages: &[(String, Vec<u8>)]) {
        publish_all(
            self.gateway.local_port,
            "sensor",
            QoS::AtLeastOnce,
            messages.to_vec(),
        )
        .await;
    }

    /// Waits until the gateway received `n` messages and its outbox settled.
    async fn wait_received(&self, n: u64) -> Value {
        self.gateway
            .wait_status(Duration::from_secs(10), &format!("{n} received"), |s| {
                counter(s, "received") == n
            })
            .await;
        // Several group commits and status rewrites later, the counts are final.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.gateway.status().expect("status.json")
    }

    /// Restores the link and waits until the outbox is empty and `n` messages arrived.
    async fn drain(&self, n: usize) {
        self.link.restore();
        assert!(
            self.collector
                .wait_for_count(n, Duration::from_secs(20))
                .await,
            "only {} of {n} messages reached the cloud",
            self.collector.distinct()
        );
        self.gateway
            .wait_status(Duration::from_secs(10), "with an empty outbox", |s| {
                s["queue"]["rows"] == 0
            })
            .await;
        // Anything that should not arrive would have by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_the_oldest_messages_and_counts_them() {
    let _serial = support::serial().await;
    let site = Site::offline(|c| {
        c.set_str("queue", "max_size", MAX_SIZE)
            .set_str("queue", "when_full", "drop-oldest")
    })
    .await;
    let n = 100;
    let sent = rows(TOPIC, 0..n, ROW - TOPIC.len());

    site.publish(&sent).await;
    let status = site.wait_received(n as u64).await;
    assert_eq!(status["queue"]["rows"], FIT, "{status}");
    assert_eq!(status["queue"]["bytes"], FIT * ROW, "{status}");
    site.drain(FIT).await;

    site.collector
        .deliveries()
        .assert_exactly(&expected(&sent[n - FIT..]));
    let status = site.gateway.status().expect("status.json");
    assert_eq!(
        counter(&status, "dropped_full"),
        (n - FIT) as u64,
        "{status}"
    );
    assert_eq!(counter(&status, "rejected_full"), 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_rejects_new_messages_and_counts_them() {
    let _serial = support::serial().await;
    let site = Site::offline(|c| {
        c.set_str("queue", "max_size", MAX_SIZE)
            .set_str("queue", "when_full", "reject-new")
    })
    .await;
    let n = 100;
    let sent = rows(TOPIC, 0..n, ROW - TOPIC.len());

    site.publish(&sent).await;
    let status = site.wait_received(n as u64).await;
    assert_eq!(status["queue"]["rows"], FIT, "{status}");
    assert_eq!(status["queue"]["bytes"], FIT * ROW, "{status}");
    site.drain(FIT).await;

    site.collector
        .deliveries()
        .assert_exactly(&expected(&sent[..FIT]));
    let status = site.gateway.status().expect("status.json");
    assert_eq!(
        counter(&status, "rejected_full"),
        (n - FIT) as u64,
        "{status}"
    );
    assert_eq!(counter(&status, "dropped_full"), 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_max_age_expire_while_the_link_is_down() {
    let _serial = support::serial().await;
    let site = Site::offline(|c| c.set_str("queue", "max_age", "3s")).await;
    let old = rows("warehouse/age/old", 0..20, 50);
    let new = rows("warehouse/age/new", 0..20, 50);

    site.publish(&old).await;
    site.gateway
        .wait_status(
            Duration::from_secs(15),
            "with the old messages expired",
            |s| counter(s, "expired") == 20 && s["queue"]["rows"] == 0,
        )
        .await;
    site.publish(&new).await;
    site.wait_received(40).await;
    site.drain(new.len()).await;

    site.collector.deliveries().assert_exactly(&expected(&new));
    let status = site.gateway.status().expect("status.json");
    assert_eq!(counter(&status, "expired"), 20, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_cloud_cannot_take_is_dead_lettered_and_the_rest_flows() {
    let _serial = support::serial().await;
    let site = Site::offline(|c| c.set_str("cloud", "max_packet_size", "1KiB")).await;
    let topic = "warehouse/line/scanner";
    let mut sent = rows(topic, 0..5, 100);
    sent.push((topic.to_string(), payload(5, 4096)));
    sent.extend(rows(topic, 6..16, 100));

    site.publish(&sent).await;
    site.wait_received(16).await;
    site.drain(15).await;

    let small: Vec<_> = sent
        .iter()
        .filter(|(_, p)| p.len() == 100)
        .cloned()
        .collect();
    site.collector
        .deliveries()
        .assert_exactly(&expected(&small));
    let status = site.gateway.status().expect("status.json");
    assert_eq!(counter(&status, "dead_lettered"), 1, "{status}");
    assert_eq!(counter(&status, "forwarded"), 15, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_which_the_cloud_drops_the_connection_is_dead_lettered_and_the_rest_flows() {
    let _serial = support::serial().await;
    // The cloud takes packets up to 2 KiB and hangs up on larger ones; the gateway does not
    // know that limit (its own cloud.max_packet_size is the default 256 KiB).
    let cloud = Mosquitto::start_with("max_packet_size 2048");
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(GatewayConfig::new(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    let topic = "warehouse/line/camera";
    let mut sent = rows(topic, 0..3, 100);
    sent.push((topic.to_string(), payload(3, 4096)));
    sent.extend(rows(topic, 4..8, 100));

    publish_all(gateway.local_port, "camera", QoS::AtLeastOnce, sent.clone()).await;
    let small: Vec<_> = sent
        .iter()
        .filter(|(_, p)| p.len() == 100)
        .cloned()
        .collect();
    assert!(
        collector
            .wait_for_count(small.len(), Duration::from_secs(30))
            .await,
        "only {} of {} small messages arrived:\n{}",
        collector.distinct(),
        small.len(),
        gateway.log()
    );
    collector.deliveries().assert_exactly(&expected(&small));
    let status = gateway
        .wait_status(
            Duration::from_secs(10),
            "one dead letter, the rest acknowledged",
            |s| {
                counter(s, "dead_lettered") == 1
                    && counter(s, "forwarded") >= small.len() as u64
                    && s["queue"]["rows"] == 0
            },
        )
        .await;
    assert_eq!(
        counter(&status, "forwarded"),
        small.len() as u64,
        "{status}"
    );
    assert!(gateway
        .log()
        .contains("closed the connection each time this message was sent alone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_outbox_file_is_moved_aside_and_the_gateway_starts_afresh() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let config = GatewayConfig::new(cloud.port);
    std::fs::create_dir_all(config.data_dir()).expect("data dir");
    let damaged = vec![0xA5u8; 64 * 1024];
    std::fs::write(config.data_dir().join("outbox.db"), &damaged).expect("writing garbage");
    let gateway = Gateway::start(config);
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let sent = rows("warehouse/after", 0..20, 50);
    publish_all(gateway.local_port, "sensor", QoS::AtLeastOnce, sent.clone()).await;
    assert!(collector.wait_for_count(20, Duration::from_secs(20)).await);
    collector.deliveries().assert_exactly(&expected(&sent));
    let status = gateway.status().expect("status.json");
    assert_eq!(counter(&status, "outbox_damaged"), 1, "{status}");
    let aside: Vec<_> = std::fs::read_dir(&gateway.data_dir)
        .expect("data dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    assert_eq!(std::fs::read(aside[0].path()).expect("moved file"), damaged);
    assert!(gateway.log().contains("the outbox database is damaged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_an_outage_refuses_new_messages_keeps_the_rest_and_recovers() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    link.cut();
    // No file of the gateway may grow past 2 MiB: the outbox fills "the disk" after
    // about 1500 of these 1 KiB messages, memory (32 MiB) after about 33000 more.
    let gateway = Gateway::start(GatewayConfig::new(link.port).file_size_limit(2 << 20));
    let sent = rows("warehouse/full", 0..40_000, ROW - "warehouse/full".len());
    for chunk in sent.chunks(5_000) {
        site_publish(gateway.local_port, chunk).await;
    }
    let status = gateway
        .wait_status(Duration::from_secs(20), "refusing new messages", |s| {
            counter(s, "received") == 40_000 && counter(s, "rejected_storage") > 0
        })
        .await;
    assert!(counter(&status, "outbox_errors") > 0, "{status}");
    let accepted = counter(&status, "enqueued");
    assert_eq!(
        accepted + counter(&status, "rejected_storage"),
        40_000,
        "{status}"
    );
    assert!(gateway.log().contains("new messages are refused"));

    // Space comes back: what was accepted is written, then delivered in order.
    gateway.lift_file_size_limit();
    gateway
        .wait_status(Duration::from_secs(20), "writing to disk again", |s| {
            s["queue"]["on_disk"] == accepted
        })
        .await;
    link.restore();
    assert!(
        collector
            .wait_for_count(accepted as usize, Duration::from_secs(60))
            .await,
        "only {} of {accepted} accepted messages reached the cloud",
        collector.distinct()
    );
    collector
        .deliveries()
        .assert_exactly(&expected(&sent[..accepted as usize]));
    assert!(gateway.log().contains("the outbox writes to disk again"));
}

async fn site_publish(port: u16, messages: &[(String, Vec<u8>)]) {
    publish_all(port, "sensor", QoS::AtLeastOnce, messages.to_vec()).await;
}
