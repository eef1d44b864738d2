//! cow-trace's BPF programs: the tracepoint backend here, the kprobe and
//! fentry backends in their modules. All live in one object; the loader
//! loads only the chosen backend's programs plus the shared
//! `sched_process_fork` / `sched_process_exit` hooks, which keep the traced
//! set (children followed, exits) for every backend.
//!
//! Every hook here is either a raw tracepoint (typed arguments, no record
//! copy: a fraction of a classic tracepoint's cost) or, for the clone/fork
//! syscalls alone, a classic `syscalls:*` tracepoint, which only fires on
//! those syscalls.
//!
//! Filtering happens first: a hook that does not concern a traced process
//! returns before touching any map it does not need.
//!
//! The CoW classification rule: a user write fault on a present page
//! (x86 error code bits 0 and 1 set) opens a *pending* fault for the thread.
//! If that thread then allocates an order-0 movable page before its next
//! fault, syscall or exit, the fault copied a page (`wp_page_copy` allocates
//! exactly one; a zeroed one when the page was the shared zero page, which
//! is told apart as a zero-fill); otherwise it was resolved by reusing the
//! page in place.
#![no_std]
#![no_main]

mod fentry;
mod kernel_path;
mod kprobe;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use cow_trace_common::{
    counter, Config, Event, EventKind, FaultBatch, FaultRecord, FAULT_BATCH, FAULT_BATCH_HEADER,
    FAULT_BATCH_LEN, FLAG_NO_SYSCALL, TIMED_PER_SLICE, TRACED_CHILD,
};

/// Written by the loader before the object is loaded (read-only after).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    trace_all: 0,
    follow: 0,
    task_pid: 0,
    task_tgid: 0,
    task_signal: 0,
    task_exit_code: 0,
    signal_live: 0,
    sys_exit_ret: 0,
    self_tgid: 0,
    empty: 0,
    wakeup_bytes: 0,
    sample_every: 1,
    vmf_address: 0,
    wp_copy_hooked: 0,
};

/// Events to userspace. The loader resizes it (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Traced thread-group ids (unused when `trace_all`).
#[map]
static TRACED: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// Write faults waiting for their outcome: a direct-mapped table indexed
/// by thread id modulo its size. Array lookups are inlined by the verifier
/// into an address computation, where a hash lookup is a function call with
/// hashing and locking: this is the hottest path of the tool, run on every
/// write fault and every page allocation. Two threads whose ids collide
/// with faults open at the same moment are rare; when it happens the
/// older fault is counted as unclassified, never guessed.
#[map]
static PENDING: Array<Pending> = Array::with_max_entries(PENDING_SLOTS, 0);
const PENDING_SLOTS: u32 = 1 << 16;

/// Clone/fork syscalls in flight in traced threads, keyed by thread id.
#[map]
static FORKS: HashMap<u32, ForkStart> = HashMap::with_max_entries(16384, 0);

/// Each CPU's fault outcomes not yet sent (see `batch_fault`). The loader
/// reads what is left here after detaching the programs.
#[map]
static BATCH: PerCpuArray<FaultBatch> = PerCpuArray::with_max_entries(1, 0);

/// A batch older than this when a clock reading shows it is sent before
/// the record is added.
const BATCH_MAX_AGE_NS: u64 = 50_000_000;

/// Counts the traced process events that open or close a fork's copy
/// window: forks, execs and exits. A batch started before the latest one is
/// sent before a record is added to it, so that no batch spans such an
/// event: its records, which carry the batch's start time, are then never
/// dated before an event they followed (another thread of the process, or
/// the parent, keeps faulting on its own CPU).
#[map]
static WINDOW_EVENTS: Array<u64> = Array::with_max_entries(1, 0);

/// In-kernel totals and drop counts, indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[repr(C)]
struct Pending {
    /// Fault time when the fault is timed, else 0.
    start: u64,
    /// The faulting address rounded down to 4 KiB, with
    /// `FaultRecord::SAMPLED` when the fault is a timed sample.
    addr: u64,
    tgid: u32,
    /// The thread whose fault is open in this slot; 0 when none is (thread
    /// 0 is the idle task, which takes no user faults).
    tid: u32,
}

/// The slot of thread `tid`, whoever holds it now.
#[inline(always)]
fn pending_slot(tid: u32) -> Option<*mut Pending> {
    PENDING.get_ptr_mut(tid & (PENDING_SLOTS - 1))
}

#[repr(C)]
struct ForkStart {
    ts: u64,
    /// Child tgid once `sched_process_fork` has seen it; 0 for threads.
    child: u32,
    _pad: u32,
}

