//! The batch protocol: each CPU gathers fault outcomes in a `FaultBatch`
//! and sends them as one ring-buffer record, since a record per fault costs
//! more than the rest of the hook.
//!
//! Invariants (the reasoning: docs/kernel-notes.md, "Fault batches"):
//! - Only hooks that run with preemption off write a batch.
//! - A batch holds only the running task's records: `sched_switch` sends it
//!   when a task leaves the CPU, and the fork, exec and exit hooks send it
//!   before their own event.
//! - No batch spans a traced fork, exec or exit (`WINDOW_EVENTS`), nor is it
//!   added to once a clock reading finds it older than `BATCH_MAX_AGE_NS`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use cow_trace_common::{counter, FaultBatch, FaultRecord, FAULT_BATCH, FAULT_BATCH_HEADER, FAULT_BATCH_LEN};

use crate::{
    emit::{submit_flags, Outcome, EVENTS},
    shared::{bump, count, now},
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
#[map]
static WINDOW_EVENTS: Array<u64> = Array::with_max_entries(1, 0);

/// This CPU's batch. Only for hooks that run with preemption disabled: two
/// tasks interleaving on one CPU's batch would corrupt it.
#[inline(always)]
pub(crate) fn batch() -> Option<*mut FaultBatch> {
    BATCH.get_ptr_mut(0)
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
        let events = match WINDOW_EVENTS.get_ptr(0) {
            // SAFETY: a valid slot of an array map.
            Some(f) => unsafe { core::ptr::read_volatile(f) },
            None => 0,
        };
        Clock { events, now_ns: 0 }
    }

    /// The count, then the clock.
    #[inline(always)]
    pub(crate) fn read() -> Clock {
        let c = Clock::events();
        Clock { now_ns: now(), ..c }
    }
}

/// Adds a fault outcome of process `pid` at user instruction `ip` to batch
/// `b`. `addr` may carry
/// `FaultRecord::SAMPLED`. The clock is read only when a batch starts and
/// `clock` has none: each read costs about as much as the rest of the hook.
/// A full batch is sent at once; a stale one (see the module's invariants)
/// is sent before the record is added.
///
/// # Safety
/// `b` is this CPU's batch and preemption is off.
#[inline(always)]
pub(crate) unsafe fn batch_fault(
    b: *mut FaultBatch,
    outcome: Outcome,
    pid: u32,
    latency_ns: u64,
    addr: u64,
    ip: u64,
    clock: Clock,
) {
    let kind = outcome.kind();
    bump(kind as u32);
    let Clock { events, now_ns } = clock;
    // SAFETY: this CPU's slot; preemption is off, so no other task touches it.
    unsafe {
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
    if let Some(f) = WINDOW_EVENTS.get_ptr_mut(0) {
        // Not atomic (no atomic read-modify-write in Rust for BPF): two
        // racing writers still move the count (docs/kernel-notes.md,
        // "Fault batches").
        // SAFETY: a valid slot of an array map.
        unsafe { core::ptr::write_volatile(f, core::ptr::read_volatile(f).wrapping_add(1)) };
    }
}

/// Sends batch `b` if a clock reading `now_ns` (0: none) finds it older
/// than `BATCH_MAX_AGE_NS`.
///
/// # Safety
/// As for [`batch_fault`].
#[inline(always)]
pub(crate) unsafe fn cut_if_old(b: *mut FaultBatch, now_ns: u64) {
    // SAFETY: see `batch`.
    unsafe {
        if now_ns != 0 && (*b).count > 0 && now_ns.wrapping_sub((*b).ts_ns) > BATCH_MAX_AGE_NS {
            send_batch(b);
        }
    }
}

/// Sends this CPU's batch, if it holds anything. Callers run with
/// preemption off.
#[inline(always)]
pub(crate) fn flush_batch() {
    if let Some(b) = batch() {
        // SAFETY: see `batch`.
        unsafe { send_batch(b) };
    }
}

/// Sends this CPU's batch and starts a new time slice for its sampling:
/// the running task is leaving the CPU.
#[inline(always)]
pub(crate) fn end_slice() {
    if let Some(b) = batch() {
        // SAFETY: see `batch`; preemption is off in the scheduler.
        unsafe {
            send_batch(b);
            (*b).slice_faults = 0;
        }
    }
}

/// # Safety
/// As for [`batch_fault`].
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
