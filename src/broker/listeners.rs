//! The device listeners (`local.listen`, `local.tls_listen`, and `local.listen_v5` kept as
//! one more plain listener), each serving MQTT 3.1, 3.1.1 and 5 and each replaceable: a
//! reload that moves a listener, or changes its TLS keys, binds anew and retires the old
//! accept loop while the connections it accepted stay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::connect::Refused;
use super::{connection, Shared};
use crate::backoff::Backoff;
use crate::health::{inc, RateLimit};
use crate::supervisor::{Supervisor, Task};

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

/// Binds a device port, naming the config key in the error.
pub async fn bind(listen: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for devices on {listen} ({key})"))
}

/// Accepts devices on `listener` until shutdown; each connection runs on its own task (its
/// TLS handshake too, so a stalled handshake holds up no one).
pub async fn accept(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsListener>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut refused_log = RateLimit::new(Duration::from_secs(10));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(v) => {
                backoff.reset();
                v
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and retry, doubling.
                let wait = backoff.next_bound();
                warn!(error = %e, "accepting a device connection failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let Some(permit) = shared.permit() else {
            let c = &shared.health.counters;
            inc(&c.connections_refused);
            if let Some(held) = refused_log.check() {
                let max_connections = shared.settings.load().max_connections;
                warn!(%peer, max_connections, earlier_warnings_suppressed = held,
                    "device connection refused: local.max_connections reached");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let deadline = Instant::now() + shared.settings.load().connect_timeout;
        let shared = shared.clone();
        match &tls {
            None => {
                tokio::spawn(connection::serve(
                    shared, stream, peer, None, permit, deadline,
                ));
            }
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    match handshake(&tls, stream, deadline).await {
                        Ok((stream, name)) => {
                            connection::serve(shared, stream, peer, name, permit, deadline).await
                        }
                        Err(refused) => shared.refused(peer, &refused),
                    }
                });
            }
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS handshake within the connection's deadline; the certificate's common name when
/// it stands for the user name.
async fn handshake(
    tls: &TlsListener,
    stream: TcpStream,
    deadline: Instant,
) -> Result<(TlsStream, Option<String>), Refused> {
    let stream = tokio::time::timeout_at(deadline, Box::pin(tls.acceptor.accept(stream)))
        .await
        .map_err(|_| Refused::Timeout)?
        .map_err(Refused::Tls)?;
    let name = match tls.use_identity_as_username {
        true => Some(
            super::tls::certificate_name(stream.get_ref().1).ok_or(Refused::Login {
                reason: "the client certificate has no common name",
                user: None,
                client_id: String::new(),
            })?,
        ),
        false => None,
    };
    Ok((stream, name))
}

/// One listener: where it listens, whether it speaks TLS, and its task.
struct Listener {
    key: &'static str,
    listen: SocketAddr,
    tls: Option<TlsListener>,
    task: Task,
}

/// The running listeners.
pub struct Listeners {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

impl Listeners {
    pub fn new(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Self {
        Listeners {
            listeners: Vec::new(),
            shared,
            shutdown,
        }
    }

    /// Starts serving `listener` (bound to the address of `key`), with TLS if given.
    pub fn serve(
        &mut self,
        supervisor: &mut Supervisor,
        key: &'static str,
        listener: TcpListener,
        tls: Option<TlsListener>,
    ) {
        let Ok(listen) = listener.local_addr() else {
            warn!(key, "a listener without an address");
            return;
        };
        info!(%listen, key, tls = tls.is_some(), "local broker accepting devices (MQTT 3.1, 3.1.1 and 5)");
        let task = supervisor.spawn(
            format!("listener {key}"),
            accept(
                self.shared.clone(),
                listener,
                tls.clone(),
                self.shutdown.clone(),
            ),
        );
        self.listeners.push(Listener {
            key,
            listen,
            tls,
            task,
        });
    }

    /// Where `key` listens now, if it does.
    pub fn address(&self, key: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.key == key)
            .map(|l| l.listen)
    }

    /// Brings the listener of `key` to `listen` (None: stops it) with `tls`; connected
    /// devices stay connected.
    pub async fn set(
        &mut self,
        supervisor: &mut Supervisor,
        key: &'static str,
        listen: Option<SocketAddr>,
        tls: Option<TlsListener>,
    ) -> anyhow::Result<()> {
        let Some(listen) = listen else {
            if let Some(i) = self.listeners.iter().position(|l| l.key == key) {
                let old = self.listeners.remove(i);
                supervisor.retire(&old.task).await;
                info!(key, listen = %old.listen, "listener stopped; connected devices stay");
            }
            return Ok(());
        };
        let Some(i) = self.listeners.iter().position(|l| l.key == key) else {
            let listener = bind(listen, key).await?;
            self.serve(supervisor, key, listener, tls);
            return Ok(());
        };
        let new = match bind(listen, key).await {
            Ok(new) => {
                let old = self.listeners.remove(i);
                supervisor.retire(&old.task).await;
                (new, old)
            }
            // The same port (on this or another address of the box): free the old first.
            Err(_) if self.listeners[i].listen.port() == listen.port() => {
                let old = self.listeners.remove(i);
                supervisor.retire(&old.task).await;
                match bind(listen, key).await {
                    Ok(new) => (new, old),
                    Err(e) => {
                        warn!(error = %e, "binding the new address failed; going back to the old one");
                        let back = bind(old.listen, key).await?;
                        self.serve(supervisor, key, back, old.tls);
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let (new, old) = new;
        info!(from = %old.listen, to = %listen, key, "listener replaced; connected devices stay");
        self.serve(supervisor, key, new, tls);
        Ok(())
    }
}

/// Raises the soft limit of open files to the hard limit: each device costs a descriptor,
/// and systemd's default soft limit of 1024 would refuse devices before
/// `local.max_connections` plus the gateway's own files. Returns the limit now in force.
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
