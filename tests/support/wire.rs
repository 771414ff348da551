//! A minimal MQTT 3.1, 3.1.1 and 5.0 wire codec and raw client for the conformance suite.
//!
//! Written from the specifications, independently of the gateway's own codec in `src/`, so
//! that the conformance tests check the broker and not the codec against itself. The encoder
//! builds well-formed packets from small builders; malformed packets are assembled by the
//! tests from the byte helpers ([`string`], [`binary`], [`with_header`], [`varint`]). The
//! decoder is strict: a packet from the broker that does not follow the specification panics
//! the test with the bytes it got.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// MQTT 3.1 (protocol name "MQIsdp").
pub const V31: u8 = 3;
/// MQTT 3.1.1.
pub const V311: u8 = 4;
/// MQTT 5.0.
pub const V5: u8 = 5;

/// Property identifiers (MQTT 5.0, 2.2.2.2).
pub mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// One MQTT 5 property. The variant is the property's data type (MQTT 5.0, 2.2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prop {
    Byte(u8, u8),
    Two(u8, u16),
    Four(u8, u32),
    Var(u8, u32),
    Str(u8, String),
    Bin(u8, Vec<u8>),
    User(String, String),
}

#[derive(Clone, Copy)]
enum Kind {
    Byte,
    Two,
    Four,
    Var,
    Str,
    Bin,
    Pair,
}

fn kind(id: u8) -> Option<Kind> {
    use prop::*;
    Some(match id {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Kind::Byte,
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => Kind::Two,
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Kind::Four,
        SUBSCRIPTION_IDENTIFIER => Kind::Var,
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Kind::Str,
        CORRELATION_DATA | AUTHENTICATION_DATA => Kind::Bin,
        USER_PROPERTY => Kind::Pair,
        _ => return None,
    })
}

impl Prop {
    pub fn id(&self) -> u8 {
        match self {
            Prop::Byte(id, _)
            | Prop::Two(id, _)
            | Prop::Four(id, _)
            | Prop::Var(id, _)
            | Prop::Str(id, _)
            | Prop::Bin(id, _) => *id,
            Prop::User(..) => prop::USER_PROPERTY,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend(varint(self.id() as usize));
        match self {
            Prop::Byte(_, v) => out.push(*v),
            Prop::Two(_, v) => out.extend(v.to_be_bytes()),
            Prop::Four(_, v) => out.extend(v.to_be_bytes()),
            Prop::Var(_, v) => out.extend(varint(*v as usize)),
            Prop::Str(_, v) => out.extend(string(v)),
            Prop::Bin(_, v) => out.extend(binary(v)),
            Prop::User(k, v) => {
                out.extend(string(k));
                out.extend(string(v));
            }
        }
    }
}

/// The property list of a packet, in the order it was on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Props(pub Vec<Prop>);

impl Props {
    pub fn has(&self, id: u8) -> bool {
        self.0.iter().any(|p| p.id() == id)
    }

    /// A one-byte, two-byte, four-byte or variable-integer property's value.
    pub fn int(&self, id: u8) -> Option<u32> {
        self.0.iter().find_map(|p| match p {
            Prop::Byte(i, v) if *i == id => Some(u32::from(*v)),
            Prop::Two(i, v) if *i == id => Some(u32::from(*v)),
            Prop::Four(i, v) | Prop::Var(i, v) if *i == id => Some(*v),
            _ => None,
        })
    }

    pub fn str(&self, id: u8) -> Option<&str> {
        self.0.iter().find_map(|p| match p {
            Prop::Str(i, v) if *i == id => Some(v.as_str()),
            _ => None,
        })
    }

    pub fn bin(&self, id: u8) -> Option<&[u8]> {
        self.0.iter().find_map(|p| match p {
            Prop::Bin(i, v) if *i == id => Some(v.as_slice()),
            _ => None,
        })
    }

    /// Every Subscription Identifier, in wire order.
    pub fn subscription_ids(&self) -> Vec<u32> {
        self.0
            .iter()
            .filter_map(|p| match p {
                Prop::Var(prop::SUBSCRIPTION_IDENTIFIER, v) => Some(*v),
                _ => None,
            })
            .collect()
    }

