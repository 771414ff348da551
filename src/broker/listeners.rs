//! The front door's listener tasks (MQTT 3.1.1 on `local.listen`, MQTT 5 on
//! `local.listen_v5`), each replaceable: a reload that moves a listen address binds the new
//! one and retires the old listener, while the device connections it accepted stay.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use super::front_door::{self, Limits};
use crate::health::SharedHealth;
use crate::supervisor::{Supervisor, Task};

/// One listener: where it listens, where it splices to, and its task.
struct Listener {
    key: &'static str,
    listen: SocketAddr,
    backend: SocketAddr,
    task: Task,
}

pub struct Listeners {
    listeners: Vec<Listener>,
    limits: watch::Receiver<Limits>,
    health: SharedHealth,
    shutdown: watch::Receiver<bool>,
}

/// Binds a device port, naming the config key in the error.
pub async fn bind(listen: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for devices on {listen} ({key})"))
}

impl Listeners {
    pub fn new(
        limits: watch::Receiver<Limits>,
        health: SharedHealth,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Listeners {
            listeners: Vec::new(),
            limits,
            health,
            shutdown,
        }
    }

    /// Starts serving `listener` (bound to the address of `key`) toward `backend`.
    pub fn serve(
        &mut self,
        supervisor: &mut Supervisor,
        key: &'static str,
        listener: TcpListener,
        backend: SocketAddr,
    ) {
        let listen = listener.local_addr().unwrap_or(backend);
        info!(%listen, key, "local broker accepting devices");
        let task = supervisor.spawn(
            format!("front door {key}"),
            front_door::serve(
                listener,
                backend,
                self.limits.clone(),
                self.health.clone(),
                self.shutdown.clone(),
            ),
        );
        self.listeners.push(Listener {
            key,
            listen,
            backend,
            task,
        });
    }

    /// Moves the listener of `key` to `listen`; devices already connected stay connected.
    pub async fn rebind(
        &mut self,
        supervisor: &mut Supervisor,
        key: &'static str,
        listen: SocketAddr,
    ) -> anyhow::Result<()> {
        let Some(i) = self.listeners.iter().position(|l| l.key == key) else {
            anyhow::bail!("{key}: no such listener is running; a restart applies it");
        };
        if self.listeners[i].listen == listen {
            return Ok(());
        }
        let new = match bind(listen, key).await {
            Ok(new) => {
                let old = self.listeners.remove(i);
                supervisor.retire(&old.task).await;
                (new, old)
            }
            // The same port on another address of this box: free the old one first.
            Err(_) if self.listeners[i].listen.port() == listen.port() => {
                let old = self.listeners.remove(i);
                supervisor.retire(&old.task).await;
                match bind(listen, key).await {
                    Ok(new) => (new, old),
                    Err(e) => {
                        warn!(error = %e, "binding the new address failed; going back to the old one");
                        let back = bind(old.listen, key).await?;
                        self.serve(supervisor, key, back, old.backend);
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let (new, old) = new;
        info!(from = %old.listen, to = %listen, key, "front door moved; connected devices stay");
        self.serve(supervisor, key, new, old.backend);
        Ok(())
    }
}
