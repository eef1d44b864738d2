//! Aggregation: turns the event stream into per-process figures.
//!
//! Pure and synchronous: it is fed decoded [`Event`]s and asked for
//! [`ProcRow`] snapshots, which keeps it testable without a kernel.

use std::collections::{HashMap, HashSet, VecDeque};

use cow_trace_common::{Event, EventKind, FLAG_DUP_MMAP};
use serde::Serialize;

use crate::{
    episode::Episodes,
    histogram::{Histogram, Summary},
};

/// Figures for one process over some span (an interval or the whole run).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub forks: u64,
    pub fork_lat: Histogram,
    pub copies: u64,
    pub reuses: u64,
    pub zero_fills: u64,
    pub cow_lat: Histogram,
    /// The `dup_mmap` share of each fork (kprobe/fentry backends).
    pub dup_mmap: Histogram,
    pub huge_faults: u64,
    pub huge_bytes: u64,
}

impl Stats {
    fn is_empty(&self) -> bool {
        self.forks == 0
            && self.copies == 0
            && self.reuses == 0
            && self.zero_fills == 0
            && self.huge_faults == 0
            && self.fork_lat.count() == 0
    }

    fn merge(&mut self, o: &Stats) {
        self.forks += o.forks;
        self.fork_lat.merge(&o.fork_lat);
        self.copies += o.copies;
        self.reuses += o.reuses;
        self.zero_fills += o.zero_fills;
        self.cow_lat.merge(&o.cow_lat);
        self.dup_mmap.merge(&o.dup_mmap);
        self.huge_faults += o.huge_faults;
        self.huge_bytes += o.huge_bytes;
    }
}

#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    /// Raw wait-status style exit code once the process has exited.
    pub exit_code: Option<u32>,
    /// Time of the spawn event, when it was seen.
    pub start_ns: Option<u64>,
    /// Time of the exit event.
    pub exit_ns: Option<u64>,
    pub total: Stats,
    pub interval: Stats,
}

impl Proc {
    fn new(pid: u32, ppid: u32, comm: String) -> Self {
        Self {
            pid,
            ppid,
            comm,
            exit_code: None,
            start_ns: None,
            exit_ns: None,
            total: Stats::default(),
            interval: Stats::default(),
        }
    }
}

/// How many of the most recently exited processes a late fault event is
/// matched against.
const LATE_FAULT_LOOKBACK: usize = 256;

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
}

/// How many copies a copy event's latency stands for in a histogram: more
/// than one for a timed sample of a burst (see `EventKind::CowCopy`).
pub fn latency_weight(e: &Event) -> u64 {
    (e.other as u64).max(1)
}

/// Decodes the comm the kernel wrote (NUL-padded, not always UTF-8).
pub fn comm_str(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Events per kind. The kernel counts them as it classifies them (whether
/// or not the ring buffer had room); userspace counts what it received.
/// The two are compared to tell how much was lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    pub spawns: u64,
    pub fork_latencies: u64,
    pub cow_copies: u64,
    pub cow_reuses: u64,
    pub zero_fills: u64,
    pub huge_cows: u64,
    pub exits: u64,
    pub execs: u64,
}

impl EventCounts {
    fn slot(&mut self, kind: EventKind) -> &mut u64 {
        match kind {
            EventKind::Spawn => &mut self.spawns,
            EventKind::ForkLatency => &mut self.fork_latencies,
            EventKind::CowCopy => &mut self.cow_copies,
            EventKind::CowReuse => &mut self.cow_reuses,
            EventKind::ZeroFill => &mut self.zero_fills,
            EventKind::Exit => &mut self.exits,
            EventKind::Exec => &mut self.execs,
            EventKind::HugeCow => &mut self.huge_cows,
        }
    }

    pub fn count(&mut self, kind: EventKind) {
        *self.slot(kind) += 1;
    }

    /// From the kernel's counter array, where each kind counts at the index
    /// of its value.
    pub fn from_kernel(counters: &[u64]) -> Self {
        let mut c = Self::default();
        for (i, &n) in counters.iter().enumerate() {
            if let Some(kind) = EventKind::from_u32(i as u32) {
                *c.slot(kind) = n;
            }
        }
        c
    }
}

/// Events received, per kind, as userspace saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Seen {
    #[serde(flatten)]
    pub events: EventCounts,
    /// Records that were not an event this version knows.
    pub malformed: u64,
}

