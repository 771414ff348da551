//! The front door: accepts device connections on `local.listen`, reads the CONNECT under a
//! deadline, and splices the connection to rumqttd's internal port.
//!
//! It exists because rumqttd's network side cannot be handed a stream: the fixes for what
//! rumqttd alone gets wrong for a site full of small devices live here.
//! - keepalive 0 (allowed by MQTT 3.1.1, used by many small devices) is refused by rumqttd,
//!   so the CONNECT is rewritten to the longest keepalive and the front door itself pings
//!   rumqttd on the device's behalf, hiding the answers from the device;
//! - client ids of the gateway's own links are refused (a device taking one would
//!   disconnect the link);
//! - connections are bounded, and a peer that never sends a CONNECT is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::INTERNAL_ID_PREFIX;
use crate::health::{inc, RateLimit, SharedHealth};

/// How often the front door pings rumqttd for an idle keepalive-0 device. rumqttd drops a
/// connection after 1.5 × keepalive (65535 s here) without a packet.
const PING_EVERY: Duration = Duration::from_secs(3600);
const MAX_KEEPALIVE: u16 = u16::MAX;
const PINGREQ: [u8; 2] = [0xC0, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];

#[derive(Debug, Clone)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Largest packet a device may send (CONNECT with its will included).
    pub max_packet: usize,
}

#[derive(Debug, PartialEq, Eq)]
struct Connect {
    level: u8,
    keep_alive: u16,
    /// Offset of the keepalive field in the packet body.
    keep_alive_at: usize,
    client_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ConnectError {
    #[error("first packet is not CONNECT (type {0})")]
    NotConnect(u8),
    #[error("malformed CONNECT")]
    Malformed,
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
}

/// Accepts devices until shutdown; each connection runs on its own task. `limits` may
/// change while it runs (a reload): each new connection is held to the current ones.
pub async fn serve(
    listener: TcpListener,
    backend: SocketAddr,
    limits: watch::Receiver<Limits>,
    health: SharedHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut refused_log = RateLimit::new(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(v) => {
                backoff = Duration::from_millis(10);
                v
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and retry, doubling.
                warn!(error = %e, "accepting a device connection failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let limits = Arc::new(limits.borrow().clone());
        let Some(permit) = Permit::take(&active, limits.max_connections) else {
            inc(&health.counters.front_door_refused);
            if let Some(held) = refused_log.check() {
                warn!(%peer, max_connections = limits.max_connections, earlier_warnings_suppressed = held,
                    "device connection refused: local.max_connections reached");
            }
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(reason) = handle(stream, backend, &limits).await {
                inc(&health.counters.front_door_refused);
                debug!(%peer, %reason, "device connection closed by the front door");
            }
            drop(permit);
        });
    }
}

/// One of `local.max_connections`, held while a device is connected. A counter rather than
/// a semaphore, so that a reload can lower the limit below the connections already open
/// (they stay; new ones wait for the count to fall).
struct Permit(Arc<AtomicUsize>);

impl Permit {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(active.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn handle(mut device: TcpStream, backend: SocketAddr, limits: &Limits) -> Result<(), String> {
    let _ = device.set_nodelay(true);
    let mut packet = tokio::time::timeout(
        limits.connect_timeout,
        read_packet(&mut device, limits.max_packet),
    )
    .await
    .map_err(|_| "no CONNECT within local.connect_timeout".to_owned())?
    .map_err(|e| format!("reading CONNECT: {e}"))?;
    let connect = parse_connect(&packet).map_err(|e| e.to_string())?;
    if connect.client_id.starts_with(INTERNAL_ID_PREFIX) {
        warn!(client_id = %connect.client_id, "device refused: client ids starting with {INTERNAL_ID_PREFIX} are reserved for the gateway");
        let refusal: &[u8] = if connect.level == 5 {
            &[0x20, 0x03, 0x00, 0x85, 0x00]
        } else {
            &[0x20, 0x02, 0x00, 0x02]
        };
        let _ = device.write_all(refusal).await;
        return Err("reserved client id".into());
    }
    let keep_alive_zero = connect.keep_alive == 0;
    if keep_alive_zero {
        let body = body_offset(&packet).ok_or("malformed CONNECT")? + connect.keep_alive_at;
        packet[body..body + 2].copy_from_slice(&MAX_KEEPALIVE.to_be_bytes());
        info!(client_id = %connect.client_id, "device connected with keepalive 0; the gateway keeps its session alive");
    }
    let mut broker = TcpStream::connect(backend)
        .await
        .map_err(|e| format!("connecting to the embedded broker: {e}"))?;
    let _ = broker.set_nodelay(true);
    broker
        .write_all(&packet)
        .await
        .map_err(|e| format!("forwarding CONNECT: {e}"))?;
    if keep_alive_zero {
        splice_with_pings(device, broker, limits.max_packet).await;
    } else {
        let _ = tokio::io::copy_bidirectional(&mut device, &mut broker).await;
    }
    Ok(())
}

/// Reads one whole MQTT packet (fixed header included).
async fn read_packet(stream: &mut TcpStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut packet = vec![stream.read_u8().await?];
    let mut remaining: usize = 0;
    for i in 0..4 {
        let b = stream.read_u8().await?;
        packet.push(b);
        remaining |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad remaining length",
            ));
        }
    }
    if remaining > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            ConnectError::TooLarge(remaining).to_string(),
        ));
    }
    let start = packet.len();
    packet.resize(start + remaining, 0);
    stream.read_exact(&mut packet[start..]).await?;
    Ok(packet)
}

