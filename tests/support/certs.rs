//! Certificates made by the tests: CAs, servers, clients, expired ones, with rcgen.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::free_port;

/// A self-signed CA, distinct per call (its own name and key), usable as a trust anchor.
pub fn make_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(DnType::CommonName, format!("bridgehead test CA {name}"));
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-signing the CA");
    (cert, key)
}

/// Writes a CA that no broker uses to `path`: the "wrong CA" of a TLS test.
pub fn write_unrelated_ca(path: &Path) {
    let (cert, _) = make_ca(&format!("unrelated {}", free_port()));
    fs::write(path, cert.pem()).expect("writing an unrelated CA");
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A CA that issues certificates into a directory.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl TestCa {
    /// A new CA whose certificate is written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let (cert, key) = make_ca(&format!("{name} {}", free_port()));
        let ca = TestCa {
            cert,
            key,
            dir: dir.to_path_buf(),
        };
        fs::write(ca.ca_path(name), ca.cert.pem()).expect("writing the CA");
        ca
    }

    pub fn ca_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// A certificate with common name `cn` for `names` (DNS names or IP addresses), valid
    /// now (or expired since 2001), written as `dir/CN.pem` and `dir/CN.key`.
    pub fn issue(
        &self,
        cn: &str,
        names: &[&str],
        usage: Usage,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("certificate key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signing a certificate");
        let (cert_path, key_path) = (
            self.dir.join(format!("{cn}.pem")),
            self.dir.join(format!("{cn}.key")),
        );
        fs::write(&cert_path, cert.pem()).expect("writing a certificate");
        fs::write(&key_path, key.serialize_pem()).expect("writing a key");
        (cert_path, key_path)
    }
}
