//! What a reload changes: the difference between the running config and a new one, section
//! by section, so that only what changed is touched; and the keys that only a restart can
//! apply, kept at the values the gateway started with.
//!
//! Extending: a section that names files (certificates, password and ACL files) lists them
//! in [`watched_files`], so that a change of the file's content counts as a change of the
//! section; a new section gets a field here, a line in [`ConfigDiff::summary`], and its
//! apply step in `reload.rs`. A new key in `[local]` or `[gateway]` counts as "restart
//! needed" until it is added to the keys applied live here ([`applicable`]); `[cloud]` and
//! `[queue]` are handed over whole, so new keys there apply with their section.

use std::fmt::Write;
use std::path::PathBuf;

use super::{Config, GatewayConfig, LocalConfig, ModbusDevice, SerialSensor, ThresholdRule};

/// The files a config names whose content is part of the config: a rotated certificate is
/// applied like an edit of the file. `(key, path)`.
pub fn watched_files(config: &Config) -> Vec<(&'static str, PathBuf)> {
    let cloud = &config.cloud;
    let security = &config.local.security;
    [
        ("cloud.ca_file", &cloud.ca_file),
        ("cloud.cert_file", &cloud.cert_file),
        ("cloud.key_file", &cloud.key_file),
        ("cloud.password_file", &cloud.password_file),
        ("local.password_file", &security.password_file),
        ("local.acl_file", &security.acl_file),
        (
            "local.cert_file",
            &security.tls.as_ref().map(|t| t.cert_file.clone()),
        ),
        (
            "local.key_file",
            &security.tls.as_ref().map(|t| t.key_file.clone()),
        ),
        (
            "local.ca_file",
            &security.tls.as_ref().and_then(|t| t.ca_file.clone()),
        ),
    ]
    .into_iter()
    .filter_map(|(key, path)| path.clone().map(|path| (key, path)))
    .collect()
}

/// Rules added and removed (a changed rule is one of each).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuleChange {
    pub added: usize,
    pub removed: usize,
    /// Same rules in another order: first match wins, so order matters.
    pub reordered: bool,
}

impl RuleChange {
    fn between<T: PartialEq>(old: &[T], new: &[T]) -> Self {
        let added = new.iter().filter(|r| !old.contains(r)).count();
        let removed = old.iter().filter(|r| !new.contains(r)).count();
        RuleChange {
            added,
            removed,
            reordered: added == 0 && removed == 0 && old != new,
        }
    }

    pub fn any(&self) -> bool {
        self.added > 0 || self.removed > 0 || self.reordered
    }
}

/// Field devices (or rules) by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl DeviceChanges {
    fn between<T: PartialEq>(old: &[T], new: &[T], name: impl Fn(&T) -> &str) -> Self {
        let find = |list: &[T], n: &str| list.iter().position(|d| name(d) == n);
        let mut changes = DeviceChanges::default();
        for device in new {
            match find(old, name(device)) {
                None => changes.added.push(name(device).to_owned()),
                Some(i) if old[i] != *device => changes.changed.push(name(device).to_owned()),
                Some(_) => {}
            }
        }
        for device in old {
            if find(new, name(device)).is_none() {
                changes.removed.push(name(device).to_owned());
            }
        }
        changes
    }

    pub fn any(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty())
    }
}

/// Everything a reload changes. Built by [`ConfigDiff::between`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigDiff {
    pub uplink: RuleChange,
    pub downlink: RuleChange,
    /// `[cloud]` keys that changed (both connections reconnect).
    pub cloud: Vec<&'static str>,
    /// Files named by `[cloud]` whose content changed (both connections reconnect).
    pub cloud_files: Vec<String>,
    /// `[queue]` keys that changed (the outbox's owner applies them).
    pub queue: Vec<&'static str>,
    pub modbus: DeviceChanges,
    pub serial: DeviceChanges,
    /// `[[rule]]`s by name (a changed rule starts over; the others keep their state).
    pub rules: DeviceChanges,
    /// `[local]` keys applied live by the listeners and the broker (new connections take
    /// them; connected devices stay).
    pub local: Vec<&'static str>,
    /// Files of the device TLS listener whose content changed (the listener takes them).
    pub tls_files: Vec<String>,
    /// `local.max_retained_size`, `max_queued_messages`, `max_queued_bytes` (the broker's
    /// core applies them).
    pub persistence: Vec<&'static str>,
    /// Device passwords and ACL: the keys, or the files' content, that changed.
    pub security: Vec<String>,
    /// `[gateway]` keys applied live by the status reporter.
    pub gateway: Vec<&'static str>,
    /// Keys whose new value differs from the one the gateway started with and that only a
    /// restart applies.
    pub restart_needed: Vec<&'static str>,
}

