//! Output: the per-process table, bcc-style histograms and JSON lines; each
//! record of a run (start, interval, episode, summary) written here in both
//! formats.

use std::{fmt::Write as _, io};

use serde::Serialize;

use crate::{
    aggregate::{ProcRow, RunHistograms},
    counts::{KernelCounters, KernelTotals, Seen},
    ending::Ending,
    episode::Episode,
    fmt::{fmt_bytes, fmt_ns},
    histogram::{Log2Row, Summary},
    sanitize::{for_terminal, width},
    stacks::{Lost, NoFramePointers, Stack, StackReport},
};

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
    let shown = if top == 0 { rows.len() } else { rows.len().min(top) };
    // Names as printed (escaped, exited ones starred); the column is as wide
    // as the widest of them, so an escaped name shifts no other column.
    let comms: Vec<String> = rows[..shown]
        .iter()
        .map(|r| {
            let comm = for_terminal(&r.comm);
            if r.exited {
                format!("{comm}*")
            } else {
                comm.into_owned()
            }
        })
        .collect();
    let w = comms.iter().map(|c| width(c)).max().unwrap_or(0).max(16);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:>7} {:<w$} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>8} {:>8} {:>7} {:>8}",
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
        "FAILED",
        "COPIED",
        "COW_P50",
        "COW_P99",
        "ZEROS",
        "ENDED"
    );
    for (r, comm) in rows[..shown].iter().zip(&comms) {
        let _ = writeln!(
            out,
            "{:>7} {:>7} {:<w$} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>8} {:>8} {:>7} {:>8}",
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
            r.cow_failed,
            fmt_bytes(r.copied_bytes),
            lat(&r.cow_latency_ns, |s| s.p50),
            lat(&r.cow_latency_ns, |s| s.p99),
            r.zero_fills,
            r.ending.as_ref().map_or_else(|| "-".into(), |e| e.short()),
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

/// An episode as one readable line.
pub fn episode_line(ep: &Episode) -> String {
    let mut s = format!(
        "{} {}[{}] -> {}[{}]: ",
        ep.kind,
        for_terminal(&ep.parent_comm),
        ep.parent,
        for_terminal(&ep.child_comm),
        ep.child
    );
    s += &match ep.fork_latency_ns {
        Some(ns) => format!("fork {}", fmt_ns(ns)),
        None => "fork -".into(),
    };
    if let Some(ns) = ep.exec_after_ns {
        s += &format!(", exec after {}", fmt_ns(ns.max(1)));
    }
    let copied = format!(
        "{} (parent {} + child {} pages)",
        fmt_bytes(ep.copied_bytes),
        ep.parent_copies,
        ep.child_copies
    );
    s += &match (ep.child_lifetime_ns, &ep.ending) {
        // The incident a Redis user dreads: the BGSAVE child's copies
        // outgrew the memory limit.
        (Some(ns), Some(end)) if end.oom_killed => format!(
            ", child lived {}, {} after copying {copied}",
            fmt_ns(ns.max(1)),
            end.describe(ep.memcg.as_ref())
        ),
        (Some(ns), Some(end)) if end.exit_code != Some(0) => {
            format!(", child lived {}, {}, copied {copied}", fmt_ns(ns.max(1)), end.describe(None))
        }
        (Some(ns), _) => format!(", child lived {}, copied {copied}", fmt_ns(ns.max(1))),
        (None, _) if ep.child_exit_unseen => format!(", child exited (exit not traced), copied {copied}"),
        (None, _) => format!(", child still running at the end, copied {copied}"),
    };
    if ep.parent_oom_killed {
        // 9: the wait status of SIGKILL, what the OOM killer sends.
        let oom = Ending::new(9, true);
        s += &format!(", parent {} while the child lived", oom.describe(ep.memcg.as_ref()));
    }
    if ep.cow_failed > 0 {
        s += &format!(", {} write faults failed", ep.cow_failed);
    }
    if ep.copied_bytes > 0 {
        s += &format!(
            ", peak {}/s, CoW p50 {} p99 {}",
            fmt_bytes(ep.peak_copy_bytes_per_s),
            fmt_ns(ep.cow_latency_ns.p50),
            fmt_ns(ep.cow_latency_ns.p99)
        );
    }
    if !ep.top_regions.is_empty() {
        let top: Vec<_> = ep
            .top_regions
            .iter()
            .map(|r| format!("{} {}", for_terminal(&r.region), fmt_bytes(r.bytes)))
            .collect();
        s += &format!("; top regions: {}", top.join(", "));
    }
    s += &attribution_lines(ep);
    s
}

/// A module as shown: a file's base name, a region's own name.
fn module_label(module: &str) -> String {
    let base = if module.starts_with('/') { module.rsplit('/').next().unwrap_or(module) } else { module };
    for_terminal(base).into_owned()
}

fn pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// The episode's writers and written data, one per line under it.
fn attribution_lines(ep: &Episode) -> String {
    let mut s = String::new();
    for w in &ep.top_writers {
        let what = match (&w.function, w.module_offset) {
            (Some(f), _) => format!("{} ({})", for_terminal(f), module_label(&w.module)),
            (None, Some(off)) => format!("{}+{off:#x}", module_label(&w.module)),
            (None, None) => module_label(&w.module),
        };
        let source = w.source.as_deref().map(|l| format!(" at {}", for_terminal(l))).unwrap_or_default();
        let stripped = if w.stripped && w.function.is_none() { " [stripped]" } else { "" };
        s += &format!("\n    writer {what}{source}{stripped}: {} pages ({})", w.pages, pct(w.share));
    }
    for t in &ep.top_data {
        let what = match &t.object {
            Some(o) => {
                format!("{} ({})", for_terminal(o), module_label(t.module.as_ref().unwrap_or(&t.region)))
            }
            None => module_label(&t.region),
        };
        s += &format!("\n    data {what}: {} pages ({})", t.pages, pct(t.share));
    }
    s
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
        let _ = writeln!(out, "  {}", episode_line(e));
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

#[derive(Serialize)]
pub struct StartRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub backend: &'a str,
    pub reason: &'a str,
    /// Backends `auto` passed over, each "name: why".
    pub rejected: &'a [String],
    pub fork_latency: &'a str,
    /// Whether forks are split into their address-space copy share.
    pub fork_dup_mmap: bool,
    /// The kernel function that share is the time inside (`dup_mmap`, or
    /// `copy_page_range` where `dup_mmap` is inlined), or null.
    pub fork_share_function: Option<&'a str>,
    pub cow_latency: &'a str,
    pub page_size: u64,
    /// The traced PIDs (the launched command's in launch mode); `null`
    /// when tracing the whole system.
    pub pids: Option<&'a [u32]>,
    /// Whether their descendants are followed.
    pub follow: bool,
}

#[derive(Serialize)]
pub struct IntervalRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub backend: &'a str,
    pub elapsed_s: f64,
    /// Local wall-clock time, `HH:MM:SS`, with `-T`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<&'a str>,
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
    /// `CLOCK_MONOTONIC` ns at the cut-off: nothing later is counted.
    pub cut_off_ns: u64,
    /// Write faults still waiting for their outcome at the cut-off:
    /// counted neither as copies nor as reuses.
    pub faults_in_flight_at_end: u64,
    pub dropped_events: u64,
    pub kernel_totals: KernelTotals,
    pub events_received: Seen,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_exit_code: Option<i32>,
    /// The signal that killed the launched command (`SIGTERM`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_signal: Option<String>,
    /// cow-trace sent the command that signal when the run ended.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub command_ended_by_cow_trace: bool,
    pub processes: &'a [ProcRow],
    pub histograms: Histograms,
    pub episodes: &'a [Episode],
    /// Every episode of the run, also those not listed (below the
    /// whole-system threshold, or beyond the bound on those kept).
    pub episodes_total: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stacks: Option<StacksRecord<'a>>,
}

/// `{"type":"episode", ...}`: one fork episode, printed when its child exits.
#[derive(Serialize)]
pub struct EpisodeRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub episode: &'a Episode,
}

