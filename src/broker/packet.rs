//! MQTT packets as the front door sees them: one framer that cuts a byte stream into whole
//! packets, one parser for every packet the front door or a [hook](super::hook) looks
//! into (MQTT 3.1.1 and 5), and the encoders for what it writes itself. No I/O here.
//!
//! Everything arrives from the network: nothing is trusted, nothing panics, and the framer
//! never allocates more than the bytes that actually arrived justify (a 5-byte header that
//! claims a 256 MiB packet costs 64 bytes, not 256 MiB).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};

/// The protocol a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1 (level 3) and 3.1.1 (level 4): the same packets.
    V311,
    V5,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("remaining length field longer than 4 bytes")]
    BadLength,
    #[error("packet of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the front door's memory for unfinished packets is used up")]
    OverBudget,
    #[error("a string is not valid UTF-8 or holds U+0000")]
    InvalidUtf8,
    #[error("first packet is not CONNECT (type {0})")]
    NotConnect(u8),
    #[error("protocol level {0} is not MQTT 3.1, 3.1.1 or 5")]
    UnsupportedProtocol(u8),
    #[error("unknown packet type {0}")]
    UnknownType(u8),
}

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;
pub const AUTH: u8 = 15;

/// An emptied buffer smaller than this is kept for the next bytes; a larger one is freed.
const KEEP_EMPTY: usize = 4096;

/// Bytes held by every framer together, for the front door's total memory bound.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Cuts a byte stream into whole MQTT packets.
///
/// The framer keeps the bytes that arrived and nothing more: [`push`](Self::push) grows
/// the buffer by what it is given (plus half of what is already held, so that a large
/// packet arriving in pieces is not copied over and over), whatever a packet header
/// claims. Its capacity never exceeds 1.5 times the most bytes it held, an emptied buffer
/// is given back, `max_packet` bounds one connection and the shared [`Budget`] bounds all
/// of them.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    max_packet: usize,
    budget: Arc<Budget>,
    /// Capacity charged to the budget.
    charged: usize,
}

impl Framer {
    pub fn new(max_packet: usize, budget: Arc<Budget>) -> Self {
        Framer {
            buf: BytesMut::new(),
            max_packet,
            budget,
            charged: 0,
        }
    }

    /// Appends bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), PacketError> {
        let held = self.buf.len();
        if self.buf.capacity() - held < bytes.len() {
            // Grown by hand, not by `reserve`: that may double a buffer whose front was
            // consumed long ago. Here the new size follows what is held now.
            let mut grown = BytesMut::with_capacity(held + held / 2 + bytes.len());
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
            self.account()?;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The whole packet at the front of the buffer, if it has arrived. A header that
    /// announces more than `max_packet` is an error at once, before its body arrives.
    pub fn peek(&self) -> Result<Option<&[u8]>, PacketError> {
        let Some(header) = Header::parse(&self.buf)? else {
            return Ok(None);
        };
        let total = header.total();
        if total > self.max_packet {
            return Err(PacketError::TooLarge {
                size: total,
                limit: self.max_packet,
            });
        }
        Ok(self.buf.get(..total))
    }

    /// Drops the first `len` bytes (the packet [`peek`](Self::peek) returned).
    pub fn consume(&mut self, len: usize) {
        self.buf.advance(len.min(self.buf.len()));
        // An idle connection gives back what a burst made it hold.
        if self.buf.is_empty() && self.buf.capacity() > KEEP_EMPTY {
            self.buf = BytesMut::new();
            let _ = self.account();
        }
    }

    /// Bytes of a packet that has not fully arrived.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn account(&mut self) -> Result<(), PacketError> {
        let capacity = self.buf.capacity();
        if capacity > self.charged {
            if !self.budget.charge(capacity - self.charged) {
                return Err(PacketError::OverBudget);
            }
        } else {
            self.budget.release(self.charged - capacity);
        }
        self.charged = capacity;
        Ok(())
    }
}

