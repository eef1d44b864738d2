//! Per-process figures: turns events into [`ProcRow`] snapshots.
//!
//! Pure and synchronous, which keeps it testable without a kernel. Which
//! exited process a late fault outcome belongs to is [`Retired`]'s job.

use serde::Serialize;

use crate::{
    ending::{Ending, MemCgroup},
    event::{Comm, Event, What},
    histogram::{Histogram, Summary},
    process::{Figures, Proc, Stats},
    retired::Retired,
    FastMap,
};

/// Latency histograms over every process of the run.
#[derive(Clone, Debug, Default)]
pub struct RunHistograms {
    pub fork_lat: Histogram,
    pub cow_lat: Histogram,
    pub dup_mmap: Histogram,
}

impl RunHistograms {
    fn add(&mut self, what: &What) {
        match *what {
            What::ForkLatency { latency_ns, dup_mmap_ns, .. } => {
                self.fork_lat.record(latency_ns);
                if let Some(ns) = dup_mmap_ns {
                    self.dup_mmap.record(ns);
                }
            }
            What::Copy(f) if f.latency_ns > 0 => self.cow_lat.record_n(f.latency_ns, f.weight),
            _ => {}
        }
    }
}

/// One row of output, as printed and as serialised to JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcRow {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub forks: u64,
    pub fork_latency_ns: Summary,
    pub cow_copies: u64,
    pub cow_reuses: u64,
    pub copied_bytes: u64,
    pub cow_latency_ns: Summary,
    /// Write faults on never-written memory (the shared zero page): a new
    /// zeroed page, not a copy; not included in `cow_copies`.
    pub zero_fills: u64,
    /// Write faults on present pages that failed (no memory: the memory
    /// cgroup's charge failed; SIGBUS, SIGSEGV): neither copies nor reuses.
    pub cow_failed: u64,
    /// Time each fork spent in `dup_mmap` copying the address space (VMAs
    /// and page tables); count 0 where the backend cannot split forks.
    pub fork_dup_mmap_ns: Summary,
    /// Write faults on huge-page (PMD) mappings, kprobe/fentry backends.
    pub huge_cow_faults: u64,
    /// User memory those allocated (included in `copied_bytes`).
    pub huge_copied_bytes: u64,
    pub exited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// How it ended, once it has exited.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub memcg: Option<MemCgroup>,
}

pub struct Aggregator {
    page_size: u64,
    live: FastMap<u32, Proc>,
    retired: Retired,
    ppid_of: Box<dyn Fn(u32) -> u32>,
    comm_of: Box<dyn Fn(u32) -> Option<String>>,
    histograms: RunHistograms,
    /// Per-interval figures are kept (the run prints intervals).
    intervals: bool,
}

impl Aggregator {
    /// `ppid_of` and `comm_of` fill in the parent and name of processes
    /// first seen mid-life (from /proc in the real tool).
    pub fn new(
        page_size: u64,
        ppid_of: Box<dyn Fn(u32) -> u32>,
        comm_of: Box<dyn Fn(u32) -> Option<String>>,
    ) -> Self {
        Self {
            page_size,
            live: FastMap::default(),
            retired: Retired::new(4096),
            ppid_of,
            comm_of,
            histograms: RunHistograms::default(),
            intervals: true,
        }
    }

    /// Keeps no per-interval figures: a run that prints none (each
    /// process's would be a second copy of its totals, histograms and all,
    /// held for every exited process until the summary).
    pub fn without_intervals(mut self) -> Self {
        self.intervals = false;
        self
    }

    #[cfg(test)]
    pub fn with_max_exited(mut self, n: usize) -> Self {
        self.retired = Retired::new(n.max(1));
        self
    }

    #[cfg(test)]
    pub fn live_processes(&self) -> usize {
        self.live.len()
    }

    pub fn histograms(&self) -> &RunHistograms {
        &self.histograms
    }

    /// The record of process `pid`, created on first sight. `comm` is the
    /// name of thread `tid`; a process is named after its main thread (other
    /// threads have their own names, like Redis's `jemalloc_bg_thd`).
    fn proc_mut(&mut self, pid: u32, tid: u32, comm: &Comm) -> &mut Proc {
        let (ppid_of, comm_of) = (&self.ppid_of, &self.comm_of);
        let main_thread_named = tid == pid && !comm.is_empty();
        let p = self.live.entry(pid).or_insert_with(|| {
            // Fault events carry no comm; other threads' comms are theirs.
            let name = if main_thread_named {
                comm.to_string()
            } else {
                comm_of(pid).unwrap_or_else(|| comm.to_string())
            };
            Proc::new(pid, ppid_of(pid), name)
        });
        // Keep the main thread's newest name: exec renames a process.
        if main_thread_named && !comm.is(&p.comm) {
            p.comm = comm.to_string();
        }
        p
    }