/// How records are written: JSON lines, or text with its options.
#[derive(Clone, Copy, Debug)]
pub enum Format {
    Json,
    Text {
        /// Rows and episodes shown (0: all).
        top: usize,
        /// Histogram unit: nanoseconds per unit, and its label.
        divisor: u64,
        label: &'static str,
    },
}

/// What the run's header says.
pub struct Start<'a> {
    pub backend: &'a str,
    pub reason: &'a str,
    pub rejected: &'a [String],
    pub fork_latency_means: &'a str,
    pub cow_latency_means: &'a str,
    /// The function that carries the fork's address-space copy share.
    pub fork_share: Option<&'a str>,
    pub page_size: u64,
    /// What is traced, as the text header names it.
    pub tracing: &'a str,
    /// See [`StartRecord::pids`].
    pub pids: Option<&'a [u32]>,
    pub follow: bool,
    /// Whether the run ends by itself (`-d`): the banner then does not
    /// ask for Ctrl-C.
    pub timed: bool,
}

pub fn write_start(out: &mut impl io::Write, s: &Start, format: Format) -> io::Result<()> {
    match format {
        Format::Json => {
            let rec = StartRecord {
                kind: "start",
                backend: s.backend,
                reason: s.reason,
                rejected: s.rejected,
                fork_latency: s.fork_latency_means,
                fork_dup_mmap: s.fork_share.is_some(),
                fork_share_function: s.fork_share,
                cow_latency: s.cow_latency_means,
                page_size: s.page_size,
                pids: s.pids,
                follow: s.follow,
            };
            writeln!(out, "{}", json_line(&rec))?;
        }
        Format::Text { .. } => {
            writeln!(out, "cow-trace: backend {}: {}", s.backend, s.reason)?;
            let share = s.fork_share.map(|f| format!(" (DUPMM: its {f} share)")).unwrap_or_default();
            writeln!(
                out,
                "cow-trace: fork latency = {}{share}; CoW latency = {}",
                s.fork_latency_means, s.cow_latency_means
            )?;
            if s.fork_share.is_none() && s.backend != "tracepoint" {
                writeln!(
                    out,
                    "cow-trace: no address-space copy share (DUPMM) on this kernel: dup_mmap and copy_page_range are both inlined"
                )?;
            }
            let end = if s.timed { "" } else { "; Ctrl-C to end" };
            writeln!(out, "cow-trace: tracing {}{end}\n", s.tracing)?;
        }
    }
    out.flush()
}