macro_rules! changed_keys {
    ($old:expr, $new:expr, $section:literal: $($key:ident),*) => {{
        let mut keys = Vec::new();
        $(if $old.$key != $new.$key {
            keys.push(concat!($section, ".", stringify!($key)));
        })*
        keys
    }};
}

impl ConfigDiff {
    /// The difference from `running` to `new`; `started` is the config the process
    /// started with (what the keys fixed at start still hold); `changed_files` are the keys
    /// of [`watched_files`] whose content changed.
    pub fn between(
        started: &Config,
        running: &Config,
        new: &Config,
        changed_files: &[String],
    ) -> Self {
        let restart_needed = restart_needed(started, new);
        let (old, new) = (running, &applicable(started, new));
        let (oc, nc) = (&old.cloud, &new.cloud);
        // Keys added to [cloud] and [queue] after this was written are never ignored: those
        // sections are handed over whole.
        let mut cloud = changed_keys!(oc, nc, "cloud": url, client_id, command_client_id,
            keep_alive, max_packet_size, ca_file, cert_file, key_file, username,
            password_file, status_topic, max_inflight, reconnect_min, reconnect_max);
        if cloud.is_empty() && oc != nc {
            cloud.push("cloud (other keys)");
        }
        let mut queue = changed_keys!(old.queue, new.queue, "queue": max_size, when_full,
            max_age, commit_interval, commit_batch, dead_letter_max_size, drain_rate);
        if queue.is_empty() && old.queue != new.queue {
            queue.push("queue (other keys)");
        }
        ConfigDiff {
            uplink: RuleChange::between(&old.uplink, &new.uplink),
            downlink: RuleChange::between(&old.downlink, &new.downlink),
            cloud,
            cloud_files: changed_files
                .iter()
                .filter(|key| key.starts_with("cloud."))
                .cloned()
                .collect(),
            queue,
            modbus: DeviceChanges::between(&old.modbus, &new.modbus, |d: &ModbusDevice| &d.name),
            serial: DeviceChanges::between(&old.serial, &new.serial, |s: &SerialSensor| &s.name),
            rules: DeviceChanges::between(&old.rules, &new.rules, |r: &ThresholdRule| &r.name),
            local: {
                let mut keys = changed_keys!(old.local, new.local, "local": listen, listen_v5,
                    max_connections, connect_timeout, max_keep_alive);
                let (o, n) = (&old.local.security, &new.local.security);
                keys.extend(changed_keys!(o, n, "local": max_subscriptions));
                if o.tls != n.tls {
                    keys.push("local.tls_listen");
                }
                keys
            },
            tls_files: changed_files
                .iter()
                .filter(|key| {
                    ["local.cert_file", "local.key_file", "local.ca_file"].contains(&key.as_str())
                })
                .cloned()
                .collect(),
            persistence: {
                let (o, n) = (&old.local.persistence, &new.local.persistence);
                changed_keys!(o, n, "local": max_retained_size, max_queued_messages,
                    max_queued_bytes)
            },
            security: changed_keys!(old.local.security, new.local.security, "local":
                password_file, allow_anonymous, acl_file)
            .into_iter()
            .map(str::to_owned)
            .chain(
                changed_files
                    .iter()
                    .filter(|key| ["local.password_file", "local.acl_file"].contains(&key.as_str()))
                    .map(|key| format!("{key} (content)")),
            )
            .collect(),
            gateway: changed_keys!(old.gateway, new.gateway, "gateway": id,
                metrics_topic, metrics_interval),
            restart_needed,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self
            == ConfigDiff {
                restart_needed: self.restart_needed.clone(),
                ..ConfigDiff::default()
            }
    }

    pub fn cloud_changed(&self) -> bool {
        !self.cloud.is_empty() || !self.cloud_files.is_empty()
    }

    /// One line for the log and the status: `+1 uplink rule, cloud unchanged, modbus
    /// "boiler" restarted`.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        rules(&mut parts, "uplink", &self.uplink);
        rules(&mut parts, "downlink", &self.downlink);
        if self.cloud_changed() {
            let what: Vec<String> = (self.cloud.iter().map(|k| k.to_string()))
                .chain(self.cloud_files.iter().map(|k| format!("{k} content")))
                .collect();
            parts.push(format!("cloud reconnected ({})", what.join(", ")));
        } else {
            parts.push("cloud unchanged".into());
        }
        if !self.queue.is_empty() {
            parts.push(format!("queue applied ({})", self.queue.join(", ")));
        }
        devices(&mut parts, "modbus", &self.modbus, "restarted");
        devices(&mut parts, "serial", &self.serial, "restarted");
        devices(&mut parts, "rule", &self.rules, "changed");
        if !self.local.is_empty() || !self.tls_files.is_empty() {
            let keys: Vec<String> = (self.local.iter().map(|k| k.to_string()))
                .chain(self.tls_files.iter().map(|k| format!("{k} content")))
                .collect();
            parts.push(format!("listeners applied ({})", keys.join(", ")));
        }
        if !self.persistence.is_empty() {
            parts.push(format!(
                "local state bounds applied ({})",
                self.persistence.join(", ")
            ));
        }
        if !self.security.is_empty() {
            parts.push(format!(
                "device passwords and ACL reloaded ({})",
                self.security.join(", ")
            ));
        }
        if !self.gateway.is_empty() {
            parts.push(format!("status applied ({})", self.gateway.join(", ")));
        }
        if !self.restart_needed.is_empty() {
            parts.push(format!(
                "restart needed for {}",
                self.restart_needed.join(", ")
            ));
        }
        parts.join(", ")
    }
}

