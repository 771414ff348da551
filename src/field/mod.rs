//! Field devices: Modbus RTU/TCP pollers and writers, and line-oriented serial sensors.
//!
//! One task owns each bus (a serial port or a TCP address) and runs one transaction at a
//! time. Readings go into the local broker through one publishing client, like any
//! device's messages, so the uplink rules decide what goes up. Commands reach the field
//! through one subscribing client that routes each topic to the task owning its device
//! (its hand-off is complete when the task's queue took it).

pub mod modbus;
pub mod serial;
pub mod value;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::broker::internal::{Client, Publication};
use crate::config::{Config, ModbusDevice, SerialSensor, Transport};
use crate::health::{inc, RateLimit, SharedHealth};
use crate::supervisor::{Probe, Supervisor, Task};

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

/// The running field tasks: one per Modbus bus and per serial sensor, plus the publisher
/// and the command router. A reload stops and starts only the buses and sensors whose
/// config changed; the others keep polling.
pub struct Field {
    publisher: Publisher,
    routes: watch::Sender<Arc<HashMap<String, Route>>>,
    buses: HashMap<String, Running<Vec<ModbusDevice>, modbus::WriteJob>>,
    sensors: HashMap<String, Running<SerialSensor, Bytes>>,
    health: SharedHealth,
    shutdown: watch::Receiver<bool>,
}

/// A bus or sensor task with the config it runs and the way to its commands.
struct Running<C, J> {
    config: C,
    task: Task,
    commands: mpsc::Sender<J>,
}

