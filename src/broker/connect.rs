//! A connection's CONNECT: read within `local.connect_timeout`, judged (protocol level,
//! client id, enhanced authentication, login, will), given its session, and answered with
//! CONNACK. A refusal gets the CONNACK code MQTT defines for it, where there is one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::acl::Access;
use super::auth::{self, Credentials, Refusal};
use super::codec::{reason, ConnAck, Connect, Framer, Packet, PacketError, Properties, Protocol};
use super::connection::{read_into, Close};
use super::core::{wake_all, Open, Opened};
use super::session::{ConnLink, Signal, StoredWill, NEVER_EXPIRES};
use super::{Permit, Shared, INTERNAL_ID_PREFIX};
use crate::health::inc;

/// Logins from slowed-down addresses that may wait for their turn at once; more are
/// refused at once, so that a password guesser cannot pile up connections.
const MAX_WAITING_LOGINS: usize = 64;

/// A connection the broker took.
pub struct Accepted {
    pub opened: Opened,
    pub conn_id: u64,
    pub signal: Arc<Signal>,
    pub client_id: Arc<str>,
    pub username: Option<String>,
    pub protocol: Protocol,
    /// The client's Maximum Packet Size.
    pub client_max_packet: usize,
    /// The client's Topic Alias Maximum.
    pub client_alias_max: u16,
    /// The Session Expiry Interval it connected with.
    pub expiry: u32,
}

/// Why a connection was refused before its CONNACK; each is counted and logged.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no TLS handshake and CONNECT within local.connect_timeout")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Packet(PacketError),
    #[error("login refused: {reason} (user {user:?}, client id {client_id:?})")]
    Login {
        reason: &'static str,
        user: Option<String>,
        client_id: String,
    },
    #[error("client id {0:?} is reserved for the gateway's own links")]
    ReservedId(String),
    #[error("{0}")]
    ClientId(&'static str),
    #[error("enhanced authentication (method {0:?}) is not supported")]
    AuthMethod(String),
    #[error("{0}")]
    Protocol(&'static str),
    #[error(
        "keep alive {0} s (0: none) is longer than local.max_keep_alive ({1} s), which an \
         MQTT 3.x client cannot be told"
    )]
    KeepAlive(u16, u16),
    #[error("local.max_connections reached, or the gateway is stopping")]
    Busy,
    #[error(
        "the broker holds {} sessions already (online and offline); a new one is refused",
        super::core::MAX_SESSIONS
    )]
    Sessions,
    #[error("connection lost: {0}")]
    Io(std::io::Error),
}

