//! The batch protocol, the same for every backend: each CPU gathers fault
//! outcomes in a `FaultBatch` and sends them as one ring-buffer record,
//! since a record per fault costs more than the rest of the hook; and a
//! write fault is timed only at the start of a time slice and then one in
//! `sample_every`, since each clock read costs about as much again.
//!
//! Invariants (the reasoning: docs/kernel-notes.md, "Fault batches"):
//! - A program changes a batch only between setting and clearing its `busy`
//!   mark. One that finds it set interrupted or preempted that writer on
//!   this CPU: it leaves the batch alone and sends its outcome as an event
//!   of its own. Only `do_wp_page`'s fexit can be preempted while writing,
//!   and the kernel never runs a program twice at once on one CPU.
//! - A batch holds only the running task's records: `sched_switch` sends it
//!   when a task leaves the CPU, and the fork, exec and exit hooks send it
//!   before their own event.
//! - No batch spans a traced fork, exec or exit (`WINDOW_EVENTS`), nor is it
//!   added to once a clock reading finds it older than `BATCH_MAX_AGE_NS`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use cow_trace_common::{
    counter, FaultBatch, FaultRecord, BATCH_COUNTED, FAULT_BATCH, FAULT_BATCH_HEADER, FAULT_BATCH_LEN,
    TIMED_PER_SLICE,
};

use crate::{
    emit::{emit, submit_flags, Detail, Outcome, EVENTS},
    shared::{bump, count, now, setting, Ids},
};

/// Each CPU's fault outcomes not yet sent. The loader reads what is left
/// here after detaching the programs.
#[map]
static BATCH: PerCpuArray<FaultBatch> = PerCpuArray::with_max_entries(1, 0);

/// A batch older than this when a clock reading shows it is sent before
/// the record is added.
const BATCH_MAX_AGE_NS: u64 = 50_000_000;

/// Counts the traced forks, execs and exits: the events that open or close
/// a fork's copy window. A batch started before the latest one is sent
/// before a record is added to it, so no record is dated before such an
/// event it followed.
///
/// A global in a data section of its own, as `CUTOFF` is (`shared`): one
/// load, read on every write fault.
#[unsafe(link_section = ".data.windows")]
static mut WINDOW_EVENTS: u64 = 0;

/// Where `FaultBatch::counted` keeps each outcome's total and the timed
/// faults' (`BATCH_COUNTED`'s order).
const COPIES: usize = 0;
const REUSES: usize = 1;
const ZERO_FILLS: usize = 2;
const TIMED: usize = 3;
const _: () = {
    assert!(BATCH_COUNTED[COPIES] == counter::COW_COPIES);
    assert!(BATCH_COUNTED[REUSES] == counter::COW_REUSES);
    assert!(BATCH_COUNTED[ZERO_FILLS] == counter::ZERO_FILLS);
    assert!(BATCH_COUNTED[TIMED] == counter::TIMED_FAULTS);
};

impl Outcome {
    #[inline(always)]
    fn counted_index(self) -> usize {
        match self {
            Outcome::Copy => COPIES,
            Outcome::Reuse => REUSES,
            Outcome::ZeroFill => ZERO_FILLS,
        }
    }
}

/// This CPU's batch, whatever its state: for the time-slice count alone.
#[inline(always)]
fn slot() -> Option<*mut FaultBatch> {
    BATCH.get_ptr_mut(0)
}

/// This CPU's batch, marked busy, unless another writer holds it (see the
/// module's invariants). Give it back with [`release`].
#[inline(always)]
fn take() -> Option<*mut FaultBatch> {
    let b = slot()?;
    // SAFETY: this CPU's slot of a per-CPU array; only programs on this CPU
    // touch it, and the mark keeps them from interleaving.
    unsafe {
        if core::ptr::read_volatile(&(*b).busy) != 0 {
            return None;
        }
        core::ptr::write_volatile(&mut (*b).busy, 1);
    }
    Some(b)
}

/// # Safety
/// `b` came from [`take`].
#[inline(always)]
unsafe fn release(b: *mut FaultBatch) {
    unsafe { core::ptr::write_volatile(&mut (*b).busy, 0) };
}