    /// Every User Property, in wire order.
    pub fn users(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .filter_map(|p| match p {
                Prop::User(k, v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }

    /// The Property Length and properties, as they go on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for p in &self.0 {
            p.encode(&mut body);
        }
        let mut out = varint(body.len());
        out.extend(body);
        out
    }
}

impl From<Vec<Prop>> for Props {
    fn from(props: Vec<Prop>) -> Self {
        Props(props)
    }
}

// ---------------------------------------------------------------------------------------
// Byte helpers: those of the bare client in `raw.rs` (strings and binary data with their
// two-byte length, a packet from its first byte and body), and the Variable Byte Integer.

pub use super::raw::{binary, remaining_length as varint, string, with_header};

// ---------------------------------------------------------------------------------------
// Encoder

/// A Will Message in a CONNECT.
#[derive(Clone, Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Properties.
    pub props: Vec<Prop>,
}

impl Will {
    pub fn new(topic: &str, payload: &[u8], qos: u8) -> Self {
        Will {
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            retain: false,
            props: Vec::new(),
        }
    }

    pub fn retain(mut self) -> Self {
        self.retain = true;
        self
    }

    pub fn prop(mut self, p: Prop) -> Self {
        self.props.push(p);
        self
    }
}

/// A CONNECT to build. Level 3 is sent with the protocol name "MQIsdp", 4 and 5 with "MQTT".
#[derive(Clone, Debug)]
pub struct Connect {
    pub level: u8,
    pub protocol_name: String,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub props: Vec<Prop>,
    /// Replaces the Connect Flags byte the fields would give (for malformed CONNECTs).
    pub flags: Option<u8>,
}

impl Connect {
    /// Clean session / clean start, keep alive 60 s.
    pub fn new(level: u8, client_id: &str) -> Self {
        Connect {
            level,
            protocol_name: if level == V31 { "MQIsdp" } else { "MQTT" }.to_string(),
            client_id: client_id.to_string(),
            clean: true,
            keep_alive: 60,
            will: None,
            username: None,
            password: None,
            props: Vec::new(),
            flags: None,
        }
    }

    pub fn clean(mut self, clean: bool) -> Self {
        self.clean = clean;
        self
    }

    pub fn keep_alive(mut self, seconds: u16) -> Self {
        self.keep_alive = seconds;
        self
    }

    pub fn will(mut self, will: Will) -> Self {
        self.will = Some(will);
        self
    }

    pub fn prop(mut self, p: Prop) -> Self {
        self.props.push(p);
        self
    }

    /// MQTT 5 Session Expiry Interval.
    pub fn session_expiry(self, seconds: u32) -> Self {
        self.prop(Prop::Four(prop::SESSION_EXPIRY_INTERVAL, seconds))
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = Some(flags);
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == V5;
        let mut body = string(&self.protocol_name);
        body.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        body.push(self.flags.unwrap_or(flags));
        body.extend(self.keep_alive.to_be_bytes());
        if v5 {
            body.extend(Props(self.props.clone()).encode());
        }
        body.extend(string(&self.client_id));
        if let Some(will) = &self.will {
            if v5 {
                body.extend(Props(will.props.clone()).encode());
            }
            body.extend(string(&will.topic));
            body.extend(binary(&will.payload));
        }
        if let Some(username) = &self.username {
            body.extend(string(username));
        }
        if let Some(password) = &self.password {
            body.extend(binary(password));
        }
        with_header(0x10, &body)
    }
}

/// An application message as a PUBLISH packet carries it, in either direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    /// 0 at QoS 0.
    pub id: u16,
    pub props: Props,
    pub payload: Vec<u8>,
}

impl Publish {
    /// QoS 0, not retained, no properties.
    pub fn new(topic: &str, payload: &[u8]) -> Self {
        Publish {
            dup: false,
            qos: 0,
            retain: false,
            topic: topic.to_string(),
            id: 0,
            props: Props::default(),
            payload: payload.to_vec(),
        }
    }

    /// QoS and packet identifier (0 at QoS 0).
    pub fn qos(mut self, qos: u8, id: u16) -> Self {
        self.qos = qos;
        self.id = id;
        self
    }

    pub fn retain(mut self) -> Self {
        self.retain = true;
        self
    }

    pub fn dup(mut self) -> Self {
        self.dup = true;
        self
    }