/// Length of a complete frame at the start of `buf`: Ok(None) if more bytes are needed.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ConnectError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + remaining;
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(ConnectError::Malformed)
}

fn body_offset(packet: &[u8]) -> Option<usize> {
    (1..5)
        .find(|&i| packet.get(i).is_some_and(|b| b & 0x80 == 0))
        .map(|i| i + 1)
}

fn parse_connect(packet: &[u8]) -> Result<Connect, ConnectError> {
    let kind = packet.first().ok_or(ConnectError::Malformed)? >> 4;
    if kind != 1 {
        return Err(ConnectError::NotConnect(kind));
    }
    let body = &packet[body_offset(packet).ok_or(ConnectError::Malformed)?..];
    let mut r = Reader { buf: body, at: 0 };
    let name_len = r.u16()? as usize;
    r.skip(name_len)?;
    let level = r.u8()?;
    let _flags = r.u8()?;
    let keep_alive_at = r.at;
    let keep_alive = r.u16()?;
    if level == 5 {
        let props = r.varint()?;
        r.skip(props)?;
    }
    let id_len = r.u16()? as usize;
    let id = r.take(id_len)?;
    let client_id = std::str::from_utf8(id)
        .map_err(|_| ConnectError::Malformed)?
        .to_owned();
    Ok(Connect {
        level,
        keep_alive,
        keep_alive_at,
        client_id,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConnectError> {
        let s = self
            .buf
            .get(self.at..self.at + n)
            .ok_or(ConnectError::Malformed)?;
        self.at += n;
        Ok(s)
    }

    fn skip(&mut self, n: usize) -> Result<(), ConnectError> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Result<u8, ConnectError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ConnectError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn varint(&mut self) -> Result<usize, ConnectError> {
        let mut value = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7F) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ConnectError::Malformed)
    }
}

/// Splices a keepalive-0 device, whole packets at a time, so that PINGREQs can be slipped in
/// between its packets when it is idle and their PINGRESPs taken out of the way back.
async fn splice_with_pings(device: TcpStream, broker: TcpStream, max_packet: usize) {
    let (mut device_rx, mut device_tx) = device.into_split();
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    let owed = Arc::new(AtomicU32::new(0));
    let owed_up = owed.clone();
    let up = async move {
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(PING_EVERY, device_rx.read(&mut chunk)).await {
                Err(_) if buf.is_empty() => {
                    owed_up.fetch_add(1, Ordering::Relaxed);
                    if broker_tx.write_all(&PINGREQ).await.is_err() {
                        return;
                    }
                }
                Err(_) => {}
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if forward_frames(&mut buf, &mut broker_tx, max_packet, |_| true)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match broker_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    let keep = |frame: &[u8]| {
                        !(frame == PINGRESP
                            && owed
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                                    o.checked_sub(1)
                                })
                                .is_ok())
                    };
                    if forward_frames(&mut buf, &mut device_tx, usize::MAX, keep)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {},
        _ = down => {},
    }
}

/// Writes every complete frame in `buf` that `keep` accepts, leaving a partial one in `buf`.
async fn forward_frames(
    buf: &mut Vec<u8>,
    out: &mut tokio::net::tcp::OwnedWriteHalf,
    max_packet: usize,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> Result<(), ConnectError> {
    let mut at = 0;
    while let Some(len) = frame_len(&buf[at..])? {
        let frame = &buf[at..at + len];
        if keep(frame) && out.write_all(frame).await.is_err() {
            return Err(ConnectError::Malformed);
        }
        at += len;
    }
    buf.drain(..at);
    if buf.len() > max_packet {
        return Err(ConnectError::TooLarge(buf.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v4(client_id: &str, keep_alive: u16) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
        body.extend_from_slice(&keep_alive.to_be_bytes());
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    }

    #[test]
    fn parses_a_v4_connect() {
        let c = parse_connect(&connect_v4("dev-1", 0)).unwrap();
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.keep_alive, 0);
        assert_eq!(c.level, 4);
        assert_eq!(c.keep_alive_at, 8);
    }

    #[test]
    fn parses_a_v5_connect_with_properties() {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
        body.extend_from_slice(&[5, 0x11, 0, 0, 0, 10]); // session expiry interval
        body.extend_from_slice(&[0, 2, b'v', b'5']);
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        let c = parse_connect(&packet).unwrap();
        assert_eq!((c.level, c.keep_alive, c.client_id.as_str()), (5, 30, "v5"));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(
            parse_connect(&[0x30, 0x00]),
            Err(ConnectError::NotConnect(3))
        );
        assert_eq!(
            parse_connect(&[0x10, 0x03, 0, 4, b'M']),
            Err(ConnectError::Malformed)
        );
        assert_eq!(parse_connect(&[]), Err(ConnectError::Malformed));
    }

    #[test]
    fn frames_are_cut_at_their_length() {
        assert_eq!(frame_len(&[0xC0]), Ok(None));
        assert_eq!(frame_len(&[0xC0, 0x00, 0x30]), Ok(Some(2)));
        assert_eq!(frame_len(&[0x30, 0x03, 1, 2]), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x80, 0x01]), Ok(None));
        assert_eq!(
            frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(ConnectError::Malformed)
        );
    }
}
