//! A bare MQTT client on a TCP stream, for what client libraries will not send: keepalive
//! 0, wildcard topics, invalid UTF-8, MQTT 5 refusal codes, garbage.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub async fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("TCP connect to the local broker");
        RawClient { stream }
    }

    /// Connects and sends `connect`; returns the CONNACK's code (3.1.1 return code or
    /// MQTT 5 reason), or None when the connection closed without a CONNACK.
    pub async fn login(port: u16, connect: &Connect) -> (Self, Option<u8>) {
        let mut client = RawClient::connect(port).await;
        client.send(&connect.packet()).await;
        let code = match client.read_packet(Duration::from_secs(10)).await {
            Some(p) if p.first() == Some(&0x20) && p.len() >= 4 => Some(p[3]),
            _ => None,
        };
        (client, code)
    }

    pub async fn send(&mut self, packet: &[u8]) {
        self.stream
            .write_all(packet)
            .await
            .expect("writing a packet");
    }

    /// The next packet (fixed header included), or `None` if the broker closed the
    /// connection or sent nothing within `timeout`.
    pub async fn read_packet(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(timeout, async {
            let mut packet = vec![self.stream.read_u8().await.ok()?];
            let mut length = 0usize;
            for shift in (0..28).step_by(7) {
                let byte = self.stream.read_u8().await.ok()?;
                packet.push(byte);
                length |= usize::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            let start = packet.len();
            packet.resize(start + length, 0);
            self.stream.read_exact(&mut packet[start..]).await.ok()?;
            Some(packet)
        })
        .await
        .ok()
        .flatten()
    }

    /// Whether the other side closed the connection within `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match tokio::time::timeout(timeout, self.stream.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A CONNECT to build.
#[derive(Clone, Debug)]
pub struct Connect {
    pub client_id: String,
    pub keep_alive: u16,
    pub v5: bool,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Connect {
    /// MQTT 3.1.1, clean session, keepalive 30 s.
    pub fn new(client_id: &str) -> Self {
        Connect {
            client_id: client_id.to_string(),
            keep_alive: 30,
            v5: false,
            username: None,
            password: None,
        }
    }

    pub fn v5(mut self) -> Self {
        self.v5 = true;
        self
    }

    pub fn keep_alive(mut self, seconds: u16) -> Self {
        self.keep_alive = seconds;
        self
    }

    pub fn login(mut self, username: &str, password: &str) -> Self {
        self.username = Some(username.to_string());
        self.password = Some(password.as_bytes().to_vec());
        self
    }

    pub fn packet(&self) -> Vec<u8> {
        let mut body = string("MQTT");
        body.push(if self.v5 { 5 } else { 4 });
        let mut flags = 0x02;
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.v5 {
            body.push(0);
        }
        body.extend(string(&self.client_id));
        if let Some(username) = &self.username {
            body.extend(string(username));
        }
        if let Some(password) = &self.password {
            body.extend(binary(password));
        }
        with_header(0x10, &body)
    }
}

pub fn remaining_length(mut length: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            return out;
        }
    }
}

pub fn string(s: &str) -> Vec<u8> {
    binary(s.as_bytes())
}

pub fn binary(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

pub fn with_header(first: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![first];
    packet.extend(remaining_length(body.len()));
    packet.extend_from_slice(body);
    packet
}

/// CONNECT, MQTT 3.1.1, clean session.
pub fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    Connect::new(client_id).keep_alive(keep_alive).packet()
}

/// PUBLISH at QoS 1 (MQTT 3.1.1) with raw topic bytes, which may be anything.
pub fn publish_qos1_raw(topic: &[u8], packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = binary(topic);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    with_header(0x32, &body)
}

pub fn publish_qos1_packet(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    publish_qos1_raw(topic.as_bytes(), packet_id, payload)
}

/// SUBSCRIBE (MQTT 3.1.1) to `filters` at QoS 1.
pub fn subscribe_packet(packet_id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for filter in filters {
        body.extend(string(filter));
        body.push(1);
    }
    with_header(0x82, &body)
}
