//! TLS for devices on `local.tls_listen`: rustls with the ring provider, the gateway's
//! certificate, and optionally client certificates checked against `local.ca_file`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::config::DeviceTls;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("reading {key} {path}: {source}")]
    File {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{key} {path} holds no usable PEM {what}")]
    Pem {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("device TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("local.ca_file: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub fn server_config(tls: &DeviceTls) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) =
                roots.add_parsable_certificates(certificates("local.ca_file", ca_file)?);
            if added == 0 {
                return Err(pem_error("local.ca_file", ca_file, "CA certificate"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match tls.require_certificate {
                true => verifier.build()?,
                false => verifier.allow_unauthenticated().build()?,
            };
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certs = certificates("local.cert_file", &tls.cert_file)?;
    let key = private_key(&tls.key_file)?;
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// The common name of the client certificate a handshake verified.
pub fn certificate_name(connection: &rustls::ServerConnection) -> Option<String> {
    let der = connection.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::File {
        key,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(key: &'static str, path: &Path, what: &'static str) -> TlsSetupError {
    TlsSetupError::Pem {
        key,
        path: path.display().to_string(),
        what,
    }
}

fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsSetupError::File {
            key,
            path: path.display().to_string(),
            source,
        })?;
    match certs.is_empty() {
        true => Err(pem_error(key, path, "certificate")),
        false => Ok(certs),
    }
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read("local.key_file", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| pem_error("local.key_file", path, "private key"))
}