impl Drop for Framer {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

/// A packet's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    /// Bytes of the fixed header (2 to 5).
    pub len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl Header {
    /// The header at the start of `buf`; Ok(None) until all of it arrived.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, PacketError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let mut remaining = 0usize;
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(None);
            };
            remaining |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(Header {
                    kind: first >> 4,
                    flags: first & 0x0F,
                    len: 2 + i,
                    remaining,
                }));
            }
        }
        Err(PacketError::BadLength)
    }

    pub fn total(&self) -> usize {
        self.len + self.remaining
    }
}

/// A packet, parsed once for the front door and every hook.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck(ConnAck),
    Publish(Publish<'a>),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe<'a>),
    SubAck(SubAck<'a>),
    Unsubscribe(Unsubscribe<'a>),
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
    Auth,
}

impl<'a> Packet<'a> {
    /// Parses one whole packet (fixed header included) of a connection speaking `protocol`.
    pub fn parse(frame: &'a [u8], protocol: Protocol) -> Result<Self, PacketError> {
        let header = Header::parse(frame)?.ok_or(PacketError::Malformed("fixed header"))?;
        let body = frame
            .get(header.len..header.total())
            .ok_or(PacketError::Malformed("packet length"))?;
        let v5 = protocol == Protocol::V5;
        Ok(match header.kind {
            CONNECT => Packet::Connect(Connect::parse_body(header.flags, body)?),
            CONNACK => Packet::ConnAck(ConnAck::parse_body(body)?),
            PUBLISH => Packet::Publish(Publish::parse_body(header.flags, body, v5)?),
            PUBACK => Packet::PubAck(packet_id(body)?),
            PUBREC => Packet::PubRec(packet_id(body)?),
            PUBREL => Packet::PubRel(packet_id(body)?),
            PUBCOMP => Packet::PubComp(packet_id(body)?),
            SUBSCRIBE => Packet::Subscribe(Subscribe::parse_body(body, v5)?),
            SUBACK => Packet::SubAck(SubAck::parse_body(body, v5)?),
            UNSUBSCRIBE => Packet::Unsubscribe(Unsubscribe::parse_body(body, v5)?),
            UNSUBACK => Packet::UnsubAck(packet_id(body)?),
            PINGREQ => Packet::PingReq,
            PINGRESP => Packet::PingResp,
            DISCONNECT => Packet::Disconnect,
            AUTH => Packet::Auth,
            other => return Err(PacketError::UnknownType(other)),
        })
    }
}

fn packet_id(body: &[u8]) -> Result<u16, PacketError> {
    Reader::new(body).u16("packet id")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will<'a> {
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will properties, as sent (without their length).
    pub properties: &'a [u8],
    pub topic: &'a str,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// 3 (MQTT 3.1), 4 (3.1.1) or 5.
    pub level: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    /// MQTT 5 CONNECT properties, as sent (without their length).
    pub properties: &'a [u8],
    pub client_id: &'a str,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

impl<'a> Connect<'a> {
    /// The first packet of a connection: must be a CONNECT.
    pub fn parse(frame: &'a [u8]) -> Result<Self, PacketError> {
        let header = Header::parse(frame)?.ok_or(PacketError::Malformed("fixed header"))?;
        if header.kind != CONNECT {
            return Err(PacketError::NotConnect(header.kind));
        }
        let body = frame
            .get(header.len..header.total())
            .ok_or(PacketError::Malformed("packet length"))?;
        Connect::parse_body(header.flags, body)
    }

    fn parse_body(flags: u8, body: &'a [u8]) -> Result<Self, PacketError> {
        if flags != 0 {
            return Err(PacketError::Malformed("CONNECT fixed header flags"));
        }
        let mut r = Reader::new(body);
        let name = r.binary("protocol name")?;
        let level = r.u8("protocol level")?;
        match (name, level) {
            (b"MQTT", 4 | 5) | (b"MQIsdp", 3) => {}
            (b"MQTT" | b"MQIsdp", level) => return Err(PacketError::UnsupportedProtocol(level)),
            _ => return Err(PacketError::Malformed("protocol name")),
        }
        let v5 = level == 5;
        let connect_flags = r.u8("connect flags")?;
        if connect_flags & 0x01 != 0 {
            return Err(PacketError::Malformed("CONNECT reserved flag"));
        }
        let keep_alive = r.u16("keep alive")?;
        let properties = if v5 { r.properties()? } else { &[] };
        let client_id = r.string("client id")?;
        let will_flag = connect_flags & 0x04 != 0;
        let will_qos = (connect_flags >> 3) & 0x03;
        let will_retain = connect_flags & 0x20 != 0;
        let will = if will_flag {
            if will_qos > 2 {
                return Err(PacketError::Malformed("will QoS"));
            }
            let properties = if v5 { r.properties()? } else { &[] };
            Some(Will {
                qos: will_qos,
                retain: will_retain,
                properties,
                topic: r.string("will topic")?,
                payload: r.binary("will payload")?,
            })
        } else {
            if will_qos != 0 || will_retain {
                return Err(PacketError::Malformed("will flags without a will"));
            }
            None
        };
        let username = match connect_flags & 0x80 != 0 {
            true => Some(r.string("user name")?),
            false => None,
        };
        let password = match connect_flags & 0x40 != 0 {
            true => Some(r.binary("password")?),
            false => None,
        };
        if !v5 && password.is_some() && username.is_none() {
            return Err(PacketError::Malformed("password without a user name"));
        }
        r.end("CONNECT")?;
        Ok(Connect {
            level,
            clean_start: connect_flags & 0x02 != 0,
            keep_alive,
            properties,
            client_id,
            will,
            username,
            password,
        })
    }

    pub fn protocol(&self) -> Protocol {
        match self.level {
            5 => Protocol::V5,
            _ => Protocol::V311,
        }
    }

    /// MQTT 5's session expiry interval in seconds (absent: 0, the session ends with the
    /// connection).
    pub fn session_expiry(&self) -> Result<u32, PacketError> {
        match find_property(self.properties, 0x11)? {
            Some(Property::U32(seconds)) => Ok(seconds),
            _ => Ok(0),
        }
    }

    /// The packet as it would be sent, with this struct's fields.
    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut body = Vec::with_capacity(64);
        let name: &[u8] = if self.level == 3 { b"MQIsdp" } else { b"MQTT" };
        put_binary(&mut body, name);
        body.push(self.level);
        let mut flags = 0u8;
        if self.clean_start {
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
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            put_properties(&mut body, self.properties);
        }
        put_binary(&mut body, self.client_id.as_bytes());
        if let Some(will) = &self.will {
            if v5 {
                put_properties(&mut body, will.properties);
            }
            put_binary(&mut body, will.topic.as_bytes());
            put_binary(&mut body, will.payload);
        }
        if let Some(username) = self.username {
            put_binary(&mut body, username.as_bytes());
        }
        if let Some(password) = self.password {
            put_binary(&mut body, password);
        }
        with_header(CONNECT << 4, &body)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// MQTT 3.1.1 return code or MQTT 5 reason code.
    pub code: u8,
}

impl ConnAck {
    fn parse_body(body: &[u8]) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let flags = r.u8("CONNACK flags")?;
        let code = r.u8("CONNACK code")?;
        Ok(ConnAck {
            session_present: flags & 0x01 != 0,
            code,
        })
    }

    /// A CONNACK refusing a connection with `code` (MQTT 5: no properties).
    pub fn refusal(protocol: Protocol, code: u8) -> Vec<u8> {
        match protocol {
            Protocol::V311 => vec![CONNACK << 4, 2, 0, code],
            Protocol::V5 => vec![CONNACK << 4, 3, 0, code, 0],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty in an MQTT 5 publish that names its topic by alias only.
    pub topic: &'a str,
    pub packet_id: Option<u16>,
    /// MQTT 5 topic alias.
    pub topic_alias: Option<u16>,
    /// MQTT 5 properties, as sent (without their length).
    pub properties: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> Publish<'a> {
    fn parse_body(flags: u8, body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let qos = (flags >> 1) & 0x03;
        if qos > 2 {
            return Err(PacketError::Malformed("PUBLISH QoS 3"));
        }
        let mut r = Reader::new(body);
        let topic = r.string("topic")?;
        let packet_id = match qos {
            0 => None,
            _ => Some(r.u16("packet id")?),
        };
        let properties = if v5 { r.properties()? } else { &[] };
        let topic_alias = match find_property(properties, 0x23)? {
            Some(Property::U16(alias)) => Some(alias),
            _ => None,
        };
        if topic.is_empty() && topic_alias.is_none() {
            return Err(PacketError::Malformed("PUBLISH without a topic"));
        }
        Ok(Publish {
            dup: flags & 0x08 != 0,
            qos,
            retain: flags & 0x01 != 0,
            topic,
            packet_id,
            topic_alias,
            properties,
            payload: r.rest(),
        })
    }

    /// The packet as it would be sent, with this struct's fields (`packet_id` is used for
    /// QoS 1 and 2 only).
    pub fn encode(&self, protocol: Protocol) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.topic.len() + self.payload.len() + 8);
        put_binary(&mut body, self.topic.as_bytes());
        if self.qos > 0 {
            body.extend_from_slice(&self.packet_id.unwrap_or(1).to_be_bytes());
        }
        if protocol == Protocol::V5 {
            put_properties(&mut body, self.properties);
        }
        body.extend_from_slice(self.payload);
        let flags = (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain);
        with_header((PUBLISH << 4) | flags, &body)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub packet_id: u16,
    /// MQTT 5 properties (a subscription identifier, user properties), as sent.
    pub properties: &'a [u8],
    /// Each filter with its options byte (QoS in the low two bits).
    pub filters: Vec<(&'a str, u8)>,
}

impl<'a> Subscribe<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.u16("packet id")?;
        let properties = if v5 { r.properties()? } else { &[] };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.string("topic filter")?;
            let options = r.u8("subscription options")?;
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(PacketError::Malformed("SUBSCRIBE without filters"));
        }
        Ok(Subscribe {
            packet_id,
            properties,
            filters,
        })
    }

    /// The packet with only the given filters (in this order).
    pub fn encode(&self, protocol: Protocol, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = self.packet_id.to_be_bytes().to_vec();
        if protocol == Protocol::V5 {
            put_properties(&mut body, self.properties);
        }
        for (filter, options) in filters {
            put_binary(&mut body, filter.as_bytes());
            body.push(*options);
        }
        with_header((SUBSCRIBE << 4) | 0x02, &body)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck<'a> {
    pub packet_id: u16,
    pub properties: &'a [u8],
    pub codes: &'a [u8],
}

impl<'a> SubAck<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.u16("packet id")?;
        let properties = if v5 { r.properties()? } else { &[] };
        Ok(SubAck {
            packet_id,
            properties,
            codes: r.rest(),
        })
    }

    pub fn encode(protocol: Protocol, packet_id: u16, properties: &[u8], codes: &[u8]) -> Vec<u8> {
        let mut body = packet_id.to_be_bytes().to_vec();
        if protocol == Protocol::V5 {
            put_properties(&mut body, properties);
        }
        body.extend_from_slice(codes);
        with_header(SUBACK << 4, &body)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    pub packet_id: u16,
    pub filters: Vec<&'a str>,
}

