//! `airlock-load`: the gateway load benchmark's tools, driven by
//! `scripts/bench-gateway.sh`.
//!
//! - `airlock-load mock [--listen ADDR] [--chunks N] [--delay-ms MS]`: the mock OpenAI
//!   upstream (see `mock.rs`); prints `mock listening on http://ADDR`.
//! - `airlock-load run --targets FILE [--quick] [--json OUT] [--plot-data OUT]`: every
//!   phase against every target in FILE; Markdown tables on stdout, progress on stderr.
//! - `airlock-load free-port`: prints a free loopback TCP port.
//! - `airlock-load http METHOD URL [--key K] [--body JSON]`: one request, status then body.
//!
//! Everything runs on a current-thread runtime: the benchmark pins this process and the
//! mock to one core, the gateway under test to the other.

mod client;
mod mock;
mod procfs;
mod run;

use std::io::Write as _;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "airlock-load", about = "Airlock gateway load benchmark tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the mock OpenAI upstream until killed.
    Mock {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Content chunks per streamed answer.
        #[arg(long, default_value_t = 20)]
        chunks: usize,
        /// Delay before every answer whose path has no /d<ms>/ prefix.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Run the benchmark phases against the targets described in a JSON file.
    Run {
        /// JSON: {"targets":[{"name","url","path","slow_path","model","slow_model","key"?,"pids":[..],"direct"?}],"client_pids":[..]}
        #[arg(long)]
        targets: String,
        /// Short runs and fewer load points (under a minute in all).
        #[arg(long)]
        quick: bool,
        /// Write the raw results here as JSON.
        #[arg(long)]
        json: Option<String>,
        /// Write p99-vs-rate data for gnuplot here.
        #[arg(long)]
        plot_data: Option<String>,
        /// Only phases whose id contains this (repeatable): fixed-json, fixed-sse,
        /// closed-json, closed-sse, slow-json, slow-sse.
        #[arg(long)]
        only: Vec<String>,
        /// Seconds measured per run (default 4, or 1 with --quick).
        #[arg(long)]
        duration: Option<f64>,
        /// Start no run after this many seconds (default 320, or 50 with --quick).
        #[arg(long)]
        budget: Option<f64>,
        /// A label stored in the JSON (e.g. the git commit).
        #[arg(long)]
        label: Option<String>,
    },
    /// Print a free loopback TCP port.
    FreePort,
    /// One HTTP/1.1 request (the script needs no curl): prints the status line's code on
    /// the first line and the body after it.
    Http {
        method: String,
        /// http://IP:PORT/path
        url: String,
        /// Sent as `Authorization: Bearer KEY`.
        #[arg(long)]
        key: Option<String>,
        /// JSON body.
        #[arg(long)]
        body: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Mock {
            listen,
            chunks,
            delay_ms,
        } => rt.block_on(mock::serve(mock::MockOptions {
            listen,
            chunks,
            delay_ms,
        })),
        Cmd::Run {
            targets,
            quick,
            json,
            plot_data,
            only,
            duration,
            budget,
            label,
        } => rt.block_on(run::run(run::RunOptions {
            targets_file: targets,
            quick,
            json_out: json,
            plot_out: plot_data,
            only,
            duration,
            budget_s: budget,
            label,
        })),
        Cmd::Http {
            method,
            url,
            key,
            body,
        } => {
            let (status, text) =
                rt.block_on(client::one_shot(&method, &url, key.as_deref(), body))?;
            // A reader that stops early (`| head -n1`) is not an error.
            let _ = writeln!(std::io::stdout(), "{status}\n{text}");
            Ok(())
        }
        Cmd::FreePort => {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            Ok(())
        }
    }
}
