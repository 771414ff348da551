//! The state's hook in the front door: what each connection tells the state's owner, and
//! what it does in rumqttd's place.
//!
//! - Every PUBLISH that reaches rumqttd (after the ACL) updates the retained set and is
//!   recorded for the persistent sessions it is queued for, before rumqttd sees it.
//! - A persistent session's SUBSCRIBE (with rumqttd's SUBACK), UNSUBSCRIBE and the
//!   device's acknowledgements of rumqttd's deliveries are reported, so the owner knows
//!   its subscriptions and can forget what was delivered.
//! - When a device resumes its session, the messages queued for it before the last restart
//!   (which rumqttd never had) are sent right after the CONNACK, as QoS 1/2 publishes with
//!   packet ids rumqttd never uses (it uses 1 to 100), within the device's receive
//!   maximum; the device's acknowledgements of them are answered here.
//! - rumqttd sends a retained message at the subscription's QoS; the hook sends one
//!   retained at QoS 0 at QoS 0, acknowledging rumqttd itself in order (rumqttd drops a
//!   client that acknowledges out of order).
//! - MQTT 5: a delivery larger than the device's maximum packet size is withheld.
//! - A connection that ends without DISCONNECT makes rumqttd publish its will: recorded
//!   like any publish.
//! - MQTT 5 topic aliases from a device are resolved here: rumqttd gets the topic.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use super::{key, Event, Replay, Shared};
use crate::broker::acl::{Access, ClientRules};
use crate::broker::hook::{ConnInfo, Hook, HookFactory, Replies, Verdict};
use crate::broker::packet::{self, Packet, Protocol, Publish};
use crate::broker::policy::SharedPolicy;
use crate::health::inc;

/// Packet ids of the messages the hook sends itself; rumqttd's are 1 to 100.
const OWN_IDS: std::ops::RangeInclusive<u16> = 0x8000..=0xFFFF;
/// Messages of an earlier run in flight to a device at once (MQTT 3.1.1 has no receive
/// maximum; rumqttd itself keeps 100 in flight).
const REPLAY_WINDOW: usize = 100;
/// rumqttd's deliveries tracked per connection at most (it keeps 100 in flight).
const MAX_OUTSTANDING: usize = 256;

pub(crate) struct Hooks {
    pub shared: Arc<Shared>,
    pub policy: SharedPolicy,
}

/// The device's session outlives the connection.
pub fn persistent(conn: &ConnInfo) -> bool {
    match conn.protocol {
        Protocol::V311 => !conn.clean_start,
        Protocol::V5 => conn.session_expiry.unwrap_or(0) > 0,
    }
}

impl HookFactory for Hooks {
    fn open(&self, conn: &ConnInfo) -> Option<Box<dyn Hook>> {
        let persistent = persistent(conn);
        let id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let client: Arc<str> = conn.client_id.as_str().into();
        self.shared.send(Event::Connected {
            conn: id,
            client: client.clone(),
            protocol: conn.protocol,
            persistent,
            clean: conn.clean_start,
            expiry: conn
                .session_expiry
                .filter(|_| conn.protocol == Protocol::V5),
        });
        let window = match conn.receive_maximum {
            Some(max) => usize::from(max).clamp(1, REPLAY_WINDOW),
            None => REPLAY_WINDOW,
        };
        Some(Box::new(Tracker {
            shared: self.shared.clone(),
            policy: self.policy.clone(),
            conn: conn.clone(),
            client,
            id,
            persistent,
            resumes: persistent && !conn.clean_start,
            aliases: HashMap::new(),
            subscribing: HashMap::new(),
            outstanding: VecDeque::new(),
            our_pubrels: HashSet::new(),
            injected: HashMap::new(),
            releasing: HashSet::new(),
            waiting: VecDeque::new(),
            rules: None,
            rules_of: 0,
            next_id: *OWN_IDS.start(),
            window,
            disconnected: false,
            scratch: Vec::new(),
        }))
    }
}

