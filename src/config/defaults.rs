//! Every default of the config file, in one place. Values are written as a user would
//! write them and go through the same parsing and checks. `config/bridgehead.toml`
//! documents the same values.

use std::ffi::OsStr;
use std::path::PathBuf;

pub const DATA_DIR: &str = "./bridgehead-data";
pub const METRICS_TOPIC: &str = "bridgehead/{gateway_id}/metrics";
pub const METRICS_INTERVAL: &str = "10s";

pub const LISTEN: &str = "0.0.0.0:1883";
pub const MAX_PAYLOAD: &str = "256KiB";
pub const MAX_CONNECTIONS: i64 = 1000;
pub const CONNECT_TIMEOUT: &str = "10s";
pub const MAX_SUBSCRIPTIONS: i64 = 1000;
pub const MAX_RETAINED_SIZE: &str = "16MiB";
pub const MAX_QUEUED_MESSAGES: i64 = 10_000;
pub const MAX_QUEUED_BYTES: &str = "8MiB";

/// `cloud.client_id` defaults to `gateway.id`; the command connection appends this.
pub const COMMAND_CLIENT_ID_SUFFIX: &str = "-cmd";
pub const KEEP_ALIVE: &str = "30s";
pub const MAX_PACKET_SIZE: &str = "256KiB";
pub const STATUS_TOPIC: &str = "fleet/{gateway_id}/status";
pub const MAX_INFLIGHT: i64 = 100;
pub const RECONNECT_MIN: &str = "500ms";
pub const RECONNECT_MAX: &str = "30s";

pub const QUEUE_MAX_SIZE: &str = "1GiB";
pub const WHEN_FULL: &str = "drop-oldest";
pub const MAX_AGE: &str = "7d";
pub const COMMIT_INTERVAL: &str = "1s";
pub const COMMIT_BATCH: i64 = 1000;
pub const SYNCHRONOUS: &str = "full";
pub const DEAD_LETTER_MAX_SIZE: &str = "16MiB";

pub const QOS: i64 = 1;
pub const DRAIN: &str = "strict";
pub const PREFIX: &str = "";

/// `gateway.data_dir` when the file does not set it: systemd's `$STATE_DIRECTORY` (its
/// first entry when `StateDirectory=` names several), else [`DATA_DIR`].
pub fn data_dir(state_directory: Option<&OsStr>) -> PathBuf {
    state_directory
        .and_then(|dirs| dirs.to_str())
        .and_then(|dirs| dirs.split(':').next())
        .filter(|first| !first.is_empty())
        .map_or_else(|| PathBuf::from(DATA_DIR), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_prefers_systemds_state_directory() {
        assert_eq!(data_dir(None), PathBuf::from("./bridgehead-data"));
        assert_eq!(
            data_dir(Some(OsStr::new(""))),
            PathBuf::from("./bridgehead-data")
        );
        assert_eq!(
            data_dir(Some(OsStr::new("/var/lib/bridgehead"))),
            PathBuf::from("/var/lib/bridgehead")
        );
        assert_eq!(
            data_dir(Some(OsStr::new("/var/lib/bridgehead:/var/lib/other"))),
            PathBuf::from("/var/lib/bridgehead")
        );
    }
}
