//! Live reload: a changed config file (or a file it names), SIGHUP and `systemctl reload`
//! all come here. The new file is validated with the same code as `check`; with any problem
//! every problem is logged and the running config stays. Otherwise only what changed is
//! touched, each component taking its new settings through its own channel, and one log
//! line says what the reload did.
//!
//! Extending: a component that reloads gets a sending end in [`Live`] and a step in
//! [`Live::apply`]; files whose content is config are listed by
//! [`crate::config::diff::watched_files`] and are watched here.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn, Instrument};

use crate::automation::RuleSet;
use crate::broker::listeners::{Listeners, TlsListener};
use crate::broker::policy::SharedPolicy;
use crate::broker::{IntakeRule, Shared};
use crate::cloud::CloudLink;
use crate::config::diff::{applicable, watched_files, ConfigDiff};
use crate::config::{self, Config, ConfigError, DownlinkRule};
use crate::field::Field;
use crate::health::{inc, ReloadOutcome, ReporterSettings, SharedHealth};
use crate::outbox::OutboxHandle;
use crate::supervisor::{Probe, Supervisor};

/// File events closer together than this are one change (editors write in several steps).
const QUIET: Duration = Duration::from_millis(150);
/// A file that does not parse is read again on further events for this long after the
/// first event, before its problems are reported (a tool still writing it).
const SETTLE: Duration = Duration::from_secs(2);

/// What ended a wait in [`CloudControl::changed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Cloud,
    DownlinkRules,
}

/// A cloud connection's view of the reloadable config: the current `[cloud]` settings and
/// `[[downlink]]` rules, and its liveness probe, answered while it waits for a change.
pub struct CloudControl {
    cloud: watch::Receiver<CloudLink>,
    rules: watch::Receiver<Arc<Vec<DownlinkRule>>>,
    probe: Probe,
}

impl CloudControl {
    /// The settings to connect with now.
    pub fn cloud(&mut self) -> CloudLink {
        self.cloud.borrow_and_update().clone()
    }

    pub fn downlink_rules(&mut self) -> Vec<DownlinkRule> {
        self.rules.borrow_and_update().as_ref().clone()
    }

    /// Waits for new cloud settings, answering probes meanwhile (rule changes are left for
    /// [`CloudControl::changed`]): one arm of the telemetry connection's `select!`s.
    pub async fn cloud_changed(&mut self) {
        tokio::select! {
            changed = self.cloud.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ = self.probe.serve() => {}
        }
    }

    /// Waits for new cloud settings or downlink rules, answering probes meanwhile.
    pub async fn changed(&mut self) -> Change {
        tokio::select! {
            changed = self.cloud.changed() => match changed {
                Ok(()) => Change::Cloud,
                Err(_) => std::future::pending().await,
            },
            changed = self.rules.changed() => match changed {
                Ok(()) => Change::DownlinkRules,
                Err(_) => std::future::pending().await,
            },
            _ = self.probe.serve() => std::future::pending().await,
        }
    }
}

/// Content fingerprints of the files a config names, by key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FileStamps(BTreeMap<&'static str, (PathBuf, Option<u64>)>);

impl FileStamps {
    fn of(config: &Config) -> Self {
        FileStamps(
            watched_files(config)
                .into_iter()
                .map(|(key, path)| {
                    let hash = std::fs::read(&path).ok().map(|bytes| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        bytes.hash(&mut h);
                        h.finish()
                    });
                    (key, (path, hash))
                })
                .collect(),
        )
    }

    /// Keys whose file (same path) has other content now.
    fn changed(&self, now: &FileStamps) -> Vec<String> {
        now.0
            .iter()
            .filter(|(key, (path, hash))| {
                self.0
                    .get(*key)
                    .is_some_and(|(old_path, old_hash)| old_path == path && old_hash != hash)
            })
            .map(|(key, _)| key.to_string())
            .collect()
    }
}

/// The sending ends of everything a reload changes, and the config they run.
pub struct Live {
    started: Config,
    running: Config,
    files: FileStamps,
    cloud: watch::Sender<CloudLink>,
    downlink_rules: watch::Sender<Arc<Vec<DownlinkRule>>>,
    intake_rules: watch::Sender<Arc<Vec<IntakeRule>>>,
    rules: watch::Sender<RuleSet>,
    reporter: watch::Sender<ReporterSettings>,
    /// The directories and files the config watcher watches.
    watched: watch::Sender<Vec<PathBuf>>,
    pub outbox: OutboxHandle,
    pub listeners: Option<Listeners>,
    /// The local broker: its per-connection settings and its bounds.
    pub broker: Option<Arc<Shared>>,
    /// The device passwords and ACL the broker reads.
    pub policy: Option<SharedPolicy>,
    pub field: Option<Field>,
    health: SharedHealth,
}

