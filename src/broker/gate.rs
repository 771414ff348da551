//! The front door's own hook: the ACL on every PUBLISH and SUBSCRIBE, the cap on
//! subscriptions per connection, and the filters rumqttd must never see.
//!
//! A denied PUBLISH is dropped and acknowledged as mosquitto does (PUBACK or PUBREC; with
//! reason 0x87 in MQTT 5), so the device's session goes on. Denied filters of a SUBSCRIBE
//! get 0x80 (MQTT 5: 0x87, or 0x97 over the cap) and never reach rumqttd: the allowed
//! ones are forwarded in a rewritten SUBSCRIBE, and rumqttd's SUBACK is merged back into
//! the device's order. A message rumqttd delivers on a topic the client may not read (a
//! `deny` rule inside an allowed filter, or an ACL reloaded since it subscribed) is
//! withheld and acknowledged to rumqttd in the device's place.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use super::acl::{Access, ClientRules};
use super::hook::{ConnInfo, Hook, HookFactory, Replies, Verdict};
use super::packet::{self, Packet, Protocol, Publish, SubAck};
use super::policy::{Policy, SharedPolicy};
use crate::health::{inc, RateLimit, SharedHealth};
use crate::topics;

/// Topic aliases a client may define (MQTT 5); more is a protocol error here.
const MAX_ALIASES: usize = 1024;
/// QoS 2 flows the gate answers itself, per connection and direction.
const MAX_OWN_FLOWS: usize = 65_536;

pub struct GateFactory {
    pub policy: SharedPolicy,
    pub max_subscriptions: usize,
    pub health: SharedHealth,
}

impl HookFactory for GateFactory {
    fn open(&self, conn: &ConnInfo) -> Option<Box<dyn Hook>> {
        Some(Box::new(Gate {
            conn: conn.clone(),
            policy: self.policy.clone(),
            rules: None,
            max_subscriptions: self.max_subscriptions,
            subscriptions: HashSet::new(),
            hasher: RandomState::new(),
            pending_subacks: HashMap::new(),
            denied_qos2: HashSet::new(),
            withheld_qos2: HashSet::new(),
            device_aliases: HashMap::new(),
            broker_aliases: HashMap::new(),
            health: self.health.clone(),
            denial_log: RateLimit::new(Duration::from_secs(10)),
        }))
    }
}

struct Gate {
    conn: ConnInfo,
    policy: SharedPolicy,
    /// The client's rules, compiled for the policy they came from (None: no ACL file).
    rules: Option<(Arc<Policy>, Option<ClientRules>)>,
    max_subscriptions: usize,
    /// Hashes of the filters this connection subscribed to.
    subscriptions: HashSet<u64>,
    hasher: RandomState,
    /// SUBACK codes by packet id: Some for filters refused here, None for rumqttd's.
    pending_subacks: HashMap<u16, Vec<Option<u8>>>,
    /// QoS 2 publishes of the device that were denied: their PUBREL is answered here.
    denied_qos2: HashSet<u16>,
    /// QoS 2 deliveries withheld from the device: rumqttd's PUBREL is answered here.
    withheld_qos2: HashSet<u16>,
    device_aliases: HashMap<u16, String>,
    broker_aliases: HashMap<u16, String>,
    health: SharedHealth,
    denial_log: RateLimit,
}

impl Gate {
    /// The client's compiled rules, recompiled when the policy was reloaded; None when
    /// there is no ACL file (everything allowed).
    fn rules(&mut self) -> Option<&ClientRules> {
        let current = self.policy.load();
        let fresh = match &self.rules {
            Some((policy, _)) => !Arc::ptr_eq(policy, &current),
            None => true,
        };
        if fresh {
            let compiled = current
                .acl
                .as_ref()
                .map(|acl| acl.rules_for(self.conn.username.as_deref(), &self.conn.client_id));
            self.rules = Some((arc_swap::Guard::into_inner(current), compiled));
        }
        self.rules.as_ref().and_then(|(_, rules)| rules.as_ref())
    }

    fn protocol(&self) -> Protocol {
        self.conn.protocol
    }

