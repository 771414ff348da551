//! Device authentication in the front door: `local.password_file` in mosquitto_passwd's
//! format, `local.allow_anonymous`, the TLS certificate's name as user name, and slowing
//! down an address that keeps failing.
//!
//! mosquitto_passwd writes `user:$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512, the
//! default since mosquitto 2.0, `-H sha512-pbkdf2`) or `user:$6$SALT$HASH` (one round of
//! SHA-512 over password then salt, mosquitto 1.x's format, `-H sha512`; not crypt(3)'s
//! `$6$`), salt and hash in base64. Both are verified with RustCrypto's hashes and a
//! constant-time comparison.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use super::codec::Protocol;

/// PBKDF2 iterations above this are refused when the file is read: one login must not
/// cost a Pi seconds of CPU.
const MAX_ITERATIONS: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn verify(&self, password: &[u8]) -> bool {
        let (computed, expected) = match self {
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                (digest.finalize().to_vec(), hash)
            }
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                (out, hash)
            }
        };
        computed.ct_eq(expected).into()
    }

    fn parse(text: &str) -> Result<Self, String> {
        let b64 = |part: &str, what: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(part)
                .map_err(|_| format!("its {what} is not base64"))
        };
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt, "salt")?,
                hash: sha512_length(b64(hash, "hash")?)?,
            }),
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_ITERATIONS).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "{iterations:?} is not an iteration count from 1 to {MAX_ITERATIONS}"
                        )
                    })?;
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64(salt, "salt")?,
                    hash: sha512_length(b64(hash, "hash")?)?,
                })
            }
            _ => Err(
                "is not a mosquitto_passwd hash ($6$... or $7$...); plain-text passwords \
                      are not accepted: run mosquitto_passwd -U on the file"
                    .into(),
            ),
        }
    }
}

fn sha512_length(hash: Vec<u8>) -> Result<Vec<u8>, String> {
    match hash.len() {
        64 => Ok(hash),
        n => Err(format!("its hash is {n} bytes; SHA-512 makes 64")),
    }
}

/// A parsed password file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct PasswordFileError {
    pub line: usize,
    pub message: String,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| PasswordFileError {
            line: 0,
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, PasswordFileError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let error = |message: String| PasswordFileError {
                line: i + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| error("is not user:hash".into()))?;
            if user.is_empty() {
                return Err(error("has no user name before ':'".into()));
            }
            let hash =
                Hash::parse(hash).map_err(|why| error(format!("the hash of {user:?} {why}")))?;
            if users.insert(user.to_owned(), hash).is_some() {
                return Err(error(format!("{user:?} is listed twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` is in the file with this password. Costs a hash even for an unknown
    /// user, so that timing does not tell which user names exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        static DECOY: std::sync::OnceLock<Hash> = std::sync::OnceLock::new();
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                let decoy = DECOY.get_or_init(|| Hash::Pbkdf2 {
                    iterations: 101,
                    salt: vec![0; 12],
                    hash: vec![0; 64],
                });
                let _ = decoy.verify(password);
                false
            }
        }
    }
}

/// Why a CONNECT was refused: each maps to MQTT's own return code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password.
    BadCredentials,
    /// No user name while anonymous clients are not allowed.
    NotAuthorized,
}

impl Refusal {
    /// The CONNACK code: 3.1.1 return code 4 or 5, MQTT 5 reason 0x86 or 0x87.
    pub fn code(self, protocol: Protocol) -> u8 {
        match (self, protocol) {
            (Refusal::BadCredentials, Protocol::V311) => 4,
            (Refusal::NotAuthorized, Protocol::V311) => 5,
            (Refusal::BadCredentials, Protocol::V5) => 0x86,
            (Refusal::NotAuthorized, Protocol::V5) => 0x87,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad user name or password",
            Refusal::NotAuthorized => "anonymous clients are not allowed (local.allow_anonymous)",
        }
    }
}

/// What a client presented.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// The common name of a verified client certificate, when it stands for the user
    /// name (`local.use_identity_as_username`).
    pub certificate_name: Option<String>,
}

/// Decides a login; returns the user name the client acts as (None: anonymous). Hashing
/// takes CPU: call it off the async threads.
pub fn authenticate(
    passwords: Option<&PasswordFile>,
    allow_anonymous: bool,
    credentials: &Credentials,
) -> Result<Option<String>, Refusal> {
    if let Some(name) = &credentials.certificate_name {
        return Ok(Some(name.clone()));
    }
    match (&credentials.username, passwords) {
        (Some(user), Some(file)) => {
            let password = credentials.password.as_deref().unwrap_or_default();
            match credentials.password.is_some() && file.verify(user, password) {
                true => Ok(Some(user.clone())),
                false => Err(Refusal::BadCredentials),
            }
        }
        (Some(user), None) if allow_anonymous => Ok(Some(user.clone())),
        (None, _) if allow_anonymous => Ok(None),
        _ => Err(Refusal::NotAuthorized),
    }
}

