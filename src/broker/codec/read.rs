//! Parsing: every packet of MQTT 3.1, 3.1.1 and 5, checked against the specification's
//! rules for its fixed header, its fields and its properties.

use super::{
    Ack, Auth, ConnAck, Connect, Context, Disconnect, Header, Packet, PacketError, Properties,
    Protocol, Publish, SubAck, SubOptions, Subscribe, Unsubscribe, Will, AUTH, CONNACK, CONNECT,
    DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE,
    UNSUBACK, UNSUBSCRIBE,
};

impl<'a> Packet<'a> {
    /// Parses one whole packet (fixed header included) of a connection speaking `protocol`.
    pub fn parse(frame: &'a [u8], protocol: Protocol) -> Result<Self, PacketError> {
        let header = Header::parse(frame)?.ok_or(PacketError::Malformed("fixed header"))?;
        let body = frame
            .get(header.len..header.total())
            .ok_or(PacketError::Malformed("packet length"))?;
        let v5 = protocol == Protocol::V5;
        // [MQTT-2.1.3-1]: the flags of every packet but PUBLISH are fixed.
        let expected_flags = match header.kind {
            PUBLISH => header.flags,
            PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0x02,
            _ => 0,
        };
        if header.flags != expected_flags {
            return Err(PacketError::Malformed("fixed header flags"));
        }
        Ok(match header.kind {
            CONNECT => Packet::Connect(Box::new(Connect::parse_body(body)?)),
            CONNACK => Packet::ConnAck(ConnAck::parse_body(body, v5)?),
            PUBLISH => Packet::Publish(Publish::parse_body(header.flags, body, v5)?),
            PUBACK => Packet::PubAck(Ack::parse_body(body, v5)?),
            PUBREC => Packet::PubRec(Ack::parse_body(body, v5)?),
            PUBREL => Packet::PubRel(Ack::parse_body(body, v5)?),
            PUBCOMP => Packet::PubComp(Ack::parse_body(body, v5)?),
            SUBSCRIBE => Packet::Subscribe(Subscribe::parse_body(body, v5)?),
            SUBACK => Packet::SubAck(SubAck::parse_body(body, v5, Context::SubAck)?),
            UNSUBSCRIBE => Packet::Unsubscribe(Unsubscribe::parse_body(body, v5)?),
            UNSUBACK => Packet::UnsubAck(SubAck::parse_body(body, v5, Context::UnsubAck)?),
            PINGREQ | PINGRESP => {
                if !body.is_empty() {
                    return Err(PacketError::Malformed("PINGREQ/PINGRESP with a body"));
                }
                match header.kind {
                    PINGREQ => Packet::PingReq,
                    _ => Packet::PingResp,
                }
            }
            DISCONNECT => Packet::Disconnect(Disconnect::parse_body(body, v5)?),
            AUTH if v5 => Packet::Auth(Auth::parse_body(body)?),
            other => return Err(PacketError::UnknownType(other)),
        })
    }
}

impl<'a> Connect<'a> {
    /// The first packet of a connection: must be a CONNECT.
    pub fn parse(frame: &'a [u8]) -> Result<Self, PacketError> {
        let header = Header::parse(frame)?.ok_or(PacketError::Malformed("fixed header"))?;
        if header.kind != CONNECT {
            return Err(PacketError::NotConnect(header.kind));
        }
        if header.flags != 0 {
            return Err(PacketError::Malformed("CONNECT fixed header flags"));
        }
        let body = frame
            .get(header.len..header.total())
            .ok_or(PacketError::Malformed("packet length"))?;
        Connect::parse_body(body)
    }

