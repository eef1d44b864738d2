//! Fork episodes: what one fork cost, from the fork to its child's exit.
//!
//! An episode opens when a traced process forks and closes when the child
//! exits. While it is open, the child's memory is shared with its parent
//! copy-on-write, so every copy either of them makes is a cost of that fork.
//! The *copy window* closes earlier when the child execs: the child's old
//! memory is released then, and the parent's pages turn exclusive again
//! (later writes reuse them). Copies after the window closes are not the
//! fork's.
//!
//! A parent with several children alive at once (a prefork server) makes
//! each of its copies once, so each goes to its newest fork whose window is
//! still open: that fork is the one that write-protected the page last.
//!
//! A child's exit does not finish its episode at once. The tracepoint
//! backend batches fault outcomes per CPU, so the parent's last copies
//! before the exit can still sit in the batch of the CPU it runs on when the
//! exit arrives. The episode waits, *closing*, until no CPU holds an unsent
//! outcome from before the exit (see [`Episodes::settle`]); meanwhile the
//! parent's copies up to the exit still count.
//!
//! Pure like the aggregator: the only outside inputs are the maps reader,
//! injected so tests run without a kernel, and what `settle` is told.

use std::{cell::RefCell, collections::VecDeque};

use serde::Serialize;

use crate::{
    attribution::{Attribution, Target, Writer},
    ending::{Ending, MemCgroup},
    event::{Event, Failure, Fault, Replaced, What},
    histogram::{Histogram, Summary},
    regions::MapsCache,
    symbolize::Symbolizer,
    FastMap,
};

/// Regions shown per episode.
const TOP_REGIONS: usize = 3;
/// Copy-rate bucket: one second of event time.
const RATE_BUCKET_NS: u64 = 1_000_000_000;
/// Name for copies outside every known mapping (unmapped since).
pub const UNMAPPED: &str = "[unmapped]";

/// Bytes copied in one memory region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionBytes {
    pub region: std::sync::Arc<str>,
    pub bytes: u64,
}

/// A finished (or, in the final summary, still running) episode, as printed
/// and serialised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Episode {
    /// `fork`, or `fork+exec` when the child replaced its program.
    pub kind: &'static str,
    pub parent: u32,
    pub parent_comm: String,
    pub child: u32,
    pub child_comm: String,
    /// Monotonic clock (`CLOCK_MONOTONIC`, ns) at the fork.
    pub start_ns: u64,
    /// The parent's fork time; `None` for kernel-made processes.
    pub fork_latency_ns: Option<u64>,
    /// Fork to exit; `None` while the child still runs (in the summary:
    /// still running at the end of the run).
    pub child_lifetime_ns: Option<u64>,
    /// The child was gone at the end of the run but its exit was never
    /// seen (`--no-follow`, or a lost event): its lifetime is unknown, and
    /// it is not claimed to be running.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub child_exit_unseen: bool,
    /// Fork to exec, for fork+exec children.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_after_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// How the child ended, once it has.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
    /// The child's memory cgroup at the fork, where one limits memory.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub memcg: Option<MemCgroup>,
    /// The OOM killer chose the parent while the child lived.
    pub parent_oom_killed: bool,
    pub parent_copies: u64,
    pub child_copies: u64,
    pub copied_bytes: u64,
    /// Write faults of either process in the copy window that failed (no
    /// memory, ...): not in the copies.
    pub cow_failed: u64,
    /// Most bytes copied within one second of the episode.
    pub peak_copy_bytes_per_s: u64,
    pub cow_latency_ns: Summary,
    /// Where the copies landed, most bytes first (at most three).
    pub top_regions: Vec<RegionBytes>,
    /// The code that wrote the copied pages, most pages first (`--top`).
    pub top_writers: Vec<Writer>,
    /// The data objects or mappings written, most pages first (`--top`).
    pub top_data: Vec<Target>,
}

/// Which episodes a whole-system run shows, live and in its summary: on a
/// busy host most forks are a shell starting a command, and cost little.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    /// Episodes that copied at least this much are shown...
    pub min_copied_bytes: u64,
    /// ...and those whose fork held the parent at least this long.
    pub min_fork_ns: u64,
}

impl Threshold {
    pub fn matters(&self, ep: &Episode) -> bool {
        self.matters_by(ep.copied_bytes, ep.fork_latency_ns)
    }

    fn matters_by(&self, copied_bytes: u64, fork_latency_ns: Option<u64>) -> bool {
        copied_bytes >= self.min_copied_bytes || fork_latency_ns.is_some_and(|ns| ns >= self.min_fork_ns)
    }

    /// The episodes that matter, most copied first (then slowest fork).
    pub fn rank(&self, mut eps: Vec<Episode>) -> Vec<Episode> {
        eps.retain(|e| self.matters(e));
        eps.sort_by_key(|e| {
            std::cmp::Reverse((e.copied_bytes, e.fork_latency_ns, std::cmp::Reverse(e.start_ns)))
        });
        eps
    }
}

#[derive(Clone)]
struct Open {
    parent: u32,
    parent_comm: String,
    child: u32,
    child_comm: String,
    start_ns: u64,
    fork_latency_ns: Option<u64>,
    /// Gone at the end without an exit event (see `Episode`).
    exit_unseen: bool,
    exec_after_ns: Option<u64>,
    parent_copies: u64,
    child_copies: u64,
    failed: u64,
    memcg: Option<MemCgroup>,
    parent_oom_killed: bool,
    cow_lat: Histogram,
    /// Copies per second of the episode, by second.
    per_second: FastMap<u64, u64>,
    /// Pages copied per region name.
    regions: FastMap<String, u64>,
    /// Copies by writer and by written location.
    attribution: Attribution,
    /// Set when the child has exited; the episode is closing.
    closed: Option<Closed>,
}

#[derive(Clone, Copy)]
struct Closed {
    end_ns: u64,
    status: i32,
    oom_killed: bool,
    /// `Episodes::settles` when the exit was seen.
    seen_at: u64,
}

impl Open {
    /// Whether a copy made at `ts_ns` can be this fork's: made after the
    /// fork, and before the child's exec or exit. Decided by time, not by
    /// when the copy arrives: the parent's copies can arrive after the
    /// child's exec or exit events (see the module doc).
    fn covers(&self, ts_ns: u64) -> bool {
        ts_ns >= self.start_ns
            && self.exec_after_ns.is_none_or(|x| ts_ns < self.start_ns + x)
            && self.closed.is_none_or(|c| ts_ns <= c.end_ns)
    }
}

/// Where the episode a copy belongs to is kept.
enum Slot {
    Open(u32),
    Reused(usize),
}