/// Episodes as they finish.
pub fn write_episodes(out: &mut impl io::Write, episodes: &[Episode], format: Format) -> io::Result<()> {
    for ep in episodes {
        match format {
            Format::Json => writeln!(out, "{}", json_line(&EpisodeRecord { kind: "episode", episode: ep }))?,
            Format::Text { .. } => writeln!(out, "episode: {}", episode_line(ep))?,
        }
    }
    out.flush()
}

pub fn write_interval(
    out: &mut impl io::Write,
    backend: &str,
    elapsed_s: f64,
    dropped: u64,
    rows: &[ProcRow],
    format: Format,
    time: Option<&str>,
) -> io::Result<()> {
    match format {
        Format::Json => {
            let rec = IntervalRecord {
                kind: "interval",
                backend,
                elapsed_s,
                time,
                dropped_events: dropped,
                processes: rows,
            };
            writeln!(out, "{}", json_line(&rec))?;
        }
        Format::Text { top, .. } => {
            let time = time.map(|t| format!("{t} ")).unwrap_or_default();
            writeln!(out, "{time}[{elapsed_s:.0}s] dropped events: {dropped}")?;
            write!(out, "{}", table(rows, top))?;
            writeln!(out)?;
        }
    }
    out.flush()
}

/// `-c/--comm`: the report limited to processes of one name. Applied to
/// what is printed, not in the kernel: names change after the fork (Redis
/// renames its child, exec renames it), and the episodes and the run's end
/// need every traced process's events. The kernel totals count them all.
#[derive(Clone, Debug, Default)]
pub struct CommFilter(pub Option<String>);

