//! One device connection, from its first byte to its close: the CONNECT under a deadline
//! ([`super::connect`]), then one task that reads and handles every packet, writes what the
//! broker owes the device in large batches, keeps the keep-alive, and ends the session's
//! connection the way MQTT says (will, expiry, a DISCONNECT with its reason in MQTT 5).
//!
//! A malformed packet or a protocol violation closes this connection, and only this one:
//! every handler returns an error, none panics.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tracing::debug;

use super::acl::{Access, ClientRules};
use super::codec::write::{self as enc, PublishOut};
use super::codec::{
    reason, Ack, Framer, Packet, PacketError, Protocol, Publish, SubAck, Subscribe, Unsubscribe,
    PUBACK, PUBCOMP, PUBREC, PUBREL,
};
use super::connect::{self, Accepted};
use super::core::{wake_all, Ending, Wake};
use super::intake;
use super::message::{Message, Origin, OriginKind};
use super::router::{Filter, Sub};
use super::session::{Acked, Outgoing, Queued, Received, SessionKey, Signal};
use super::{Permit, Shared};
use crate::health::{add, inc};

/// Bytes waiting to be written above which the connection stops taking more messages
/// from its session's queue (they wait there, within its bounds).
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Bytes waiting to be written above which the client's packets are not read.
const OUT_READ_STOP: usize = 4 * OUT_HIGH_WATER;
/// An emptied write buffer larger than this is freed.
const OUT_KEEP: usize = 16 * 1024;
/// Topic aliases the broker uses toward one client at most (its own maximum may be lower).
const MAX_ALIASES_OUT: u16 = 64;
/// How long a closing connection may take to write its last packets.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection the broker closed waits for the client to close too.
const LINGER: Duration = Duration::from_secs(1);
/// The largest single read.
const READ_SIZE: usize = 16 * 1024;

thread_local! {
    /// Where every connection served by this thread reads into: reads can be large (few
    /// system calls), while a connection's framer keeps only the bytes that arrived.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_SIZE]);
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Close {
    #[error("closed by the client")]
    Peer,
    #[error("DISCONNECT")]
    Disconnect,
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Packet(#[from] PacketError),
    #[error("{what}")]
    Protocol { what: &'static str, reason: u8 },
    #[error("the outbox has stopped")]
    Outbox,
    #[error("told to go (MQTT 5 reason {0:#04x})")]
    Kicked(u8),
}

impl Close {
    fn protocol(what: &'static str) -> Close {
        Close::Protocol {
            what,
            reason: reason::PROTOCOL_ERROR,
        }
    }

    /// The reason code of the DISCONNECT the broker sends before closing (MQTT 5).
    fn reason(&self) -> Option<u8> {
        match self {
            Close::Packet(e) => Some(e.reason_code()),
            Close::Protocol { reason, .. } => Some(*reason),
            Close::Outbox => Some(reason::SERVER_SHUTTING_DOWN),
            Close::Kicked(reason) => Some(*reason),
            Close::Peer | Close::Disconnect | Close::Io(_) => None,
        }
    }
}

/// Serves one device connection until it ends.
/// Serves one device connection until it ends. `permit` is its place among
/// `local.max_connections`; `deadline` is when its CONNECT must have come.
pub async fn serve<S>(
    broker: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    certificate: Option<String>,
    permit: Permit,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let max_packet = broker.settings.load().max_packet;
    let mut framer = Framer::new(max_packet, broker.budget.clone());
    let mut permit = Some(permit);
    // Boxed: once the CONNECT is handled, its state is freed (an idle connection stays
    // small).
    // (A statement of its own: a temporary lives to the end of its statement, and the
    // task would keep room for the unboxed future across the await.)
    let accept = Box::pin(connect::accept(
        &broker,
        &mut reader,
        &mut writer,
        &mut framer,
        peer,
        certificate,
        deadline,
        &mut permit,
    ));
    let accepted = accept.await;
    let conn = match accepted {
        Ok(accepted) => Box::new(Connection::new(broker, accepted, peer)),
        Err(refused) => {
            broker.refused(peer, &refused);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
            return;
        }
    };
    // A task of its own: the one that read the CONNECT (with room for every state it
    // could have been in) ends here, and an idle connection keeps only this one.
    tokio::spawn(session(conn, reader, writer, framer, permit));
}

/// The connection after its CONNACK, until it ends. Everything it needs is moved in, so
/// the task holds one copy of it.
async fn session<S>(
    mut conn: Box<Connection>,
    mut reader: ReadHalf<S>,
    mut writer: WriteHalf<S>,
    mut framer: Framer,
    permit: Option<Permit>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let end = conn.run(&mut reader, &mut writer, &mut framer).await;
    drop(framer);
    let finish = Box::pin(conn.finish(&end, &mut reader, &mut writer));
    finish.await;
    drop(permit);
}

/// Reads what `reader` has ready (16 KiB at most) and hands exactly those bytes to
/// `framer`; 0 at the end of the stream. The scratch buffer is borrowed only within one
/// poll, so this is as cancel-safe as `poll_read` itself.
pub(super) async fn read_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    framer: &mut Framer,
) -> Result<usize, Close> {
    std::future::poll_fn(|cx| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(Close::Io(e))),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    Poll::Ready(framer.push(buf.filled()).map(|()| n).map_err(Close::from))
                }
            }
        })
    })
    .await
}