pub struct Episodes {
    page_size: u64,
    open: FastMap<u32, Open>,
    /// Open episodes of each parent, oldest fork first.
    by_parent: FastMap<u32, Vec<u32>>,
    /// Parents' maps, read at their fork and on misses.
    maps: MapsCache,
    /// Names writers and targets when an episode is reported.
    symbolizer: RefCell<Symbolizer>,
    /// Writers and targets reported per episode (0: all).
    top: usize,
    /// Whole-system runs: only the episodes that matter are shown, so only
    /// those are named and kept for the summary (the others are counted).
    threshold: Option<Threshold>,
    /// Finished since the last `take_finished`.
    finished: Vec<Episode>,
    /// Finished, for the summary; bounded by `max_kept`.
    kept: VecDeque<Episode>,
    max_kept: usize,
    /// Finished episodes no longer kept for the summary.
    dropped: u64,
    /// Fork latencies that came before their fork's spawn event, by child
    /// PID. The backends send a fork's latency after its spawn today (the
    /// kprobe and fentry ones hold it until `sched_process_fork` counts the
    /// fork); the ring buffer still orders records by commit, not by time,
    /// so either order is accepted.
    early_latency: FastMap<u32, EarlyLatency>,
    /// Calls to `settle` so far.
    settles: u64,
    /// Closing episodes whose child's PID a new child of a fork has taken
    /// already: out of `open` and `by_parent`, still taking the copies of
    /// their time until they settle.
    reused: Vec<Open>,
}

struct EarlyLatency {
    parent: u32,
    ts_ns: u64,
    latency_ns: u64,
}

/// Bound on `early_latency`: entries live from one event to the next
/// unless the spawn event was dropped.
const MAX_EARLY_LATENCIES: usize = 1024;
/// How long before its spawn event a fork latency can come: the rest of
/// `kernel_clone` after `copy_process` returns. Anything older belongs to
/// an earlier process with the same PID.
const EARLY_LATENCY_WINDOW_NS: u64 = 100_000_000;
/// A closing episode is finished after this many calls to `settle` even if
/// a CPU still holds outcomes from before the exit: the task running there
/// has neither faulted nor left the CPU since (the event loop calls it
/// every 25 ms: a second). Copies that arrive later count for their
/// process, not for the episode.
const MAX_CLOSING_SETTLES: u64 = 40;

impl Episodes {
    /// `read_maps(pid)` returns the bytes of `/proc/PID/maps`.
    pub fn new(page_size: u64, read_maps: Box<dyn Fn(u32) -> Option<Vec<u8>>>) -> Self {
        Self {
            page_size,
            open: FastMap::default(),
            by_parent: FastMap::default(),
            maps: MapsCache::new(read_maps),
            symbolizer: RefCell::new(Symbolizer::new()),
            top: 0,
            threshold: None,
            finished: Vec::new(),
            kept: VecDeque::new(),
            max_kept: 4096,
            dropped: 0,
            early_latency: FastMap::default(),
            settles: 0,
            reused: Vec::new(),
        }
    }

    /// Reports at most `top` writers and targets per episode (0: all).
    pub fn with_top(mut self, top: usize) -> Self {
        self.top = top;
        self
    }

    /// Names and keeps only the episodes that pass `t` (whole-system runs).
    pub fn with_threshold(mut self, t: Threshold) -> Self {
        self.threshold = Some(t);
        self
    }

    fn shown(&self, ep: &Episode) -> bool {
        self.threshold.is_none_or(|t| t.matters(ep))
    }

    #[cfg(test)]
    fn with_max_kept(mut self, n: usize) -> Self {
        self.max_kept = n;
        self
    }

    pub fn apply(&mut self, e: &Event) {
        match e.what {
            What::Spawn { child, .. } => self.spawn(e, child),
            What::ForkLatency { child, latency_ns, .. } => self.fork_latency(e, child, latency_ns),
            What::Copy(f) => self.copy(e, &f),
            What::Exec => {
                if let Some(o) = self.open.get_mut(&e.pid) {
                    o.exec_after_ns.get_or_insert(e.ts_ns.saturating_sub(o.start_ns));
                    o.child_comm = e.comm.to_string();
                }
            }
            What::Failed(f) => self.failed(e, &f),
            What::Exit { status, oom_killed } => {
                let settles = self.settles;
                if let Some(o) = self.open.get_mut(&e.pid).filter(|o| o.closed.is_none()) {
                    // The name it died with: Redis renames its child
                    // (`redis-rdb-bgsave`) after the fork. The exit event
                    // comes from the last thread to leave, the main
                    // thread's name only when that is the main thread.
                    if e.tid == e.pid && !e.comm.is_empty() {
                        o.child_comm = e.comm.to_string();
                    }
                    o.closed =
                        Some(Closed { end_ns: e.ts_ns, status: status as i32, oom_killed, seen_at: settles });
                }
                // Its own episodes as a parent go on; its maps are no
                // longer readable, but the cached copy still describes
                // its children's layout. An OOM kill of the parent is what
                // its children's episodes say (then the child's writes to
                // pages no longer shared are reuses).
                if oom_killed {
                    for kid in self.by_parent.get(&e.pid).into_iter().flatten() {
                        if let Some(o) = self.open.get_mut(kid).filter(|o| o.closed.is_none()) {
                            o.parent_oom_killed = true;
                        }
                    }
                }
            }
            // Huge-page faults split the mapping; the 4 KiB copies that
            // follow are what the episode counts.
            What::Reuse(_) | What::ZeroFill(_) | What::HugeCow { .. } => {}
        }
    }

    fn spawn(&mut self, e: &Event, child: u32) {
        // An open episode under this PID lost its exit: close it as it
        // stands rather than let the new child inherit it.
        if let Some(stale) = self.open.remove(&child) {
            if stale.closed.is_some() {
                // Exited, still closing: it keeps its copies.
                self.unlink(&stale);
                self.reused.push(stale);
            } else {
                self.close_out(stale);
            }
        }
        let comm = e.comm.to_string();
        // The parent's layout, read now, while it is surely alive (the
        // spawn event wakes the reader): the copies come in batches, later,
        // maybe after both processes are gone.
        self.maps.remember(e.pid, e.ts_ns);
        self.by_parent.entry(e.pid).or_default().push(child);
        let fork_latency_ns = self
            .early_latency
            .remove(&child)
            .filter(|l| {
                l.parent == e.pid && e.ts_ns >= l.ts_ns && e.ts_ns - l.ts_ns <= EARLY_LATENCY_WINDOW_NS
            })
            .map(|l| l.latency_ns);
        self.open.insert(
            child,
            Open {
                parent: e.pid,
                parent_comm: comm.clone(),
                child,
                child_comm: comm,
                start_ns: e.ts_ns,
                fork_latency_ns,
                exit_unseen: false,
                exec_after_ns: None,
                parent_copies: 0,
                child_copies: 0,
                failed: 0,
                memcg: None,
                parent_oom_killed: false,
                cow_lat: Histogram::default(),
                per_second: FastMap::default(),
                regions: FastMap::default(),
                attribution: Attribution::default(),
                closed: None,
            },
        );
    }

