//! The front door: accepts device connections (plain TCP, and TLS on `local.tls_listen`),
//! reads and judges the CONNECT under a deadline, and splices the connection to rumqttd's
//! internal port, packet by packet.
//!
//! It exists because rumqttd's network side cannot be handed a stream: what rumqttd alone
//! gets wrong for a site full of small devices is fixed here.
//! - Authentication (password file, anonymous policy, certificate name) happens here, and
//!   rumqttd's internal port only takes the per-start credential the front door puts into
//!   every CONNECT it forwards: nothing on the box can walk around these checks.
//! - Every packet is framed and parsed once ([`packet`](super::packet)) and handed to the
//!   connection's [hooks](super::hook): the ACL gate, and whatever else needs to see them.
//! - keepalive 0 (allowed by MQTT 3.1.1, used by many small devices) is refused by rumqttd,
//!   so the CONNECT is rewritten to the longest keepalive and the front door itself pings
//!   rumqttd on the device's behalf, hiding the answers from the device.
//! - Client ids of the gateway's own links are refused (a device taking one would
//!   disconnect the link).
//! - Memory is bounded: a connection's buffer grows only with bytes that arrived, up to the
//!   largest packet, and all buffers together stay within a budget; connections are
//!   bounded, and a peer that does not finish its TLS handshake and CONNECT within
//!   `local.connect_timeout` is dropped, without holding up anyone else's accept.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::auth::{self, Credentials, Refusal, Throttle};
use super::hook::{Chain, ConnInfo, Direction, HookFactory, Replies, Verdict, WillInfo};
use super::packet::{self, Budget, ConnAck, Connect, Framer, PacketError, Protocol};
use super::policy::SharedPolicy;
use super::{SideDoor, INTERNAL_ID_PREFIX};
use crate::health::{inc, RateLimit, SharedHealth};

/// How often the front door pings rumqttd for an idle keepalive-0 device. rumqttd drops a
/// connection after 1.5 × keepalive (65535 s here) without a packet.
const PING_EVERY: Duration = Duration::from_secs(3600);
const MAX_KEEPALIVE: u16 = u16::MAX;
/// Packets a hook sends across to the other direction, queued per connection.
const CROSS_QUEUE: usize = 64;
/// Bytes gathered before they are written: a burst goes out in few large writes.
const WRITE_BATCH: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Largest packet a device may send (CONNECT with its will included).
    pub max_packet: usize,
    /// Bytes of unfinished packets all device connections may hold together.
    pub max_buffered: usize,
}

/// Bytes of unfinished device packets the front door holds at most, all connections
/// together (at least four of the largest packets).
const BUFFERS: usize = 64 << 20;
/// Room for topic, properties and headers on top of `local.max_payload` in a packet.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// The limits a config asks for. `connect_timeout` and `max_connections` may change with
/// a reload (the listeners read them per connection); the packet and buffer sizes follow
/// `local.max_payload`, which needs a restart.
pub fn limits(config: &crate::config::LocalConfig) -> Limits {
    let max_packet = config.max_payload + PACKET_OVERHEAD;
    Limits {
        connect_timeout: config.connect_timeout,
        max_connections: config.max_connections,
        max_packet,
        max_buffered: BUFFERS.max(4 * max_packet),
    }
}

/// Builds the front door every listener serves (see [`FrontDoor::serve`]). Every
/// connection's hooks are the gate (ACLs, subscription cap) first, nearest the device, then
/// one from each of `more_hooks`, in order: a consumer placed after the gate sees what
/// actually reaches rumqttd (a SUBSCRIBE without its denied filters, only allowed
/// publishes).
#[allow(clippy::too_many_arguments)]
pub fn open(
    config: &crate::config::LocalConfig,
    limits: watch::Receiver<Limits>,
    backends: Backends,
    side_door: SideDoor,
    policy: SharedPolicy,
    more_hooks: Vec<Arc<dyn HookFactory>>,
    health: SharedHealth,
) -> Arc<FrontDoor> {
    let gate = super::GateFactory {
        policy: policy.clone(),
        max_subscriptions: config.security.max_subscriptions,
        health: health.clone(),
    };
    let hooks = std::iter::once(Arc::new(gate) as Arc<dyn HookFactory>)
        .chain(more_hooks)
        .collect();
    FrontDoor::new(limits, backends, side_door, policy, hooks, health)
}

