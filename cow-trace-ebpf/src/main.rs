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
use cow_trace_common::{counter, Config, Event, EventKind, FLAG_NO_SYSCALL, TRACED_CHILD};

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
    _pad: 0,
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

/// In-kernel totals and drop counts, indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[repr(C)]
struct Pending {
    /// Fault time; 0 when the slot holds no open fault.
    ts: u64,
    addr: u64,
    tgid: u32,
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

#[inline(always)]
fn config() -> Config {
    // SAFETY: CONFIG is plain data; the volatile read stops the compiler from
    // folding the zeros it was compiled with.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn is_traced(cfg: &Config, tgid: u32) -> bool {
    // SAFETY: lookup result is only tested for presence.
    tgid != cfg.self_tgid && (cfg.trace_all != 0 || unsafe { TRACED.get(&tgid).is_some() })
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
        // Rare events that end runs or open episodes: wake the reader as
        // soon as it waits.
        EventKind::Spawn | EventKind::Exit | EventKind::ForkLatency | EventKind::Exec => 0,
        _ => {
            if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config().wakeup_bytes as u64 {
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

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

/// Resolves the thread's pending write fault, if any, as a reuse.
#[inline(always)]
fn settle_pending(tid: u32) {
    if let Some(p) = pending_slot(tid) {
        // SAFETY: a valid slot; only a thread with a colliding id could
        // write it concurrently.
        unsafe {
            if (*p).ts != 0 && (*p).tid == tid {
                (*p).ts = 0;
                emit(EventKind::CowReuse, (*p).tgid, tid, 0, now(), 0, (*p).addr, 0);
            }
        }
    }
}

// ---------------------------------------------------------------- forks ----

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    if config().empty != 0 {
        return 0;
    }
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Result<(), i32> {
    let cfg = config();
    let child: *const u8 = ctx.arg(1);
    let (child_pid, child_tgid): (i32, i32) =
        unsafe { (read_at(child, cfg.task_pid)?, read_at(child, cfg.task_tgid)?) };
    if child_pid != child_tgid {
        return Ok(()); // a new thread, not a new process
    }
    let (tgid, tid) = current_ids();
    if !is_traced(&cfg, tgid) {
        return Ok(());
    }
    let child = child_tgid as u32;
    if cfg.follow != 0 && cfg.trace_all == 0 && TRACED.insert(&child, &TRACED_CHILD, 0).is_err() {
        bump(counter::TRACED_FULL);
        warn!(ctx, "cow-trace: cannot follow pid {}: traced-process map is full", child);
    }
    let mut flags = FLAG_NO_SYSCALL;
    if let Some(f) = FORKS.get_ptr_mut(&tid) {
        // SAFETY: entry owned by this thread until its syscall exits.
        unsafe { (*f).child = child };
        flags = 0;
    }
    emit(EventKind::Spawn, tgid, tid, child, now(), 0, 0, flags);
    Ok(())
}

#[inline(always)]
fn fork_enter() {
    let cfg = config();
    let (tgid, tid) = current_ids();
    if !is_traced(&cfg, tgid) {
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
    let ret: i64 = unsafe { ctx.read_at(config().sys_exit_ret as usize) }.unwrap_or(-1);
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
            if config().empty != 0 {
                return 0;
            }
            fork_enter();
            0
        }

        #[tracepoint(category = "syscalls", name = $exit_tp)]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            if config().empty != 0 {
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
    if config().empty != 0 {
        return 0;
    }
    let _ = try_exit();
    0
}

fn try_exit() -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    settle_pending(tid);
    let cfg = config();
    if !is_traced(&cfg, tgid) {
        return Ok(());
    }
    // The process is gone when its last thread exits: `signal->live` has
    // already been decremented to zero by then (kernel/exit.c, do_exit).
    // SAFETY: current task pointer, offsets from this kernel's BTF.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let signal: *const u8 = unsafe { read_at(task, cfg.task_signal)? };
    let live: i32 = unsafe { read_at(signal, cfg.signal_live)? };
    if live != 0 {
        return Ok(());
    }
    let code: i32 = unsafe { read_at(task, cfg.task_exit_code)? };
    if cfg.trace_all == 0 {
        let _ = TRACED.remove(&tgid);
    }
    emit(EventKind::Exit, tgid, tid, code as u32, now(), 0, 0, 0);
    Ok(())
}

// ---------------------------------------------------------------- execs ----

/// An exec ends the new process's sharing with its parent: userspace closes
/// the fork's copy window here (fork-and-exec children).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    let cfg = config();
    if cfg.empty != 0 {
        return 0;
    }
    let (tgid, tid) = current_ids();
    if is_traced(&cfg, tgid) {
        emit(EventKind::Exec, tgid, tid, 0, now(), 0, 0, 0);
    }
    0
}

// ------------------------------------------------------------ CoW faults ----

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    let cfg = config();
    if cfg.empty != 0 {
        return 0;
    }
    // TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)
    let error_code: u64 = ctx.arg(2);
    if error_code & PF_PROT_WRITE != PF_PROT_WRITE {
        return 0;
    }
    let (tgid, tid) = current_ids();
    if !is_traced(&cfg, tgid) {
        return 0;
    }
    let addr: u64 = ctx.arg(0);
    let ts = now();
    if let Some(p) = pending_slot(tid) {
        // SAFETY: a valid slot (see settle_pending).
        unsafe {
            if (*p).ts != 0 {
                if (*p).tid == tid {
                    // The previous fault of this thread allocated nothing.
                    emit(EventKind::CowReuse, (*p).tgid, tid, 0, ts, 0, (*p).addr, 0);
                } else {
                    bump(counter::UNCLASSIFIED);
                }
            }
            *p = Pending { ts, addr, tgid, tid };
        }
    }
    0
}

#[raw_tracepoint(tracepoint = "mm_page_alloc")]
pub fn mm_page_alloc(ctx: RawTracePointContext) -> i32 {
    if config().empty != 0 {
        return 0;
    }
    // TP_PROTO(struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype)
    let order: u64 = ctx.arg(1);
    let gfp: u64 = ctx.arg(2);
    if order != 0 || (gfp as u32) & GFP_MOVABLE == 0 {
        return 0;
    }
    let (_, tid) = current_ids();
    if let Some(p) = pending_slot(tid) {
        // SAFETY: a valid slot (see settle_pending).
        unsafe {
            if (*p).ts != 0 && (*p).tid == tid {
                let ts = now();
                let kind =
                    if (gfp as u32) & GFP_ZERO != 0 { EventKind::ZeroFill } else { EventKind::CowCopy };
                emit(kind, (*p).tgid, tid, 0, ts, ts.saturating_sub((*p).ts), (*p).addr, 0);
                (*p).ts = 0;
            }
        }
    }
    0
}

/// A syscall ends the window in which a pending fault can still turn out to
/// be a copy: allocations made by the syscall are the syscall's.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(_ctx: RawTracePointContext) -> i32 {
    if config().empty != 0 {
        return 0;
    }
    let (_, tid) = current_ids();
    settle_pending(tid);
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
