//! bridgehead: the site's MQTT broker, a durable store-and-forward uplink to one cloud
//! broker, and commands from the cloud down to local devices.
//!
//! This file only wires the parts together; each module owns one stage of the data flow.

pub mod broker;
pub mod cloud;
pub mod config;
pub mod downlink;
pub mod field;
pub mod health;
pub mod logging;
pub mod outbox;
pub mod topics;
pub mod uplink;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::broker::{front_door, IntakeRule, LocalBroker};
use crate::cloud::CloudLink;
use crate::config::Config;
use crate::health::SharedHealth;

/// SIGTERM to exit: the whole shutdown stays within this.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(config: Config, health: SharedHealth) -> anyhow::Result<()> {
    let cloud = CloudLink::new(&config.cloud).context("preparing the cloud connection")?;
    let (outbox, outbox_thread) =
        outbox::open(&config.queue, &config.gateway.data_dir, health.clone())?;

    // The device ports are bound before rumqttd's internal ports are picked, so that the
    // kernel cannot hand one of ours to rumqttd.
    let v4_listener = bind_devices(config.local.listen, "local.listen").await?;
    let v5_listener = match config.local.listen_v5 {
        Some(listen) => Some(bind_devices(listen, "local.listen_v5").await?),
        None => None,
    };
    let tls_listener = match &config.local.security.tls {
        Some(tls) => Some((
            bind_devices(tls.listen, "local.tls_listen").await?,
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

    let broker = LocalBroker::new(&config.local)?;
    let intake_link = broker.link("intake")?;
    let command_link = broker.link("downlink")?;
    let health_link = broker.link("health")?;
    let field_links = match field::wanted(&config) {
        true => Some((
            broker.link("field-readings")?,
            broker.link("field-commands")?,
        )),
        false => None,
    };
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

    let (shutdown_tx, shutdown) = watch::channel(false);
    let plain = std::iter::once(v4_listener).chain(v5_listener).collect();
    let listeners = front_door::Listeners {
        plain,
        tls: tls_listener,
    };
    front_door::open(
        &config.local,
        listeners,
        backends,
        side_door,
        policy.clone(),
        Vec::new(),
        health.clone(),
        &shutdown,
    );
    tokio::spawn(broker::policy::watch_files(
        policy,
        config.local.security.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let rules = config
        .uplink
        .iter()
        .map(|r| IntakeRule {
            filter: r.topic.clone(),
            remote_prefix: r.remote_prefix.clone(),
            qos: r.qos as u8,
        })
        .collect();
    let intake = tokio::spawn(broker::run_intake(
        intake_link,
        rules,
        outbox.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let uplink = tokio::spawn(
        uplink::Uplink {
            cloud: cloud.clone(),
            outbox: outbox.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    // Without [[downlink]] rules there is no command connection at all.
    if config.downlink.is_empty() {
        health.commands.set(health::LinkState::Off);
    }
    let mut downlink = (!config.downlink.is_empty()).then(|| {
        tokio::spawn(
            downlink::Downlink {
                cloud,
                data_dir: config.gateway.data_dir.clone(),
                rules: config.downlink.clone(),
                link: command_link,
                health: health.clone(),
                shutdown: shutdown.clone(),
            }
            .run(),
        )
    });
    let reporter = tokio::spawn(health::run_reporter(
        health.clone(),
        config.gateway.id.clone(),
        config.gateway.data_dir.join("status.json"),
        config.gateway.metrics_topic.clone(),
        health_link,
        config.gateway.metrics_interval,
        shutdown.clone(),
    ));
    let field_tasks = match field_links {
        Some((readings, commands)) => field::spawn(
            &config,
            readings,
            commands,
            health.clone(),
            shutdown.clone(),
        ),
        None => Vec::new(),
    };
    info!(gateway_id = %config.gateway.id, cloud = %config.cloud.url, cloud_failover_nodes = config.cloud.failover.len(),
        uplink_rules = config.uplink.len(), downlink_rules = config.downlink.len(),
        modbus_devices = config.modbus.len(), serial_sensors = config.serial.len(), "bridgehead running");

    let fatal = tokio::select! {
        signal = wait_for_signal() => { info!(%signal, "shutting down"); None }
        result = async {
            match downlink.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        } => Some(match result {
            Ok(Err(e)) => anyhow::Error::new(e),
            Ok(Ok(())) => anyhow::anyhow!("the command link stopped"),
            Err(e) => anyhow::Error::new(e),
        }),
    };
    let _ = shutdown_tx.send(true);
    let finished = tokio::time::timeout(SHUTDOWN_BUDGET, async {
        let _ = intake.await;
        if let Err(e) = outbox.shutdown().await {
            warn!(error = %e, "closing the outbox");
        }
        let _ = uplink.await;
        if let (None, Some(task)) = (&fatal, downlink) {
            let _ = task.await;
        }
        let _ = reporter.await;
        for task in field_tasks {
            let _ = task.await;
        }
    })
    .await;
    if finished.is_err() {
        warn!("shutdown took longer than {SHUTDOWN_BUDGET:?}; exiting anyway");
    } else {
        let _ = tokio::task::spawn_blocking(move || outbox_thread.join()).await;
    }
    match fatal {
        Some(e) => {
            error!(error = %e, "stopping the gateway so that it can be restarted cleanly");
            Err(e)
        }
        None => {
            info!("bridgehead stopped");
            Ok(())
        }
    }
}

async fn bind_devices(listen: std::net::SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for devices on {listen} ({key})"))
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

/// SIGTERM or SIGINT. SIGHUP (reload) is logged: reload is not built yet.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers; stop the gateway with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => warn!("SIGHUP received: configuration reload is not supported yet; restart the service to apply changes"),
        }
    }
}

pub use health::Health;
pub type SharedHealthHandle = Arc<Health>;