impl CommFilter {
    pub fn rows(&self, rows: Vec<ProcRow>) -> Vec<ProcRow> {
        match &self.0 {
            Some(c) => rows.into_iter().filter(|r| &r.comm == c).collect(),
            None => rows,
        }
    }

    /// Episodes whose parent or child has the name.
    pub fn episodes(&self, eps: Vec<Episode>) -> Vec<Episode> {
        match &self.0 {
            Some(c) => eps.into_iter().filter(|e| &e.parent_comm == c || &e.child_comm == c).collect(),
            None => eps,
        }
    }
}

/// How a launched command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandEnd {
    /// The shell convention: exit status, or 128 + signal number.
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// cow-trace ended it, at the end of a run ended by `-d` or a signal.
    pub ended_by_cow_trace: bool,
}

impl CommandEnd {
    /// `exited with status 3`, `killed by SIGTERM (sent by cow-trace ...)`.
    pub fn describe(&self) -> String {
        let how = match self.signal {
            Some(sig) => format!("killed by {}", crate::fmt::signal_name(sig)),
            None => format!("exited with status {}", self.exit_code),
        };
        match self.ended_by_cow_trace {
            true => format!("{how} (ended by cow-trace at the end of the run)"),
            false => how,
        }
    }
}

/// Everything the final summary reports.
pub struct RunSummary<'a> {
    pub backend: &'a str,
    pub fork_latency_means: &'a str,
    pub cow_latency_means: &'a str,
    pub elapsed_s: f64,
    pub ended_by: &'a str,
    pub cut_off_ns: u64,
    pub faults_in_flight_at_end: u64,
    pub kernel: KernelCounters,
    pub seen: Seen,
    pub command: Option<CommandEnd>,
    pub processes: &'a [ProcRow],
    pub histograms: &'a RunHistograms,
    pub episodes: &'a [Episode],
    pub episodes_total: u64,
    /// `--stacks`: the copies' stacks, named.
    pub stacks: Option<&'a StackReport>,
    /// Stacks listed (`--top`; 0: all).
    pub stacks_top: usize,
}

/// `--stacks` in the JSON summary: the `top` stacks (all with 0), and
/// what is known of those missing.
#[derive(Serialize)]
pub struct StacksRecord<'a> {
    /// Copies counted by stack.
    pub copies: u64,
    /// Distinct (process name, stack) pairs.
    pub distinct: usize,
    pub lost: Lost,
    pub no_frame_pointers: &'a [NoFramePointers],
    /// Process images whose frames could not be placed (see
    /// `StackReport::layouts_missing`).
    pub layouts_missing: u64,
    pub stacks: &'a [Stack],
}

impl<'a> StacksRecord<'a> {
    pub fn new(r: &'a StackReport, top: usize) -> Self {
        let n = if top == 0 { r.stacks.len() } else { top.min(r.stacks.len()) };
        Self {
            copies: r.copies,
            distinct: r.stacks.len(),
            lost: r.lost,
            no_frame_pointers: &r.no_frame_pointers,
            layouts_missing: r.layouts_missing,
            stacks: &r.stacks[..n],
        }
    }
}

/// The text summary's stacks: the `top` with most copies, one folded line
/// each (names escaped as in the folded file).
fn stack_lines(r: &StackReport, top: usize) -> String {
    let n = if top == 0 { r.stacks.len() } else { top.min(r.stacks.len()) };
    let mut s = format!("\nCoW stacks ({n} of {} distinct, {} copies):\n", r.stacks.len(), r.copies);
    for st in &r.stacks[..n] {
        let mut line = crate::stacks::folded_frame(&st.comm);
        for f in &st.frames {
            line.push(';');
            line.push_str(&crate::stacks::folded_frame(f));
        }
        s += &format!("{:>9}  {line}\n", st.copies);
    }
    if r.lost.total() > 0 {
        let l = r.lost;
        s += &format!(
            "stacks lost: {} copies ({} map collisions, {} walks failed, {} not taken, {} not counted: count map full)\n",
            l.total(),
            l.collision,
            l.walk_failed,
            l.not_taken,
            l.counts_full
        );
    }
    s
}