impl<'a> Unsubscribe<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.u16("packet id")?;
        if v5 {
            r.properties()?;
        }
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.string("topic filter")?);
        }
        if filters.is_empty() {
            return Err(PacketError::Malformed("UNSUBSCRIBE without filters"));
        }
        Ok(Unsubscribe { packet_id, filters })
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP for `packet_id`; MQTT 5 with a reason code unless
/// it is success.
pub fn ack(kind: u8, protocol: Protocol, packet_id: u16, reason: u8) -> Vec<u8> {
    let first = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
    let [hi, lo] = packet_id.to_be_bytes();
    match (protocol, reason) {
        (Protocol::V5, reason) if reason != 0 => vec![first, 3, hi, lo, reason],
        _ => vec![first, 2, hi, lo],
    }
}

pub const PINGREQ_PACKET: [u8; 2] = [PINGREQ << 4, 0];
/// DISCONNECT, normal (also MQTT 5: no reason code means 0).
pub const DISCONNECT_PACKET: [u8; 2] = [DISCONNECT << 4, 0];

/// An MQTT 5 property block without every property `id` (the others as they were).
pub fn without_property(mut props: &[u8], id: u8) -> Result<Vec<u8>, PacketError> {
    let mut kept = Vec::with_capacity(props.len());
    while !props.is_empty() {
        let mut r = Reader::new(props);
        let this = r.varint("property id")?;
        let rest = r.rest();
        let after = rest.len() - property_value_len(this, rest)?;
        let whole = &props[..props.len() - after];
        if this != usize::from(id) {
            kept.extend_from_slice(whole);
        }
        props = &props[props.len() - after..];
    }
    Ok(kept)
}