fn rules(parts: &mut Vec<String>, kind: &str, change: &RuleChange) {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    if change.added > 0 {
        let n = change.added;
        parts.push(format!("+{n} {kind} rule{}", plural(n)));
    }
    if change.removed > 0 {
        let n = change.removed;
        parts.push(format!("-{n} {kind} rule{}", plural(n)));
    }
    if change.reordered {
        parts.push(format!("{kind} rules reordered"));
    }
}

/// `modbus "boiler" restarted`: `changed` is the verb for a changed entry.
fn devices(parts: &mut Vec<String>, kind: &str, changes: &DeviceChanges, changed: &str) {
    let mut line = String::new();
    for (names, verb) in [
        (&changes.added, "added"),
        (&changes.removed, "removed"),
        (&changes.changed, changed),
    ] {
        for name in names {
            if !line.is_empty() {
                line.push_str(", ");
            }
            let _ = write!(line, "{kind} {name:?} {verb}");
        }
    }
    if !line.is_empty() {
        parts.push(line);
    }
}

/// `new` as the running gateway can apply it: in `[gateway]` and `[local]` only the keys
/// applied live come from `new` (any other key, also one added later, keeps the value the
/// gateway started with until a restart), and `queue.synchronous` stays.
pub fn applicable(started: &Config, new: &Config) -> Config {
    let mut config = new.clone();
    config.gateway = GatewayConfig {
        id: new.gateway.id.clone(),
        metrics_topic: new.gateway.metrics_topic.clone(),
        metrics_interval: new.gateway.metrics_interval,
        ..started.gateway.clone()
    };
    // The bound of every connection's buffers together follows max_payload at start.
    config.local = LocalConfig {
        max_payload: started.local.max_payload,
        ..new.local.clone()
    };
    config.queue.fsync = started.queue.fsync;
    config
}