/// x86 page-fault error code: bit 0 = protection fault on a present page,
/// bit 1 = write access.
const PF_PROT_WRITE: u64 = 0b11;
/// `__GFP_MOVABLE`: one of the four zone-modifier bits, fixed since they were
/// introduced. User pages (including CoW copies) carry it; page tables and
/// atomic allocations from interrupts do not.
const GFP_MOVABLE: u32 = 0x08;
/// `__GFP_ZERO`, bit 8 from Linux 2.6 to 6.18 (`___GFP_ZERO_BIT = 8`).
/// A write fault on the shared zero page asks for a zeroed page; a real
/// copy does not.
const GFP_ZERO: u32 = 0x100;

/// One field of `CONFIG`. A volatile read stops the compiler from folding
/// the zeros the object was compiled with; reading one field at a time keeps
/// the hot hooks from loading the whole struct for the one or two they use.
macro_rules! setting {
    ($field:ident) => {{
        // SAFETY: CONFIG is plain data, written only before loading.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&crate::CONFIG.$field) };
        v
    }};
}
pub(crate) use setting;

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn is_traced(tgid: u32) -> bool {
    // SAFETY: lookup result is only tested for presence.
    tgid != setting!(self_tgid) && (setting!(trace_all) != 0 || unsafe { TRACED.get(&tgid).is_some() })
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Fault events wake the reader only once `CONFIG.wakeup_bytes` are
/// waiting; below that, userspace drains on a short timer. A wake-up per
/// event (the default, whenever the reader has caught up) costs an
/// irq_work and a cross-CPU wake-up, more than the fault being measured.
#[inline(always)]
fn submit_flags(kind: EventKind) -> u64 {
    match kind {
        // A fork wakes the reader even behind records it has not read yet
        // (the parent's batch, sent just before): it reads the parent's
        // layout while the parent surely lives, for the copies to come.
        EventKind::Spawn => BPF_RB_FORCE_WAKEUP as u64,
        // Other rare events that end runs: wake the reader as soon as it
        // waits.
        EventKind::Exit | EventKind::ForkLatency | EventKind::Exec => 0,
        _ => {
            if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= setting!(wakeup_bytes) as u64 {
                BPF_RB_FORCE_WAKEUP as u64
            } else {
                BPF_RB_NO_WAKEUP as u64
            }
        }
    }
}

/// Sends one event. `ts` is the caller's timestamp (one clock read per
/// hook). Only process-level events carry a comm: fault events are many,
/// and userspace names processes from these and from /proc.
#[inline(always)]
fn emit(kind: EventKind, pid: u32, tid: u32, other: u32, ts: u64, latency_ns: u64, addr: u64, flags: u32) {
    bump(kind as u32);
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            let comm = match kind {
                EventKind::Spawn | EventKind::Exit | EventKind::ForkLatency | EventKind::Exec => {
                    bpf_get_current_comm().unwrap_or([0; 16])
                }
                _ => [0; 16],
            };
            entry.write(Event {
                kind: kind as u32,
                pid,
                tid,
                other,
                ts_ns: ts,
                latency_ns,
                addr,
                comm,
                flags,
                _reserved: 0,
            });
            entry.submit(submit_flags(kind));
        }
        None => bump(counter::DROPPED),
    }
}

/// This CPU's batch. Only for hooks that run with preemption disabled
/// (the kernel's ordinary tracepoints): two tasks interleaving on one CPU's
/// batch would corrupt it. `sys_enter` belongs to the syscall tracepoints,
/// which may fault (and so be preemptible) from 6.13, so it emits directly.
/// The one writer that can nest is `mm_page_alloc` from an interrupt, and it
/// touches the batch only for a thread with an open pending fault, whose
/// slot every batched writer clears first.
///
/// Ordering: a batch holds only the running task's records, because
/// `sched_switch` sends it whenever a task leaves the CPU; and the fork,
/// exec and exit hooks send it before their own event. So a thread's fault
/// outcomes reach userspace before its own exit, a parent thread's outcomes
/// from before a fork before the fork, and a task's records never wait on a
/// CPU it has left. Another thread of the same process can still be running
/// elsewhere with outcomes unsent; userspace allows for that (episodes wait
/// for the CPUs' batches, and late outcomes of a process that has exited go
/// to its record).
#[inline(always)]
fn batch() -> Option<*mut FaultBatch> {
    BATCH.get_ptr_mut(0)
}

