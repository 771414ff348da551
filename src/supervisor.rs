//! One owner for every long-lived task. A task that ends while the gateway is running is a
//! bug or a dead resource (the intake's link gone while the broker keeps accepting): the
//! supervisor says which task it was and the gateway exits non-zero, so that systemd
//! restarts it whole instead of leaving it half alive.
//!
//! Tasks also answer liveness probes ([`Probe`]); the watchdog pings systemd only while
//! every task answers, so a task stuck in an await stops the pings and systemd restarts the
//! gateway.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{AbortHandle, Id, JoinSet};
use tracing::{error, info_span, Instrument};

/// A task that was spawned under the supervisor.
#[derive(Debug, Clone)]
pub struct Task {
    abort: AbortHandle,
}

impl Task {
    pub fn id(&self) -> Id {
        self.abort.id()
    }
}

/// How a supervised task ended when nobody asked it to.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("the {0} task stopped while the gateway was running")]
    Returned(String),
    #[error("the {0} task panicked: {1}")]
    Panicked(String, String),
}

pub struct Supervisor {
    set: JoinSet<()>,
    names: HashMap<Id, String>,
    /// Tasks stopped on purpose (a reload replaced them): their end is not an error.
    retired: HashSet<Id>,
    /// Unexpected ends noticed while waiting for a retired task.
    pending: Vec<Ended>,
    /// Tasks reaped at shutdown while waiting for another one.
    finished: HashSet<Id>,
    liveness: Arc<Liveness>,
}

impl Supervisor {
    pub fn new(liveness: Arc<Liveness>) -> Self {
        Supervisor {
            set: JoinSet::new(),
            names: HashMap::new(),
            retired: HashSet::new(),
            pending: Vec::new(),
            finished: HashSet::new(),
            liveness,
        }
    }

    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    /// Spawns `task` as `name`; its log lines carry `component = name` (journald:
    /// `COMPONENT=`).
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F) -> Task
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let span = info_span!("task", component = %name);
        let task = with_fault(&name, task);
        let abort = self.set.spawn(task.instrument(span));
        self.names.insert(abort.id(), name);
        Task { abort }
    }

    /// Stops a task on purpose (a reload replaced or removed it) and waits until it is
    /// gone, so that what it held (a serial port opened exclusively) is free again.
    pub async fn retire(&mut self, task: &Task) {
        self.retired.insert(task.id());
        task.abort.abort();
        while let Some(joined) = self.set.join_next_with_id().await {
            let id = match &joined {
                Ok((id, ())) => *id,
                Err(e) => e.id(),
            };
            if let Some(ended) = self.ended(joined) {
                self.pending.push(ended);
            }
            if id == task.id() {
                return;
            }
        }
    }

    /// Waits for a task to end unexpectedly; pending while all run (or none is left).
    pub async fn unexpected_end(&mut self) -> Ended {
        if let Some(ended) = self.pending.pop() {
            return ended;
        }
        loop {
            let Some(joined) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            if let Some(ended) = self.ended(joined) {
                return ended;
            }
        }
    }

    /// At shutdown: waits for one task to finish (others that finish meanwhile are reaped).
    /// A task that ended while another was waited for counts as joined: waiting for it
    /// again would wait for a task that is gone.
    pub async fn join(&mut self, task: &Task) {
        self.retired.insert(task.id());
        if self.finished.contains(&task.id()) {
            return;
        }
        while let Some(joined) = self.set.join_next_with_id().await {
            let id = match &joined {
                Ok((id, ())) => *id,
                Err(e) => e.id(),
            };
            self.names.remove(&id);
            self.finished.insert(id);
            if id == task.id() {
                return;
            }
        }
    }

    /// At shutdown: waits for every task to finish.
    pub async fn join_all(&mut self) {
        while let Some(joined) = self.set.join_next_with_id().await {
            let id = match &joined {
                Ok((id, ())) => *id,
                Err(e) => e.id(),
            };
            self.names.remove(&id);
        }
    }

    /// The tasks that have not ended (at shutdown: those holding it up).
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.names.values().cloned().collect();
        names.sort();
        names
    }

    fn ended(&mut self, joined: Result<(Id, ()), tokio::task::JoinError>) -> Option<Ended> {
        let (id, panic) = match joined {
            Ok((id, ())) => (id, None),
            Err(e) if e.is_cancelled() => (e.id(), None),
            Err(e) => {
                let id = e.id();
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                (id, Some(message))
            }
        };
        let name = self.names.remove(&id).unwrap_or_else(|| "unnamed".into());
        if self.retired.remove(&id) {
            return None;
        }
        let ended = match panic {
            Some(message) => Ended::Panicked(name, message),
            None => Ended::Returned(name),
        };
        error!(error = %ended, "a supervised task ended");
        Some(ended)
    }
}

/// The supervisor's side of the liveness probes.
pub struct Liveness {
    asked: watch::Sender<u64>,
    probes: Mutex<Vec<(String, Weak<AtomicU64>)>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            asked: watch::Sender::new(0),
            probes: Mutex::new(Vec::new()),
        }
    }
}