/// The receiving ends, for the components as they are started.
pub struct Receivers {
    pub intake_rules: watch::Receiver<Arc<Vec<IntakeRule>>>,
    /// `[[rule]]`s, for the intake's feed and the rule task.
    pub rules: watch::Receiver<RuleSet>,
    pub reporter: watch::Receiver<ReporterSettings>,
    pub watched: watch::Receiver<Vec<PathBuf>>,
    cloud: watch::Receiver<CloudLink>,
    downlink_rules: watch::Receiver<Arc<Vec<DownlinkRule>>>,
}

impl Receivers {
    pub fn cloud_control(&self, probe: Probe) -> CloudControl {
        CloudControl {
            cloud: self.cloud.clone(),
            rules: self.downlink_rules.clone(),
            probe,
        }
    }
}

pub fn intake_rules(config: &Config) -> Arc<Vec<IntakeRule>> {
    Arc::new(
        config
            .uplink
            .iter()
            .map(|r| IntakeRule {
                filter: r.topic.clone(),
                remote_prefix: r.remote_prefix.clone(),
                qos: r.qos as u8,
                lane: r.drain,
            })
            .collect(),
    )
}

pub fn reporter_settings(config: &Config) -> ReporterSettings {
    ReporterSettings {
        gateway_id: config.gateway.id.clone(),
        status_file: crate::health::status_file(
            &config.gateway.data_dir,
            std::env::var_os("RUNTIME_DIRECTORY").as_deref(),
        ),
        metrics_topic: config.gateway.metrics_topic.clone(),
        every: config.gateway.metrics_interval,
    }
}

