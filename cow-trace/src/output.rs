//! Output: the per-process table, bcc-style histograms and JSON lines.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    aggregate::{EventCounts, ProcRow, Seen},
    episode::Episode,
    histogram::{Log2Row, Summary},
};

/// Human-readable nanoseconds: `850ns`, `2.4us`, `21.3ms`, `1.20s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0 => "-".into(),
        n if n < 1_000 => format!("{n}ns"),
        n if n < 1_000_000 => format!("{:.1}us", n as f64 / 1e3),
        n if n < 1_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.2}s", n as f64 / 1e9),
    }
}

/// Binary-prefixed bytes: `0`, `4.0KiB`, `380.2MiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b}{}", if b == 0 { "" } else { "B" });
    }
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

fn lat(s: &Summary, f: fn(&Summary) -> u64) -> String {
    if s.count == 0 {
        "-".into()
    } else {
        fmt_ns(f(s))
    }
}

/// The per-process table. `top` bounds the rows (0: all); a last line says
/// how many were left out.
pub fn table(rows: &[ProcRow], top: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:>7} {:<16} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7}",
        "PID",
        "PPID",
        "COMM",
        "FORKS",
        "FORK_P50",
        "FORK_P99",
        "FORK_MAX",
        "DUPMM_50",
        "COPIES",
        "REUSES",
        "COPIED",
        "COW_P50",
        "COW_P99",
        "ZEROS"
    );
    let shown = if top == 0 { rows.len() } else { rows.len().min(top) };
    for r in &rows[..shown] {
        let comm = if r.exited { format!("{}*", r.comm) } else { r.comm.clone() };
        let _ = writeln!(
            out,
            "{:>7} {:>7} {:<16} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7}",
            r.pid,
            r.ppid,
            comm,
            r.forks,
            lat(&r.fork_latency_ns, |s| s.p50),
            lat(&r.fork_latency_ns, |s| s.p99),
            lat(&r.fork_latency_ns, |s| s.max),
            lat(&r.fork_dup_mmap_ns, |s| s.p50),
            r.cow_copies,
            r.cow_reuses,
            fmt_bytes(r.copied_bytes),
            lat(&r.cow_latency_ns, |s| s.p50),
            lat(&r.cow_latency_ns, |s| s.p99),
            r.zero_fills,
        );
    }
    if shown < rows.len() {
        let _ = writeln!(out, "... {} more processes (--top 0 shows all)", rows.len() - shown);
    }
    if rows.is_empty() {
        out.push_str("(no forks or copy-on-write faults)\n");
    }
    out
}

/// The summary's episode list: the `top` that copied most (0: all), in
/// fork order.
pub fn episode_list(episodes: &[Episode], top: usize) -> String {
    if episodes.is_empty() {
        return String::new();
    }
    let mut shown: Vec<&Episode> = episodes.iter().collect();
    if top != 0 && shown.len() > top {
        shown.sort_by_key(|e| std::cmp::Reverse(e.copied_bytes));
        shown.truncate(top);
    }
    shown.sort_by_key(|e| (e.start_ns, e.child));
    let mut out = format!("\nfork episodes ({}):\n", episodes.len());
    for e in &shown {
        let _ = writeln!(out, "  {}", e.line());
    }
    if shown.len() < episodes.len() {
        let _ = writeln!(out, "  ... {} more episodes (--top 0 shows all)", episodes.len() - shown.len());
    }
    out
}

/// JSON `{count,min,p50,p99,max}` as in [`Summary`].
#[derive(Serialize)]
pub struct Histograms {
    pub fork_latency_ns: Vec<Log2Row>,
    pub cow_latency_ns: Vec<Log2Row>,
    /// The `dup_mmap` share of fork latency (kprobe/fentry backends).
    pub fork_dup_mmap_ns: Vec<Log2Row>,
}

/// Totals counted in the kernel, independent of the ring buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelTotals {
    #[serde(flatten)]
    pub events: EventCounts,
    pub unclassified_faults: u64,
    pub traced_full: u64,
}

#[derive(Serialize)]
pub struct StartRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub backend: &'a str,
    pub reason: &'a str,
    /// Backends `auto` passed over, each "name: why".
    pub rejected: &'a [String],
    pub fork_latency: &'a str,
    /// Whether forks are split into their `dup_mmap` share.
    pub fork_dup_mmap: bool,
    pub cow_latency: &'a str,
    pub page_size: u64,
}

#[derive(Serialize)]
pub struct IntervalRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub backend: &'a str,
    pub elapsed_s: f64,
    pub dropped_events: u64,
    pub processes: &'a [ProcRow],
}

#[derive(Serialize)]
pub struct SummaryRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub backend: &'a str,
    pub elapsed_s: f64,
    pub ended_by: &'a str,
    pub dropped_events: u64,
    pub kernel_totals: KernelTotals,
    pub events_received: Seen,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_exit_code: Option<i32>,
    pub processes: &'a [ProcRow],
    pub histograms: Histograms,
    pub episodes: &'a [Episode],
}

