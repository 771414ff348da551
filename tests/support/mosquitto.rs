//! mosquitto as the cloud broker: plain, or plain plus a TLS listener with a CA made here.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

use super::{accepts, free_port, signal, tail, wait_child};

/// A mosquitto process with persistence in its own temporary directory, so that a
/// restart keeps sessions and queued messages.
pub struct Mosquitto {
    dir: TempDir,
    /// The plain listener, always there (collectors connect here, also in TLS tests).
    pub port: u16,
    /// The TLS listener of [`Mosquitto::start_tls`].
    pub tls_port: Option<u16>,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::launch(false, "")
    }

    /// A plain broker with extra lines in its config (e.g. `max_packet_size 2048`).
    pub fn start_with(extra_conf: &str) -> Self {
        Self::launch(false, extra_conf)
    }

    /// A plain listener plus a TLS listener whose server certificate (for 127.0.0.1 and
    /// localhost) is signed by a CA made for this broker: see [`Mosquitto::ca_pem_path`].
    pub fn start_tls() -> Self {
        Self::launch(true, "")
    }

    fn launch(tls: bool, extra_conf: &str) -> Self {
        let dir = tempfile::tempdir().expect("mosquitto tempdir");
        let port = free_port();
        let tls_port = tls.then(free_port);
        fs::create_dir(dir.path().join("persist")).expect("mosquitto persistence dir");
        let mut conf = format!(
            "user root\n\
             per_listener_settings false\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_interval 0\n\
             max_queued_messages 0\n\
             max_inflight_messages 100\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n\
             {extra_conf}\n\
             listener {port} 127.0.0.1\n",
            dir.path().join("persist").display()
        );
        if let Some(tls_port) = tls_port {
            write_certificates(dir.path());
            let p = |name: &str| dir.path().join(name).display().to_string();
            conf += &format!(
                "listener {tls_port} 127.0.0.1\n\
                 cafile {}\ncertfile {}\nkeyfile {}\n",
                p("ca.pem"),
                p("server.pem"),
                p("server.key")
            );
        }
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("writing mosquitto.conf");
        let mut broker = Mosquitto {
            dir,
            port,
            tls_port,
            child: None,
        };
        broker.spawn();
        broker
    }

    /// The PEM file of the CA that signed the TLS listener's certificate.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGTERM, so that mosquitto saves its persistence file, and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto did not stop within 10 s of SIGTERM");
            }
        }
    }

    /// Stops and starts again on the same ports with the same persistence directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("mosquitto log file");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .expect("starting mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ports.iter().all(|&p| accepts(p)) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mosquitto exited with {status}:\n{}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto does not accept on {ports:?} within 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- mosquitto log ({}), last lines ---\n{}",
                self.log_path().display(),
                tail(&self.log_path(), 40)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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

fn write_certificates(dir: &Path) {
    let (ca, ca_key) = make_ca(&format!("cloud {}", free_port()));
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("server cert params");
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let key = KeyPair::generate().expect("server key");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("signing the server cert");
    fs::write(dir.join("ca.pem"), ca.pem()).expect("writing ca.pem");
    fs::write(dir.join("server.pem"), cert.pem()).expect("writing server.pem");
    fs::write(dir.join("server.key"), key.serialize_pem()).expect("writing server.key");
}
