//! The benchmark driver: runs every phase against every target (mock direct, nginx,
//! airlock...), measures latency from the scheduled send time (open loop, so queueing
//! shows: coordinated-omission corrected), reads the targets' CPU time and memory from
//! /proc, and prints one Markdown table per phase plus JSON for the record.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::client::{Outcome, Pool, RequestSpec};
use crate::procfs;

/// A request that has not finished after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After a run's schedule ends, in-flight requests get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(6);
/// Open-loop runs may use up to this many connections per target.
const MAX_CONNECTIONS: usize = 2048;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub targets_file: String,
    pub quick: bool,
    pub json_out: Option<String>,
    pub plot_out: Option<String>,
    /// Only phases whose id contains one of these.
    pub only: Vec<String>,
    /// Override the measured seconds per run.
    pub duration: Option<f64>,
    /// Stop starting runs after this many seconds (the rest are skipped and reported).
    pub budget_s: Option<f64>,
    /// Extra label stored in the JSON (e.g. the git commit).
    pub label: Option<String>,
}

/// One system under test.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    path: String,
    slow_path: String,
    model: String,
    slow_model: String,
    key: Option<String>,
    /// Processes whose CPU and memory are the target's (empty for the mock itself).
    pids: Vec<u32>,
    is_direct: bool,
}

