//! Where the front door's consumers of spliced packets plug in.
//!
//! The front door frames and parses every packet between a device and rumqttd once, then
//! hands it to a chain of [`Hook`]s: packets from the device go through the chain in
//! order, packets from the broker in reverse order (the hook nearest the broker sees them
//! first), like layers of middleware. Each hook may let a packet pass, drop it, or replace
//! it (the next hook sees the replacement), and may answer either side. The ACL gate is
//! one hook; bookkeeping of sessions and retained messages plugs in beside it, behind the
//! same parser.

use bytes::Bytes;

use super::packet::{Packet, PacketError, Protocol};

/// What the connection is, once its CONNECT was accepted.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    pub protocol: Protocol,
    pub client_id: String,
    /// The authenticated user (from the CONNECT or the TLS certificate); None: anonymous.
    pub username: Option<String>,
    pub clean_start: bool,
    /// MQTT 5's session expiry interval in seconds (None for MQTT 3.1.1).
    pub session_expiry: Option<u32>,
    /// The will rumqttd publishes when the connection ends without a DISCONNECT.
    pub will: Option<WillInfo>,
    /// MQTT 5: QoS 1/2 deliveries the client takes unacknowledged (None: no limit given).
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client takes (None: no limit given).
    pub maximum_packet_size: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct WillInfo {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// What becomes of one packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Replace(Bytes),
    /// The connection must end (a protocol error the parser alone cannot see).
    Close(String),
}

/// Packets a hook sends on its own, at packet boundaries.
#[derive(Debug, Default)]
pub struct Replies {
    pub to_device: Vec<Bytes>,
    pub to_broker: Vec<Bytes>,
}

/// One consumer of the spliced packets of one connection.
pub trait Hook: Send {
    fn device_packet(&mut self, packet: &Packet<'_>, replies: &mut Replies) -> Verdict;
    fn broker_packet(&mut self, packet: &Packet<'_>, replies: &mut Replies) -> Verdict;
    /// The connection ended (either side closed it, or the front door did).
    fn closed(&mut self) {}
}

/// Makes the hook of each new connection (None: this consumer has no business with it).
pub trait HookFactory: Send + Sync {
    fn open(&self, conn: &ConnInfo) -> Option<Box<dyn Hook>>;
}

/// The hooks of one connection, in order from the device to the broker.
pub struct Chain {
    protocol: Protocol,
    hooks: Vec<Box<dyn Hook>>,
}

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromDevice,
    FromBroker,
}

impl Chain {
    pub fn new(protocol: Protocol, hooks: Vec<Box<dyn Hook>>) -> Self {
        Chain { protocol, hooks }
    }

    /// Runs `frame` through the chain; the final verdict, with every hook's replies added
    /// to `replies`. A replacement that does not parse is the hook's bug: it is refused
    /// as malformed rather than sent.
    pub fn run(
        &mut self,
        direction: Direction,
        frame: &[u8],
        replies: &mut Replies,
    ) -> Result<Verdict, PacketError> {
        if self.hooks.is_empty() {
            Packet::parse(frame, self.protocol)?;
            return Ok(Verdict::Pass);
        }
        // Parsed once, and again only after a hook replaced the packet.
        let n = self.hooks.len();
        let (mut start, mut replaced): (usize, Option<Bytes>) = (0, None);
        loop {
            let owned = replaced.clone();
            let packet = Packet::parse(owned.as_deref().unwrap_or(frame), self.protocol)?;
            let mut next = None;
            for i in start..n {
                let hook = match direction {
                    Direction::FromDevice => &mut self.hooks[i],
                    Direction::FromBroker => &mut self.hooks[n - 1 - i],
                };
                let verdict = match direction {
                    Direction::FromDevice => hook.device_packet(&packet, replies),
                    Direction::FromBroker => hook.broker_packet(&packet, replies),
                };
                match verdict {
                    Verdict::Pass => {}
                    Verdict::Drop => return Ok(Verdict::Drop),
                    Verdict::Close(why) => return Ok(Verdict::Close(why)),
                    Verdict::Replace(bytes) => {
                        next = Some((i + 1, bytes));
                        break;
                    }
                }
            }
            match next {
                None => return Ok(replaced.map_or(Verdict::Pass, Verdict::Replace)),
                Some((i, bytes)) => (start, replaced) = (i, Some(bytes)),
            }
        }
    }

    /// Tells every hook that the connection ended.
    pub fn closed(&mut self) {
        for hook in &mut self.hooks {
            hook.closed();
        }
    }
}