pub struct Aggregator {
    page_size: u64,
    live: HashMap<u32, Proc>,
    /// Exited processes that did something, oldest first.
    exited: VecDeque<Proc>,
    /// The last `LATE_FAULT_LOOKBACK` that exited having done nothing, in
    /// case a late fault event of theirs comes (see `fault_proc`).
    exited_idle: VecDeque<Proc>,
    /// Bound on `exited`: older ones are folded into `folded`.
    max_exited: usize,
    folded: Option<Proc>,
    folded_count: u64,
    /// Processes whose end ends the run (`None`: whole system).
    targets: Option<HashSet<u32>>,
    /// Targets found dead by the last [`Aggregator::sweep_targets`].
    suspects: HashSet<u32>,
    follow: bool,
    ppid_of: Box<dyn Fn(u32) -> u32>,
    comm_of: Box<dyn Fn(u32) -> Option<String>>,
    pub fork_lat_all: Histogram,
    pub cow_lat_all: Histogram,
    pub dup_mmap_all: Histogram,
    pub seen: Seen,
    /// Fork episodes, fed the same events when enabled.
    pub episodes: Option<Episodes>,
}

impl Aggregator {
    /// `targets`: the traced PIDs whose end (with their followed
    /// descendants) ends the run; `None` for whole-system tracing.
    /// `ppid_of` and `comm_of` fill in the parent and name of processes
    /// first seen mid-life (from /proc in the real tool).
    pub fn new(
        page_size: u64,
        targets: Option<HashSet<u32>>,
        follow: bool,
        ppid_of: Box<dyn Fn(u32) -> u32>,
        comm_of: Box<dyn Fn(u32) -> Option<String>>,
    ) -> Self {
        Self {
            page_size,
            live: HashMap::new(),
            exited: VecDeque::new(),
            exited_idle: VecDeque::new(),
            max_exited: 4096,
            folded: None,
            folded_count: 0,
            targets,
            suspects: HashSet::new(),
            follow,
            ppid_of,
            comm_of,
            fork_lat_all: Histogram::default(),
            cow_lat_all: Histogram::default(),
            dup_mmap_all: Histogram::default(),
            seen: Seen::default(),
            episodes: None,
        }
    }

    pub fn with_episodes(mut self, episodes: Episodes) -> Self {
        self.episodes = Some(episodes);
        self
    }

    #[cfg(test)]
    pub fn with_max_exited(mut self, n: usize) -> Self {
        self.max_exited = n.max(1);
        self
    }

    /// True once every traced target (and followed child) has exited.
    pub fn targets_gone(&self) -> bool {
        self.targets.as_ref().is_some_and(HashSet::is_empty)
    }

    /// Forgets targets that `alive` says are gone on two calls in a row,
    /// and returns how many it forgot. A target's exit normally arrives as
    /// an event; this is for the one whose exit event was dropped from a
    /// full ring buffer, which would otherwise keep the run going forever.
    /// Waiting for a second call gives any fork or exit event still in the
    /// ring time to be drained first, so a child forked just before its
    /// parent died is followed rather than missed.
    pub fn sweep_targets(&mut self, alive: impl Fn(u32) -> bool) -> usize {
        let Some(targets) = self.targets.as_mut() else { return 0 };
        let dead: HashSet<u32> = targets.iter().copied().filter(|&p| !alive(p)).collect();
        let gone: Vec<u32> = dead.intersection(&self.suspects).copied().collect();
        for pid in &gone {
            targets.remove(pid);
        }
        // A PID just forgotten starts afresh if it comes back (reused by a
        // followed child): two looks again.
        self.suspects = dead.difference(&gone.iter().copied().collect()).copied().collect();
        gone.len()
    }

