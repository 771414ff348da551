//! mosquitto as the cloud broker: plain, or plain plus a TLS listener with a CA made here.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, KeyPair};
use tempfile::TempDir;

use super::certs::make_ca;
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

    /// The plain anonymous listener (for collectors) plus a second listener on
    /// `tls_port` whose settings are `listener_conf` (cafile, require_certificate,
    /// password_file...): each listener has its own security settings.
    pub fn start_with_listener(listener_conf: &str) -> Self {
        let dir = tempfile::tempdir().expect("mosquitto tempdir");
        let (port, second) = (free_port(), free_port());
        fs::create_dir(dir.path().join("persist")).expect("mosquitto persistence dir");
        let conf = format!(
            "user root\n\
             per_listener_settings true\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_interval 0\n\
             max_queued_messages 0\n\
             max_inflight_messages 100\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             listener {second} 127.0.0.1\n\
             {listener_conf}\n",
            dir.path().join("persist").display()
        );
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("writing mosquitto.conf");
        let mut broker = Mosquitto {
            dir,
            port,
            tls_port: Some(second),
            child: None,
        };
        broker.spawn();
        broker
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

/// Which hash `mosquitto_passwd -H` writes.
#[derive(Clone, Copy, Debug)]
pub enum PasswdHash {
    /// `$6$`: salted SHA-512, mosquitto 1.x's format.
    Sha512,
    /// `$7$`: PBKDF2-SHA512, the default since mosquitto 2.0.
    Pbkdf2,
}

/// Adds (or replaces) `user` in the password file at `path` with the real mosquitto_passwd.
pub fn mosquitto_passwd(path: &Path, user: &str, password: &str, hash: PasswdHash) {
    let hash = match hash {
        PasswdHash::Sha512 => "sha512",
        PasswdHash::Pbkdf2 => "sha512-pbkdf2",
    };
    let mut command = Command::new("mosquitto_passwd");
    command.arg("-H").arg(hash);
    if !path.exists() {
        command.arg("-c");
    }
    let status = command
        .arg("-b")
        .arg(path)
        .arg(user)
        .arg(password)
        .stdout(Stdio::null())
        .status()
        .expect("running mosquitto_passwd (apt-get install mosquitto)");
    assert!(status.success(), "mosquitto_passwd failed for {user}");
}

/// Removes `user` from the password file.
pub fn mosquitto_passwd_delete(path: &Path, user: &str) {
    let status = Command::new("mosquitto_passwd")
        .arg("-D")
        .arg(path)
        .arg(user)
        .stdout(Stdio::null())
        .status()
        .expect("running mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd -D failed for {user}");
}
