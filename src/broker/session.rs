//! A session: what the broker keeps for one client id between its connections (MQTT
//! 3.1.1 clean session 0, MQTT 5 a session expiry interval) or for one connection only.
//! Its subscriptions, the messages queued for it, the ones in flight to it (both QoS 2
//! directions), its will and its expiry. Sessions live in [`Sessions`], owned by the
//! broker's core; a connection reaches its session by [`SessionKey`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use super::codec::SubOptions;
use super::message::{Message, SubIds, Token};

/// Where a session sits in [`Sessions`]; the generation tells a reused slot apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    index: u32,
    generation: u32,
}

impl SessionKey {
    pub fn new(index: u32, generation: u32) -> Self {
        SessionKey { index, generation }
    }

    pub fn index(self) -> u32 {
        self.index
    }
}

/// The sessions, in slots that are reused.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Boxed: the slots grow by doubling, and an empty one costs little.
    slots: Vec<(u32, Option<Box<Session>>)>,
    free: Vec<u32>,
    len: usize,
}

impl Sessions {
    pub fn insert(&mut self, session: Session) -> SessionKey {
        self.len += 1;
        match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.0 = slot.0.wrapping_add(1);
                slot.1 = Some(Box::new(session));
                SessionKey::new(index, slot.0)
            }
            None => {
                self.slots.push((0, Some(Box::new(session))));
                SessionKey::new(self.slots.len() as u32 - 1, 0)
            }
        }
    }

    pub fn get(&self, key: SessionKey) -> Option<&Session> {
        match self.slots.get(key.index as usize) {
            Some((generation, Some(s))) if *generation == key.generation => Some(s),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        match self.slots.get_mut(key.index as usize) {
            Some((generation, Some(s))) if *generation == key.generation => Some(s),
            _ => None,
        }
    }

    pub fn remove(&mut self, key: SessionKey) -> Option<Session> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.0 != key.generation {
            return None;
        }
        let session = slot.1.take()?;
        self.free.push(key.index);
        self.len -= 1;
        Some(*session)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (SessionKey, &Session)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, (g, s))| s.as_deref().map(|s| (SessionKey::new(i as u32, *g), s)))
    }

    pub fn keys(&self) -> Vec<SessionKey> {
        self.iter().map(|(k, _)| k).collect()
    }
}

/// How a connection is told that something is waiting for it, or that it must go; and
/// how the broker's housekeeping sees that it went silent (its keep alive).
#[derive(Debug, Default)]
pub struct Signal {
    pub notify: Notify,
    /// 0, or the MQTT 5 reason code of the DISCONNECT the connection must end with.
    kick: AtomicU8,
    /// 1.5 times the client's keep alive, in ms (0: none).
    silence_ms: AtomicU64,
    /// When a packet last came, in ms of the process's monotonic clock.
    last_read_ms: AtomicU64,
}

/// Milliseconds since the process started (monotonic).
fn now_ms() -> u64 {
    crate::health::process_start().elapsed().as_millis() as u64
}

impl Signal {
    /// The signal of a connection whose client asked for `keep_alive` seconds.
    pub fn with_keep_alive(keep_alive: u16) -> Signal {
        let signal = Signal::default();
        signal
            .silence_ms
            .store(u64::from(keep_alive) * 1500, Ordering::Relaxed);
        signal.touch();
        signal
    }

    /// A packet came.
    pub fn touch(&self) {
        self.last_read_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the client was silent longer than 1.5 times its keep alive
    /// ([MQTT-3.1.2-24]).
    pub fn silent(&self) -> bool {
        let silence = self.silence_ms.load(Ordering::Relaxed);
        silence > 0 && now_ms().saturating_sub(self.last_read_ms.load(Ordering::Relaxed)) > silence
    }

    pub fn kick(&self, reason: u8) {
        let _ = self
            .kick
            .compare_exchange(0, reason, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }

    pub fn kicked(&self) -> Option<u8> {
        match self.kick.load(Ordering::Acquire) {
            0 => None,
            reason => Some(reason),
        }
    }
}

/// The connection a session is served by now.
#[derive(Debug, Clone)]
pub struct ConnLink {
    pub id: u64,
    pub signal: Arc<Signal>,
}

/// Whether a message for a persistent session is in `state.db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// In memory only; written once it is `commit_interval` old.
    Memory,
    /// In a commit under way.
    Writing,
    OnDisk,
}

/// A queued or in-flight message's row in `state.db` (id 0: not kept, the session is not
/// persistent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub id: u64,
    pub state: RowState,
}