    fn parse_body(body: &'a [u8]) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let name = r.binary("protocol name")?;
        let level = r.u8("protocol level")?;
        match (name, level) {
            (b"MQTT", 4 | 5) | (b"MQIsdp", 3) => {}
            (b"MQTT" | b"MQIsdp", level) => return Err(PacketError::UnsupportedProtocol(level)),
            _ => return Err(PacketError::Malformed("protocol name")),
        }
        let v5 = level == 5;
        let flags = r.u8("connect flags")?;
        if flags & 0x01 != 0 {
            return Err(PacketError::Malformed("CONNECT reserved flag"));
        }
        let keep_alive = r.u16("keep alive")?;
        let props = match v5 {
            true => r.properties(Context::Connect)?,
            false => Properties::default(),
        };
        let client_id = r.string("client id")?;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        let will = if flags & 0x04 != 0 {
            if will_qos > 2 {
                return Err(PacketError::Malformed("will QoS 3"));
            }
            let props = match v5 {
                true => r.properties(Context::Will)?,
                false => Properties::default(),
            };
            Some(Will {
                qos: will_qos,
                retain: will_retain,
                props,
                topic: r.string("will topic")?,
                payload: r.binary("will payload")?,
            })
        } else {
            if will_qos != 0 || will_retain {
                return Err(PacketError::Malformed("will QoS or retain without a will"));
            }
            None
        };
        let username = match flags & 0x80 != 0 {
            true => Some(r.string("user name")?),
            false => None,
        };
        let password = match flags & 0x40 != 0 {
            true => Some(r.binary("password")?),
            false => None,
        };
        if !v5 && password.is_some() && username.is_none() {
            return Err(PacketError::Malformed("password without a user name"));
        }
        r.end("CONNECT")?;
        Ok(Connect {
            level,
            clean_start: flags & 0x02 != 0,
            keep_alive,
            props,
            client_id,
            will,
            username,
            password,
        })
    }
}

impl<'a> ConnAck<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let flags = r.u8("CONNACK flags")?;
        if flags & 0xFE != 0 {
            return Err(PacketError::Malformed("CONNACK reserved flags"));
        }
        let code = r.u8("CONNACK code")?;
        let props = match v5 {
            true => r.properties(Context::ConnAck)?,
            false => Properties::default(),
        };
        r.end("CONNACK")?;
        Ok(ConnAck {
            session_present: flags & 0x01 != 0,
            code,
            props,
        })
    }
}

impl<'a> Publish<'a> {
    fn parse_body(flags: u8, body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let qos = (flags >> 1) & 0x03;
        if qos > 2 {
            return Err(PacketError::Malformed("PUBLISH QoS 3"));
        }
        let dup = flags & 0x08 != 0;
        if dup && qos == 0 {
            // [MQTT-3.3.1-2]
            return Err(PacketError::Malformed("PUBLISH QoS 0 with DUP set"));
        }
        let mut r = Reader::new(body);
        let topic = r.string("topic name")?;
        let packet_id = match qos {
            0 => 0,
            _ => r.packet_id()?,
        };
        let props = match v5 {
            true => r.properties(Context::Publish)?,
            false => Properties::default(),
        };
        if topic.is_empty() && props.topic_alias.is_none() {
            return Err(PacketError::Protocol(
                "PUBLISH without a topic name or alias",
            ));
        }
        Ok(Publish {
            dup,
            qos,
            retain: flags & 0x01 != 0,
            topic,
            packet_id,
            props,
            payload: r.rest(),
        })
    }
}

impl<'a> Ack<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.packet_id()?;
        if !v5 {
            r.end("acknowledgement")?;
            return Ok(Ack::new(packet_id));
        }
        // [MQTT-3.4.2-1]: the reason code and properties may be left out.
        let reason = match r.is_empty() {
            true => 0,
            false => r.u8("reason code")?,
        };
        let props = match r.is_empty() {
            true => Properties::default(),
            false => r.properties(Context::Ack)?,
        };
        r.end("acknowledgement")?;
        Ok(Ack {
            packet_id,
            reason,
            props,
        })
    }
}