    /// The topic of a publish, resolving MQTT 5 topic aliases; Err: a protocol error.
    fn topic<'p>(
        aliases: &'p mut HashMap<u16, String>,
        publish: &'p Publish<'p>,
    ) -> Result<&'p str, String> {
        let Some(alias) = publish.topic_alias else {
            return Ok(publish.topic);
        };
        if publish.topic.is_empty() {
            return aliases
                .get(&alias)
                .map(String::as_str)
                .ok_or_else(|| format!("topic alias {alias} used before it was set"));
        }
        if aliases.len() >= MAX_ALIASES && !aliases.contains_key(&alias) {
            return Err(format!("more than {MAX_ALIASES} topic aliases"));
        }
        aliases.insert(alias, publish.topic.to_owned());
        Ok(publish.topic)
    }

    fn device_publish(&mut self, publish: &Publish<'_>, replies: &mut Replies) -> Verdict {
        if self.rules().is_none() && publish.topic_alias.is_none() {
            return Verdict::Pass;
        }
        let topic = match Self::topic(&mut self.device_aliases, publish) {
            Ok(topic) => topic.to_owned(),
            Err(why) => return Verdict::Close(why),
        };
        let allowed = self
            .rules()
            .is_none_or(|rules| rules.topic_allowed(&topic, Access::Write));
        if allowed {
            return Verdict::Pass;
        }
        inc(&self.health.counters.acl_denied);
        if let Some(held) = self.denial_log.check() {
            warn!(peer = %self.conn.peer, client_id = %self.conn.client_id, user = ?self.conn.username,
                topic, earlier_denials_not_logged = held, "publish denied by local.acl_file; dropped");
        }
        let protocol = self.protocol();
        match (publish.qos, publish.packet_id) {
            (1, Some(id)) => {
                replies
                    .to_device
                    .push(Bytes::from(packet::ack(packet::PUBACK, protocol, id, 0x87)))
            }
            (2, Some(id)) => {
                replies.to_device.push(Bytes::from(packet::ack(
                    packet::PUBREC,
                    protocol,
                    id,
                    0x87,
                )));
                // MQTT 5 ends the flow with the error code; 3.1.1 sends PUBREL.
                if protocol == Protocol::V311 && self.denied_qos2.len() < MAX_OWN_FLOWS {
                    self.denied_qos2.insert(id);
                }
            }
            _ => {}
        }
        Verdict::Drop
    }

    fn subscribe(&mut self, subscribe: &packet::Subscribe<'_>, replies: &mut Replies) -> Verdict {
        let v5 = self.protocol() == Protocol::V5;
        let mut codes: Vec<Option<u8>> = Vec::with_capacity(subscribe.filters.len());
        let mut forwarded: Vec<(&str, u8)> = Vec::with_capacity(subscribe.filters.len());
        for &(filter, options) in &subscribe.filters {
            let refusal = self.judge_filter(filter);
            if let Some((code_v5, why)) = refusal {
                inc(&self.health.counters.subscriptions_refused);
                if let Some(held) = self.denial_log.check() {
                    warn!(peer = %self.conn.peer, client_id = %self.conn.client_id, user = ?self.conn.username,
                        filter, earlier_refusals_not_logged = held, "subscription refused: {why}");
                }
                codes.push(Some(if v5 { code_v5 } else { 0x80 }));
            } else {
                codes.push(None);
                forwarded.push((filter, options));
            }
        }
        if forwarded.len() == subscribe.filters.len() {
            return Verdict::Pass;
        }
        if forwarded.is_empty() {
            let codes: Vec<u8> = codes.into_iter().flatten().collect();
            replies.to_device.push(Bytes::from(SubAck::encode(
                self.protocol(),
                subscribe.packet_id,
                &[],
                &codes,
            )));
            return Verdict::Drop;
        }
        self.pending_subacks.insert(subscribe.packet_id, codes);
        Verdict::Replace(Bytes::from(subscribe.encode(self.protocol(), &forwarded)))
    }

    /// Why a filter may not reach rumqttd, with the MQTT 5 code to answer.
    fn judge_filter(&mut self, filter: &str) -> Option<(u8, &'static str)> {
        if topics::valid_filter(filter).is_err() {
            return Some((0x8F, "not a valid topic filter"));
        }
        // rumqttd drops the whole connection of a client subscribing to $SYS/#.
        if super::acl::shared_filter(filter).starts_with("$SYS") {
            return Some((0x87, "the local broker has no $SYS topics"));
        }
        if self
            .rules()
            .is_some_and(|rules| !rules.filter_allowed(filter))
        {
            return Some((0x87, "denied by local.acl_file"));
        }
        let hash = self.hasher.hash_one(filter);
        if !self.subscriptions.contains(&hash) {
            if self.subscriptions.len() >= self.max_subscriptions {
                return Some((0x97, "over local.max_subscriptions for this connection"));
            }
            self.subscriptions.insert(hash);
        }
        None
    }

    fn merge_suback(&mut self, suback: &SubAck<'_>) -> Verdict {
        let Some(template) = self.pending_subacks.remove(&suback.packet_id) else {
            return Verdict::Pass;
        };
        let mut theirs = suback.codes.iter();
        let merged: Vec<u8> = template
            .into_iter()
            .map(|code| code.or_else(|| theirs.next().copied()).unwrap_or(0x80))
            .collect();
        Verdict::Replace(Bytes::from(SubAck::encode(
            self.protocol(),
            suback.packet_id,
            suback.properties,
            &merged,
        )))
    }

    fn delivery(&mut self, publish: &Publish<'_>, replies: &mut Replies) -> Verdict {
        if self.rules().is_none() {
            return Verdict::Pass;
        }
        let topic = match Self::topic(&mut self.broker_aliases, publish) {
            Ok(topic) => topic.to_owned(),
            Err(why) => return Verdict::Close(why),
        };
        if self
            .rules()
            .is_none_or(|rules| rules.topic_allowed(&topic, Access::Read))
        {
            return Verdict::Pass;
        }
        inc(&self.health.counters.acl_withheld);
        let protocol = self.protocol();
        match (publish.qos, publish.packet_id) {
            (1, Some(id)) => {
                replies
                    .to_broker
                    .push(Bytes::from(packet::ack(packet::PUBACK, protocol, id, 0)))
            }
            (2, Some(id)) => {
                replies
                    .to_broker
                    .push(Bytes::from(packet::ack(packet::PUBREC, protocol, id, 0)));
                if self.withheld_qos2.len() < MAX_OWN_FLOWS {
                    self.withheld_qos2.insert(id);
                }
            }
            _ => {}
        }
        Verdict::Drop
    }
}