    pub fn prop(mut self, p: Prop) -> Self {
        self.props.0.push(p);
        self
    }

    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn encode(&self, version: u8) -> Vec<u8> {
        let mut first = 0x30 | (self.qos << 1);
        if self.dup {
            first |= 0x08;
        }
        if self.retain {
            first |= 0x01;
        }
        let mut body = string(&self.topic);
        if self.qos > 0 {
            body.extend(self.id.to_be_bytes());
        }
        if version == V5 {
            body.extend(self.props.encode());
        }
        body.extend_from_slice(&self.payload);
        with_header(first, &body)
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (`kind` 4, 5, 6, 7). MQTT 5 packets carry the
/// Reason Code when it is not 0x00.
pub fn ack(kind: u8, version: u8, id: u16, reason: u8) -> Vec<u8> {
    let first = (kind << 4) | if kind == 6 { 0x02 } else { 0x00 };
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 && reason != 0 {
        body.push(reason);
    }
    with_header(first, &body)
}

pub fn puback(version: u8, id: u16) -> Vec<u8> {
    ack(4, version, id, 0)
}

pub fn pubrec(version: u8, id: u16) -> Vec<u8> {
    ack(5, version, id, 0)
}

pub fn pubrel(version: u8, id: u16) -> Vec<u8> {
    ack(6, version, id, 0)
}

pub fn pubcomp(version: u8, id: u16) -> Vec<u8> {
    ack(7, version, id, 0)
}

/// SUBSCRIBE: each filter with its options byte (the requested QoS in 3.1.1; QoS, No
/// Local, Retain As Published and Retain Handling in MQTT 5).
pub fn subscribe(version: u8, id: u16, filters: &[(&str, u8)], props: &[Prop]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 {
        body.extend(Props(props.to_vec()).encode());
    }
    for (filter, options) in filters {
        body.extend(string(filter));
        body.push(*options);
    }
    with_header(0x82, &body)
}

pub fn unsubscribe(version: u8, id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
    }
    for filter in filters {
        body.extend(string(filter));
    }
    with_header(0xA2, &body)
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// DISCONNECT; in 3.1.1 the reason and properties are left out.
pub fn disconnect(version: u8, reason: u8, props: &[Prop]) -> Vec<u8> {
    if version != V5 || (reason == 0 && props.is_empty()) {
        return vec![0xE0, 0x00];
    }
    let mut body = vec![reason];
    body.extend(Props(props.to_vec()).encode());
    with_header(0xE0, &body)
}

/// MQTT 5 subscription options byte.
pub fn options(qos: u8, no_local: bool, retain_as_published: bool, retain_handling: u8) -> u8 {
    qos | (u8::from(no_local) << 2) | (u8::from(retain_as_published) << 3) | (retain_handling << 4)
}

// ---------------------------------------------------------------------------------------
// Decoder

/// A packet from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connack {
        session_present: bool,
        code: u8,
        props: Props,
    },
    Publish(Publish),
    Puback(Ack),
    Pubrec(Ack),
    Pubrel(Ack),
    Pubcomp(Ack),
    Suback {
        id: u16,
        props: Props,
        codes: Vec<u8>,
    },
    Unsuback {
        id: u16,
        props: Props,
        codes: Vec<u8>,
    },
    Pingresp,
    Disconnect {
        reason: u8,
        props: Props,
    },
    Auth {
        reason: u8,
        props: Props,
    },
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub id: u16,
    pub reason: u8,
    pub props: Props,
}

impl Packet {
    /// The packet's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connack { .. } => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::Puback(_) => "PUBACK",
            Packet::Pubrec(_) => "PUBREC",
            Packet::Pubrel(_) => "PUBREL",
            Packet::Pubcomp(_) => "PUBCOMP",
            Packet::Suback { .. } => "SUBACK",
            Packet::Unsuback { .. } => "UNSUBACK",
            Packet::Pingresp => "PINGRESP",
            Packet::Disconnect { .. } => "DISCONNECT",
            Packet::Auth { .. } => "AUTH",
        }
    }
}