/// `{"type":"episode", ...}`: one fork episode, printed when its child exits.
#[derive(Serialize)]
pub struct EpisodeRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub episode: &'a Episode,
}

pub fn json_line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, copies: u64) -> ProcRow {
        ProcRow {
            pid,
            ppid: 1,
            comm: "worker".into(),
            forks: 1,
            fork_latency_ns: Summary {
                count: 1,
                min: 21_000_000,
                p50: 21_000_000,
                p99: 21_000_000,
                max: 21_000_000,
            },
            cow_copies: copies,
            cow_reuses: 0,
            copied_bytes: copies * 4096,
            cow_latency_ns: Summary::default(),
            zero_fills: 0,
            fork_dup_mmap_ns: Summary {
                count: 1,
                min: 9_000_000,
                p50: 9_000_000,
                p99: 9_000_000,
                max: 9_000_000,
            },
            huge_cow_faults: 0,
            huge_copied_bytes: 0,
            exited: pid == 3,
            exit_status: None,
        }
    }

    #[test]
    fn units() {
        assert_eq!(fmt_ns(0), "-");
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(2_400), "2.4us");
        assert_eq!(fmt_ns(21_300_000), "21.3ms");
        assert_eq!(fmt_ns(1_200_000_000), "1.20s");
        assert_eq!(fmt_bytes(0), "0");
        assert_eq!(fmt_bytes(100), "100B");
        assert_eq!(fmt_bytes(4096), "4.0KiB");
        assert_eq!(fmt_bytes(92_825 * 4096), "362.6MiB");
    }

    #[test]
    fn table_rows_and_truncation() {
        let rows = vec![row(2, 10), row(3, 5), row(4, 1)];
        let t = table(&rows, 2);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("    PID    PPID COMM"));
        assert!(lines[1].contains("worker ") && lines[1].contains("21.0ms") && lines[1].contains("40.0KiB"));
        assert!(lines[2].contains("worker*"), "exited processes are starred: {}", lines[2]);
        assert_eq!(lines[3], "... 1 more processes (--top 0 shows all)");
        assert_eq!(table(&rows, 0).lines().count(), 4);
        assert!(table(&[], 20).contains("no forks"));
    }

    #[test]
    fn json_field_names_are_the_documented_schema() {
        let rows = vec![row(2, 10)];
        let rec = IntervalRecord {
            kind: "interval",
            backend: "tracepoint",
            elapsed_s: 1.0,
            dropped_events: 0,
            processes: &rows,
        };
        let v: serde_json::Value = serde_json::from_str(&json_line(&rec)).unwrap();
        assert_eq!(v["type"], "interval");
        assert_eq!(v["backend"], "tracepoint");
        assert_eq!(v["dropped_events"], 0);
        let p = &v["processes"][0];
        for key in ["pid", "ppid", "comm", "forks", "cow_copies", "cow_reuses", "copied_bytes", "exited"] {
            assert!(!p[key].is_null(), "{key}");
        }
        for key in ["count", "min", "p50", "p99", "max"] {
            assert!(p["fork_latency_ns"][key].is_u64(), "{key}");
            assert!(p["cow_latency_ns"][key].is_u64(), "{key}");
            assert!(p["fork_dup_mmap_ns"][key].is_u64(), "{key}");
        }
        assert_eq!(p["copied_bytes"], 40960);
        assert!(p.get("exit_status").is_none());
    }

    fn episode(child: u32, copied_pages: u64) -> Episode {
        Episode {
            kind: "fork",
            parent: 1,
            parent_comm: "redis-server".into(),
            child,
            child_comm: "redis-server".into(),
            start_ns: child as u64,
            fork_latency_ns: Some(21_000_000),
            child_lifetime_ns: Some(1_000_000_000),
            exec_after_ns: None,
            exit_status: Some(0),
            parent_copies: copied_pages,
            child_copies: 0,
            copied_bytes: copied_pages * 4096,
            peak_copy_bytes_per_s: copied_pages * 4096,
            cow_latency_ns: Summary::default(),
            top_regions: vec![],
        }
    }

    #[test]
    fn episode_list_keeps_the_costliest_in_fork_order() {
        let eps = vec![episode(10, 5), episode(11, 50), episode(12, 1), episode(13, 20)];
        let out = episode_list(&eps, 2);
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines[1], "fork episodes (4):");
        assert!(
            lines[2].contains("-> redis-server[11]") && lines[3].contains("-> redis-server[13]"),
            "{out}"
        );
        assert_eq!(lines[4], "  ... 2 more episodes (--top 0 shows all)");
        assert_eq!(episode_list(&eps, 0).lines().count(), 6);
        assert_eq!(episode_list(&[], 5), "");
    }

    #[test]
    fn episode_record_is_typed_and_flat() {
        let ep = episode(10, 5);
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&EpisodeRecord { kind: "episode", episode: &ep })).unwrap();
        assert_eq!(v["type"], "episode");
        assert_eq!(v["kind"], "fork");
        assert_eq!(v["copied_bytes"], 5 * 4096);
        assert_eq!(v["child"], 10);
    }
}
