//! The security keys of `[local]`: device passwords, ACLs, TLS and per-client limits.
//! The password and ACL files are read and checked here too, so that `check` names a bad
//! line before the gateway runs on it.

use std::net::SocketAddr;

use super::raw::RawLocal;
use super::validate::{Pem, Section};
use super::{defaults, DeviceTls, LocalSecurity};
use crate::broker::acl::AclFile;
use crate::broker::auth::PasswordFile;

pub(super) fn local(
    raw: &RawLocal,
    s: &mut Section,
    listen: SocketAddr,
    listen_v5: Option<SocketAddr>,
) -> LocalSecurity {
    let password_file = s.readable("password_file", &raw.password_file);
    if let Some(path) = &password_file {
        match PasswordFile::load(path) {
            Ok(file) if file.is_empty() => s.report(
                "password_file",
                format!(
                    "{} lists no user; add users with mosquitto_passwd",
                    path.display()
                ),
            ),
            Ok(_) => {}
            Err(e) => s.report("password_file", format!("{} {e}", path.display())),
        }
    }
    let acl_file = s.readable("acl_file", &raw.acl_file);
    if let Some(path) = &acl_file {
        if let Err(e) = AclFile::load(path) {
            s.report("acl_file", format!("{} {e}", path.display()));
        }
    }
    LocalSecurity {
        allow_anonymous: raw.allow_anonymous.unwrap_or(raw.password_file.is_none()),
        password_file,
        acl_file,
        max_subscriptions: s.int(
            "max_subscriptions",
            raw.max_subscriptions,
            defaults::MAX_SUBSCRIPTIONS,
            1..=1_000_000,
        ),
        tls: device_tls(raw, s, listen, listen_v5),
    }
}

fn device_tls(
    raw: &RawLocal,
    s: &mut Section,
    listen: SocketAddr,
    listen_v5: Option<SocketAddr>,
) -> Option<DeviceTls> {
    let Some(text) = raw.tls_listen.as_deref() else {
        let set = [
            ("cert_file", raw.cert_file.is_some()),
            ("key_file", raw.key_file.is_some()),
            ("ca_file", raw.ca_file.is_some()),
            ("require_certificate", raw.require_certificate.is_some()),
            (
                "use_identity_as_username",
                raw.use_identity_as_username.is_some(),
            ),
        ];
        for (key, _) in set.iter().filter(|(_, set)| *set) {
            s.report(
                key,
                "has no effect without local.tls_listen; set tls_listen for a TLS listener, or remove this key",
            );
        }
        return None;
    };
    let address = s.address("tls_listen", text);
    for (other, name) in [
        (Some(listen), "local.listen"),
        (listen_v5, "local.listen_v5"),
    ] {
        let Some(other) = other else { continue };
        let same_ip = address.ip() == other.ip()
            || address.ip().is_unspecified()
            || other.ip().is_unspecified();
        if address.port() == other.port() && same_ip {
            s.report(
                "tls_listen",
                format!("{address} collides with {name} {other}; TLS needs a port of its own"),
            );
        }
    }
    let required = |s: &mut Section, key: &str, raw: &Option<String>| {
        if raw.is_none() {
            s.report(
                key,
                format!("missing; local.tls_listen needs the gateway's {key} (PEM)"),
            );
        }
    };
    required(s, "cert_file", &raw.cert_file);
    required(s, "key_file", &raw.key_file);
    let cert_file = s.pem_file("cert_file", &raw.cert_file, true, Pem::Certificates);
    let key_file = s.pem_file("key_file", &raw.key_file, true, Pem::PrivateKey);
    let ca_file = s.pem_file("ca_file", &raw.ca_file, true, Pem::Certificates);
    let require_certificate = raw.require_certificate.unwrap_or(false);
    let use_identity_as_username = raw.use_identity_as_username.unwrap_or(false);
    if require_certificate && raw.ca_file.is_none() {
        s.report(
            "require_certificate",
            "needs local.ca_file, the CA that client certificates must chain to",
        );
    }
    if use_identity_as_username && !require_certificate {
        s.report(
            "use_identity_as_username",
            "needs require_certificate = true: without a certificate there is no identity",
        );
    }
    Some(DeviceTls {
        listen: address,
        cert_file: cert_file.unwrap_or_default(),
        key_file: key_file.unwrap_or_default(),
        ca_file,
        require_certificate,
        use_identity_as_username,
    })
}