/// A QoS 1/2 delivery of rumqttd, until the device acknowledged it.
/// SUBSCRIBEs of one connection awaiting rumqttd's SUBACK that are followed.
const MAX_SUBSCRIBING: usize = 64;

#[derive(Debug)]
struct Outstanding {
    packet_id: u16,
    qos: u8,
    /// For a persistent session: which recorded message it is.
    key: Option<u64>,
    /// The hook acknowledges it (the device got it at a lower QoS, or not at all).
    ours: bool,
}

struct Tracker {
    shared: Arc<Shared>,
    policy: SharedPolicy,
    conn: ConnInfo,
    client: Arc<str>,
    id: u64,
    persistent: bool,
    /// The device asked to go on with its session.
    resumes: bool,
    aliases: HashMap<u16, String>,
    /// Filters of a SUBSCRIBE by packet id, until rumqttd's SUBACK.
    subscribing: HashMap<u16, Vec<(String, u8)>>,
    outstanding: VecDeque<Outstanding>,
    /// rumqttd's PUBRELs for QoS 2 deliveries the hook acknowledged.
    our_pubrels: HashSet<u16>,
    /// Packets the hook sent the device itself, by packet id: Some(id) for a replay.
    injected: HashMap<u16, Option<i64>>,
    /// QoS 2 injected messages whose PUBREL was sent: the device's PUBCOMP is ours.
    releasing: HashSet<u16>,
    /// Messages of an earlier run not sent yet.
    waiting: VecDeque<Replay>,
    /// The device's read rules (None: no ACL file), compiled when first needed, and again
    /// when a reload changed the policy (`rules_of`: the policy they come from).
    rules: Option<Option<ClientRules>>,
    rules_of: usize,
    next_id: u16,
    window: usize,
    disconnected: bool,
    scratch: Vec<(Arc<str>, u8)>,
}

impl Tracker {
    fn protocol(&self) -> Protocol {
        self.conn.protocol
    }