    /// Gives a fork latency to its episode. On the tracepoint backend it is
    /// measured at the parent's syscall exit, which can come after a short
    /// child's exit (vfork, posix_spawn): then the episode is already
    /// finished, and is completed in place. On the kprobe and fentry
    /// backends it comes before the spawn event, and waits for it.
    fn fork_latency(&mut self, e: &Event, forked: u32, latency_ns: u64) {
        let matches = |parent: u32, child: u32, start_ns: u64, lat: Option<u64>| {
            parent == e.pid && child == forked && lat.is_none() && e.ts_ns >= start_ns
        };
        if let Some(o) = self.open.get_mut(&forked) {
            if matches(o.parent, o.child, o.start_ns, o.fork_latency_ns) {
                o.fork_latency_ns = Some(latency_ns);
                return;
            }
        }
        // A finished episode sits in two lists (to print, and kept for the
        // summary): complete both copies.
        let is_it = |ep: &&mut Episode| matches(ep.parent, ep.child, ep.start_ns, ep.fork_latency_ns);
        let mut done = false;
        if let Some(ep) = self.finished.iter_mut().rev().find(is_it) {
            ep.fork_latency_ns = Some(latency_ns);
            done = true;
        }
        if let Some(ep) = self.kept.iter_mut().rev().find(is_it) {
            ep.fork_latency_ns = Some(latency_ns);
            done = true;
        }
        if done {
            return;
        }
        if self.early_latency.len() >= MAX_EARLY_LATENCIES {
            self.early_latency.clear();
        }
        self.early_latency.insert(forked, EarlyLatency { parent: e.pid, ts_ns: e.ts_ns, latency_ns });
    }

    /// Where the episode a copy belongs to is: by the child's own copies
    /// while its window is open, else the parent's newest fork whose window
    /// covers the copy, whether its PID is still its own or already reused.
    fn owner_of_copy(&self, pid: u32, ts: u64) -> Option<(Slot, bool)> {
        let child = match self.open.get(&pid) {
            Some(o) if o.covers(ts) => Some(Slot::Open(pid)),
            _ => self.reused.iter().rposition(|o| o.child == pid && o.covers(ts)).map(Slot::Reused),
        };
        if let Some(c) = child {
            return Some((c, true));
        }
        let open = self.by_parent.get(&pid).and_then(|kids| {
            kids.iter()
                .filter_map(|c| self.open.get(c).filter(|o| o.covers(ts)).map(|o| (o.start_ns, *c)))
                .max()
        });
        let reused = (0..self.reused.len())
            .filter(|&i| self.reused[i].parent == pid && self.reused[i].covers(ts))
            .max_by_key(|&i| self.reused[i].start_ns);
        let slot = match (open, reused) {
            (Some((start, _)), Some(i)) if self.reused[i].start_ns > start => Slot::Reused(i),
            (Some((_, c)), _) => Slot::Open(c),
            (None, Some(i)) => Slot::Reused(i),
            (None, None) => return None,
        };
        Some((slot, false))
    }

    fn copy(&mut self, e: &Event, f: &Fault) {
        let ts = e.ts_ns;
        let Some((slot, by_child)) = self.owner_of_copy(e.pid, ts) else { return };
        let (parent, child) = match slot {
            Slot::Open(c) => (self.open[&c].parent, c),
            Slot::Reused(i) => (self.reused[i].parent, self.reused[i].child),
        };
        // A parent already gone leaves its child's maps, the same layout
        // at the fork.
        let maps = self.maps.maps(parent, child, f.addr, ts);
        let region = maps.find(f.addr).map_or(UNMAPPED, |r| r.name.as_str());
        let o = match slot {
            Slot::Open(c) => self.open.get_mut(&c).expect("looked up above"),
            Slot::Reused(i) => &mut self.reused[i],
        };
        if by_child {
            o.child_copies += 1;
        } else {
            o.parent_copies += 1;
        }
        if f.latency_ns > 0 {
            o.cow_lat.record_n(f.latency_ns, f.weight);
        }
        *o.per_second.entry((ts - o.start_ns) / RATE_BUCKET_NS).or_default() += 1;
        // The name is copied only the first time: this runs for every copy.
        match o.regions.get_mut(region) {
            Some(n) => *n += 1,
            None => {
                o.regions.insert(region.to_string(), 1);
            }
        }
        o.attribution.record(maps, f);
    }

    /// A failed fault in a copy window; one that replaces a copy takes it
    /// back (it arrived first).
    fn failed(&mut self, e: &Event, f: &Failure) {
        let Some((slot, by_child)) = self.owner_of_copy(e.pid, e.ts_ns) else { return };
        let (parent, child) = match slot {
            Slot::Open(c) => (self.open[&c].parent, c),
            Slot::Reused(i) => (self.reused[i].parent, self.reused[i].child),
        };
        let maps = self.maps.maps(parent, child, f.addr, e.ts_ns);
        let region = maps.find(f.addr).map(|r| r.name.clone());
        let o = match slot {
            Slot::Open(c) => self.open.get_mut(&c).expect("looked up above"),
            Slot::Reused(i) => &mut self.reused[i],
        };
        o.failed += 1;
        if f.replaces == Some(Replaced::Copy) {
            let copies = if by_child { &mut o.child_copies } else { &mut o.parent_copies };
            *copies = copies.saturating_sub(1);
            // Its writer, data and region go with it.
            if let Some(n) = o.regions.get_mut(region.as_deref().unwrap_or(UNMAPPED)) {
                *n = n.saturating_sub(1);
            }
            o.attribution.take_back(maps, f.addr, f.ip);
        }
    }

    /// Records the memory cgroup `child` was forked into.
    pub fn set_memcg(&mut self, child: u32, memcg: MemCgroup) {
        if let Some(o) = self.open.get_mut(&child) {
            o.memcg = Some(memcg);
        }
    }

    fn unlink(&mut self, o: &Open) {
        if let Some(kids) = self.by_parent.get_mut(&o.parent) {
            kids.retain(|&c| c != o.child);
            if kids.is_empty() {
                self.by_parent.remove(&o.parent);
                self.maps.forget(o.parent);
            }
        }
    }