impl Liveness {
    /// A probe for the task `name`; it counts as long as the probe lives.
    pub fn probe(&self, name: impl Into<String>) -> Probe {
        let answered = Arc::new(AtomicU64::new(*self.asked.borrow()));
        if let Ok(mut probes) = self.probes.lock() {
            probes.push((name.into(), Arc::downgrade(&answered)));
        }
        Probe {
            asked: self.asked.subscribe(),
            answered,
        }
    }

    /// Asks every task to answer; returns the question's number.
    pub fn ask(&self) -> u64 {
        let mut seq = 0;
        self.asked.send_modify(|asked| {
            *asked += 1;
            seq = *asked;
        });
        seq
    }

    /// The tasks that have not answered question `seq` (tasks that ended are forgotten).
    pub fn silent(&self, seq: u64) -> Vec<String> {
        let Ok(mut probes) = self.probes.lock() else {
            return vec!["(liveness registry poisoned)".into()];
        };
        probes.retain(|(_, answered)| answered.strong_count() > 0);
        probes
            .iter()
            .filter(|(_, answered)| {
                answered
                    .upgrade()
                    .is_some_and(|a| a.load(Ordering::Relaxed) < seq)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// A task's side of the liveness probes: answer in the main loop, where a stuck task would
/// not get to.
pub struct Probe {
    asked: watch::Receiver<u64>,
    answered: Arc<AtomicU64>,
}

impl Probe {
    /// Answers probes forever: one arm of the task's `select!` wherever it waits.
    pub async fn serve(&mut self) -> Infallible {
        loop {
            if self.asked.changed().await.is_err() {
                return std::future::pending().await;
            }
            self.tick();
        }
    }

    /// Runs `work` while answering probes: for a wait that is bounded but may be long (a
    /// Modbus request with a 60 s timeout) and is progress, not a hang.
    pub async fn answering<F: Future>(&mut self, work: F) -> F::Output {
        tokio::select! {
            output = work => output,
            never = self.serve() => match never {},
        }
    }

    /// Answers a pending probe without waiting: for loops that are busy rather than waiting.
    pub fn tick(&mut self) {
        let asked = *self.asked.borrow_and_update();
        self.answered.store(asked, Ordering::Relaxed);
    }

    /// A probe that nobody asks (for tasks started outside a supervisor, e.g. in tests).
    pub fn detached() -> Probe {
        Liveness::default().probe("detached")
    }
}

/// The test-only fault hook: `BRIDGEHEAD_TEST_FAULT=TASK:exit` makes the task `TASK` end
/// a moment after it started, `TASK:hang` makes it stop being polled (a task stuck in an
/// await). The tests of supervision and of the watchdog use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Exit,
    Hang,
}

const FAULT_AFTER: Duration = Duration::from_secs(3);

fn fault_for(task: &str) -> Option<Fault> {
    let spec = std::env::var("BRIDGEHEAD_TEST_FAULT").ok()?;
    let (name, kind) = spec.split_once(':')?;
    if name != task {
        return None;
    }
    match kind {
        "exit" => Some(Fault::Exit),
        "hang" => Some(Fault::Hang),
        _ => None,
    }
}

fn with_fault<F>(name: &str, task: F) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = ()> + Send + 'static,
{
    let fault = fault_for(name);
    async move {
        match fault {
            None => task.await,
            Some(fault) => {
                tracing::warn!(?fault, "test fault hook armed for this task");
                // Held, not dropped, when it hangs: its probe must stay registered.
                let mut task = std::pin::pin!(task);
                let _ = tokio::time::timeout(FAULT_AFTER, &mut task).await;
                if fault == Fault::Hang {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_returns_is_reported_and_a_retired_one_is_not() {
        let mut supervisor = Supervisor::new(Arc::default());
        let retired = supervisor.spawn("listener", std::future::pending());
        supervisor.retire(&retired).await;
        supervisor.spawn("intake", async {});
        let ended = supervisor.unexpected_end().await;
        assert_eq!(
            ended.to_string(),
            "the intake task stopped while the gateway was running"
        );
    }

    #[tokio::test]
    async fn joining_a_task_that_ended_while_another_was_awaited_returns_at_once() {
        let mut supervisor = Supervisor::new(Arc::default());
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let first = supervisor.spawn("intake", async {
            let _ = wait.await;
        });
        let second = supervisor.spawn("uplink", async {});
        let _held = supervisor.spawn("outbox", std::future::pending());
        tokio::task::yield_now().await;
        let _ = go.send(());
        // "uplink" ends first and is reaped while "intake" is awaited.
        tokio::time::timeout(Duration::from_secs(2), async {
            supervisor.join(&first).await;
            supervisor.join(&second).await;
        })
        .await
        .expect("join waited for a task that had already ended");
        assert_eq!(supervisor.running(), ["outbox"]);
    }

    #[tokio::test]
    async fn a_task_that_does_not_answer_is_silent() {
        let liveness = Liveness::default();
        let mut alive = liveness.probe("alive");
        let _stuck = liveness.probe("stuck");
        let seq = liveness.ask();
        alive.tick();
        assert_eq!(liveness.silent(seq), ["stuck"]);
        drop(_stuck);
        assert!(liveness.silent(seq).is_empty());
    }
}