impl Hook for Gate {
    fn device_packet(&mut self, packet: &Packet<'_>, replies: &mut Replies) -> Verdict {
        match packet {
            Packet::Publish(publish) => self.device_publish(publish, replies),
            Packet::PubRel(id) if self.denied_qos2.remove(id) => {
                let pubcomp = packet::ack(packet::PUBCOMP, self.protocol(), *id, 0);
                replies.to_device.push(Bytes::from(pubcomp));
                Verdict::Drop
            }
            Packet::Subscribe(subscribe) => self.subscribe(subscribe, replies),
            Packet::Connect(_) => Verdict::Close("a second CONNECT on one connection".into()),
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.filters {
                    self.subscriptions.remove(&self.hasher.hash_one(filter));
                }
                Verdict::Pass
            }
            _ => Verdict::Pass,
        }
    }

    fn broker_packet(&mut self, packet: &Packet<'_>, replies: &mut Replies) -> Verdict {
        match packet {
            Packet::SubAck(suback) => self.merge_suback(suback),
            Packet::Publish(publish) => self.delivery(publish, replies),
            Packet::PubRel(id) if self.withheld_qos2.remove(id) => {
                let pubcomp = packet::ack(packet::PUBCOMP, self.protocol(), *id, 0);
                replies.to_broker.push(Bytes::from(pubcomp));
                Verdict::Drop
            }
            _ => Verdict::Pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::acl::AclFile;
    use crate::broker::hook::{Chain, Direction};

    fn chain(protocol: Protocol, acl: &str) -> (Chain, SharedHealth) {
        let health = SharedHealth::default();
        let policy = Policy {
            acl: Some(AclFile::parse(acl).unwrap()),
            allow_anonymous: true,
            passwords: None,
        };
        let factory = GateFactory {
            policy: policy.shared(),
            max_subscriptions: 2,
            health: health.clone(),
        };
        let conn = ConnInfo {
            peer: ([127, 0, 0, 1], 5000).into(),
            protocol,
            client_id: "c1".into(),
            username: Some("u".into()),
            clean_start: true,
            session_expiry: Some(0),
            will: None,
            receive_maximum: None,
            maximum_packet_size: None,
        };
        let hooks = vec![factory.open(&conn).unwrap()];
        (Chain::new(protocol, hooks), health)
    }

    fn publish(topic: &str, qos: u8, id: u16) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.push(b'x');
        let mut packet = vec![0x30 | (qos << 1), body.len() as u8];
        packet.extend(body);
        packet
    }

    #[test]
    fn a_subscribe_is_split_and_its_suback_merged_back() {
        let (mut chain, health) = chain(Protocol::V5, "user u\ntopic read a/#\n");
        let mut replies = Replies::default();
        let subscribe = packet::Subscribe {
            packet_id: 9,
            properties: &[],
            filters: vec![("a/1", 1), ("b", 1), ("a/2", 0), ("a/3", 1)],
        };
        let bytes = subscribe.encode(Protocol::V5, &subscribe.filters);
        let Ok(Verdict::Replace(forwarded)) =
            chain.run(Direction::FromDevice, &bytes, &mut replies)
        else {
            panic!("the SUBSCRIBE must be rewritten");
        };
        let Ok(Packet::Subscribe(sent)) = Packet::parse(&forwarded, Protocol::V5) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(sent.filters, [("a/1", 1), ("a/2", 0)]);
        let suback = SubAck::encode(Protocol::V5, 9, &[], &[1, 0]);
        let Ok(Verdict::Replace(merged)) = chain.run(Direction::FromBroker, &suback, &mut replies)
        else {
            panic!("the SUBACK must be merged");
        };
        // "b" is denied (0x87), "a/3" is over the cap of two (0x97).
        assert_eq!(
            merged,
            SubAck::encode(Protocol::V5, 9, &[], &[1, 0x87, 0, 0x97])
        );
        assert_eq!(
            health
                .counters
                .subscriptions_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn denied_publishes_and_deliveries_are_acknowledged_in_the_right_direction() {
        let (mut chain, health) = chain(
            Protocol::V311,
            "user u\ntopic readwrite a/#\ntopic deny a/secret\n",
        );
        let mut replies = Replies::default();
        let run = |chain: &mut Chain, d, p: &[u8], r: &mut Replies| chain.run(d, p, r).unwrap();
        assert_eq!(
            run(
                &mut chain,
                Direction::FromDevice,
                &publish("a/ok", 1, 1),
                &mut replies
            ),
            Verdict::Pass
        );
        assert_eq!(
            run(
                &mut chain,
                Direction::FromDevice,
                &publish("a/secret", 1, 2),
                &mut replies
            ),
            Verdict::Drop
        );
        assert_eq!(replies.to_device, [Bytes::from_static(&[0x40, 2, 0, 2])]);
        assert_eq!(
            run(
                &mut chain,
                Direction::FromDevice,
                &publish("a/secret", 2, 3),
                &mut replies
            ),
            Verdict::Drop
        );
        assert_eq!(
            run(
                &mut chain,
                Direction::FromDevice,
                &[0x62, 2, 0, 3],
                &mut replies
            ),
            Verdict::Drop
        );
        assert_eq!(
            replies.to_device.last().map(|b| b.to_vec()),
            Some(vec![0x70, 2, 0, 3])
        );
        assert_eq!(
            run(
                &mut chain,
                Direction::FromBroker,
                &publish("a/secret", 1, 7),
                &mut replies
            ),
            Verdict::Drop
        );
        assert_eq!(replies.to_broker, [Bytes::from_static(&[0x40, 2, 0, 7])]);
        assert_eq!(
            run(
                &mut chain,
                Direction::FromBroker,
                &publish("a/ok", 1, 8),
                &mut replies
            ),
            Verdict::Pass
        );
        let counters = &health.counters;
        assert_eq!(
            counters
                .acl_denied
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(
            counters
                .acl_withheld
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let connect = crate::broker::packet::Connect::parse(&[
            0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0,
        ])
        .unwrap()
        .encode();
        assert!(matches!(
            run(&mut chain, Direction::FromDevice, &connect, &mut replies),
            Verdict::Close(_)
        ));
    }
}