    fn finish(&self, o: Open, lifetime: Option<u64>, closed: Option<Closed>) -> Episode {
        let copies = o.parent_copies + o.child_copies;
        let mut regions: Vec<_> = o.regions.into_iter().filter(|&(_, pages)| pages > 0).collect::<Vec<_>>();
        regions.sort_by(|(ra, a), (rb, b)| b.cmp(a).then_with(|| ra.cmp(rb)));
        regions.truncate(TOP_REGIONS);
        let regions: Vec<RegionBytes> = {
            let mut sym = self.symbolizer.borrow_mut();
            let mut regions: Vec<RegionBytes> = regions
                .into_iter()
                .map(|(region, pages)| RegionBytes {
                    region: sym.intern(&region),
                    bytes: pages * self.page_size,
                })
                .collect();
            // Kept for the summary: no room for the regions left out.
            regions.shrink_to_fit();
            regions
        };
        // An episode no one will see is not named: naming reads the
        // modules' files, the costliest memory of a run.
        let shown = self.threshold.is_none_or(|t| t.matters_by(copies * self.page_size, o.fork_latency_ns));
        let (top_writers, top_data) = if shown {
            let mut sym = self.symbolizer.borrow_mut();
            let named = o.attribution.report(&mut sym, copies, self.top);
            // Large files it read (mapped, with their parsed symbols and
            // debug information) are let go (see `release_files`).
            sym.release_files();
            named
        } else {
            (Vec::new(), Vec::new())
        };
        Episode {
            kind: if o.exec_after_ns.is_some() { "fork+exec" } else { "fork" },
            parent: o.parent,
            parent_comm: o.parent_comm,
            child: o.child,
            child_comm: o.child_comm,
            start_ns: o.start_ns,
            fork_latency_ns: o.fork_latency_ns,
            child_lifetime_ns: lifetime,
            child_exit_unseen: o.exit_unseen && lifetime.is_none(),
            exec_after_ns: o.exec_after_ns,
            exit_status: closed.map(|c| c.status),
            ending: closed.map(|c| Ending::new(c.status as u32, c.oom_killed)),
            memcg: o.memcg,
            parent_oom_killed: o.parent_oom_killed,
            parent_copies: o.parent_copies,
            child_copies: o.child_copies,
            copied_bytes: copies * self.page_size,
            cow_failed: o.failed,
            peak_copy_bytes_per_s: o.per_second.values().max().copied().unwrap_or(0) * self.page_size,
            cow_latency_ns: o.cow_lat.summary(),
            top_regions: regions,
            top_writers,
            top_data,
        }
    }

    /// Finishes an episode taken out of `open`: a closing one as the
    /// finished episode it is, one whose exit was lost as it stands.
    fn close_out(&mut self, o: Open) {
        // A `reused` one was unlinked when its PID was taken: unlinking it
        // again would unlink the new child.
        if !self.open.contains_key(&o.child) {
            self.unlink(&o);
        }
        match o.closed {
            Some(c) => {
                let lifetime = c.end_ns.saturating_sub(o.start_ns);
                let ep = self.finish(o, Some(lifetime), Some(c));
                self.finished.push(ep.clone());
                self.keep(ep);
            }
            None => {
                let ep = self.finish(o, None, None);
                self.keep(ep);
            }
        }
    }

    /// Whether any episode is closing (waiting for `settle`).
    pub fn closing(&self) -> bool {
        !self.reused.is_empty() || self.open.values().any(|o| o.closed.is_some())
    }

    /// Finishes the closing episodes that can no longer receive a copy.
    /// `oldest_unsent_ns` is the time of the oldest fault outcome that some
    /// CPU still holds unsent (`None`: none), read *before* the ring buffer
    /// was last drained: an episode whose exit came after that reading waits
    /// for the next call, so that the reading describes the time after its
    /// exit. An episode finishes when nothing older than its exit is unsent,
    /// or after `MAX_CLOSING_SETTLES` calls.
    pub fn settle(&mut self, oldest_unsent_ns: Option<u64>) {
        let now = self.settles;
        self.settles += 1;
        let ready = |o: &Open| {
            o.closed.is_some_and(|c| {
                let seen_before = c.seen_at < now;
                let nothing_older = oldest_unsent_ns.is_none_or(|t| t > c.end_ns);
                seen_before && (nothing_older || now - c.seen_at >= MAX_CLOSING_SETTLES)
            })
        };
        let pids: Vec<u32> = self.open.iter().filter(|(_, o)| ready(o)).map(|(&pid, _)| pid).collect();
        let mut done: Vec<Open> = pids.iter().map(|p| self.open.remove(p).expect("listed above")).collect();
        let (now_done, waiting) = std::mem::take(&mut self.reused).into_iter().partition(ready);
        self.reused = waiting;
        done.extend::<Vec<Open>>(now_done);
        self.close_out_in_exit_order(done);
    }

    /// Finishes `done` (all closed), the earliest exit first.
    fn close_out_in_exit_order(&mut self, mut done: Vec<Open>) {
        done.sort_by_key(|o| (o.closed.map(|c| c.end_ns), o.child));
        for o in done {
            self.close_out(o);
        }
    }

    /// Children of open episodes whose exit has not been seen.
    pub fn running_children(&self) -> Vec<u32> {
        self.open.values().filter(|o| o.closed.is_none()).map(|o| o.child).collect()
    }

    /// At the end of the run: marks the episodes whose child is gone
    /// although no exit was seen (`alive` says which PIDs still ran at the
    /// cut-off).
    pub fn mark_unseen_exits(&mut self, alive: impl Fn(u32) -> bool) {
        for o in self.open.values_mut().filter(|o| o.closed.is_none()) {
            o.exit_unseen = !alive(o.child);
        }
    }

    /// Finishes every closing episode: once the programs are detached and
    /// everything they sent or left unsent has been applied.
    pub fn finish_closing(&mut self) {
        let pids: Vec<u32> = self.open.iter().filter(|(_, o)| o.closed.is_some()).map(|(&p, _)| p).collect();
        let mut done: Vec<Open> = pids.iter().map(|p| self.open.remove(p).expect("listed above")).collect();
        done.append(&mut self.reused);
        self.close_out_in_exit_order(done);
    }

    fn keep(&mut self, ep: Episode) {
        if !self.shown(&ep) {
            self.dropped += 1;
            return;
        }
        // Room made first: the queue never holds more than `max_kept`, so
        // it never grows (to twice that) once full.
        while self.kept.len() >= self.max_kept {
            self.kept.pop_front();
            self.dropped += 1;
        }
        self.kept.push_back(ep);
    }

    /// Finished episodes not kept for the summary: beyond the bound on
    /// those kept, or below the threshold of a whole-system run.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Episodes whose child exited since the last call, in exit order.
    pub fn take_finished(&mut self) -> Vec<Episode> {
        std::mem::take(&mut self.finished)
    }