/// What a hook knew of the time when it produced an outcome: the count of
/// `WINDOW_EVENTS`, read first, then the clock if the hook read it (0 if
/// not). That order keeps a batch that sees a new count from being dated
/// before the event that moved it.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    events: u64,
    pub(crate) now_ns: u64,
}

impl Clock {
    /// The count alone; the clock, if a batch starts, is read after it.
    #[inline(always)]
    pub(crate) fn events() -> Clock {
        // SAFETY: plain data, written by other programs meanwhile.
        let events = unsafe { core::ptr::read_volatile(&raw const WINDOW_EVENTS) };
        Clock { events, now_ns: 0 }
    }

    /// The count, then the clock.
    #[inline(always)]
    pub(crate) fn read() -> Clock {
        let c = Clock::events();
        Clock { now_ns: now(), ..c }
    }
}

/// Counts a write fault of the running task's time slice and decides
/// whether it is timed: the slice's first `TIMED_PER_SLICE` faults are,
/// then one in `sample_every`. Past the first faults, fault n is timed when
/// it closes a run of `sample_every` and stands for that run
/// (`FaultRecord::SAMPLED`, returned as the flag for its record): a sample
/// describes faults that happened, never faults that may not come. The
/// clock is read only for a timed fault (docs/kernel-notes.md, "Timing
/// samples"). Call it once per write fault, where it starts.
#[inline(always)]
pub(crate) fn start_fault() -> (Clock, u64) {
    let Some(b) = slot() else {
        bump(counter::TIMED_FAULTS);
        return (Clock::read(), 0);
    };
    // SAFETY: this CPU's slot. The counts are no part of what `busy`
    // guards: a fault counted while another writer holds the batch only
    // moves the sampling by one (and, as with `COUNTERS`, an increment a
    // preempted writer overwrites is lost: a count, never a pointer).
    let n = unsafe {
        let n = (*b).slice_faults;
        (*b).slice_faults = n.wrapping_add(1);
        n
    };
    let every = setting!(sample_every);
    let flag = if n < TIMED_PER_SLICE || every <= 1 {
        0
    } else if (n + 1 - TIMED_PER_SLICE) & (every - 1) == 0 {
        FaultRecord::SAMPLED
    } else {
        return (Clock::events(), 0);
    };
    // SAFETY: as above.
    unsafe { (*b).counted[TIMED] = (*b).counted[TIMED].wrapping_add(1) };
    (Clock::read(), flag)
}

/// Records a fault outcome of thread `ids` at user instruction `ip` (the
/// system call's number for a kernel-mode fault). `addr` may carry
/// `FaultRecord::SAMPLED` and `FaultRecord::KERNEL`. Into this CPU's batch,
/// or, if another writer holds it, as an event of its own.
#[inline(always)]
pub(crate) fn record_fault(outcome: Outcome, ids: Ids, latency_ns: u64, addr: u64, ip: u64, clock: Clock) {
    match take() {
        Some(b) => {
            // SAFETY: taken above.
            unsafe {
                batch_fault(b, outcome, ids.tgid, latency_ns, addr, ip, clock);
                release(b);
            }
        }
        None => {
            let ts = if clock.now_ns != 0 { clock.now_ns } else { now() };
            let weight = if addr & FaultRecord::SAMPLED != 0 { setting!(sample_every) } else { 0 };
            let kernel = addr & FaultRecord::KERNEL != 0;
            let addr = addr & FaultRecord::ADDR_MASK;
            emit(ids, ts, Detail::Fault { outcome, latency_ns, addr, ip, kernel, weight });
        }
    }
}

