//! Retained messages: the last message with the retain flag on each topic, given to every
//! new subscription its filter matches. A site keeps hundreds to thousands of them, so a
//! wildcard subscription scans them (a plain one is a lookup); the store is bounded in
//! bytes of topic plus payload (`local.max_retained_size`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::message::Message;
use super::router::Filter;
use crate::topics;

#[derive(Debug, Default)]
pub struct Retained {
    map: HashMap<Arc<str>, Arc<Message>>,
    bytes: usize,
}

/// What a retained publish did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Stored,
    /// An empty payload removed the topic's message ([MQTT-3.3.1-6]).
    Cleared,
    /// Nothing to clear.
    Unchanged,
    /// Over the store's bound: not kept (the earlier message on the topic is gone too).
    Refused,
}

impl Retained {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes a message published with the retain flag.
    pub fn set(&mut self, message: &Arc<Message>, max_bytes: usize) -> Change {
        let old = self.map.remove(&message.topic);
        if let Some(old) = &old {
            self.bytes -= old.weight();
        }
        if message.payload.is_empty() {
            return match old {
                Some(_) => Change::Cleared,
                None => Change::Unchanged,
            };
        }
        if self.bytes + message.weight() > max_bytes {
            return Change::Refused;
        }
        self.bytes += message.weight();
        self.map.insert(message.topic.clone(), message.clone());
        Change::Stored
    }

    /// Puts back a message of an earlier run (no bound: it was within it when written).
    pub fn restore(&mut self, message: Arc<Message>) {
        self.bytes += message.weight();
        if let Some(old) = self.map.insert(message.topic.clone(), message) {
            self.bytes -= old.weight();
        }
    }

    /// The retained messages `filter` matches, oldest topic first is not promised; expired
    /// ones are dropped on the way (their topics returned in `expired`).
    pub fn lookup(
        &mut self,
        filter: Filter<'_>,
        now: Instant,
        out: &mut Vec<Arc<Message>>,
        expired: &mut Vec<Arc<str>>,
    ) {
        if !filter.levels.contains(['+', '#']) {
            if let Some(m) = self.map.get(filter.levels) {
                match m.expired(now) {
                    true => expired.push(m.topic.clone()),
                    false => out.push(m.clone()),
                }
            }
        } else {
            for m in self.map.values() {
                if topics::matches(filter.levels, &m.topic) {
                    match m.expired(now) {
                        true => expired.push(m.topic.clone()),
                        false => out.push(m.clone()),
                    }
                }
            }
        }
        for topic in expired.iter() {
            if let Some(m) = self.map.remove(topic) {
                self.bytes -= m.weight();
            }
        }
    }

    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        self.map.get(topic)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.map.values()
    }

    /// Drops the messages whose expiry passed; returns their topics.
    pub fn expire(&mut self, now: Instant) -> Vec<Arc<str>> {
        let gone: Vec<Arc<str>> = self
            .map
            .values()
            .filter(|m| m.expired(now))
            .map(|m| m.topic.clone())
            .collect();
        for topic in &gone {
            if let Some(m) = self.map.remove(topic) {
                self.bytes -= m.weight();
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::{Origin, OriginKind};
    use bytes::Bytes;

    fn message(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 1,
            retain: true,
            props: Bytes::new(),
            expires: None,
            origin: Origin::of(OriginKind::Device),
        })
    }

    #[test]
    fn stores_replaces_clears_and_bounds() {
        let mut r = Retained::default();
        assert_eq!(r.set(&message("a/b", "1"), 100), Change::Stored);
        assert_eq!(r.set(&message("a/b", "22"), 100), Change::Stored);
        assert_eq!(r.bytes(), 5);
        assert_eq!(r.set(&message("a/c", "3"), 100), Change::Stored);
        let (mut out, mut expired) = (Vec::new(), Vec::new());
        let now = Instant::now();
        r.lookup(Filter::parse("a/+").unwrap(), now, &mut out, &mut expired);
        assert_eq!(out.len(), 2);
        out.clear();
        r.lookup(Filter::parse("a/b").unwrap(), now, &mut out, &mut expired);
        assert_eq!(&out[0].payload[..], b"22");
        assert_eq!(r.set(&message("a/b", ""), 100), Change::Cleared);
        assert_eq!(r.set(&message("a/b", ""), 100), Change::Unchanged);
        assert_eq!(
            r.set(&message("big", &"x".repeat(200)), 100),
            Change::Refused
        );
        assert_eq!((r.len(), r.bytes()), (1, 4));
    }
}
