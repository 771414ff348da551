//! Encoding: every packet, for the broker's own replies and deliveries, and for tests and
//! in-process clients that speak to the broker.

use super::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, Publish, SubAck,
    Subscribe, Unsubscribe, AUTH, CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP,
    PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
};

pub fn put_varint(out: &mut Vec<u8>, mut value: usize) {
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

pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A length-prefixed string or binary field. Every one written here came from a parsed
/// packet or is the broker's own, so it fits 16 bits; a longer one is cut, never panics.
pub fn put_binary(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_binary(out, s.as_bytes());
}

/// The fixed header for a packet with `remaining` bytes after it.
fn put_header(out: &mut Vec<u8>, first: u8, remaining: usize) {
    out.push(first);
    put_varint(out, remaining);
}

/// Bytes of a property block with its length prefix.
fn block_len(props_len: usize) -> usize {
    varint_len(props_len) + props_len
}

fn put_block(out: &mut Vec<u8>, props: &Properties<'_>, len: usize) {
    put_varint(out, len);
    props.write(out);
}

/// A PUBLISH as the broker sends it to a subscriber: the message's pass-through properties
/// already encoded, plus what is per delivery (expiry left, alias, subscription ids).
#[derive(Debug, Clone, Copy)]
pub struct PublishOut<'a> {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty when `topic_alias` names a topic the client already knows.
    pub topic: &'a str,
    pub packet_id: u16,
    /// Encoded properties passed on unchanged (MQTT 5 only).
    pub forwarded: &'a [u8],
    pub message_expiry: Option<u32>,
    pub topic_alias: Option<u16>,
    pub subscription_ids: &'a [u32],
    pub payload: &'a [u8],
}

impl PublishOut<'_> {
    fn props_len(&self) -> usize {
        self.forwarded.len()
            + self.message_expiry.map_or(0, |_| 5)
            + self.topic_alias.map_or(0, |_| 3)
            + self
                .subscription_ids
                .iter()
                .map(|id| 1 + varint_len(*id as usize))
                .sum::<usize>()
    }

    fn remaining(&self, v5: bool) -> usize {
        2 + self.topic.len()
            + if self.qos > 0 { 2 } else { 0 }
            + if v5 { block_len(self.props_len()) } else { 0 }
            + self.payload.len()
    }

    /// Bytes of the whole packet.
    pub fn size(&self, v5: bool) -> usize {
        let remaining = self.remaining(v5);
        1 + varint_len(remaining) + remaining
    }

    pub fn write(&self, v5: bool, out: &mut Vec<u8>) {
        let flags = (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain);
        put_header(out, (PUBLISH << 4) | flags, self.remaining(v5));
        put_str(out, self.topic);
        if self.qos > 0 {
            out.extend_from_slice(&self.packet_id.to_be_bytes());
        }
        if v5 {
            put_varint(out, self.props_len());
            if let Some(expiry) = self.message_expiry {
                out.push(0x02);
                out.extend_from_slice(&expiry.to_be_bytes());
            }
            out.extend_from_slice(self.forwarded);
            for id in self.subscription_ids {
                out.push(0x0B);
                put_varint(out, *id as usize);
            }
            if let Some(alias) = self.topic_alias {
                out.push(0x23);
                out.extend_from_slice(&alias.to_be_bytes());
            }
        }
        out.extend_from_slice(self.payload);
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP, with a reason code (and reason string) in MQTT 5.
pub fn ack(out: &mut Vec<u8>, kind: u8, v5: bool, packet_id: u16, reason: u8) {
    let first = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
    let [hi, lo] = packet_id.to_be_bytes();
    match v5 && reason != 0 {
        true => out.extend_from_slice(&[first, 3, hi, lo, reason]),
        false => out.extend_from_slice(&[first, 2, hi, lo]),
    }
}

pub const PINGRESP_PACKET: [u8; 2] = [PINGRESP << 4, 0];
pub const PINGREQ_PACKET: [u8; 2] = [PINGREQ << 4, 0];

/// A DISCONNECT from the broker: MQTT 5 with its reason code; MQTT 3.1.1 has no server
/// DISCONNECT, so nothing is written.
pub fn disconnect(out: &mut Vec<u8>, v5: bool, reason: u8) {
    if v5 {
        out.extend_from_slice(&[DISCONNECT << 4, 1, reason]);
    }
}

impl Packet<'_> {
    /// The packet as bytes, for a connection speaking `protocol`.
    pub fn write(&self, protocol: Protocol, out: &mut Vec<u8>) {
        let v5 = protocol == Protocol::V5;
        match self {
            Packet::Connect(c) => c.write(out),
            Packet::ConnAck(c) => c.write(v5, out),
            Packet::Publish(p) => p.write(v5, out),
            Packet::PubAck(a) => a.write(PUBACK, v5, out),
            Packet::PubRec(a) => a.write(PUBREC, v5, out),
            Packet::PubRel(a) => a.write(PUBREL, v5, out),
            Packet::PubComp(a) => a.write(PUBCOMP, v5, out),
            Packet::Subscribe(s) => s.write(v5, out),
            Packet::SubAck(s) => s.write(SUBACK, v5, out),
            Packet::Unsubscribe(u) => u.write(v5, out),
            Packet::UnsubAck(s) => s.write(UNSUBACK, v5, out),
            Packet::PingReq => out.extend_from_slice(&PINGREQ_PACKET),
            Packet::PingResp => out.extend_from_slice(&PINGRESP_PACKET),
            Packet::Disconnect(d) => d.write(v5, out),
            Packet::Auth(a) => a.write(out),
        }
    }

    pub fn to_vec(&self, protocol: Protocol) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(protocol, &mut out);
        out
    }
}

