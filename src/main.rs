//! The command line: `run`, `check`, `status`.

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
    /// Print link and outbox state of the gateway running with this config.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match bridgehead::config::load(&config) {
            Ok(_) => {
                println!("config OK: {}", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => run(&config),
        Command::Status { config } => status(&config),
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
    bridgehead::logging::init(health.clone());
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
    // One worker: the gateway's own tasks are light (the embedded broker runs on threads of
    // its own), and at the rates of a site every message would otherwise wake a second
    // worker. Measured at 100 msg/s: 13 instead of 16 context switches per message, and no
    // lower burst throughput.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(bridgehead::run(config, health));
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(path: &Path) -> ExitCode {
    let config = match bridgehead::config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let file = config.gateway.data_dir.join("status.json");
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "cannot read {}: {e} (is the gateway running with this config?)",
                file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let age = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(doc) => {
            print!("{}", bridgehead::health::render_status(&doc));
            if let Some(age) = age {
                let stale = age > config.gateway.metrics_interval * 3;
                println!(
                    "written {}s ago{}",
                    age.as_secs(),
                    if stale {
                        " (stale: the gateway may not be running)"
                    } else {
                        ""
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{} is not a status document: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}
