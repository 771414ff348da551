//! The site's local MQTT broker: embedded rumqttd behind our own front door, and the one
//! intake subscription through which local messages reach the outbox.
//!
//! rumqttd listens only on internal loopback ports that take only the front door's
//! per-start credential; devices connect to `local.listen` (and `local.tls_listen`), where
//! the [`front_door`] authenticates them, fixes what rumqttd refuses (keepalive 0), keeps
//! devices away from the internal link ids, and splices the connection through, packet by
//! packet: [`packet`] frames and parses, [`hook`]s look at every packet ([`acl`] through
//! the gate), [`auth`] and [`policy`] hold the password and ACL files, [`tls`] the device
//! certificates.

pub mod acl;
pub mod auth;
pub mod front_door;
mod gate;
pub mod hook;
mod intake;
pub mod internal;
pub mod listeners;
pub mod packet;
pub mod policy;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;

use std::future::Future;
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Broker, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tracing::{error, info};

use crate::config::LocalConfig;

pub use gate::GateFactory;
pub use intake::{run_intake, IntakeRule, Rules as IntakeRules};

/// What MQTT 5 devices on `local.listen_v5` get and do not get (rumqttd 0.20's MQTT 5 is
/// partial): said by `check` and logged at start for a config with `listen_v5`.
pub const MQTT5_LIMITS: &str = "\
MQTT 5 (local.listen_v5): session expiry intervals, retained messages at QoS 0 at their own \
QoS, topic aliases from devices and a device's maximum packet size are honoured. Not yet: \
message expiry intervals (a message is delivered however old it is), subscription \
identifiers, a device's receive maximum for live messages (up to 100 QoS 1/2 messages are in \
flight to any device; only messages queued before a restart keep to it), a message retained \
at QoS 1 reaches a QoS 2 subscription at QoS 2, and the MQTT 5 properties of messages queued \
or retained across a restart (user properties, content type, response topic).";

/// Client ids of the gateway's own in-process links start with this; the front door refuses
/// devices that try to use it (a device taking a link's id would disconnect the link).
pub const INTERNAL_ID_PREFIX: &str = "bridgehead-internal-";

/// Bytes each subscribed filter may hold in rumqttd's in-memory log before its oldest
/// segment is dropped: a subscriber further behind than this loses data (`intake_overruns`).
/// The log stays full once a burst filled it (segments are freed only on rollover), and
/// small messages cost about twice their bytes there, so this is most of the gateway's
/// memory after a burst: 4 x 8 MiB measured 85 MiB RSS after 200k messages, 4 x 2 MiB
/// 47 MiB. 8 MiB is about 90k messages of 64 bytes, or 4 s of an intake stalled at 20k
/// msg/s; the intake keeps up with the local side at 250k msg/s here.
const SEGMENT_SIZE: usize = 2 << 20;
const SEGMENT_COUNT: usize = 4;

/// Room for topic and headers on top of `local.max_payload` in a packet.
const PACKET_OVERHEAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("finding a free internal loopback port for the embedded broker: {0}")]
    InternalPort(std::io::Error),
    #[error("creating the in-process link {name}: {message}")]
    Link { name: String, message: String },
    #[error("starting the embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// The embedded broker before it starts serving: links are made here.
pub struct LocalBroker {
    broker: Broker,
    /// Where the front door sends MQTT 3.1.1 and MQTT 5 connections.
    pub internal_v4: SocketAddr,
    pub internal_v5: Option<SocketAddr>,
    /// The only login rumqttd's internal ports take.
    pub side_door: SideDoor,
}

/// The credential of the front door at rumqttd's internal ports, new at every start: a
/// process on the box that connects to those ports directly does not know it, so it
/// cannot walk around the front door's checks. The gateway's in-process links do not use
/// TCP and need none.
#[derive(Clone)]
pub struct SideDoor {
    pub username: String,
    pub password: String,
}

impl SideDoor {
    fn new() -> Self {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let password: String = (0..32)
            .map(|_| format!("{:02x}", rng.gen::<u8>()))
            .collect();
        SideDoor {
            username: format!("{INTERNAL_ID_PREFIX}front-door"),
            password,
        }
    }
}

impl std::fmt::Debug for SideDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideDoor")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A bidirectional in-process connection to the router.
pub struct Link {
    pub tx: LinkTx,
    pub rx: LinkRx,
}