/// Where connections go: MQTT 3.1.1 to one internal port, MQTT 5 to the other (if any).
#[derive(Debug, Clone, Copy)]
pub struct Backends {
    pub v4: SocketAddr,
    pub v5: Option<SocketAddr>,
}

/// TLS on a listener.
#[derive(Clone)]
pub struct TlsListener {
    acceptor: tokio_rustls::TlsAcceptor,
    use_identity_as_username: bool,
}

impl TlsListener {
    pub fn new(config: &crate::config::DeviceTls) -> Result<Self, super::tls::TlsSetupError> {
        Ok(TlsListener {
            acceptor: tokio_rustls::TlsAcceptor::from(super::tls::server_config(config)?),
            use_identity_as_username: config.use_identity_as_username,
        })
    }
}

/// Everything the listeners share.
pub struct FrontDoor {
    limits: watch::Receiver<Limits>,
    backends: Backends,
    side_door: SideDoor,
    policy: SharedPolicy,
    hooks: Vec<Arc<dyn HookFactory>>,
    health: SharedHealth,
    /// Devices connected now, held to the current `max_connections`.
    active: Arc<AtomicUsize>,
    throttle: Throttle,
    budget: Arc<Budget>,
    /// Broker-side buffers are bounded per connection only: rumqttd is ours.
    broker_budget: Arc<Budget>,
    log: Mutex<RateLimit>,
    login_log: Mutex<RateLimit>,
}

/// Why a connection ended early; each is counted and logged.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no TLS handshake and CONNECT within local.connect_timeout")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Packet(#[from] PacketError),
    #[error("login refused: {reason} (user {user:?}, client id {client_id:?})")]
    Login {
        reason: &'static str,
        user: Option<String>,
        client_id: String,
    },
    #[error("client id {0:?} is reserved for the gateway's own links")]
    ReservedId(String),
    #[error("MQTT 5 client, but local.listen_v5 is not set")]
    NoV5,
    #[error("{0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("the embedded broker: {0}")]
    Broker(String),
}

