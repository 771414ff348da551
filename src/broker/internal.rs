//! A client of rumqttd's internal ports, for what the gateway does there on a device's
//! behalf: give a persistent session back its subscriptions after a restart (so rumqttd
//! queues for it again before its device returns, and the device never sees SUBACKs it did
//! not ask for), and end a session that MQTT 5 says must start afresh.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::packet::{self, Budget, Connect, Framer, Packet, Protocol, Subscribe};
use super::SideDoor;

/// A whole exchange with rumqttd takes at most this.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PACKET: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("talking to the embedded broker at {addr}: {error}")]
    Io {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the embedded broker at {addr} did not answer within {EXCHANGE_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("the embedded broker at {addr} answered {what}")]
    Unexpected { addr: SocketAddr, what: String },
}

/// Connects as `client_id` without clean start, subscribes to `filters` (filter, options)
/// and disconnects: rumqttd then holds the session with these subscriptions, offline.
pub async fn restore_session(
    addr: SocketAddr,
    side_door: &SideDoor,
    protocol: Protocol,
    client_id: &str,
    filters: &[(String, u8)],
) -> Result<(), InternalError> {
    let filters: Vec<(&str, u8)> = filters.iter().map(|(f, o)| (f.as_str(), *o)).collect();
    exchange(addr, side_door, protocol, client_id, false, &filters).await
}

/// Connects as `client_id` with clean start and disconnects: rumqttd forgets the session.
pub async fn end_session(
    addr: SocketAddr,
    side_door: &SideDoor,
    protocol: Protocol,
    client_id: &str,
) -> Result<(), InternalError> {
    exchange(addr, side_door, protocol, client_id, true, &[]).await
}

async fn exchange(
    addr: SocketAddr,
    side_door: &SideDoor,
    protocol: Protocol,
    client_id: &str,
    clean_start: bool,
    filters: &[(&str, u8)],
) -> Result<(), InternalError> {
    let io = |error| InternalError::Io { addr, error };
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let connect = Connect {
            level: if protocol == Protocol::V5 { 5 } else { 4 },
            clean_start,
            keep_alive: 60,
            properties: &[],
            client_id,
            will: None,
            username: Some(&side_door.username),
            password: Some(side_door.password.as_bytes()),
        };
        stream.write_all(&connect.encode()).await.map_err(io)?;
        let mut framer = Framer::new(MAX_PACKET, Budget::new(usize::MAX));
        match next(&mut stream, &mut framer, protocol, addr).await? {
            Answer::ConnAck(0) => {}
            other => return Err(unexpected(addr, other)),
        }
        if !filters.is_empty() {
            let subscribe = Subscribe {
                packet_id: 1,
                properties: &[],
                filters: filters.to_vec(),
            };
            stream
                .write_all(&subscribe.encode(protocol, filters))
                .await
                .map_err(io)?;
            loop {
                match next(&mut stream, &mut framer, protocol, addr).await? {
                    Answer::SubAck => break,
                    // Retained messages for the new subscriptions: not ours to take.
                    Answer::Other => {}
                    other => return Err(unexpected(addr, other)),
                }
            }
        }
        stream
            .write_all(&packet::DISCONNECT_PACKET)
            .await
            .map_err(io)?;
        // rumqttd closes once it has handled the DISCONNECT: the session is saved then.
        let mut rest = [0u8; 1024];
        while stream.read(&mut rest).await.map_err(io)? > 0 {}
        Ok(())
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| InternalError::Timeout { addr })?
}

#[derive(Debug)]
enum Answer {
    ConnAck(u8),
    SubAck,
    Other,
    Closed,
}

fn unexpected(addr: SocketAddr, answer: Answer) -> InternalError {
    InternalError::Unexpected {
        addr,
        what: format!("{answer:?}"),
    }
}

async fn next(
    stream: &mut TcpStream,
    framer: &mut Framer,
    protocol: Protocol,
    addr: SocketAddr,
) -> Result<Answer, InternalError> {
    let mut buf = [0u8; 4096];
    loop {
        let bad = |e: packet::PacketError| InternalError::Unexpected {
            addr,
            what: e.to_string(),
        };
        if let Some(frame) = framer.peek().map_err(bad)? {
            let len = frame.len();
            let answer = match Packet::parse(frame, protocol).map_err(bad)? {
                Packet::ConnAck(ack) => Answer::ConnAck(ack.code),
                Packet::SubAck(_) => Answer::SubAck,
                _ => Answer::Other,
            };
            framer.consume(len);
            return Ok(answer);
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|error| InternalError::Io { addr, error })?;
        if n == 0 {
            return Ok(Answer::Closed);
        }
        framer.push(&buf[..n]).map_err(bad)?;
    }
}