impl Field {
    /// Starts the publisher, the command router and every bus and sensor of `config`.
    pub async fn start(
        config: &Config,
        publish_client: Client,
        command_client: Client,
        health: SharedHealth,
        supervisor: &mut Supervisor,
        shutdown: watch::Receiver<bool>,
    ) -> Field {
        let (out_tx, out_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (routes, routes_rx) = watch::channel(Arc::new(HashMap::new()));
        let probe = supervisor.liveness().probe("field-publisher");
        supervisor.spawn(
            "field-publisher",
            run_publisher(publish_client, out_rx, probe, shutdown.clone()),
        );
        let probe = supervisor.liveness().probe("field-router");
        supervisor.spawn(
            "field-router",
            run_router(
                command_client,
                routes_rx,
                Publisher(out_tx.clone()),
                health.clone(),
                probe,
                shutdown.clone(),
            ),
        );
        let mut field = Field {
            publisher: Publisher(out_tx),
            routes,
            buses: HashMap::new(),
            sensors: HashMap::new(),
            health,
            shutdown,
        };
        field.apply(config, supervisor).await;
        field
    }

    /// Brings the running buses and sensors in line with `config`: stops those removed or
    /// changed, starts those added or changed, and reroutes the command topics.
    pub async fn apply(&mut self, config: &Config, supervisor: &mut Supervisor) {
        let mut wanted: HashMap<String, (Transport, Vec<ModbusDevice>)> =
            modbus::buses(&config.modbus)
                .into_iter()
                .map(|(transport, devices)| (transport.bus(), (transport, devices)))
                .collect();
        let stale: Vec<String> = (self.buses.iter())
            .filter(|(bus, running)| wanted.get(*bus).is_none_or(|(_, d)| *d != running.config))
            .map(|(bus, _)| bus.clone())
            .collect();
        for bus in stale {
            if let Some(old) = self.buses.remove(&bus) {
                supervisor.retire(&old.task).await;
                for device in &old.config {
                    if !config.modbus.iter().any(|d| d.name == device.name) {
                        self.health
                            .remove_device(&format!("modbus/{}", device.name));
                    }
                }
                info!(%bus, "modbus bus stopped");
            }
        }
        for (bus, (transport, devices)) in wanted.drain() {
            if self.buses.contains_key(&bus) {
                continue;
            }
            let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
            info!(%bus, devices = devices.len(), "modbus bus starting");
            let name = format!("modbus {bus}");
            let probe = supervisor.liveness().probe(name.clone());
            let task = modbus::Bus::new(
                transport,
                devices.clone(),
                rx,
                self.publisher.clone(),
                &self.health,
                probe,
                self.shutdown.clone(),
            );
            let task = supervisor.spawn(name, task.run());
            self.buses.insert(
                bus,
                Running {
                    config: devices,
                    task,
                    commands: tx,
                },
            );
        }
        let stale: Vec<String> = (self.sensors.iter())
            .filter(|(name, running)| {
                !config
                    .serial
                    .iter()
                    .any(|s| s.name == **name && *s == running.config)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(old) = self.sensors.remove(&name) {
                supervisor.retire(&old.task).await;
                if !config.serial.iter().any(|s| s.name == name) {
                    self.health.remove_device(&format!("serial/{name}"));
                }
            }
        }
        for sensor in &config.serial {
            if self.sensors.contains_key(&sensor.name) {
                continue;
            }
            let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
            let name = format!("serial {}", sensor.name);
            let probe = supervisor.liveness().probe(name.clone());
            let task = serial::Sensor::new(
                sensor.clone(),
                rx,
                self.publisher.clone(),
                &self.health,
                probe,
                self.shutdown.clone(),
            );
            let task = supervisor.spawn(name, task.run());
            self.sensors.insert(
                sensor.name.clone(),
                Running {
                    config: sensor.clone(),
                    task,
                    commands: tx,
                },
            );
        }
        self.routes.send_replace(Arc::new(self.routes()));
    }

    /// Command topic -> the task that executes it.
    fn routes(&self) -> HashMap<String, Route> {
        let mut routes = HashMap::new();
        for bus in self.buses.values() {
            for (d, device) in bus.config.iter().enumerate() {
                for (w, write) in device.writes.iter().enumerate() {
                    let target = modbus::WriteTarget {
                        device: d,
                        write: w,
                    };
                    routes.insert(
                        write.topic.clone(),
                        Route::Modbus(bus.commands.clone(), target),
                    );
                }
            }
        }
        for sensor in self.sensors.values() {
            if let Some(topic) = &sensor.config.command_topic {
                routes.insert(topic.clone(), Route::Serial(sensor.commands.clone()));
            }
        }
        routes
    }
}

#[derive(Clone)]
enum Route {
    Modbus(mpsc::Sender<modbus::WriteJob>, modbus::WriteTarget),
    Serial(mpsc::Sender<Bytes>),
}

/// Subscribes to the topics `new` adds and unsubscribes those it drops.
fn resubscribe(client: &mut Client, old: &HashMap<String, Route>, new: &HashMap<String, Route>) {
    for topic in new.keys().filter(|t| !old.contains_key(*t)) {
        if let Err(why) = client.subscribe(topic, 1) {
            warn!(%topic, why, "field commands: cannot subscribe; commands on this topic are not executed");
        }
    }
    for topic in old.keys().filter(|t| !new.contains_key(*t)) {
        client.unsubscribe(topic);
    }
}

/// Moves readings into the local broker.
async fn run_publisher(
    mut client: Client,
    mut out: mpsc::Receiver<Outgoing>,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            message = out.recv() => {
                let Some(message) = message else { return };
                let publication = Publication {
                    topic: message.topic,
                    payload: message.payload,
                    qos: 0,
                    retain: false,
                    completion: None,
                };
                match client.publish(publication).await {
                    Ok(_) => {}
                    Err(crate::broker::internal::PublishError::Topic { topic, why }) => {
                        warn!(%topic, why, "field publisher: a reading's topic is not valid; not published");
                    }
                    Err(e) => {
                        warn!(error = %e, "field publisher: the local broker cannot take readings; field readings stop");
                        return;
                    }
                }
            }
            _ = probe.serve() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Subscribes to every command topic of the field and hands each command to its owner;
/// a reload changes the routes (and so the subscriptions) while it runs.
async fn run_router(
    mut client: Client,
    mut routes_rx: watch::Receiver<Arc<HashMap<String, Route>>>,
    publisher: Publisher,
    health: SharedHealth,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut routes: Arc<HashMap<String, Route>> = Arc::new(HashMap::new());
    let mut busy_log = RateLimit::new(Duration::from_secs(10));
    let mut commands = Vec::new();
    loop {
        if routes_rx.has_changed().unwrap_or(false) {
            let new = routes_rx.borrow_and_update().clone();
            resubscribe(&mut client, &routes, &new);
            routes = new;
        }
        tokio::select! {
            _ = client.recv(&mut commands) => {}
            changed = routes_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = probe.serve() => continue,
            _ = shutdown.changed() => return,
        };
        for msg in commands.drain(..) {
            let Some(route) = routes.get(&*msg.topic) else {
                continue;
            };
            let refused = match route {
                Route::Modbus(tx, target) => {
                    let job = modbus::WriteJob {
                        target: *target,
                        payload: msg.payload.clone(),
                    };
                    tx.try_send(job).err().map(|e| match e {
                        mpsc::error::TrySendError::Full(job)
                        | mpsc::error::TrySendError::Closed(job) => Some(job),
                    })
                }
                Route::Serial(tx) => tx.try_send(msg.payload.clone()).err().map(|_| None),
            };
            let Some(job) = refused else { continue };
            inc(&health.counters.field_write_errors);
            if let Some(held) = busy_log.check() {
                warn!(topic = %msg.topic, earlier_warnings_suppressed = held, "field command refused: {COMMAND_QUEUE} commands already wait for this device");
            }
            if job.is_some() {
                let result =
                    format!("error: busy, {COMMAND_QUEUE} commands already wait for this bus");
                publisher
                    .publish(format!("{}/result", msg.topic), result)
                    .await;
            }
        }
    }
}
