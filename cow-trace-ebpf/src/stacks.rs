//! `--stacks`: copies counted by the user stack that made them, in the
//! kernel, so that no stack crosses the ring buffer and the fault records
//! keep their layout.
//!
//! The stack is the faulting task's user stack: its user registers do not
//! change while the kernel handles the fault, so the walk (frame pointers,
//! from `task_pt_regs`) can be taken anywhere inside it. It is taken where
//! a backend sees the fault allocate its page (the only faults whose stack
//! can count) and counted where the backend decides the fault copied; the
//! tracepoint backend can still take a copy back when the fault fails,
//! which the thread's slot allows until its next fault.
//!
//! Every function returns at once unless `CONFIG.stacks` is set, and the
//! loader sizes the maps to one entry then: off, this module costs a
//! load and a branch where it is called.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext as _, RawTracePointContext},
};
use cow_trace_common::{stack_lost, StackKey};

use crate::shared::setting;

/// User stacks by id. Sized at load (`STACK_TRACE_ENTRIES` in the loader).
#[map]
static STACK_TRACES: StackTrace = StackTrace::with_max_entries(1, 0);

/// Copies by (image, process, stack). Per CPU: the BPF side has no atomic
/// add, and two threads of a process can copy through one stack at once.
#[map]
static STACK_COPIES: PerCpuHashMap<StackKey, u64> = PerCpuHashMap::with_max_entries(1, 0);

/// Each traced process's image: when its address space was made (see
/// [`StackKey`]).
#[map]
static IMAGES: HashMap<u32, u64> = HashMap::with_max_entries(1, 0);

/// The stack last taken by each thread, direct-mapped by thread id as the
/// `PENDING` table of write faults in flight is.
#[map]
static STACK_SLOTS: Array<Slot> = Array::with_max_entries(1, 0);
/// The size the loader gives `STACK_SLOTS` when stacks are on.
pub(crate) const SLOTS: u32 = 1 << 16;

/// Copies and images that found their map full (`stack_lost::*` indexes).
#[map]
static STACK_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(stack_lost::COUNT, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    tid: u32,
    /// A stack id, or a `stack_lost` reason.
    stack_id: u32,
}

#[inline(always)]
fn on() -> bool {
    setting!(stacks) != 0
}

/// A traced process's address space starts at `ts` (its fork or exec).
#[inline(always)]
pub(crate) fn new_image(tgid: u32, ts: u64) {
    if on() && IMAGES.insert(tgid, ts, 0).is_err() {
        lose(stack_lost::IMAGES_FULL);
    }
}

/// A traced process is gone: its PID may come back as another program.
#[inline(always)]
pub(crate) fn gone(tgid: u32) {
    if on() {
        let _ = IMAGES.remove(tgid);
    }
}

/// Takes the current task's user stack for thread `tid`'s fault.
#[inline(always)]
pub(crate) fn take(ctx: &RawTracePointContext, tid: u32) {
    if !on() {
        return;
    }
    let stack_id = match ctx.get_stackid(&STACK_TRACES, BPF_F_USER_STACK as u64) {
        Ok(id) => id as u32,
        Err(e) if e == -EEXIST => stack_lost::COLLISION,
        Err(_) => stack_lost::FAILED,
    };
    if let Some(s) = STACK_SLOTS.get_ptr_mut(tid & (SLOTS - 1)) {
        // SAFETY: a valid slot; only a thread with a colliding id writes it
        // too, and then the tid check below tells.
        unsafe { *s = Slot { tid, stack_id } };
    }
}

/// Counts a copy (`delta` 1) or takes one back (`u64::MAX`, that is -1)
/// for the stack taken for thread `tid`'s fault.
#[inline(always)]
pub(crate) fn count(tgid: u32, tid: u32, delta: u64) {
    if !on() {
        return;
    }
    let stack_id = match STACK_SLOTS.get(tid & (SLOTS - 1)) {
        Some(s) if s.tid == tid => s.stack_id,
        _ => stack_lost::NOT_TAKEN,
    };
    // SAFETY: the value is copied out.
    let image = unsafe { IMAGES.get(tgid) }.copied().unwrap_or(0);
    let key = StackKey { image, tgid, stack_id };
    match STACK_COPIES.get_ptr_mut(key) {
        // SAFETY: this CPU's value. A preempted fentry program can let
        // another program run on this CPU, but only the one program that
        // counts a backend's copies changes these values, and the kernel
        // never runs one program twice at once on a CPU (`prog->active`).
        Some(n) => unsafe { *n = (*n).wrapping_add(delta) },
        None => {
            if STACK_COPIES.insert(key, delta, 0).is_err() {
                lose(stack_lost::COUNTS_FULL);
            }
        }
    }
}

#[inline(always)]
fn lose(idx: u32) {
    if let Some(n) = STACK_LOST.get_ptr_mut(idx) {
        // SAFETY: this CPU's slot.
        unsafe { *n += 1 };
    }
}

/// `bpf_get_stackid`'s error when the stack's bucket holds another stack.
const EEXIST: i32 = 17;