/// Bytes of the value of property `id` at the start of `rest`.
fn property_value_len(id: usize, rest: &[u8]) -> Result<usize, PacketError> {
    let mut r = Reader::new(rest);
    match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
            r.u8("property")?;
        }
        0x13 | 0x21 | 0x22 | 0x23 => {
            r.u16("property")?;
        }
        0x02 | 0x11 | 0x18 | 0x27 => {
            r.u32("property")?;
        }
        0x0B => {
            r.varint("property")?;
        }
        0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
            r.string("property")?;
        }
        0x09 | 0x16 => {
            r.binary("property")?;
        }
        0x26 => {
            r.string("user property")?;
            r.string("user property")?;
        }
        _ => return Err(PacketError::Malformed("unknown property")),
    }
    Ok(rest.len() - r.buf.len())
}

/// A property value, for the few the front door reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(usize),
    Other,
}

/// The first property `id` in an MQTT 5 property block; every property is checked on the
/// way, so an unknown or cut property is an error.
pub fn find_property(mut props: &[u8], id: u8) -> Result<Option<Property>, PacketError> {
    let mut found = None;
    while !props.is_empty() {
        let mut r = Reader::new(props);
        let this = r.varint("property id")?;
        let value = match this {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                Property::Byte(r.u8("property")?)
            }
            0x13 | 0x21 | 0x22 | 0x23 => Property::U16(r.u16("property")?),
            0x02 | 0x11 | 0x18 | 0x27 => Property::U32(r.u32("property")?),
            0x0B => Property::VarInt(r.varint("property")?),
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                r.string("property")?;
                Property::Other
            }
            0x09 | 0x16 => {
                r.binary("property")?;
                Property::Other
            }
            0x26 => {
                r.string("user property")?;
                r.string("user property")?;
                Property::Other
            }
            _ => return Err(PacketError::Malformed("unknown property")),
        };
        if found.is_none() && this == usize::from(id) {
            found = Some(value);
        }
        props = r.rest();
    }
    Ok(found)
}