fn watched_paths(config_path: &Path, config: &Config) -> Vec<PathBuf> {
    std::iter::once(config_path.to_owned())
        .chain(
            watched_files(config)
                .into_iter()
                .map(|(_, path)| absolute(&path)),
        )
        .collect()
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

impl Live {
    /// The channels of every reloadable component, holding `config` (the one started with).
    pub fn new(
        config_path: &Path,
        config: &Config,
        cloud: CloudLink,
        outbox: OutboxHandle,
        health: SharedHealth,
    ) -> (Live, Receivers) {
        let (cloud_tx, cloud_rx) = watch::channel(cloud);
        let (downlink_tx, downlink_rx) = watch::channel(Arc::new(config.downlink.clone()));
        let (intake_tx, intake_rx) = watch::channel(intake_rules(config));
        let (rules_tx, rules_rx) = watch::channel(Arc::new(config.rules.clone()));
        let (reporter_tx, reporter_rx) = watch::channel(reporter_settings(config));
        let (watched_tx, watched_rx) = watch::channel(watched_paths(config_path, config));
        let live = Live {
            started: config.clone(),
            running: config.clone(),
            files: FileStamps::of(config),
            cloud: cloud_tx,
            downlink_rules: downlink_tx,
            intake_rules: intake_tx,
            rules: rules_tx,
            reporter: reporter_tx,
            watched: watched_tx,
            outbox,
            listeners: None,
            broker: None,
            policy: None,
            field: None,
            health,
        };
        let receivers = Receivers {
            intake_rules: intake_rx,
            rules: rules_rx,
            reporter: reporter_rx,
            watched: watched_rx,
            cloud: cloud_rx,
            downlink_rules: downlink_rx,
        };
        (live, receivers)
    }

    /// Applies a newly loaded config (or reports why it cannot be); its log lines carry
    /// `component = "reload"`.
    pub async fn reload(
        &mut self,
        supervisor: &mut Supervisor,
        config_path: &Path,
        loaded: Result<Config, ConfigError>,
        trigger: &str,
    ) {
        let span = tracing::info_span!("task", component = "reload");
        self.reload_now(supervisor, config_path, loaded, trigger)
            .instrument(span)
            .await
    }

    async fn reload_now(
        &mut self,
        supervisor: &mut Supervisor,
        config_path: &Path,
        loaded: Result<Config, ConfigError>,
        trigger: &str,
    ) {
        let started_at = Instant::now();
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                return self.refused(
                    trigger,
                    &e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                )
            }
        };
        let stamps = {
            let new = new.clone();
            tokio::task::spawn_blocking(move || FileStamps::of(&new))
                .await
                .unwrap_or_default()
        };
        let diff = ConfigDiff::between(
            &self.started,
            &self.running,
            &new,
            &self.files.changed(&stamps),
        );
        if diff.is_empty() {
            self.files = stamps;
            let restart: Vec<String> = diff.restart_needed.iter().map(|k| k.to_string()).collect();
            if restart.is_empty() {
                info!(trigger, "reload: no change");
            } else {
                warn!(trigger, keys = %restart.join(", "),
                    "reload: nothing to apply live; changed keys that only a restart applies: restart the gateway to apply them");
            }
            self.record("unchanged", "no change".into(), Vec::new(), Some(restart));
            return;
        }
        // What can still fail comes first, so that a failure changes nothing.
        let cloud = if diff.cloud_changed() {
            let cloud_config = new.cloud.clone();
            match tokio::task::spawn_blocking(move || CloudLink::new(&cloud_config)).await {
                Ok(Ok(cloud)) => Some(cloud),
                Ok(Err(e)) => return self.refused(trigger, &[format!("[cloud]: {e}")]),
                Err(e) => return self.refused(trigger, &[format!("[cloud]: {e}")]),
            }
        } else {
            None
        };
        crate::systemd::reloading();
        let mut applied = applicable(&self.started, &new);
        let failures = self.apply(supervisor, &diff, &applied, cloud).await;
        let mut stamps = stamps;
        // What failed keeps its running value (and its files' old fingerprints), so that
        // the next reload tries it again; the reload is recorded as failed.
        for failure in &failures {
            failure.part.revert(&mut applied, &self.running);
            for key in failure.part.files() {
                match self.files.0.get(key) {
                    Some(old) => stamps.0.insert(key, old.clone()),
                    None => stamps.0.remove(key),
                };
            }
        }
        self.running = applied;
        self.files = stamps;
        let _ = self
            .watched
            .send_replace(watched_paths(config_path, &self.running));
        let mut summary = diff.summary();
        let problems: Vec<String> = failures.iter().map(|f| f.message.clone()).collect();
        let result = match problems.is_empty() {
            true => "applied",
            false => {
                summary.push_str(&format!("; NOT applied: {}", problems.join("; ")));
                "failed"
            }
        };
        let generation = self.record(
            result,
            summary.clone(),
            problems,
            Some(diff.restart_needed.iter().map(|k| k.to_string()).collect()),
        );
        match result {
            "applied" => inc(&self.health.counters.reloads),
            _ => inc(&self.health.counters.reloads_failed),
        }
        info!(
            trigger,
            generation,
            took_ms = started_at.elapsed().as_millis() as u64,
            "reload: {summary}"
        );
        if !diff.restart_needed.is_empty() {
            warn!(keys = %diff.restart_needed.join(", "),
                "changed keys that only a restart applies; everything else was applied: restart the gateway to apply them");
        }
        crate::systemd::ready();
    }

    /// Each component takes what changed for it; returns what could not be applied.
    async fn apply(
        &mut self,
        supervisor: &mut Supervisor,
        diff: &ConfigDiff,
        new: &Config,
        cloud: Option<CloudLink>,
    ) -> Vec<Failure> {
        let mut failures = Vec::new();
        if diff.uplink.any() {
            self.intake_rules.send_replace(intake_rules(new));
        }
        if diff.rules.any() {
            self.rules.send_replace(Arc::new(new.rules.clone()));
        }
        if diff.downlink.any() {
            self.downlink_rules
                .send_replace(Arc::new(new.downlink.clone()));
        }
        if let Some(cloud) = cloud {
            self.cloud.send_replace(cloud);
        }
        if !diff.queue.is_empty() && self.outbox.reconfigure(new.queue.clone()).await.is_err() {
            failures.push(Failure {
                part: Part::Queue,
                message: "[queue]: the outbox has stopped".to_owned(),
            });
        }
        if diff.modbus.any() || diff.serial.any() {
            if let Some(field) = self.field.as_mut() {
                field.apply(new, supervisor).await;
            }
        }
        let broker_changed =
            !(diff.local.is_empty() && diff.persistence.is_empty() && diff.queue.is_empty());
        if let (true, Some(broker)) = (broker_changed, &self.broker) {
            broker.reconfigure(
                crate::broker::Settings::of(&new.local),
                crate::broker::limits(new),
            );
        }
        if let Some(listeners) = self.listeners.as_mut() {
            failures.extend(apply_listeners(listeners, supervisor, diff, new).await);
        }
        if !diff.gateway.is_empty() {
            self.reporter.send_replace(reporter_settings(new));
        }
        if let (false, Some(policy)) = (diff.security.is_empty(), &self.policy) {
            if let Err(e) = crate::broker::policy::reload(policy, &new.local.security) {
                inc(&self.health.counters.security_reload_errors);
                error!(error = %e, "reload: device passwords and ACL not applied; the previous ones stay in force");
                failures.push(Failure {
                    part: Part::Security,
                    message: e.to_string(),
                });
            }
        }
        failures
    }

    fn refused(&mut self, trigger: &str, problems: &[String]) {
        inc(&self.health.counters.reloads_failed);
        for problem in problems {
            error!(trigger, "reload refused: {problem}");
        }
        error!(trigger, problems = problems.len(),
            "reload refused: the config has problems (above); the running config stays; fix the file and it is applied");
        self.record(
            "failed",
            format!("{} problem(s); the running config stays", problems.len()),
            problems.to_vec(),
            None,
        );
    }

    /// Records the outcome in the status; an applied reload is a new generation (returned).
    fn record(
        &self,
        result: &'static str,
        summary: String,
        problems: Vec<String>,
        restart_needed: Option<Vec<String>>,
    ) -> u64 {
        let Ok(mut config) = self.health.config.lock() else {
            return 0;
        };
        if result == "applied" {
            config.generation += 1;
        }
        {
            config.last_reload = Some(ReloadOutcome {
                at: Instant::now(),
                result,
                summary,
                problems,
            });
            if let Some(keys) = restart_needed {
                config.restart_needed = keys;
            }
        }
        config.generation
    }
}