/// The keys [`applicable`] pins whose value in `new` differs from the one at start.
// The struct updates name every field today; they are there for the keys added later.
#[allow(clippy::needless_update)]
fn restart_needed(started: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if new.gateway.data_dir != started.gateway.data_dir {
        keys.push("gateway.data_dir");
    }
    if new.local.max_payload != started.local.max_payload {
        keys.push("local.max_payload");
    }
    if new.queue.fsync != started.queue.fsync {
        keys.push("queue.synchronous");
    }

    let gateway_rest = GatewayConfig {
        id: started.gateway.id.clone(),
        data_dir: started.gateway.data_dir.clone(),
        metrics_topic: started.gateway.metrics_topic.clone(),
        metrics_interval: started.gateway.metrics_interval,
        ..new.gateway.clone()
    };
    if gateway_rest != started.gateway {
        keys.push("gateway (other keys)");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[gateway]
id = "gw"
data_dir = "/tmp/bh"
[cloud]
url = "mqtt://127.0.0.1:1883"
[[uplink]]
topic = "a/#"
[[modbus]]
name = "boiler"
transport = "tcp"
address = "127.0.0.1:502"
  [[modbus.read]]
  topic = "a/boiler/temp"
  kind = "holding"
  address = 0
"#;

    fn parse(text: &str) -> Config {
        super::super::parse("test.toml", text).expect("valid test config")
    }

    #[test]
    fn the_same_file_is_no_change() {
        let c = parse(BASE);
        let diff = ConfigDiff::between(&c, &c, &c, &[]);
        assert!(diff.is_empty(), "{diff:?}");
        assert_eq!(diff.summary(), "cloud unchanged");
    }

    #[test]
    fn the_summary_names_what_changed() {
        let old = parse(BASE);
        let text = BASE.replace("address = 0", "address = 1")
            + "[[uplink]]\ntopic = \"b/#\"\n[queue]\nmax_size = \"1MiB\"\n";
        let new = parse(&text);
        let diff = ConfigDiff::between(&old, &old, &new, &[]);
        assert_eq!(
            diff.summary(),
            r#"+1 uplink rule, cloud unchanged, queue applied (queue.max_size), modbus "boiler" restarted"#
        );
    }

    #[test]
    fn keys_fixed_at_start_are_kept_and_named() {
        let started = parse(BASE);
        let new = parse(&BASE.replace("/tmp/bh", "/tmp/other").replace(
            "[cloud]",
            "[local]\nmax_connections = 5000\nconnect_timeout = \"3s\"\n[cloud]",
        ));
        let diff = ConfigDiff::between(&started, &started, &new, &[]);
        assert_eq!(diff.restart_needed, ["gateway.data_dir"]);
        assert_eq!(
            diff.local,
            ["local.max_connections", "local.connect_timeout"]
        );
        let applied = applicable(&started, &new);
        assert_eq!(applied.gateway.data_dir, started.gateway.data_dir);
        assert_eq!(applied.local.max_connections, 5000);
        let bigger = parse(&BASE.replace("[cloud]", "[local]\nmax_payload = \"1MiB\"\n[cloud]"));
        let diff = ConfigDiff::between(&started, &started, &bigger, &[]);
        assert_eq!(diff.restart_needed, ["local.max_payload"]);
    }

    #[test]
    fn every_queue_key_is_applied() {
        let old = parse(BASE);
        let new = parse(&(BASE.to_owned() + "[queue]\ndead_letter_max_size = \"1MiB\"\n"));
        let diff = ConfigDiff::between(&old, &old, &new, &[]);
        assert_eq!(diff.queue, ["queue.dead_letter_max_size"]);
        assert!(diff.restart_needed.is_empty());
    }

    #[test]
    fn rules_are_compared_by_name() {
        let rule = |name: &str, above: u32| {
            format!(
                "[[rule]]\nname = \"{name}\"\ntopic = \"{name}/+/t\"\npublish = \"out/{name}/{{1}}\"\n\
                 above = {above}\nclear_below = 0\non = \"ON\"\noff = \"OFF\"\n"
            )
        };
        let old = parse(&format!("{BASE}{}{}", rule("fans", 30), rule("pumps", 5)));
        let new = parse(&format!("{BASE}{}{}", rule("fans", 30), rule("pumps", 6)));
        let diff = ConfigDiff::between(&old, &old, &new, &[]);
        assert_eq!(diff.summary(), r#"cloud unchanged, rule "pumps" changed"#);
        let new = parse(&format!("{BASE}{}{}", rule("pumps", 5), rule("heaters", 1)));
        let diff = ConfigDiff::between(&old, &old, &new, &[]);
        assert_eq!(
            diff.summary(),
            r#"cloud unchanged, rule "heaters" added, rule "fans" removed"#
        );
    }

    #[test]
    fn the_bounds_of_the_local_state_apply_live() {
        let old = parse(BASE);
        let new = parse(&BASE.replace(
            "[cloud]",
            "[local]\nmax_retained_size = \"1MiB\"\nmax_queued_messages = 10\nmax_queued_bytes = \"1MiB\"\n[cloud]",
        ));
        let diff = ConfigDiff::between(&old, &old, &new, &[]);
        assert_eq!(
            diff.persistence,
            [
                "local.max_retained_size",
                "local.max_queued_messages",
                "local.max_queued_bytes"
            ]
        );
        assert!(diff.restart_needed.is_empty(), "{:?}", diff.restart_needed);
        assert_eq!(
            applicable(&old, &new).local.persistence.max_queued_messages,
            10
        );
        assert!(diff.summary().contains("local state bounds applied"));
    }

    #[test]
    fn a_rotated_certificate_reconnects_the_cloud() {
        let c = parse(BASE);
        let diff = ConfigDiff::between(&c, &c, &c, &["cloud.ca_file".to_owned()]);
        assert!(diff.cloud_changed());
        assert_eq!(diff.summary(), "cloud reconnected (cloud.ca_file content)");
    }
}