/// Reads the fields of one packet body; any overrun is a malformed packet from the broker.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.at).ok_or("truncated (byte)")?;
        self.at += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }

    fn varint(&mut self) -> Result<u32, String> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("variable byte integer longer than 4 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at + n;
        let slice = self.bytes.get(self.at..end).ok_or("truncated (field)")?;
        self.at = end;
        Ok(slice)
    }

    fn binary(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u16()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn string(&mut self) -> Result<String, String> {
        let bytes = self.binary()?;
        let s = String::from_utf8(bytes).map_err(|e| format!("ill-formed UTF-8: {e}"))?;
        if s.contains('\0') {
            return Err("U+0000 in a string".into());
        }
        Ok(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.at..];
        self.at = self.bytes.len();
        rest
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    /// An MQTT 5 Reason Code and properties, each of which may be left out at the end of a
    /// packet (Reason Code 0x00, no properties).
    fn reason_and_props(&mut self) -> Result<(u8, Props), String> {
        let reason = if self.done() { 0 } else { self.u8()? };
        let props = if self.done() {
            Props::default()
        } else {
            self.props()?
        };
        Ok((reason, props))
    }

    fn props(&mut self) -> Result<Props, String> {
        let len = self.varint()? as usize;
        let mut inner = Reader {
            bytes: self.take(len)?,
            at: 0,
        };
        let mut props = Vec::new();
        while !inner.done() {
            let id = inner.varint()?;
            let id = u8::try_from(id).map_err(|_| format!("property id {id}"))?;
            let p = match kind(id).ok_or(format!("unknown property id 0x{id:02X}"))? {
                Kind::Byte => Prop::Byte(id, inner.u8()?),
                Kind::Two => Prop::Two(id, inner.u16()?),
                Kind::Four => Prop::Four(id, inner.u32()?),
                Kind::Var => Prop::Var(id, inner.varint()?),
                Kind::Str => Prop::Str(id, inner.string()?),
                Kind::Bin => Prop::Bin(id, inner.binary()?),
                Kind::Pair => Prop::User(inner.string()?, inner.string()?),
            };
            props.push(p);
        }
        Ok(Props(props))
    }
}

/// Decodes one packet (`first` byte and the body after the Remaining Length).
pub fn decode(version: u8, first: u8, body: &[u8]) -> Result<Packet, String> {
    let v5 = version == V5;
    let flags = first & 0x0F;
    let mut r = Reader { bytes: body, at: 0 };
    let fixed_flags = |expected: u8| {
        if flags == expected {
            Ok(())
        } else {
            Err(format!("reserved flags 0x{flags:X} in the fixed header"))
        }
    };
    let packet = match first >> 4 {
        2 => {
            fixed_flags(0)?;
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(format!(
                    "CONNACK reserved acknowledge flags 0x{ack_flags:02X}"
                ));
            }
            let code = r.u8()?;
            // A refusal may come in the 3.1.1 layout even on an MQTT 5 attempt (and vice
            // versa for an unsupported level): read properties only when there are any.
            let props = if v5 && !r.done() {
                r.props()?
            } else {
                Props::default()
            };
            Packet::Connack {
                session_present: ack_flags & 1 == 1,
                code,
                props,
            }
        }
        3 => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err("PUBLISH with QoS 3".into());
            }
            let topic = r.string()?;
            let id = if qos > 0 { r.u16()? } else { 0 };
            if qos > 0 && id == 0 {
                return Err("PUBLISH with packet identifier 0".into());
            }
            let props = if v5 { r.props()? } else { Props::default() };
            Packet::Publish(Publish {
                dup: flags & 0x08 != 0,
                qos,
                retain: flags & 1 == 1,
                topic,
                id,
                props,
                payload: r.rest().to_vec(),
            })
        }
        kind @ 4..=7 => {
            fixed_flags(if kind == 6 { 2 } else { 0 })?;
            let id = r.u16()?;
            let (reason, props) = if v5 {
                r.reason_and_props()?
            } else {
                (0, Props::default())
            };
            let ack = Ack { id, reason, props };
            match kind {
                4 => Packet::Puback(ack),
                5 => Packet::Pubrec(ack),
                6 => Packet::Pubrel(ack),
                _ => Packet::Pubcomp(ack),
            }
        }
        9 | 11 => {
            fixed_flags(0)?;
            let id = r.u16()?;
            let props = if v5 { r.props()? } else { Props::default() };
            let codes = r.rest().to_vec();
            if first >> 4 == 9 {
                Packet::Suback { id, props, codes }
            } else {
                Packet::Unsuback { id, props, codes }
            }
        }
        13 => {
            fixed_flags(0)?;
            Packet::Pingresp
        }
        14 if v5 => {
            fixed_flags(0)?;
            let (reason, props) = r.reason_and_props()?;
            Packet::Disconnect { reason, props }
        }
        15 if v5 => {
            fixed_flags(0)?;
            let (reason, props) = r.reason_and_props()?;
            Packet::Auth { reason, props }
        }
        _ => {
            return Err(format!(
                "a packet a server never sends (type {})",
                first >> 4
            ))
        }
    };
    if !r.done() {
        return Err("bytes left over after the packet's fields".into());
    }
    Ok(packet)
}