impl Connect<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let v5 = self.level == 5;
        let name: &[u8] = if self.level == 3 { b"MQIsdp" } else { b"MQTT" };
        let props_len = self.props.len();
        let will_props_len = self.will.as_ref().map_or(0, |w| w.props.len());
        let mut remaining = 2 + name.len() + 1 + 1 + 2 + 2 + self.client_id.len();
        if v5 {
            remaining += block_len(props_len);
        }
        if let Some(will) = &self.will {
            remaining += 4 + will.topic.len() + will.payload.len();
            if v5 {
                remaining += block_len(will_props_len);
            }
        }
        remaining += self.username.map_or(0, |u| 2 + u.len());
        remaining += self.password.map_or(0, |p| 2 + p.len());
        put_header(out, CONNECT << 4, remaining);
        put_binary(out, name);
        out.push(self.level);
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
        out.push(flags);
        out.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            put_block(out, &self.props, props_len);
        }
        put_str(out, self.client_id);
        if let Some(will) = &self.will {
            if v5 {
                put_block(out, &will.props, will_props_len);
            }
            put_str(out, will.topic);
            put_binary(out, will.payload);
        }
        if let Some(username) = self.username {
            put_str(out, username);
        }
        if let Some(password) = self.password {
            put_binary(out, password);
        }
    }
}

impl ConnAck<'_> {
    fn write(&self, v5: bool, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        let remaining = 2 + if v5 { block_len(props_len) } else { 0 };
        put_header(out, CONNACK << 4, remaining);
        out.push(u8::from(self.session_present));
        out.push(self.code);
        if v5 {
            put_block(out, &self.props, props_len);
        }
    }
}

impl Publish<'_> {
    fn write(&self, v5: bool, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        let remaining = 2
            + self.topic.len()
            + if self.qos > 0 { 2 } else { 0 }
            + if v5 { block_len(props_len) } else { 0 }
            + self.payload.len();
        let flags = (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain);
        put_header(out, (PUBLISH << 4) | flags, remaining);
        put_str(out, self.topic);
        if self.qos > 0 {
            out.extend_from_slice(&self.packet_id.to_be_bytes());
        }
        if v5 {
            put_block(out, &self.props, props_len);
        }
        out.extend_from_slice(self.payload);
    }
}

impl Ack<'_> {
    fn write(&self, kind: u8, v5: bool, out: &mut Vec<u8>) {
        let first = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
        let props_len = self.props.len();
        if !v5 || (self.reason == 0 && props_len == 0) {
            put_header(out, first, 2);
            out.extend_from_slice(&self.packet_id.to_be_bytes());
        } else if props_len == 0 {
            put_header(out, first, 3);
            out.extend_from_slice(&self.packet_id.to_be_bytes());
            out.push(self.reason);
        } else {
            put_header(out, first, 3 + block_len(props_len));
            out.extend_from_slice(&self.packet_id.to_be_bytes());
            out.push(self.reason);
            put_block(out, &self.props, props_len);
        }
    }
}

impl Subscribe<'_> {
    fn write(&self, v5: bool, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        let remaining = 2
            + if v5 { block_len(props_len) } else { 0 }
            + self.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
        put_header(out, (SUBSCRIBE << 4) | 0x02, remaining);
        out.extend_from_slice(&self.packet_id.to_be_bytes());
        if v5 {
            put_block(out, &self.props, props_len);
        }
        for (filter, options) in &self.filters {
            put_str(out, filter);
            out.push(options.to_byte());
        }
    }
}

impl SubAck<'_> {
    fn write(&self, kind: u8, v5: bool, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        let remaining = 2 + if v5 { block_len(props_len) } else { 0 } + self.codes.len();
        put_header(out, kind << 4, remaining);
        out.extend_from_slice(&self.packet_id.to_be_bytes());
        if v5 {
            put_block(out, &self.props, props_len);
        }
        out.extend_from_slice(self.codes);
    }
}

impl Unsubscribe<'_> {
    fn write(&self, v5: bool, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        let remaining = 2
            + if v5 { block_len(props_len) } else { 0 }
            + self.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
        put_header(out, (UNSUBSCRIBE << 4) | 0x02, remaining);
        out.extend_from_slice(&self.packet_id.to_be_bytes());
        if v5 {
            put_block(out, &self.props, props_len);
        }
        for filter in &self.filters {
            put_str(out, filter);
        }
    }
}

impl Disconnect<'_> {
    fn write(&self, v5: bool, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        if !v5 || (self.reason == 0 && props_len == 0) {
            put_header(out, DISCONNECT << 4, 0);
        } else if props_len == 0 {
            put_header(out, DISCONNECT << 4, 1);
            out.push(self.reason);
        } else {
            put_header(out, DISCONNECT << 4, 1 + block_len(props_len));
            out.push(self.reason);
            put_block(out, &self.props, props_len);
        }
    }
}

impl Auth<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let props_len = self.props.len();
        if self.reason == 0 && props_len == 0 {
            put_header(out, AUTH << 4, 0);
        } else {
            put_header(out, AUTH << 4, 1 + block_len(props_len));
            out.push(self.reason);
            put_block(out, &self.props, props_len);
        }
    }
}