/// A part of a reload that could not be applied.
struct Failure {
    part: Part,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Listener(&'static str),
    Queue,
    Security,
}

impl Part {
    /// Puts the running value of this part back into `applied`.
    fn revert(self, applied: &mut Config, running: &Config) {
        let (a, r) = (&mut applied.local, &running.local);
        match self {
            Part::Listener("local.listen") => a.listen = r.listen,
            Part::Listener("local.listen_v5") => a.listen_v5 = r.listen_v5,
            Part::Listener(_) => a.security.tls = r.security.tls.clone(),
            Part::Queue => applied.queue = running.queue.clone(),
            Part::Security => {
                a.security.password_file = r.security.password_file.clone();
                a.security.acl_file = r.security.acl_file.clone();
                a.security.allow_anonymous = r.security.allow_anonymous;
            }
        }
    }

    /// The watched files whose content belongs to this part.
    fn files(self) -> &'static [&'static str] {
        match self {
            Part::Listener("local.tls_listen") => {
                &["local.cert_file", "local.key_file", "local.ca_file"]
            }
            Part::Security => &["local.password_file", "local.acl_file"],
            _ => &[],
        }
    }
}

/// Moves, adds or removes the listeners whose keys changed, and gives the TLS listener
/// new keys; returns what could not be applied (the old listener then stays).
async fn apply_listeners(
    listeners: &mut Listeners,
    supervisor: &mut Supervisor,
    diff: &ConfigDiff,
    new: &Config,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let plain = [
        ("local.listen", Some(new.local.listen)),
        ("local.listen_v5", new.local.listen_v5),
    ];
    for (key, listen) in plain {
        if !diff.local.contains(&key) {
            continue;
        }
        if let Err(e) = listeners.set(supervisor, key, listen, None).await {
            error!(error = %format!("{e:#}"), "reload: {key} not applied");
            failures.push(Failure {
                part: Part::Listener(key),
                message: format!("{key}: {e:#}"),
            });
        }
    }
    if diff.local.contains(&"local.tls_listen") || !diff.tls_files.is_empty() {
        let tls = match &new.local.security.tls {
            Some(config) => match TlsListener::new(config) {
                Ok(tls) => Some((config.listen, tls)),
                Err(e) => {
                    error!(error = %e, "reload: local.tls_listen not applied; the old one stays");
                    failures.push(Failure {
                        part: Part::Listener("local.tls_listen"),
                        message: format!("local.tls_listen: {e}"),
                    });
                    return failures;
                }
            },
            None => None,
        };
        let (listen, tls) = match tls {
            Some((listen, tls)) => (Some(listen), Some(tls)),
            None => (None, None),
        };
        if let Err(e) = listeners
            .set(supervisor, "local.tls_listen", listen, tls)
            .await
        {
            error!(error = %format!("{e:#}"), "reload: local.tls_listen not applied");
            failures.push(Failure {
                part: Part::Listener("local.tls_listen"),
                message: format!("local.tls_listen: {e:#}"),
            });
        }
    }
    failures
}

