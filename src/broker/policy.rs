//! Who may connect and what they may touch: the password file and the ACL file, loaded
//! into one value that the front door reads through a cheap swappable handle, so that a
//! reload replaces them for the next packet without locking the packet path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{error, info};

use super::acl::AclFile;
use super::auth::PasswordFile;
use crate::config::LocalSecurity;
use crate::health::{inc, SharedHealth};

/// How often the files are looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Policy {
    pub passwords: Option<PasswordFile>,
    pub allow_anonymous: bool,
    pub acl: Option<AclFile>,
}

pub type SharedPolicy = Arc<ArcSwap<Policy>>;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("local.password_file {path}: {source}")]
    Passwords {
        path: String,
        source: super::auth::PasswordFileError,
    },
    #[error("local.acl_file {path}: {source}")]
    Acl {
        path: String,
        source: super::acl::AclError,
    },
}

impl Policy {
    pub fn load(config: &LocalSecurity) -> Result<Self, PolicyError> {
        let passwords = match &config.password_file {
            Some(path) => {
                Some(
                    PasswordFile::load(path).map_err(|source| PolicyError::Passwords {
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let acl = match &config.acl_file {
            Some(path) => Some(AclFile::load(path).map_err(|source| PolicyError::Acl {
                path: path.display().to_string(),
                source,
            })?),
            None => None,
        };
        Ok(Policy {
            passwords,
            allow_anonymous: config.allow_anonymous,
            acl,
        })
    }

    pub fn shared(self) -> SharedPolicy {
        Arc::new(ArcSwap::from_pointee(self))
    }
}

/// Re-reads the password and ACL files of `config` into `shared`. On an error the old
/// policy stays in force (and the error says why).
pub fn reload(shared: &SharedPolicy, config: &LocalSecurity) -> Result<(), PolicyError> {
    let policy = Policy::load(config)?;
    info!(
        users = policy.passwords.as_ref().map_or(0, PasswordFile::len),
        acl = policy.acl.is_some(),
        "device passwords and ACL (re)loaded"
    );
    shared.store(Arc::new(policy));
    Ok(())
}

/// Reloads the policy whenever the password file or the ACL file changes (modification
/// time or size), until shutdown.
pub async fn watch_files(
    shared: SharedPolicy,
    config: LocalSecurity,
    health: SharedHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    let files: Vec<PathBuf> = [&config.password_file, &config.acl_file]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if files.is_empty() {
        return;
    }
    let mut seen: Vec<Option<(SystemTime, u64)>> = files.iter().map(|f| stamp(f)).collect();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let now: Vec<_> = files.iter().map(|f| stamp(f)).collect();
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = reload(&shared, &config) {
            inc(&health.counters.security_reload_errors);
            error!(error = %e, "not reloading device passwords and ACL: the file has a problem; the previous ones stay in force");
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
