//! The command line: `airlock serve` and `airlock config check`.
//!
//! Exit codes follow sysexits: 0 success, 64 bad configuration or usage, 74 the data
//! directory or store cannot be used, 1 anything else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, ProcessEnv, SecretPolicy};
use crate::state::AppState;
use crate::store::Store;
use crate::telemetry::init_logging;

pub const EXIT_CONFIG: u8 = 64;
pub const EXIT_IO: u8 = 74;

#[derive(Debug, Parser)]
#[command(
    name = "airlock",
    version,
    about = "Self-hosted AI gateway: one OpenAI-compatible API over external providers and local models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file; without it the embedded defaults apply.
    #[arg(long, short, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.listen`.
    #[arg(long, env = "AIRLOCK_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Data directory, overriding `server.data_dir`.
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print every problem found.
    Check { file: PathBuf },
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Serve(args) => serve(args),
    }
}

fn config_check(file: &Path) -> ExitCode {
    match Config::load(file, &ProcessEnv, SecretPolicy::Ignore) {
        Ok(cfg) => {
            let unset: Vec<String> = cfg
                .providers
                .iter()
                .filter(|p| p.api_key_env.is_some() && p.api_key.is_none())
                .map(|p| {
                    format!(
                        "  note: providers `{}`: {} is not set in this environment (needed to serve)",
                        p.name,
                        p.api_key_env.as_deref().unwrap_or_default()
                    )
                })
                .collect();
            println!(
                "config OK: {} provider(s), {} model(s)",
                cfg.providers.len(),
                cfg.models.len()
            );
            for u in unset {
                println!("{u}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn load_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path, &ProcessEnv, SecretPolicy::Require)?,
        None => Config::embedded(&ProcessEnv)?,
    };
    if let Some(l) = args.listen {
        cfg.server.listen = l;
    }
    if let Some(d) = &args.data_dir {
        cfg.server.data_dir.clone_from(d);
    }
    Ok(cfg)
}

fn serve(args: ServeArgs) -> ExitCode {
    let cfg = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(cfg.server.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cfg))
}

async fn run(cfg: Config) -> ExitCode {
    let store = match Store::open(&cfg.server.data_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the store");
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_IO);
        }
    };
    let listener = match tokio::net::TcpListener::bind(cfg.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", cfg.server.listen);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        %addr,
        config = %cfg.source.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded defaults".into()),
        providers = cfg.providers.len(),
        models = cfg.models.len(),
        data_dir = %cfg.server.data_dir.display(),
        "airlock started"
    );
    let admin_key = cfg.governance.admin_key.clone();
    let data_dir = cfg.server.data_dir.clone();
    let state = match AppState::build(cfg, store, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match state
        .directory
        .ensure_bootstrap(admin_key.as_deref(), &data_dir)
    {
        Ok(Some(path)) => tracing::warn!(
            path = %path.display(),
            "first start: created the admin key and wrote it to this file (readable only by its owner)"
        ),
        Ok(None) => {}
        Err(e) => {
            eprintln!("error: cannot create the first admin key: {e}");
            return ExitCode::from(EXIT_IO);
        }
    }
    // The one line on stdout: tests and scripts read the bound address from it.
    println!("airlock listening on http://{addr}");
    let _ = std::io::stdout().flush();
    match crate::server::serve(state, listener, crate::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
