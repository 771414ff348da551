//! At start, before the front door lets a device in: the retained messages go back into
//! rumqttd, and every stored persistent session gets its subscriptions back (so rumqttd
//! queues for it from now on, as it did before the restart).

use std::time::Duration;

use rumqttd::protocol::Packet as RouterPacket;
use tracing::{info, warn};

use super::{Restore, State};
use crate::broker::front_door::Backends;
use crate::broker::packet::Protocol;
use crate::broker::{internal, Link, SideDoor};
use crate::health::inc;

/// Retained messages published before their acknowledgements are awaited.
const WINDOW: usize = 100;
/// rumqttd must acknowledge each window within this.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the in-process link to the local broker failed: {0}")]
    Link(String),
    #[error(
        "the local broker did not acknowledge restored retained messages within {ACK_TIMEOUT:?}"
    )]
    Timeout,
}

/// Gives rumqttd back what `restore` holds; returns once rumqttd has all of it.
pub async fn run(
    state: &State,
    restore: Restore,
    link: &mut Link,
    backends: Backends,
    side_door: &SideDoor,
) -> Result<(), RestoreError> {
    // A failure here must not keep the sessions from coming back.
    if let Err(e) = retained(&restore, link).await {
        inc(&state.shared.health.counters.state_errors);
        warn!(error = %e, "the retained messages of the last run could not all be given back to the embedded broker");
    }
    let mut restored = 0;
    for session in &restore.sessions {
        let (client_id, protocol, filters) =
            (&session.client_id, &session.protocol, &session.filters);
        let addr = match (protocol, backends.v5) {
            (Protocol::V5, Some(v5)) => v5,
            _ => backends.v4,
        };
        let protocol = if addr == backends.v4 {
            Protocol::V311
        } else {
            *protocol
        };
        let filters: Vec<(String, u8)> = match protocol {
            Protocol::V311 => filters.iter().map(|(f, o)| (f.clone(), o & 0x03)).collect(),
            Protocol::V5 => filters.clone(),
        };
        match internal::restore_session(addr, side_door, protocol, client_id, &filters).await {
            Ok(()) => restored += 1,
            Err(e) => {
                inc(&state.shared.health.counters.state_errors);
                warn!(client_id, error = %e, "a persistent session could not be given back to the embedded broker; its device starts afresh");
            }
        }
    }
    info!(
        retained = restore.retained.len(),
        sessions = restored,
        "retained messages and persistent sessions given back to the embedded broker"
    );
    Ok(())
}

/// Publishes the retained messages of `restore` into rumqttd, a window at a time, and
/// waits for each window's acknowledgements.
async fn retained(restore: &Restore, link: &mut Link) -> Result<(), RestoreError> {
    if restore.retained.is_empty() {
        return Ok(());
    }
    let link_error = |e: rumqttd::local::LinkError| RestoreError::Link(e.to_string());
    // A link's publish on a topic no subscription covers makes rumqttd drop the link.
    link.tx.subscribe("#").map_err(link_error)?;
    for chunk in restore.retained.chunks(WINDOW) {
        for (i, (topic, _, payload)) in chunk.iter().enumerate() {
            link.publish(topic, payload.clone(), true, Some(i as u16 + 1))
                .await
                .map_err(link_error)?;
        }
        let mut acked = 0;
        while acked < chunk.len() {
            let next = tokio::time::timeout(ACK_TIMEOUT, link.next())
                .await
                .map_err(|_| RestoreError::Timeout)?
                .map_err(link_error)?;
            if let Some(RouterPacket::PubAck(..)) = next.and_then(Option::from) {
                acked += 1;
            }
        }
    }
    link.tx.unsubscribe("#").map_err(link_error)?;
    Ok(())
}
