//! Deciding when the run ends: the traced targets, and their followed
//! children, until every one has exited.

use std::collections::HashSet;

use crate::event::{Event, What};

pub struct Targets {
    /// Processes whose end ends the run (`None`: whole system).
    pids: Option<HashSet<u32>>,
    /// Targets found dead by the last [`Targets::sweep`].
    suspects: HashSet<u32>,
    follow: bool,
}

impl Targets {
    /// `pids`: the traced PIDs whose end (with their followed descendants,
    /// when `follow`) ends the run; `None` for whole-system tracing.
    pub fn new(pids: Option<HashSet<u32>>, follow: bool) -> Self {
        Self { pids, suspects: HashSet::new(), follow }
    }

    pub fn apply(&mut self, e: &Event) {
        let Some(t) = self.pids.as_mut() else { return };
        match e.what {
            What::Spawn { child, .. } if self.follow && t.contains(&e.pid) => {
                t.insert(child);
            }
            What::Exit { .. } => {
                t.remove(&e.pid);
            }
            _ => {}
        }
    }

    /// True once every traced target (and followed child) has exited.
    pub fn gone(&self) -> bool {
        self.pids.as_ref().is_some_and(HashSet::is_empty)
    }

    /// Forgets targets that `alive` says are gone on two calls in a row,
    /// and returns how many it forgot. A target's exit normally arrives as
    /// an event; this is for the one whose exit event was dropped from a
    /// full ring buffer, which would otherwise keep the run going forever.
    /// Waiting for a second call gives any fork or exit event still in the
    /// ring time to be drained first, so a child forked just before its
    /// parent died is followed rather than missed.
    pub fn sweep(&mut self, alive: impl Fn(u32) -> bool) -> usize {
        let Some(targets) = self.pids.as_mut() else { return 0 };
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
}
