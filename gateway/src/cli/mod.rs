//! The command line: `airlock serve`, `config check`, `audit`, `usage`, `admin` and
//! `models` (in [`models`]).
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

mod models;

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
    /// The audit log: verify the hash chain, export records (reads the store directly;
    /// stop the server first, or use `airlock admin GET /admin/audit/verify`).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Usage analytics from the store (stop the server first, or use
    /// `airlock admin GET /admin/usage`).
    Usage(UsageArgs),
    /// Call the admin API of a running server: `airlock admin POST /admin/keys --data '{..}'`.
    Admin(AdminArgs),
    /// Local models: register weights already on disk, list, show, remove. Opens the
    /// store directly, or goes through the admin API while a server holds it.
    #[command(subcommand)]
    Models(models::ModelsCommand),
}

/// Where the store is: the config's `server.data_dir`, or `--data-dir`.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    #[arg(long, short, env = "AIRLOCK_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the whole chain; name the first record altered, removed or reordered.
    Verify(StoreArgs),
    /// Write records as JSON lines to stdout (or --out).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// From this time (Unix milliseconds, inclusive).
        #[arg(long)]
        from: Option<i64>,
        /// Until this time (Unix milliseconds, exclusive).
        #[arg(long)]
        to: Option<i64>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct UsageArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// First day, YYYY-MM-DD (default: all).
    #[arg(long, default_value = "0000-01-01")]
    from: String,
    /// Last day, YYYY-MM-DD (default: far future).
    #[arg(long, default_value = "9999-12-31")]
    to: String,
    /// key | user | team | org | model | target | day
    #[arg(long, default_value = "model")]
    group_by: String,
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// GET, POST, PATCH or DELETE.
    method: String,
    /// A path under /admin, e.g. /admin/keys.
    path: String,
    /// JSON body.
    #[arg(long)]
    data: Option<String>,
    /// The server's base URL.
    #[arg(long, env = "AIRLOCK_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin key (or a team admin's, for its team).
    #[arg(long, env = "AIRLOCK_ADMIN_KEY", hide_env_values = true)]
    key: String,
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
        Command::Audit(AuditCommand::Verify(store)) => audit_verify(&store),
        Command::Audit(AuditCommand::Export {
            store,
            from,
            to,
            key,
            team,
            model,
            out,
        }) => audit_export(
            &store,
            &crate::ledger::ExportFilter {
                from_ts: from,
                to_ts: to,
                key_id: key,
                team_id: team,
                model,
            },
            out.as_deref(),
        ),
        Command::Usage(args) => usage(&args),
        Command::Admin(args) => admin(&args),
        Command::Models(cmd) => models::run(cmd),
    }
}

/// Opens the ledger tree of the store named by `args`, for reading.
fn ledger_tree(args: &StoreArgs) -> Result<sled::Tree, ExitCode> {
    let data_dir = match (&args.data_dir, &args.config) {
        (Some(d), _) => d.clone(),
        (None, Some(path)) => match Config::load(path, &ProcessEnv, SecretPolicy::Ignore) {
            Ok(c) => c.server.data_dir,
            Err(e) => {
                eprint!("{e}");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        },
        (None, None) => PathBuf::from(crate::config::DEFAULT_DATA_DIR),
    };
    if !data_dir.join("db").exists() {
        eprintln!("error: no store in {}", data_dir.display());
        return Err(ExitCode::from(EXIT_IO));
    }
    let store = Store::open(&data_dir).map_err(|e| {
        eprintln!("error: {e}");
        if matches!(e, crate::store::StoreError::Locked(_)) {
            eprintln!("hint: a running airlock holds it; ask it instead: airlock admin GET /admin/audit/verify");
        }
        ExitCode::from(EXIT_IO)
    })?;
    store.tree(crate::ledger::TREE_NAME).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_IO)
    })
}

