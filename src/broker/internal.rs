//! The gateway's own clients of the broker: the downlink, the rules, the field devices and
//! the status reporter publish through the router like any device (their messages carry
//! their origin), and subscribe with a session of their own that hands over what it gets
//! in batches. A QoS 1 publication may ask to learn when its hand-off is complete.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::codec::SubOptions;
use super::core::wake_all;
use super::intake;
use super::message::{Completion, Message, Origin, OriginKind, Token};
use super::router::{Filter, Sub};
use super::session::{SessionKey, Signal};
use super::Shared;
use crate::outbox::OutboxError;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("topic {topic:?} {why}")]
    Topic { topic: String, why: String },
    #[error("{0}")]
    Outbox(#[from] OutboxError),
}

/// What an in-process client publishes.
#[derive(Debug)]
pub struct Publication {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Told once every subscriber that was to get it at QoS 1/2 acknowledged it (or it is
    /// held for an offline persistent session).
    pub completion: Option<Completion>,
}

pub struct Client {
    shared: Arc<Shared>,
    key: SessionKey,
    signal: Arc<Signal>,
    origin: Origin,
    intake: intake::Batch,
}

impl Client {
    pub(super) fn open(shared: Arc<Shared>, name: &str, kind: OriginKind) -> Client {
        let signal = Arc::new(Signal::default());
        let (key, instance) = {
            let mut core = shared.lock();
            let key = core.open_internal(name, signal.clone());
            let instance = core.sessions.get(key).map_or(0, |s| s.instance);
            (key, instance)
        };
        let intake = shared.intake.batch();
        Client {
            shared,
            key,
            signal,
            origin: Origin {
                kind,
                session: instance,
            },
            intake,
        }
    }

    /// Subscribes this client's session to `filter` at `qos`.
    pub fn subscribe(&mut self, filter: &str, qos: u8) -> Result<(), &'static str> {
        let parsed = Filter::parse(filter)?;
        let sub = Sub {
            session: self.key,
            options: SubOptions {
                qos,
                ..SubOptions::default()
            },
            id: 0,
        };
        let mut wake = Vec::new();
        self.shared
            .lock()
            .subscribe(self.key, filter, parsed, sub, &mut wake);
        wake_all(&mut wake);
        Ok(())
    }

    pub fn unsubscribe(&mut self, filter: &str) {
        self.shared.lock().unsubscribe(self.key, filter);
    }

    /// Publishes through the router, and hands it to the intake (the outbox, when an
    /// `[[uplink]]` rule matches; waits while the outbox is saturated).
    pub async fn publish(&mut self, p: Publication) -> Result<usize, PublishError> {
        if let Err(why) = crate::topics::valid_topic(&p.topic) {
            return Err(PublishError::Topic {
                topic: p.topic,
                why,
            });
        }
        let msg = Arc::new(Message {
            topic: p.topic.into(),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            props: Bytes::new(),
            expires: None,
            origin: self.origin,
        });
        let token = p.completion.map(Token::new);
        let mut wake = Vec::new();
        let deliveries = self.shared.lock().route(&msg, token.as_ref(), &mut wake);
        drop(token);
        wake_all(&mut wake);
        self.intake.offer(&msg);
        self.intake.flush().await?;
        Ok(deliveries)
    }

    /// Waits for messages for this client's subscriptions and takes all that are queued
    /// (their hand-off is complete once taken).
    pub async fn recv(&mut self, out: &mut Vec<Arc<Message>>) {
        loop {
            {
                let mut core = self.shared.lock();
                let now = Instant::now();
                if let Some(s) = core.sessions.get_mut(self.key) {
                    s.wake_pending = false;
                    out.extend(
                        s.drain_queue()
                            .filter(|q| !q.msg.expired(now))
                            .map(|q| q.msg.clone()),
                    );
                }
            }
            if !out.is_empty() {
                return;
            }
            self.signal.notify.notified().await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut wake = Vec::new();
        self.shared.lock().end_session(self.key, &mut wake);
        wake_all(&mut wake);
    }
}
