//! A device that streams sequenced QoS 1 messages at a steady rate and records which ones
//! the broker acknowledged: when the gateway stops mid-stream, only a PUBACK says that a
//! message is in its care. Raw MQTT 3.1.1, so that each packet id is ours to map back to
//! its message (rumqttc does not say which publish got which id).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::raw::{publish_qos1_packet, Connect, RawClient};
use super::seq_payload;

/// Unacknowledged messages one device keeps in flight at most.
const WINDOW: usize = 100;

/// What one device sent before its connection ended.
#[derive(Debug)]
pub struct Streamed {
    pub client_id: String,
    pub topic: String,
    /// Messages written to the socket: `seq_payload(client_id, 0..sent)`.
    pub sent: usize,
    /// Sequence numbers the broker acknowledged.
    pub acked: BTreeSet<usize>,
    /// From CONNACK to the end of the connection.
    pub lasted: Duration,
}

/// Connects as `client_id` (clean session) and publishes `seq_payload(client_id, n)` on
/// `topic` at `rate` messages a second, QoS 1, up to `max` messages, until the broker
/// closes the connection; returns when it did (or all `max` were acknowledged).
pub async fn stream_until_closed(
    port: u16,
    client_id: &str,
    topic: &str,
    rate: u32,
    max: usize,
) -> Streamed {
    let (client, code) = RawClient::login(port, &Connect::new(client_id)).await;
    assert_eq!(code, Some(0), "{client_id}: CONNACK");
    let started = Instant::now();
    let (mut reader, mut writer) = client.stream.into_split();
    let in_flight: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let window = Arc::new(Semaphore::new(WINDOW));

    let acks = {
        let (in_flight, window) = (in_flight.clone(), window.clone());
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            while acked.len() < max {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
                // The broker sends this publisher nothing but 4-byte PUBACKs.
                let whole = buffer.len() / 4 * 4;
                for ack in buffer[..whole].chunks_exact(4) {
                    assert_eq!(ack[..2], [0x40, 0x02], "not a PUBACK: {ack:02x?}");
                    let packet_id = u16::from_be_bytes([ack[2], ack[3]]);
                    let seq = in_flight.lock().unwrap().remove(&packet_id);
                    let seq = seq.unwrap_or_else(|| panic!("PUBACK for unknown id {packet_id}"));
                    acked.insert(seq);
                    window.add_permits(1);
                }
                buffer.drain(..whole);
            }
            // The publisher stops at once: it gets no more room.
            window.close();
            acked
        })
    };

    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    while sent < max {
        ticks.tick().await;
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        let packet_id = (sent % usize::from(u16::MAX)) as u16 + 1;
        in_flight.lock().unwrap().insert(packet_id, sent);
        let packet = publish_qos1_packet(topic, packet_id, seq_payload(client_id, sent).as_bytes());
        if writer.write_all(&packet).await.is_err() {
            break;
        }
        sent += 1;
    }
    let acked = acks.await.expect("the PUBACK reader panicked");
    Streamed {
        client_id: client_id.to_string(),
        topic: topic.to_string(),
        sent,
        acked,
        lasted: started.elapsed(),
    }
}
