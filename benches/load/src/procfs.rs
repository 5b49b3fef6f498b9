//! What the benchmark reads from `/proc`: CPU time (utime + stime from
//! `/proc/<pid>/stat`, all threads of the process, in clock ticks; refined with the
//! per-thread nanosecond counters of `schedstat`) and resident memory (`VmRSS` from
//! `/proc/<pid>/status`).

use std::fs;

/// Clock ticks per second for `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100, the
/// value on every Linux port that matters).
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Fields of `/proc/<pid>/stat` after the command name (which may contain spaces and
/// parentheses, so split after the last `)`). Index 0 is field 3, `state`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of a process in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // Field 14 is utime, 15 stime; index = field - 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Sum of utime + stime over `pids` (processes that are gone count 0).
pub fn cpu_ticks_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| cpu_ticks(p)).sum()
}

/// Time on CPU in nanoseconds, summed over the live threads of `pids`
/// (`/proc/<pid>/task/<tid>/schedstat`, first field). Exact where `stat` counts 10 ms
/// ticks, but a thread that exits takes its time with it; see [`cpu_delta_us`].
pub fn cpu_ns_threads(pids: &[u32]) -> Option<u64> {
    let mut total = 0u64;
    for pid in pids {
        let dir = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        for entry in dir.flatten() {
            let path = entry.path().join("schedstat");
            let Ok(s) = fs::read_to_string(path) else {
                continue;
            };
            total += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// A CPU-time reading of a set of processes: `stat` ticks and per-thread nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct CpuReading {
    ticks: u64,
    thread_ns: Option<u64>,
}

pub fn cpu_reading(pids: &[u32]) -> CpuReading {
    CpuReading {
        ticks: cpu_ticks_sum(pids),
        thread_ns: cpu_ns_threads(pids),
    }
}

/// CPU microseconds between two readings: the per-thread nanosecond sum, unless the
/// utime + stime delta (which keeps the time of threads that exited) is more than two
/// ticks larger, in which case threads came and went and the tick count is used.
pub fn cpu_delta_us(a: CpuReading, b: CpuReading, clk_tck: u64) -> f64 {
    let tick_us = 1e6 / clk_tck as f64;
    let by_ticks = b.ticks.saturating_sub(a.ticks) as f64 * tick_us;
    match (a.thread_ns, b.thread_ns) {
        (Some(x), Some(y)) => {
            let by_threads = y.saturating_sub(x) as f64 / 1000.0;
            if by_ticks - by_threads > 2.0 * tick_us {
                by_ticks
            } else {
                by_threads
            }
        }
        _ => by_ticks,
    }
}

/// VmRSS in kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn rss_kb_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| rss_kb(p)).sum()
}

/// `pid` and its direct children (nginx: master and workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Field 4 is ppid: index 1.
            let ppid =
                stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()));
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        let a = cpu_reading(&[me]);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_delta_us(a, cpu_reading(&[me]), clk_tck()) >= 0.0);
        assert!(rss_kb(me).unwrap_or(0) > 0);
        assert_eq!(with_children(me)[0], me);
    }
}