    /// Every kept episode, finished ones in exit order (closing ones count
    /// as finished), then the ones still running (lifetime `None`) by fork
    /// time.
    pub fn all(&self) -> Vec<Episode> {
        let mut closing: Vec<_> =
            self.open.values().filter(|o| o.closed.is_some()).chain(&self.reused).collect();
        closing.sort_by_key(|o| (o.closed.map(|c| c.end_ns), o.child));
        let mut running: Vec<_> = closing
            .into_iter()
            .chain(self.open.values().filter(|o| o.closed.is_none()))
            .map(|o| {
                let copy = o.clone();
                match o.closed {
                    Some(c) => self.finish(copy, Some(c.end_ns.saturating_sub(o.start_ns)), Some(c)),
                    None => self.finish(copy, None, None),
                }
            })
            .collect();
        // Closing ones keep their exit order, ahead of the running ones.
        let n_closing = running.iter().filter(|e| e.child_lifetime_ns.is_some()).count();
        running[n_closing..].sort_by_key(|e| (e.start_ns, e.child));
        self.kept.iter().cloned().chain(running).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::episode_line;
    use cow_trace_common::{Event, EventKind};

    impl Episodes {
        fn feed(&mut self, w: &Event) {
            self.apply(&crate::event::Event::from_wire(w).expect("a known kind"));
        }
    }

    const MAPS: &str = "\
55d0c5a1d000-55d0c5a3e000 rw-p 00000000 00:00 0                          [heap]
7f2a34000000-7f2a6c000000 rw-p 00000000 00:00 0 
7ffd1e0f4000-7ffd1e115000 rw-p 00000000 00:00 0                          [stack]
";
    const HEAP: u64 = 0x55d0c5a1d000;
    const ARENA: u64 = 0x7f2a34000000;
    const STACK: u64 = 0x7ffd1e0f4000;
    const MS: u64 = 1_000_000;

    fn ev(kind: EventKind, pid: u32, other: u32, ts_ns: u64, comm: &str) -> Event {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        Event {
            kind: kind as u32,
            pid,
            tid: pid,
            other,
            ts_ns,
            latency_ns: 0,
            addr: 0,
            comm: c,
            flags: 0,
            _reserved: 0,
            ip: 0,
        }
    }

    fn copy(pid: u32, ts_ns: u64, addr: u64, latency_ns: u64) -> Event {
        Event { addr, latency_ns, ..ev(EventKind::CowCopy, pid, 0, ts_ns, "redis-server") }
    }

    /// What a run prints once no CPU holds unsent outcomes: the first
    /// `settle` only marks exits as seen.
    fn settled(eps: &mut Episodes) -> Vec<Episode> {
        eps.settle(None);
        eps.settle(None);
        eps.take_finished()
    }

    fn episodes() -> Episodes {
        Episodes::new(4096, Box::new(|_| Some(MAPS.into())))
    }

    #[test]
    fn bgsave_episode_counts_both_sides_within_the_childs_life() {
        let mut eps = episodes();
        eps.feed(&copy(100, MS, HEAP, 1_000)); // before the fork: not its cost
        eps.feed(&ev(EventKind::Spawn, 100, 200, 10 * MS, "redis-server"));
        eps.feed(&Event {
            latency_ns: 21 * MS,
            ..ev(EventKind::ForkLatency, 100, 200, 31 * MS, "redis-server")
        });
        for i in 0..6 {
            eps.feed(&copy(100, 40 * MS + i, ARENA + i * 4096, 2_000));
        }
        eps.feed(&copy(100, 50 * MS, HEAP, 2_000));
        // Fault events carry no comm: the child is named by its exit.
        let child = Event { comm: [0; 16], ..copy(200, 60 * MS, STACK, 3_000) };
        eps.feed(&child);
        eps.feed(&child);
        assert!(settled(&mut eps).is_empty(), "the child still runs");
        eps.feed(&ev(EventKind::Exit, 200, 0, 1_010 * MS, "redis-rdb-bgsave"));
        eps.feed(&copy(100, 1_100 * MS, HEAP, 2_000)); // after the child: not counted
        let done = settled(&mut eps);
        assert_eq!(done.len(), 1);
        let e = &done[0];
        assert_eq!((e.kind, e.parent, e.child), ("fork", 100, 200));
        assert_eq!((e.parent_comm.as_str(), e.child_comm.as_str()), ("redis-server", "redis-rdb-bgsave"));
        assert_eq!(e.fork_latency_ns, Some(21 * MS));
        assert_eq!(e.child_lifetime_ns, Some(1_000 * MS));
        assert_eq!((e.parent_copies, e.child_copies, e.copied_bytes), (7, 2, 9 * 4096));
        assert_eq!(e.peak_copy_bytes_per_s, 9 * 4096, "all in the first second");
        assert_eq!((e.cow_latency_ns.count, e.cow_latency_ns.max), (9, 3_000));
        assert_eq!(
            e.top_regions,
            vec![
                RegionBytes { region: "[anon 7f2a34000000]".into(), bytes: 6 * 4096 },
                RegionBytes { region: "[stack]".into(), bytes: 2 * 4096 },
                RegionBytes { region: "[heap]".into(), bytes: 4096 },
            ]
        );
        assert_eq!(eps.all(), done, "kept for the summary");
        let line = episode_line(e);
        assert!(line.starts_with("fork redis-server[100] -> redis-rdb-bgsave[200]: fork 21.0ms"), "{line}");
        assert!(line.contains("child lived 1.00s") && line.contains("parent 7 + child 2 pages"), "{line}");
        assert!(
            line.contains("top regions: [anon 7f2a34000000] 24.0KiB, [stack] 8.0KiB, [heap] 4.0KiB"),
            "{line}"
        );
    }

    #[test]
    fn a_copy_taken_back_by_a_failed_fault_leaves_its_writer_data_and_region() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 10 * MS, "redis-server"));
        let write = |ts, addr, ip| Event { ip, ..copy(200, ts, addr, 1_000) };
        eps.feed(&write(20 * MS, ARENA, 0x1234_5000));
        eps.feed(&write(21 * MS, ARENA + 4096, 0x1234_5000));
        eps.feed(&write(22 * MS, HEAP, 0x1234_6000));
        // The heap copy's fault failed (its memory cgroup charge): the
        // tracepoint backend takes it back.
        eps.feed(&Event {
            addr: HEAP,
            ip: 0x1234_6000,
            ..ev(EventKind::CowFailed, 200, EventKind::CowCopy as u32, 23 * MS, "")
        });
        // A failure that replaced nothing takes nothing back.
        eps.feed(&Event { addr: ARENA, ip: 0x1234_5000, ..ev(EventKind::CowFailed, 200, 0, 24 * MS, "") });
        eps.feed(&ev(EventKind::Exit, 200, 9, 30 * MS, "redis-server"));
        let done = settled(&mut eps);
        let e = &done[0];
        assert_eq!((e.child_copies, e.cow_failed), (2, 2));
        // No file behind these addresses: each writer is [unknown] module
        // and offset-less here, counted by instruction all the same.
        assert_eq!(e.top_writers.iter().map(|w| w.pages).collect::<Vec<_>>(), [2], "{:?}", e.top_writers);
        assert_eq!(
            e.top_data.iter().map(|d| (&*d.region, d.pages)).collect::<Vec<_>>(),
            [("[anon 7f2a34000000]", 2)]
        );
        assert_eq!(e.top_regions.iter().map(|r| &*r.region).collect::<Vec<_>>(), ["[anon 7f2a34000000]"]);
    }

    #[test]
    fn fork_latency_may_come_before_the_spawn() {
        // kprobe/fentry order: copy_process returns (fork latency), then
        // the kernel fires sched_process_fork (spawn).
        let mut eps = episodes();
        eps.feed(&Event { latency_ns: 3 * MS, ..ev(EventKind::ForkLatency, 100, 200, 13 * MS, "p") });
        eps.feed(&ev(EventKind::Spawn, 100, 200, 13 * MS + 1, "p"));
        // tracepoint order, for another child of the same parent.
        eps.feed(&ev(EventKind::Spawn, 100, 201, 20 * MS, "p"));
        eps.feed(&Event { latency_ns: 4 * MS, ..ev(EventKind::ForkLatency, 100, 201, 24 * MS, "p") });
        eps.feed(&ev(EventKind::Exit, 200, 0, 30 * MS, "c"));
        eps.feed(&ev(EventKind::Exit, 201, 0, 31 * MS, "c"));
        let done = settled(&mut eps);
        let lat: Vec<_> = done.iter().map(|e| (e.child, e.fork_latency_ns)).collect();
        assert_eq!(lat, vec![(200, Some(3 * MS)), (201, Some(4 * MS))]);
        // tracepoint order for a short child (vfork): it exits before its
        // parent's syscall returns; the finished episode is completed.
        eps.feed(&ev(EventKind::Spawn, 100, 300, 40 * MS, "p"));
        eps.feed(&ev(EventKind::Exit, 300, 0, 41 * MS, "c"));
        eps.feed(&Event { latency_ns: 2 * MS, ..ev(EventKind::ForkLatency, 100, 300, 42 * MS, "p") });
        assert_eq!(settled(&mut eps)[0].fork_latency_ns, Some(2 * MS));
        assert_eq!(eps.all().iter().find(|e| e.child == 300).unwrap().fork_latency_ns, Some(2 * MS));
        // A latency whose spawn never came does not land on a later process
        // that reuses the PID, even from the same parent.
        eps.feed(&Event { latency_ns: 9 * MS, ..ev(EventKind::ForkLatency, 100, 400, 50 * MS, "p") });
        eps.feed(&ev(EventKind::Spawn, 100, 400, 50 * MS + EARLY_LATENCY_WINDOW_NS + 1, "p"));
        eps.feed(&ev(EventKind::Exit, 400, 0, 900 * MS, "c"));
        assert_eq!(settled(&mut eps)[0].fork_latency_ns, None);
        // Nor on a child of another parent.
        eps.feed(&Event { latency_ns: 9 * MS, ..ev(EventKind::ForkLatency, 100, 401, 1_000 * MS, "p") });
        eps.feed(&ev(EventKind::Spawn, 555, 401, 1_000 * MS + 1, "q"));
        eps.feed(&ev(EventKind::Exit, 401, 0, 1_100 * MS, "c"));
        assert_eq!(settled(&mut eps)[0].fork_latency_ns, None);
    }

    #[test]
    fn peak_rate_is_the_busiest_second() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        for i in 0..3 {
            eps.feed(&copy(100, 100 * MS + i, HEAP, 0));
        }
        for i in 0..5 {
            eps.feed(&copy(200, 2_500 * MS + i, HEAP, 0));
        }
        eps.feed(&ev(EventKind::Exit, 200, 0, 3_000 * MS, "p"));
        let e = &settled(&mut eps)[0];
        assert_eq!(e.peak_copy_bytes_per_s, 5 * 4096);
        assert_eq!(e.copied_bytes, 8 * 4096);
        assert_eq!(e.cow_latency_ns.count, 0, "no latency known, none recorded");
    }

    #[test]
    fn fork_and_exec_reads_as_such_and_stops_counting_at_exec() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 300, 0, "bash"));
        eps.feed(&copy(300, MS / 10, STACK, 900));
        eps.feed(&copy(100, MS / 5, STACK, 900));
        eps.feed(&ev(EventKind::Exec, 300, 0, MS / 2, "ls"));
        // A parent copy from before the exec that arrives after it (from a
        // batch): the window is decided by time.
        eps.feed(&copy(100, MS / 4, STACK, 900));
        // After the exec: the child's new program and the parent's now
        // exclusive pages owe nothing to the fork.
        eps.feed(&copy(300, MS, HEAP, 900));
        eps.feed(&copy(100, MS, HEAP, 900));
        eps.feed(&ev(EventKind::Exit, 300, 0, 4 * MS, "ls"));
        let e = &settled(&mut eps)[0];
        assert_eq!((e.kind, e.child_comm.as_str()), ("fork+exec", "ls"));
        assert_eq!((e.parent_copies, e.child_copies), (2, 1));
        assert_eq!(e.exec_after_ns, Some(MS / 2));
        assert_eq!(e.child_lifetime_ns, Some(4 * MS));
        let line = episode_line(e);
        assert!(line.starts_with("fork+exec bash[100] -> ls[300]: fork -, exec after 500.0us"), "{line}");
    }

    #[test]
    fn a_parent_copy_goes_to_its_newest_sharing_fork() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 201, 0, "prefork"));
        eps.feed(&ev(EventKind::Spawn, 100, 202, MS, "prefork"));
        eps.feed(&copy(100, 2 * MS, HEAP, 0)); // -> 202
        eps.feed(&ev(EventKind::Exec, 202, 0, 3 * MS, "worker"));
        eps.feed(&copy(100, 4 * MS, HEAP, 0)); // 202 exec'd -> 201
        eps.feed(&ev(EventKind::Exit, 201, 0, 5 * MS, "prefork"));
        eps.feed(&copy(100, 6 * MS, HEAP, 0)); // no sharing fork left
        eps.feed(&ev(EventKind::Exit, 202, 0, 7 * MS, "worker"));
        let done = settled(&mut eps);
        let by_child = |c| done.iter().find(|e| e.child == c).unwrap();
        assert_eq!(by_child(201).parent_copies, 1);
        assert_eq!(by_child(202).parent_copies, 1);
        assert_eq!(done.len(), 2);
    }

    #[test]
    fn maps_are_reread_for_new_addresses_but_not_on_every_miss() {
        use std::{cell::Cell, rc::Rc};
        let reads = Rc::new(Cell::new(0));
        let r = reads.clone();
        let mut eps = Episodes::new(
            4096,
            Box::new(move |_| {
                r.set(r.get() + 1);
                // The second read sees a mapping made after the first.
                Some(if r.get() == 1 {
                    MAPS.into()
                } else {
                    format!("{MAPS}7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n").into()
                })
            }),
        );
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        eps.feed(&copy(100, MS, HEAP, 0));
        assert_eq!(reads.get(), 1);
        eps.feed(&copy(100, 2 * MS, 0x7f0000000000, 0)); // miss, too soon to re-read
        assert_eq!(reads.get(), 1);
        eps.feed(&copy(100, 200 * MS, 0x7f0000001000, 0)); // miss, re-read: found
        eps.feed(&copy(100, 201 * MS, 0x10, 0)); // miss, too soon again
        assert_eq!(reads.get(), 2);
        eps.feed(&ev(EventKind::Exit, 200, 0, 300 * MS, "p"));
        let regions = &settled(&mut eps)[0].top_regions;
        assert_eq!(regions[0], RegionBytes { region: UNMAPPED.into(), bytes: 2 * 4096 });
        assert!(regions.contains(&RegionBytes { region: "[anon 7f0000000000]".into(), bytes: 4096 }));
        assert!(regions.contains(&RegionBytes { region: "[heap]".into(), bytes: 4096 }));
    }

    #[test]
    fn a_gone_parent_leaves_its_childs_maps() {
        let mut eps = Episodes::new(4096, Box::new(|pid| (pid == 200).then(|| MAPS.into())));
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        eps.feed(&ev(EventKind::Exit, 100, 0, MS, "p"));
        eps.feed(&copy(200, 2 * MS, STACK, 0));
        eps.feed(&ev(EventKind::Exit, 200, 0, 3 * MS, "p"));
        let e = &settled(&mut eps)[0];
        assert_eq!(e.top_regions, vec![RegionBytes { region: "[stack]".into(), bytes: 4096 }]);
    }

    #[test]
    fn the_parents_layout_is_read_at_the_fork_for_copies_that_come_after_both_exited() {
        let alive = std::rc::Rc::new(std::cell::Cell::new(true));
        let a = alive.clone();
        let mut eps = Episodes::new(4096, Box::new(move |_| a.get().then(|| MAPS.into())));
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        // Both gone before their batched copies are read.
        alive.set(false);
        eps.feed(&copy(200, MS, STACK, 0));
        eps.feed(&copy(100, MS, HEAP, 0));
        eps.feed(&ev(EventKind::Exit, 200, 0, 2 * MS, "p"));
        let e = &settled(&mut eps)[0];
        let regions: Vec<&str> = e.top_regions.iter().map(|r| &*r.region).collect();
        assert_eq!(regions, ["[heap]", "[stack]"]);
    }

    #[test]
    fn running_and_lost_episodes_show_in_the_summary() {
        let mut eps = episodes().with_max_kept(1);
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        eps.feed(&copy(200, MS, HEAP, 0));
        // 200's exit was lost and its PID comes back.
        eps.feed(&ev(EventKind::Spawn, 100, 200, 2 * MS, "p"));
        eps.feed(&ev(EventKind::Spawn, 100, 201, 3 * MS, "p"));
        eps.feed(&ev(EventKind::Exit, 201, 0, 4 * MS, "p"));
        let finished = settled(&mut eps);
        let all = eps.all();
        assert_eq!(eps.dropped(), 1, "the lost one fell out of the bound of 1");
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].child, all[0].child_lifetime_ns), (201, Some(MS)));
        assert_eq!((all[1].child, all[1].child_lifetime_ns, all[1].child_copies), (200, None, 0));
        assert!(episode_line(&all[1]).contains("child still running"));
        assert_eq!(finished.len(), 1, "only real exits are reported as they happen");
    }

    #[test]
    fn a_closing_episode_takes_the_parents_late_copies_until_no_cpu_holds_older_ones() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 10 * MS, "p"));
        eps.feed(&copy(200, 20 * MS, HEAP, 1_000));
        eps.feed(&ev(EventKind::Exit, 200, 0, 50 * MS, "c"));
        // The exit was seen after the last reading of the CPUs' batches:
        // even with nothing unsent then, the episode waits for a reading
        // taken after it.
        eps.settle(None);
        assert!(eps.take_finished().is_empty() && eps.closing());
        // A CPU still holds the parent's outcomes from 40 ms: keep waiting.
        eps.settle(Some(40 * MS));
        assert!(eps.take_finished().is_empty());
        // They arrive, batched at 40 ms (before the exit): the fork's. A
        // copy from after the exit is not.
        for i in 0..3 {
            eps.feed(&copy(100, 40 * MS, ARENA + i * 4096, 1_000));
        }
        eps.feed(&copy(100, 60 * MS, HEAP, 1_000));
        // Only outcomes from after the exit are left unsent: done.
        eps.settle(Some(55 * MS));
        let done = eps.take_finished();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].parent_copies, done[0].child_copies), (3, 1));
        assert_eq!((done[0].child_lifetime_ns, done[0].exit_status), (Some(40 * MS), Some(0)));
        assert!(!eps.closing());
    }

    #[test]
    fn a_closing_episode_is_finished_after_a_bounded_wait_or_at_the_end() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 10 * MS, "p"));
        eps.feed(&ev(EventKind::Exit, 200, 0, 50 * MS, "c"));
        eps.feed(&ev(EventKind::Spawn, 100, 201, 60 * MS, "p"));
        eps.feed(&ev(EventKind::Exit, 201, 0, 70 * MS, "c"));
        // A CPU whose task neither faults nor leaves it holds an old
        // outcome for ever: the wait is bounded.
        for _ in 0..MAX_CLOSING_SETTLES {
            eps.settle(Some(MS));
            assert!(eps.take_finished().is_empty());
        }
        eps.settle(Some(MS));
        let done = eps.take_finished();
        assert_eq!(done.iter().map(|e| e.child).collect::<Vec<_>>(), [200, 201], "in exit order");
        // At the end of a run every closing episode is finished at once.
        eps.feed(&ev(EventKind::Spawn, 100, 202, 80 * MS, "p"));
        eps.feed(&ev(EventKind::Exit, 202, 0, 90 * MS, "c"));
        assert_eq!(
            eps.all().last().map(|e| e.child_lifetime_ns),
            Some(Some(10 * MS)),
            "closing counts as finished"
        );
        eps.finish_closing();
        assert_eq!(eps.take_finished().len(), 1);
        assert!(!eps.closing());
    }

    #[test]
    fn a_pid_reused_while_its_episode_is_closing_starts_a_new_one() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 10 * MS, "p"));
        eps.feed(&copy(200, 20 * MS, HEAP, 0));
        eps.feed(&ev(EventKind::Exit, 200, 0, 30 * MS, "c"));
        eps.feed(&ev(EventKind::Spawn, 100, 200, 40 * MS, "p"));
        eps.feed(&copy(200, 50 * MS, HEAP, 0));
        eps.feed(&copy(200, 50 * MS, STACK, 0));
        // The parent's copy from before the first exit, late from a batch,
        // still goes to the first life, which is still closing.
        eps.feed(&copy(100, 25 * MS, HEAP, 0));
        assert!(eps.take_finished().is_empty() && eps.closing());
        eps.feed(&ev(EventKind::Exit, 200, 0, 60 * MS, "c"));
        let done = settled(&mut eps);
        assert_eq!(done.len(), 2);
        // The first life, finished as it ended, not as a lost exit.
        assert_eq!((done[0].start_ns, done[0].child_lifetime_ns), (10 * MS, Some(20 * MS)));
        assert_eq!((done[0].child_copies, done[0].parent_copies), (1, 1));
        assert_eq!((done[1].start_ns, done[1].child_copies, done[1].parent_copies), (40 * MS, 2, 0));
        assert!(!eps.closing());
    }

    #[test]
    fn a_late_parent_copy_goes_to_the_newest_fork_covering_it_even_with_its_pid_reused() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 201, 10 * MS, "p")); // A, runs on
        eps.feed(&ev(EventKind::Spawn, 100, 202, 20 * MS, "p")); // c
        eps.feed(&ev(EventKind::Exit, 202, 0, 30 * MS, "c"));
        eps.feed(&ev(EventKind::Spawn, 100, 202, 40 * MS, "p")); // d takes c's PID
                                                                 // The parent's copy from 25 ms, late: c was the newest fork then.
        eps.feed(&copy(100, 25 * MS, HEAP, 0));
        // From 45 ms: d's.
        eps.feed(&copy(100, 45 * MS, HEAP, 0));
        eps.settle(None);
        eps.settle(None);
        let done = eps.take_finished();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].start_ns, done[0].parent_copies), (20 * MS, 1));
        let all = eps.all();
        let by_start = |t| all.iter().find(|e| e.start_ns == t).map(|e| e.parent_copies);
        assert_eq!((by_start(10 * MS), by_start(40 * MS)), (Some(0), Some(1)));
    }

    #[test]
    fn a_sampled_latency_stands_for_the_copies_around_it() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        eps.feed(&copy(200, MS, HEAP, 1_000)); // timed, stands for itself
        eps.feed(&Event { other: 16, ..copy(200, MS, HEAP, 3_000) }); // one timed of 16
        for _ in 0..15 {
            eps.feed(&copy(200, MS, HEAP, 0)); // not timed
        }
        eps.feed(&ev(EventKind::Exit, 200, 0, 2 * MS, "c"));
        let e = &settled(&mut eps)[0];
        assert_eq!(e.child_copies, 17);
        assert_eq!((e.cow_latency_ns.count, e.cow_latency_ns.min, e.cow_latency_ns.max), (17, 1_000, 3_000));
        assert!(e.cow_latency_ns.p50 >= 2_900, "16 of 17 weigh 3 us: {:?}", e.cow_latency_ns);
    }

    #[test]
    fn json_names_are_the_documented_schema() {
        let mut eps = episodes();
        eps.feed(&ev(EventKind::Spawn, 100, 200, 0, "p"));
        eps.feed(&ev(EventKind::Exit, 200, 0, MS, "p"));
        let v = serde_json::to_value(&settled(&mut eps)[0]).unwrap();
        for key in [
            "kind",
            "parent",
            "parent_comm",
            "child",
            "child_comm",
            "start_ns",
            "fork_latency_ns",
            "child_lifetime_ns",
            "parent_copies",
            "child_copies",
            "copied_bytes",
            "peak_copy_bytes_per_s",
            "cow_latency_ns",
            "top_regions",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert!(v["fork_latency_ns"].is_null());
        assert_eq!(v["exit_status"], 0);
        assert!(v.get("exec_after_ns").is_none());
    }

    #[test]
    fn the_threshold_keeps_costly_episodes_ranked_by_copies() {
        let ep = |copied_bytes, fork_ns: Option<u64>, start_ns| Episode {
            kind: "fork",
            parent: 1,
            parent_comm: "sh".into(),
            child: start_ns as u32,
            child_comm: "sh".into(),
            start_ns,
            fork_latency_ns: fork_ns,
            child_lifetime_ns: Some(1),
            child_exit_unseen: false,
            exec_after_ns: None,
            exit_status: Some(0),
            ending: None,
            memcg: None,
            parent_oom_killed: false,
            parent_copies: 0,
            child_copies: 0,
            copied_bytes,
            cow_failed: 0,
            peak_copy_bytes_per_s: 0,
            top_writers: Vec::new(),
            top_data: Vec::new(),
            cow_latency_ns: Default::default(),
            top_regions: Vec::new(),
        };
        let t = Threshold { min_copied_bytes: 1 << 20, min_fork_ns: 10_000_000 };
        let eps = vec![
            ep(40 << 10, Some(200_000), 1), // a shell's fork+exec: hidden
            ep(2 << 20, Some(200_000), 2),  // copied enough
            ep(0, Some(30_000_000), 3),     // froze its parent
            ep(64 << 20, None, 4),          // kernel-made, copied most
            ep(1 << 20, Some(1), 5),        // exactly the threshold
        ];
        let ranked: Vec<u64> = t.rank(eps.clone()).iter().map(|e| e.start_ns).collect();
        assert_eq!(ranked, [4, 2, 5, 3]);
        let all = Threshold { min_copied_bytes: 0, min_fork_ns: 0 };
        assert_eq!(all.rank(eps).len(), 5, "0 shows every episode");
    }

    #[test]
    fn at_the_end_a_running_child_and_an_unseen_exit_are_said_so() {
        let mut eps = Episodes::new(4096, Box::new(|_| Some(MAPS.into())));
        eps.feed(&ev(EventKind::Spawn, 100, 200, 10 * MS, "p"));
        eps.feed(&ev(EventKind::Spawn, 100, 300, 20 * MS, "p"));
        // 200 still ran at the cut-off; 300 was gone by then without a
        // traced exit.
        eps.mark_unseen_exits(|c| c != 300);
        let all = eps.all();
        let of = |c: u32| all.iter().find(|e| e.child == c).unwrap();
        assert!(!of(200).child_exit_unseen && of(300).child_exit_unseen);
        assert!(episode_line(of(200)).contains("fork -, child still running at the end"));
        assert!(episode_line(of(300)).contains("fork -, child exited (exit not traced)"));
        let v = serde_json::to_value(of(200)).unwrap();
        assert!(v["fork_latency_ns"].is_null());
        assert!(v.get("child_exit_unseen").is_none());
    }
}
