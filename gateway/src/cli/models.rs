//! `airlock models register | list | show | remove`.
//!
//! Invariant: the store admits one process; the command opens it directly when no
//! server holds it, and otherwise goes through the running server's admin API (the
//! address from the config's `server.listen` or `--url`, the key from `--key`,
//! `AIRLOCK_ADMIN_KEY` or the data directory's `admin.key`), so both paths give the
//! same result and the server starts serving a registered model at once.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::{admin_call, StoreArgs, EXIT_CONFIG, EXIT_IO};
use crate::config::{Config, ProcessEnv, SecretPolicy};
use crate::governance::directory::ADMIN_KEY_FILE;
use crate::local::{Registry, RegistryError};
use crate::store::{Store, StoreError};
use airlock_runtime::{Manifest, ModelStatus};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Register weights already on disk: a GGUF file, or a folder with config.json,
    /// *.safetensors and tokenizer.json. Hashes every file (sha256).
    Register {
        path: PathBuf,
        /// Served as `local/NAME`.
        #[arg(long)]
        name: String,
        /// Replace a model already registered under this name.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        at: Where,
    },
    /// List registered models.
    List {
        #[command(flatten)]
        at: Where,
    },
    /// Show one model's manifest and state as JSON.
    Show {
        name: String,
        #[command(flatten)]
        at: Where,
    },
    /// Remove a model (the files stay on disk).
    Remove {
        name: String,
        #[command(flatten)]
        at: Where,
    },
}

/// Which store, and how to reach its server when one holds it.
#[derive(Debug, clap::Args)]
pub struct Where {
    #[command(flatten)]
    store: StoreArgs,
    /// The running server's base URL (default: from `server.listen`).
    #[arg(long, env = "AIRLOCK_URL")]
    url: Option<String>,
    /// An admin key for the running server (default: the data directory's admin.key).
    #[arg(long, env = "AIRLOCK_ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
}

/// Where the command acts.
enum Target {
    Store(Registry),
    Server { url: String, key: String },
}

fn open(at: &Where) -> Result<Target, ExitCode> {
    let cfg = match &at.store.config {
        Some(path) => Config::load(path, &ProcessEnv, SecretPolicy::Ignore),
        None => Config::embedded(&ProcessEnv),
    }
    .map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let data_dir = at
        .store
        .data_dir
        .clone()
        .unwrap_or_else(|| cfg.server.data_dir.clone());
    match Store::open(&data_dir) {
        Ok(store) => Registry::open(&store).map(Target::Store).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_IO)
        }),
        Err(StoreError::Locked(_)) => {
            let url = at
                .url
                .clone()
                .unwrap_or_else(|| format!("http://{}", cfg.server.listen));
            let key = match &at.key {
                Some(k) => k.clone(),
                None => std::fs::read_to_string(data_dir.join(ADMIN_KEY_FILE))
                    .map(|k| k.trim().to_string())
                    .map_err(|e| {
                        eprintln!(
                            "error: a server holds {} and no admin key was given (--key or AIRLOCK_ADMIN_KEY); {}: {e}",
                            data_dir.display(),
                            ADMIN_KEY_FILE
                        );
                        ExitCode::from(EXIT_CONFIG)
                    })?,
            };
            Ok(Target::Server { url, key })
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EXIT_IO))
        }
    }
}

/// Calls the server; prints its error and fails unless 2xx.
fn call(
    url: &str,
    key: &str,
    method: http::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ExitCode> {
    let (status, text) = admin_call(url, key, method, path, body.map(|b| b.to_string()))?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        Ok(v)
    } else {
        let msg = v["error"]["message"].as_str().unwrap_or("(no message)");
        eprintln!("error: {msg} (HTTP {status})");
        Err(if status.is_client_error() {
            ExitCode::from(EXIT_CONFIG)
        } else {
            ExitCode::FAILURE
        })
    }
}

fn store_error(e: RegistryError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        RegistryError::Store(_) => ExitCode::from(EXIT_IO),
        _ => ExitCode::from(EXIT_CONFIG),
    }
}

