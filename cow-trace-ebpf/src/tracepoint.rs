//! The tracepoint backend's fault classification, from raw tracepoints only.
//!
//! Rule (why it holds: docs/kernel-notes.md, "The tracepoint-only
//! copy/reuse rule"): a write fault on a present user page (taken in user
//! or kernel mode) opens a
//! *pending* fault for its thread. An order-0 movable page allocated by that
//! thread before its next fault, syscall or exit means the fault copied (a
//! zero-fill if the page was asked for zeroed); no such allocation means the
//! page was reused in place. A fault after which the kernel sends its own
//! process SIGKILL (the OOM killer, when the memory cgroup's charge for the
//! copy failed), SIGBUS or SIGSEGV before the thread's next fault or
//! syscall failed instead, even when its page was allocated (and freed).

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use cow_trace_common::{counter, FaultRecord, PendingFault as Pending};

use crate::{
    batch::{cut_if_old, flush_batch, record_fault, start_fault, Clock},
    emit::{emit, Detail, Outcome},
    pending::{pending_slot, settle_pending},
    shared::{
        bump, current_ids, current_syscall, current_user_ip, is_traced, now, off, read_at, setting, Ids,
        GFP_MOVABLE, GFP_ZERO,
    },
    stacks,
};

/// x86 page-fault error code: bit 0 = protection fault on a present page,
/// bit 1 = write access.
const PF_PROT_WRITE: u64 = 0b11;

/// Opens a pending fault for the thread. The first `TIMED_PER_SLICE` faults
/// of a time slice are timed, then one in `sample_every`: in a burst, two
/// clock reads per fault would cost more than the rest of the two hooks
/// (docs/kernel-notes.md, "Timing samples").
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    open_fault(&ctx, false)
}

/// The same for a fault taken in kernel mode on a user address: the kernel
/// writing into a page still shared since the fork on the process's behalf
/// (`copy_to_user` in `read(2)`, `pread(2)`, `recv(2)`). The fault comes
/// after the syscall's `sys_enter`, so the window it opens ends, as for a
/// user fault, at the thread's next fault, syscall or exit.
#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel(ctx: RawTracePointContext) -> i32 {
    let addr: u64 = ctx.arg(0);
    if addr >= USER_ADDR_END {
        return 0; // a fault on kernel memory
    }
    open_fault(&ctx, true)
}

/// End of the x86-64 user address space (4-level paging; 5-level user
/// space ends below the kernel half too).
const USER_ADDR_END: u64 = 1 << 56;

/// Opens a pending write fault; `kernel`: taken in kernel mode, on behalf
/// of the system call the thread is in.
#[inline(always)]
fn open_fault(ctx: &RawTracePointContext, kernel: bool) -> i32 {
    if off() {
        return 0;
    }
    // TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)
    let error_code: u64 = ctx.arg(2);
    if error_code & PF_PROT_WRITE != PF_PROT_WRITE {
        // Any fault ends the window of the thread's previous write fault:
        // its allocations and signals are this fault's.
        settle_pending(current_ids().tid, true);
        return 0;
    }
    let Ids { tgid, tid } = current_ids();
    if !is_traced(tgid) {
        return 0;
    }
    let addr: u64 = ctx.arg(0);
    let Some(p) = pending_slot(tid) else {
        return 0;
    };
    let (clock, sampled) = start_fault();
    // SAFETY: a valid slot (see `pending_slot`).
    unsafe {
        if (*p).tid == tid {
            // The previous fault of this thread allocated nothing.
            (*p).tid = 0;
            let ids = Ids { tgid: (*p).tgid, tid };
            record_fault(Outcome::Reuse, ids, 0, (*p).addr & !FaultRecord::SAMPLED, (*p).ip, clock);
        } else {
            if (*p).tid != 0 {
                bump(counter::UNCLASSIFIED);
            }
            cut_if_old(clock.now_ns);
        }
        // A user fault's registers (the tracepoint's `regs`, which are the
        // task's user registers) hold the writing instruction; a kernel
        // fault's regs are the kernel's, so it is named by its system call.
        let (ip, mode) =
            if kernel { (current_syscall(), FaultRecord::KERNEL) } else { (current_user_ip(), 0) };
        let addr = (addr & FaultRecord::ADDR_MASK) | sampled | mode;
        let start = clock.now_ns;
        *p = Pending { start, addr, ip, tgid, tid, sent_tid: 0, sent_kind: 0, seen: 0, allocated: 0 };
    }
    0
}

