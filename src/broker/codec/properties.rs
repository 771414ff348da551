//! MQTT 5 properties: every property the specification defines, checked against the
//! packet it came in (a property a packet may not carry is a malformed packet, a second
//! copy of one that may appear once is a protocol error), and written back in one order.

use super::read::Reader;
use super::write::{put_binary, put_str, put_varint, varint_len};
use super::PacketError;

/// Where a property block sits: which properties it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Connect,
    ConnAck,
    Publish,
    Will,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Context {
    /// Whether property `id` may appear in this block.
    pub(crate) fn allows(self, id: u8) -> bool {
        use Context::*;
        match id {
            0x26 => true,
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(self, Publish | Will),
            0x0B => matches!(self, Publish | Subscribe),
            0x11 => matches!(self, Connect | ConnAck | Disconnect),
            0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => self == ConnAck,
            0x15 | 0x16 => matches!(self, Connect | ConnAck | Auth),
            0x17 | 0x19 => self == Connect,
            0x18 => self == Will,
            0x1C => matches!(self, ConnAck | Disconnect),
            0x1F => !matches!(self, Connect | Publish | Will | Subscribe | Unsubscribe),
            0x21 | 0x22 | 0x27 => matches!(self, Connect | ConnAck),
            0x23 => self == Publish,
            _ => false,
        }
    }
}

/// Every MQTT 5 property; absent ones are None (or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties<'a> {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    /// One in a SUBSCRIBE; one per matching subscription in a PUBLISH to a client.
    pub subscription_ids: Vec<u32>,
    pub session_expiry: Option<u32>,
    pub assigned_client_id: Option<&'a str>,
    pub server_keep_alive: Option<u16>,
    pub auth_method: Option<&'a str>,
    pub auth_data: Option<&'a [u8]>,
    pub request_problem_info: Option<u8>,
    pub will_delay: Option<u32>,
    pub request_response_info: Option<u8>,
    pub response_info: Option<&'a str>,
    pub server_reference: Option<&'a str>,
    pub reason_string: Option<&'a str>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user: Vec<(&'a str, &'a str)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_available: Option<u8>,
    pub subscription_ids_available: Option<u8>,
    pub shared_available: Option<u8>,
}

/// Sets a property that may appear once; a second copy is a protocol error.
fn once<T>(slot: &mut Option<T>, value: T) -> Result<(), PacketError> {
    if slot.is_some() {
        return Err(PacketError::Protocol(
            "a property that may appear once came twice",
        ));
    }
    *slot = Some(value);
    Ok(())
}

/// A byte property that may only be 0 or 1.
fn flag(r: &mut Reader<'_>, what: &'static str) -> Result<u8, PacketError> {
    match r.u8(what)? {
        v @ (0 | 1) => Ok(v),
        _ => Err(PacketError::Protocol(what)),
    }
}