/// A cursor over a packet body; every read is checked against the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PacketError> {
        if n > self.buf.len() {
            return Err(PacketError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PacketError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PacketError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PacketError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self, what: &'static str) -> Result<usize, PacketError> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(PacketError::Malformed(what))
    }

    fn binary(&mut self, what: &'static str) -> Result<&'a [u8], PacketError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// An MQTT UTF-8 string: valid UTF-8 without U+0000.
    fn string(&mut self, what: &'static str) -> Result<&'a str, PacketError> {
        let bytes = self.binary(what)?;
        let text = std::str::from_utf8(bytes).map_err(|_| PacketError::InvalidUtf8)?;
        if text.contains('\0') {
            return Err(PacketError::InvalidUtf8);
        }
        Ok(text)
    }

    /// An MQTT 5 property block, checked property by property.
    fn properties(&mut self) -> Result<&'a [u8], PacketError> {
        let len = self.varint("property length")?;
        let props = self.take(len, "properties")?;
        find_property(props, 0)?;
        Ok(props)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn end(&self, what: &'static str) -> Result<(), PacketError> {
        match self.buf.is_empty() {
            true => Ok(()),
            false => Err(PacketError::Malformed(what)),
        }
    }
}

fn put_binary(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every string written here came from a parsed packet or is ours: it fits 16 bits.
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

fn put_properties(out: &mut Vec<u8>, props: &[u8]) {
    put_varint(out, props.len());
    out.extend_from_slice(props);
}

fn with_header(first: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(body.len() + 5);
    packet.push(first);
    put_varint(&mut packet, body.len());
    packet.extend_from_slice(body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framer(max: usize) -> Framer {
        Framer::new(max, Budget::new(usize::MAX))
    }

    fn connect_v4(client_id: &str, keep_alive: u16) -> Vec<u8> {
        Connect {
            level: 4,
            clean_start: true,
            keep_alive,
            properties: &[],
            client_id,
            will: None,
            username: None,
            password: None,
        }
        .encode()
    }

    #[test]
    fn parses_a_v4_connect_and_encodes_it_back() {
        let packet = connect_v4("dev-1", 0);
        let c = Connect::parse(&packet).unwrap();
        assert_eq!((c.client_id, c.keep_alive, c.level), ("dev-1", 0, 4));
        assert!(c.clean_start);
        assert_eq!(c.encode(), packet);
    }

    #[test]
    fn parses_a_v5_connect_with_properties_will_and_login() {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0xC4 | 0x08, 0, 30];
        body.extend_from_slice(&[5, 0x11, 0, 0, 0, 10]); // session expiry interval
        body.extend_from_slice(&[0, 2, b'v', b'5']);
        body.extend_from_slice(&[0, 0, 1, b't', 0, 2, b'o', b'f']); // will
        body.extend_from_slice(&[0, 1, b'u', 0, 2, b'p', b'w']);
        let packet = with_header(0x10, &body);
        let c = Connect::parse(&packet).unwrap();
        assert_eq!((c.level, c.keep_alive, c.client_id), (5, 30, "v5"));
        assert_eq!(c.session_expiry(), Ok(10));
        let will = c.will.as_ref().unwrap();
        assert_eq!((will.topic, will.payload, will.qos), ("t", &b"of"[..], 1));
        assert_eq!((c.username, c.password), (Some("u"), Some(&b"pw"[..])));
        assert_eq!(c.encode(), packet);
    }

    #[test]
    fn refuses_garbage_connects() {
        assert_eq!(
            Connect::parse(&[0x30, 0x00]),
            Err(PacketError::NotConnect(3))
        );
        assert!(Connect::parse(&[0x10, 0x03, 0, 4, b'M']).is_err());
        assert!(Connect::parse(&[]).is_err());
        let mut bad_level = connect_v4("x", 1);
        bad_level[8] = 9;
        assert_eq!(
            Connect::parse(&bad_level),
            Err(PacketError::UnsupportedProtocol(9))
        );
        let mut bad_utf8 = connect_v4("xy", 1);
        let end = bad_utf8.len() - 1;
        bad_utf8[end] = 0xFF;
        assert_eq!(Connect::parse(&bad_utf8), Err(PacketError::InvalidUtf8));
    }

    #[test]
    fn parses_publish_subscribe_and_suback() {
        let publish = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i'];
        let Ok(Packet::Publish(p)) = Packet::parse(&publish, Protocol::V311) else {
            panic!("not a publish");
        };
        assert_eq!(
            (p.topic, p.qos, p.packet_id, p.payload),
            ("a/b", 1, Some(7), &b"hi"[..])
        );
        let aliased = [0x30, 6, 0, 0, 3, 0x23, 0, 4];
        let Ok(Packet::Publish(p)) = Packet::parse(&aliased, Protocol::V5) else {
            panic!("not a publish");
        };
        assert_eq!((p.topic, p.topic_alias), ("", Some(4)));

        let sub = Subscribe {
            packet_id: 3,
            properties: &[0x0B, 5],
            filters: vec![("a/#", 1), ("b", 0)],
        };
        let bytes = sub.encode(Protocol::V5, &sub.filters);
        assert_eq!(
            Packet::parse(&bytes, Protocol::V5),
            Ok(Packet::Subscribe(sub))
        );

        let suback = SubAck::encode(Protocol::V311, 3, &[], &[0, 0x80]);
        assert_eq!(suback, [0x90, 4, 0, 3, 0, 0x80]);
        assert_eq!(ack(PUBACK, Protocol::V5, 9, 0x87), [0x40, 3, 0, 9, 0x87]);
        assert_eq!(ack(PUBREL, Protocol::V311, 9, 0), [0x62, 2, 0, 9]);
    }

    #[test]
    fn frames_are_cut_at_their_length() {
        let mut f = framer(1024);
        f.push(&[0xC0]).unwrap();
        assert_eq!(f.peek(), Ok(None));
        f.push(&[0x00, 0x30, 0x03, 1]).unwrap();
        assert_eq!(f.peek(), Ok(Some(&[0xC0, 0x00][..])));
        f.consume(2);
        assert_eq!(f.peek(), Ok(None));
        f.push(&[2, 3]).unwrap();
        assert_eq!(f.peek(), Ok(Some(&[0x30, 0x03, 1, 2, 3][..])));
        let mut f = framer(1024);
        f.push(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap();
        assert_eq!(f.peek(), Err(PacketError::BadLength));
    }

    #[test]
    fn a_huge_claim_costs_nothing_and_is_refused_at_once() {
        let mut f = framer(300 * 1024);
        f.push(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).unwrap();
        assert!(matches!(f.peek(), Err(PacketError::TooLarge { .. })));
        assert!(f.capacity() <= 8, "{}", f.capacity());
        let mut f = framer(300 * 1024);
        f.push(&[0x10, 0x80, 0x80, 0x10]).unwrap();
        assert_eq!(f.peek(), Ok(None));
        assert!(f.capacity() <= 6, "{}", f.capacity());
    }

    #[test]
    fn the_budget_bounds_all_framers_together() {
        let budget = Budget::new(1000);
        let mut framers: Vec<Framer> = (0..20)
            .map(|_| Framer::new(1 << 20, budget.clone()))
            .collect();
        let refused = framers
            .iter_mut()
            .filter_map(|f| f.push(&[0u8; 64]).err())
            .count();
        assert!(refused > 0 && budget.used() <= 1000);
        drop(framers);
        assert_eq!(budget.used(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes, in arbitrary read sizes: no panic, and the buffer never holds
        /// more than 1.5 times the most bytes that had arrived and were not consumed.
        #[test]
        fn the_framer_survives_anything(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
            max in 2usize..4096,
        ) {
            let mut f = framer(max);
            let mut peak_held = 0;
            'feed: for chunk in chunks {
                f.push(&chunk).unwrap();
                peak_held = peak_held.max(f.buffered());
                loop {
                    match f.peek() {
                        Ok(Some(frame)) => {
                            let len = frame.len();
                            prop_assert!(len <= max);
                            let _ = Packet::parse(frame, Protocol::V311);
                            let _ = Packet::parse(frame, Protocol::V5);
                            f.consume(len);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                let bound = peak_held + peak_held / 2;
                prop_assert!(f.capacity() <= bound, "capacity {} > {bound}", f.capacity());
            }
        }

        /// Arbitrary bytes after a valid fixed header: the CONNECT parser never panics, and
        /// whatever it accepts encodes back to a packet that parses to the same thing.
        #[test]
        fn the_connect_parser_survives_anything(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let packet = with_header(0x10, &body);
            if let Ok(connect) = Connect::parse(&packet) {
                let again = connect.encode();
                prop_assert_eq!(Connect::parse(&again), Ok(connect));
            }
        }

        /// CONNECTs that are almost right: a valid one with bytes flipped.
        #[test]
        fn a_damaged_connect_is_refused_or_parsed(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            v5 in any::<bool>(),
        ) {
            let mut packet = connect_v4("sensor-1", 30);
            if v5 {
                packet = Connect { level: 5, properties: &[0x11, 0, 0, 0, 5], ..Connect::parse(&packet).unwrap() }.encode();
            }
            for (at, byte) in flips {
                let i = at % packet.len();
                packet[i] ^= byte;
            }
            let _ = Connect::parse(&packet);
        }
    }
}