/// Adds a fault outcome to batch `b`. `addr` may carry
/// `FaultRecord::SAMPLED`; `clock` is what the caller read (see `Clock`;
/// its clock reading is 0 if it has none: the clock is read only when a
/// batch starts, as each read costs about as much as the rest of the hook). A full batch is sent at once. A
/// batch started before the latest fork, exec or exit of a traced process,
/// or older than `BATCH_MAX_AGE_NS` by the clock reading, is sent before the record
/// is added, which starts a new one. So a record's time is never before
/// such an event it followed, and at most `BATCH_MAX_AGE_NS` early, except
/// for the untimed faults of a burst (at most `sample_every - 1` in a row)
/// after a pause in which the task was never switched out.
#[inline(always)]
unsafe fn batch_fault(
    b: *mut FaultBatch,
    kind: EventKind,
    pid: u32,
    latency_ns: u64,
    addr: u64,
    clock: Clock,
) {
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
            latency_ns: if latency_ns > u32::MAX as u64 { u32::MAX } else { latency_ns as u32 },
            pid,
        };
        (*b).count = n as u32 + 1;
        if n + 1 >= FAULT_BATCH_LEN {
            send_batch(b);
        }
    }
}

/// What a hook knew of the time when it produced an outcome: the count of
/// `WINDOW_EVENTS`, read first, then the clock if the hook read it (0 if
/// not). Reading them in that order is what keeps a batch that sees a new
/// count from being dated before the event that moved it.
#[derive(Clone, Copy)]
struct Clock {
    events: u64,
    now_ns: u64,
}

impl Clock {
    /// The count alone; the clock, if a batch starts, is read after it.
    #[inline(always)]
    fn events() -> Clock {
        let events = match WINDOW_EVENTS.get_ptr(0) {
            // SAFETY: a valid slot of an array map.
            Some(f) => unsafe { core::ptr::read_volatile(f) },
            None => 0,
        };
        Clock { events, now_ns: 0 }
    }

    /// The count, then the clock.
    #[inline(always)]
    fn read() -> Clock {
        let c = Clock::events();
        Clock { now_ns: now(), ..c }
    }
}

/// Counts a fork, exec or exit of a traced process (see `WINDOW_EVENTS`).
/// Called after the event's record is committed and with the event's time
/// read before it: a batch that sees the new count is dated after the event
/// and reaches the ring buffer after it.
#[inline(always)]
fn count_window_event() {
    if let Some(f) = WINDOW_EVENTS.get_ptr_mut(0) {
        // Not atomic (the BPF target has no atomic read-modify-write in
        // Rust): two events racing here can both write the same value,
        // which still differs from what batches started before them saw.
        // Only three racing within nanoseconds could move it back.
        // SAFETY: a valid slot of an array map.
        unsafe { core::ptr::write_volatile(f, core::ptr::read_volatile(f).wrapping_add(1)) };
    }
}

/// Sends batch `b` if a clock reading `now_ns` (0: none) finds it older
/// than `BATCH_MAX_AGE_NS`.
#[inline(always)]
unsafe fn cut_if_old(b: *mut FaultBatch, now_ns: u64) {
    // SAFETY: see `batch`.
    unsafe {
        if now_ns != 0 && (*b).count > 0 && now_ns.wrapping_sub((*b).ts_ns) > BATCH_MAX_AGE_NS {
            send_batch(b);
        }
    }
}

/// Sends this CPU's batch, if it holds anything.
#[inline(always)]
fn flush_batch() {
    if let Some(b) = batch() {
        // SAFETY: see `batch`; callers run with preemption off.
        unsafe { send_batch(b) };
    }
}

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
        if EVENTS.output::<[u8]>(bytes, submit_flags(EventKind::CowCopy)).is_err() {
            if let Some(c) = COUNTERS.get_ptr_mut(counter::DROPPED) {
                *c += n as u64;
            }
        }
        (*b).count = 0;
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

/// Resolves the thread's pending write fault, if any, as a reuse: into
/// this CPU's batch when `batched` (preemption off), else directly.
#[inline(always)]
fn settle_pending(tid: u32, batched: bool) {
    let Some(p) = pending_slot(tid) else {
        return;
    };
    // SAFETY: a valid slot; only a thread with a colliding id could write
    // it concurrently.
    unsafe {
        if (*p).tid != tid {
            return;
        }
        (*p).tid = 0;
        if batched {
            if let Some(b) = batch() {
                batch_fault(
                    b,
                    EventKind::CowReuse,
                    (*p).tgid,
                    0,
                    (*p).addr & !FaultRecord::SAMPLED,
                    Clock::events(),
                );
            }
        } else {
            let addr = (*p).addr & FaultRecord::ADDR_MASK;
            emit(EventKind::CowReuse, (*p).tgid, tid, 0, now(), 0, addr, 0);
        }
    }
}

