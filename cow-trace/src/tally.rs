//! Everything the run learns from the event stream: decoded records fed to
//! the per-process figures, the run's end condition and the fork episodes,
//! with the count of what arrived.

use std::collections::{HashMap, HashSet};

use cow_trace_common::FaultRecord;

use crate::{
    aggregate::{Aggregator, ProcRow, RunHistograms},
    counts::Seen,
    ending::MemCgroup,
    episode::Episodes,
    event::{self, Event, What},
    metrics::Metrics,
    stacks::Layouts,
    targets::Targets,
};

pub struct Tally {
    processes: Aggregator,
    targets: Targets,
    /// Fork episodes, fed the same events when enabled.
    episodes: Option<Episodes>,
    /// The exporter's per-label counts, fed the same events when enabled.
    metrics: Option<Metrics>,
    /// `--stacks`: each process image's layout, for naming its stacks.
    layouts: Option<Layouts>,
    seen: Seen,
    /// Reads a live process's memory cgroup (from /proc in the real tool).
    memcg_of: Option<Box<dyn Fn(u32) -> Option<MemCgroup>>>,
    /// Each forking parent's memory cgroup, read at its first fork: a child
    /// starts in its parent's.
    parent_memcg: HashMap<u32, Option<MemCgroup>>,
}