// ---------------------------------------------------------------------------------------
// Client

/// What a read gave.
#[derive(Debug)]
pub enum Recv {
    Packet(Packet),
    /// The broker closed the connection (EOF or reset).
    Closed,
    Timeout,
}

/// A raw MQTT client on one TCP connection. Packets that arrive while a helper waits for
/// something else (an acknowledgement, say) are kept, in order, for the next `recv`.
pub struct Client {
    stream: TcpStream,
    pub version: u8,
    pub client_id: String,
    buf: Vec<u8>,
    pending: VecDeque<Packet>,
    closed: bool,
    next_id: u16,
    /// The size in bytes of every packet received, in order (Maximum Packet Size checks).
    pub sizes: Vec<usize>,
}

/// How long a test waits for something the broker must send.
pub const WAIT: Duration = Duration::from_secs(2);
/// How long a test waits for the broker to close a connection.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a test waits to conclude that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(300);

impl Client {
    /// A TCP connection; nothing sent yet. `version` says how to decode what comes back.
    pub async fn tcp(port: u16, version: u8) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("TCP connect to the broker on 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).ok();
        Client {
            stream,
            version,
            client_id: String::new(),
            buf: Vec::new(),
            pending: VecDeque::new(),
            closed: false,
            next_id: 0,
            sizes: Vec::new(),
        }
    }

    /// Sends `connect` on a new connection; returns the client and what came back first.
    pub async fn start(port: u16, connect: &Connect) -> (Client, Recv) {
        let mut client = Client::tcp(port, connect.level).await;
        client.client_id = connect.client_id.clone();
        client.send(&connect.encode()).await;
        let first = client.recv(WAIT).await;
        (client, first)
    }

    /// Connects and requires CONNACK 0x00; returns the client and the CONNACK's
    /// session present flag and properties.
    pub async fn connect_with(port: u16, connect: &Connect) -> (Client, bool, Props) {
        let (client, first) = Client::start(port, connect).await;
        match first {
            Recv::Packet(Packet::Connack {
                session_present,
                code: 0,
                props,
            }) => (client, session_present, props),
            other => panic!(
                "CONNECT of {:?} (level {}): expected CONNACK 0x00, got {other:?}",
                connect.client_id, connect.level
            ),
        }
    }

    /// Connects with a clean session / clean start and default settings.
    pub async fn connect(port: u16, version: u8, client_id: &str) -> Client {
        Client::connect_with(port, &Connect::new(version, client_id))
            .await
            .0
    }

    /// Writes bytes; the broker may already have closed the connection, which is not an
    /// error here (the next read says so).
    pub async fn send(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_err() {
            self.closed = true;
        }
    }