// ---------------------------------------------------------------- forks ----

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Result<(), i32> {
    let child: *const u8 = ctx.arg(1);
    let (child_pid, child_tgid): (i32, i32) =
        unsafe { (read_at(child, setting!(task_pid))?, read_at(child, setting!(task_tgid))?) };
    if child_pid != child_tgid {
        return Ok(()); // a new thread, not a new process
    }
    let (tgid, tid) = current_ids();
    if !is_traced(tgid) {
        return Ok(());
    }
    let child = child_tgid as u32;
    if setting!(follow) != 0 && setting!(trace_all) == 0 && TRACED.insert(&child, &TRACED_CHILD, 0).is_err() {
        bump(counter::TRACED_FULL);
        warn!(ctx, "cow-trace: cannot follow pid {}: traced-process map is full", child);
    }
    flush_batch(); // the parent's copies before the fork, ahead of it
    let mut flags = FLAG_NO_SYSCALL;
    if let Some(f) = FORKS.get_ptr_mut(&tid) {
        // SAFETY: entry owned by this thread until its syscall exits.
        unsafe { (*f).child = child };
        flags = 0;
    }
    emit(EventKind::Spawn, tgid, tid, child, now(), 0, 0, flags);
    count_window_event();
    Ok(())
}

#[inline(always)]
fn fork_enter() {
    let (tgid, tid) = current_ids();
    if !is_traced(tgid) {
        return;
    }
    let _ = FORKS.insert(&tid, &ForkStart { ts: now(), child: 0, _pad: 0 }, 0);
}

#[inline(always)]
fn fork_exit(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(start) = (unsafe { FORKS.get(&tid) }) else {
        return;
    };
    let (ts, child) = (start.ts, start.child);
    let _ = FORKS.remove(&tid);
    let ret: i64 = unsafe { ctx.read_at(setting!(sys_exit_ret) as usize) }.unwrap_or(-1);
    // A failed clone, or one that made a thread: nothing to report.
    if child == 0 || ret <= 0 {
        return;
    }
    let t = now();
    emit(EventKind::ForkLatency, tgid, tid, child, t, t.saturating_sub(ts), 0, 0);
}

macro_rules! fork_syscall {
    ($enter:ident, $exit:ident, $enter_tp:literal, $exit_tp:literal) => {
        #[tracepoint(category = "syscalls", name = $enter_tp)]
        pub fn $enter(_ctx: TracePointContext) -> u32 {
            if setting!(empty) != 0 {
                return 0;
            }
            fork_enter();
            0
        }

        #[tracepoint(category = "syscalls", name = $exit_tp)]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            if setting!(empty) != 0 {
                return 0;
            }
            fork_exit(&ctx);
            0
        }
    };
}

fork_syscall!(enter_clone, exit_clone, "sys_enter_clone", "sys_exit_clone");
fork_syscall!(enter_clone3, exit_clone3, "sys_enter_clone3", "sys_exit_clone3");
fork_syscall!(enter_fork, exit_fork, "sys_enter_fork", "sys_exit_fork");
fork_syscall!(enter_vfork, exit_vfork, "sys_enter_vfork", "sys_exit_vfork");

// ---------------------------------------------------------------- exits ----

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    let _ = try_exit();
    0
}

fn try_exit() -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    settle_pending(tid, true);
    // Every fault outcome of this thread reaches userspace before its exit.
    flush_batch();
    if !is_traced(tgid) {
        return Ok(());
    }
    // The process is gone when its last thread exits: `signal->live` has
    // already been decremented to zero by then (kernel/exit.c, do_exit).
    // SAFETY: current task pointer, offsets from this kernel's BTF.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let signal: *const u8 = unsafe { read_at(task, setting!(task_signal))? };
    let live: i32 = unsafe { read_at(signal, setting!(signal_live))? };
    if live != 0 {
        return Ok(());
    }
    let code: i32 = unsafe { read_at(task, setting!(task_exit_code))? };
    if setting!(trace_all) == 0 {
        let _ = TRACED.remove(&tgid);
    }
    emit(EventKind::Exit, tgid, tid, code as u32, now(), 0, 0, 0);
    count_window_event();
    Ok(())
}

// ---------------------------------------------------------------- execs ----

