//! Exited processes, kept for the summary, and the attribution of fault
//! outcomes that arrive after their process's exit.
//!
//! A process's exit event comes from its last thread; another thread's
//! outcomes, batched on its own CPU, can arrive after it (see the BPF side),
//! and must count for the exited process, not open a new record for a dead
//! (or reused) PID.

use std::collections::VecDeque;

use crate::process::Proc;

/// How many of the most recently exited processes a late fault event is
/// matched against.
const LATE_FAULT_LOOKBACK: usize = 256;

/// Where an exited process is kept: an index into the exited list.
pub struct Owner(usize);

pub struct Retired {
    /// Exited processes that did something, oldest first.
    exited: VecDeque<Proc>,
    /// The last `LATE_FAULT_LOOKBACK` that exited having done nothing, in
    /// case a late fault event of theirs comes.
    idle: VecDeque<Proc>,
    /// Bound on `exited`: older ones are folded into `folded`.
    max_exited: usize,
    folded: Option<Proc>,
    folded_count: u64,
}

impl Retired {
    pub fn new(max_exited: usize) -> Self {
        Self { exited: VecDeque::new(), idle: VecDeque::new(), max_exited, folded: None, folded_count: 0 }
    }

    pub fn retire(&mut self, mut p: Proc) {
        // Its histograms are mostly done growing: kept possibly until the
        // summary, they hold only the buckets they use.
        p.figures.shrink_to_fit();
        if p.figures.is_empty() {
            self.idle.push_back(p);
            if self.idle.len() > LATE_FAULT_LOOKBACK {
                self.idle.pop_front();
            }
            return;
        }
        self.make_room();
        self.exited.push_back(p);
    }

    /// The exited process that held `pid` at `ts_ns`: of those that exited
    /// since, the first to exit. `None` when none did (lately).
    pub fn owner_at(&mut self, pid: u32, ts_ns: u64) -> Option<Owner> {
        let exited_since = |p: &Proc| p.pid == pid && p.exit_ns.is_some_and(|t| ts_ns <= t);
        let n = self.exited.len();
        let done = (0..n.min(LATE_FAULT_LOOKBACK))
            .map(|k| n - 1 - k)
            .filter(|&i| exited_since(&self.exited[i]))
            .min_by_key(|&i| self.exited[i].exit_ns);
        let idle = (0..self.idle.len())
            .filter(|&i| exited_since(&self.idle[i]))
            .min_by_key(|&i| self.idle[i].exit_ns);
        let exit_of = |p: Option<&Proc>| p.and_then(|p| p.exit_ns).unwrap_or(u64::MAX);
        let (done_at, idle_at) =
            (exit_of(done.map(|i| &self.exited[i])), exit_of(idle.map(|i| &self.idle[i])));
        if let Some(i) = idle.filter(|_| idle_at < done_at) {
            // It did something after all: keep it with the others.
            let p = self.idle.remove(i).expect("found above");
            self.make_room();
            self.exited.push_back(p);
            return Some(Owner(self.exited.len() - 1));
        }
        done.map(Owner)
    }

    pub fn get_mut(&mut self, o: Owner) -> &mut Proc {
        &mut self.exited[o.0]
    }

    /// Folds the oldest exited processes into one row until one more fits
    /// in `max_exited`: made before the push, room keeps the list from
    /// ever growing (to twice that) once full.
    fn make_room(&mut self) {
        while self.exited.len() >= self.max_exited {
            let old = self.exited.pop_front().expect("non-empty");
            let f = self.folded.get_or_insert_with(|| Proc::new(0, 0, String::new()));
            f.figures.merge(&old.figures);
            self.folded_count += 1;
        }
    }

    /// Exited processes that did something, not folded.
    pub fn exited(&self) -> impl Iterator<Item = &Proc> {
        self.exited.iter()
    }

    /// The folded ones as one record, and how many they are.
    pub fn folded(&self) -> Option<(&Proc, u64)> {
        self.folded.as_ref().map(|f| (f, self.folded_count))
    }

    /// Every record whose figures can still change.
    pub fn all_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.exited.iter_mut().chain(self.folded.iter_mut())
    }
}