/// Failed logins per address: from the third failure on, each further attempt from that
/// address waits its turn, 200 ms doubling to 5 s apart, so that guessing passwords goes
/// at a crawl while other addresses are not slowed at all.
pub struct Throttle {
    entries: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    /// When the next attempt from this address may be judged.
    next_slot: Instant,
}

const FREE_FAILURES: u32 = 2;
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address forgiven after this long without a failure.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses remembered at most (the oldest are forgotten first).
const MAX_ADDRESSES: usize = 4096;

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl Throttle {
    /// How long an attempt from `ip` must wait before it is judged (zero for most).
    pub fn admit(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&ip) else {
            return Duration::ZERO;
        };
        if now.duration_since(entry.last) > FORGET_AFTER {
            entries.remove(&ip);
            return Duration::ZERO;
        }
        if entry.count < FREE_FAILURES {
            return Duration::ZERO;
        }
        let delay = crate::backoff::bound(FIRST_DELAY, MAX_DELAY, entry.count - FREE_FAILURES);
        let slot = entry.next_slot.max(now) + delay;
        entry.next_slot = slot;
        slot - now
    }

    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= MAX_ADDRESSES && !entries.contains_key(&ip) {
            entries.retain(|_, f| now.duration_since(f.last) <= FORGET_AFTER);
            if entries.len() >= MAX_ADDRESSES {
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(ip, _)| *ip)
                {
                    entries.remove(&oldest);
                }
            }
        }
        let entry = entries.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
            next_slot: now,
        });
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.lock().remove(&ip);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with mosquitto_passwd 2.0.11: alice/secret with `-H sha512`, bob/hunter2 with
    /// the default `-H sha512-pbkdf2`.
    const FILE: &str = "\
alice:$6$OwopJCN9pA3HKg9j$qs4wMUKWgVPdTFeb/fdvuHj3BV+NhcinEVggVtyjiVaiGjRAyFj/lv91ZN+p3fPrc3rM6DtwxF26jGP4CwBCwQ==
bob:$7$101$X9iqBpnGtsPiiO4D$yg5DjApOdMvQ7Y4+mf7oToo015X4uSnZSPfUmbYX7HL7ps7uoz9FsFFCobiuKLMVUnptbwW31+JOIRCHEFVakA==
";

    #[test]
    fn both_mosquitto_hashes_verify() {
        let file = PasswordFile::parse(FILE).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"Secret"));
        assert!(file.verify("bob", b"hunter2"));
        assert!(!file.verify("bob", b"hunter3"));
        assert!(!file.verify("carol", b"secret"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let error = PasswordFile::parse("# users\nalice:secret\n").unwrap_err();
        assert_eq!(error.line, 2);
        assert!(error.message.contains("plain-text"), "{error}");
        assert_eq!(PasswordFile::parse("bob\n").unwrap_err().line, 1);
        assert!(PasswordFile::parse("bob:$7$0$AAAA$AAAA\n").is_err());
        assert!(PasswordFile::parse("bob:$6$!!$AAAA\n").is_err());
    }

    #[test]
    fn logins_follow_the_policy() {
        let file = PasswordFile::parse(FILE).unwrap();
        let login = |user: Option<&str>, password: Option<&str>| Credentials {
            username: user.map(str::to_owned),
            password: password.map(|p| p.as_bytes().to_vec()),
            certificate_name: None,
        };
        assert_eq!(
            authenticate(Some(&file), false, &login(Some("bob"), Some("hunter2"))),
            Ok(Some("bob".into()))
        );
        assert_eq!(
            authenticate(Some(&file), false, &login(Some("bob"), None)),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            authenticate(Some(&file), false, &login(None, None)),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            authenticate(Some(&file), true, &login(None, None)),
            Ok(None)
        );
        assert_eq!(
            authenticate(None, true, &login(Some("x"), None)),
            Ok(Some("x".into()))
        );
        assert_eq!(
            authenticate(None, false, &login(Some("x"), None)),
            Err(Refusal::NotAuthorized)
        );
        let certified = Credentials {
            certificate_name: Some("sensor-9".into()),
            ..login(None, None)
        };
        assert_eq!(
            authenticate(Some(&file), false, &certified),
            Ok(Some("sensor-9".into()))
        );
        assert_eq!(Refusal::BadCredentials.code(Protocol::V5), 0x86);
        assert_eq!(Refusal::NotAuthorized.code(Protocol::V311), 5);
    }

    #[test]
    fn an_address_that_keeps_failing_waits_longer_each_time() {
        let throttle = Throttle::default();
        let ip: IpAddr = [10, 0, 0, 9].into();
        let other: IpAddr = [10, 0, 0, 10].into();
        assert_eq!(throttle.admit(ip), Duration::ZERO);
        throttle.failed(ip);
        throttle.failed(ip);
        let first = throttle.admit(ip);
        assert!(first >= Duration::from_millis(150), "{first:?}");
        throttle.failed(ip);
        let second = throttle.admit(ip);
        assert!(second > first, "{second:?} after {first:?}");
        assert_eq!(throttle.admit(other), Duration::ZERO);
        throttle.succeeded(ip);
        assert_eq!(throttle.admit(ip), Duration::ZERO);
    }
}