fn parse_targets(v: &Value) -> anyhow::Result<(Vec<Target>, Vec<u32>)> {
    let s = |t: &Value, k: &str| -> anyhow::Result<String> {
        t.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("target field `{k}` missing: {t}"))
    };
    let mut out = Vec::new();
    for t in v
        .get("targets")
        .and_then(Value::as_array)
        .context("`targets` must be an array")?
    {
        let url = s(t, "url")?;
        let hostport = url
            .strip_prefix("http://")
            .context("target url must be http://HOST:PORT")?
            .trim_end_matches('/');
        let addr: SocketAddr = hostport
            .parse()
            .with_context(|| format!("target url {url} must be http://IP:PORT"))?;
        let mut pids = Vec::new();
        for p in t
            .get("pids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(p) = p.as_u64() {
                pids.extend(procfs::with_children(p as u32));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        out.push(Target {
            name: s(t, "name")?,
            addr,
            path: s(t, "path")?,
            slow_path: s(t, "slow_path")?,
            model: s(t, "model")?,
            slow_model: s(t, "slow_model")?,
            key: t.get("key").and_then(Value::as_str).map(str::to_string),
            pids,
            is_direct: t.get("direct").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    if out.is_empty() {
        bail!("no targets");
    }
    let client_pids = v
        .get("client_pids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64().map(|p| p as u32))
        .collect();
    Ok((out, client_pids))
}

#[derive(Debug, Clone)]
enum Load {
    /// Open loop at these request rates.
    Fixed(Vec<f64>),
    /// Closed loop: this many workers, each sending its next request when the last ends.
    Closed(usize),
}

#[derive(Debug, Clone)]
struct Phase {
    id: &'static str,
    title: String,
    stream: bool,
    /// Through the mock's 50 ms path.
    slow: bool,
    load: Load,
}

const SLOW_MS: u64 = 50;
const CLOSED_CONNS: usize = 64;

fn phases(quick: bool) -> Vec<Phase> {
    let (rates, stream_rates, slow_rates, slow_stream_rates) = if quick {
        (
            vec![500.0, 2000.0],
            vec![1000.0],
            vec![4000.0],
            vec![4000.0],
        )
    } else {
        (
            vec![500.0, 1000.0, 2000.0, 4000.0, 8000.0],
            vec![500.0, 1000.0, 2000.0, 4000.0],
            // 8,000 req/s for 50 ms each: about 400 requests in flight.
            vec![1000.0, 4000.0, 8000.0],
            vec![1000.0, 4000.0],
        )
    };
    let in_flight = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{:.0}", r * SLOW_MS as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    vec![
        Phase {
            id: "fixed-json",
            title: "Non-streaming, fixed rate".into(),
            stream: false,
            slow: false,
            load: Load::Fixed(rates),
        },
        Phase {
            id: "fixed-sse",
            title: "Streaming (SSE, 20 content chunks), fixed rate".into(),
            stream: true,
            slow: false,
            load: Load::Fixed(stream_rates),
        },
        Phase {
            id: "closed-json",
            title: format!("Non-streaming, closed loop ({CLOSED_CONNS} connections): maximum requests/s"),
            stream: false,
            slow: false,
            load: Load::Closed(CLOSED_CONNS),
        },
        Phase {
            id: "closed-sse",
            title: format!("Streaming, closed loop ({CLOSED_CONNS} connections): maximum requests/s"),
            stream: true,
            slow: false,
            load: Load::Closed(CLOSED_CONNS),
        },
        Phase {
            id: "slow-json",
            title: format!(
                "Non-streaming, {SLOW_MS} ms upstream delay, fixed rate (about {} requests in flight)",
                in_flight(&slow_rates)
            ),
            stream: false,
            slow: true,
            load: Load::Fixed(slow_rates),
        },
        Phase {
            id: "slow-sse",
            title: format!(
                "Streaming, {SLOW_MS} ms upstream delay, fixed rate (about {} requests in flight)",
                in_flight(&slow_stream_rates)
            ),
            stream: true,
            slow: true,
            load: Load::Fixed(slow_stream_rates),
        },
    ]
}

/// Everything measured in one run (one target, one load point).
#[derive(Debug)]
struct Measured {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    /// How late the scheduler thread handed out each send (open loop only).
    lag: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    sent: u64,
    first_done: Option<Instant>,
    last_done: Instant,
}

impl Measured {
    fn new(now: Instant) -> anyhow::Result<Self> {
        let h = || Histogram::<u64>::new_with_bounds(1, 120_000_000, 3);
        Ok(Measured {
            latency: h()?,
            ttfb: h()?,
            lag: h()?,
            ok: 0,
            errors: BTreeMap::new(),
            sent: 0,
            first_done: None,
            last_done: now,
        })
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

type Shared = Arc<Mutex<Measured>>;

fn lock(m: &Shared) -> std::sync::MutexGuard<'_, Measured> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn us(d: Duration) -> u64 {
    d.as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

async fn one(pool: Arc<Pool>, spec: Arc<RequestSpec>, intended: Instant, m: Shared) {
    let res = tokio::time::timeout(REQUEST_TIMEOUT, pool.send(&spec)).await;
    let done = Instant::now();
    let mut m = lock(&m);
    m.last_done = m.last_done.max(done);
    if m.first_done.is_none() {
        m.first_done = Some(done);
    }
    match res {
        Ok(Outcome::Ok { first_byte }) => {
            m.ok += 1;
            let _ = m
                .latency
                .record(us(done.saturating_duration_since(intended)));
            let _ = m
                .ttfb
                .record(us(first_byte.saturating_duration_since(intended)));
        }
        Ok(Outcome::Failed(kind)) => *m.errors.entry(kind).or_default() += 1,
        Err(_) => *m.errors.entry("timeout (5 s)".into()).or_default() += 1,
    }
}

/// Waits for in-flight requests up to the drain timeout; what is left counts as errors.
async fn drain(set: &mut JoinSet<()>, m: &Shared) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while !set.is_empty() {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(_) => {}
            Err(_) => {
                let left = set.len() as u64;
                set.abort_all();
                *lock(m)
                    .errors
                    .entry("unfinished at drain".into())
                    .or_default() += left;
                break;
            }
        }
    }
}

/// Open loop: request i is due at start + i / rate, whether or not earlier ones have
/// returned. A dedicated thread keeps the schedule (nanosleep, ~50 µs precise, where
/// tokio's timer is 1 ms coarse) and hands each due time to the runtime; latency is
/// measured from that due time, so a slow target's queueing shows in full.
async fn fixed_rate(
    pool: Arc<Pool>,
    spec: Arc<RequestSpec>,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let n = (rate * seconds).round().max(1.0) as u64;
    let start = Instant::now() + Duration::from_millis(2);
    let m: Shared = Arc::new(Mutex::new(Measured::new(start)?));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let scheduler = std::thread::spawn(move || {
        for i in 0..n {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(due).is_err() {
                break;
            }
        }
    });
    let mut set = JoinSet::new();
    while let Some(due) = rx.recv().await {
        {
            let mut g = lock(&m);
            g.sent += 1;
            let _ = g
                .lag
                .record(us(Instant::now().saturating_duration_since(due)));
        }
        set.spawn(one(pool.clone(), spec.clone(), due, m.clone()));
        while set.try_join_next().is_some() {}
    }
    let _ = scheduler.join();
    drain(&mut set, &m).await;
    let out = std::mem::replace(&mut *lock(&m), Measured::new(start)?);
    Ok(out)
}

/// Closed loop: `workers` tasks, each sending its next request as soon as the last
/// returned, for `seconds`. Latency is from the actual send.
async fn closed_loop(
    pool: Arc<Pool>,
    spec: Arc<RequestSpec>,
    workers: usize,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let m: Shared = Arc::new(Mutex::new(Measured::new(start)?));
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (pool, spec, m) = (pool.clone(), spec.clone(), m.clone());
        set.spawn(async move {
            while Instant::now() < deadline {
                lock(&m).sent += 1;
                one(pool.clone(), spec.clone(), Instant::now(), m.clone()).await;
            }
        });
    }
    drain(&mut set, &m).await;
    let out = std::mem::replace(&mut *lock(&m), Measured::new(start)?);
    Ok(out)
}

/// One row of a table.
#[derive(Debug, Clone)]
struct Row {
    target: String,
    is_direct: bool,
    offered: Option<f64>,
    concurrency: Option<usize>,
    seconds: f64,
    sent: u64,
    ok: u64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    achieved: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
    ttfb_p50: u64,
    ttfb_p99: u64,
    lag_p99: u64,
    lag_max: u64,
    overhead_p99: Option<i64>,
    cpu_us_per_req: Option<f64>,
    cpu_pct: Option<f64>,
    rss_mb: Option<f64>,
    client_core_pct: f64,
    skipped: bool,
}

impl Row {
    fn skipped(target: &Target, offered: Option<f64>, concurrency: Option<usize>) -> Row {
        Row {
            target: target.name.clone(),
            is_direct: target.is_direct,
            offered,
            concurrency,
            seconds: 0.0,
            sent: 0,
            ok: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            achieved: 0.0,
            p50: 0,
            p90: 0,
            p99: 0,
            p999: 0,
            max: 0,
            mean: 0.0,
            ttfb_p50: 0,
            ttfb_p99: 0,
            lag_p99: 0,
            lag_max: 0,
            overhead_p99: None,
            cpu_us_per_req: None,
            cpu_pct: None,
            rss_mb: None,
            client_core_pct: 0.0,
            skipped: true,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "target": self.target,
            "skipped": self.skipped,
            "offered_rps": self.offered,
            "concurrency": self.concurrency,
            "duration_s": self.seconds,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "achieved_rps": round1(self.achieved),
            "latency_us": {"p50": self.p50, "p90": self.p90, "p99": self.p99, "p99_9": self.p999,
                           "max": self.max, "mean": round1(self.mean)},
            "first_byte_us": {"p50": self.ttfb_p50, "p99": self.ttfb_p99},
            "scheduler_lag_us": {"p99": self.lag_p99, "max": self.lag_max},
            "p99_overhead_vs_direct_us": self.overhead_p99,
            "cpu_us_per_request": self.cpu_us_per_req.map(round1),
            "cpu_percent_of_one_core": self.cpu_pct.map(round1),
            "rss_mb_max": self.rss_mb.map(round1),
            "client_core_percent": round1(self.client_core_pct),
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

struct Driver {
    targets: Vec<Target>,
    pools: Vec<Arc<Pool>>,
    client_pids: Vec<u32>,
    clk_tck: u64,
    seconds: f64,
    warmup: f64,
    began: Instant,
    budget: f64,
}

impl Driver {
    fn spec(&self, t: &Target, phase: &Phase) -> anyhow::Result<Arc<RequestSpec>> {
        let (path, model) = if phase.slow {
            (&t.slow_path, &t.slow_model)
        } else {
            (&t.path, &t.model)
        };
        Ok(Arc::new(RequestSpec::new(
            t.addr,
            path,
            t.key.as_deref(),
            model,
            phase.stream,
        )?))
    }

    async fn load(
        &self,
        i: usize,
        spec: &Arc<RequestSpec>,
        load: &Load,
        rate: f64,
        seconds: f64,
    ) -> anyhow::Result<Measured> {
        let pool = self.pools[i].clone();
        match load {
            Load::Fixed(_) => fixed_rate(pool, spec.clone(), rate, seconds).await,
            Load::Closed(c) => closed_loop(pool, spec.clone(), *c, seconds).await,
        }
    }

    async fn run_one(&self, i: usize, phase: &Phase, rate: f64) -> anyhow::Result<Row> {
        let t = &self.targets[i];
        let spec = self.spec(t, phase)?;
        let (offered, concurrency) = match &phase.load {
            Load::Fixed(_) => (Some(rate), None),
            Load::Closed(c) => (None, Some(*c)),
        };
        if self.began.elapsed().as_secs_f64() > self.budget {
            return Ok(Row::skipped(t, offered, concurrency));
        }
        // Connections ahead of time: enough for the run's expected concurrency.
        let want = match &phase.load {
            Load::Fixed(_) if phase.slow => (rate * SLOW_MS as f64 / 1000.0 * 1.3) as usize,
            Load::Fixed(_) => 16,
            Load::Closed(c) => *c,
        };
        self.pools[i].prewarm(want.min(MAX_CONNECTIONS)).await;
        // Warm-up at the same load, not recorded.
        let _ = self.load(i, &spec, &phase.load, rate, self.warmup).await?;

        let me = std::process::id();
        let mut client_pids = self.client_pids.clone();
        client_pids.push(me);
        let cpu0 = procfs::cpu_reading(&t.pids);
        let client0 = procfs::cpu_reading(&client_pids);
        let wall0 = Instant::now();

        let stop = Arc::new(AtomicBool::new(false));
        let rss_max = Arc::new(AtomicU64::new(procfs::rss_kb_sum(&t.pids)));
        let sampler = {
            let (stop, rss_max, pids) = (stop.clone(), rss_max.clone(), t.pids.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    rss_max.fetch_max(procfs::rss_kb_sum(&pids), Ordering::Relaxed);
                }
            })
        };
        let m = self.load(i, &spec, &phase.load, rate, self.seconds).await?;
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.await;
        rss_max.fetch_max(procfs::rss_kb_sum(&t.pids), Ordering::Relaxed);

        let wall = wall0.elapsed().as_secs_f64();
        let cpu_us = procfs::cpu_delta_us(cpu0, procfs::cpu_reading(&t.pids), self.clk_tck);
        let client_us =
            procfs::cpu_delta_us(client0, procfs::cpu_reading(&client_pids), self.clk_tck);
        let done = m.ok + m.error_count();
        // Throughput between the first and the last completion: a target that keeps up
        // gives the offered rate whatever its latency; one that queues gives less.
        let span = m.first_done.map_or(0.0, |f| {
            m.last_done.saturating_duration_since(f).as_secs_f64()
        });
        let has_pids = !t.pids.is_empty();
        Ok(Row {
            target: t.name.clone(),
            is_direct: t.is_direct,
            offered,
            concurrency,
            seconds: self.seconds,
            sent: m.sent,
            ok: m.ok,
            errors: m.error_count(),
            error_kinds: m.errors.clone(),
            achieved: if span > 0.0 {
                m.ok.saturating_sub(1) as f64 / span
            } else {
                0.0
            },
            p50: m.latency.value_at_quantile(0.50),
            p90: m.latency.value_at_quantile(0.90),
            p99: m.latency.value_at_quantile(0.99),
            p999: m.latency.value_at_quantile(0.999),
            max: m.latency.max(),
            mean: m.latency.mean(),
            ttfb_p50: m.ttfb.value_at_quantile(0.50),
            ttfb_p99: m.ttfb.value_at_quantile(0.99),
            lag_p99: m.lag.value_at_quantile(0.99),
            lag_max: m.lag.max(),
            overhead_p99: None,
            cpu_us_per_req: (has_pids && done > 0).then(|| cpu_us / done as f64),
            cpu_pct: has_pids.then(|| cpu_us / (wall * 1e6) * 100.0),
            rss_mb: has_pids.then(|| rss_max.load(Ordering::Relaxed) as f64 / 1024.0),
            client_core_pct: client_us / (wall * 1e6) * 100.0,
            skipped: false,
        })
    }
}

fn ms(us: u64) -> String {
    let v = us as f64 / 1000.0;
    if v < 10.0 {
        format!("{v:.3}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn signed_ms(us: i64) -> String {
    let sign = if us < 0 { "−" } else { "+" };
    format!("{sign}{}", ms(us.unsigned_abs()))
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn table(phase: &Phase, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### {}\n", phase.title);
    let _ = writeln!(
        s,
        "| target | offered rps | achieved rps | p50 ms | p90 ms | p99 ms | p99 overhead vs direct | errors | gateway CPU µs/request | RSS MB | load-gen+mock core % |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let offered = match (r.offered, r.concurrency) {
            (Some(o), _) => thousands(o),
            (None, Some(c)) => format!("closed loop, {c} conns"),
            _ => "-".into(),
        };
        if r.skipped {
            let _ = writeln!(
                s,
                "| {} | {offered} | skipped (time budget) | | | | | | | | |",
                r.target
            );
            continue;
        }
        let overhead = if r.is_direct {
            "(baseline)".to_string()
        } else {
            match (&phase.load, r.overhead_p99) {
                (Load::Closed(_), _) => "n/a (closed loop)".into(),
                (_, Some(o)) => format!("{} ms", signed_ms(o)),
                _ => "-".into(),
            }
        };
        let errors = if r.errors == 0 {
            "0".to_string()
        } else {
            let kinds: Vec<String> = r
                .error_kinds
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            format!("{} ({})", r.errors, kinds.join(", "))
        };
        let _ = writeln!(
            s,
            "| {} | {offered} | {} | {} | {} | {} | {overhead} | {errors} | {} | {} | {:.0} |",
            r.target,
            thousands(r.achieved),
            ms(r.p50),
            ms(r.p90),
            ms(r.p99),
            r.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}")),
            r.rss_mb.map_or("-".into(), |m| format!("{m:.1}")),
            r.client_core_pct,
        );
    }
    s
}

/// airlock vs nginx: the ratios the design's bar is about.
fn summary(results: &[(Phase, Vec<Row>)], targets: &[Target]) -> String {
    let Some(nginx) = targets.iter().find(|t| t.name == "nginx") else {
        return String::new();
    };
    let gateways: Vec<&Target> = targets
        .iter()
        .filter(|t| !t.is_direct && t.name != nginx.name)
        .collect();
    let mut s = String::new();
    let _ = writeln!(s, "### Ratios against nginx (same run)\n");
    let _ = writeln!(
        s,
        "| phase | load | target | p99 overhead (target / nginx) | CPU µs/request (target / nginx) | achieved rps (target / nginx) |"
    );
    let _ = writeln!(s, "|---|---|---|--:|--:|--:|");
    for (phase, rows) in results {
        let loads: Vec<String> = match &phase.load {
            Load::Fixed(r) => r.iter().map(|r| thousands(*r)).collect(),
            Load::Closed(c) => vec![format!("closed {c}")],
        };
        for (li, load) in loads.iter().enumerate() {
            let at = |name: &str| -> Option<&Row> {
                rows.iter()
                    .filter(|r| r.target == name)
                    .nth(li)
                    .filter(|r| !r.skipped)
            };
            let Some(n) = at(&nginx.name) else { continue };
            for g in &gateways {
                let Some(r) = at(&g.name) else { continue };
                let over = match (&phase.load, r.overhead_p99, n.overhead_p99) {
                    (Load::Fixed(_), Some(a), Some(b)) => {
                        let ratio = if b > 0 {
                            format!(" = {:.1}×", a as f64 / b as f64)
                        } else {
                            String::new()
                        };
                        format!("{} / {} ms{ratio}", signed_ms(a), signed_ms(b))
                    }
                    _ => "n/a".into(),
                };
                let cpu = match (r.cpu_us_per_req, n.cpu_us_per_req) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{a:.1} / {b:.1} = {:.1}×", a / b),
                    _ => "-".into(),
                };
                let rps = if n.achieved > 0.0 {
                    format!(
                        "{} / {} = {:.2}",
                        thousands(r.achieved),
                        thousands(n.achieved),
                        r.achieved / n.achieved
                    )
                } else {
                    "-".into()
                };
                let _ = writeln!(
                    s,
                    "| {} | {load} | {} | {over} | {cpu} | {rps} |",
                    phase.id, g.name
                );
            }
        }
    }
    s
}

fn plot_data(results: &[(Phase, Vec<Row>)], targets: &[Target]) -> String {
    // One gnuplot data block per fixed-rate phase without delay: columns are the offered
    // rate, then p99 in ms for each target in order (NaN when missing).
    let mut s = String::new();
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    for (phase, rows) in results {
        let Load::Fixed(rates) = &phase.load else {
            continue;
        };
        if phase.slow {
            continue;
        }
        let _ = writeln!(s, "# {} | rate {}", phase.id, names.join(" "));
        for (ri, rate) in rates.iter().enumerate() {
            let _ = write!(s, "{rate}");
            for name in &names {
                let v = rows
                    .iter()
                    .filter(|r| &r.target == name)
                    .nth(ri)
                    .filter(|r| !r.skipped && r.ok > 0)
                    .map_or("NaN".to_string(), |r| {
                        format!("{:.4}", r.p99 as f64 / 1000.0)
                    });
                let _ = write!(s, " {v}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "\n");
    }
    s
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&opts.targets_file)
        .with_context(|| format!("reading {}", opts.targets_file))?;
    let spec: Value = serde_json::from_str(&text)?;
    let (targets, client_pids) = parse_targets(&spec)?;
    for t in &targets {
        crate::client::wait_http(t.addr, Duration::from_secs(10)).await?;
    }
    let seconds = opts.duration.unwrap_or(if opts.quick { 1.0 } else { 4.0 });
    let mut driver = Driver {
        pools: targets
            .iter()
            .map(|t| Arc::new(Pool::new(t.addr, MAX_CONNECTIONS)))
            .collect(),
        targets,
        client_pids,
        clk_tck: procfs::clk_tck(),
        seconds,
        warmup: if opts.quick { 0.3 } else { 1.0 },
        began: Instant::now(),
        budget: opts
            .budget_s
            .unwrap_or(if opts.quick { 50.0 } else { 320.0 }),
    };

    let idle: Vec<Option<f64>> = driver
        .targets
        .iter()
        .map(|t| (!t.pids.is_empty()).then(|| procfs::rss_kb_sum(&t.pids) as f64 / 1024.0))
        .collect();

    let mut all: Vec<(Phase, Vec<Row>)> = Vec::new();
    let plan: Vec<Phase> = phases(opts.quick)
        .into_iter()
        .filter(|p| opts.only.is_empty() || opts.only.iter().any(|o| p.id.contains(o.as_str())))
        .collect();
    for phase in plan {
        let rates: Vec<f64> = match &phase.load {
            Load::Fixed(r) => r.clone(),
            Load::Closed(_) => vec![0.0],
        };
        let mut rows = Vec::new();
        for rate in rates {
            let mut group = Vec::new();
            for i in 0..driver.targets.len() {
                let row = driver.run_one(i, &phase, rate).await?;
                eprintln!(
                    "  {:<12} {:<16} {:>8} rps offered {:>9.0} achieved  p99 {:>9} ms  errors {}",
                    phase.id,
                    row.target,
                    row.offered.map_or("closed".into(), thousands),
                    row.achieved,
                    ms(row.p99),
                    row.errors
                );
                group.push(row);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let direct_p99 = group
                .iter()
                .find(|r| r.is_direct && !r.skipped)
                .map(|r| r.p99 as i64);
            for r in &mut group {
                if !r.is_direct && !r.skipped && r.ok > 0 {
                    r.overhead_p99 = direct_p99.map(|d| r.p99 as i64 - d);
                }
            }
            rows.extend(group);
        }
        println!("{}", table(&phase, &rows));
        all.push((phase, rows));
    }

    // Memory, idle and under load.
    let mut mem = String::from(
        "### Resident memory (VmRSS)\n\n| target | idle MB | max under load MB |\n|---|--:|--:|\n",
    );
    for (i, t) in driver.targets.iter().enumerate() {
        let Some(idle_mb) = idle[i] else { continue };
        let max = all
            .iter()
            .flat_map(|(_, rows)| rows.iter())
            .filter(|r| r.target == t.name)
            .filter_map(|r| r.rss_mb)
            .fold(idle_mb, f64::max);
        let _ = writeln!(mem, "| {} | {idle_mb:.1} | {max:.1} |", t.name);
    }
    println!("{mem}");
    println!("{}", summary(&all, &driver.targets));
    let elapsed = driver.began.elapsed().as_secs_f64();
    println!("Measured {seconds} s per run after {} s of warm-up at the same load; latency from the scheduled send time (open loop); total {elapsed:.0} s.", driver.warmup);

    if let Some(path) = &opts.plot_out {
        std::fs::write(path, plot_data(&all, &driver.targets))?;
    }
    if let Some(path) = &opts.json_out {
        let doc = json!({
            "benchmark": "airlock gateway load",
            "label": opts.label,
            "quick": opts.quick,
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "seconds_per_run": seconds,
            "warmup_seconds": driver.warmup,
            "request_timeout_s": REQUEST_TIMEOUT.as_secs(),
            "clk_tck": driver.clk_tck,
            "total_seconds": round1(elapsed),
            "targets": driver.targets.iter().enumerate().map(|(i, t)| json!({
                "name": t.name, "url": format!("http://{}", t.addr), "path": t.path,
                "slow_path": t.slow_path, "model": t.model, "pids": t.pids,
                "idle_rss_mb": idle[i].map(round1),
            })).collect::<Vec<_>>(),
            "phases": all.iter().map(|(p, rows)| json!({
                "id": p.id, "title": p.title, "stream": p.stream,
                "upstream_delay_ms": if p.slow { SLOW_MS } else { 0 },
                "mode": match p.load { Load::Fixed(_) => "open-loop fixed rate", Load::Closed(_) => "closed loop" },
                "runs": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    driver.pools.clear();
    Ok(())
}
