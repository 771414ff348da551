//! Logging to journald when systemd started us (its stream is on stderr), to stderr
//! otherwise; and the one signal rumqttd gives of lost data, turned into counters.

use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::health::{inc, SharedHealth};

/// rumqttd is chatty at info (every subscription) and logs every device that hangs up as an
/// error; what matters of it is counted by [`OverrunCounter`] and the front door.
const DEFAULT_FILTER: &str =
    "info,rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off";

pub fn init(health: SharedHealth) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Its own filter: rumqttd's warning events only. Spans must stay disabled: rumqttd opens
    // an error-level span for every publish, and an enabled one costs a registry entry.
    let overruns = OverrunCounter { health }.with_filter(filter_fn(|meta| {
        meta.is_event()
            && *meta.level() == tracing::Level::WARN
            && meta.target().starts_with("rumqttd")
    }));
    let registry = tracing_subscriber::registry().with(overruns);
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

/// rumqttd drops the oldest log segment under a subscriber that fell behind and only says
/// so in a warning ("Read cursor start jumped ... on FILTER"); its alert's count is always 0.
struct OverrunCounter {
    health: SharedHealth,
}

impl<S: Subscriber> Layer<S> for OverrunCounter {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::WARN || !meta.target().starts_with("rumqttd") {
            return;
        }
        let mut finder = JumpFinder(None);
        event.record(&mut finder);
        match finder.0 {
            Some(true) => {
                inc(&self.health.counters.intake_overruns);
                tracing::error!("the embedded broker skipped messages under a subscription to '#': the intake (messages lost before the outbox) or a device subscribed to everything that falls behind");
            }
            Some(false) => inc(&self.health.counters.local_overruns),
            None => {}
        }
    }
}

/// Some(true) for a jump on the intake's filter, Some(false) for a device's.
struct JumpFinder(Option<bool>);

impl Visit for JumpFinder {
    fn record_str(&mut self, _field: &Field, value: &str) {
        if value.contains("Read cursor start jumped") {
            self.0 = Some(value.ends_with(" on #"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}").replace('"', ""));
    }
}