impl Row {
    pub const NONE: Row = Row {
        id: 0,
        state: RowState::Memory,
    };

    pub fn kept(&self) -> bool {
        self.id != 0
    }

    /// On disk, or about to be: an acknowledgement must delete it.
    pub fn written(&self) -> bool {
        self.id != 0 && self.state != RowState::Memory
    }
}

#[derive(Debug)]
pub struct Queued {
    pub msg: Arc<Message>,
    /// The QoS it goes out with (the lower of the message's and the subscription's).
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: SubIds,
    /// Part of an in-process publisher's hand-off.
    pub token: Option<Token>,
    pub row: Row,
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
pub struct Inflight {
    pub packet_id: u16,
    /// Which assignment of packet ids this was (for telling a reused id apart).
    pub seq: u64,
    pub queued: Queued,
    pub stage: Stage,
}

/// What a connection writes for its session.
#[derive(Debug)]
pub enum Outgoing {
    Publish {
        msg: Arc<Message>,
        qos: u8,
        retain: bool,
        dup: bool,
        packet_id: u16,
        sub_ids: SubIds,
    },
    PubRel(u16),
}

/// A session's subscriptions: filter as the client wrote it, its options and subscription
/// identifier. Most devices have one or two, so a plain list (one small allocation).
#[derive(Debug, Default)]
pub struct Subscriptions(Vec<(Box<str>, SubOptions, u32)>);

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, filter: &str) -> bool {
        self.0.iter().any(|(f, ..)| &**f == filter)
    }

    /// Adds or replaces the subscription to `filter`.
    pub fn insert(&mut self, filter: &str, options: SubOptions, id: u32) {
        match self.0.iter_mut().find(|(f, ..)| &**f == filter) {
            Some(entry) => (entry.1, entry.2) = (options, id),
            None => self.0.push((filter.into(), options, id)),
        }
    }

    /// Whether there was one.
    pub fn remove(&mut self, filter: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(f, ..)| &**f != filter);
        self.0.len() != before
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, SubOptions, u32)> {
        self.0.iter().map(|(f, o, id)| (&**f, *o, *id))
    }
}

/// A will as the session keeps it until it is published or dropped.
#[derive(Debug, Clone)]
pub struct StoredWill {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: Bytes,
    /// Will Delay Interval, seconds.
    pub delay: u32,
    /// Message Expiry Interval of the will, seconds.
    pub expiry: Option<u32>,
}

/// Device sessions have connections; internal ones are the gateway's own subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Device,
    Internal,
}

/// Session expiry interval meaning "never" (MQTT 3.1.1 clean session 0).
pub const NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    /// Unique for every session the broker ever made: the origin of its messages.
    pub instance: u64,
    pub kind: SessionKind,
    /// Protocol level of its last connection (3, 4 or 5).
    pub level: u8,
    /// Session Expiry Interval in seconds: 0 ends with the connection.
    pub expiry: u32,
    /// Filters as the client wrote them.
    pub subscriptions: Subscriptions,
    pub queue: VecDeque<Queued>,
    pub inflight: VecDeque<Inflight>,
    /// Packet ids of QoS 2 publishes from the client awaiting PUBREL.
    pub incoming_qos2: Vec<u16>,
    pub conn: Option<ConnLink>,
    /// Boxed: most sessions have none.
    pub will: Option<Box<StoredWill>>,
    /// When a will waiting for its delay is published.
    pub will_at: Option<Instant>,
    pub offline_since: Option<Instant>,
    /// When the offline session ends (None: never, or online).
    pub expires_at: Option<Instant>,
    /// The client's Receive Maximum (within the broker's own cap).
    pub receive_max: u16,
    next_packet_id: u16,
    assigned: u64,
    pub queued_bytes: usize,
    queued_qos0: usize,
    /// Messages dropped because the queue was full, since the session began.
    pub dropped: u64,
    /// Its connection was told about new messages and has not looked yet.
    pub wake_pending: bool,
    /// Fingerprint of its row as last written to `state.db`.
    pub stored: u64,
}

/// What a PUBACK or PUBCOMP meant.
#[derive(Debug)]
pub enum Acked {
    Done(Inflight),
    /// Not in flight (a repeated acknowledgement): nothing to do.
    Unknown,
    /// The packet id is in flight at another stage or QoS: a protocol error.
    WrongFlow,
}