fn audit_verify(args: &StoreArgs) -> ExitCode {
    let tree = match ledger_tree(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let report = crate::ledger::verify(&tree);
    match &report.first_bad {
        None => {
            println!("audit log OK: {} records", report.records);
            ExitCode::SUCCESS
        }
        Some((seq, why)) => {
            println!(
                "audit log BROKEN at record {seq}: {why} ({} good records before it)",
                report.records
            );
            ExitCode::FAILURE
        }
    }
}

fn audit_export(
    args: &StoreArgs,
    filter: &crate::ledger::ExportFilter,
    out: Option<&Path>,
) -> ExitCode {
    let tree = match ledger_tree(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let mut sink: Box<dyn Write> = match out {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("error: cannot write {}: {e}", p.display());
                return ExitCode::from(EXIT_IO);
            }
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match crate::ledger::export(&tree, filter, &mut sink).and_then(|n| {
        sink.flush()
            .map(|()| n)
            .map_err(|e| crate::ledger::LedgerError::Export(e.to_string()))
    }) {
        Ok(n) => {
            eprintln!("exported {n} records");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_IO)
        }
    }
}

fn usage(args: &UsageArgs) -> ExitCode {
    let tree = match ledger_tree(&args.store) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let rows = match crate::ledger::read_usage(&tree, &args.from, &args.to) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_IO);
        }
    };
    match crate::admin::ledger::group_usage(rows, &args.group_by) {
        Ok(data) => {
            println!(
                "{:<40} {:>10} {:>8} {:>14} {:>14} {:>12}",
                args.group_by, "requests", "errors", "prompt_tok", "completion_tok", "cost_usd"
            );
            for r in data {
                println!(
                    "{:<40} {:>10} {:>8} {:>14} {:>14} {:>12.6}",
                    r[args.group_by.as_str()].as_str().unwrap_or(""),
                    r["requests"].as_u64().unwrap_or(0),
                    r["errors"].as_u64().unwrap_or(0),
                    r["prompt_tokens"].as_u64().unwrap_or(0),
                    r["completion_tokens"].as_u64().unwrap_or(0),
                    r["cost_usd"].as_f64().unwrap_or(0.0)
                );
            }
            ExitCode::SUCCESS
        }
        Err(m) => {
            eprintln!("error: {m}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn admin(args: &AdminArgs) -> ExitCode {
    let method = match http::Method::from_bytes(args.method.to_ascii_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            eprintln!("error: {:?} is not an HTTP method", args.method);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !args.path.starts_with("/admin") {
        eprintln!("error: the path must start with /admin");
        return ExitCode::from(EXIT_CONFIG);
    }
    match admin_call(&args.url, &args.key, method, &args.path, args.data.clone()) {
        Ok((status, body)) => {
            println!("{body}");
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: HTTP {status}");
                ExitCode::FAILURE
            }
        }
        Err(code) => code,
    }
}

/// One admin API call to a running server: `(status, body)`, or the exit code after
/// printing why it could not be made.
pub(crate) fn admin_call(
    base_url: &str,
    key: &str,
    method: http::Method,
    path: &str,
    body: Option<String>,
) -> Result<(http::StatusCode, String), ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        })?;
    let defaults = crate::config::Config::embedded(&[("", "")]).map(|c| c.upstream);
    let client = defaults
        .map(|d| crate::providers::http::build_client(&d))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        })?;
    let url = format!("{}{}", base_url.trim_end_matches('/'), path);
    // Registration hashes big files on the server: no overall timeout here.
    let mut rb = client
        .request(method, url)
        .bearer_auth(key)
        .timeout(std::time::Duration::from_secs(24 * 3600));
    if let Some(d) = body {
        rb = rb.header("content-type", "application/json").body(d);
    }
    runtime
        .block_on(async {
            let resp = rb.send().await?;
            let status = resp.status();
            let body = resp.text().await?;
            Ok::<_, crate::providers::http::Error>((status, body))
        })
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_IO)
        })
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
    let runtime = match runtime_builder().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cfg))
}

/// The server's runtime: one thread when the process may use one CPU (e.g. pinned with
/// `taskset`), where a multi-threaded scheduler would only add cross-thread wake-ups;
/// otherwise one worker per CPU.
fn runtime_builder() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
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
    // Last-use times are kept in memory on the hot path and written every few seconds.
    let directory = state.directory.clone();
    let flusher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Err(e) = directory.flush_last_used() {
                tracing::warn!(error = %e, "cannot record key last-use times");
            }
        }
    });
    // Preloaded local models load in the background; /ready answers 503 until they
    // are in. Idle ones unload after keep_alive.
    let local = state.local.clone();
    tokio::task::spawn_blocking(move || {
        for failure in local.preload() {
            tracing::error!(error = %failure, "cannot preload a local model");
        }
    });
    let pool = state.local.pool.clone();
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            for name in pool.reap(std::time::Instant::now()) {
                tracing::info!(model = %name, "unloaded an idle local model");
            }
        }
    });
    let directory = state.directory.clone();
    let budgets = state.governance.budgets.clone();
    // Signal handlers first, so a SIGTERM right after the address line stops cleanly.
    let shutdown = crate::server::shutdown_signal();
    // The one line on stdout: tests and scripts read the bound address from it.
    println!("airlock listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let served = crate::server::serve(state, listener, shutdown).await;
    flusher.abort();
    reaper.abort();
    if let Err(e) = directory.flush_last_used() {
        tracing::warn!(error = %e, "cannot record key last-use times at shutdown");
    }
    // Requests are drained: budget holds go back to what is still reserved, so the next
    // start charges nothing for them.
    if let Err(e) = budgets.release_holds().await {
        tracing::warn!(error = %e, "cannot release budget holds at shutdown; the next start charges them");
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