    /// A fresh packet identifier, never 0.
    pub fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    async fn fill(&mut self, deadline: Instant) -> Option<Recv> {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Some(Recv::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.closed = true;
                Some(Recv::Closed)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                None
            }
        }
    }

    /// The next packet, or `Closed`, or `Timeout` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Recv {
        if let Some(p) = self.pending.pop_front() {
            return Recv::Packet(p);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((first, start, len)) = self.frame() {
                let body = self.buf[start..start + len].to_vec();
                let raw: Vec<u8> = self.buf.drain(..start + len).collect();
                self.sizes.push(raw.len());
                return match decode(self.version, first, &body) {
                    Ok(p) => Recv::Packet(p),
                    Err(e) => panic!("the broker sent a malformed packet ({e}): {raw:02X?}"),
                };
            }
            if self.closed {
                return Recv::Closed;
            }
            if let Some(r) = self.fill(deadline).await {
                return r;
            }
        }
    }

    /// `(first byte, body offset, body length)` of a complete packet at the buffer's start.
    fn frame(&self) -> Option<(u8, usize, usize)> {
        let first = *self.buf.first()?;
        let mut len = 0usize;
        for i in 0..4 {
            let b = *self.buf.get(1 + i)?;
            len |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                let start = 2 + i;
                return (self.buf.len() >= start + len).then_some((first, start, len));
            }
        }
        panic!(
            "the broker sent a Remaining Length longer than 4 bytes: {:02X?}",
            self.buf
        );
    }

    /// The next packet; panics on close or timeout.
    pub async fn expect(&mut self, what: &str) -> Packet {
        match self.recv(WAIT).await {
            Recv::Packet(p) => p,
            other => panic!("{}: waiting for {what}: {other:?}", self.client_id),
        }
    }

    /// The next packet must be a PUBLISH.
    pub async fn expect_publish(&mut self) -> Publish {
        match self.expect("a PUBLISH").await {
            Packet::Publish(p) => p,
            other => panic!("{}: expected a PUBLISH, got {other:?}", self.client_id),
        }
    }

    /// Nothing at all arrives within [`QUIET`], and the connection stays open.
    pub async fn expect_nothing(&mut self, what: &str) {
        match self.recv(QUIET).await {
            Recv::Timeout => {}
            other => panic!("{}: {what}: got {other:?}", self.client_id),
        }
    }

    /// Waits for the broker to close the connection; returns what it sent before that.
    pub async fn expect_closed(&mut self, what: &str) -> Vec<Packet> {
        let mut before = Vec::new();
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            match self
                .recv(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Recv::Packet(p) => before.push(p),
                Recv::Closed => return before,
                Recv::Timeout => panic!(
                    "{}: {what}: the broker did not close the connection within {CLOSE_WAIT:?} \
                     (it sent {before:?})",
                    self.client_id
                ),
            }
        }
    }

    /// Whether the connection is open and working: a PINGREQ gets its PINGRESP.
    pub async fn ping(&mut self) -> bool {
        self.send(&PINGREQ).await;
        self.try_wait_for(WAIT, |p| matches!(p, Packet::Pingresp).then_some(()))
            .await
            .is_ok()
    }

    /// Reads until `pick` accepts a packet; the others are kept, in order, for later
    /// `recv`s. On close or timeout: what ended the wait and the packets read meanwhile.
    pub async fn try_wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, (Recv, Vec<Packet>)> {
        let mut skipped = Vec::new();
        let deadline = Instant::now() + timeout;
        let found = loop {
            let p = match self
                .recv(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Recv::Packet(p) => p,
                other => {
                    self.pending.extend(skipped.iter().cloned());
                    return Err((other, skipped));
                }
            };
            match pick(&p) {
                Some(t) => break t,
                None => skipped.push(p),
            }
        };
        for p in skipped.into_iter().rev() {
            self.pending.push_front(p);
        }
        Ok(found)
    }

    /// Reads until `pick` accepts a packet (see [`Client::try_wait_for`]); panics on close
    /// or timeout.
    pub async fn wait_for<T>(&mut self, what: &str, pick: impl FnMut(&Packet) -> Option<T>) -> T {
        match self.try_wait_for(WAIT, pick).await {
            Ok(t) => t,
            Err((end, skipped)) => panic!(
                "{}: waiting for {what}: {end:?} (received meanwhile: {skipped:?})",
                self.client_id
            ),
        }
    }

    /// SUBSCRIBE and its SUBACK's codes (the packet identifier is checked).
    pub async fn subscribe_with(&mut self, filters: &[(&str, u8)], props: &[Prop]) -> Vec<u8> {
        let id = self.id();
        self.send(&subscribe(self.version, id, filters, props))
            .await;
        let (got, codes) = self
            .wait_for("SUBACK", |p| match p {
                Packet::Suback { id, codes, .. } => Some((*id, codes.clone())),
                _ => None,
            })
            .await;
        assert_eq!(got, id, "SUBACK packet identifier [MQTT-2.3.1-7]");
        assert_eq!(
            codes.len(),
            filters.len(),
            "one SUBACK code per filter: {codes:?}"
        );
        codes
    }

    /// Subscribes to one filter at `qos` and requires that QoS to be granted.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        let codes = self.subscribe_with(&[(filter, qos)], &[]).await;
        assert_eq!(codes, vec![qos], "SUBACK for {filter:?} at QoS {qos}");
    }

    /// UNSUBSCRIBE and its UNSUBACK's codes (empty in 3.1.1).
    pub async fn unsubscribe(&mut self, filters: &[&str]) -> Vec<u8> {
        let id = self.id();
        self.send(&unsubscribe(self.version, id, filters)).await;
        let (got, codes) = self
            .wait_for("UNSUBACK", |p| match p {
                Packet::Unsuback { id, codes, .. } => Some((*id, codes.clone())),
                _ => None,
            })
            .await;
        assert_eq!(got, id, "UNSUBACK packet identifier");
        codes
    }

    /// Publishes and completes the QoS flow: nothing at QoS 0, PUBACK at 1, PUBREC,
    /// PUBREL and PUBCOMP at 2. Returns the PUBACK's or PUBREC's reason code. A QoS > 0
    /// publish without an id gets a fresh one.
    pub async fn publish(&mut self, mut p: Publish) -> u8 {
        if p.qos > 0 && p.id == 0 {
            p.id = self.id();
        }
        self.send(&p.encode(self.version)).await;
        let id = p.id;
        match p.qos {
            0 => 0,
            1 => {
                self.wait_for("PUBACK", |r| match r {
                    Packet::Puback(a) if a.id == id => Some(a.reason),
                    _ => None,
                })
                .await
            }
            _ => {
                let reason = self
                    .wait_for("PUBREC", |r| match r {
                        Packet::Pubrec(a) if a.id == id => Some(a.reason),
                        _ => None,
                    })
                    .await;
                if reason < 0x80 {
                    self.send(&pubrel(self.version, id)).await;
                    self.wait_for("PUBCOMP", |r| match r {
                        Packet::Pubcomp(a) if a.id == id => Some(()),
                        _ => None,
                    })
                    .await;
                }
                reason
            }
        }
    }

    /// Acknowledges a received PUBLISH as its QoS requires (the whole QoS 2 flow).
    pub async fn ack(&mut self, p: &Publish) {
        match p.qos {
            0 => {}
            1 => self.send(&puback(self.version, p.id)).await,
            _ => {
                self.send(&pubrec(self.version, p.id)).await;
                let id = p.id;
                self.wait_for("PUBREL", |r| match r {
                    Packet::Pubrel(a) if a.id == id => Some(()),
                    _ => None,
                })
                .await;
                self.send(&pubcomp(self.version, id)).await;
            }
        }
    }

    /// The next PUBLISH, acknowledged.
    pub async fn receive(&mut self) -> Publish {
        let p = self
            .wait_for("a PUBLISH", |r| match r {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        self.ack(&p).await;
        p
    }

    /// The next PUBLISH on `topic` (others are acknowledged and dropped), acknowledged.
    pub async fn receive_on(&mut self, topic: &str) -> Publish {
        loop {
            let p = self.receive().await;
            if p.topic == topic {
                return p;
            }
        }
    }

    /// No PUBLISH on `topic` arrives within [`QUIET`]; publishes on other topics are
    /// acknowledged and ignored.
    pub async fn expect_no_publish_on(&mut self, topic: &str, what: &str) {
        let deadline = Instant::now() + QUIET;
        loop {
            match self
                .recv(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Recv::Timeout => return,
                Recv::Packet(Packet::Publish(p)) => {
                    assert_ne!(p.topic, topic, "{}: {what}: got {p:?}", self.client_id);
                    self.ack(&p).await;
                }
                Recv::Packet(Packet::Pubrel(a)) => self.send(&pubcomp(self.version, a.id)).await,
                other => panic!("{}: {what}: got {other:?}", self.client_id),
            }
        }
    }

    /// A normal DISCONNECT, then waits for the broker to close the connection.
    pub async fn disconnect(mut self) {
        self.send(&disconnect(self.version, 0, &[])).await;
        let _ = tokio::time::timeout(WAIT, async {
            while !matches!(self.recv(WAIT).await, Recv::Closed | Recv::Timeout) {}
        })
        .await;
    }

    /// Closes the TCP connection without a DISCONNECT (a network failure, for the broker).
    pub fn drop_connection(self) {
        drop(self);
    }
}
