//! bridgehead: the site's MQTT broker, a durable store-and-forward uplink to one cloud
//! broker, and commands from the cloud down to local devices.
//!
//! This file only wires the parts together; each module owns one stage of the data flow.

pub mod automation;
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
pub mod state;
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

use crate::broker::{front_door, listeners, LocalBroker};
use crate::cloud::CloudLink;
use crate::config::Config;
use crate::health::SharedHealth;
use crate::reload::Live;
use crate::supervisor::{Liveness, Supervisor};

/// SIGTERM to exit: the whole shutdown stays within this.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);

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
    let (state, restore) = {
        let (limits, fsync, data_dir, health) = (
            state::Limits::of(&config),
            config.queue.fsync,
            config.gateway.data_dir.clone(),
            health.clone(),
        );
        let (state, restore, _owner) = tokio::task::spawn_blocking(move || {
            state::State::open(&data_dir, limits, fsync, health)
        })
        .await??;
        (state, restore)
    };

    // The device ports are bound before rumqttd's internal ports are picked, so that the
    // kernel cannot hand one of ours to rumqttd.
    let v4_listener = listeners::bind(config.local.listen, "local.listen").await?;
    let v5_listener = match config.local.listen_v5 {
        Some(listen) => Some(listeners::bind(listen, "local.listen_v5").await?),
        None => None,
    };
    let tls_listener = match &config.local.security.tls {
        Some(tls) => Some((
            listeners::bind(tls.listen, "local.tls_listen").await?,
            front_door::TlsListener::new(tls).context("preparing local.tls_listen")?,
        )),
        None => None,
    };
    let policy = broker::policy::Policy::load(&config.local.security)?.shared();
    let open_files = front_door::raise_open_files_limit();
    if open_files < 3 * config.local.max_connections as u64 + 256 {
        warn!(open_files, max_connections = config.local.max_connections,
            "the open files limit is low for local.max_connections (each device needs 3); raise LimitNOFILE");
    }

    if config.local.listen_v5.is_some() {
        warn!("{}", broker::MQTT5_LIMITS);
    }
    let broker = LocalBroker::new(&config.local)?;
    let intake_link = broker.link("intake")?;
    let command_link = broker.link("downlink")?;
    let health_link = broker.link("health")?;
    // Made even without rules: a reload may add some.
    let rules_link = broker.link("rules")?;
    let mut state_link = broker.link("state")?;
    // Made even without field devices: a reload may add some.
    let field_links = (
        broker.link("field-readings")?,
        broker.link("field-commands")?,
    );
    let backends = front_door::Backends {
        v4: broker.internal_v4,
        v5: broker.internal_v5,
    };
    let side_door = broker.side_door.clone();
    broker.start()?;
    wait_for_port(backends.v4).await?;
    if let Some(v5) = backends.v5 {
        wait_for_port(v5).await?;
    }
    // Retained messages and persistent sessions are back before the first device is let in.
    if let Err(e) =
        state::restore::run(&state, restore, &mut state_link, backends, &side_door).await
    {
        error!(error = %e, "retained messages and sessions of the last run could not be restored");
    }
    state.attach_broker(backends, side_door.clone());

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
        shutdown.clone(),
    );
    live.listeners.open(front_door::open(
        &config.local,
        rx.limits.clone(),
        backends,
        side_door,
        policy.clone(),
        vec![state.hooks(policy.clone())],
        health.clone(),
    ));
    live.listeners
        .serve(&mut supervisor, "local.listen", v4_listener, None);
    if let Some(listener) = v5_listener {
        live.listeners
            .serve(&mut supervisor, "local.listen_v5", listener, None);
    }
    if let Some((listener, tls)) = tls_listener {
        live.listeners
            .serve(&mut supervisor, "local.tls_listen", listener, Some(tls));
    }
    live.state = Some(state.clone());
    // The config watcher also watches the password and ACL files: a change of either is
    // applied like an edit of the config.
    live.policy = Some(policy);

    let (feed, readings) = automation::feed(rx.rules.clone(), health.clone());
    supervisor.spawn(
        "rules",
        automation::run(
            rules_link,
            Some(state.clone()),
            rx.rules.clone(),
            readings,
            health.clone(),
            liveness.probe("rules"),
            shutdown.clone(),
        ),
    );
    let intake = supervisor.spawn(
        "intake",
        broker::run_intake(
            intake_link,
            rx.intake_rules.clone(),
            feed,
            outbox.clone(),
            health.clone(),
            liveness.probe("intake"),
            shutdown.clone(),
        ),
    );
    let uplink = supervisor.spawn(
        "uplink",
        uplink::Uplink {
            cloud: cloud.clone(),
            outbox: outbox.clone(),
            report_every: (config.queue.commit_interval / 4).min(Duration::from_millis(50)),
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
        link: command_link,
        state: Some(state.clone()),
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
            health_link,
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
    let (readings, commands) = field_links;
    live.field = Some(
        field::Field::start(
            &config,
            readings,
            commands,
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
    let _ = shutdown_tx.send(true);
    let finished = tokio::time::timeout(SHUTDOWN_BUDGET, async {
        // The local broker's state is written at once, beside the outbox's shutdown: a
        // slow outbox must not leave it unwritten when the budget runs out.
        let outbox_done = async {
            // The intake hands over what the broker already accepted, the uplink reports
            // what the cloud acknowledged, then the outbox writes what is left.
            supervisor.join(&intake).await;
            supervisor.join(&uplink).await;
            if let Err(e) = outbox.shutdown().await {
                warn!(error = %e, "closing the outbox");
            }
        };
        tokio::join!(state.flush(), outbox_done);
        // What the last moments of the downlink and the rules recorded.
        state.flush().await;
        supervisor.join_all().await;
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

async fn wait_for_port(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the embedded broker did not start listening on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
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