/// A model as `list`/`show` print it when no server runs.
fn offline_view(m: Manifest) -> Value {
    crate::admin::models::view(&ModelStatus {
        context_length: m.context_length,
        manifest: m,
        loaded: false,
        queue_depth: 0,
    })
}

fn human_bytes(n: u64) -> String {
    let mib = n as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

fn print_table(models: &[Value]) {
    println!(
        "{:<28} {:<10} {:<8} {:<12} {:>10} {:>8} {:<10}",
        "ID", "KIND", "ARCH", "FORMAT", "SIZE", "CONTEXT", "STATE"
    );
    for m in models {
        println!(
            "{:<28} {:<10} {:<8} {:<12} {:>10} {:>8} {:<10}",
            m["id"].as_str().unwrap_or(""),
            m["kind"].as_str().unwrap_or(""),
            m["architecture"].as_str().unwrap_or(""),
            m["format"].as_str().unwrap_or(""),
            human_bytes(m["bytes"].as_u64().unwrap_or(0)),
            m["context_length"]
                .as_u64()
                .map_or("-".to_string(), |c| c.to_string()),
            m["state"].as_str().unwrap_or(""),
        );
    }
}

fn result(r: Result<(), ExitCode>) -> ExitCode {
    r.err().unwrap_or(ExitCode::SUCCESS)
}

pub fn run(cmd: ModelsCommand) -> ExitCode {
    result(match cmd {
        ModelsCommand::Register {
            path,
            name,
            replace,
            at,
        } => register(&path, &name, replace, &at),
        ModelsCommand::List { at } => list(&at),
        ModelsCommand::Show { name, at } => show(&name, &at),
        ModelsCommand::Remove { name, at } => remove(&name, &at),
    })
}

fn register(path: &std::path::Path, name: &str, replace: bool, at: &Where) -> Result<(), ExitCode> {
    let view = match open(at)? {
        Target::Store(reg) => {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "hashing {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let registered = reg.register(path, name, replace, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            offline_view(registered.map_err(store_error)?)
        }
        Target::Server { url, key } => {
            eprintln!(
                "a server holds the store: registering through {url} (the server hashes the files)"
            );
            let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            call(
                &url,
                &key,
                http::Method::POST,
                "/admin/models",
                Some(json!({"path": absolute, "name": name, "replace": replace})),
            )?
        }
    };
    println!(
        "registered {} ({} {}, {}, {} file(s) hashed)",
        view["id"].as_str().unwrap_or(name),
        view["architecture"].as_str().unwrap_or("?"),
        view["kind"].as_str().unwrap_or("?"),
        human_bytes(view["bytes"].as_u64().unwrap_or(0)),
        view["files"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

fn list(at: &Where) -> Result<(), ExitCode> {
    let models: Vec<Value> = match open(at)? {
        Target::Store(reg) => reg.list().into_iter().map(offline_view).collect(),
        Target::Server { url, key } => {
            let v = call(&url, &key, http::Method::GET, "/admin/models", None)?;
            v["data"].as_array().cloned().unwrap_or_default()
        }
    };
    print_table(&models);
    Ok(())
}

fn show(name: &str, at: &Where) -> Result<(), ExitCode> {
    let v = match open(at)? {
        Target::Store(reg) => match reg.get(name) {
            Some(m) => offline_view(m),
            None => return Err(store_error(RegistryError::NotFound(name.to_string()))),
        },
        Target::Server { url, key } => call(
            &url,
            &key,
            http::Method::GET,
            &format!("/admin/models/{name}"),
            None,
        )?,
    };
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

fn remove(name: &str, at: &Where) -> Result<(), ExitCode> {
    match open(at)? {
        Target::Store(reg) => {
            reg.remove(name).map_err(store_error)?;
        }
        Target::Server { url, key } => {
            call(
                &url,
                &key,
                http::Method::DELETE,
                &format!("/admin/models/{name}"),
                None,
            )?;
        }
    }
    println!("removed local/{name}");
    Ok(())
}