    /// The topic of a device's publish, resolving MQTT 5 topic aliases (the gate has
    /// already closed connections that misuse them).
    fn topic<'p>(&'p mut self, publish: &'p Publish<'p>) -> Option<&'p str> {
        let Some(alias) = publish.topic_alias else {
            return Some(publish.topic);
        };
        if publish.topic.is_empty() {
            return self.aliases.get(&alias).map(String::as_str);
        }
        self.aliases.insert(alias, publish.topic.to_owned());
        Some(publish.topic)
    }

    fn device_publish(&mut self, publish: &Publish<'_>) -> Verdict {
        let (qos, retain, payload) = (publish.qos, publish.retain, publish.payload);
        let aliased = publish.topic_alias.is_some();
        // The common case costs one check: telemetry that no persistent session takes.
        if !aliased
            && !retain
            && !payload.is_empty()
            && (qos == 0 || self.shared.filters.load().is_empty())
        {
            return Verdict::Pass;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let shared = self.shared.clone();
        let protocol = self.protocol();
        let verdict = match self.topic(publish) {
            Some(topic) => {
                shared.published(topic, payload, qos, retain, &mut scratch);
                match aliased {
                    true => resolved(publish, topic, protocol),
                    false => Verdict::Pass,
                }
            }
            None => Verdict::Pass,
        };
        self.scratch = scratch;
        verdict
    }

    fn own_id(&mut self) -> Option<u16> {
        for _ in OWN_IDS {
            let id = self.next_id;
            self.next_id = if id == *OWN_IDS.end() {
                *OWN_IDS.start()
            } else {
                id + 1
            };
            if !self.injected.contains_key(&id) && !self.releasing.contains(&id) {
                return Some(id);
            }
        }
        None
    }

    /// The acknowledgement the hook owes rumqttd for delivery `packet_id` at `qos`.
    fn our_ack(&mut self, packet_id: u16, qos: u8) -> Bytes {
        let kind = if qos == 2 {
            self.our_pubrels.insert(packet_id);
            packet::PUBREC
        } else {
            packet::PUBACK
        };
        Bytes::from(packet::ack(kind, self.protocol(), packet_id, 0))
    }

    /// Takes over the acknowledgement of rumqttd's delivery `packet_id`: at once when
    /// nothing is outstanding before it, else in its turn.
    fn take_over(&mut self, packet_id: u16, qos: u8, replies: &mut Replies) {
        if self.outstanding.is_empty() {
            let ack = self.our_ack(packet_id, qos);
            replies.to_broker.push(ack);
        } else {
            self.outstanding.push_back(Outstanding {
                packet_id,
                qos,
                key: None,
                ours: true,
            });
        }
    }

    /// Acknowledgements the hook owes that are next in rumqttd's order.
    fn flush_ours(&mut self, replies: &mut Replies) {
        while self.outstanding.front().is_some_and(|o| o.ours) {
            if let Some(o) = self.outstanding.pop_front() {
                let ack = self.our_ack(o.packet_id, o.qos);
                replies.to_broker.push(ack);
            }
        }
    }

    fn device_ack(&mut self, packet_id: u16, kind: u8, replies: &mut Replies) -> Verdict {
        if let Some(replay) = self.injected.remove(&packet_id) {
            if let Some(id) = replay {
                self.replayed(id);
            }
            if kind == packet::PUBREC {
                let pubrel = packet::ack(packet::PUBREL, self.protocol(), packet_id, 0);
                replies.to_device.push(Bytes::from(pubrel));
                self.releasing.insert(packet_id);
            }
            self.send_waiting(replies);
            return Verdict::Drop;
        }
        let Some(pos) = self
            .outstanding
            .iter()
            .position(|o| o.packet_id == packet_id && !o.ours)
        else {
            return Verdict::Pass;
        };
        if let Some(key) = self.outstanding[pos].key {
            self.shared.send(Event::Delivered {
                client: self.client.clone(),
                key,
            });
        }
        if pos == 0 {
            self.outstanding.pop_front();
            self.flush_ours(replies);
            return Verdict::Pass;
        }
        // Acknowledgements the hook owes come first; deliveries before this one that the
        // device was not given (another hook withheld them) were acknowledged there.
        let before: Vec<Outstanding> = self.outstanding.drain(..=pos).collect();
        for o in &before[..pos] {
            if o.ours {
                let ack = self.our_ack(o.packet_id, o.qos);
                replies.to_broker.push(ack);
            }
        }
        let own = packet::ack(kind, self.protocol(), packet_id, 0);
        replies.to_broker.push(Bytes::from(own));
        self.flush_ours(replies);
        Verdict::Drop
    }

    /// A message of an earlier run reached the device: it is not sent again.
    fn replayed(&mut self, id: i64) {
        if let Some(list) = self
            .shared
            .replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.client)
        {
            list.retain(|r| r.id != id);
        }
        self.shared.send(Event::ReplayAcked {
            client: self.client.clone(),
            id,
        });
    }

    /// The device resumed its session: what the last run queued for it follows the CONNACK.
    fn start_replays(&mut self, replies: &mut Replies) {
        let mut book = self
            .shared
            .replays
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(list) = book.get_mut(&self.client) else {
            return;
        };
        self.waiting = list.iter().cloned().collect();
        for replay in list.iter_mut() {
            replay.sent = true;
        }
        drop(book);
        debug!(client_id = %self.client, messages = self.waiting.len(), "delivering messages queued before the restart");
        self.send_waiting(replies);
    }

    /// Whether the ACL in force lets the device read `topic`.
    fn readable(&mut self, topic: &str) -> bool {
        let policy = self.policy.load();
        let of = Arc::as_ptr(&*policy) as usize;
        if self.rules.is_none() || self.rules_of != of {
            self.rules = Some(
                policy
                    .acl
                    .as_ref()
                    .map(|acl| acl.rules_for(self.conn.username.as_deref(), &self.conn.client_id)),
            );
            self.rules_of = of;
        }
        match &self.rules {
            Some(Some(rules)) => rules.topic_allowed(topic, Access::Read),
            _ => true,
        }
    }

    fn send_waiting(&mut self, replies: &mut Replies) {
        while self.injected.len() < self.window {
            let Some(replay) = self.waiting.pop_front() else {
                return;
            };
            if !self.readable(&replay.topic) {
                inc(&self.shared.health.counters.acl_withheld);
                self.replayed(replay.id);
                continue;
            }
            let Some(id) = self.own_id() else {
                self.waiting.push_front(replay);
                return;
            };
            let publish = Publish {
                dup: replay.sent,
                qos: replay.qos,
                retain: false,
                topic: &replay.topic,
                packet_id: Some(id),
                topic_alias: None,
                properties: &[],
                payload: &replay.payload,
            };
            let bytes = publish.encode(self.protocol());
            if self.too_large(bytes.len()) {
                inc(&self.shared.health.counters.withheld_oversize);
                self.replayed(replay.id);
                continue;
            }
            self.injected.insert(id, Some(replay.id));
            replies.to_device.push(Bytes::from(bytes));
        }
    }

    /// A delivery this device will never acknowledge: the state stops keeping it for it.
    fn forget(&self, publish: &Publish<'_>) {
        self.shared.send(Event::Delivered {
            client: self.client.clone(),
            key: key(publish.topic, publish.payload),
        });
    }

    fn too_large(&self, size: usize) -> bool {
        self.conn
            .maximum_packet_size
            .is_some_and(|max| size > max as usize)
    }

    fn delivery(&mut self, publish: &Publish<'_>, replies: &mut Replies) -> Verdict {
        let Some(packet_id) = publish.packet_id.filter(|_| publish.qos > 0) else {
            if self.too_large(encoded_len(publish, self.protocol())) {
                inc(&self.shared.health.counters.withheld_oversize);
                return Verdict::Drop;
            }
            return self.retained_at_own_qos(publish, None, replies);
        };
        if self.too_large(encoded_len(publish, self.protocol())) {
            inc(&self.shared.health.counters.withheld_oversize);
            if self.persistent {
                // Never deliverable to this device: not kept for it either.
                self.forget(publish);
            }
            self.take_over(packet_id, publish.qos, replies);
            return Verdict::Drop;
        }
        if let verdict @ Verdict::Replace(_) =
            self.retained_at_own_qos(publish, Some(packet_id), replies)
        {
            return verdict;
        }
        // The ACL gate, nearer the device, withholds what the device may not read and
        // acknowledges it to rumqttd itself: the device never will, so the message is not
        // kept for it (nor waits in `outstanding`).
        if self.persistent && !self.readable(publish.topic) {
            self.forget(publish);
            return Verdict::Pass;
        }
        self.outstanding.push_back(Outstanding {
            packet_id,
            qos: publish.qos,
            key: self.persistent.then(|| key(publish.topic, publish.payload)),
            ours: false,
        });
        // rumqttd keeps at most 100 deliveries in flight: entries beyond that were
        // acknowledged by another hook (the ACL gate withholds some).
        while self.outstanding.len() > MAX_OUTSTANDING
            && self.outstanding.front().is_some_and(|o| !o.ours)
        {
            self.outstanding.pop_front();
        }
        self.flush_ours(replies);
        Verdict::Pass
    }

    /// rumqttd replays a retained message (retain set) at the subscription's QoS; a
    /// message retained at QoS 0 goes to the device at QoS 0 instead.
    fn retained_at_own_qos(
        &mut self,
        publish: &Publish<'_>,
        packet_id: Option<u16>,
        replies: &mut Replies,
    ) -> Verdict {
        if !publish.retain || publish.qos == 0 {
            return Verdict::Pass;
        }
        let own = self
            .shared
            .retained_qos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(publish.topic)
            .copied();
        // Only QoS 0 is lowered to: a QoS 1 copy would need a packet id of the hook's,
        // which the ACL gate (nearer the device) could acknowledge to rumqttd, which drops
        // a client for an acknowledgement it did not expect.
        let (Some(0), Some(theirs)) = (own, packet_id) else {
            return Verdict::Pass;
        };
        self.take_over(theirs, publish.qos, replies);
        let lowered = Publish {
            qos: 0,
            packet_id: None,
            dup: false,
            ..publish.clone()
        };
        Verdict::Replace(Bytes::from(lowered.encode(self.protocol())))
    }

    fn suback(&mut self, packet_id: u16, codes: &[u8]) {
        let Some(filters) = self.subscribing.remove(&packet_id) else {
            return;
        };
        let granted: Vec<(String, u8)> = filters
            .into_iter()
            .zip(codes)
            .filter(|(_, code)| **code < 0x80)
            .map(|((filter, options), code)| (filter, (options & !0x03) | (code & 0x03)))
            .collect();
        if !granted.is_empty() {
            self.shared.send(Event::Subscribed {
                client: self.client.clone(),
                filters: granted,
            });
        }
    }
}