pub fn write_summary(out: &mut impl io::Write, s: &RunSummary, format: Format) -> io::Result<()> {
    let (top, divisor, label) = match format {
        Format::Json => {
            let rec = SummaryRecord {
                kind: "summary",
                backend: s.backend,
                elapsed_s: s.elapsed_s,
                ended_by: s.ended_by,
                cut_off_ns: s.cut_off_ns,
                faults_in_flight_at_end: s.faults_in_flight_at_end,
                dropped_events: s.kernel.dropped,
                kernel_totals: s.kernel.totals,
                events_received: s.seen,
                command_exit_code: s.command.map(|c| c.exit_code),
                command_signal: s.command.and_then(|c| c.signal).map(crate::fmt::signal_name),
                command_ended_by_cow_trace: s.command.is_some_and(|c| c.ended_by_cow_trace),
                processes: s.processes,
                histograms: Histograms {
                    fork_latency_ns: s.histograms.fork_lat.to_log2(1).nonzero_rows(),
                    cow_latency_ns: s.histograms.cow_lat.to_log2(1).nonzero_rows(),
                    fork_dup_mmap_ns: s.histograms.dup_mmap.to_log2(1).nonzero_rows(),
                },
                episodes: s.episodes,
                episodes_total: s.episodes_total,
                stacks: s.stacks.map(|r| StacksRecord::new(r, s.stacks_top)),
            };
            writeln!(out, "{}", json_line(&rec))?;
            return out.flush();
        }
        Format::Text { top, divisor, label } => (top, divisor, label),
    };
    writeln!(out, "=== summary: {:.1}s, ended by {} ===", s.elapsed_s, s.ended_by)?;
    if s.faults_in_flight_at_end > 0 {
        writeln!(
            out,
            "{} write faults were in flight at the end (counted neither as copies nor as reuses)",
            s.faults_in_flight_at_end
        )?;
    }
    write!(out, "{}", table(s.processes, top))?;
    write!(out, "{}", episode_list(s.episodes, top))?;
    if let Some(r) = s.stacks {
        write!(out, "{}", stack_lines(r, top))?;
    }
    let h = s.histograms;
    let histograms = [
        (&h.fork_lat, format!("fork latency ({})", s.fork_latency_means)),
        (&h.dup_mmap, "of which dup_mmap (copying the address space: VMAs and page tables)".to_string()),
        (&h.cow_lat, format!("CoW latency ({})", s.cow_latency_means)),
    ];
    for (hist, title) in histograms {
        if hist.count() > 0 {
            writeln!(out, "\n{title}:")?;
            write!(out, "{}", hist.to_log2(divisor).render(label))?;
        }
    }
    let t = &s.kernel.totals.events;
    writeln!(
        out,
        "\nkernel totals: {} forks, {} CoW copies, {} reuses, {} zero-fills, {} failed, {} huge-page faults; dropped events: {}",
        t.spawns, t.cow_copies, t.cow_reuses, t.zero_fills, t.cow_failed, t.huge_cows, s.kernel.dropped
    )?;
    out.flush()
}

