//! Whether the wall clock can be trusted (promise 7). A Pi has no real-time clock: until
//! NTP syncs it may think it is 1970, and readings stamped then are nonsense. The clock is
//! trusted once the kernel says it is synchronised, or once it reads later than the day
//! this gateway was built (a clock that far along was set by someone). Readings stamped
//! with an untrusted clock say so in their payload; steps of the clock are logged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::health::{inc, SharedHealth};
use crate::supervisor::Probe;

static TRUSTED: AtomicBool = AtomicBool::new(false);

/// How often the clock is compared with the monotonic clock.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A difference between wall-clock and monotonic progress larger than this is a step.
const STEP: Duration = Duration::from_secs(1);

/// Seconds since the epoch when this binary was built (build.rs), or 0.
fn build_time() -> u64 {
    option_env!("BRIDGEHEAD_BUILD_UNIX_S")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Whether readings may be stamped with the wall clock without a warning.
pub fn trusted() -> bool {
    TRUSTED.load(Ordering::Relaxed)
}

/// Unix milliseconds of the wall clock, and whether it is trusted.
pub fn now_unix_ms() -> (u64, bool) {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (ms, trusted())
}

/// The kernel's word (adjtimex): synchronised by NTP (or chrony, timesyncd).
fn kernel_synchronised() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's time state into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

fn evaluate(now_unix_s: u64) -> (bool, &'static str) {
    if kernel_synchronised() {
        (true, "synchronised")
    } else if now_unix_s >= build_time() && build_time() > 0 {
        (true, "later than this build")
    } else {
        (false, "not synchronised and earlier than this build")
    }
}

/// Decides trust at start (logging an untrusted clock once), then watches for steps and
/// for the moment the clock becomes trusted.
pub async fn run_watch(
    health: SharedHealth,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    let unix_s = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let (now_trusted, why) = evaluate(unix_s());
    TRUSTED.store(now_trusted, Ordering::Relaxed);
    if !now_trusted {
        warn!(reason = why, "the wall clock is not trusted yet: field readings' JSON \"ts\" carries \"clock\":\"untrusted\" until it is");
    }
    let mut last = (SystemTime::now(), Instant::now());
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = probe.serve() => {}
            _ = shutdown.changed() => return,
        }
        let now = (SystemTime::now(), Instant::now());
        let wall = now.0.duration_since(last.0);
        let mono = now.1.duration_since(last.1);
        let step_ms = match wall {
            Ok(wall) => wall.as_millis() as i128 - mono.as_millis() as i128,
            Err(back) => -(back.duration().as_millis() as i128) - mono.as_millis() as i128,
        };
        last = now;
        if step_ms.unsigned_abs() > STEP.as_millis() {
            inc(&health.counters.clock_steps);
            warn!(step_ms, "the wall clock stepped; readings' ts jump with it (ages and expiry use monotonic time)");
        }
        if !trusted() {
            let (now_trusted, why) = evaluate(unix_s());
            if now_trusted {
                TRUSTED.store(true, Ordering::Relaxed);
                info!(reason = why, "the wall clock is trusted now");
            }
        }
    }
}