impl Link {
    /// The next notification for this link. rumqttd stops feeding a link that was sent
    /// `Unschedule` until the link says it is ready again (forgetting that stalls the link
    /// and then loses data); that is done here, for every link. The ready signal is sent
    /// synchronously, so cancelling this future never loses it.
    pub async fn next(&mut self) -> Result<Option<Notification>, LinkError> {
        loop {
            match self.rx.next().await? {
                Some(Notification::Unschedule) => self.rx.ready()?,
                other => return Ok(other),
            }
        }
    }

    /// Publishes into the broker. With a packet id, at QoS 1: the broker's PUBACK for it
    /// comes back on this link (a confirmed hand-off); without, at QoS 0. Returns once the
    /// message is queued toward the router.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        retain: bool,
        pkid: Option<u16>,
    ) -> Result<(), LinkError> {
        let publish = match pkid {
            None => Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, retain),
            Some(pkid) => {
                // rumqttd keeps Publish's QoS and packet id private; its own serialised form
                // is the way to build a QoS 1 publish from outside.
                let mut raw = BytesMut::with_capacity(5 + topic.len() + payload.len());
                raw.put_u8(0b0011_0010 | retain as u8);
                raw.put_u16(pkid);
                raw.put_u16(topic.len() as u16);
                raw.extend_from_slice(topic.as_bytes());
                raw.extend_from_slice(&payload);
                Publish::deserialize(raw.freeze())
            }
        };
        self.tx
            .send(Packet::Publish(publish, None))
            .await
            .map(|_| ())
    }

    /// The next notification if the broker has one ready, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Option<Notification>, LinkError>> {
        let mut next = std::pin::pin!(self.next());
        match next.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => Some(result),
            Poll::Pending => None,
        }
    }
}

impl LocalBroker {
    pub fn new(config: &LocalConfig) -> Result<Self, BrokerError> {
        let internal_v4 = free_loopback_port()?;
        let internal_v5 = match config.listen_v5 {
            Some(_) => Some(free_loopback_port()?),
            None => None,
        };
        let side_door = SideDoor::new();
        let login = HashMap::from([(side_door.username.clone(), side_door.password.clone())]);
        let settings = |name: &str, listen: SocketAddr| ServerSettings {
            name: name.to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: config.connect_timeout.as_millis().min(60_000) as u16,
                max_payload_size: config.max_payload + PACKET_OVERHEAD,
                max_inflight_count: 100,
                auth: Some(login.clone()),
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let rumqttd_config = rumqttd::Config {
            id: 0,
            router: RouterConfig {
                // Devices plus the gateway's own links.
                max_connections: config.max_connections + 64,
                max_outgoing_packet_count: 4096,
                max_segment_size: SEGMENT_SIZE,
                max_segment_count: SEGMENT_COUNT,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([(
                "v4".to_owned(),
                settings("local-v4", internal_v4),
            )])),
            v5: internal_v5
                .map(|addr| HashMap::from([("v5".to_owned(), settings("local-v5", addr))])),
            ..Default::default()
        };
        Ok(LocalBroker {
            broker: Broker::new(rumqttd_config),
            internal_v4,
            internal_v5,
            side_door,
        })
    }

    /// A new in-process link named `bridgehead-internal-<name>`.
    pub fn link(&self, name: &str) -> Result<Link, BrokerError> {
        let id = format!("{INTERNAL_ID_PREFIX}{name}");
        let (tx, rx) = self.broker.link(&id).map_err(|e| BrokerError::Link {
            name: id.clone(),
            message: e.to_string(),
        })?;
        Ok(Link { tx, rx })
    }

    /// Starts serving on the internal ports, on a thread of its own (rumqttd blocks forever
    /// and has no shutdown; the process exit ends it).
    pub fn start(mut self) -> Result<(), BrokerError> {
        let (v4, v5) = (self.internal_v4, self.internal_v5);
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = self.broker.start() {
                    error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        info!(internal_v4 = %v4, internal_v5 = ?v5, "embedded broker started; its internal ports take only the front door's per-start credential");
        Ok(())
    }
}

fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(BrokerError::InternalPort)?;
    listener.local_addr().map_err(BrokerError::InternalPort)
}
