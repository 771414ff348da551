//! Telemetry goes up through the outbox and nothing the gateway accepted is lost: not in
//! a burst, not across a link cut, a cloud restart or a `kill -9` of the gateway.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{
    retained, telemetry_burst, Collector, Gateway, GatewayConfig, Mosquitto, Proxy, STATUS_TOPIC,
    TELEMETRY_FILTER,
};

const MAX_INFLIGHT: usize = 100;
/// mosquitto's `max_inflight_messages` toward the collector (see support/mosquitto.rs).
const MOSQUITTO_INFLIGHT: usize = 100;

fn config(cloud_port: u16) -> GatewayConfig {
    GatewayConfig::new(cloud_port).set("cloud", "max_inflight", &MAX_INFLIGHT.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_20k_messages_from_four_devices_reaches_the_cloud_in_order() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let gateway = Gateway::start(config(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let started = Instant::now();
    let expected = telemetry_burst(gateway.local_port, 4, 5_000, Duration::ZERO).await;
    let accepted = started.elapsed();
    let arrived = collector
        .wait_for_count(20_000, Duration::from_secs(60))
        .await;
    let elapsed = started.elapsed();

    assert!(
        arrived,
        "only {} of 20000 reached the cloud",
        collector.distinct()
    );
    println!(
        "20000 QoS 1 messages from 4 devices: accepted locally in {accepted:?}, all in the cloud \
         after {elapsed:?} ({:.0} msg/s end to end)",
        20_000.0 / elapsed.as_secs_f64()
    );
    let deliveries = collector.deliveries();
    deliveries.assert_exactly(&expected);
    println!("duplicates: {}", deliveries.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_of_three_seconds_mid_stream_loses_nothing() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let devices = tokio::spawn(telemetry_burst(
        gateway.local_port,
        4,
        2_000,
        Duration::from_millis(2),
    ));
    assert!(collector.wait_for_count(500, Duration::from_secs(20)).await);
    link.cut();
    gateway
        .wait_status(Duration::from_secs(5), "telemetry link down", |s| {
            s["cloud"]["telemetry"] != "up"
        })
        .await;
    // What was already in the cloud broker drains to the collector first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during_cut = collector.distinct();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        collector.distinct(),
        during_cut,
        "messages reached the cloud through a cut link"
    );
    link.restore();

    let expected = devices.await.expect("devices");
    assert!(
        collector
            .wait_for_count(8_000, Duration::from_secs(30))
            .await,
        "only {} of 8000 reached the cloud after the link came back",
        collector.distinct()
    );
    assert_nothing_lost_and_duplicates_bounded(&collector, &expected, &link, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_broker_restart_mid_stream_loses_nothing() {
    let _serial = support::serial().await;
    let mut cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    // Never cut: it only counts the gateway's connections.
    let link = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let devices = tokio::spawn(telemetry_burst(
        gateway.local_port,
        4,
        2_000,
        Duration::from_millis(2),
    ));
    assert!(collector.wait_for_count(500, Duration::from_secs(20)).await);
    cloud.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.restart();

    let expected = devices.await.expect("devices");
    assert!(
        collector
            .wait_for_count(8_000, Duration::from_secs(30))
            .await,
        "only {} of 8000 reached the cloud after its restart",
        collector.distinct()
    );
    // mosquitto may also redeliver its own in-flight window to the collector.
    assert_nothing_lost_and_duplicates_bounded(&collector, &expected, &link, MOSQUITTO_INFLIGHT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_accepted_while_offline_survive_a_kill_9() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let mut gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    link.cut();
    // Not a multiple of queue.commit_batch (1000): the last group waits for the timer.
    let expected = telemetry_burst(gateway.local_port, 2, 2_450, Duration::ZERO).await;
    // Every message was PUBACKed by the local broker; give the outbox well over one group
    // commit (20 ms), then pull the plug.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill9();
    gateway.start_again();
    link.restore();

    assert!(
        collector
            .wait_for_count(4_900, Duration::from_secs(30))
            .await,
        "only {} of the 4900 accepted messages reached the cloud after kill -9",
        collector.distinct()
    );
    collector.deliveries().assert_exactly(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_topic_says_online_then_offline_after_sigterm() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(config(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    assert_eq!(
        retained(cloud.port, STATUS_TOPIC, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("online")
    );

    let (status, took) = gateway.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    // The budget is 4.5 s; a clean shutdown has nothing to wait for and must not use it.
    assert!(
        took < Duration::from_secs(2) && !gateway.log().contains("shutdown took longer"),
        "SIGTERM took {took:?}:\n{}",
        gateway.log()
    );
    assert_eq!(
        retained(cloud.port, STATUS_TOPIC, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("offline")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_topic_says_offline_after_a_crash() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let mut gateway = Gateway::start(config(cloud.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    assert_eq!(
        retained(cloud.port, STATUS_TOPIC, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("online")
    );

    gateway.kill9();
    // The last will: mosquitto publishes it once it sees the socket close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while last.as_deref() != Some("offline") && Instant::now() < deadline {
        last = retained(cloud.port, STATUS_TOPIC, Duration::from_secs(1)).await;
    }
    assert_eq!(
        last.as_deref(),
        Some("offline"),
        "retained status after kill -9"
    );
}

fn assert_nothing_lost_and_duplicates_bounded(
    collector: &Collector,
    expected: &support::Expected,
    link: &Proxy,
    collector_redeliveries: usize,
) {
    let deliveries = collector.deliveries();
    deliveries.assert_exactly(expected);
    // Two connections (telemetry, commands) per connect: every connection after the
    // first two is at most one reconnect of the telemetry link.
    let reconnects = link.connections().saturating_sub(2).max(1);
    println!(
        "duplicates: {} over {reconnects} reconnect(s) ({} connections)",
        deliveries.duplicates,
        link.connections()
    );
    let bound = MAX_INFLIGHT * reconnects + collector_redeliveries;
    assert!(
        deliveries.duplicates <= bound,
        "{} duplicates, more than cloud.max_inflight ({MAX_INFLIGHT}) per reconnect \
         ({reconnects}) plus {collector_redeliveries} redelivered by the broker itself",
        deliveries.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_downlink_rules_forwards_and_keeps_running() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let mut gateway = Gateway::start(config(cloud.port).without_downlink());
    gateway
        .wait_status(Duration::from_secs(20), "telemetry up, commands off", |s| {
            s["cloud"]["telemetry"] == "up" && s["cloud"]["commands"] == "off"
        })
        .await;

    let expected = telemetry_burst(gateway.local_port, 1, 100, Duration::ZERO).await;
    assert!(collector.wait_for_count(100, Duration::from_secs(20)).await);
    collector.deliveries().assert_exactly(&expected);
    assert!(
        gateway.is_running(),
        "the gateway stopped:\n{}",
        gateway.log()
    );
    let (status, _) = gateway.terminate();
    assert!(status.success(), "exit status {status}");
}

/// Sequenced messages `id:000000`, `id:000001`, ... on the local `topic`.
struct Sequence {
    cloud_topic: String,
    payloads: Vec<String>,
    messages: Vec<(String, Vec<u8>)>,
}

fn sequence(topic: &str, id: &str, n: usize) -> Sequence {
    let payloads: Vec<String> = (0..n).map(|i| support::seq_payload(id, i)).collect();
    let messages = payloads
        .iter()
        .map(|p| (topic.to_string(), p.clone().into_bytes()))
        .collect();
    Sequence {
        cloud_topic: format!("{}{topic}", support::CLOUD_PREFIX),
        payloads,
        messages,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_slow_cloud_loses_nothing_older_than_commit_interval() {
    let _serial = support::serial().await;
    const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let mut gateway =
        Gateway::start(config(link.port).set_str("queue", "commit_interval", "500ms"));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    // Acknowledgements now come 2 s late: every message outlives commit_interval unacked.
    link.slow_down(Duration::from_secs(2));

    let Sequence {
        cloud_topic: topic,
        payloads,
        messages,
    } = sequence("warehouse/load/sensor", "sensor", 400);
    let sent = support::publish_paced(
        gateway.local_port,
        "sensor",
        support::QoS::AtLeastOnce,
        messages,
        Duration::from_millis(10),
    )
    .await;
    gateway.kill9();
    let killed = Instant::now();
    link.slow_down(Duration::ZERO);
    gateway.start_again();

    // Accepted (PUBACKed locally, a little after being sent) more than commit_interval
    // before the kill, with a margin for a loaded machine: must be in the cloud.
    let margin = Duration::from_millis(200);
    let must = sent
        .iter()
        .take_while(|at| killed.duration_since(**at) > COMMIT_INTERVAL + margin)
        .count();
    assert!(
        must > 300,
        "only {must} messages were older than the window"
    );
    assert!(
        collector
            .wait_for_count(must, Duration::from_secs(30))
            .await,
        "only {} of the {must} messages older than commit_interval reached the cloud",
        collector.distinct()
    );
    // Give the rest (if on disk) time to arrive, then check order and what was lost.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deliveries = collector.deliveries();
    let got = deliveries.first.get(&topic).cloned().unwrap_or_default();
    assert_eq!(
        got[..],
        payloads[..got.len()],
        "first deliveries are not the sent sequence"
    );
    println!(
        "{} of 400 delivered after kill -9 ({} were older than commit_interval + margin; \
         lost: {}, all newer than that), {} duplicates",
        got.len(),
        must,
        400 - got.len(),
        deliveries.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_with_a_slow_cloud_dead_letters_nothing() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let gateway = Gateway::start(config(link.port));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    // Acknowledgements take most of a connection's short life: connections often end with
    // nothing acknowledged, which is what makes a good message look refused.
    link.slow_down(Duration::from_millis(400));

    let devices = tokio::spawn(telemetry_burst(
        gateway.local_port,
        2,
        1_000,
        Duration::from_millis(20),
    ));
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        link.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        link.restore();
    }
    link.slow_down(Duration::ZERO);
    let expected = devices.await.expect("devices");
    assert!(
        collector
            .wait_for_count(2_000, Duration::from_secs(60))
            .await,
        "only {} of 2000 reached the cloud after the flapping stopped:\n{}",
        collector.distinct(),
        gateway.log()
    );
    collector.deliveries().assert_exactly(&expected);
    let status = gateway.status().expect("status.json");
    assert_eq!(
        support::counter(&status, "dead_lettered"),
        0,
        "a good message was dead-lettered: {status}"
    );
    println!(
        "{} connections through the flapping link, {} duplicates",
        link.connections(),
        collector.deliveries().duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_first_rule_sends_new_readings_ahead_of_the_backlog() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    let link = Proxy::start(cloud.port).await;
    let live_first = "[[uplink]]\n\
         topic = \"warehouse/alarm/#\"\n\
         remote_prefix = \"fleet/{gateway_id}/\"\n\
         drain = \"live-first\"\n";
    // The live-first rule comes first: the first matching rule decides.
    let gateway = Gateway::start(
        GatewayConfig::new(link.port)
            .set("cloud", "max_inflight", &MAX_INFLIGHT.to_string())
            .prepend_rule(live_first),
    );
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    link.cut();
    let backlog = telemetry_burst(gateway.local_port, 4, 20_000, Duration::ZERO).await;
    let old = sequence("warehouse/alarm/old", "old", 500);
    let alarm_topic = old.cloud_topic;
    support::publish_all(
        gateway.local_port,
        "alarm-old",
        support::QoS::AtLeastOnce,
        old.messages,
    )
    .await;
    gateway
        .wait_status(Duration::from_secs(20), "holding the backlog", |s| {
            support::counter(s, "enqueued") == 80_500
        })
        .await;

    link.restore();
    gateway
        .wait_status(Duration::from_secs(10), "linked again", |s| {
            s["cloud"]["telemetry"] == "up"
        })
        .await;
    let Sequence {
        cloud_topic: live_topic,
        payloads: live_payloads,
        messages: live,
    } = sequence("warehouse/alarm/live", "live", 20);
    let sent = support::publish_paced(
        gateway.local_port,
        "alarm-live",
        support::QoS::AtLeastOnce,
        live,
        Duration::from_millis(100),
    )
    .await;
    assert!(
        collector
            .wait_for_count(80_520, Duration::from_secs(60))
            .await,
        "only {} of 80520 reached the cloud",
        collector.distinct()
    );
    let messages = collector.messages();
    let backlog_done = messages
        .iter()
        .filter(|m| m.topic.contains("/load/"))
        .map(|m| m.at)
        .max()
        .expect("backlog delivered");
    let mut latencies = Vec::new();
    for (payload, at) in live_payloads.iter().zip(&sent) {
        let arrived = messages
            .iter()
            .find(|m| m.topic == live_topic && &m.payload == payload)
            .expect("live alarm delivered")
            .at;
        latencies.push((arrived.duration_since(*at), arrived < backlog_done));
    }
    let during: Vec<Duration> = latencies
        .iter()
        .filter(|(_, during)| *during)
        .map(|(l, _)| *l)
        .collect();
    let worst = latencies.iter().map(|(l, _)| *l).max().unwrap_or_default();
    println!(
        "live alarms: {} of 20 arrived while the backlog drained; worst latency {worst:?}",
        during.len()
    );
    assert!(
        !during.is_empty(),
        "no live alarm arrived while the backlog drained"
    );
    assert!(
        worst < Duration::from_secs(1),
        "a live alarm took {worst:?}"
    );
    // The strict rule's backlog keeps its order; the live-first rule's old alarms all arrive.
    let deliveries = collector.deliveries();
    let mut expected = backlog;
    expected.insert(live_topic.clone(), deliveries.first[&live_topic].clone());
    expected.insert(alarm_topic.clone(), deliveries.first[&alarm_topic].clone());
    deliveries.assert_exactly(&expected);
    assert_eq!(deliveries.first[&alarm_topic].len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_100_messages_a_second_on_a_healthy_link_the_gateway_spares_the_disk() {
    let _serial = support::serial().await;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    // The shipped commit_interval; status every 10 s as shipped.
    let gateway = Gateway::start(
        config(cloud.port)
            .set_str("queue", "commit_interval", "1s")
            .set_str("gateway", "metrics_interval", "10s"),
    );
    gateway.wait_cloud_up(Duration::from_secs(20)).await;

    let before = gateway.write_bytes();
    let messages = sequence("warehouse/load/sensor", "sensor", 800).messages;
    support::publish_paced(
        gateway.local_port,
        "sensor",
        support::QoS::AtLeastOnce,
        messages,
        Duration::from_millis(10),
    )
    .await;
    assert!(collector.wait_for_count(800, Duration::from_secs(20)).await);
    let written = gateway.write_bytes() - before;
    println!(
        "100 msg/s for 8 s: {written} bytes written, {} per message",
        written / 800
    );
    // The target is 10 bytes per message (scripts/bench measures it exactly); a status
    // file rewrite is 4 KiB, and one commit of a slow moment a few more.
    assert!(
        written <= 800 * 50,
        "{written} bytes written for 800 messages"
    );
}

/// The sequence number of a `seq_payload`.
fn seq_of(payload: &str) -> usize {
    payload
        .rsplit(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a sequenced payload: {payload}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_2000_msg_per_s_stream_loses_nothing_acknowledged() {
    let _serial = support::serial().await;
    const DEVICES: usize = 4;
    const RATE: u32 = 500;
    const MAX: usize = 10_000;
    let cloud = Mosquitto::start();
    let collector = Collector::start(cloud.port, TELEMETRY_FILTER).await;
    // Never cut: a cloud 200 ms away, so that SIGTERM finds messages the cloud has not
    // acknowledged and that the shipped commit_interval has not written yet. It also
    // counts the gateway's cloud connections, for the duplicate bound.
    let link = Proxy::start(cloud.port).await;
    let mut gateway = Gateway::start(config(link.port).set_str("queue", "commit_interval", "1s"));
    gateway.wait_cloud_up(Duration::from_secs(20)).await;
    link.slow_down(Duration::from_millis(200));

    let port = gateway.local_port;
    let devices: Vec<_> = (0..DEVICES)
        .map(|d| {
            tokio::spawn(async move {
                let id = format!("device-{d}");
                let topic = format!("warehouse/load/{id}");
                support::stream_until_closed(port, &id, &topic, RATE, MAX).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, took) = gateway.terminate();
    let mut streams = Vec::new();
    for device in devices {
        streams.push(device.await.expect("a device panicked"));
    }
    assert!(status.success(), "exit status after SIGTERM: {status}");
    link.slow_down(Duration::ZERO);
    gateway.start_again();

    let sent: usize = streams.iter().map(|s| s.sent).sum();
    let acked: usize = streams.iter().map(|s| s.acked.len()).sum();
    let lasted = streams.iter().map(|s| s.lasted).max().unwrap_or_default();
    println!(
        "{sent} sent in {lasted:?} ({:.0} msg/s), {acked} acknowledged; SIGTERM took {took:?}",
        sent as f64 / lasted.as_secs_f64()
    );
    assert!(
        streams.iter().all(|s| s.sent < MAX) && acked >= 2_000,
        "SIGTERM did not come in the middle of a stream: {streams:?}"
    );
    let missing = || {
        let deliveries = collector.deliveries();
        let mut missing = Vec::new();
        for s in &streams {
            let cloud_topic = format!("{}{}", support::CLOUD_PREFIX, s.topic);
            let got: HashSet<usize> = deliveries
                .first
                .get(&cloud_topic)
                .map(|payloads| payloads.iter().map(|p| seq_of(p)).collect())
                .unwrap_or_default();
            missing.extend(
                s.acked
                    .iter()
                    .filter(|seq| !got.contains(seq))
                    .map(|seq| support::seq_payload(&s.client_id, *seq)),
            );
        }
        missing
    };
    let all_there = support::wait_until(Duration::from_secs(30), || missing().is_empty()).await;
    let lost = missing();
    assert!(
        all_there,
        "{} acknowledged messages never reached the cloud (first: {:?}):\n{}",
        lost.len(),
        lost.first(),
        gateway.log()
    );

    let deliveries = collector.deliveries();
    for s in &streams {
        let cloud_topic = format!("{}{}", support::CLOUD_PREFIX, s.topic);
        let seqs: Vec<usize> = deliveries.first[&cloud_topic]
            .iter()
            .map(|p| seq_of(p))
            .collect();
        let out_of_order = seqs.windows(2).position(|w| w[0] >= w[1]);
        assert_eq!(
            out_of_order,
            None,
            "{cloud_topic}: first deliveries out of order at {out_of_order:?}: {:?}",
            out_of_order.map(|i| &seqs[i..(i + 2)])
        );
        assert!(
            seqs.iter().all(|seq| *seq < s.sent),
            "{cloud_topic}: a message that was never sent"
        );
    }
    // Two connections (telemetry, commands) per start: every connection after the first
    // two is at most one reconnect of the telemetry link.
    let reconnects = link.connections().saturating_sub(2).max(1);
    println!(
        "{} in the cloud, {} duplicates over {reconnects} reconnect(s)",
        collector.distinct(),
        deliveries.duplicates
    );
    assert!(
        deliveries.duplicates <= MAX_INFLIGHT * reconnects,
        "{} duplicates, more than cloud.max_inflight ({MAX_INFLIGHT}) per reconnect ({reconnects})",
        deliveries.duplicates
    );
}
