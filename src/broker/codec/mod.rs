//! MQTT 3.1, 3.1.1 and 5 packets: one framer that cuts a byte stream into whole packets
//! ([`framer`]), one parser for every packet of every version ([`read`]), every MQTT 5
//! property ([`properties`]), and the encoders ([`write`]). No I/O here.
//!
//! Everything arrives from the network: nothing is trusted and nothing panics. A packet
//! that breaks the specification is a [`PacketError`] that names the MQTT 5 reason code
//! the connection is closed with.

pub mod framer;
pub mod properties;
pub mod read;
pub mod write;

#[cfg(test)]
mod tests;

pub use framer::{Budget, Framer, Header};
pub use properties::{Context, Properties};

/// The protocol a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1 (level 3) and 3.1.1 (level 4): the same packets.
    V311,
    V5,
}

/// Largest remaining length MQTT can encode (four bytes of variable length integer).
pub const MAX_REMAINING: usize = 268_435_455;

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

/// MQTT 5 reason codes the broker sends.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_CREDENTIALS: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const SHARED_NOT_SUPPORTED: u8 = 0x9E;
    pub const WILDCARDS_NOT_SUPPORTED: u8 = 0xA2;
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The bytes do not form the packet they claim to be (0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed, but the specification forbids it (0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("remaining length field longer than 4 bytes")]
    BadLength,
    #[error("packet of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the broker's memory for unfinished packets is used up")]
    OverBudget,
    #[error("a string is not valid UTF-8 or holds U+0000")]
    InvalidUtf8,
    #[error("first packet is not CONNECT (type {0})")]
    NotConnect(u8),
    #[error("protocol level {0} is not MQTT 3.1, 3.1.1 or 5")]
    UnsupportedProtocol(u8),
    #[error("packet type {0} is reserved")]
    UnknownType(u8),
}

impl PacketError {
    /// The MQTT 5 reason code of a DISCONNECT for this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            PacketError::Protocol(_) | PacketError::NotConnect(_) => reason::PROTOCOL_ERROR,
            PacketError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            PacketError::OverBudget => reason::SERVER_BUSY,
            PacketError::UnsupportedProtocol(_) => reason::UNSUPPORTED_PROTOCOL,
            _ => reason::MALFORMED,
        }
    }
}

/// A packet, parsed once, borrowing from the bytes it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Boxed: a CONNECT comes once a connection and is the largest.
    Connect(Box<Connect<'a>>),
    ConnAck(ConnAck<'a>),
    Publish(Publish<'a>),
    PubAck(Ack<'a>),
    PubRec(Ack<'a>),
    PubRel(Ack<'a>),
    PubComp(Ack<'a>),
    Subscribe(Subscribe<'a>),
    SubAck(SubAck<'a>),
    Unsubscribe(Unsubscribe<'a>),
    UnsubAck(SubAck<'a>),
    PingReq,
    PingResp,
    Disconnect(Disconnect<'a>),
    Auth(Auth<'a>),
}

impl Packet<'_> {
    /// The packet type (1 to 15).
    pub fn kind(&self) -> u8 {
        match self {
            Packet::Connect(_) => CONNECT,
            Packet::ConnAck(_) => CONNACK,
            Packet::Publish(_) => PUBLISH,
            Packet::PubAck(_) => PUBACK,
            Packet::PubRec(_) => PUBREC,
            Packet::PubRel(_) => PUBREL,
            Packet::PubComp(_) => PUBCOMP,
            Packet::Subscribe(_) => SUBSCRIBE,
            Packet::SubAck(_) => SUBACK,
            Packet::Unsubscribe(_) => UNSUBSCRIBE,
            Packet::UnsubAck(_) => UNSUBACK,
            Packet::PingReq => PINGREQ,
            Packet::PingResp => PINGRESP,
            Packet::Disconnect(_) => DISCONNECT,
            Packet::Auth(_) => AUTH,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will<'a> {
    pub qos: u8,
    pub retain: bool,
    pub props: Properties<'a>,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// 3 (MQTT 3.1), 4 (3.1.1) or 5.
    pub level: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub props: Properties<'a>,
    pub client_id: &'a str,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

impl Connect<'_> {
    pub fn protocol(&self) -> Protocol {
        match self.level {
            5 => Protocol::V5,
            _ => Protocol::V311,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck<'a> {
    pub session_present: bool,
    /// MQTT 3.1.1 return code or MQTT 5 reason code.
    pub code: u8,
    pub props: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty in an MQTT 5 publish that names its topic by alias only.
    pub topic: &'a str,
    /// 0 at QoS 0 (a QoS 0 publish has none).
    pub packet_id: u16,
    pub props: Properties<'a>,
    pub payload: &'a [u8],
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack<'a> {
    pub packet_id: u16,
    pub reason: u8,
    pub props: Properties<'a>,
}

impl Ack<'_> {
    pub fn new(packet_id: u16) -> Self {
        Ack {
            packet_id,
            reason: reason::SUCCESS,
            props: Properties::default(),
        }
    }
}

/// A SUBSCRIBE's options for one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only for a new subscription; 2: never.
    pub retain_handling: u8,
}

impl SubOptions {
    pub fn to_byte(self) -> u8 {
        self.qos
            | (u8::from(self.no_local) << 2)
            | (u8::from(self.retain_as_published) << 3)
            | (self.retain_handling << 4)
    }

    /// The options byte as stored (checked when it was parsed).
    pub fn from_byte(byte: u8) -> Self {
        SubOptions {
            qos: byte & 0x03,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling: (byte >> 4) & 0x03,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub packet_id: u16,
    pub props: Properties<'a>,
    pub filters: Vec<(&'a str, SubOptions)>,
}

/// SUBACK, and UNSUBACK (MQTT 3.1.1's has no codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck<'a> {
    pub packet_id: u16,
    pub props: Properties<'a>,
    pub codes: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    pub packet_id: u16,
    pub props: Properties<'a>,
    pub filters: Vec<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect<'a> {
    pub reason: u8,
    pub props: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth<'a> {
    pub reason: u8,
    pub props: Properties<'a>,
}