impl FrontDoor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        limits: watch::Receiver<Limits>,
        backends: Backends,
        side_door: SideDoor,
        policy: SharedPolicy,
        hooks: Vec<Arc<dyn HookFactory>>,
        health: SharedHealth,
    ) -> Arc<Self> {
        let max_buffered = limits.borrow().max_buffered;
        Arc::new(FrontDoor {
            active: Arc::new(AtomicUsize::new(0)),
            budget: Budget::new(max_buffered),
            broker_budget: Budget::new(usize::MAX),
            limits,
            backends,
            side_door,
            policy,
            hooks,
            health,
            throttle: Throttle::default(),
            log: Mutex::new(RateLimit::new(Duration::from_secs(10))),
            login_log: Mutex::new(RateLimit::new(Duration::from_secs(10))),
        })
    }

    /// Accepts devices on `listener` until shutdown; each connection runs on its own task
    /// (its TLS handshake too, so a stalled handshake holds up no one).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsListener>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut refused_log = RateLimit::new(Duration::from_secs(10));
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(v) => {
                    backoff = Duration::from_millis(10);
                    v
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait and retry, doubling.
                    warn!(error = %e, "accepting a device connection failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let max_connections = self.limits.borrow().max_connections;
            let Some(permit) = Permit::take(&self.active, max_connections) else {
                inc(&self.health.counters.front_door_refused);
                if let Some(held) = refused_log.check() {
                    warn!(%peer, max_connections, earlier_warnings_suppressed = held,
                        "device connection refused: local.max_connections reached");
                }
                continue;
            };
            let door = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Err(reason) = door.handle(stream, peer, tls).await {
                    door.count_and_log(peer, &reason);
                }
                drop(permit);
            });
        }
    }

    fn count_and_log(&self, peer: SocketAddr, reason: &Refused) {
        let counters = &self.health.counters;
        match reason {
            Refused::Io(_) => {
                debug!(%peer, %reason, "device connection ended");
                return;
            }
            Refused::Broker(_) => {
                error!(%peer, %reason, "device connection dropped");
                inc(&counters.front_door_refused);
                return;
            }
            Refused::Timeout => inc(&counters.front_door_timeouts),
            Refused::Tls(_) => inc(&counters.tls_failures),
            Refused::Login { .. } => inc(&counters.auth_failures),
            Refused::Packet(PacketError::TooLarge { .. } | PacketError::OverBudget) => {
                inc(&counters.front_door_oversize)
            }
            Refused::Packet(_) | Refused::Protocol(_) | Refused::NoV5 => {
                inc(&counters.front_door_malformed)
            }
            Refused::ReservedId(_) => {}
        }
        inc(&counters.front_door_refused);
        // Refused logins have their own budget of log lines: a flood of garbage must not
        // hide a password guesser.
        let log = match reason {
            Refused::Login { .. } => &self.login_log,
            _ => &self.log,
        };
        let held = log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .check();
        if let Some(held) = held {
            warn!(%peer, %reason, earlier_warnings_suppressed = held, "device connection refused or closed by the front door");
        }
    }

    async fn handle(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsListener>,
    ) -> Result<(), Refused> {
        let _ = tcp.set_nodelay(true);
        let deadline = Instant::now() + self.limits.borrow().connect_timeout;
        // Each path is boxed and only the one taken is allocated: a connection that has not
        // sent its CONNECT yet holds a small future, not the largest one it could become.
        let Some(tls) = tls else {
            return Box::pin(self.connection(tcp, peer, deadline, None)).await;
        };
        let stream = tokio::time::timeout_at(deadline, Box::pin(tls.acceptor.accept(tcp)))
            .await
            .map_err(|_| Refused::Timeout)?
            .map_err(Refused::Tls)?;
        let name = match tls.use_identity_as_username {
            true => Some(super::tls::certificate_name(stream.get_ref().1).ok_or(
                Refused::Login {
                    reason: "the client certificate has no common name",
                    user: None,
                    client_id: String::new(),
                },
            )?),
            false => None,
        };
        Box::pin(self.connection(stream, peer, deadline, name)).await
    }

    /// Reads and judges the CONNECT, then splices the connection to rumqttd.
    async fn connection<S>(
        &self,
        mut device: S,
        peer: SocketAddr,
        deadline: Instant,
        certificate_name: Option<String>,
    ) -> Result<(), Refused>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut framer = Framer::new(self.limits.borrow().max_packet, self.budget.clone());
        let len = tokio::time::timeout_at(deadline, read_frame(&mut device, &mut framer))
            .await
            .map_err(|_| Refused::Timeout)??;
        let frame = framer.peek()?.unwrap_or_default();
        let connect = match Connect::parse(frame) {
            Ok(connect) => connect,
            Err(PacketError::UnsupportedProtocol(level)) => {
                let _ = device
                    .write_all(&ConnAck::refusal(Protocol::V311, 0x01))
                    .await;
                return Err(PacketError::UnsupportedProtocol(level).into());
            }
            Err(e) => return Err(e.into()),
        };
        let protocol = connect.protocol();
        if connect.client_id.starts_with(INTERNAL_ID_PREFIX) {
            let code = if protocol == Protocol::V5 { 0x85 } else { 0x02 };
            let _ = device.write_all(&ConnAck::refusal(protocol, code)).await;
            return Err(Refused::ReservedId(connect.client_id.to_owned()));
        }
        let backend = match (protocol, self.backends.v5) {
            (Protocol::V311, _) => self.backends.v4,
            (Protocol::V5, Some(v5)) => v5,
            (Protocol::V5, None) => {
                let _ = device.write_all(&ConnAck::refusal(protocol, 0x84)).await;
                return Err(Refused::NoV5);
            }
        };
        let credentials = Credentials {
            username: connect.username.map(str::to_owned),
            password: connect.password.map(<[u8]>::to_vec),
            certificate_name,
        };
        let username = match self.login(peer, &credentials).await {
            Ok(username) => username,
            Err(refusal) => {
                let refusal_packet = ConnAck::refusal(protocol, refusal.code(protocol));
                let _ = device.write_all(&refusal_packet).await;
                let _ = device.flush().await;
                return Err(Refused::Login {
                    reason: refusal.as_str(),
                    user: credentials.username,
                    client_id: connect.client_id.to_owned(),
                });
            }
        };
        let keep_alive_zero = connect.keep_alive == 0;
        if keep_alive_zero {
            info!(client_id = %connect.client_id, "device connected with keepalive 0; the gateway keeps its session alive");
        }
        let v5_u16 = |id| match packet::find_property(connect.properties, id) {
            Ok(Some(packet::Property::U16(value))) => Some(value),
            _ => None,
        };
        let info = ConnInfo {
            peer,
            protocol,
            client_id: connect.client_id.to_owned(),
            username,
            clean_start: connect.clean_start,
            session_expiry: match protocol {
                Protocol::V5 => Some(connect.session_expiry()?),
                Protocol::V311 => None,
            },
            will: connect.will.as_ref().map(|will| WillInfo {
                topic: will.topic.to_owned(),
                payload: Bytes::copy_from_slice(will.payload),
                qos: will.qos,
                retain: will.retain,
            }),
            receive_maximum: v5_u16(0x21),
            maximum_packet_size: match packet::find_property(connect.properties, 0x27) {
                Ok(Some(packet::Property::U32(size))) => Some(size),
                _ => None,
            },
        };
        let session = BrokerSession::of(&info);
        // rumqttd 0.20 aliases topics toward a client per subscription filter, not per
        // topic (a wildcard subscriber would get the wrong topics): it is never told that
        // the device takes aliases.
        let properties = match protocol {
            Protocol::V5 => packet::without_property(connect.properties, 0x22)?,
            Protocol::V311 => Vec::new(),
        };
        let forwarded = Connect {
            keep_alive: if keep_alive_zero {
                MAX_KEEPALIVE
            } else {
                connect.keep_alive
            },
            clean_start: session.clean,
            properties: &properties,
            username: Some(&self.side_door.username),
            password: Some(self.side_door.password.as_bytes()),
            ..connect
        }
        .encode();
        framer.consume(len);

        if session.end_first {
            // Boxed: a connection waiting for its CONNECT must stay small.
            let end =
                super::internal::end_session(backend, &self.side_door, protocol, &info.client_id);
            if let Err(e) = Box::pin(end).await {
                return Err(Refused::Broker(format!(
                    "ending the earlier session of {:?}: {e}",
                    info.client_id
                )));
            }
        }
        let mut broker = TcpStream::connect(backend)
            .await
            .map_err(|e| Refused::Broker(format!("connecting to {backend}: {e}")))?;
        let _ = broker.set_nodelay(true);
        broker
            .write_all(&forwarded)
            .await
            .map_err(|e| Refused::Broker(format!("forwarding CONNECT: {e}")))?;
        let hooks = self.hooks.iter().filter_map(|f| f.open(&info)).collect();
        let chain = Mutex::new(Chain::new(protocol, hooks));
        let result = Box::pin(self.splice(device, broker, framer, &chain, keep_alive_zero)).await;
        chain.lock().unwrap_or_else(|p| p.into_inner()).closed();
        result
    }

    /// Judges a login; a failing address waits its turn first.
    async fn login(
        &self,
        peer: SocketAddr,
        credentials: &Credentials,
    ) -> Result<Option<String>, Refusal> {
        let wait = self.throttle.admit(peer.ip());
        if !wait.is_zero() {
            debug!(%peer, ?wait, "slowing down an address with failed logins");
            tokio::time::sleep(wait).await;
        }
        let policy = self.policy.load_full();
        let hashing = policy.passwords.is_some() && credentials.username.is_some();
        let verdict = match hashing {
            // Password hashes take CPU time: off the async threads.
            true => {
                let credentials = credentials.clone();
                tokio::task::spawn_blocking(move || {
                    auth::authenticate(
                        policy.passwords.as_ref(),
                        policy.allow_anonymous,
                        &credentials,
                    )
                })
                .await
                .unwrap_or(Err(Refusal::NotAuthorized))
            }
            false => auth::authenticate(
                policy.passwords.as_ref(),
                policy.allow_anonymous,
                credentials,
            ),
        };
        match verdict {
            Ok(_) => self.throttle.succeeded(peer.ip()),
            Err(_) => self.throttle.failed(peer.ip()),
        }
        verdict
    }

    /// Moves packets both ways until either side closes.
    async fn splice<S>(
        &self,
        device: S,
        broker: TcpStream,
        device_framer: Framer,
        chain: &Mutex<Chain>,
        keep_alive_zero: bool,
    ) -> Result<(), Refused>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (device_rx, device_tx) = tokio::io::split(device);
        let (broker_rx, broker_tx) = broker.into_split();
        let (to_device, device_inbox) = mpsc::channel(CROSS_QUEUE);
        let (to_broker, broker_inbox) = mpsc::channel(CROSS_QUEUE);
        let owed_pings = AtomicU32::new(0);
        let up = Pump {
            direction: Direction::FromDevice,
            reader: device_rx,
            writer: broker_tx,
            framer: device_framer,
            inbox: broker_inbox,
            across: to_device,
            chain,
            owed_pings: &owed_pings,
            ping_idle: keep_alive_zero,
            out: Vec::new(),
        };
        let down = Pump {
            direction: Direction::FromBroker,
            reader: broker_rx,
            writer: device_tx,
            framer: Framer::new(self.limits.borrow().max_packet, self.broker_budget.clone()),
            inbox: device_inbox,
            across: to_broker,
            chain,
            owed_pings: &owed_pings,
            ping_idle: false,
            out: Vec::new(),
        };
        tokio::select! {
            up = up.run() => up,
            down = down.run() => down.map_err(|e| match e {
                Refused::Packet(e) => Refused::Broker(format!("unreadable packet: {e}")),
                other => other,
            }),
        }
    }
}