/// A publish that named its topic by an MQTT 5 alias, with the topic written out and no
/// alias: rumqttd never has to resolve a client's aliases.
fn resolved(publish: &Publish<'_>, topic: &str, protocol: Protocol) -> Verdict {
    let Ok(properties) = packet::without_property(publish.properties, 0x23) else {
        return Verdict::Pass;
    };
    let full = Publish {
        topic,
        topic_alias: None,
        properties: &properties,
        ..publish.clone()
    };
    Verdict::Replace(Bytes::from(full.encode(protocol)))
}

/// Bytes of `publish` on the wire.
fn encoded_len(publish: &Publish<'_>, protocol: Protocol) -> usize {
    let mut body = 2 + publish.topic.len() + publish.payload.len();
    if publish.qos > 0 {
        body += 2;
    }
    if protocol == Protocol::V5 {
        body += varint_len(publish.properties.len()) + publish.properties.len();
    }
    1 + varint_len(body) + body
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

impl Hook for Tracker {
    fn device_packet(&mut self, packet: &Packet<'_>, replies: &mut Replies) -> Verdict {
        match packet {
            Packet::Publish(publish) => self.device_publish(publish),
            Packet::PubAck(id) => self.device_ack(*id, packet::PUBACK, replies),
            Packet::PubRec(id) => self.device_ack(*id, packet::PUBREC, replies),
            Packet::PubComp(id) if self.releasing.remove(id) => Verdict::Drop,
            Packet::Subscribe(subscribe) if self.persistent => {
                let filters = subscribe
                    .filters
                    .iter()
                    .map(|(f, o)| ((*f).to_owned(), *o))
                    .collect();
                // Until rumqttd's SUBACK; a device with more SUBSCRIBEs outstanding than
                // this is not kept (the SUBACKs come back in order and promptly).
                if self.subscribing.len() < MAX_SUBSCRIBING {
                    self.subscribing.insert(subscribe.packet_id, filters);
                } else {
                    self.shared.overrun();
                }
                Verdict::Pass
            }
            Packet::Unsubscribe(unsubscribe) if self.persistent => {
                self.shared.send(Event::Unsubscribed {
                    client: self.client.clone(),
                    filters: unsubscribe
                        .filters
                        .iter()
                        .map(|f| (*f).to_owned())
                        .collect(),
                });
                Verdict::Pass
            }
            Packet::Disconnect => {
                self.disconnected = true;
                Verdict::Pass
            }
            _ => Verdict::Pass,
        }
    }

    fn broker_packet(&mut self, packet: &Packet<'_>, replies: &mut Replies) -> Verdict {
        match packet {
            Packet::ConnAck(ack) => {
                if ack.code == 0 && ack.session_present && self.resumes {
                    self.start_replays(replies);
                }
                Verdict::Pass
            }
            Packet::Publish(publish) => self.delivery(publish, replies),
            Packet::SubAck(suback) => {
                self.suback(suback.packet_id, suback.codes);
                Verdict::Pass
            }
            Packet::PubRel(id) if self.our_pubrels.remove(id) => {
                let pubcomp = packet::ack(packet::PUBCOMP, self.protocol(), *id, 0);
                replies.to_broker.push(Bytes::from(pubcomp));
                Verdict::Drop
            }
            _ => Verdict::Pass,
        }
    }

    fn closed(&mut self) {
        self.shared.send(Event::Disconnected {
            conn: self.id,
            client: self.client.clone(),
        });
        if let (false, Some(will)) = (self.disconnected, &self.conn.will) {
            let mut scratch = std::mem::take(&mut self.scratch);
            self.shared.published(
                &will.topic,
                &will.payload,
                will.qos,
                will.retain,
                &mut scratch,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::hook::{Chain, Direction};
    use crate::broker::packet::{SubAck, Subscribe};
    use crate::broker::policy::Policy;
    use crate::health::SharedHealth;
    use crate::state::{Limits, State};

    fn open(dir: &std::path::Path) -> (State, crate::state::Restore) {
        let limits = Limits {
            max_retained_size: 1 << 20,
            max_queued_messages: 100,
            commit_interval: Duration::from_millis(50),
        };
        let (state, restore, _owner) =
            State::open(dir, limits, false, SharedHealth::default()).unwrap();
        (state, restore)
    }

    fn chain(state: &State, client_id: &str, clean_start: bool) -> Chain {
        let policy = Policy {
            acl: None,
            allow_anonymous: true,
            passwords: None,
        };
        let conn = ConnInfo {
            peer: ([127, 0, 0, 1], 5000).into(),
            protocol: Protocol::V311,
            client_id: client_id.into(),
            username: None,
            clean_start,
            session_expiry: None,
            will: None,
            receive_maximum: None,
            maximum_packet_size: None,
        };
        let hooks = vec![state.hooks(policy.shared()).open(&conn).unwrap()];
        Chain::new(Protocol::V311, hooks)
    }

    fn publish(topic: &str, qos: u8, retain: bool, id: u16, payload: &[u8]) -> Vec<u8> {
        Publish {
            dup: false,
            qos,
            retain,
            topic,
            packet_id: Some(id),
            topic_alias: None,
            properties: &[],
            payload,
        }
        .encode(Protocol::V311)
    }

    fn run(chain: &mut Chain, d: Direction, frame: &[u8], r: &mut Replies) -> Verdict {
        chain.run(d, frame, r).unwrap()
    }

    /// The fan, on a persistent session, subscribes to `fan/cmd` at QoS 1 and goes offline;
    /// returns once the state's owner has it (its filters are in the tree).
    async fn fan_subscribes_and_leaves(state: &State, r: &mut Replies) {
        let mut fan = chain(state, "fan", false);
        let subscribe = Subscribe {
            packet_id: 1,
            properties: &[],
            filters: vec![("fan/cmd", 1)],
        };
        let bytes = subscribe.encode(Protocol::V311, &subscribe.filters);
        run(&mut fan, Direction::FromDevice, &bytes, r);
        let suback = SubAck::encode(Protocol::V311, 1, &[], &[1]);
        run(&mut fan, Direction::FromBroker, &suback, r);
        fan.closed();
        state.flush().await;
    }

    use std::time::Duration;

    #[tokio::test]
    async fn a_retained_message_goes_out_at_its_own_qos_and_rumqttd_is_acknowledged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _) = open(dir.path());
        let mut sensor = chain(&state, "sensor", true);
        let mut r = Replies::default();
        let retained = publish("fan/state", 0, true, 0, b"ON");
        assert_eq!(
            run(&mut sensor, Direction::FromDevice, &retained, &mut r),
            Verdict::Pass
        );
        let mut dashboard = chain(&state, "dashboard", true);
        // A live QoS 1 delivery is outstanding when rumqttd replays the retained message at
        // the subscription's QoS 1.
        let live = publish("fan/speed", 1, false, 1, b"3");
        assert_eq!(
            run(&mut dashboard, Direction::FromBroker, &live, &mut r),
            Verdict::Pass
        );
        let replay = publish("fan/state", 1, true, 2, b"ON");
        let Verdict::Replace(lowered) = run(&mut dashboard, Direction::FromBroker, &replay, &mut r)
        else {
            panic!("the retained message must be sent at QoS 0");
        };
        let Ok(Packet::Publish(p)) = Packet::parse(&lowered, Protocol::V311) else {
            panic!("not a publish");
        };
        assert_eq!((p.qos, p.retain, p.payload), (0, true, &b"ON"[..]));
        assert!(r.to_broker.is_empty(), "acknowledged ahead of delivery 1");
        let ack1 = packet::ack(packet::PUBACK, Protocol::V311, 1, 0);
        assert_eq!(
            run(&mut dashboard, Direction::FromDevice, &ack1, &mut r),
            Verdict::Pass
        );
        assert_eq!(
            r.to_broker,
            [Bytes::from(packet::ack(
                packet::PUBACK,
                Protocol::V311,
                2,
                0
            ))]
        );
    }

    #[tokio::test]
    async fn a_message_queued_before_a_restart_follows_the_connack_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (state, _) = open(dir.path());
            let mut r = Replies::default();
            fan_subscribes_and_leaves(&state, &mut r).await;
            let mut cloud = chain(&state, "cloud", true);
            run(
                &mut cloud,
                Direction::FromDevice,
                &publish("fan/cmd", 1, false, 9, b"ON"),
                &mut r,
            );
            run(
                &mut cloud,
                Direction::FromDevice,
                &publish("fan/other", 1, false, 10, b"X"),
                &mut r,
            );
            state.flush().await;
        }
        let (state, restore) = open(dir.path());
        assert_eq!(restore.sessions.len(), 1);
        assert_eq!(restore.sessions[0].filters, [("fan/cmd".to_owned(), 1)]);
        let mut fan = chain(&state, "fan", false);
        let mut r = Replies::default();
        let connack = [0x20, 2, 1, 0];
        assert_eq!(
            run(&mut fan, Direction::FromBroker, &connack, &mut r),
            Verdict::Pass
        );
        assert_eq!(
            r.to_device.len(),
            1,
            "one queued message, after the CONNACK"
        );
        let Ok(Packet::Publish(p)) = Packet::parse(&r.to_device[0], Protocol::V311) else {
            panic!("not a publish");
        };
        assert_eq!((p.topic, p.payload, p.qos), ("fan/cmd", &b"ON"[..], 1));
        let id = p.packet_id.unwrap();
        assert!(id >= 0x8000, "a packet id rumqttd never uses: {id}");
        let ack = packet::ack(packet::PUBACK, Protocol::V311, id, 0);
        assert_eq!(
            run(&mut fan, Direction::FromDevice, &ack, &mut r),
            Verdict::Drop,
            "the acknowledgement is the hook's, not rumqttd's"
        );
        state.flush().await;
        let db = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        let queued: i64 = db
            .query_row("SELECT count(*) FROM queued", [], |r| r.get(0))
            .unwrap();
        assert_eq!(queued, 0);
    }

    #[tokio::test]
    async fn a_session_ended_and_begun_again_before_a_commit_drops_the_old_queue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (state, _) = open(dir.path());
            let mut r = Replies::default();
            fan_subscribes_and_leaves(&state, &mut r).await;
            let mut cloud = chain(&state, "cloud", true);
            let command = publish("fan/cmd", 1, false, 9, b"OLD");
            run(&mut cloud, Direction::FromDevice, &command, &mut r);
            state.flush().await;
            assert_eq!(
                queued(dir.path()),
                1,
                "the command is kept for the offline fan"
            );
            // Clean session, then a persistent one again, within one commit interval.
            let mut clean = chain(&state, "fan", true);
            clean.closed();
            let mut again = chain(&state, "fan", false);
            again.closed();
            state.flush().await;
        }
        let (_state, restore) = open(dir.path());
        assert_eq!(restore.sessions.len(), 1, "the new session is kept");
        assert!(
            restore.sessions[0].filters.is_empty(),
            "the old session's subscriptions are gone"
        );
        assert_eq!(
            queued(dir.path()),
            0,
            "the old session's queued command would be replayed"
        );
    }

    fn queued(dir: &std::path::Path) -> i64 {
        let db = rusqlite::Connection::open(dir.join("state.db")).unwrap();
        db.query_row("SELECT count(*) FROM queued", [], |r| r.get(0))
            .unwrap()
    }
}
