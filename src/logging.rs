//! Logging to journald when systemd started us (its stream is on stderr), to stderr
//! otherwise.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

const DEFAULT_FILTER: &str = "info";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry();
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    match journald {
        Some(journald) => registry
            .with(
                // Fields as journald fields without a prefix: COMPONENT (the task),
                // DEVICE, TOPIC, PEER, CLIENT_ID, ... (`journalctl COMPONENT=uplink`).
                journald
                    .with_syslog_identifier("bridgehead".into())
                    .with_field_prefix(None)
                    // journalctl -p info shows info and above, as operators expect.
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        error: tracing_journald::Priority::Error,
                        warn: tracing_journald::Priority::Warning,
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        trace: tracing_journald::Priority::Debug,
                    })
                    .with_filter(filter),
            )
            .init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .init(),
    }
}
