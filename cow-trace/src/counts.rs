//! Event counts: what the kernel classified (its counters, decoded here and
//! nowhere else) against what userspace received.

use cow_trace_common::{counter, EventKind, BATCH_COUNTED};
use serde::Serialize;

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
    /// Write faults that failed; on the tracepoint backend some replace a
    /// copy or zero-fill counted before (see `EventKind::CowFailed`).
    pub cow_failed: u64,
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
            EventKind::CowFailed => &mut self.cow_failed,
        }
    }

    pub fn count(&mut self, kind: EventKind) {
        *self.slot(kind) += 1;
    }

    /// Events of every kind.
    pub fn total(&self) -> u64 {
        self.spawns
            + self.fork_latencies
            + self.cow_copies
            + self.cow_reuses
            + self.zero_fills
            + self.cow_failed
            + self.huge_cows
            + self.exits
            + self.execs
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
    /// Records read from the ring buffer: a batch of fault outcomes counts
    /// once, however many it carries.
    pub ring_records: u64,
}

/// Totals counted in the kernel, independent of the ring buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelTotals {
    #[serde(flatten)]
    pub events: EventCounts,
    pub unclassified_faults: u64,
    pub traced_full: u64,
    /// Write faults whose latency was measured: a time slice's first 64,
    /// then one in `--sample-every`.
    pub timed_faults: u64,
}

/// The kernel's counters (`COUNTERS` and the counts the CPUs' fault
/// batches keep, see [`add_batch_counts`]), summed over CPUs, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events that found no room in the ring buffer.
    pub dropped: u64,
    pub totals: KernelTotals,
}

impl KernelCounters {
    /// `counters` indexed by `counter::*`.
    pub fn decode(counters: &[u64]) -> Self {
        let at = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
        Self {
            dropped: at(counter::DROPPED),
            totals: KernelTotals {
                events: EventCounts::from_kernel(counters),
                unclassified_faults: at(counter::UNCLASSIFIED),
                traced_full: at(counter::TRACED_FULL),
                timed_faults: at(counter::TIMED_FAULTS),
            },
        }
    }
}

/// Adds the totals that each CPU's fault batch keeps
/// (`FaultBatch::counted`, in `BATCH_COUNTED` order) to `counters`, the
/// `COUNTERS` array summed over CPUs, indexed by `counter::*`: the fault
/// hooks count an outcome in the batch they add it to, and in `COUNTERS`
/// only when they send it as an event of its own.
pub fn add_batch_counts<'a>(
    counters: &mut [u64],
    per_cpu: impl IntoIterator<Item = &'a [u64; BATCH_COUNTED.len()]>,
) {
    for counted in per_cpu {
        for (&idx, &n) in BATCH_COUNTED.iter().zip(counted) {
            if let Some(c) = counters.get_mut(idx as usize) {
                *c = c.wrapping_add(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_counts_every_kind() {
        let mut c = EventCounts::default();
        let kinds = (1..16).filter_map(EventKind::from_u32).collect::<Vec<_>>();
        assert!(kinds.contains(&EventKind::CowFailed), "{kinds:?}");
        kinds.iter().for_each(|&k| c.count(k));
        assert_eq!(c.total(), kinds.len() as u64);
    }

    #[test]
    fn kernel_counters_decode_by_index() {
        let mut c = [0u64; counter::COUNT as usize];
        c[counter::DROPPED as usize] = 3;
        c[counter::COW_COPIES as usize] = 2;
        c[counter::UNCLASSIFIED as usize] = 9;
        c[counter::TRACED_FULL as usize] = 1;
        c[counter::TIMED_FAULTS as usize] = 5;
        let k = KernelCounters::decode(&c);
        assert_eq!((k.dropped, k.totals.events.cow_copies), (3, 2));
        assert_eq!((k.totals.unclassified_faults, k.totals.traced_full), (9, 1));
        assert_eq!(k.totals.timed_faults, 5);
    }

    #[test]
    fn batch_counts_add_to_their_counters_on_every_cpu() {
        let mut c = [0u64; counter::COUNT as usize];
        c[counter::COW_COPIES as usize] = 2; // sent as events of their own
        c[counter::DROPPED as usize] = 1;
        let cpus = [[10, 20, 30, 40], [1, 2, 3, 4]];
        add_batch_counts(&mut c, &cpus);
        let k = KernelCounters::decode(&c);
        let e = k.totals.events;
        assert_eq!((e.cow_copies, e.cow_reuses, e.zero_fills), (13, 22, 33));
        assert_eq!((k.totals.timed_faults, k.dropped), (44, 1));
        assert_eq!(e.total(), 13 + 22 + 33, "no other kind moved: {e:?}");
    }
}