/// Closes the thread's pending fault as a copy (or zero-fill) when it
/// allocates an order-0 user page. Can nest over the other hooks (from an
/// interrupt), but touches the batch only for an open slot.
#[raw_tracepoint(tracepoint = "mm_page_alloc")]
pub fn mm_page_alloc(ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    // TP_PROTO(struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype)
    let order: u64 = ctx.arg(1);
    let gfp: u64 = ctx.arg(2);
    if order != 0 || (gfp as u32) & GFP_MOVABLE == 0 {
        return 0;
    }
    let Ids { tid, .. } = current_ids();
    let Some(p) = pending_slot(tid) else {
        return 0;
    };
    // SAFETY: a valid slot (see `pending_slot`).
    unsafe {
        if (*p).tid != tid {
            // Another user page for a thread whose copy was sent: that
            // copy's charge went through (a failed one kills the thread
            // before it allocates again), so no later signal fails it,
            // even within the same syscall (a kernel-mode fault).
            if (*p).sent_tid == tid {
                (*p).sent_tid = 0;
            }
            return 0;
        }
        (*p).tid = 0;
        let outcome = if (gfp as u32) & GFP_ZERO != 0 { Outcome::ZeroFill } else { Outcome::Copy };
        let (clock, latency) = match (*p).start {
            0 => (Clock::events(), 0),
            start => {
                let c = Clock::read();
                (c, c.now_ns.saturating_sub(start))
            }
        };
        record_fault(outcome, Ids { tgid: (*p).tgid, tid }, latency, (*p).addr, (*p).ip, clock);
        if matches!(outcome, Outcome::Copy) {
            stacks::take(&ctx, tid);
            stacks::count((*p).tgid, tid, 1);
        }
        (*p).sent_tid = tid;
        (*p).sent_kind = outcome.kind() as u32;
    }
    0
}

const SIGBUS: u64 = 7;
const SIGKILL: u64 = 9;
const SIGSEGV: u64 = 11;

/// The kernel sending the faulting thread's own process SIGKILL, SIGBUS or
/// SIGSEGV between a write fault and the thread's next fault or syscall
/// means the fault failed: a memory cgroup's OOM kill from the copy's
/// charge, or a fault the kernel could not resolve (docs/kernel-notes.md,
/// "Faults that failed"). Runs under the signal lock, preemption off.
#[raw_tracepoint(tracepoint = "signal_generate")]
pub fn signal_generate(ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    // TP_PROTO(int sig, struct kernel_siginfo *info, struct task_struct *task, int group, int result)
    let sig = ctx.arg::<u64>(0) & 0xffff_ffff;
    if sig != SIGKILL && sig != SIGBUS && sig != SIGSEGV {
        return 0;
    }
    let Ids { tgid, tid } = current_ids();
    let Some(p) = pending_slot(tid) else {
        return 0;
    };
    // SAFETY: a valid slot (see `pending_slot`); the target task is the
    // tracepoint's, its offset from this kernel's BTF.
    unsafe {
        if (*p).tid != tid && (*p).sent_tid != tid {
            return 0;
        }
        let task: *const u8 = ctx.arg(2);
        if task.is_null() || read_at::<i32>(task, setting!(task_tgid)).unwrap_or(0) as u32 != tgid {
            return 0;
        }
        let addr = (*p).addr & FaultRecord::ADDR_MASK;
        let ids = Ids { tgid: (*p).tgid, tid };
        let replaces = if (*p).tid == tid {
            (*p).tid = 0;
            0
        } else {
            (*p).sent_tid = 0;
            // The outcome it replaces reaches userspace first.
            flush_batch();
            if (*p).sent_kind == Outcome::Copy.kind() as u32 {
                stacks::count(tgid, tid, u64::MAX);
            }
            (*p).sent_kind
        };
        let ip = (*p).ip;
        emit(ids, now(), Detail::Failed { latency_ns: 0, addr, replaces, vm_fault: 0, ip });
    }
    0
}

/// A syscall ends the window in which a pending fault can still turn out to
/// be a copy: allocations made by the syscall are the syscall's. Syscall
/// tracepoints may be preemptible (6.13 on), so this one never batches.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    settle_pending(current_ids().tid, false);
    // TP_PROTO(struct pt_regs *regs, long id)
    crate::fork_clock::syscall_entered(ctx.arg(1));
    0
}