    #[cfg(test)]
    pub fn live_processes(&self) -> usize {
        self.live.len()
    }

    /// The record of process `pid`, created on first sight. `comm` is the
    /// name of thread `tid`; a process is named after its main thread (other
    /// threads have their own names, like Redis's `jemalloc_bg_thd`).
    fn proc_mut(&mut self, pid: u32, tid: u32, comm: &[u8; 16]) -> &mut Proc {
        let (ppid_of, comm_of) = (&self.ppid_of, &self.comm_of);
        let p = self.live.entry(pid).or_insert_with(|| {
            // Fault events carry no comm; other threads' comms are theirs.
            let name = if tid == pid && comm[0] != 0 {
                comm_str(comm)
            } else {
                comm_of(pid).unwrap_or_else(|| comm_str(comm))
            };
            Proc::new(pid, ppid_of(pid), name)
        });
        // Keep the main thread's newest name: exec renames a process.
        if tid == pid
            && comm[0] != 0
            && p.comm.as_bytes() != &comm[..comm.iter().position(|&b| b == 0).unwrap_or(16)]
        {
            p.comm = comm_str(comm);
        }
        p
    }

    /// The record a fault event counts for: its process's, or, when that
    /// process has exited since the fault, the exited one's. A process's
    /// exit event comes from its last thread; another thread's outcomes,
    /// batched on its own CPU, can arrive after it (see the BPF side), and
    /// must not open a new record for a dead PID.
    fn fault_proc(&mut self, e: &Event) -> &mut Proc {
        // A live record for the PID that began after the fault belongs to a
        // new process that reused it.
        let live_since = self.live.get(&e.pid).map(|p| p.start_ns);
        if live_since.is_none_or(|start| start.is_some_and(|s| e.ts_ns < s)) {
            // The process that held the PID at the fault's time: of those
            // that exited since, the first to exit.
            let exited_since = |p: &Proc| p.pid == e.pid && p.exit_ns.is_some_and(|t| e.ts_ns <= t);
            let n = self.exited.len();
            let done = (0..n.min(LATE_FAULT_LOOKBACK))
                .map(|k| n - 1 - k)
                .filter(|&i| exited_since(&self.exited[i]))
                .min_by_key(|&i| self.exited[i].exit_ns);
            let idle = (0..self.exited_idle.len())
                .filter(|&i| exited_since(&self.exited_idle[i]))
                .min_by_key(|&i| self.exited_idle[i].exit_ns);
            let exit_of = |p: Option<&Proc>| p.and_then(|p| p.exit_ns).unwrap_or(u64::MAX);
            let (done_at, idle_at) =
                (exit_of(done.map(|i| &self.exited[i])), exit_of(idle.map(|i| &self.exited_idle[i])));
            if let Some(i) = idle.filter(|_| idle_at < done_at) {
                // It did something after all: keep it with the others.
                let p = self.exited_idle.remove(i).expect("found above");
                self.exited.push_back(p);
                self.fold_oldest();
                return self.exited.back_mut().expect("just pushed");
            }
            if let Some(i) = done {
                return &mut self.exited[i];
            }
        }
        self.proc_mut(e.pid, e.tid, &e.comm)
    }

    fn retire(&mut self, p: Proc) {
        if p.total.is_empty() && p.interval.is_empty() {
            self.exited_idle.push_back(p);
            if self.exited_idle.len() > LATE_FAULT_LOOKBACK {
                self.exited_idle.pop_front();
            }
            return;
        }
        self.exited.push_back(p);
        self.fold_oldest();
    }

    /// Folds the oldest exited processes beyond `max_exited` into one row.
    fn fold_oldest(&mut self) {
        while self.exited.len() > self.max_exited {
            let old = self.exited.pop_front().expect("non-empty");
            let f = self.folded.get_or_insert_with(|| Proc::new(0, 0, String::new()));
            f.total.merge(&old.total);
            f.interval.merge(&old.interval);
            self.folded_count += 1;
        }
    }