pub fn json_line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_bounded_by_top_named_as_documented_and_escaped_in_text() {
        use crate::stacks::{Lost, NoFramePointers, Stack, StackReport};
        let st = |comm: &str, f: &str, copies| Stack {
            comm: comm.into(),
            frames: vec!["main".into(), f.into()],
            copies,
        };
        let r = StackReport {
            copies: 10,
            stacks: vec![st("evil;\x1b", "write_big", 7), st("p", "write_small", 3)],
            lost: Lost { collision: 1, ..Lost::default() },
            no_frame_pointers: vec![NoFramePointers {
                module: "/lib/libc.so.6".into(),
                functions: vec!["memcpy".into()],
            }],
            layouts_missing: 0,
        };
        let v: serde_json::Value = serde_json::to_value(StacksRecord::new(&r, 1)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["copies", "distinct", "layouts_missing", "lost", "no_frame_pointers", "stacks"]);
        assert_eq!((v["copies"].as_u64(), v["distinct"].as_u64()), (Some(10), Some(2)));
        assert_eq!(v["stacks"].as_array().unwrap().len(), 1, "--top 1");
        // JSON: the name exactly; root first.
        assert_eq!(v["stacks"][0]["comm"], "evil;\x1b");
        assert_eq!(v["stacks"][0]["frames"][0], "main");
        let lost: Vec<&str> = v["lost"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(lost, ["collision", "counts_full", "not_taken", "walk_failed"]);
        // Text: escaped, one line per stack, the loss said.
        let text = stack_lines(&r, 0);
        assert!(text.contains("        7  evil\\x3b\\x1b;main;write_big\n"), "{text}");
        assert!(!text.contains('\x1b'));
        assert!(text.contains("stacks lost: 1 copies (1 map collisions"), "{text}");
    }
    use crate::{ending::MemCgroup, episode::RegionBytes};

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
            cow_failed: 0,
            huge_cow_faults: 0,
            huge_copied_bytes: 0,
            exited: pid == 3,
            exit_status: None,
            ending: None,
            memcg: None,
        }
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
    fn hostile_names_cannot_break_a_row_or_reach_the_terminal() {
        let name = "\x1b[31mEV\nIL\x07";
        let mut rows = vec![row(2, 10), row(3, 5)];
        rows[0].comm = name.into();
        rows[1].comm = "\u{202e}evil".into();
        let t = table(&rows, 0);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let columns = lines[0].split_whitespace().count();
        for l in &lines {
            assert_eq!(l.split_whitespace().count(), columns, "{l:?}");
            assert!(!l.chars().any(char::is_control), "{l:?}");
        }
        assert!(lines[1].contains(" \\x1b[31mEV\\nIL\\x07 "), "{}", lines[1]);
        assert!(lines[2].contains(" \\u{202e}evil* "), "{}", lines[2]);
        // Every column after COMM starts where the header's does.
        let forks_end = lines[0].find("FORKS").unwrap() + "FORKS".len();
        for l in &lines[1..] {
            assert_eq!(l.as_bytes()[forks_end - 1], b'1', "{l:?}");
            assert_eq!(l.as_bytes()[forks_end], b' ', "{l:?}");
        }
        let mut ep = episode(10, 5);
        ep.child_comm = name.into();
        ep.top_regions = vec![RegionBytes { region: format!("/tmp/{name} (deleted)").into(), bytes: 4096 }];
        let line = episode_line(&ep);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("-> \\x1b[31mEV\\nIL\\x07[10]"), "{line}");
        assert!(line.contains("/tmp/\\x1b[31mEV\\nIL\\x07 (deleted) 4.0KiB"), "{line}");
        // JSON keeps the exact name.
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&EpisodeRecord { kind: "episode", episode: &ep })).unwrap();
        assert_eq!(v["child_comm"], name);
    }

    #[test]
    fn json_field_names_are_the_documented_schema() {
        let rows = vec![row(2, 10)];
        let rec = IntervalRecord {
            kind: "interval",
            backend: "tracepoint",
            elapsed_s: 1.0,
            time: None,
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
            child_exit_unseen: false,
            exec_after_ns: None,
            exit_status: Some(0),
            ending: Some(Ending::new(0, false)),
            memcg: None,
            parent_oom_killed: false,
            parent_copies: copied_pages,
            child_copies: 0,
            copied_bytes: copied_pages * 4096,
            cow_failed: 0,
            peak_copy_bytes_per_s: copied_pages * 4096,
            cow_latency_ns: Summary::default(),
            top_regions: vec![],
            top_writers: vec![],
            top_data: vec![],
        }
    }

    #[test]
    fn an_oom_killed_child_reads_as_such() {
        let mut ep = episode(10, 0);
        (ep.child_copies, ep.copied_bytes, ep.cow_failed) = (13_745, 13_745 * 4096, 1);
        ep.ending = Some(Ending::new(9, true));
        ep.memcg = Some(MemCgroup { path: "/x".into(), limit_bytes: Some(150 << 20) });
        let line = episode_line(&ep);
        assert!(
            line.contains(
                "child lived 1.00s, killed by the OOM killer (memory cgroup /x, limit 150.0MiB) after copying \
                 53.7MiB (parent 0 + child 13745 pages), 1 write faults failed"
            ),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&json_line(&ep)).unwrap();
        assert_eq!((v["oom_killed"].as_bool(), v["exit_signal"].as_str()), (Some(true), Some("SIGKILL")));
        assert_eq!(
            (v["memory_cgroup"].as_str(), v["memory_limit_bytes"].as_u64()),
            (Some("/x"), Some(150 << 20))
        );
        assert_eq!(v["cow_failed"], 1);
        ep.ending = Some(Ending::new(3 << 8, false));
        assert!(episode_line(&ep).contains("child lived 1.00s, exited with status 3, copied"));
        ep.ending = Some(Ending::new(0, false));
        assert!(episode_line(&ep).contains("child lived 1.00s, copied 53.7MiB"));
        ep.parent_oom_killed = true;
        assert!(
            episode_line(&ep).contains(
                "parent killed by the OOM killer (memory cgroup /x, limit 150.0MiB) while the child lived"
            ),
            "{}",
            episode_line(&ep)
        );
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

    #[test]
    fn episode_lines_name_writers_and_data_safely() {
        use crate::attribution::{Target, Writer};
        let mut ep = episode(10, 4);
        let w = |function: Option<&str>, module: &str, off: Option<u64>, stripped, pages| Writer {
            function: function.map(Into::into),
            module: module.into(),
            module_offset: off,
            source: function.map(|_| "w.c:7".into()),
            stripped,
            pages,
            share: pages as f64 / 4.0,
        };
        ep.top_writers = vec![
            w(Some("write_big"), "/tmp/x/cow\x1b[2Jattr", None, false, 3),
            w(None, "/usr/lib/libc.so.6", Some(0x9a1b0), true, 1),
        ];
        ep.top_data = vec![Target {
            object: Some("big".into()),
            module: Some("/tmp/x/a".into()),
            region: "[anon 1000]".into(),
            pages: 4,
            share: 1.0,
        }];
        let line = episode_line(&ep);
        let lines: Vec<_> = line.lines().collect();
        assert_eq!(lines[1], "    writer write_big (cow\\x1b[2Jattr) at w.c:7: 3 pages (75.0%)");
        assert_eq!(lines[2], "    writer libc.so.6+0x9a1b0 [stripped]: 1 pages (25.0%)");
        assert_eq!(lines[3], "    data big (a): 4 pages (100.0%)");
        assert!(!line.contains('\x1b'));
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&EpisodeRecord { kind: "episode", episode: &ep })).unwrap();
        assert_eq!(v["top_writers"][0]["module"], "/tmp/x/cow\x1b[2Jattr");
        assert_eq!(v["top_writers"][1]["module_offset"], 0x9a1b0);
        assert_eq!(v["top_data"][0]["object"], "big");
    }

    #[test]
    fn the_comm_filter_keeps_that_name_only() {
        let mut other = row(3, 1);
        other.comm = "bash".into();
        let rows = vec![row(2, 10), other];
        assert_eq!(CommFilter(None).rows(rows.clone()).len(), 2);
        let kept = CommFilter(Some("worker".into())).rows(rows);
        assert_eq!(kept.iter().map(|r| r.pid).collect::<Vec<_>>(), [2]);
        let mut renamed = episode(11, 1);
        renamed.parent_comm = "bash".into();
        renamed.child_comm = "redis-rdb-bgsave".into();
        let eps = vec![episode(10, 5), renamed];
        let by_child = CommFilter(Some("redis-rdb-bgsave".into())).episodes(eps.clone());
        assert_eq!(by_child.iter().map(|e| e.child).collect::<Vec<_>>(), [11]);
        assert_eq!(CommFilter(Some("redis-server".into())).episodes(eps).len(), 1);
    }
}
