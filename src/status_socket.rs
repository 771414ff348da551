//! The live status: a unix socket in the data directory (`status.sock`) on which the
//! running gateway answers every connection with the status document of this moment, for
//! `bridgehead status`. Mode 0660: the service's group may use it.
//!
//! A client may send one request line first: `status` (the default, also when it sends
//! nothing within 200 ms), or `replay all` / `replay ID ...` (dead letters back into the
//! queue, for `bridgehead dead-letters replay`), answered with `{"replayed":N}` or
//! `{"error":"..."}`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::health::{ReporterSettings, SharedHealth};
use crate::outbox::dead_letters::Selection;
use crate::outbox::OutboxHandle;
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
    outbox: OutboxHandle,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = probe.serve() => continue,
            _ = shutdown.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "status socket: accepting failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let gateway_id = settings.borrow().gateway_id.clone();
        let (health, outbox) = (health.clone(), outbox.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                answer(stream, &health, &gateway_id, &outbox),
            )
            .await;
        });
    }
    if let Ok(addr) = listener.local_addr() {
        if let Some(path) = addr.as_pathname() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One connection: read the request (if any), write the answer.
async fn answer(
    stream: tokio::net::UnixStream,
    health: &SharedHealth,
    gateway_id: &str,
    outbox: &OutboxHandle,
) {
    let mut stream = BufReader::new(stream);
    let mut request = String::new();
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read_line(&mut request)).await;
    let reply = match request.split_whitespace().collect::<Vec<_>>().as_slice() {
        [] | ["status"] => match serde_json::to_value(health.status(gateway_id)) {
            Ok(mut doc) => {
                doc["running"] = serde_json::Value::Bool(true);
                doc
            }
            Err(e) => {
                warn!(error = %e, "status socket: serialising the status failed");
                return;
            }
        },
        ["replay", which @ ..] => match parse_selection(which) {
            Ok(which) => match outbox.replay(which).await {
                Ok(n) => serde_json::json!({ "replayed": n }),
                Err(e) => serde_json::json!({ "error": e }),
            },
            Err(e) => serde_json::json!({ "error": e }),
        },
        _ => serde_json::json!({ "error": format!("unknown request {:?}", request.trim()) }),
    };
    let mut text = reply.to_string();
    text.push('\n');
    let _ = stream.get_mut().write_all(text.as_bytes()).await;
}

/// `all`, or dead-letter ids.
pub fn parse_selection(words: &[&str]) -> Result<Selection, String> {
    match words {
        ["all"] => Ok(Selection::All),
        [] => Err("say which dead letters: all, or their ids".into()),
        ids => ids
            .iter()
            .map(|id| {
                id.parse::<i64>()
                    .map_err(|_| format!("{id:?} is not a dead-letter id"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Selection::Ids),
    }
}