/// Writes some of `buf`, then flushes (TLS keeps records until flushed); how much went.
async fn write_some<W: AsyncWrite + Unpin>(writer: &mut W, buf: &[u8]) -> std::io::Result<usize> {
    let n = writer.write(buf).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    writer.flush().await?;
    Ok(n)
}

/// A PUBLISH read in this batch, routed once the batch ends.
struct Incoming {
    msg: Arc<Message>,
    packet_id: u16,
    /// A QoS 2 retransmission of a packet id awaiting PUBREL: acknowledged, not routed.
    denied: bool,
}

/// What the device is owed after the batch is in the gateway's care.
#[derive(Debug, Clone, Copy)]
struct OwedAck {
    kind: u8,
    packet_id: u16,
    reason: u8,
}

struct Connection {
    broker: Arc<Shared>,
    key: SessionKey,
    conn_id: u64,
    instance: u64,
    client_id: Arc<str>,
    username: Option<String>,
    signal: Arc<Signal>,
    protocol: Protocol,
    peer: SocketAddr,
    out: Vec<u8>,
    written: usize,
    /// The client's Maximum Packet Size.
    client_max_packet: usize,
    /// Topic aliases toward the client (MQTT 5), when it takes any.
    aliases_out: Option<Box<Aliases>>,
    /// The client's topic aliases (MQTT 5), by alias.
    aliases_in: Vec<Option<Arc<str>>>,
    alias_max_in: u16,
    receive_max_in: u16,
    /// QoS 1/2 publishes of the client that are not fully acknowledged yet.
    unacked_in: usize,
    rules: Option<Arc<ClientRules>>,
    /// Which policy `rules` were compiled from.
    rules_of: usize,
    intake: Option<Box<intake::Batch>>,
    batch: Vec<Incoming>,
    acks: Vec<OwedAck>,
    ending: Ending,
    disconnect_seen: bool,
    /// The Session Expiry Interval the client connected with.
    connected_expiry: u32,
    disconnect_expiry: Option<u32>,
    /// The session has more queued than the last delivery took (the write buffer was full).
    more: bool,
    outgoing: Vec<Outgoing>,
    gone: Vec<Queued>,
    wake: Wake,
}

/// Topic → alias for the topics this connection gave one.
#[derive(Default)]
struct Aliases {
    by_topic: std::collections::HashMap<Arc<str>, u16>,
    max: u16,
}