/// Adds a fault outcome to batch `b`. The clock is read only when a batch
/// starts and `clock` has none: each read costs about as much as the rest
/// of the hook. A full batch is sent at once; a stale one (see the module's
/// invariants) is sent before the record is added.
///
/// # Safety
/// `b` came from [`take`].
#[inline(always)]
unsafe fn batch_fault(
    b: *mut FaultBatch,
    outcome: Outcome,
    pid: u32,
    latency_ns: u64,
    addr: u64,
    ip: u64,
    clock: Clock,
) {
    let kind = outcome.kind();
    let Clock { events, now_ns } = clock;
    // SAFETY: taken, so no other program touches it meanwhile.
    unsafe {
        let i = outcome.counted_index();
        if let Some(c) = (*b).counted.get_mut(i) {
            *c = c.wrapping_add(1);
        }
        let mut n = (*b).count as usize;
        let stale = events != (*b).window_events
            || (now_ns != 0 && now_ns.wrapping_sub((*b).ts_ns) > BATCH_MAX_AGE_NS);
        if n >= FAULT_BATCH_LEN || (n > 0 && stale) {
            send_batch(b);
            n = 0;
        }
        if n == 0 {
            (*b).ts_ns = if now_ns != 0 { now_ns } else { now() };
            (*b).window_events = events;
        }
        let Some(r) = (*b).records.get_mut(n) else {
            return;
        };
        *r = FaultRecord {
            addr_kind: addr | kind as u64,
            ip,
            latency_ns: if latency_ns > u32::MAX as u64 { u32::MAX } else { latency_ns as u32 },
            pid,
        };
        (*b).count = n as u32 + 1;
        if n + 1 >= FAULT_BATCH_LEN {
            send_batch(b);
        }
    }
}

/// Counts a fork, exec or exit of a traced process (see `WINDOW_EVENTS`).
/// Call it after the event's record is committed, with the event's time
/// read before: a batch that sees the new count is then dated after the
/// event and reaches the ring buffer after it.
#[inline(always)]
pub(crate) fn count_window_event() {
    let f = &raw mut WINDOW_EVENTS;
    // Not atomic (no atomic read-modify-write in Rust for BPF): two racing
    // writers still move the count (docs/kernel-notes.md, "Fault batches").
    // SAFETY: plain data.
    unsafe { core::ptr::write_volatile(f, core::ptr::read_volatile(f).wrapping_add(1)) };
}

/// Sends this CPU's batch if a clock reading `now_ns` (0: none) finds it
/// older than `BATCH_MAX_AGE_NS`: a timed fault checks the batch's age even
/// when it adds nothing to it now.
#[inline(always)]
pub(crate) fn cut_if_old(now_ns: u64) {
    if now_ns == 0 {
        return;
    }
    if let Some(b) = take() {
        // SAFETY: taken above.
        unsafe {
            if (*b).count > 0 && now_ns.wrapping_sub((*b).ts_ns) > BATCH_MAX_AGE_NS {
                send_batch(b);
            }
            release(b);
        }
    }
}

/// Sends this CPU's batch, if it holds anything and no other writer holds
/// it (then it holds that writer's records, not the caller's).
#[inline(always)]
pub(crate) fn flush_batch() {
    if let Some(b) = take() {
        // SAFETY: taken above.
        unsafe {
            send_batch(b);
            release(b);
        }
    }
}

/// Sends this CPU's batch and starts a new time slice for its sampling:
/// the running task is leaving the CPU. A batch a preempted writer holds
/// stays with it: that task runs on this CPU again (a BPF program is never
/// migrated) and its next record, or the next switch, sends it.
#[inline(always)]
pub(crate) fn end_slice() {
    flush_batch();
    if let Some(b) = slot() {
        // SAFETY: this CPU's slot; see `start_fault`.
        unsafe { (*b).slice_faults = 0 };
    }
}

/// # Safety
/// `b` came from [`take`].
#[inline(always)]
unsafe fn send_batch(b: *mut FaultBatch) {
    let n = unsafe { (*b).count } as usize;
    if n == 0 {
        return;
    }
    // The bound lets the verifier check the length against the map value.
    let n = if n > FAULT_BATCH_LEN { FAULT_BATCH_LEN } else { n };
    let len = FAULT_BATCH_HEADER + n * size_of::<FaultRecord>();
    unsafe {
        (*b).magic = FAULT_BATCH;
        let bytes = core::slice::from_raw_parts(b as *const u8, len);
        if EVENTS.output::<[u8]>(bytes, submit_flags(Outcome::Copy.kind())).is_err() {
            count(counter::DROPPED, n as u64);
        }
        (*b).count = 0;
    }
}
