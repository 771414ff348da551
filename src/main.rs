//! The command line: `run`, `check`, `status`, `dead-letters`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bridgehead",
    version,
    about = "MQTT edge gateway: local broker, durable store-and-forward to the cloud, commands down"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or print every problem with its line and key and exit 1.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the state of the gateway running with this config, as of this moment.
    ///
    /// Exit codes: 0 running and linked to the cloud; 2 running, a cloud link is not up;
    /// 3 not running (the last status.json is shown with its age); 1 no config file, no
    /// permission to its state, or a usage error.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The status document as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Look at, resend or delete the messages the cloud could never take (too large for
    /// cloud.max_packet_size, or the cloud hung up on them).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print id, topic, size and reason of each dead letter, oldest first.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue (after everything in it): `all`, or ids.
    Replay {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(required = true, value_name = "all|ID")]
        which: Vec<String>,
    },
    /// Delete dead letters for good: `all`, or ids.
    Purge {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(required = true, value_name = "all|ID")]
        which: Vec<String>,
    },
}

fn main() -> ExitCode {
    // clap's own exit code for a usage error is 2, which `status` uses for "link down".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.use_stderr() {
                true => ExitCode::FAILURE,
                false => ExitCode::SUCCESS, // --help, --version
            };
        }
    };
    match cli.command {
        Command::Check { config } => match bridgehead::config::load(&config) {
            Ok(loaded) => {
                println!("config OK: {}", config.display());
                if loaded.local.listen_v5.is_some() {
                    println!("note: local.listen_v5 is deprecated: local.listen (and local.tls_listen) serve MQTT 3.1, 3.1.1 and 5; listen_v5 is one more listener that does the same");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => run(&config),
        Command::Status { config, json } => status(&config, json),
        Command::DeadLetters { action } => dead_letters(action),
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match bridgehead::config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let health = Arc::new(bridgehead::Health::default());
    bridgehead::logging::init();
    // A file that reaches the process's size limit must fail the write (the outbox then
    // refuses new messages and carries on), not kill the gateway with SIGXFSZ.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(bridgehead::run(path, config, health));
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Worker threads of the runtime the broker and everything else run on.
const WORKERS: usize = 2;

/// Exit codes of `bridgehead status`.
const RUNNING_LINKED: u8 = 0;
const RUNNING_LINK_DOWN: u8 = 2;
const NOT_RUNNING: u8 = 3;

fn status(path: &Path, json: bool) -> ExitCode {
    if !path.exists() {
        eprintln!("{}: no such config file", path.display());
        return ExitCode::FAILURE;
    }
    let data_dir = &bridgehead::config::data_dir_of(path);
    if let Some(doc) = ask_running(data_dir) {
        print_status(&doc, json);
        let linked = doc["cloud"]["telemetry"] == "up"
            && (doc["cloud"]["commands"] == "up" || doc["cloud"]["commands"] == "off");
        return ExitCode::from(if linked {
            RUNNING_LINKED
        } else {
            RUNNING_LINK_DOWN
        });
    }
    if let Err(e) = std::fs::read_dir(data_dir) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            eprintln!(
                "{}: permission denied: the gateway's state is for user and group bridgehead \
                 (use sudo, or add yourself to group bridgehead)",
                data_dir.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let file = data_dir.join("status.json");
    let read = std::fs::read_to_string(&file).ok().and_then(|text| {
        let age = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map_or(0, |age| age.as_secs());
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .map(|doc| (doc, age))
    });
    match read {
        Some((mut doc, age)) => {
            doc["running"] = serde_json::Value::Bool(false);
            doc["written_ago_s"] = age.into();
            print_status(&doc, json);
            if !json {
                println!(
                    "not running: this is the last status it wrote, {age}s ago ({})",
                    file.display()
                );
            }
        }
        None if json => println!("{{\"running\":false}}"),
        None => println!(
            "not running: no status socket and no status file in {}",
            data_dir.display()
        ),
    }
    ExitCode::from(NOT_RUNNING)
}

/// The status document of this moment from the running gateway's socket, if it answers.
fn ask_running(data_dir: &Path) -> Option<serde_json::Value> {
    ask(data_dir, "status", 3)
}

/// One request on the running gateway's socket; None when nothing answers.
fn ask(data_dir: &Path, request: &str, timeout_s: u64) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let path = bridgehead::status_socket::path(data_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(timeout_s)))
        .ok()?;
    stream.write_all(format!("{request}\n").as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

fn print_status(doc: &serde_json::Value, json: bool) {
    if json {
        println!("{doc}");
    } else {
        print!("{}", bridgehead::health::render_status(doc));
    }
}

fn dead_letters(action: DeadLetterAction) -> ExitCode {
    use bridgehead::outbox::dead_letters as dl;
    let (config, which) = match &action {
        DeadLetterAction::List { config, .. } => (config, None),
        DeadLetterAction::Replay { config, which } | DeadLetterAction::Purge { config, which } => {
            let words: Vec<&str> = which.iter().map(String::as_str).collect();
            match bridgehead::status_socket::parse_selection(&words) {
                Ok(selection) => (config, Some(selection)),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let data_dir = bridgehead::config::data_dir_of(config);
    let db = data_dir.join("outbox.db");
    if !db.exists() {
        eprintln!("no outbox at {} (is data_dir right?)", db.display());
        return ExitCode::FAILURE;
    }
    let result = match (action, which) {
        (DeadLetterAction::List { json, .. }, _) => dl::list(&db).map(|letters| {
            if json {
                println!("{}", serde_json::to_string(&letters).unwrap_or_default());
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                for d in letters {
                    println!(
                        "{:>8}  {}  {} bytes  QoS {}  {}",
                        d.id, d.topic, d.bytes, d.qos, d.reason
                    );
                }
            }
        }),
        (DeadLetterAction::Purge { .. }, Some(which)) => {
            dl::purge(&db, &which).map(|n| println!("{n} dead letters deleted"))
        }
        (DeadLetterAction::Replay { which: words, .. }, Some(which)) => {
            // The running gateway's outbox must do it (it keeps the queue in memory too);
            // with the gateway stopped the file is edited here.
            let request = format!("replay {}", words.join(" "));
            let running =
                std::os::unix::net::UnixStream::connect(bridgehead::status_socket::path(&data_dir))
                    .is_ok();
            match ask(&data_dir, &request, 30) {
                None if running => {
                    eprintln!("the running gateway did not answer; nothing was replayed");
                    return ExitCode::FAILURE;
                }
                Some(reply) => match reply.get("replayed") {
                    Some(n) => {
                        println!("{n} dead letters put back in the queue of the running gateway");
                        Ok(())
                    }
                    None => {
                        eprintln!("the gateway refused: {}", reply["error"]);
                        return ExitCode::FAILURE;
                    }
                },
                None => dl::replay_offline(&db, &which).map(|n| {
                    println!("{n} dead letters put back in the queue; they are sent when the gateway starts")
                }),
            }
        }
        (_, None) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", db.display());
            ExitCode::FAILURE
        }
    }
}