/// What a PUBREC meant.
#[derive(Debug)]
pub enum Received {
    /// PUBREL is owed (again, for a repeated PUBREC).
    Release,
    /// Not in flight: MQTT 5 answers PUBREL with 0x92.
    Unknown,
    /// The packet id is a QoS 1 message's: a protocol error.
    WrongQos,
    /// A failure reason code: the message is done, no PUBREL.
    Ended(Inflight),
}

/// What [`Session::take`] did besides taking.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Not allowed to the client (dropped).
    pub withheld: u64,
    pub expired: u64,
    /// Stopped for room: more is queued.
    pub more: bool,
}

/// What [`Session::enqueue`] did.
#[derive(Debug)]
pub enum Enqueued {
    Queued,
    /// Over the bounds: this message (the new one, or an older one) was dropped.
    Dropped(Queued),
}

impl Session {
    pub fn new(client_id: Arc<str>, instance: u64, kind: SessionKind, level: u8) -> Self {
        Session {
            client_id,
            instance,
            kind,
            level,
            expiry: 0,
            subscriptions: Subscriptions::default(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            incoming_qos2: Vec::new(),
            conn: None,
            will: None,
            will_at: None,
            offline_since: None,
            expires_at: None,
            receive_max: u16::MAX,
            next_packet_id: 0,
            assigned: 0,
            queued_bytes: 0,
            queued_qos0: 0,
            dropped: 0,
            wake_pending: false,
            stored: 0,
        }
    }

    /// A packet id restored in flight: ids handed out from now on are checked against it.
    pub fn restore_packet_id(&mut self, id: u16) {
        self.next_packet_id = self.next_packet_id.max(id);
        self.assigned = self.assigned.max(65_535);
    }

    pub fn online(&self) -> bool {
        self.conn.is_some()
    }

    /// Kept in `state.db`: a device session that outlives its connection.
    pub fn persistent(&self) -> bool {
        self.kind == SessionKind::Device && self.expiry > 0
    }

    /// Whether a shared subscription's message is best sent here now.
    pub fn has_room(&self) -> bool {
        self.online() && self.inflight.len() < usize::from(self.receive_max)
    }

    /// Queues a message, within `max_messages` and `max_bytes`: when full, a QoS 0
    /// message is dropped first (the new one, or the oldest queued), else the oldest.
    pub fn enqueue(&mut self, item: Queued, max_messages: usize, max_bytes: usize) -> Enqueued {
        let weight = item.msg.weight();
        let full = |s: &Session, extra: usize| {
            s.queue.len() + 1 > max_messages || s.queued_bytes + extra > max_bytes
        };
        if full(self, weight) && item.qos == 0 {
            self.dropped += 1;
            return Enqueued::Dropped(item);
        }
        let mut dropped = None;
        while full(self, weight) && !self.queue.is_empty() {
            let victim = match self.queued_qos0 {
                0 => self.queue.pop_front(),
                _ => self
                    .queue
                    .iter()
                    .position(|q| q.qos == 0)
                    .and_then(|i| self.queue.remove(i)),
            };
            let Some(victim) = victim else { break };
            self.forget(&victim);
            self.dropped += 1;
            // Only one is reported; more than one goes only when a large message came.
            dropped.get_or_insert(victim);
        }
        if full(self, weight) {
            self.dropped += 1;
            return Enqueued::Dropped(item);
        }
        self.queued_bytes += weight;
        if item.qos == 0 {
            self.queued_qos0 += 1;
        }
        self.queue.push_back(item);
        match dropped {
            Some(victim) => Enqueued::Dropped(victim),
            None => Enqueued::Queued,
        }
    }

    /// Bookkeeping of a message leaving the queue.
    fn forget(&mut self, q: &Queued) {
        self.queued_bytes = self.queued_bytes.saturating_sub(q.msg.weight());
        if q.qos == 0 {
            self.queued_qos0 = self.queued_qos0.saturating_sub(1);
        }
    }

    /// The next packet id not in flight.
    fn next_packet_id(&mut self) -> (u16, u64) {
        loop {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            self.assigned += 1;
            let id = self.next_packet_id;
            // Ids are handed out in turn, so one can only be in use still if the oldest
            // message in flight was sent 65,535 assignments ago.
            let may_collide = self
                .inflight
                .front()
                .is_some_and(|f| f.seq + 65_535 <= self.assigned);
            if !may_collide || !self.inflight.iter().any(|f| f.packet_id == id) {
                return (id, self.assigned);
            }
        }
    }

    /// Moves queued messages out to be written, within the in-flight window and about
    /// `room` bytes: QoS 0 ones leave the queue, QoS 1/2 ones go in flight. `allowed`
    /// withholds what the client may not get (an ACL, its maximum packet size); expired
    /// messages are dropped. What left the queue without being sent is put in `gone`.
    pub fn take(
        &mut self,
        window: usize,
        room: usize,
        now: Instant,
        allowed: &mut dyn FnMut(&Queued) -> bool,
        out: &mut Vec<Outgoing>,
        gone: &mut Vec<Queued>,
    ) -> Taken {
        let mut taken = Taken::default();
        let mut bytes = 0usize;
        while let Some(front) = self.queue.front() {
            if front.qos > 0 && self.inflight.len() >= window {
                break;
            }
            if bytes > 0 && bytes + front.msg.weight() > room {
                taken.more = true;
                break;
            }
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            self.forget(&q);
            if q.msg.expired(now) {
                taken.expired += 1;
                gone.push(q);
                continue;
            }
            if !allowed(&q) {
                taken.withheld += 1;
                gone.push(q);
                continue;
            }
            bytes += q.msg.weight();
            if q.qos == 0 {
                out.push(Outgoing::Publish {
                    msg: q.msg.clone(),
                    qos: 0,
                    retain: q.retain,
                    dup: false,
                    packet_id: 0,
                    sub_ids: q.sub_ids.clone(),
                });
                gone.push(q);
                continue;
            }
            let (packet_id, seq) = self.next_packet_id();
            out.push(Outgoing::Publish {
                msg: q.msg.clone(),
                qos: q.qos,
                retain: q.retain,
                dup: false,
                packet_id,
                sub_ids: q.sub_ids.clone(),
            });
            self.inflight.push_back(Inflight {
                packet_id,
                seq,
                queued: q,
                stage: Stage::Sent,
            });
        }
        taken
    }

    /// Everything in flight again, as a resumed session must send it ([MQTT-4.4.0-1]):
    /// PUBLISH with DUP set, or PUBREL.
    pub fn resend(&self, out: &mut Vec<Outgoing>) {
        for f in &self.inflight {
            out.push(match f.stage {
                Stage::Sent => Outgoing::Publish {
                    msg: f.queued.msg.clone(),
                    qos: f.queued.qos,
                    retain: f.queued.retain,
                    dup: true,
                    packet_id: f.packet_id,
                    sub_ids: f.queued.sub_ids.clone(),
                },
                Stage::Released => Outgoing::PubRel(f.packet_id),
            });
        }
    }

    fn find(&self, packet_id: u16) -> Option<usize> {
        self.inflight.iter().position(|f| f.packet_id == packet_id)
    }

    /// The client acknowledged `packet_id`: PUBACK (`qos` 1) or PUBCOMP (`qos` 2,
    /// released).
    pub fn acknowledged(&mut self, packet_id: u16, qos: u8) -> Acked {
        let Some(i) = self.find(packet_id) else {
            return Acked::Unknown;
        };
        let f = &self.inflight[i];
        let expected = match qos {
            1 => f.queued.qos == 1,
            _ => f.queued.qos == 2 && f.stage == Stage::Released,
        };
        if !expected {
            return Acked::WrongFlow;
        }
        match self.inflight.remove(i) {
            Some(f) => Acked::Done(f),
            None => Acked::Unknown,
        }
    }

    /// PUBREC for `packet_id`.
    pub fn received(&mut self, packet_id: u16, failed: bool) -> Received {
        let Some(i) = self.find(packet_id) else {
            return Received::Unknown;
        };
        if self.inflight[i].queued.qos != 2 {
            return Received::WrongQos;
        }
        if failed {
            return match self.inflight.remove(i) {
                Some(f) => Received::Ended(f),
                None => Received::Unknown,
            };
        }
        self.inflight[i].stage = Stage::Released;
        Received::Release
    }

    /// Messages queued and in flight.
    pub fn backlog(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// Drops every hand-off token: the session keeps the messages (offline, persistent),
    /// so in-process publishers' hand-offs are complete.
    pub fn release_tokens(&mut self) {
        for q in self.queue.iter_mut() {
            q.token = None;
        }
        for f in self.inflight.iter_mut() {
            f.queued.token = None;
        }
    }

    /// Takes every queued message at once (an in-process subscriber's batch).
    pub fn drain_queue(&mut self) -> std::collections::vec_deque::Drain<'_, Queued> {
        self.queued_bytes = 0;
        self.queued_qos0 = 0;
        self.queue.drain(..)
    }

    /// QoS 0 messages are not kept for an offline session.
    pub fn drop_qos0(&mut self) -> usize {
        let before = self.queue.len();
        self.queue.retain(|q| q.qos > 0);
        self.queued_qos0 = 0;
        self.queued_bytes = self.queue.iter().map(|q| q.msg.weight()).sum();
        before - self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::{Origin, OriginKind};

    fn queued(n: usize, qos: u8) -> Queued {
        Queued {
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from(n.to_string()),
                qos,
                retain: false,
                props: Bytes::new(),
                expires: None,
                origin: Origin::of(OriginKind::Device),
            }),
            qos,
            retain: false,
            sub_ids: SubIds::None,
            token: None,
            row: Row::NONE,
        }
    }