/// What rumqttd is told about a device's session. rumqttd 0.20 keeps a session exactly when
/// clean start is 0 and ignores MQTT 5's session expiry interval, so an MQTT 5 session
/// with an expiry interval is kept (clean start 0 toward rumqttd), one without is not, and
/// clean start with an expiry interval (a new session that outlives the connection) first
/// ends the old one. Expiry itself is kept by the gateway's state (`crate::state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BrokerSession {
    clean: bool,
    end_first: bool,
}

impl BrokerSession {
    fn of(info: &ConnInfo) -> Self {
        match (info.protocol, info.session_expiry.unwrap_or(0)) {
            (Protocol::V311, _) => BrokerSession {
                clean: info.clean_start,
                end_first: false,
            },
            (Protocol::V5, 0) => BrokerSession {
                clean: true,
                end_first: false,
            },
            (Protocol::V5, _) => BrokerSession {
                clean: false,
                end_first: info.clean_start,
            },
        }
    }
}

/// One of `local.max_connections`, held while a device is connected. A counter rather than
/// a semaphore, so that a reload can lower the limit below the connections already open
/// (they stay; new ones wait for the count to fall).
struct Permit(Arc<AtomicUsize>);

impl Permit {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(active.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Raises the soft limit of open files to the hard limit: each device costs three
/// descriptors in this process (its socket, the front door's connection to rumqttd and
/// rumqttd's end of it), and systemd's default soft limit of 1024 would refuse devices
/// long before `local.max_connections`. Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // rlim_t is a u32 on 32-bit targets (armhf).
    #[allow(clippy::useless_conversion)]
    let in_force = u64::from(limit.rlim_cur);
    in_force
}

/// The largest single read.
const READ_SIZE: usize = 16 * 1024;

thread_local! {
    /// Where every connection served by this thread reads into: reads can be large (few
    /// system calls), while a connection's framer keeps only the bytes that arrived.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_SIZE]);
}

/// Reads what `reader` has ready (16 KiB at most) and hands exactly those bytes to
/// `framer`; 0 at the end of the stream. The scratch buffer is borrowed only within one
/// poll, so this is as cancel-safe as `poll_read` itself.
async fn read_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    framer: &mut Framer,
) -> Result<usize, Refused> {
    std::future::poll_fn(|cx| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(Refused::Io(e))),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    Poll::Ready(framer.push(buf.filled()).map(|()| n).map_err(Refused::from))
                }
            }
        })
    })
    .await
}

