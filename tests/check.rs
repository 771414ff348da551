//! `bridgehead check --config FILE`: what a user sees before restarting the gateway.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(config: &Path) -> Outcome {
    let output = Command::new(env!("CARGO_BIN_EXE_bridgehead"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run bridgehead check");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Writes `text` to a fresh `bridgehead.toml`; the directory lives as long as the guard.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bridgehead.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

#[test]
fn the_shipped_config_passes() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bridgehead.toml");
    let outcome = check(&shipped);
    assert_eq!(outcome.code, Some(0), "stderr: {}", outcome.stderr);
    assert_eq!(
        outcome.stdout.trim(),
        format!("config OK: {}", shipped.display())
    );
    assert_eq!(outcome.stderr, "");
}

#[test]
fn every_problem_is_named_with_its_line_and_key() {
    let (_dir, path) = config_file(
        r##"# line 1
[gateway]
data_dir = "/tmp/bh"

[cloud]
url = "mqtts://cloud.example.com"
tls_version = "1.3"
keep_alive = "half a minute"

[queue]
max_size = "1 gigabyte"
when_full = "drop-newest"

[[uplink]]
topic = "sensors/#"
qos = 2

[[uplink]]
topic = "#"
remote_prefix = "site/{gateway_id}/"

[[downlink]]
topic = "#"
remote_prefix = "site/{gateway_id}/cmd/"
"##,
    );
    let outcome = check(&path);
    assert_eq!(outcome.code, Some(1), "stdout: {}", outcome.stdout);
    let file = path.display();
    let expected = [
        (format!("{file}:2: gateway.id: "), "missing"),
        (format!("{file}:7: cloud.tls_version: "), "unknown key"),
        (
            format!("{file}:8: cloud.keep_alive: "),
            r#""half a minute" is not a duration"#,
        ),
        (
            format!("{file}:11: queue.max_size: "),
            r#""1 gigabyte" is not a size"#,
        ),
        (
            format!("{file}:12: queue.when_full: "),
            r#""drop-newest" is not one of drop-oldest, reject-new"#,
        ),
        (
            format!("{file}:16: uplink[1].qos: "),
            "QoS 2 is not supported upstream",
        ),
        (
            format!("{file}:19: uplink[2].topic: "),
            "downlink[1]'s cloud subscription",
        ),
    ];
    let lines: Vec<&str> = outcome.stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "stderr:\n{}", outcome.stderr);
    for (line, (prefix, says)) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(prefix.as_str()),
            "expected {prefix:?}..., got {line:?}"
        );
        assert!(line.contains(says), "expected {says:?} in {line:?}");
    }
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    let (_dir, path) = config_file("[gateway]\nid = \"gw-001\"\n\n[cloud\nurl = \"mqtt://x\"\n");
    let outcome = check(&path);
    assert_eq!(outcome.code, Some(1));
    let line = outcome.stderr.trim();
    assert!(
        line.starts_with(&format!("{}:4: not valid TOML", path.display())),
        "{line}"
    );
    assert_eq!(outcome.stderr.lines().count(), 1, "{}", outcome.stderr);
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nowhere.toml");
    let outcome = check(&path);
    assert_eq!(outcome.code, Some(1));
    assert_eq!(
        outcome.stderr.trim(),
        format!(
            "{}: cannot read the config file: No such file or directory (os error 2)",
            path.display()
        )
    );
}

#[test]
fn a_config_with_listen_v5_is_told_it_is_deprecated() {
    let (_dir, path) = config_file(
        r#"[gateway]
id = "gw-1"

[local]
listen_v5 = "127.0.0.1:1884"
max_queued_messages = 50
max_retained_size = "1MiB"

[cloud]
url = "mqtt://127.0.0.1:1883"
"#,
    );
    let outcome = check(&path);
    assert_eq!(outcome.code, Some(0), "stderr: {}", outcome.stderr);
    let note = outcome
        .stdout
        .lines()
        .find(|l| l.starts_with("note: local.listen_v5 is deprecated"))
        .unwrap_or_else(|| panic!("no deprecation note in: {}", outcome.stdout));
    assert!(note.contains("local.listen"), "{note}");
}