impl<'a> Subscribe<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.packet_id()?;
        let props = match v5 {
            true => r.properties(Context::Subscribe)?,
            false => Properties::default(),
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.string("topic filter")?;
            let byte = r.u8("subscription options")?;
            // [MQTT-3.8.3-4] (3.1.1: the upper six bits), [MQTT-3.8.3-5] (5: the upper
            // two), retain handling 3 and QoS 3 are malformed.
            let reserved = if v5 { 0xC0 } else { 0xFC };
            if byte & reserved != 0 {
                return Err(PacketError::Malformed("subscription options reserved bits"));
            }
            let options = SubOptions::from_byte(byte);
            if options.qos > 2 || options.retain_handling > 2 {
                return Err(PacketError::Malformed("subscription options"));
            }
            filters.push((filter, options));
        }
        if filters.is_empty() {
            // [MQTT-3.8.3-3]
            return Err(PacketError::Protocol("SUBSCRIBE without a topic filter"));
        }
        Ok(Subscribe {
            packet_id,
            props,
            filters,
        })
    }
}

impl<'a> SubAck<'a> {
    fn parse_body(body: &'a [u8], v5: bool, context: Context) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.u16("packet identifier")?;
        let props = match v5 {
            true => r.properties(context)?,
            false => Properties::default(),
        };
        Ok(SubAck {
            packet_id,
            props,
            codes: r.rest(),
        })
    }
}

impl<'a> Unsubscribe<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let packet_id = r.packet_id()?;
        let props = match v5 {
            true => r.properties(Context::Unsubscribe)?,
            false => Properties::default(),
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.string("topic filter")?);
        }
        if filters.is_empty() {
            // [MQTT-3.10.3-2]
            return Err(PacketError::Protocol("UNSUBSCRIBE without a topic filter"));
        }
        Ok(Unsubscribe {
            packet_id,
            props,
            filters,
        })
    }
}

impl<'a> Disconnect<'a> {
    fn parse_body(body: &'a [u8], v5: bool) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        if !v5 {
            r.end("DISCONNECT")?;
            return Ok(Disconnect::default());
        }
        let reason = match r.is_empty() {
            true => 0,
            false => r.u8("reason code")?,
        };
        let props = match r.is_empty() {
            true => Properties::default(),
            false => r.properties(Context::Disconnect)?,
        };
        r.end("DISCONNECT")?;
        Ok(Disconnect { reason, props })
    }
}

impl<'a> Auth<'a> {
    fn parse_body(body: &'a [u8]) -> Result<Self, PacketError> {
        let mut r = Reader::new(body);
        let reason = match r.is_empty() {
            true => 0,
            false => r.u8("reason code")?,
        };
        let props = match r.is_empty() {
            true => Properties::default(),
            false => r.properties(Context::Auth)?,
        };
        r.end("AUTH")?;
        Ok(Auth { reason, props })
    }
}

/// A cursor over a packet body; every read is checked against the end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
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

    pub fn u8(&mut self, what: &'static str) -> Result<u8, PacketError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, PacketError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A packet identifier, which is never 0 ([MQTT-2.2.1-3]).
    pub fn packet_id(&mut self) -> Result<u16, PacketError> {
        match self.u16("packet identifier")? {
            0 => Err(PacketError::Malformed("packet identifier 0")),
            id => Ok(id),
        }
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, PacketError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn varint(&mut self, what: &'static str) -> Result<usize, PacketError> {
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

    pub fn binary(&mut self, what: &'static str) -> Result<&'a [u8], PacketError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// An MQTT UTF-8 string: valid UTF-8 without U+0000 ([MQTT-1.5.3-1], -1.5.3-2).
    pub fn string(&mut self, what: &'static str) -> Result<&'a str, PacketError> {
        let bytes = self.binary(what)?;
        let text = std::str::from_utf8(bytes).map_err(|_| PacketError::InvalidUtf8)?;
        if text.contains('\0') {
            return Err(PacketError::InvalidUtf8);
        }
        Ok(text)
    }

    /// An MQTT 5 property block with its length.
    pub fn properties(&mut self, context: Context) -> Result<Properties<'a>, PacketError> {
        let len = self.varint("property length")?;
        let block = self.take(len, "properties")?;
        Properties::parse(block, context)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn end(&self, what: &'static str) -> Result<(), PacketError> {
        match self.buf.is_empty() {
            true => Ok(()),
            false => Err(PacketError::Malformed(what)),
        }
    }
}