/// Reads until one whole packet is in `framer`; returns its length.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    framer: &mut Framer,
) -> Result<usize, Refused> {
    loop {
        if let Some(frame) = framer.peek()? {
            return Ok(frame.len());
        }
        if read_into(stream, framer).await? == 0 {
            return Err(Refused::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// One direction of a spliced connection: reads and frames from one side, runs each
/// packet through the hooks, writes to the other side. Packets the hooks address to the
/// side this pump reads from go `across` to the other pump, which owns that writer.
struct Pump<'a, R, W> {
    direction: Direction,
    reader: R,
    writer: W,
    framer: Framer,
    /// Packets the other pump's hooks send to this pump's writer.
    inbox: mpsc::Receiver<Bytes>,
    across: mpsc::Sender<Bytes>,
    chain: &'a Mutex<Chain>,
    owed_pings: &'a AtomicU32,
    /// Ping rumqttd when the device is silent (keepalive 0).
    ping_idle: bool,
    out: Vec<u8>,
}

impl<R, W> Pump<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(mut self) -> Result<(), Refused> {
        // The CONNECT may have come with more packets behind it.
        self.process().await?;
        let idle = tokio::time::sleep(PING_EVERY);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                read = read_into(&mut self.reader, &mut self.framer) => {
                    if read? == 0 {
                        return Ok(());
                    }
                    self.process().await?;
                    if self.ping_idle {
                        idle.as_mut().reset(Instant::now() + PING_EVERY);
                    }
                }
                Some(packet) = self.inbox.recv() => {
                    self.writer.write_all(&packet).await?;
                    self.writer.flush().await?;
                }
                _ = idle.as_mut(), if self.ping_idle => {
                    idle.as_mut().reset(Instant::now() + PING_EVERY);
                    if self.framer.buffered() == 0 {
                        self.owed_pings.fetch_add(1, Ordering::Relaxed);
                        self.writer.write_all(&packet::PINGREQ_PACKET).await?;
                        self.writer.flush().await?;
                    }
                }
            }
        }
    }

    /// Runs every whole packet in the framer through the hooks and writes what passes.
    async fn process(&mut self) -> Result<(), Refused> {
        let mut replies = Replies::default();
        while let Some(frame) = self.framer.peek()? {
            let len = frame.len();
            let verdict = if self.hidden_ping(frame) {
                Verdict::Drop
            } else {
                let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
                chain.run(self.direction, frame, &mut replies)?
            };
            match verdict {
                Verdict::Pass => self.out.extend_from_slice(frame),
                Verdict::Replace(bytes) => self.out.extend_from_slice(&bytes),
                Verdict::Drop => {}
                Verdict::Close(why) => return Err(Refused::Protocol(why)),
            }
            self.framer.consume(len);
            let (ours, theirs) = match self.direction {
                Direction::FromDevice => (&mut replies.to_broker, &mut replies.to_device),
                Direction::FromBroker => (&mut replies.to_device, &mut replies.to_broker),
            };
            for packet in ours.drain(..) {
                self.out.extend_from_slice(&packet);
            }
            let across = std::mem::take(theirs);
            if self.out.len() >= WRITE_BATCH || !across.is_empty() {
                self.write_out().await?;
            }
            for packet in across {
                self.send_across(packet).await?;
            }
        }
        self.write_out().await
    }

    /// A PINGRESP answering the front door's own PINGREQ: the device never asked.
    fn hidden_ping(&self, frame: &[u8]) -> bool {
        self.direction == Direction::FromBroker
            && frame == [packet::PINGRESP << 4, 0]
            && self
                .owed_pings
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| o.checked_sub(1))
                .is_ok()
    }

    async fn write_out(&mut self) -> Result<(), Refused> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await?;
        self.out.clear();
        if self.out.capacity() > 2 * WRITE_BATCH {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Hands a packet to the other pump; while waiting for room, keeps writing what the
    /// other pump hands this one, so that two pumps can never wait on each other.
    async fn send_across(&mut self, packet: Bytes) -> Result<(), Refused> {
        loop {
            tokio::select! {
                permit = self.across.reserve() => {
                    if let Ok(permit) = permit {
                        permit.send(packet);
                    }
                    return Ok(());
                }
                Some(incoming) = self.inbox.recv() => {
                    self.writer.write_all(&incoming).await?;
                    self.writer.flush().await?;
                }
            }
        }
    }
}
