//! The front door's listener tasks (`local.listen`, `local.listen_v5`, `local.tls_listen`),
//! each replaceable: a reload that moves a listen address binds the new one and retires the
//! old listener, while the device connections it accepted stay.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use super::front_door::{FrontDoor, TlsListener};
use crate::supervisor::{Supervisor, Task};

/// One listener: where it listens, whether it speaks TLS, and its task.
struct Listener {
    key: &'static str,
    listen: SocketAddr,
    tls: Option<TlsListener>,
    task: Task,
}

pub struct Listeners {
    listeners: Vec<Listener>,
    door: Option<Arc<FrontDoor>>,
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
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Listeners {
            listeners: Vec::new(),
            door: None,
            shutdown,
        }
    }

    /// The front door the listeners serve; set once, before the first [`serve`](Self::serve).
    pub fn open(&mut self, door: Arc<FrontDoor>) {
        self.door = Some(door);
    }

    /// Starts serving `listener` (bound to the address of `key`), with TLS if given.
    pub fn serve(
        &mut self,
        supervisor: &mut Supervisor,
        key: &'static str,
        listener: TcpListener,
        tls: Option<TlsListener>,
    ) {
        let Some(door) = self.door.clone() else {
            warn!(key, "no front door to serve this listener");
            return;
        };
        let Ok(listen) = listener.local_addr() else {
            warn!(key, "a listener without an address");
            return;
        };
        info!(%listen, key, tls = tls.is_some(), "local broker accepting devices");
        let task = supervisor.spawn(
            format!("front door {key}"),
            door.serve(listener, tls.clone(), self.shutdown.clone()),
        );
        self.listeners.push(Listener {
            key,
            listen,
            tls,
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
                        self.serve(supervisor, key, back, old.tls);
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let (new, old) = new;
        info!(from = %old.listen, to = %listen, key, "front door moved; connected devices stay");
        self.serve(supervisor, key, new, old.tls);
        Ok(())
    }
}
