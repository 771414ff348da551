//! Who may connect and what they may touch: the password file and the ACL file, loaded
//! into one value that the front door reads through a cheap swappable handle, so that a
//! reload replaces them for the next packet without locking the packet path. The config
//! watcher watches both files; a change is applied like an edit of the config.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::info;

use super::acl::AclFile;
use super::auth::PasswordFile;
use crate::config::LocalSecurity;

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
