//! What the two cloud connections (telemetry up, commands down) share: connection options,
//! TLS on rustls with the ring provider, credentials, reconnect backoff, and failover
//! across the nodes `cloud.url` lists.
//!
//! Each connection (told apart by its client id) has its own place in the node list:
//! [`CloudLink::options`] connects to that node, and [`Reconnect::after_failure`] moves it
//! to the next node, in order, wrapping around. Within one round the next node is tried
//! after a short jittered pause; once every node failed, the backoff grows as with one
//! node. Nothing else changes with the node: the outbox stays the only source of resends,
//! so a fresh connection to another node resends from the oldest unacknowledged row, in
//! order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::backoff::Backoff;
use crate::config::{CloudConfig, CloudUrl};

#[derive(Debug, thiserror::Error)]
pub enum CloudSetupError {
    #[error("reading {what} {path}: {source}")]
    File {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {kind}")]
    Pem {
        what: &'static str,
        path: String,
        kind: &'static str,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Everything needed to open a cloud connection, prepared once at start so that a bad
/// certificate file is reported at start, not at every reconnect.
#[derive(Clone)]
pub struct CloudLink {
    pub config: CloudConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    password: Option<String>,
    /// Index into the node list, per client id.
    current: Arc<Mutex<HashMap<String, usize>>>,
}

impl CloudLink {
    pub fn new(config: &CloudConfig) -> Result<Self, CloudSetupError> {
        let tls = if config.url.tls {
            Some(Arc::new(tls_config(config)?))
        } else {
            None
        };
        let password = match &config.password_file {
            Some(path) => Some(
                read("cloud.password_file", path)?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => None,
        };
        Ok(CloudLink {
            config: config.clone(),
            tls,
            password,
            current: Arc::default(),
        })
    }

    /// Every node of the cloud broker, in failover order.
    pub fn nodes(&self) -> impl Iterator<Item = &CloudUrl> {
        std::iter::once(&self.config.url).chain(&self.config.failover)
    }

    fn node_count(&self) -> usize {
        1 + self.config.failover.len()
    }

    fn node_index(&self, client_id: &str) -> usize {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.get(client_id).copied().unwrap_or(0)
    }

    /// The node the connection with this client id uses now.
    pub fn node(&self, client_id: &str) -> &CloudUrl {
        let index = self.node_index(client_id);
        self.nodes().nth(index).unwrap_or(&self.config.url)
    }

    /// Moves the connection to the next node; true when that starts a new round.
    fn next_node(&self, client_id: &str) -> bool {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let index = current.entry(client_id.to_owned()).or_insert(0);
        *index = (*index + 1) % self.node_count();
        *index == 0
    }

    /// Options for one connection with the given client id, to its current node (whose
    /// host name is also the TLS server name, sent as SNI and checked in the certificate).
    pub fn options(&self, client_id: &str) -> MqttOptions {
        let c = &self.config;
        let node = self.node(client_id);
        let mut options = MqttOptions::new(client_id, node.host.clone(), node.port);
        options
            .set_keep_alive(c.keep_alive)
            .set_clean_session(false)
            .set_max_packet_size(c.max_packet_size, c.max_packet_size);
        if let Some(user) = &c.username {
            options.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        options
    }

    pub fn reconnect(&self) -> Reconnect {
        Reconnect {
            cloud: self.clone(),
            backoff: Backoff::new(self.config.reconnect_min, self.config.reconnect_max),
            failures: 0,
            log: crate::health::RateLimit::new(Duration::from_secs(60)),
        }
    }
}

fn read(what: &'static str, path: &std::path::Path) -> Result<String, CloudSetupError> {
    std::fs::read_to_string(path).map_err(|source| CloudSetupError::File {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn tls_config(config: &CloudConfig) -> Result<rustls::ClientConfig, CloudSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = read("cloud.ca_file", path)?;
            let certs = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| CloudSetupError::File {
                    what: "cloud.ca_file",
                    path: path.display().to_string(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(CloudSetupError::Pem {
                    what: "cloud.ca_file",
                    path: path.display().to_string(),
                    kind: "certificate",
                });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "reading a system root certificate");
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    match (&config.cert_file, &config.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let pem = read("cloud.cert_file", cert_path)?;
            let certs = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| CloudSetupError::File {
                    what: "cloud.cert_file",
                    path: cert_path.display().to_string(),
                    source,
                })?;
            let pem = read("cloud.key_file", key_path)?;
            let key = rustls_pemfile::private_key(&mut pem.as_bytes())
                .ok()
                .flatten()
                .ok_or_else(|| CloudSetupError::Pem {
                    what: "cloud.key_file",
                    path: key_path.display().to_string(),
                    kind: "private key",
                })?;
            Ok(builder.with_client_auth_cert(certs, key)?)
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// An error with every cause behind it, e.g. `TLS: I/O: invalid peer certificate:
/// UnknownIssuer (unknown issuer: ...)`, a refused certificate explained in words.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    if let Some(reason) = refused_certificate(e) {
        text.push_str(&format!(" ({reason})"));
    }
    text
}

/// Why the cloud's certificate was refused, if that is what `e` comes down to.
fn refused_certificate(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut current = Some(e);
    while let Some(error) = current {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(reason)) = tls {
            return Some(match reason {
                C::UnknownIssuer => "unknown issuer: the cloud's certificate is not signed by a CA in cloud.ca_file (or the system's roots without it)",
                C::NotValidForName | C::NotValidForNameContext { .. } => "wrong name: the cloud's certificate is not for the host in cloud.url",
                C::Expired | C::ExpiredContext { .. } => "expired: the cloud's certificate has expired, or this gateway's clock is wrong",
                C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet: this gateway's clock is behind (not synchronised yet?), or the certificate is new",
                C::Revoked => "revoked",
                C::BadSignature | C::BadEncoding => "damaged or badly signed certificate",
                _ => "the cloud's certificate was refused",
            });
        }
        current = error.source();
    }
    None
}

/// What a cloud connection does between losing the link and the next attempt: count it,
/// back off, and say so once when the link goes down, then at most once a minute while it
/// stays down, so a long outage does not flood the journal.
pub struct Reconnect {
    cloud: CloudLink,
    backoff: Backoff,
    failures: u64,
    log: crate::health::RateLimit,
}

impl Reconnect {
    /// Records a lost connection or failed attempt and sleeps the backoff; false when
    /// shutdown came first.
    #[allow(clippy::too_many_arguments)]
    pub async fn after_failure(
        &mut self,
        health: &crate::health::Health,
        state: &crate::health::SharedLinkState,
        client_id: &str,
        what: &str,
        error: &str,
        was_up: bool,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        crate::health::inc(&health.counters.reconnects);
        if was_up {
            self.backoff.reset();
            self.failures = 0;
            self.log = crate::health::RateLimit::new(Duration::from_secs(60));
        }
        self.failures += 1;
        let lost = self.cloud.node(client_id).clone();
        let delay = match self.cloud.node_count() {
            1 => self.backoff.next_jittered(),
            _ if self.cloud.next_node(client_id) => self.backoff.next_jittered(),
            // Another node is left in this round: try it soon.
            _ => Backoff::new(
                self.cloud.config.reconnect_min,
                self.cloud.config.reconnect_min,
            )
            .next_jittered(),
        };
        state.set(crate::health::LinkState::BackingOff);
        let next = self.cloud.node(client_id);
        if was_up || self.log.check().is_some() {
            match next != &lost {
                true => {
                    tracing::warn!(client_id, error, failed_attempts = self.failures, %lost, %next, retry_in = ?delay,
                    "{what}; failing over to the next cloud node")
                }
                false => {
                    tracing::warn!(client_id, error, failed_attempts = self.failures, retry_in = ?delay, "{what}")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.changed() => false,
        }
    }
}