    fn payloads(s: &Session) -> Vec<String> {
        s.queue
            .iter()
            .map(|q| String::from_utf8_lossy(&q.msg.payload).into_owned())
            .collect()
    }

    #[test]
    fn a_full_queue_drops_qos_0_first_then_the_oldest() {
        let mut s = Session::new("c".into(), 1, SessionKind::Device, 4);
        for (n, qos) in [(1, 1), (2, 0), (3, 1)] {
            assert!(matches!(
                s.enqueue(queued(n, qos), 3, 1000),
                Enqueued::Queued
            ));
        }
        assert!(matches!(
            s.enqueue(queued(4, 0), 3, 1000),
            Enqueued::Dropped(_)
        ));
        assert!(
            matches!(s.enqueue(queued(5, 1), 3, 1000), Enqueued::Dropped(q) if &q.msg.payload[..] == b"2")
        );
        assert_eq!(payloads(&s), ["1", "3", "5"]);
        assert!(
            matches!(s.enqueue(queued(6, 1), 3, 1000), Enqueued::Dropped(q) if &q.msg.payload[..] == b"1")
        );
        assert_eq!(payloads(&s), ["3", "5", "6"]);
        assert_eq!(s.dropped, 3);
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_acks_free_it() {
        let mut s = Session::new("c".into(), 1, SessionKind::Device, 4);
        for n in 0..5 {
            s.enqueue(queued(n, 1), 100, 10_000);
        }
        let (mut out, mut gone) = (Vec::new(), Vec::new());
        s.take(
            2,
            usize::MAX,
            Instant::now(),
            &mut |_| true,
            &mut out,
            &mut gone,
        );
        assert_eq!((out.len(), s.inflight.len(), s.queue.len()), (2, 2, 3));
        let ids: Vec<u16> = s.inflight.iter().map(|f| f.packet_id).collect();
        assert_eq!(ids, [1, 2]);
        assert!(matches!(s.acknowledged(2, 1), Acked::Done(_)));
        assert!(matches!(s.acknowledged(2, 1), Acked::Unknown));
        assert!(matches!(s.acknowledged(1, 2), Acked::WrongFlow));
        out.clear();
        s.take(
            2,
            usize::MAX,
            Instant::now(),
            &mut |_| true,
            &mut out,
            &mut gone,
        );
        assert_eq!(
            s.inflight.iter().map(|f| f.packet_id).collect::<Vec<_>>(),
            [1, 3]
        );
        out.clear();
        s.resend(&mut out);
        assert!(matches!(
            out[0],
            Outgoing::Publish {
                dup: true,
                packet_id: 1,
                ..
            }
        ));
    }

    #[test]
    fn packet_ids_skip_one_still_in_flight_after_wrapping() {
        let mut s = Session::new("c".into(), 1, SessionKind::Device, 4);
        s.enqueue(queued(0, 1), 10, 10_000);
        let (mut out, mut gone) = (Vec::new(), Vec::new());
        s.take(
            10,
            usize::MAX,
            Instant::now(),
            &mut |_| true,
            &mut out,
            &mut gone,
        );
        assert_eq!(s.inflight[0].packet_id, 1);
        // 65,534 more messages go out and are acknowledged while id 1 stays in flight.
        for _ in 0..65_534 {
            s.enqueue(queued(1, 1), 10, 10_000);
            out.clear();
            s.take(
                10,
                usize::MAX,
                Instant::now(),
                &mut |_| true,
                &mut out,
                &mut gone,
            );
            let id = s.inflight[1].packet_id;
            assert!(matches!(s.acknowledged(id, 1), Acked::Done(_)));
        }
        s.enqueue(queued(2, 1), 10, 10_000);
        out.clear();
        s.take(
            10,
            usize::MAX,
            Instant::now(),
            &mut |_| true,
            &mut out,
            &mut gone,
        );
        assert_eq!(s.inflight[1].packet_id, 2);
    }
}