impl From<Close> for Refused {
    fn from(close: Close) -> Self {
        match close {
            Close::Io(e) => Refused::Io(e),
            Close::Packet(e) => Refused::Packet(e),
            _ => Refused::Io(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Reads the CONNECT, judges it and answers it; the connection's session is open after.
#[allow(clippy::too_many_arguments)]
pub async fn accept<R, W>(
    broker: &Arc<Shared>,
    reader: &mut R,
    writer: &mut W,
    framer: &mut Framer,
    peer: SocketAddr,
    certificate: Option<String>,
    deadline: Instant,
    permit: &mut Option<Permit>,
) -> Result<Accepted, Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let len = tokio::time::timeout_at(deadline, read_frame(reader, framer))
        .await
        .map_err(|_| Refused::Timeout)??;
    let frame = framer.peek().map_err(Refused::Packet)?.unwrap_or_default();
    let connect = match Connect::parse(frame) {
        Ok(connect) => connect,
        Err(PacketError::UnsupportedProtocol(level)) => {
            // [MQTT-3.1.2-2]: 0x01 in the 3.1.1 form, which every version can read.
            refuse(writer, Protocol::V311, 0x01).await;
            return Err(Refused::Packet(PacketError::UnsupportedProtocol(level)));
        }
        Err(e) => return Err(Refused::Packet(e)),
    };
    let protocol = connect.protocol();
    let (identity, username) = match judge(broker, &connect, peer, certificate, permit).await {
        Ok(judged) => judged,
        Err((code, refused)) => {
            if let Some(code) = code {
                refuse(writer, protocol, code).await;
            }
            return Err(refused);
        }
    };
    let accepted = open(broker, &connect, identity, username, peer, writer).await;
    framer.consume(len);
    accepted
}

async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    framer: &mut Framer,
) -> Result<usize, Refused> {
    loop {
        if let Some(frame) = framer.peek().map_err(Refused::Packet)? {
            return Ok(frame.len());
        }
        if read_into(reader, framer).await? == 0 {
            return Err(Refused::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// A CONNACK refusing the connection (session present 0, [MQTT-3.2.2-6]).
async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, protocol: Protocol, code: u8) {
    let packet = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        props: Properties::default(),
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        writer.write_all(&packet.to_vec(protocol)),
    )
    .await;
}

/// The client id to use (and whether the broker assigned it) and the user name it acts
/// as; or the CONNACK code to refuse it with, and why.
type Judged = Result<((Arc<str>, bool), Option<String>), (Option<u8>, Refused)>;

async fn judge(
    broker: &Arc<Shared>,
    connect: &Connect<'_>,
    peer: SocketAddr,
    certificate: Option<String>,
    permit: &mut Option<Permit>,
) -> Judged {
    let v5 = connect.protocol() == Protocol::V5;
    let code = |v311: u8, v5_code: u8| Some(if v5 { v5_code } else { v311 });
    if broker.stopping() {
        return Err((code(0x03, reason::SERVER_BUSY), Refused::Busy));
    }
    if let Some(method) = connect.props.auth_method {
        return Err((
            code(0x05, reason::BAD_AUTH_METHOD),
            Refused::AuthMethod(method.to_owned()),
        ));
    }
    if connect.client_id.starts_with(INTERNAL_ID_PREFIX) {
        return Err((
            code(0x02, reason::CLIENT_ID_NOT_VALID),
            Refused::ReservedId(connect.client_id.to_owned()),
        ));
    }
    let max_keep_alive = broker.settings.load().max_keep_alive;
    if let Some(max) = max_keep_alive.filter(|_| !v5) {
        // MQTT 3.x has no way to tell a client a shorter keep alive (MQTT 5 is told).
        if connect.keep_alive == 0 || connect.keep_alive > max {
            return Err((Some(0x02), Refused::KeepAlive(connect.keep_alive, max)));
        }
    }
    let assigned = connect.client_id.is_empty();
    if assigned {
        // [MQTT-3.1.3-8]: 3.1.1 takes an empty id only with clean session; 3.1 not at all.
        if connect.level == 3 || (connect.level == 4 && !connect.clean_start) {
            return Err((
                code(0x02, reason::CLIENT_ID_NOT_VALID),
                Refused::ClientId("an empty client id without clean session"),
            ));
        }
    }
    if let Some(will) = &connect.will {
        if let Err(why) = crate::topics::valid_topic(will.topic) {
            debug!(%peer, topic = will.topic, %why, "will topic refused");
            return Err((
                code(0x02, reason::TOPIC_NAME_INVALID).filter(|_| v5),
                Refused::Protocol("a will topic that is not a valid topic name"),
            ));
        }
    }
    let credentials = Credentials {
        username: connect.username.map(str::to_owned),
        password: connect.password.map(<[u8]>::to_vec),
        certificate_name: certificate,
    };
    let username = match login(broker, peer, &credentials, permit).await {
        Ok(username) => username,
        Err(Some(refusal)) => {
            return Err((
                Some(refusal.code(connect.protocol())),
                Refused::Login {
                    reason: refusal.as_str(),
                    user: credentials.username.clone(),
                    client_id: connect.client_id.to_owned(),
                },
            ))
        }
        Err(None) => return Err((code(0x03, reason::SERVER_BUSY), Refused::Busy)),
    };
    let client_id: Arc<str> = match assigned {
        true => assign_id().into(),
        false => connect.client_id.into(),
    };
    Ok(((client_id, assigned), username))
}

/// `auto-` and 16 random hex digits.
fn assign_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    format!("auto-{:016x}", rng.gen::<u64>())
}

/// One login attempt waiting for its turn.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WAITING_LOGINS).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Judges a login. An address that keeps failing waits its turn first, without holding
/// one of `local.max_connections` meanwhile, and only so many attempts wait at once.
/// Err(None): no room (busy).
async fn login(
    broker: &Arc<Shared>,
    peer: SocketAddr,
    credentials: &Credentials,
    permit: &mut Option<Permit>,
) -> Result<Option<String>, Option<Refusal>> {
    let wait = broker.throttle.admit(peer.ip());
    if !wait.is_zero() {
        let Some(_waiting) = Waiting::take(&broker.logins_waiting) else {
            broker.throttle.failed(peer.ip());
            return Err(Some(Refusal::BadCredentials));
        };
        debug!(%peer, ?wait, "slowing down an address with failed logins");
        permit.take();
        tokio::time::sleep(wait).await;
        *permit = Some(broker.permit().ok_or(None)?);
    }
    let policy = broker.policy.load_full();
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
        Ok(_) => broker.throttle.succeeded(peer.ip()),
        Err(_) => broker.throttle.failed(peer.ip()),
    }
    verdict.map_err(Some)
}

/// Opens the session and sends CONNACK.
async fn open<W: AsyncWrite + Unpin>(
    broker: &Arc<Shared>,
    connect: &Connect<'_>,
    (client_id, assigned): (Arc<str>, bool),
    username: Option<String>,
    peer: SocketAddr,
    writer: &mut W,
) -> Result<Accepted, Refused> {
    let protocol = connect.protocol();
    let v5 = protocol == Protocol::V5;
    let expiry = match (v5, connect.clean_start) {
        (true, _) => connect.props.session_expiry.unwrap_or(0),
        (false, true) => 0,
        (false, false) => NEVER_EXPIRES,
    };
    let will = connect.will.as_ref().and_then(|w| {
        let allowed = broker.policy.load().acl.as_ref().is_none_or(|acl| {
            acl.rules_for(username.as_deref(), &client_id)
                .topic_allowed(w.topic, Access::Write)
        });
        if !allowed {
            inc(&broker.health.counters.acl_denied);
            broker.log_denied(peer, &client_id, "will", w.topic);
            return None;
        }
        Some(Box::new(StoredWill {
            topic: w.topic.into(),
            payload: Bytes::copy_from_slice(w.payload),
            qos: w.qos,
            retain: w.retain,
            props: Bytes::from(w.props.forwarded()),
            delay: w.props.will_delay.unwrap_or(0),
            expiry: w.props.message_expiry,
        }))
    });
    let settings = broker.settings.load_full();
    // [MQTT-3.2.2-21]: a Server Keep Alive the client must use instead of its own.
    let server_keep_alive = settings
        .max_keep_alive
        .filter(|max| v5 && (connect.keep_alive == 0 || connect.keep_alive > *max));
    let keep_alive = server_keep_alive.unwrap_or(connect.keep_alive);
    let signal = Arc::new(Signal::with_keep_alive(keep_alive));
    let conn_id = broker.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut wake = Vec::new();
    // The will of a connection this one took over is in `published`.
    let (opened, published) = {
        let mut core = broker.lock();
        let opened = core.open(
            Open {
                client_id: client_id.clone(),
                level: connect.level,
                clean_start: connect.clean_start,
                expiry,
                will,
                receive_max: connect.props.receive_maximum.unwrap_or(u16::MAX),
                conn: ConnLink {
                    id: conn_id,
                    signal: signal.clone(),
                },
            },
            &mut wake,
        );
        (opened, std::mem::take(&mut core.published))
    };
    wake_all(&mut wake);
    let Some(opened) = opened else {
        let code = if v5 { reason::QUOTA_EXCEEDED } else { 0x03 };
        refuse(writer, protocol, code).await;
        return Err(Refused::Sessions);
    };
    broker.hand_over(published).await;
    let props = match v5 {
        true => Properties {
            receive_maximum: Some(settings.receive_max).filter(|m| *m < u16::MAX),
            maximum_packet_size: u32::try_from(settings.max_packet).ok(),
            topic_alias_maximum: Some(settings.topic_alias_max).filter(|m| *m > 0),
            assigned_client_id: assigned.then_some(&*client_id),
            server_keep_alive,
            ..Properties::default()
        },
        false => Properties::default(),
    };
    let connack = Packet::ConnAck(ConnAck {
        // MQTT 3.1 has no session present flag.
        session_present: opened.present && connect.level > 3,
        code: 0,
        props,
    });
    let bytes = connack.to_vec(protocol);
    let written = tokio::time::timeout(Duration::from_secs(5), writer.write_all(&bytes)).await;
    if let Err(e) = written
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
        .and_then(|r| r)
    {
        let mut wake = Vec::new();
        let published = {
            let mut core = broker.lock();
            core.close(
                opened.key,
                conn_id,
                super::core::Ending::WithWill,
                None,
                &mut wake,
            );
            std::mem::take(&mut core.published)
        };
        wake_all(&mut wake);
        broker.hand_over(published).await;
        return Err(Refused::Io(e));
    }
    Ok(Accepted {
        opened,
        conn_id,
        signal,
        client_id,
        username,
        protocol,
        client_max_packet: connect
            .props
            .maximum_packet_size
            .map_or(usize::MAX, |m| m as usize),
        client_alias_max: connect.props.topic_alias_maximum.unwrap_or(0),
        expiry,
    })
}
