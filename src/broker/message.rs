//! A message inside the broker: one shared value for every subscriber, the retained store
//! and the outbox (no copy per delivery), with its origin and its expiry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Who published a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginKind {
    /// A device on a listener (or its will).
    Device,
    /// A command from the cloud (the downlink): never sent back up by `[[uplink]]` rules.
    Cloud,
    /// A Modbus or serial reading.
    Field,
    /// A `[[rule]]`'s decision.
    Rules,
    /// The gateway itself (its metrics document).
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub kind: OriginKind,
    /// The publishing session's instance (0: none), for MQTT 5's No Local.
    pub session: u64,
}

impl Origin {
    pub const fn of(kind: OriginKind) -> Self {
        Origin { kind, session: 0 }
    }
}

#[derive(Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// The QoS it was published with; each subscriber gets the lower of it and its own.
    pub qos: u8,
    /// The publisher's retain flag.
    pub retain: bool,
    /// MQTT 5 properties passed on unchanged, encoded (payload format, content type,
    /// response topic, correlation data, user properties); empty for most messages.
    pub props: Bytes,
    /// When its Message Expiry Interval runs out (monotonic).
    pub expires: Option<Instant>,
    pub origin: Origin,
}

impl Message {
    /// Whether its expiry interval has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }

    /// The Message Expiry Interval to send with it now: what is left, rounded up.
    pub fn expiry_left(&self, now: Instant) -> Option<u32> {
        self.expires.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }

    /// Bytes it costs the bounds that count messages: topic plus payload.
    pub fn weight(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// The subscription identifiers a delivery carries (MQTT 5): usually none or one, so the
/// common cases need no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SubIds {
    #[default]
    None,
    One(u32),
    Many(Arc<[u32]>),
}

impl SubIds {
    pub fn as_slice(&self) -> &[u32] {
        match self {
            SubIds::None => &[],
            SubIds::One(id) => std::slice::from_ref(id),
            SubIds::Many(ids) => ids,
        }
    }

    /// These and `id` (0: none).
    pub fn with(self, id: u32) -> SubIds {
        match (self, id) {
            (ids, 0) => ids,
            (SubIds::None, id) => SubIds::One(id),
            (ids, id) => {
                let mut all = ids.as_slice().to_vec();
                if !all.contains(&id) {
                    all.push(id);
                }
                SubIds::Many(all.into())
            }
        }
    }
}

/// Tells an in-process publisher (the downlink, the rules) when a message's hand-off is
/// complete: every subscriber that was to get it at QoS 1 or 2 acknowledged it, or it is
/// held for an offline persistent session, or it can never be delivered (the subscriber's
/// session ended). `key` is sent on `done` once.
#[derive(Debug, Clone)]
pub struct Completion {
    pub done: mpsc::UnboundedSender<u64>,
    pub key: u64,
}

/// One outstanding part of a hand-off; the last one dropped completes it.
#[derive(Debug)]
pub struct Token(Arc<TokenInner>);

#[derive(Debug)]
struct TokenInner {
    pending: AtomicUsize,
    completion: Completion,
}

impl Token {
    pub fn new(completion: Completion) -> Token {
        Token(Arc::new(TokenInner {
            pending: AtomicUsize::new(1),
            completion,
        }))
    }

    /// Another outstanding part of the same hand-off.
    pub fn share(&self) -> Token {
        self.0.pending.fetch_add(1, Ordering::Relaxed);
        Token(self.0.clone())
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let c = &self.0.completion;
            let _ = c.done.send(c.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_off_completes_when_its_last_part_is_done() {
        let (done, mut rx) = mpsc::unbounded_channel();
        let first = Token::new(Completion { done, key: 7 });
        let a = first.share();
        let b = first.share();
        drop(first);
        drop(a);
        assert!(rx.try_recv().is_err());
        drop(b);
        assert_eq!(rx.try_recv(), Ok(7));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn expiry_is_rounded_up() {
        let now = Instant::now();
        let m = Message {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: 0,
            retain: false,
            props: Bytes::new(),
            expires: Some(now + std::time::Duration::from_millis(1500)),
            origin: Origin::of(OriginKind::Device),
        };
        assert_eq!(m.expiry_left(now), Some(2));
        assert!(!m.expired(now));
        assert!(m.expired(now + std::time::Duration::from_secs(2)));
        assert_eq!(SubIds::None.with(3).with(4).with(3).as_slice(), &[3, 4][..]);
    }
}