impl<'a> Properties<'a> {
    /// Parses a property block (without its length) found in `context`.
    pub fn parse(block: &'a [u8], context: Context) -> Result<Self, PacketError> {
        let mut p = Properties::default();
        let mut r = Reader::new(block);
        while !r.is_empty() {
            let id = r.varint("property identifier")?;
            let id = u8::try_from(id).map_err(|_| PacketError::Malformed("unknown property"))?;
            if !context.allows(id) {
                return Err(PacketError::Malformed(
                    "a property this packet may not carry",
                ));
            }
            match id {
                0x01 => once(
                    &mut p.payload_format,
                    flag(&mut r, "payload format indicator")?,
                )?,
                0x02 => once(&mut p.message_expiry, r.u32("message expiry interval")?)?,
                0x03 => once(&mut p.content_type, r.string("content type")?)?,
                0x08 => once(&mut p.response_topic, r.string("response topic")?)?,
                0x09 => once(&mut p.correlation_data, r.binary("correlation data")?)?,
                0x0B => {
                    let id = r.varint("subscription identifier")?;
                    if id == 0 {
                        return Err(PacketError::Protocol("subscription identifier 0"));
                    }
                    if context == Context::Subscribe && !p.subscription_ids.is_empty() {
                        return Err(PacketError::Protocol(
                            "more than one subscription identifier",
                        ));
                    }
                    p.subscription_ids.push(id as u32);
                }
                0x11 => once(&mut p.session_expiry, r.u32("session expiry interval")?)?,
                0x12 => once(
                    &mut p.assigned_client_id,
                    r.string("assigned client identifier")?,
                )?,
                0x13 => once(&mut p.server_keep_alive, r.u16("server keep alive")?)?,
                0x15 => once(&mut p.auth_method, r.string("authentication method")?)?,
                0x16 => once(&mut p.auth_data, r.binary("authentication data")?)?,
                0x17 => once(
                    &mut p.request_problem_info,
                    flag(&mut r, "request problem information")?,
                )?,
                0x18 => once(&mut p.will_delay, r.u32("will delay interval")?)?,
                0x19 => once(
                    &mut p.request_response_info,
                    flag(&mut r, "request response information")?,
                )?,
                0x1A => once(&mut p.response_info, r.string("response information")?)?,
                0x1C => once(&mut p.server_reference, r.string("server reference")?)?,
                0x1F => once(&mut p.reason_string, r.string("reason string")?)?,
                0x21 => {
                    let v = r.u16("receive maximum")?;
                    if v == 0 {
                        return Err(PacketError::Protocol("receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, v)?
                }
                0x22 => once(&mut p.topic_alias_maximum, r.u16("topic alias maximum")?)?,
                0x23 => once(&mut p.topic_alias, r.u16("topic alias")?)?,
                0x24 => once(&mut p.maximum_qos, flag(&mut r, "maximum QoS")?)?,
                0x25 => once(&mut p.retain_available, flag(&mut r, "retain available")?)?,
                0x26 => {
                    let key = r.string("user property")?;
                    let value = r.string("user property")?;
                    p.user.push((key, value));
                }
                0x27 => {
                    let v = r.u32("maximum packet size")?;
                    if v == 0 {
                        return Err(PacketError::Protocol("maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                0x28 => once(
                    &mut p.wildcard_available,
                    flag(&mut r, "wildcard subscription available")?,
                )?,
                0x29 => once(
                    &mut p.subscription_ids_available,
                    flag(&mut r, "subscription identifier available")?,
                )?,
                0x2A => once(
                    &mut p.shared_available,
                    flag(&mut r, "shared subscription available")?,
                )?,
                _ => return Err(PacketError::Malformed("unknown property")),
            }
        }
        Ok(p)
    }

    /// Bytes of the encoded block (without its length).
    pub fn len(&self) -> usize {
        let mut n = 0;
        let byte = |v: &Option<u8>| v.map_or(0, |_| 2);
        let u16_ = |v: &Option<u16>| v.map_or(0, |_| 3);
        let u32_ = |v: &Option<u32>| v.map_or(0, |_| 5);
        let s = |v: &Option<&str>| v.map_or(0, |s| 3 + s.len());
        let b = |v: &Option<&[u8]>| v.map_or(0, |b| 3 + b.len());
        n += byte(&self.payload_format) + u32_(&self.message_expiry) + s(&self.content_type);
        n += s(&self.response_topic) + b(&self.correlation_data);
        n += self
            .subscription_ids
            .iter()
            .map(|id| 1 + varint_len(*id as usize))
            .sum::<usize>();
        n += u32_(&self.session_expiry) + s(&self.assigned_client_id);
        n += u16_(&self.server_keep_alive) + s(&self.auth_method) + b(&self.auth_data);
        n += byte(&self.request_problem_info) + u32_(&self.will_delay);
        n += byte(&self.request_response_info) + s(&self.response_info);
        n += s(&self.server_reference) + s(&self.reason_string);
        n += u16_(&self.receive_maximum) + u16_(&self.topic_alias_maximum);
        n += u16_(&self.topic_alias) + byte(&self.maximum_qos) + byte(&self.retain_available);
        n += self
            .user
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>();
        n += u32_(&self.maximum_packet_size) + byte(&self.wildcard_available);
        n += byte(&self.subscription_ids_available) + byte(&self.shared_available);
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the block (without its length), in identifier order.
    pub fn write(&self, out: &mut Vec<u8>) {
        let byte = |out: &mut Vec<u8>, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.extend_from_slice(&[id, v]);
            }
        };
        let u16_ = |out: &mut Vec<u8>, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.push(id);
                out.extend_from_slice(&v.to_be_bytes());
            }
        };
        let u32_ = |out: &mut Vec<u8>, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.push(id);
                out.extend_from_slice(&v.to_be_bytes());
            }
        };
        let s = |out: &mut Vec<u8>, id: u8, v: Option<&str>| {
            if let Some(v) = v {
                out.push(id);
                put_str(out, v);
            }
        };
        let b = |out: &mut Vec<u8>, id: u8, v: Option<&[u8]>| {
            if let Some(v) = v {
                out.push(id);
                put_binary(out, v);
            }
        };
        byte(out, 0x01, self.payload_format);
        u32_(out, 0x02, self.message_expiry);
        s(out, 0x03, self.content_type);
        s(out, 0x08, self.response_topic);
        b(out, 0x09, self.correlation_data);
        for id in &self.subscription_ids {
            out.push(0x0B);
            put_varint(out, *id as usize);
        }
        u32_(out, 0x11, self.session_expiry);
        s(out, 0x12, self.assigned_client_id);
        u16_(out, 0x13, self.server_keep_alive);
        s(out, 0x15, self.auth_method);
        b(out, 0x16, self.auth_data);
        byte(out, 0x17, self.request_problem_info);
        u32_(out, 0x18, self.will_delay);
        byte(out, 0x19, self.request_response_info);
        s(out, 0x1A, self.response_info);
        s(out, 0x1C, self.server_reference);
        s(out, 0x1F, self.reason_string);
        u16_(out, 0x21, self.receive_maximum);
        u16_(out, 0x22, self.topic_alias_maximum);
        u16_(out, 0x23, self.topic_alias);
        byte(out, 0x24, self.maximum_qos);
        byte(out, 0x25, self.retain_available);
        for (k, v) in &self.user {
            out.push(0x26);
            put_str(out, k);
            put_str(out, v);
        }
        u32_(out, 0x27, self.maximum_packet_size);
        byte(out, 0x28, self.wildcard_available);
        byte(out, 0x29, self.subscription_ids_available);
        byte(out, 0x2A, self.shared_available);
    }

    /// The properties a broker passes on unchanged from a PUBLISH (or will) to its
    /// subscribers ([MQTT-3.3.2-4], -3.3.2-15, -3.3.2-16, -3.3.2-17, -3.3.2-20), encoded.
    pub fn forwarded(&self) -> Vec<u8> {
        let kept = Properties {
            payload_format: self.payload_format,
            content_type: self.content_type,
            response_topic: self.response_topic,
            correlation_data: self.correlation_data,
            user: self.user.clone(),
            ..Properties::default()
        };
        let mut out = Vec::with_capacity(kept.len());
        kept.write(&mut out);
        out
    }
}