impl Connection {
    fn new(broker: Arc<Shared>, a: Accepted, peer: SocketAddr) -> Self {
        let aliases_out = (a.client_alias_max > 0).then(|| {
            Box::new(Aliases {
                by_topic: Default::default(),
                max: a.client_alias_max.min(MAX_ALIASES_OUT),
            })
        });
        let settings = broker.settings.load();
        let (alias_max_in, receive_max_in) = (settings.topic_alias_max, settings.receive_max);
        Connection {
            key: a.opened.key,
            conn_id: a.conn_id,
            instance: a.opened.instance,
            client_id: a.client_id,
            username: a.username,
            signal: a.signal,
            protocol: a.protocol,
            peer,
            out: Vec::new(),
            written: 0,
            client_max_packet: a.client_max_packet,
            aliases_out,
            aliases_in: Vec::new(),
            alias_max_in,
            receive_max_in,
            unacked_in: 0,
            rules: None,
            rules_of: 0,
            intake: None,
            batch: Vec::new(),
            acks: Vec::new(),
            ending: Ending::WithWill,
            disconnect_seen: false,
            connected_expiry: a.expiry,
            disconnect_expiry: None,
            more: false,
            outgoing: Vec::new(),
            gone: Vec::new(),
            wake: Vec::new(),
            broker,
        }
    }

    fn v5(&self) -> bool {
        self.protocol == Protocol::V5
    }

