//! One process's record: who it is, how it ended, and its figures for the
//! whole run and the current interval. Kept by `aggregate` while the process
//! lives and by `retired` after its exit.

use crate::{
    ending::MemCgroup,
    event::{Replaced, What},
    histogram::Histogram,
};

/// Figures for one process over some span (an interval or the whole run).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub(crate) forks: u64,
    pub(crate) fork_lat: Histogram,
    pub(crate) copies: u64,
    pub(crate) reuses: u64,
    pub(crate) zero_fills: u64,
    /// Write faults that failed (no memory, SIGBUS, ...).
    pub(crate) failed: u64,
    pub(crate) cow_lat: Histogram,
    /// The `dup_mmap` share of each fork (kprobe/fentry backends).
    pub(crate) dup_mmap: Histogram,
    pub(crate) huge_faults: u64,
    pub(crate) huge_bytes: u64,
}

impl Stats {
    pub(crate) fn is_empty(&self) -> bool {
        self.forks == 0
            && self.copies == 0
            && self.reuses == 0
            && self.zero_fills == 0
            && self.failed == 0
            && self.huge_faults == 0
            && self.fork_lat.count() == 0
    }

    /// Counts what an event of this process adds (a spawn is its fork).
    pub(crate) fn add(&mut self, what: &What) {
        match *what {
            What::Spawn { .. } => self.forks += 1,
            What::ForkLatency { latency_ns, dup_mmap_ns, .. } => {
                self.fork_lat.record(latency_ns);
                if let Some(ns) = dup_mmap_ns {
                    self.dup_mmap.record(ns);
                }
            }
            What::Copy(f) => {
                self.copies += 1;
                if f.latency_ns > 0 {
                    self.cow_lat.record_n(f.latency_ns, f.weight);
                }
            }
            What::Reuse(_) => self.reuses += 1,
            What::ZeroFill(_) => self.zero_fills += 1,
            What::Failed(f) => {
                self.failed += 1;
                // The outcome it replaces arrived first (the programs send
                // it first); in an earlier interval, it stays there.
                match f.replaces {
                    Some(Replaced::Copy) => self.copies = self.copies.saturating_sub(1),
                    Some(Replaced::ZeroFill) => self.zero_fills = self.zero_fills.saturating_sub(1),
                    None => {}
                }
            }
            What::HugeCow { copied_bytes, .. } => {
                self.huge_faults += 1;
                self.huge_bytes += copied_bytes;
            }
            What::Exit { .. } | What::Exec => {}
        }
    }

    /// See [`Histogram::shrink_to_fit`].
    pub(crate) fn shrink_to_fit(&mut self) {
        self.fork_lat.shrink_to_fit();
        self.cow_lat.shrink_to_fit();
        self.dup_mmap.shrink_to_fit();
    }

    pub(crate) fn merge(&mut self, o: &Stats) {
        self.forks += o.forks;
        self.fork_lat.merge(&o.fork_lat);
        self.copies += o.copies;
        self.reuses += o.reuses;
        self.zero_fills += o.zero_fills;
        self.failed += o.failed;
        self.cow_lat.merge(&o.cow_lat);
        self.dup_mmap.merge(&o.dup_mmap);
        self.huge_faults += o.huge_faults;
        self.huge_bytes += o.huge_bytes;
    }
}

/// A process's figures for the whole run and for the current interval,
/// always updated together.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub(crate) total: Stats,
    pub(crate) interval: Stats,
}

impl Figures {
    /// Counts `what` for the whole run, and for the current interval when
    /// the run prints `intervals` (else that copy would only hold memory).
    pub(crate) fn add(&mut self, what: &What, intervals: bool) {
        self.total.add(what);
        if intervals {
            self.interval.add(what);
        }
    }

    pub fn merge(&mut self, o: &Figures) {
        self.total.merge(&o.total);
        self.interval.merge(&o.interval);
    }

    pub fn is_empty(&self) -> bool {
        self.total.is_empty() && self.interval.is_empty()
    }

    /// See [`Histogram::shrink_to_fit`].
    pub(crate) fn shrink_to_fit(&mut self) {
        self.total.shrink_to_fit();
        self.interval.shrink_to_fit();
    }
}

#[derive(Clone, Debug)]
pub struct Proc {
    pub(crate) pid: u32,
    pub(crate) ppid: u32,
    pub(crate) comm: String,
    /// Raw wait-status style exit code once the process has exited.
    pub(crate) exit_code: Option<u32>,
    /// The OOM killer chose it (known at its exit).
    pub(crate) oom_killed: bool,
    /// Its memory cgroup, read at its fork.
    pub(crate) memcg: Option<MemCgroup>,
    /// Time of the spawn event, when it was seen.
    pub(crate) start_ns: Option<u64>,
    /// Time of the exit event.
    pub(crate) exit_ns: Option<u64>,
    pub(crate) figures: Figures,
}

impl Proc {
    pub fn new(pid: u32, ppid: u32, comm: String) -> Self {
        Self {
            pid,
            ppid,
            comm,
            exit_code: None,
            oom_killed: false,
            memcg: None,
            start_ns: None,
            exit_ns: None,
            figures: Figures::default(),
        }
    }
}