impl Tally {
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
            processes: Aggregator::new(page_size, ppid_of, comm_of),
            targets: Targets::new(targets, follow),
            episodes: None,
            metrics: None,
            layouts: None,
            seen: Seen::default(),
            memcg_of: None,
            parent_memcg: HashMap::new(),
        }
    }

    pub fn with_memcg(mut self, memcg_of: Box<dyn Fn(u32) -> Option<MemCgroup>>) -> Self {
        self.memcg_of = Some(memcg_of);
        self
    }

    /// The run prints no intervals: no per-interval figures are kept.
    pub fn without_intervals(mut self) -> Self {
        self.processes = self.processes.without_intervals();
        self
    }

    pub fn with_episodes(mut self, episodes: Episodes) -> Self {
        self.episodes = Some(episodes);
        self
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn with_stacks(mut self, layouts: Layouts) -> Self {
        self.layouts = Some(layouts);
        self
    }

    pub fn layouts(&self) -> Option<&Layouts> {
        self.layouts.as_ref()
    }

    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    pub fn metrics_mut(&mut self) -> Option<&mut Metrics> {
        self.metrics.as_mut()
    }

    #[cfg(test)]
    pub fn with_max_exited(mut self, n: usize) -> Self {
        self.processes = self.processes.with_max_exited(n);
        self
    }

    /// Feeds one ring-buffer record; a malformed one is counted.
    pub fn apply_record(&mut self, bytes: &[u8], sample_every: u32) {
        self.seen.ring_records += 1;
        event::decode_record(bytes, sample_every, |e| self.apply_decoded(e));
    }

    /// Feeds a fault record the programs batched but never sent.
    pub fn apply_unsent(&mut self, ts_ns: u64, r: &FaultRecord, sample_every: u32) {
        self.apply_decoded(Event::from_fault_record(ts_ns, r, sample_every));
    }

    fn apply_decoded(&mut self, e: Option<Event>) {
        match e {
            Some(e) => self.apply(&e),
            None => self.seen.malformed += 1,
        }
    }

    pub fn apply(&mut self, e: &Event) {
        self.seen.events.count(e.kind());
        if let Some(eps) = self.episodes.as_mut() {
            eps.apply(e);
        }
        if let Some(m) = self.metrics.as_mut() {
            m.apply(e);
        }
        if let Some(l) = self.layouts.as_mut() {
            l.apply(e);
        }
        self.processes.apply(e);
        self.targets.apply(e);
        self.note_memcg(e);
    }

    /// A child's memory cgroup is its parent's at the fork, read once per
    /// parent while it lives (the spawn wakes the reader).
    fn note_memcg(&mut self, e: &Event) {
        let Some(read) = self.memcg_of.as_ref() else { return };
        match e.what {
            What::Spawn { child, .. } => {
                let cg =
                    self.parent_memcg.entry(e.pid).or_insert_with(|| read(e.pid).or_else(|| read(child)));
                if let Some(cg) = cg.clone() {
                    self.processes.set_memcg(child, cg.clone());
                    if let Some(eps) = self.episodes.as_mut() {
                        eps.set_memcg(child, cg);
                    }
                }
            }
            What::Exit { .. } => {
                self.parent_memcg.remove(&e.pid);
            }
            _ => {}
        }
    }

    pub fn seen(&self) -> Seen {
        self.seen
    }

    pub fn histograms(&self) -> &RunHistograms {
        self.processes.histograms()
    }

    pub fn totals(&self) -> Vec<ProcRow> {
        self.processes.totals()
    }

    pub fn take_interval(&mut self) -> Vec<ProcRow> {
        self.processes.take_interval()
    }

    pub fn episodes(&self) -> Option<&Episodes> {
        self.episodes.as_ref()
    }

    pub fn episodes_mut(&mut self) -> Option<&mut Episodes> {
        self.episodes.as_mut()
    }

    /// True once every traced target (and followed child) has exited.
    pub fn targets_gone(&self) -> bool {
        self.targets.gone()
    }

    /// See [`Targets::sweep`].
    pub fn sweep_targets(&mut self, alive: impl Fn(u32) -> bool) -> usize {
        self.targets.sweep(alive)
    }

    #[cfg(test)]
    pub fn live_processes(&self) -> usize {
        self.processes.live_processes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counts::EventCounts;
    use cow_trace_common::{Event as Wire, EventKind, FLAG_DUP_MMAP};

    impl Tally {
        fn feed(&mut self, w: &Wire) {
            self.apply_record(&event::encode_wire(w), 16);
        }
    }

    #[test]
    fn a_threads_late_outcomes_go_to_its_exited_process_not_a_new_record() {
        let mut a = Tally::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None));
        let at = |mut e: Wire, ts: u64| {
            e.ts_ns = ts;
            e
        };
        a.feed(&ev(EventKind::Spawn, 1, 100, 0, "p"));
        a.feed(&ev(EventKind::Spawn, 1, 200, 0, "q"));
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 10));
        a.feed(&at(ev(EventKind::Exit, 100, 0, 0, "p"), 50));
        a.feed(&at(ev(EventKind::Exit, 200, 0, 0, "q"), 50)); // exited idle
                                                              // Another thread's outcomes from before the exits, sent after them.
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 40));
        a.feed(&at(ev(EventKind::CowReuse, 200, 0, 0, "q"), 45));
        let rows = a.totals();
        let of = |pid| rows.iter().filter(|r| r.pid == pid).collect::<Vec<_>>();
        assert_eq!(of(100).len(), 1, "{rows:?}");
        assert!(of(100)[0].exited && of(100)[0].cow_copies == 2);
        assert_eq!(of(200).len(), 1, "{rows:?}");
        assert!(of(200)[0].exited && of(200)[0].cow_reuses == 1);
        // A fault after the exit is a new process's that reused the PID.
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 60));
        let rows = a.totals();
        let p100: Vec<_> = rows.iter().filter(|r| r.pid == 100).collect();
        assert_eq!(p100.len(), 2);
        assert_eq!(p100.iter().filter(|r| !r.exited).map(|r| r.cow_copies).sum::<u64>(), 1);
    }

    #[test]
    fn an_oom_killed_child_ends_so_and_its_failed_fault_is_no_copy() {
        let cg = MemCgroup { path: "/x".into(), limit_bytes: Some(150 << 20) };
        let read = cg.clone();
        let eps = Episodes::new(4096, Box::new(|_| None));
        let mut a = Tally::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None))
            .with_episodes(eps)
            .with_memcg(Box::new(move |_| Some(read.clone())));
        let at = |mut e: Wire, ts: u64| {
            e.ts_ns = ts;
            e
        };
        a.feed(&at(ev(EventKind::Spawn, 1, 2, 0, "w"), 10));
        for ts in [20, 30] {
            a.feed(&at(ev(EventKind::CowCopy, 2, 0, 500, "w"), ts));
        }
        // The tracepoint backend's take-back of the last copy, then a failure
        // that replaced nothing (kprobe/fentry), then the OOM kill.
        let failed =
            |replaces: EventKind| Wire { other: replaces as u32, ..ev(EventKind::CowFailed, 2, 0, 0, "") };
        a.feed(&at(failed(EventKind::CowCopy), 31));
        a.feed(&at(Wire { other: 0, ..failed(EventKind::CowCopy) }, 32));
        a.feed(&at(
            Wire { flags: cow_trace_common::FLAG_OOM_VICTIM, ..ev(EventKind::Exit, 2, 9, 0, "w") },
            40,
        ));
        let child = a.totals().into_iter().find(|r| r.pid == 2).unwrap();
        assert_eq!((child.cow_copies, child.cow_reuses, child.cow_failed), (1, 0, 2));
        assert_eq!(
            child.ending.as_ref().map(|e| (e.oom_killed, e.exit_signal.as_deref())),
            Some((true, Some("SIGKILL")))
        );
        assert_eq!(child.memcg.as_ref(), Some(&cg));
        let ep = a.episodes_mut().unwrap();
        ep.finish_closing();
        let done = ep.take_finished();
        assert_eq!((done[0].child_copies, done[0].cow_failed, done[0].memcg.as_ref()), (1, 2, Some(&cg)));
        assert!(done[0].ending.as_ref().is_some_and(|e| e.oom_killed));
    }

    #[test]
    fn a_late_outcome_goes_to_the_process_that_held_the_pid_at_its_time() {
        let mut a = Tally::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None));
        let at = |mut e: Wire, ts: u64| {
            e.ts_ns = ts;
            e
        };
        let copies = |a: &Tally| {
            let mut v: Vec<(bool, u64)> =
                a.totals().iter().filter(|r| r.pid == 100).map(|r| (r.exited, r.cow_copies)).collect();
            v.sort();
            v
        };
        // Two lives of PID 100: 0-50 and 60-90; a third from 100 on.
        a.feed(&at(ev(EventKind::Spawn, 1, 100, 0, "p"), 0));
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 10));
        a.feed(&at(ev(EventKind::Exit, 100, 0, 0, "p"), 50));
        a.feed(&at(ev(EventKind::Spawn, 1, 100, 0, "p"), 60));
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 70));
        a.feed(&at(ev(EventKind::Exit, 100, 0, 0, "p"), 90));
        a.feed(&at(ev(EventKind::Spawn, 1, 100, 0, "p"), 100));
        // Late from the first life, while the third is live: the first's.
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 40));
        // Late from the second.
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 80));
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 80));
        // The third's own.
        a.feed(&at(ev(EventKind::CowCopy, 100, 0, 10, "p"), 110));
        assert_eq!(copies(&a), [(false, 1), (true, 2), (true, 3)]);
        // A process already running when tracing began, seen only exiting,
        // then its other thread's outcomes: counted, as exited.
        a.feed(&at(ev(EventKind::Exit, 300, 0, 0, "old"), 200));
        a.feed(&at(ev(EventKind::CowCopy, 300, 0, 10, "old"), 190));
        let r: Vec<_> = a.totals().into_iter().filter(|r| r.pid == 300).collect();
        assert_eq!(r.len(), 1);
        assert!(r[0].exited && r[0].cow_copies == 1, "{r:?}");
    }

    fn ev(kind: EventKind, pid: u32, other: u32, latency_ns: u64, comm: &str) -> Wire {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        Wire {
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
            ip: 0,
        }
    }

    fn agg(targets: &[u32], follow: bool) -> Tally {
        Tally::new(
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
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "redis-server"));
        a.feed(&ev(EventKind::ForkLatency, 100, 200, 21_000_000, "redis-server"));
        for _ in 0..5 {
            a.feed(&ev(EventKind::CowCopy, 200, 0, 2_000, "redis-rdb-bgsave"));
        }
        for _ in 0..3 {
            a.feed(&ev(EventKind::CowCopy, 100, 0, 1_000, "redis-server"));
        }
        a.feed(&ev(EventKind::CowReuse, 100, 0, 0, "redis-server"));
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
        assert_eq!(a.histograms().fork_lat.count(), 1);
        assert_eq!(a.histograms().cow_lat.count(), 8);
    }

    #[test]
    fn dup_mmap_share_and_huge_faults() {
        let mut a = agg(&[100], true);
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "redis-server"));
        // Backends without the split send ForkLatency without the flag.
        a.feed(&ev(EventKind::ForkLatency, 100, 200, 5_000_000, "redis-server"));
        let mut split = ev(EventKind::ForkLatency, 100, 201, 20_000_000, "redis-server");
        split.flags = FLAG_DUP_MMAP;
        split.addr = 15_000_000;
        a.feed(&split);
        a.feed(&ev(EventKind::HugeCow, 200, 2 << 20, 90_000, "bgsave"));
        a.feed(&ev(EventKind::HugeCow, 200, 0, 10_000, "bgsave"));
        a.feed(&ev(EventKind::CowCopy, 200, 0, 2_000, "bgsave"));
        let rows = a.totals();
        let parent = rows.iter().find(|r| r.pid == 100).unwrap();
        assert_eq!(parent.fork_latency_ns.count, 2);
        assert_eq!(parent.fork_dup_mmap_ns.count, 1);
        assert_eq!(parent.fork_dup_mmap_ns.max, 15_000_000);
        let child = rows.iter().find(|r| r.pid == 200).unwrap();
        assert_eq!((child.huge_cow_faults, child.huge_copied_bytes), (2, 2 << 20));
        assert_eq!(child.copied_bytes, 4096 + (2 << 20));
        assert_eq!(a.seen().events.huge_cows, 2);
        assert_eq!(a.histograms().dup_mmap.count(), 1);
    }

    #[test]
    fn run_ends_when_targets_and_followed_children_exit() {
        let mut a = agg(&[100], true);
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.feed(&ev(EventKind::Exit, 100, 0, 0, "p"));
        assert!(!a.targets_gone(), "child 200 is still traced");
        a.feed(&ev(EventKind::Exit, 200, 0, 0, "p"));
        assert!(a.targets_gone());

        let mut nf = agg(&[100], false);
        nf.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        nf.feed(&ev(EventKind::Exit, 100, 0, 0, "p"));
        assert!(nf.targets_gone(), "--no-follow: only the target counts");

        let whole = Tally::new(4096, None, true, Box::new(|_| 0), Box::new(|_| None));
        assert!(!whole.targets_gone());
    }

    #[test]
    fn targets_whose_exit_was_lost_are_swept_on_the_second_look() {
        let mut a = agg(&[100, 300], true);
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.feed(&ev(EventKind::Exit, 100, 0, 0, "p"));
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

        let mut whole = Tally::new(4096, None, true, Box::new(|_| 0), Box::new(|_| None));
        assert_eq!(whole.sweep_targets(|_| false), 0);
        assert!(!whole.targets_gone());
    }

    #[test]
    fn pid_reuse_does_not_inherit_figures() {
        let mut a = agg(&[100], true);
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.feed(&ev(EventKind::CowCopy, 200, 0, 10, "old"));
        // 200's exit was lost; the PID comes back as a new child.
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        a.feed(&ev(EventKind::CowCopy, 200, 0, 10, "new"));
        let rows: Vec<_> = a.totals().into_iter().filter(|r| r.pid == 200).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.cow_copies == 1));
    }

    #[test]
    fn exited_records_are_bounded_but_totals_kept() {
        let mut a = Tally::new(4096, None, true, Box::new(|_| 0), Box::new(|_| None)).with_max_exited(10);
        for pid in 1000..1100u32 {
            a.feed(&ev(EventKind::Spawn, 1, pid, 0, "init"));
            a.feed(&ev(EventKind::CowCopy, pid, 0, 5, "w"));
            a.feed(&ev(EventKind::CowCopy, pid, 0, 5, "w"));
            a.feed(&ev(EventKind::Exit, pid, 0, 0, "w"));
        }
        // Childless processes that exit without activity leave nothing.
        a.feed(&ev(EventKind::Spawn, 1, 5000, 0, "init"));
        a.feed(&ev(EventKind::Exit, 5000, 0, 0, "init"));
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
        a.feed(&ev(EventKind::CowCopy, 100, 0, 10, "p"));
        a.feed(&ev(EventKind::CowCopy, 100, 0, 10, "p"));
        let first = a.take_interval();
        assert_eq!(first[0].cow_copies, 2);
        assert!(a.take_interval().is_empty(), "nothing happened since");
        a.feed(&ev(EventKind::CowReuse, 100, 0, 0, "p"));
        let third = a.take_interval();
        assert_eq!((third[0].cow_copies, third[0].cow_reuses), (0, 1));
        let total = &a.totals()[0];
        assert_eq!((total.cow_copies, total.cow_reuses), (2, 1));
    }

    #[test]
    fn exec_renames_and_exit_status_is_kept() {
        let mut a = agg(&[100], true);
        a.feed(&ev(EventKind::Spawn, 100, 200, 0, "bash"));
        a.feed(&ev(EventKind::CowCopy, 200, 0, 10, "make"));
        a.feed(&ev(EventKind::Exit, 200, 2 << 8, 0, "make"));
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
        a.feed(&e);
        assert_eq!(a.totals()[0].comm, "main", "first seen from a thread: name from /proc");
        a.feed(&ev(EventKind::CowCopy, 100, 0, 10, "redis-server"));
        assert_eq!(a.totals()[0].comm, "redis-server");
        a.feed(&e);
        assert_eq!(a.totals()[0].comm, "redis-server", "other threads do not rename");
    }

    #[test]
    fn zero_fills_are_not_copies() {
        let mut a = agg(&[100], true);
        a.feed(&ev(EventKind::ZeroFill, 100, 0, 10, "p"));
        a.feed(&ev(EventKind::CowCopy, 100, 0, 10, "p"));
        let r = &a.totals()[0];
        assert_eq!((r.cow_copies, r.zero_fills, r.copied_bytes), (1, 1, 4096));
        assert_eq!(r.cow_latency_ns.count, 1);
    }

    #[test]
    fn unknown_kinds_are_counted_not_applied() {
        let mut a = agg(&[100], true);
        let mut e = ev(EventKind::CowCopy, 100, 0, 10, "p");
        e.kind = 99;
        a.feed(&e);
        assert_eq!(a.seen().malformed, 1);
        assert!(a.totals().is_empty());
    }

    #[test]
    fn a_batch_is_one_ring_record_however_many_outcomes_it_carries() {
        let mut a = agg(&[100], true);
        let copy = |addr: u64| FaultRecord {
            addr_kind: addr | EventKind::CowCopy as u64,
            ip: 0,
            latency_ns: 0,
            pid: 100,
        };
        a.apply_record(&event::encode_batch(5, &[copy(0x1000), copy(0x2000), copy(0x3000)], 3), 16);
        a.feed(&ev(EventKind::Exit, 100, 0, 0, "p"));
        // Read back at the end from the map, not from the ring.
        a.apply_unsent(6, &copy(0x4000), 16);
        assert_eq!((a.seen().ring_records, a.seen().events.cow_copies, a.seen().events.exits), (2, 4, 1));
    }

    #[test]
    fn event_counts_follow_the_kernel_numbering() {
        let mut a = agg(&[100], true);
        for kind in [EventKind::CowCopy, EventKind::CowCopy, EventKind::ZeroFill, EventKind::Exec] {
            a.feed(&ev(kind, 100, 0, 0, "p"));
        }
        let mut counters = [0u64; cow_trace_common::counter::COUNT as usize];
        counters[cow_trace_common::counter::COW_COPIES as usize] = 2;
        counters[cow_trace_common::counter::ZERO_FILLS as usize] = 1;
        counters[cow_trace_common::counter::EXECS as usize] = 1;
        counters[cow_trace_common::counter::UNCLASSIFIED as usize] = 9; // not an event kind
        assert_eq!(EventCounts::from_kernel(&counters), a.seen().events);
    }
}