/// An exec ends the new process's sharing with its parent: userspace closes
/// the fork's copy window here (fork-and-exec children).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    let (tgid, tid) = current_ids();
    if is_traced(tgid) {
        flush_batch();
        emit(EventKind::Exec, tgid, tid, 0, now(), 0, 0, 0);
        count_window_event();
    }
    0
}

// ------------------------------------------------------------ CoW faults ----

/// Opens a pending fault for the thread; its outcome is known at its page
/// allocation (a copy) or at the thread's next fault, syscall or exit (a
/// reuse). The first `TIMED_PER_SLICE` faults of a time slice are timed,
/// then one in `sample_every`: in a burst, two clock reads per fault would
/// cost more than the rest of the two hooks together.
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    // TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)
    let error_code: u64 = ctx.arg(2);
    if error_code & PF_PROT_WRITE != PF_PROT_WRITE {
        return 0;
    }
    let (tgid, tid) = current_ids();
    if !is_traced(tgid) {
        return 0;
    }
    let addr: u64 = ctx.arg(0);
    let (Some(p), Some(b)) = (pending_slot(tid), batch()) else {
        return 0;
    };
    // SAFETY: a valid slot (see settle_pending); this CPU's batch, with
    // preemption off.
    unsafe {
        let n = (*b).slice_faults;
        (*b).slice_faults = n.wrapping_add(1);
        let every = setting!(sample_every);
        // Past the first faults, fault n is timed when it closes a run of
        // `every` (counting from the first untimed fault), and stands for
        // that run: each sample describes faults that happened, never
        // faults that may not come.
        let (clock, flag) = if n < TIMED_PER_SLICE || every <= 1 {
            (Clock::read(), 0)
        } else if (n + 1 - TIMED_PER_SLICE) & (every - 1) == 0 {
            (Clock::read(), FaultRecord::SAMPLED)
        } else {
            (Clock::events(), 0)
        };
        if (*p).tid == tid {
            // The previous fault of this thread allocated nothing. The slot
            // is closed first: an allocation in an interrupt meanwhile must
            // not take this fault for a copy.
            (*p).tid = 0;
            batch_fault(b, EventKind::CowReuse, (*p).tgid, 0, (*p).addr & !FaultRecord::SAMPLED, clock);
        } else {
            if (*p).tid != 0 {
                bump(counter::UNCLASSIFIED);
            }
            // A timed fault checks the batch's age even when it adds
            // nothing to it now.
            cut_if_old(b, clock.now_ns);
        }
        let start = clock.now_ns;
        *p = Pending { start, addr: (addr & FaultRecord::ADDR_MASK) | flag, tgid, tid };
    }
    0
}

#[raw_tracepoint(tracepoint = "mm_page_alloc")]
pub fn mm_page_alloc(ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    // TP_PROTO(struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype)
    let order: u64 = ctx.arg(1);
    let gfp: u64 = ctx.arg(2);
    if order != 0 || (gfp as u32) & GFP_MOVABLE == 0 {
        return 0;
    }
    let (_, tid) = current_ids();
    let Some(p) = pending_slot(tid) else {
        return 0;
    };
    // SAFETY: a valid slot (see settle_pending); this CPU's batch, with
    // preemption off.
    unsafe {
        if (*p).tid != tid {
            return 0;
        }
        (*p).tid = 0;
        let Some(b) = batch() else {
            return 0;
        };
        let kind = if (gfp as u32) & GFP_ZERO != 0 { EventKind::ZeroFill } else { EventKind::CowCopy };
        let (clock, latency) = match (*p).start {
            0 => (Clock::events(), 0),
            start => {
                let c = Clock::read();
                (c, c.now_ns.saturating_sub(start))
            }
        };
        batch_fault(b, kind, (*p).tgid, latency, (*p).addr, clock);
    }
    0
}

/// A syscall ends the window in which a pending fault can still turn out to
/// be a copy: allocations made by the syscall are the syscall's.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(_ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    let (_, tid) = current_ids();
    settle_pending(tid, false);
    0
}

/// A task leaving the CPU takes its batched fault outcomes with it (see
/// `batch_fault`): the batch never holds another task's records, and no
/// record waits behind a task that sleeps.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(_ctx: RawTracePointContext) -> i32 {
    if setting!(empty) != 0 {
        return 0;
    }
    if let Some(b) = batch() {
        // SAFETY: see `batch`; preemption is off in the scheduler.
        unsafe {
            send_batch(b);
            (*b).slice_faults = 0;
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
