//! Logging to journald when systemd started us (its stream is on stderr), to stderr
//! otherwise.

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// `RUST_LOG`: a level (`debug`), or `target=level` directives with an optional default
/// (`info,bridgehead::broker=debug`); info when unset or not understood. (`Targets`, not
/// `EnvFilter`: the same directives without a regular expression engine in the binary.)
fn filter() -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

pub fn init() {
    let filter = filter();
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