    pub fn apply(&mut self, e: &Event) {
        let Some(kind) = EventKind::from_u32(e.kind) else {
            self.seen.malformed += 1;
            return;
        };
        self.seen.events.count(kind);
        if let Some(eps) = self.episodes.as_mut() {
            eps.apply(e);
        }
        match kind {
            EventKind::Spawn => {
                let parent = self.proc_mut(e.pid, e.tid, &e.comm);
                parent.total.forks += 1;
                parent.interval.forks += 1;
                // A live record under the child's PID belongs to an earlier
                // process whose exit we missed: never let the new one
                // inherit its figures.
                if let Some(stale) = self.live.remove(&e.other) {
                    self.retire(stale);
                }
                let mut child = Proc::new(e.other, e.pid, comm_str(&e.comm));
                child.start_ns = Some(e.ts_ns);
                self.live.insert(e.other, child);
                if self.follow {
                    if let Some(t) = self.targets.as_mut() {
                        if t.contains(&e.pid) {
                            t.insert(e.other);
                        }
                    }
                }
            }
            EventKind::ForkLatency => {
                let p = self.proc_mut(e.pid, e.tid, &e.comm);
                p.total.fork_lat.record(e.latency_ns);
                p.interval.fork_lat.record(e.latency_ns);
                if e.flags & FLAG_DUP_MMAP != 0 {
                    p.total.dup_mmap.record(e.addr);
                    p.interval.dup_mmap.record(e.addr);
                    self.dup_mmap_all.record(e.addr);
                }
                self.fork_lat_all.record(e.latency_ns);
            }
            EventKind::CowCopy => {
                let p = self.fault_proc(e);
                p.total.copies += 1;
                p.interval.copies += 1;
                if e.latency_ns > 0 {
                    let n = latency_weight(e);
                    p.total.cow_lat.record_n(e.latency_ns, n);
                    p.interval.cow_lat.record_n(e.latency_ns, n);
                    self.cow_lat_all.record_n(e.latency_ns, n);
                }
            }
            EventKind::CowReuse => {
                let p = self.fault_proc(e);
                p.total.reuses += 1;
                p.interval.reuses += 1;
            }
            EventKind::ZeroFill => {
                let p = self.fault_proc(e);
                p.total.zero_fills += 1;
                p.interval.zero_fills += 1;
            }
            EventKind::Exec => {
                // Renames the process (its main thread's new comm).
                self.proc_mut(e.pid, e.tid, &e.comm);
            }
            EventKind::HugeCow => {
                let p = self.fault_proc(e);
                p.total.huge_faults += 1;
                p.interval.huge_faults += 1;
                p.total.huge_bytes += e.other as u64;
                p.interval.huge_bytes += e.other as u64;
            }
            EventKind::Exit => {
                // A process that did nothing we saw is remembered as well,
                // in case another thread's outcomes arrive after its exit.
                let mut p =
                    self.live.remove(&e.pid).unwrap_or_else(|| Proc::new(e.pid, 0, comm_str(&e.comm)));
                p.exit_code = Some(e.other);
                p.exit_ns = Some(e.ts_ns);
                self.retire(p);
                if let Some(t) = self.targets.as_mut() {
                    t.remove(&e.pid);
                }
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
            fork_dup_mmap_ns: s.dup_mmap.summary(),
            huge_cow_faults: s.huge_faults,
            huge_copied_bytes: s.huge_bytes,
            exited: p.exit_code.is_some(),
            exit_status: p.exit_code.map(|c| c as i32),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Proc> {
        self.live.values().chain(self.exited.iter())
    }

    /// Per-process figures for the whole run, most copies first. Processes
    /// folded away by the `max_exited` bound appear as one row with PID 0.
    pub fn totals(&self) -> Vec<ProcRow> {
        let mut rows: Vec<_> =
            self.all().filter(|p| !p.total.is_empty()).map(|p| self.row(p, &p.total)).collect();
        if let Some(f) = &self.folded {
            let mut row = self.row(f, &f.total);
            row.comm = format!("[{} more exited]", self.folded_count);
            row.exited = true;
            rows.push(row);
        }
        sort_rows(&mut rows);
        rows
    }

    /// Figures since the last call, then starts a new interval.
    pub fn take_interval(&mut self) -> Vec<ProcRow> {
        let mut rows: Vec<_> =
            self.all().filter(|p| !p.interval.is_empty()).map(|p| self.row(p, &p.interval)).collect();
        if let Some(f) = &self.folded {
            if !f.interval.is_empty() {
                let mut row = self.row(f, &f.interval);
                row.comm = format!("[{} more exited]", self.folded_count);
                rows.push(row);
            }
        }
        sort_rows(&mut rows);
        for p in self.live.values_mut().chain(self.exited.iter_mut()).chain(self.folded.iter_mut()) {
            p.interval = Stats::default();
        }
        // Exited processes are kept for the final summary only.
        rows
    }
}

fn sort_rows(rows: &mut [ProcRow]) {
    rows.sort_by(|a, b| {
        (b.cow_copies, b.forks, b.cow_reuses)
            .cmp(&(a.cow_copies, a.forks, a.cow_reuses))
            .then(a.pid.cmp(&b.pid))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_late_outcomes_go_to_its_exited_process_not_a_new_record() {
        let mut a = Aggregator::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None));
        let at = |mut e: Event, ts: u64| {
            e.ts_ns = ts;
            e
        };
        a.apply(&ev(EventKind::Spawn, 1, 100, 0, "p"));
        a.apply(&ev(EventKind::Spawn, 1, 200, 0, "q"));
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 10));
        a.apply(&at(ev(EventKind::Exit, 100, 0, 0, "p"), 50));
        a.apply(&at(ev(EventKind::Exit, 200, 0, 0, "q"), 50)); // exited idle
                                                               // Another thread's outcomes from before the exits, sent after them.
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 40));
        a.apply(&at(ev(EventKind::CowReuse, 200, 0, 0, "q"), 45));
        let rows = a.totals();
        let of = |pid| rows.iter().filter(|r| r.pid == pid).collect::<Vec<_>>();
        assert_eq!(of(100).len(), 1, "{rows:?}");
        assert!(of(100)[0].exited && of(100)[0].cow_copies == 2);
        assert_eq!(of(200).len(), 1, "{rows:?}");
        assert!(of(200)[0].exited && of(200)[0].cow_reuses == 1);
        // A fault after the exit is a new process's that reused the PID.
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 60));
        let rows = a.totals();
        let p100: Vec<_> = rows.iter().filter(|r| r.pid == 100).collect();
        assert_eq!(p100.len(), 2);
        assert_eq!(p100.iter().filter(|r| !r.exited).map(|r| r.cow_copies).sum::<u64>(), 1);
    }

    #[test]
    fn a_late_outcome_goes_to_the_process_that_held_the_pid_at_its_time() {
        let mut a = Aggregator::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None));
        let at = |mut e: Event, ts: u64| {
            e.ts_ns = ts;
            e
        };
        let copies = |a: &Aggregator| {
            let mut v: Vec<(bool, u64)> =
                a.totals().iter().filter(|r| r.pid == 100).map(|r| (r.exited, r.cow_copies)).collect();
            v.sort();
            v
        };
        // Two lives of PID 100: 0-50 and 60-90; a third from 100 on.
        a.apply(&at(ev(EventKind::Spawn, 1, 100, 0, "p"), 0));
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 10));
        a.apply(&at(ev(EventKind::Exit, 100, 0, 0, "p"), 50));
        a.apply(&at(ev(EventKind::Spawn, 1, 100, 0, "p"), 60));
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 70));
        a.apply(&at(ev(EventKind::Exit, 100, 0, 0, "p"), 90));
        a.apply(&at(ev(EventKind::Spawn, 1, 100, 0, "p"), 100));
        // Late from the first life, while the third is live: the first's.
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 40));
        // Late from the second.
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 80));
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 80));
        // The third's own.
        a.apply(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 110));
        assert_eq!(copies(&a), [(false, 1), (true, 2), (true, 3)]);
        // A process already running when tracing began, seen only exiting,
        // then its other thread's outcomes: counted, as exited.
        a.apply(&at(ev(EventKind::Exit, 300, 0, 0, "old"), 200));
        a.apply(&at(ev(EventKind::CowCopy, 300, 0, 10, "old"), 190));
        let r: Vec<_> = a.totals().into_iter().filter(|r| r.pid == 300).collect();
        assert_eq!(r.len(), 1);
        assert!(r[0].exited && r[0].cow_copies == 1, "{r:?}");
    }

    fn ev(kind: EventKind, pid: u32, other: u32, latency_ns: u64, comm: &str) -> Event {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        Event {
            kind: kind as u32,
            pid,
            tid: pid,
            other,
            ts_ns: 0,
            latency_ns,
            addr: 0x1000,
            comm: c,
            flags: 0,
            _reserved: 0,
        }
    }

    fn agg(targets: &[u32], follow: bool) -> Aggregator {
        Aggregator::new(
            4096,
            Some(targets.iter().copied().collect()),
            follow,
            Box::new(|_| 1),
            Box::new(|_| Some("main".into())),
        )
    }

    #[test]
    fn fork_then_copies_in_parent_and_child() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "redis-server"));
        a.apply(&ev(EventKind::ForkLatency, 100, 200, 21_000_000, "redis-server"));
        for _ in 0..5 {
            a.apply(&ev(EventKind::CowCopy, 200, 0, 2_000, "redis-rdb-bgsave"));
        }
        for _ in 0..3 {
            a.apply(&ev(EventKind::CowCopy, 100, 0, 1_000, "redis-server"));
        }
        a.apply(&ev(EventKind::CowReuse, 100, 0, 0, "redis-server"));
        let rows = a.totals();
        assert_eq!(rows.len(), 2);
        let child = &rows[0];
        assert_eq!((child.pid, child.ppid, child.comm.as_str()), (200, 100, "redis-rdb-bgsave"));
        assert_eq!((child.cow_copies, child.copied_bytes, child.forks), (5, 5 * 4096, 0));
        assert_eq!(child.cow_latency_ns.count, 5);
        let parent = &rows[1];
        assert_eq!((parent.pid, parent.ppid, parent.forks), (100, 1, 1));
        assert_eq!((parent.cow_copies, parent.cow_reuses), (3, 1));
        assert_eq!(parent.fork_latency_ns.max, 21_000_000);
        assert_eq!(a.fork_lat_all.count(), 1);
        assert_eq!(a.cow_lat_all.count(), 8);
    }

    #[test]
    fn dup_mmap_share_and_huge_faults() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "redis-server"));
        // Backends without the split send ForkLatency without the flag.
        a.apply(&ev(EventKind::ForkLatency, 100, 200, 5_000_000, "redis-server"));
        let mut split = ev(EventKind::ForkLatency, 100, 201, 20_000_000, "redis-server");
        split.flags = FLAG_DUP_MMAP;
        split.addr = 15_000_000;
        a.apply(&split);
        a.apply(&ev(EventKind::HugeCow, 200, 2 << 20, 90_000, "bgsave"));
        a.apply(&ev(EventKind::HugeCow, 200, 0, 10_000, "bgsave"));
        a.apply(&ev(EventKind::CowCopy, 200, 0, 2_000, "bgsave"));
        let rows = a.totals();
        let parent = rows.iter().find(|r| r.pid == 100).unwrap();
        assert_eq!(parent.fork_latency_ns.count, 2);
        assert_eq!(parent.fork_dup_mmap_ns.count, 1);
        assert_eq!(parent.fork_dup_mmap_ns.max, 15_000_000);
        let child = rows.iter().find(|r| r.pid == 200).unwrap();
        assert_eq!((child.huge_cow_faults, child.huge_copied_bytes), (2, 2 << 20));
        assert_eq!(child.copied_bytes, 4096 + (2 << 20));
        assert_eq!(a.seen.events.huge_cows, 2);
        assert_eq!(a.dup_mmap_all.count(), 1);
    }

    #[test]
    fn run_ends_when_targets_and_followed_children_exit() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.apply(&ev(EventKind::Exit, 100, 0, 0, "p"));
        assert!(!a.targets_gone(), "child 200 is still traced");
        a.apply(&ev(EventKind::Exit, 200, 0, 0, "p"));
        assert!(a.targets_gone());

        let mut nf = agg(&[100], false);
        nf.apply(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        nf.apply(&ev(EventKind::Exit, 100, 0, 0, "p"));
        assert!(nf.targets_gone(), "--no-follow: only the target counts");

        let whole = Aggregator::new(4096, None, true, Box::new(|_| 0), Box::new(|_| None));
        assert!(!whole.targets_gone());
    }

    #[test]
    fn targets_whose_exit_was_lost_are_swept_on_the_second_look() {
        let mut a = agg(&[100, 300], true);
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.apply(&ev(EventKind::Exit, 100, 0, 0, "p"));
        // 200's and 300's exits were dropped; 300 is still running.
        let dead = |pid: u32| pid != 300;
        assert_eq!(a.sweep_targets(dead), 0, "a first look only makes 200 a suspect");
        assert!(!a.targets_gone());
        assert_eq!(a.sweep_targets(dead), 1);
        assert!(!a.targets_gone(), "300 lives");
        // A suspect that turns out alive (its PID answered) is cleared.
        assert_eq!(a.sweep_targets(|_| false), 0);
        assert_eq!(a.sweep_targets(|_| true), 0);
        assert_eq!(a.sweep_targets(|_| false), 0);
        assert!(!a.targets_gone(), "300 was seen alive in between: a fresh first look");
        assert_eq!(a.sweep_targets(|_| false), 1);
        assert!(a.targets_gone());

        let mut whole = Aggregator::new(4096, None, true, Box::new(|_| 0), Box::new(|_| None));
        assert_eq!(whole.sweep_targets(|_| false), 0);
        assert!(!whole.targets_gone());
    }

    #[test]
    fn pid_reuse_does_not_inherit_figures() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.apply(&ev(EventKind::CowCopy, 200, 0, 10, "old"));
        // 200's exit was lost; the PID comes back as a new child.
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.apply(&ev(EventKind::CowCopy, 200, 0, 10, "new"));
        let rows: Vec<_> = a.totals().into_iter().filter(|r| r.pid == 200).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.cow_copies == 1));
    }

    #[test]
    fn exited_records_are_bounded_but_totals_kept() {
        let mut a =
            Aggregator::new(4096, None, true, Box::new(|_| 0), Box::new(|_| None)).with_max_exited(10);
        for pid in 1000..1100u32 {
            a.apply(&ev(EventKind::Spawn, 1, pid, 0, "init"));
            a.apply(&ev(EventKind::CowCopy, pid, 0, 5, "w"));
            a.apply(&ev(EventKind::CowCopy, pid, 0, 5, "w"));
            a.apply(&ev(EventKind::Exit, pid, 0, 0, "w"));
        }
        // Childless processes that exit without activity leave nothing.
        a.apply(&ev(EventKind::Spawn, 1, 5000, 0, "init"));
        a.apply(&ev(EventKind::Exit, 5000, 0, 0, "init"));
        assert_eq!(a.live_processes(), 1); // pid 1
        let rows = a.totals();
        assert_eq!(rows.len(), 12); // pid 1, 10 exited, 1 folded
        assert_eq!(rows.iter().map(|r| r.cow_copies).sum::<u64>(), 200);
        let folded = rows.iter().find(|r| r.pid == 0).unwrap();
        assert_eq!(folded.comm, "[90 more exited]");
        assert_eq!(folded.cow_copies, 180);
        assert_eq!(rows.iter().find(|r| r.pid == 1).unwrap().forks, 101);
    }

    #[test]
    fn intervals_reset_and_add_up_to_totals() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::CowCopy, 100, 0, 10, "p"));
        a.apply(&ev(EventKind::CowCopy, 100, 0, 10, "p"));
        let first = a.take_interval();
        assert_eq!(first[0].cow_copies, 2);
        assert!(a.take_interval().is_empty(), "nothing happened since");
        a.apply(&ev(EventKind::CowReuse, 100, 0, 0, "p"));
        let third = a.take_interval();
        assert_eq!((third[0].cow_copies, third[0].cow_reuses), (0, 1));
        let total = &a.totals()[0];
        assert_eq!((total.cow_copies, total.cow_reuses), (2, 1));
    }

    #[test]
    fn exec_renames_and_exit_status_is_kept() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::Spawn, 100, 200, 0, "bash"));
        a.apply(&ev(EventKind::CowCopy, 200, 0, 10, "make"));
        a.apply(&ev(EventKind::Exit, 200, 2 << 8, 0, "make"));
        let r = a.totals().into_iter().find(|r| r.pid == 200).unwrap();
        assert_eq!(r.comm, "make");
        assert!(r.exited);
        assert_eq!(r.exit_status, Some(512));
    }

    #[test]
    fn processes_are_named_after_their_main_thread() {
        let mut a = agg(&[100], true);
        let mut e = ev(EventKind::CowCopy, 100, 0, 10, "jemalloc_bg_thd");
        e.tid = 101;
        a.apply(&e);
        assert_eq!(a.totals()[0].comm, "main", "first seen from a thread: name from /proc");
        a.apply(&ev(EventKind::CowCopy, 100, 0, 10, "redis-server"));
        assert_eq!(a.totals()[0].comm, "redis-server");
        a.apply(&e);
        assert_eq!(a.totals()[0].comm, "redis-server", "other threads do not rename");
    }

    #[test]
    fn zero_fills_are_not_copies() {
        let mut a = agg(&[100], true);
        a.apply(&ev(EventKind::ZeroFill, 100, 0, 10, "p"));
        a.apply(&ev(EventKind::CowCopy, 100, 0, 10, "p"));
        let r = &a.totals()[0];
        assert_eq!((r.cow_copies, r.zero_fills, r.copied_bytes), (1, 1, 4096));
        assert_eq!(r.cow_latency_ns.count, 1);
    }

    #[test]
    fn unknown_kinds_are_counted_not_applied() {
        let mut a = agg(&[100], true);
        let mut e = ev(EventKind::CowCopy, 100, 0, 10, "p");
        e.kind = 99;
        a.apply(&e);
        assert_eq!(a.seen.malformed, 1);
        assert!(a.totals().is_empty());
    }

    #[test]
    fn event_counts_follow_the_kernel_numbering() {
        let mut a = agg(&[100], true);
        for kind in [EventKind::CowCopy, EventKind::CowCopy, EventKind::ZeroFill, EventKind::Exec] {
            a.apply(&ev(kind, 100, 0, 0, "p"));
        }
        let mut counters = [0u64; cow_trace_common::counter::COUNT as usize];
        counters[cow_trace_common::counter::COW_COPIES as usize] = 2;
        counters[cow_trace_common::counter::ZERO_FILLS as usize] = 1;
        counters[cow_trace_common::counter::EXECS as usize] = 1;
        counters[cow_trace_common::counter::UNCLASSIFIED as usize] = 9; // not an event kind
        assert_eq!(EventCounts::from_kernel(&counters), a.seen.events);
    }

    #[test]
    fn comm_decoding() {
        assert_eq!(comm_str(b"redis-server\0\0\0\0"), "redis-server");
        assert_eq!(comm_str(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm_str(&[0xff, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "\u{fffd}a");
    }
}