    /// The record a fault event counts for: its process's, or, when that
    /// process has exited since the fault, the exited one's (see
    /// [`Retired::owner_at`]).
    fn fault_proc(&mut self, e: &Event) -> &mut Proc {
        // A live record for the PID that began after the fault belongs to a
        // new process that reused it.
        let live_since = self.live.get(&e.pid).map(|p| p.start_ns);
        if live_since.is_none_or(|start| start.is_some_and(|s| e.ts_ns < s)) {
            if let Some(i) = self.retired.owner_at(e.pid, e.ts_ns) {
                return self.retired.get_mut(i);
            }
        }
        self.proc_mut(e.pid, e.tid, &e.comm)
    }

    pub fn apply(&mut self, e: &Event) {
        self.histograms.add(&e.what);
        let intervals = self.intervals;
        match e.what {
            What::Spawn { child, .. } => {
                self.proc_mut(e.pid, e.tid, &e.comm).figures.add(&e.what, intervals);
                // A live record under the child's PID belongs to an earlier
                // process whose exit we missed: never let the new one
                // inherit its figures.
                if let Some(stale) = self.live.remove(&child) {
                    self.retired.retire(stale);
                }
                let mut p = Proc::new(child, e.pid, e.comm.to_string());
                p.start_ns = Some(e.ts_ns);
                self.live.insert(child, p);
            }
            What::ForkLatency { .. } => self.proc_mut(e.pid, e.tid, &e.comm).figures.add(&e.what, intervals),
            What::Copy(_) | What::Reuse(_) | What::ZeroFill(_) | What::Failed(_) | What::HugeCow { .. } => {
                self.fault_proc(e).figures.add(&e.what, intervals)
            }
            What::Exec => {
                // Renames the process (its main thread's new comm).
                self.proc_mut(e.pid, e.tid, &e.comm);
            }
            What::Exit { status, oom_killed } => {
                // A process that did nothing we saw is remembered as well,
                // in case another thread's outcomes arrive after its exit.
                let mut p =
                    self.live.remove(&e.pid).unwrap_or_else(|| Proc::new(e.pid, 0, e.comm.to_string()));
                p.exit_code = Some(status);
                p.oom_killed = oom_killed;
                p.exit_ns = Some(e.ts_ns);
                self.retired.retire(p);
            }
        }
    }

    fn row(&self, p: &Proc, s: &Stats) -> ProcRow {
        ProcRow {
            pid: p.pid,
            ppid: p.ppid,
            comm: p.comm.clone(),
            forks: s.forks,
            fork_latency_ns: s.fork_lat.summary(),
            cow_copies: s.copies,
            cow_reuses: s.reuses,
            copied_bytes: s.copies * self.page_size + s.huge_bytes,
            cow_latency_ns: s.cow_lat.summary(),
            zero_fills: s.zero_fills,
            cow_failed: s.failed,
            fork_dup_mmap_ns: s.dup_mmap.summary(),
            huge_cow_faults: s.huge_faults,
            huge_copied_bytes: s.huge_bytes,
            exited: p.exit_code.is_some(),
            exit_status: p.exit_code.map(|c| c as i32),
            ending: p.exit_code.map(|c| Ending::new(c, p.oom_killed)),
            memcg: p.memcg.clone(),
        }
    }

    /// Records the memory cgroup `pid` was forked into.
    pub fn set_memcg(&mut self, pid: u32, memcg: MemCgroup) {
        if let Some(p) = self.live.get_mut(&pid) {
            p.memcg = Some(memcg);
        }
    }

    fn all(&self) -> impl Iterator<Item = &Proc> {
        self.live.values().chain(self.retired.exited())
    }

    /// The rows of `span` of every process that has some; processes folded
    /// away by the retired bound appear as one row with PID 0.
    fn rows(&self, span: impl Fn(&Figures) -> &Stats, keep_empty_fold: bool) -> Vec<ProcRow> {
        let mut rows: Vec<_> = self
            .all()
            .filter(|p| !span(&p.figures).is_empty())
            .map(|p| self.row(p, span(&p.figures)))
            .collect();
        if let Some((f, count)) = self.retired.folded() {
            if keep_empty_fold || !span(&f.figures).is_empty() {
                let mut row = self.row(f, span(&f.figures));
                row.comm = format!("[{count} more exited]");
                row.exited |= keep_empty_fold;
                rows.push(row);
            }
        }
        rows.sort_by(|a, b| {
            (b.cow_copies, b.forks, b.cow_reuses)
                .cmp(&(a.cow_copies, a.forks, a.cow_reuses))
                .then(a.pid.cmp(&b.pid))
        });
        rows
    }

    /// Per-process figures for the whole run, most copies first.
    pub fn totals(&self) -> Vec<ProcRow> {
        self.rows(|f| &f.total, true)
    }

    /// Figures since the last call, then starts a new interval.
    pub fn take_interval(&mut self) -> Vec<ProcRow> {
        let rows = self.rows(|f| &f.interval, false);
        for p in self.live.values_mut().chain(self.retired.all_mut()) {
            p.figures.interval = Stats::default();
        }
        // Exited processes are kept for the final summary only.
        rows
    }
}
