//! The live status: a unix socket in the data directory (`status.sock`) on which the
//! running gateway answers every connection with the status document of this moment, for
//! `bridgehead status`. Mode 0660: the service's group may read it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::health::{ReporterSettings, SharedHealth};
use crate::supervisor::Probe;

pub const FILE_NAME: &str = "status.sock";

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Binds the socket, replacing one a previous run left behind.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    info!(path = %path.display(), "status socket listening");
    Ok(listener)
}

/// Answers each connection with one JSON document and a newline, until shutdown.
pub async fn serve(
    listener: UnixListener,
    health: SharedHealth,
    settings: watch::Receiver<ReporterSettings>,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = probe.serve() => continue,
            _ = shutdown.changed() => break,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "status socket: accepting failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let gateway_id = settings.borrow().gateway_id.clone();
        let mut doc = match serde_json::to_value(health.status(&gateway_id)) {
            Ok(doc) => doc,
            Err(e) => {
                warn!(error = %e, "status socket: serialising the status failed");
                continue;
            }
        };
        doc["running"] = serde_json::Value::Bool(true);
        let mut text = doc.to_string();
        text.push('\n');
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(text.as_bytes()))
                .await;
        });
    }
    if let Ok(addr) = listener.local_addr() {
        if let Some(path) = addr.as_pathname() {
            let _ = std::fs::remove_file(path);
        }
    }
}