    async fn run<S>(
        &mut self,
        reader: &mut ReadHalf<S>,
        writer: &mut WriteHalf<S>,
        framer: &mut Framer,
    ) -> Close
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // A resumed session: what was in flight goes again first ([MQTT-4.4.0-1]).
        self.resend();
        self.deliver();
        // The CONNECT may have come with more packets behind it.
        let first = Box::pin(self.process(framer));
        if let Err(e) = first.await {
            return e;
        }
        loop {
            if let Some(reason) = self.signal.kicked() {
                return Close::Kicked(reason);
            }
            let unwritten = self.out.len() - self.written;
            let room = unwritten < OUT_HIGH_WATER;
            let pending = unwritten > 0;
            // A client that sends but does not read is not read either, past a bound.
            let readable = unwritten < OUT_READ_STOP;
            tokio::select! {
                read = read_into(reader, framer), if readable => match read {
                    Ok(0) => return Close::Peer,
                    Ok(_) => {
                        self.signal.touch();
                        // Boxed: an idle connection's task must not carry the largest
                        // state it could be in.
                        let processing = Box::pin(self.process(framer));
                        if let Err(e) = processing.await {
                            return e;
                        }
                    }
                    Err(e) => return e,
                },
                written = write_some(writer, &self.out[self.written..]), if pending => match written {
                    Ok(n) => {
                        self.written += n;
                        if self.written == self.out.len() {
                            self.out.clear();
                            self.written = 0;
                            if self.out.capacity() > OUT_KEEP {
                                self.out = Vec::new();
                            }
                            if self.more {
                                self.deliver();
                            }
                        }
                    }
                    Err(e) => return Close::Io(e),
                },
                _ = self.signal.notify.notified(), if room => self.deliver(),
            }
        }
    }

    /// Handles every whole packet in the framer, then hands the batch's publishes over and
    /// writes what is owed.
    async fn process(&mut self, framer: &mut Framer) -> Result<(), Close> {
        let result = self.handle_frames(framer);
        // What was read before a bad packet is still handled (it was valid).
        self.route_batch();
        self.hand_over().await?;
        result?;
        self.deliver();
        Ok(())
    }

    fn handle_frames(&mut self, framer: &mut Framer) -> Result<(), Close> {
        while let Some(frame) = framer.peek()? {
            let len = frame.len();
            let packet = Packet::parse(frame, self.protocol)?;
            let result = self.handle(packet);
            framer.consume(len);
            result?;
            if self.disconnect_seen {
                return Err(Close::Disconnect);
            }
        }
        Ok(())
    }

    fn handle(&mut self, packet: Packet<'_>) -> Result<(), Close> {
        if !matches!(packet, Packet::Publish(_)) {
            // Publishes are routed in order before anything that could change routing.
            self.route_batch();
        }
        match packet {
            Packet::Publish(p) => self.publish(p),
            Packet::PubAck(a) => self.puback(a.packet_id),
            Packet::PubRec(a) => self.pubrec(a),
            Packet::PubRel(a) => self.pubrel(a.packet_id),
            Packet::PubComp(a) => self.pubcomp(a.packet_id),
            Packet::Subscribe(s) => self.subscribe(s),
            Packet::Unsubscribe(u) => self.unsubscribe(u),
            Packet::PingReq => {
                self.out.extend_from_slice(&enc::PINGRESP_PACKET);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.props.session_expiry {
                    // [MQTT-3.14.2-2]
                    if self.connected_expiry == 0 && expiry != 0 {
                        return Err(Close::protocol(
                            "DISCONNECT set a session expiry interval on a session that had none",
                        ));
                    }
                    self.disconnect_expiry = Some(expiry);
                }
                self.ending = match d.reason {
                    reason::SUCCESS => Ending::Normal,
                    _ => Ending::WithWill,
                };
                self.disconnect_seen = true;
                Ok(())
            }
            Packet::Connect(_) => Err(Close::protocol("a second CONNECT")),
            Packet::Auth(_) => Err(Close::protocol(
                "AUTH without an authentication method at CONNECT",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Close::protocol("a packet only a server sends"))
            }
        }
    }

    /// The client's rules under the policy in force now (compiled again after a reload).
    fn rules(&mut self) -> Option<Arc<ClientRules>> {
        let policy = self.broker.policy.load();
        let Some(acl) = policy.acl.as_ref() else {
            self.rules = None;
            return None;
        };
        let of = Arc::as_ptr(&policy) as usize;
        if self.rules.is_none() || self.rules_of != of {
            let rules = acl.rules_for(self.username.as_deref(), &self.client_id);
            self.rules = Some(Arc::new(rules));
            self.rules_of = of;
        }
        self.rules.clone()
    }

    fn publish(&mut self, p: Publish<'_>) -> Result<(), Close> {
        if !p.props.subscription_ids.is_empty() {
            // [MQTT-3.3.4-6]: only the broker puts them in a PUBLISH.
            return Err(Close::protocol(
                "a subscription identifier in a client's PUBLISH",
            ));
        }
        let topic = self.topic_of(&p)?;
        if topic.contains(['+', '#']) {
            // [MQTT-3.3.2-2]
            return Err(Close::Protocol {
                what: "a wildcard in a PUBLISH topic",
                reason: reason::TOPIC_NAME_INVALID,
            });
        }
        if p.qos > 0 && self.v5() && self.unacked_in >= usize::from(self.receive_max_in) {
            return Err(Close::Protocol {
                what: "more QoS 1/2 publishes in flight than the broker's receive maximum",
                reason: reason::RECEIVE_MAXIMUM_EXCEEDED,
            });
        }
        let allowed = self
            .rules()
            .is_none_or(|r| r.topic_allowed(&topic, Access::Write));
        let kind = match p.qos {
            1 => Some(PUBACK),
            2 => Some(PUBREC),
            _ => None,
        };
        if !allowed {
            inc(&self.broker.health.counters.acl_denied);
            self.broker
                .log_denied(self.peer, &self.client_id, "publish", &topic);
            if let Some(kind) = kind {
                // Acknowledged as mosquitto does, so the client does not resend it. In MQTT
                // 5 a failure PUBREC ends a QoS 2 flow; a 3.1.1 client's PUBREL still gets
                // its PUBCOMP.
                let reason = if self.v5() { reason::NOT_AUTHORIZED } else { 0 };
                self.acks.push(OwedAck {
                    kind,
                    packet_id: p.packet_id,
                    reason,
                });
            }
            return Ok(());
        }
        let now = std::time::Instant::now();
        let forwarded = match self.v5() {
            true => p.props.forwarded(),
            false => Vec::new(),
        };
        let msg = Arc::new(Message {
            topic,
            payload: Bytes::copy_from_slice(p.payload),
            qos: p.qos,
            retain: p.retain,
            props: Bytes::from(forwarded),
            expires: p
                .props
                .message_expiry
                .map(|s| now + Duration::from_secs(u64::from(s))),
            origin: Origin {
                kind: OriginKind::Device,
                session: self.instance,
            },
        });
        if p.qos > 0 {
            self.unacked_in += 1;
        }
        self.batch.push(Incoming {
            msg,
            packet_id: p.packet_id,
            denied: false,
        });
        Ok(())
    }

    /// The topic of a PUBLISH, through the client's topic aliases (MQTT 5).
    fn topic_of(&mut self, p: &Publish<'_>) -> Result<Arc<str>, Close> {
        let Some(alias) = p.props.topic_alias else {
            return Ok(p.topic.into());
        };
        if alias == 0 || alias > self.alias_max_in {
            // [MQTT-3.3.2-9], [MQTT-3.3.2-10]
            return Err(Close::Protocol {
                what: "a topic alias of 0 or above the broker's topic alias maximum",
                reason: reason::TOPIC_ALIAS_INVALID,
            });
        }
        let slot = usize::from(alias) - 1;
        if !p.topic.is_empty() {
            if self.aliases_in.len() <= slot {
                self.aliases_in.resize(slot + 1, None);
            }
            let topic: Arc<str> = p.topic.into();
            self.aliases_in[slot] = Some(topic.clone());
            return Ok(topic);
        }
        match self.aliases_in.get(slot).cloned().flatten() {
            Some(topic) => Ok(topic),
            None => Err(Close::protocol("a topic alias that was never set")),
        }
    }

    /// Routes the publishes read so far, under one lock, and owes their acknowledgements.
    fn route_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        let mut routed = Vec::with_capacity(batch.len());
        {
            let mut core = self.broker.lock();
            for item in batch.iter_mut() {
                if item.msg.qos == 2 {
                    let now = std::time::Instant::now();
                    let repeated = match core.sessions.get_mut(self.key) {
                        Some(s) if s.incoming_qos2.contains(&item.packet_id) => true,
                        Some(s) => {
                            s.incoming_qos2.push(item.packet_id);
                            false
                        }
                        None => false,
                    };
                    if repeated {
                        // Already routed: [MQTT-4.3.3-?] delivered once; PUBREC again.
                        item.denied = true;
                        self.unacked_in = self.unacked_in.saturating_sub(1);
                        routed.push(0);
                        continue;
                    }
                    core.session_changed(self.key, now);
                }
                routed.push(core.route(&item.msg, None, &mut self.wake));
            }
        }
        wake_all(&mut self.wake);
        let intake = self
            .intake
            .get_or_insert_with(|| Box::new(self.broker.intake.batch()));
        for (item, deliveries) in batch.drain(..).zip(routed) {
            let taken = !item.denied && intake.offer(&item.msg);
            let kind = match item.msg.qos {
                1 => PUBACK,
                2 => PUBREC,
                _ => continue,
            };
            let reason = match deliveries == 0 && !taken && !item.denied {
                true => reason::NO_MATCHING_SUBSCRIBERS,
                false => reason::SUCCESS,
            };
            self.acks.push(OwedAck {
                kind,
                packet_id: item.packet_id,
                reason,
            });
        }
        self.batch = batch;
    }

    /// Hands the batch to the outbox, then writes the acknowledgements it owes.
    async fn hand_over(&mut self) -> Result<(), Close> {
        if let Some(intake) = self.intake.as_mut() {
            if intake.flush().await.is_err() {
                // Not in the gateway's care: not acknowledged.
                self.acks.clear();
                return Err(Close::Outbox);
            }
        }
        let v5 = self.v5();
        for ack in self.acks.drain(..) {
            enc::ack(&mut self.out, ack.kind, v5, ack.packet_id, ack.reason);
            if ack.kind == PUBACK {
                self.unacked_in = self.unacked_in.saturating_sub(1);
            }
        }
        Ok(())
    }

    fn puback(&mut self, packet_id: u16) -> Result<(), Close> {
        self.acknowledged(packet_id, 1)
    }

    fn pubcomp(&mut self, packet_id: u16) -> Result<(), Close> {
        self.acknowledged(packet_id, 2)
    }

    fn acknowledged(&mut self, packet_id: u16, qos: u8) -> Result<(), Close> {
        let mut core = self.broker.lock();
        let Some(s) = core.sessions.get_mut(self.key) else {
            return Ok(());
        };
        match s.acknowledged(packet_id, qos) {
            Acked::Done(done) => {
                core.row_gone(done.queued.row);
                Ok(())
            }
            Acked::Unknown => Ok(()),
            Acked::WrongFlow => Err(Close::protocol(
                "an acknowledgement of the wrong kind for a message in flight",
            )),
        }
    }

    fn pubrec(&mut self, a: Ack<'_>) -> Result<(), Close> {
        let v5 = self.v5();
        let mut core = self.broker.lock();
        let Some(s) = core.sessions.get_mut(self.key) else {
            return Ok(());
        };
        let client = s.client_id.clone();
        match s.received(a.packet_id, a.reason >= 0x80) {
            Received::Release => {
                let row = s
                    .inflight
                    .iter()
                    .find(|f| f.packet_id == a.packet_id)
                    .map(|f| f.queued.row);
                if let Some(row) = row.filter(|r| r.written()) {
                    core.row_updated(client, row.id);
                }
                drop(core);
                enc::ack(&mut self.out, PUBREL, v5, a.packet_id, 0);
                Ok(())
            }
            Received::Unknown => {
                drop(core);
                enc::ack(
                    &mut self.out,
                    PUBREL,
                    v5,
                    a.packet_id,
                    reason::PACKET_ID_NOT_FOUND,
                );
                Ok(())
            }
            Received::WrongQos => Err(Close::protocol("PUBREC for a QoS 1 message")),
            Received::Ended(done) => {
                core.row_gone(done.queued.row);
                Ok(())
            }
        }
    }

    fn pubrel(&mut self, packet_id: u16) -> Result<(), Close> {
        let found = {
            let mut core = self.broker.lock();
            let now = std::time::Instant::now();
            let found = match core.sessions.get_mut(self.key) {
                Some(s) => match s.incoming_qos2.iter().position(|id| *id == packet_id) {
                    Some(i) => {
                        s.incoming_qos2.swap_remove(i);
                        true
                    }
                    None => false,
                },
                None => false,
            };
            if found {
                core.session_changed(self.key, now);
            }
            found
        };
        if found {
            self.unacked_in = self.unacked_in.saturating_sub(1);
        }
        let reason = if found {
            0
        } else {
            reason::PACKET_ID_NOT_FOUND
        };
        let v5 = self.v5();
        enc::ack(&mut self.out, PUBCOMP, v5, packet_id, reason);
        Ok(())
    }

    fn subscribe(&mut self, s: Subscribe<'_>) -> Result<(), Close> {
        let v5 = self.v5();
        let id = s.props.subscription_ids.first().copied().unwrap_or(0);
        let max = self.broker.settings.load().max_subscriptions;
        let rules = self.rules();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut refused = 0u64;
        {
            let mut core = self.broker.lock();
            for (written, options) in &s.filters {
                let filter = match Filter::parse(written) {
                    Ok(filter) => filter,
                    Err(why) => {
                        debug!(client_id = %self.client_id, filter = %written, why, "subscription refused");
                        refused += 1;
                        codes.push(if v5 {
                            reason::TOPIC_FILTER_INVALID
                        } else {
                            0x80
                        });
                        continue;
                    }
                };
                if filter.is_shared() && options.no_local {
                    // [MQTT-3.8.3-4]
                    return Err(Close::protocol("No Local on a shared subscription"));
                }
                if rules.as_ref().is_some_and(|r| !r.filter_allowed(written)) {
                    refused += 1;
                    codes.push(if v5 { reason::NOT_AUTHORIZED } else { 0x80 });
                    continue;
                }
                let count = core.sessions.get(self.key).map_or(0, |s| {
                    s.subscriptions.len() - usize::from(s.subscriptions.contains(written))
                });
                if count >= max {
                    refused += 1;
                    codes.push(if v5 { reason::QUOTA_EXCEEDED } else { 0x80 });
                    continue;
                }
                let sub = Sub {
                    session: self.key,
                    options: *options,
                    id,
                };
                core.subscribe(self.key, written, filter, sub, &mut self.wake);
                codes.push(options.qos);
            }
        }
        wake_all(&mut self.wake);
        if refused > 0 {
            add(&self.broker.health.counters.subscriptions_refused, refused);
        }
        Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            props: Default::default(),
            codes: &codes,
        })
        .write(self.protocol, &mut self.out);
        Ok(())
    }

    fn unsubscribe(&mut self, u: Unsubscribe<'_>) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(u.filters.len());
        {
            let mut core = self.broker.lock();
            for filter in &u.filters {
                codes.push(match Filter::parse(filter) {
                    Err(_) => reason::TOPIC_FILTER_INVALID,
                    Ok(_) if core.unsubscribe(self.key, filter) => reason::SUCCESS,
                    Ok(_) => reason::NO_SUBSCRIPTION_EXISTED,
                });
            }
        }
        let codes: &[u8] = if self.v5() { &codes } else { &[] };
        Packet::UnsubAck(SubAck {
            packet_id: u.packet_id,
            props: Default::default(),
            codes,
        })
        .write(self.protocol, &mut self.out);
        Ok(())
    }

    /// What a resumed session had in flight, again.
    fn resend(&mut self) {
        {
            let core = self.broker.lock();
            if let Some(s) = core.sessions.get(self.key) {
                s.resend(&mut self.outgoing);
            }
        }
        self.write_outgoing();
    }

    /// Takes what the session has queued, within its window and the write buffer's
    /// room, and writes it.
    fn deliver(&mut self) {
        let now = std::time::Instant::now();
        let limit = self.client_max_packet;
        let v5 = self.v5();
        let rules = self.rules();
        let aliases = self.aliases_out.is_some();
        let mut oversize = 0u64;
        let mut allowed = |q: &Queued| {
            if largest_delivery(q, v5, aliases, now) > limit {
                // [MQTT-3.1.2-25]: discarded as if it had been sent.
                oversize += 1;
                return false;
            }
            rules
                .as_ref()
                .is_none_or(|r| r.topic_allowed(&q.msg.topic, Access::Read))
        };
        let room = OUT_HIGH_WATER.saturating_sub(self.out.len() - self.written);
        let taken = {
            let mut core = self.broker.lock();
            let Some(s) = core.sessions.get_mut(self.key) else {
                return;
            };
            if s.conn.as_ref().map(|c| c.id) != Some(self.conn_id) {
                return;
            }
            s.wake_pending = false;
            let window = usize::from(s.receive_max);
            let taken = s.take(
                window,
                room,
                now,
                &mut allowed,
                &mut self.outgoing,
                &mut self.gone,
            );
            for q in self.gone.drain(..) {
                core.row_gone(q.row);
            }
            taken
        };
        self.more = taken.more;
        let (withheld, expired) = (taken.withheld, taken.expired);
        let counters = &self.broker.health.counters;
        if oversize > 0 {
            add(&counters.withheld_oversize, oversize);
        }
        let withheld = withheld - oversize.min(withheld);
        if withheld > 0 {
            add(&counters.acl_withheld, withheld);
        }
        if expired > 0 {
            add(&counters.local_expired, expired);
        }
        self.write_outgoing();
    }

    fn write_outgoing(&mut self) {
        let now = std::time::Instant::now();
        let v5 = self.v5();
        let mut outgoing = std::mem::take(&mut self.outgoing);
        for o in outgoing.drain(..) {
            match o {
                Outgoing::PubRel(id) => enc::ack(&mut self.out, PUBREL, v5, id, 0),
                Outgoing::Publish {
                    msg,
                    qos,
                    retain,
                    dup,
                    packet_id,
                    sub_ids,
                } => {
                    let (topic, alias) = self.alias_for(&msg.topic);
                    PublishOut {
                        dup,
                        qos,
                        retain,
                        topic: if topic { &msg.topic } else { "" },
                        packet_id,
                        forwarded: &msg.props,
                        message_expiry: msg.expiry_left(now),
                        topic_alias: alias,
                        subscription_ids: sub_ids.as_slice(),
                        payload: &msg.payload,
                    }
                    .write(v5, &mut self.out);
                }
            }
        }
        self.outgoing = outgoing;
    }

    /// Whether to send the topic, and the alias to send (MQTT 5 clients that take them).
    fn alias_for(&mut self, topic: &Arc<str>) -> (bool, Option<u16>) {
        let Some(aliases) = self.aliases_out.as_mut() else {
            return (true, None);
        };
        if let Some(&alias) = aliases.by_topic.get(topic) {
            return (false, Some(alias));
        }
        let next = aliases.by_topic.len() as u16 + 1;
        if next > aliases.max {
            return (true, None);
        }
        aliases.by_topic.insert(topic.clone(), next);
        (true, Some(next))
    }

    /// Ends the connection: a last DISCONNECT (MQTT 5), the session's side of it (will,
    /// expiry), the count and the log line.
    async fn finish<S>(&mut self, end: &Close, reader: &mut ReadHalf<S>, writer: &mut WriteHalf<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ending = match end {
            Close::Disconnect => self.ending,
            Close::Kicked(reason::SERVER_SHUTTING_DOWN) | Close::Outbox => Ending::Shutdown,
            _ => Ending::WithWill,
        };
        if let (true, Some(reason)) = (self.v5(), end.reason()) {
            enc::disconnect(&mut self.out, true, reason);
        }
        let rest = &self.out[self.written..];
        if !rest.is_empty() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.write_all(rest)).await;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
        let published = {
            let mut core = self.broker.lock();
            core.close(
                self.key,
                self.conn_id,
                ending,
                self.disconnect_expiry,
                &mut self.wake,
            );
            std::mem::take(&mut core.published)
        };
        wake_all(&mut self.wake);
        self.broker.hand_over(published).await;
        self.broker.ended(self.peer, &self.client_id, end);
        if end.reason().is_some() && ending != Ending::Shutdown {
            linger(reader).await;
        }
    }
}

/// After the broker closed a connection, what the client still sends (it may not have read
/// the DISCONNECT yet) is read and dropped until it closes too, for a moment: closing at
/// once would answer its packets with a reset, and it might never see why it was closed.
async fn linger<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The bytes a delivery of `q` takes at most: exactly, but for a topic alias, which may
/// make it shorter.
fn largest_delivery(q: &Queued, v5: bool, aliases: bool, now: std::time::Instant) -> usize {
    PublishOut {
        dup: false,
        qos: q.qos,
        retain: q.retain,
        topic: &q.msg.topic,
        packet_id: 0,
        forwarded: &q.msg.props,
        message_expiry: q.msg.expiry_left(now),
        topic_alias: aliases.then_some(1),
        subscription_ids: q.sub_ids.as_slice(),
        payload: &q.msg.payload,
    }
    .size(v5)
}
