//! bridgehead: the site's MQTT broker, a durable store-and-forward uplink to one cloud
//! broker, and commands from the cloud down to local devices.
//!
//! This file only wires the parts together; each module owns one stage of the data flow.

pub mod automation;
pub mod backoff;
pub mod broker;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod downlink;
pub mod field;
pub mod health;
pub mod logging;
pub mod outbox;
pub mod reload;
pub mod status_socket;
pub mod supervisor;
pub mod systemd;
pub mod topics;
pub mod uplink;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::broker::listeners::{self, Listeners, TlsListener};
use crate::broker::message::OriginKind;
use crate::cloud::CloudLink;
use crate::config::Config;
use crate::health::SharedHealth;
use crate::reload::Live;
use crate::supervisor::{Liveness, Supervisor};

/// SIGTERM to exit: the whole shutdown stays within this.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);
/// Of it, what device connections get to finish what they sent.
const DRAIN_BUDGET: Duration = Duration::from_millis(1500);

/// Runs the gateway on the config read from `config_path` until SIGTERM or SIGINT;
/// reloads it on SIGHUP and when the file changes. An error is a reason to restart.
pub async fn run(config_path: &Path, config: Config, health: SharedHealth) -> anyhow::Result<()> {
    let config_path = std::path::absolute(config_path).context("resolving the config path")?;
    let cloud = CloudLink::new(&config.cloud).context("preparing the cloud connection")?;
    let (outbox, outbox_owner) = {
        let (queue, data_dir, health) = (
            config.queue.clone(),
            config.gateway.data_dir.clone(),
            health.clone(),
        );
        tokio::task::spawn_blocking(move || outbox::open(&queue, &data_dir, health)).await??
    };
    let state = {
        let (fsync, data_dir, health) = (
            config.queue.fsync,
            config.gateway.data_dir.clone(),
            health.clone(),
        );
        tokio::task::spawn_blocking(move || broker::persist::open(&data_dir, fsync, &health))
            .await??
    };
    let plain = listeners::bind(config.local.listen, "local.listen").await?;
    let v5 = match config.local.listen_v5 {
        Some(listen) => Some(listeners::bind(listen, "local.listen_v5").await?),
        None => None,
    };
    let tls = match &config.local.security.tls {
        Some(tls) => Some((
            listeners::bind(tls.listen, "local.tls_listen").await?,
            TlsListener::new(tls).context("preparing local.tls_listen")?,
        )),
        None => None,
    };
    let policy = broker::policy::Policy::load(&config.local.security)?.shared();
    let open_files = listeners::raise_open_files_limit();
    if open_files < config.local.max_connections as u64 + 256 {
        warn!(
            open_files,
            max_connections = config.local.max_connections,
            "the open files limit is low for local.max_connections; raise LimitNOFILE"
        );
    }
    if config.local.listen_v5.is_some() {
        warn!("local.listen_v5 is deprecated: local.listen serves MQTT 5 too; it is kept as one more listener");
    }

    let (shutdown_tx, shutdown) = watch::channel(false);
    let liveness = Arc::new(Liveness::default());
    let mut supervisor = Supervisor::new(liveness.clone());
    supervisor.spawn("outbox", outbox_owner.run());
    let (mut live, rx) = Live::new(
        &config_path,
        &config,
        cloud.clone(),
        outbox.clone(),
        health.clone(),
    );
    let (feed, readings) = automation::feed(rx.rules.clone(), health.clone());
    let intake = broker::Intake {
        rules: rx.intake_rules.clone(),
        feed,
        outbox: outbox.clone(),
        health: health.clone(),
    };
    let shared = broker::Shared::new(
        broker::limits(&config),
        broker::Settings::of(&config.local),
        policy.clone(),
        intake,
        health.clone(),
    );
    // Retained messages and persistent sessions are back before the first device is let in.
    let state = broker::persist::start(&shared, state)?;
    let mut device_listeners = Listeners::new(shared.clone(), shutdown.clone());
    device_listeners.serve(&mut supervisor, "local.listen", plain, None);
    if let Some(listener) = v5 {
        device_listeners.serve(&mut supervisor, "local.listen_v5", listener, None);
    }
    if let Some((listener, tls)) = tls {
        device_listeners.serve(&mut supervisor, "local.tls_listen", listener, Some(tls));
    }
    live.listeners = Some(device_listeners);
    live.broker = Some(shared.clone());
    // The config watcher also watches the password and ACL files: a change of either is
    // applied like an edit of the config.
    live.policy = Some(policy);
    supervisor.spawn(
        "broker",
        broker::run_timers(shared.clone(), liveness.probe("broker"), shutdown.clone()),
    );
    supervisor.spawn(
        "rules",
        automation::run(
            shared.client("rules", OriginKind::Rules),
            rx.rules.clone(),
            readings,
            health.clone(),
            liveness.probe("rules"),
            shutdown.clone(),
        ),
    );
    let uplink = supervisor.spawn(
        "uplink",
        uplink::Uplink {
            cloud: cloud.clone(),
            outbox: outbox.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
            control: rx.cloud_control(liveness.probe("uplink")),
        }
        .run(),
    );
    let downlink = downlink::Downlink {
        cloud,
        data_dir: config.gateway.data_dir.clone(),
        rules: config.downlink.clone(),
        client: shared.client("downlink", OriginKind::Cloud),
        health: health.clone(),
        shutdown: shutdown.clone(),
        control: rx.cloud_control(liveness.probe("downlink")),
    };
    supervisor.spawn("downlink", async move {
        if let Err(e) = downlink.run().await {
            error!(error = %e, "the command link cannot go on");
        }
    });
    supervisor.spawn(
        "reporter",
        health::run_reporter(
            health.clone(),
            rx.reporter.clone(),
            shared.client("health", OriginKind::Gateway),
            liveness.probe("reporter"),
            shutdown.clone(),
        ),
    );
    match status_socket::bind(&config.gateway.data_dir) {
        Ok(listener) => {
            supervisor.spawn(
                "status socket",
                status_socket::serve(
                    listener,
                    health.clone(),
                    rx.reporter.clone(),
                    outbox.clone(),
                    liveness.probe("status socket"),
                    shutdown.clone(),
                ),
            );
        }
        Err(e) => {
            warn!(error = %e, "no status socket; `bridgehead status` falls back to status.json")
        }
    }
    supervisor.spawn(
        "clock",
        clock::run_watch(health.clone(), liveness.probe("clock"), shutdown.clone()),
    );
    let (trigger_tx, mut triggers) = mpsc::channel(4);
    supervisor.spawn(
        "config watcher",
        reload::run_watcher(
            config_path.clone(),
            rx.watched.clone(),
            trigger_tx,
            liveness.probe("config watcher"),
            shutdown.clone(),
        ),
    );
    live.field = Some(
        field::Field::start(
            &config,
            shared.client("field-readings", OriginKind::Field),
            shared.client("field-commands", OriginKind::Field),
            health.clone(),
            &mut supervisor,
            shutdown.clone(),
        )
        .await,
    );
    supervisor.spawn(
        "watchdog",
        systemd::run_watchdog(
            liveness.clone(),
            outbox.clone(),
            health.clone(),
            shutdown.clone(),
        ),
    );
    info!(gateway_id = %config.gateway.id, cloud = %config.cloud.url, cloud_failover_nodes = config.cloud.failover.len(),
        uplink_rules = config.uplink.len(), downlink_rules = config.downlink.len(),
        modbus_devices = config.modbus.len(), serial_sensors = config.serial.len(),
        rules = config.rules.len(), "bridgehead running");
    systemd::ready();

    let mut signals = Signals::new()?;
    let fatal = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Reload => {
                    let loaded = reload::load(&config_path).await;
                    live.reload(&mut supervisor, &config_path, loaded, "SIGHUP").await;
                }
                Signal::Stop(name) => {
                    info!(signal = name, "shutting down");
                    break None;
                }
            },
            Some(trigger) = triggers.recv() => {
                live.reload(&mut supervisor, &config_path, trigger.loaded, trigger.reason).await;
            }
            ended = supervisor.unexpected_end() => break Some(ended),
        }
    };
    systemd::stopping();
    // No new connections; every device connection finishes the packets it sent (what it
    // was told is in the gateway's care is in the outbox) and is told the server goes.
    let _ = shutdown_tx.send(true);
    shared.stop();
    let finished = tokio::time::timeout(SHUTDOWN_BUDGET, async {
        shared.drained(DRAIN_BUDGET).await;
        // The broker's state is written at once, beside the outbox's shutdown: a slow
        // outbox must not leave it unwritten when the budget runs out.
        let outbox_done = async {
            // The uplink reports what the cloud acknowledged, then the outbox writes
            // what is left.
            supervisor.join(&uplink).await;
            if let Err(e) = outbox.shutdown().await {
                warn!(error = %e, "closing the outbox");
            }
        };
        tokio::join!(state.flush(), outbox_done);
        supervisor.join_all().await;
        // What the last moments of the downlink and the rules changed.
        state.flush().await;
    })
    .await;
    if finished.is_err() {
        warn!(still_running = ?supervisor.running(),
            "shutdown took longer than {SHUTDOWN_BUDGET:?}; exiting anyway");
    }
    match fatal {
        Some(e) => {
            error!(error = %e, "stopping the gateway so that it can be restarted cleanly");
            Err(e.into())
        }
        None => {
            info!("bridgehead stopped");
            Ok(())
        }
    }
}

enum Signal {
    Stop(&'static str),
    Reload,
}

/// SIGTERM and SIGINT stop the gateway; SIGHUP (`systemctl reload`) reloads the config.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

pub use health::Health;
pub type SharedHealthHandle = Arc<Health>;
