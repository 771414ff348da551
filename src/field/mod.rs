//! Field devices: Modbus RTU/TCP pollers and writers, and line-oriented serial sensors.
//!
//! One task owns each bus (a serial port or a TCP address) and runs one transaction at a
//! time. Readings go into the local broker through one publishing link, like any device's
//! messages, so the uplink rules decide what goes up. Commands reach the field through one
//! subscribing link that routes each topic to the task owning its device.

pub mod modbus;
pub mod serial;
pub mod value;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::broker::Link;
use crate::config::Config;
use crate::health::{inc, RateLimit, SharedHealth};

/// Readings waiting for the publishing link; a full queue slows the pollers down.
const PUBLISH_QUEUE: usize = 1024;
/// Commands waiting for one bus or port; more are refused with a result.
const COMMAND_QUEUE: usize = 64;

/// A message for the local broker.
#[derive(Debug)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
}

/// Where field tasks publish.
#[derive(Clone)]
pub struct Publisher(mpsc::Sender<Outgoing>);

impl Publisher {
    /// Waits for room; false once the gateway is shutting down.
    pub async fn publish(&self, topic: String, payload: impl Into<Bytes>) -> bool {
        let payload = payload.into();
        self.0.send(Outgoing { topic, payload }).await.is_ok()
    }
}

/// Whether the config has field devices (and so needs the two field links).
pub fn wanted(config: &Config) -> bool {
    !config.modbus.is_empty() || !config.serial.is_empty()
}

/// Starts every bus, sensor, the publisher and the command router. The links must have
/// been made before the broker started.
pub fn spawn(
    config: &Config,
    publish_link: Link,
    command_link: Link,
    health: SharedHealth,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let (out_tx, out_rx) = mpsc::channel(PUBLISH_QUEUE);
    let publisher = Publisher(out_tx);
    let mut tasks = Vec::new();
    let mut routes: HashMap<String, Route> = HashMap::new();

    for (transport, devices) in modbus::buses(&config.modbus) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        for (d, device) in devices.iter().enumerate() {
            for (w, write) in device.writes.iter().enumerate() {
                let job = modbus::WriteTarget {
                    device: d,
                    write: w,
                };
                routes.insert(write.topic.clone(), Route::Modbus(tx.clone(), job));
            }
        }
        info!(bus = %transport.bus(), devices = devices.len(), "modbus bus starting");
        let task = modbus::Bus::new(
            transport,
            devices,
            rx,
            publisher.clone(),
            &health,
            shutdown.clone(),
        );
        tasks.push(tokio::spawn(task.run()));
    }
    for sensor in &config.serial {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        if let Some(topic) = &sensor.command_topic {
            routes.insert(topic.clone(), Route::Serial(tx));
        }
        let task = serial::Sensor::new(
            sensor.clone(),
            rx,
            publisher.clone(),
            &health,
            shutdown.clone(),
        );
        tasks.push(tokio::spawn(task.run()));
    }
    tasks.push(tokio::spawn(run_publisher(
        publish_link,
        out_rx,
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(run_router(
        command_link,
        routes,
        publisher,
        health,
        shutdown,
    )));
    tasks
}

enum Route {
    Modbus(mpsc::Sender<modbus::WriteJob>, modbus::WriteTarget),
    Serial(mpsc::Sender<Bytes>),
}

/// Moves readings into the local broker.
async fn run_publisher(
    mut link: Link,
    mut out: mpsc::Receiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut link_open = true;
    loop {
        tokio::select! {
            message = out.recv() => {
                let Some(message) = message else { return };
                let publish = Publish::new(Bytes::from(message.topic), message.payload, false);
                if let Err(e) = link.tx.send(Packet::Publish(publish, None)).await {
                    warn!(error = %e, "field publisher: the local broker link failed; field readings stop");
                    return;
                }
            }
            // The link's notifications must be read, or the broker stalls it.
            next = link.next(), if link_open => link_open = next.is_ok(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Subscribes to every command topic of the field and hands each command to its owner.
async fn run_router(
    mut link: Link,
    routes: HashMap<String, Route>,
    publisher: Publisher,
    health: SharedHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    for topic in routes.keys() {
        if let Err(e) = link.tx.subscribe(topic.clone()) {
            warn!(%topic, error = %e, "field commands: cannot subscribe; commands on this topic are not executed");
        }
    }
    let mut busy_log = RateLimit::new(Duration::from_secs(10));
    loop {
        let next = tokio::select! {
            next = link.next() => next,
            _ = shutdown.changed() => return,
        };
        let forward = match next {
            Ok(Some(Notification::Forward(forward))) => forward,
            Ok(_) => continue,
            Err(e) => {
                warn!(error = %e, "field commands: the local broker link failed; commands stop");
                return;
            }
        };
        let publish = forward.publish;
        let Some(route) = std::str::from_utf8(&publish.topic)
            .ok()
            .and_then(|topic| routes.get(topic))
        else {
            continue;
        };
        let refused = match route {
            Route::Modbus(tx, target) => {
                let job = modbus::WriteJob {
                    target: *target,
                    payload: publish.payload,
                };
                tx.try_send(job).err().map(|e| match e {
                    mpsc::error::TrySendError::Full(job)
                    | mpsc::error::TrySendError::Closed(job) => Some(job),
                })
            }
            Route::Serial(tx) => tx.try_send(publish.payload).err().map(|_| None),
        };
        let Some(job) = refused else { continue };
        inc(&health.counters.field_write_errors);
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        if let Some(held) = busy_log.check() {
            warn!(%topic, earlier_warnings_suppressed = held, "field command refused: {COMMAND_QUEUE} commands already wait for this device");
        }
        if job.is_some() {
            let result = format!("error: busy, {COMMAND_QUEUE} commands already wait for this bus");
            publisher.publish(format!("{topic}/result"), result).await;
        }
    }
}