/// What the config watcher hands the main loop: the file as it reads now.
pub struct Trigger {
    pub reason: &'static str,
    pub loaded: Result<Config, ConfigError>,
}

/// Reads and validates the config file on a blocking thread.
pub async fn load(path: &Path) -> Result<Config, ConfigError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || config::load(&owned))
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError {
                problems: vec![config::Problem {
                    file: path.display().to_string(),
                    line: None,
                    key: String::new(),
                    message: format!("reading the config file: {e}"),
                }],
            })
        })
}

/// Watches the config file and the files it names (their directories, since editors and
/// tools replace files by rename); after a burst of events settles, reads the file and
/// hands it over, re-reading while it does not parse and events still come.
pub async fn run_watcher(
    config_path: PathBuf,
    mut watched: watch::Receiver<Vec<PathBuf>>,
    triggers: mpsc::Sender<Trigger>,
    mut probe: Probe,
    mut shutdown: watch::Receiver<bool>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if !event.kind.is_access() {
                    let _ = events_tx.send(event.paths);
                }
            }
        },
    ) {
        Ok(watcher) => watcher,
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP (systemctl reload)");
            return std::future::pending().await;
        }
    };
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut files: Vec<PathBuf> = Vec::new();
    loop {
        if watched.has_changed().unwrap_or(false) || dirs.is_empty() {
            files = watched.borrow_and_update().clone();
            dirs = watch_dirs(&mut watcher, &dirs, &files);
        }
        let first = tokio::select! {
            paths = events.recv() => match paths {
                Some(paths) => paths,
                None => return std::future::pending().await,
            },
            _ = watched.changed() => continue,
            _ = probe.serve() => continue,
            _ = shutdown.changed() => return,
        };
        if !first.iter().any(|p| files.contains(p)) {
            continue;
        }
        let since = Instant::now();
        let loaded = loop {
            settle(&mut events, &files, since).await;
            let loaded = load(&config_path).await;
            if loaded.is_ok() || since.elapsed() >= SETTLE {
                break loaded;
            }
            // Not parsing yet: a tool may still be writing; wait for its next event.
            let left = SETTLE.saturating_sub(since.elapsed());
            match tokio::time::timeout(left, next_relevant(&mut events, &files)).await {
                Ok(true) => continue,
                _ => break loaded,
            }
        };
        probe.tick();
        debug!(ok = loaded.is_ok(), "config file changed");
        if triggers
            .send(Trigger {
                reason: "file changed",
                loaded,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Waits until no relevant event came for [`QUIET`] (or [`SETTLE`] passed since `since`).
async fn settle(
    events: &mut mpsc::UnboundedReceiver<Vec<PathBuf>>,
    files: &[PathBuf],
    since: Instant,
) {
    loop {
        let left = SETTLE.saturating_sub(since.elapsed()).min(QUIET);
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(left, next_relevant(events, files)).await {
            Ok(true) => continue,
            _ => return,
        }
    }
}

/// True at the next event about one of `files`; false when the watcher is gone.
async fn next_relevant(
    events: &mut mpsc::UnboundedReceiver<Vec<PathBuf>>,
    files: &[PathBuf],
) -> bool {
    while let Some(paths) = events.recv().await {
        if paths.iter().any(|p| files.contains(p)) {
            return true;
        }
    }
    false
}

/// Watches the directories of `files` (and stops watching those no longer needed).
fn watch_dirs(
    watcher: &mut notify::RecommendedWatcher,
    old: &BTreeSet<PathBuf>,
    files: &[PathBuf],
) -> BTreeSet<PathBuf> {
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_owned))
        .collect();
    for dir in old.difference(&dirs) {
        let _ = watcher.unwatch(dir);
    }
    for dir in dirs.difference(old) {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            warn!(dir = %dir.display(), error = %e, "cannot watch a config directory; changes there need SIGHUP");
        }
    }
    dirs
}
