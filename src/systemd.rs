//! Talking to systemd (`Type=notify`): readiness, reloads, a one-line status, and the
//! watchdog, which is pinged only while every supervised task answers its probe and the
//! outbox's owner answers a request. Without `NOTIFY_SOCKET` every call is a no-op.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::health::{RateLimit, SharedHealth};
use crate::outbox::OutboxHandle;
use crate::supervisor::Liveness;

/// Without a systemd watchdog, tasks are still probed this often (and a silent one logged).
const PROBE_EVERY: Duration = Duration::from_secs(10);
const STATUS_EVERY: Duration = Duration::from_secs(2);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "notifying systemd failed");
    }
}

/// The front door listens and the outbox is open.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload starts; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The interval systemd expects pings at (`WatchdogSec=`), if it watches us.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Probes every task and pings the watchdog at half of `WatchdogSec` while all answer;
/// keeps `STATUS=` current. Runs until shutdown.
pub async fn run_watchdog(
    liveness: Arc<Liveness>,
    outbox: OutboxHandle,
    health: SharedHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    let watchdog = watchdog_interval();
    let every = watchdog.map_or(PROBE_EVERY, |w| w / 2);
    if let Some(w) = watchdog {
        info!(watchdog = ?w, "systemd watchdog on: pinged while every task answers");
    }
    let mut probe_tick = tokio::time::interval(every);
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut silent_log = RateLimit::new(Duration::from_secs(60));
    let mut was_silent = false;
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = probe_tick.tick() => {}
            _ = status_tick.tick() => {
                let status = status_line(&health);
                if status != last_status {
                    send(&[NotifyState::Status(&status)]);
                    last_status = status;
                }
                continue;
            }
            _ = shutdown.changed() => return,
        }
        let silent = probe(&liveness, &outbox, every / 2).await;
        if silent.is_empty() {
            if was_silent {
                info!("every task answers again");
                was_silent = false;
            }
            if watchdog.is_some() {
                send(&[NotifyState::Watchdog]);
            }
        } else {
            was_silent = true;
            if let Some(held) = silent_log.check() {
                warn!(tasks = %silent.join(", "), earlier_warnings_suppressed = held,
                    "tasks not answering within {:?}; the systemd watchdog is not pinged", every / 2);
            }
        }
    }
}

/// The tasks that did not answer within `within`.
async fn probe(liveness: &Liveness, outbox: &OutboxHandle, within: Duration) -> Vec<String> {
    let seq = liveness.ask();
    let outbox_answers = tokio::time::timeout(within, outbox.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let deadline = tokio::time::Instant::now() + within;
    let mut silent = liveness.silent(seq);
    while !silent.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        silent = liveness.silent(seq);
    }
    if !outbox_answers {
        silent.push("outbox".into());
    }
    silent
}

/// `STATUS=`: what `systemctl status` shows under the unit.
fn status_line(health: &crate::health::Health) -> String {
    use std::sync::atomic::Ordering;
    format!(
        "cloud telemetry {}, commands {}; outbox {} rows, {} bytes",
        health.telemetry.get().as_str(),
        health.commands.get().as_str(),
        health.queue.rows.load(Ordering::Relaxed),
        health.queue.bytes.load(Ordering::Relaxed),
    )
}
