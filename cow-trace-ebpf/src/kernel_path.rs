//! What the kprobe and fentry backends measure, shared by both: they differ
//! only in how they are attached and how they receive their arguments.
//!
//! Fork latency is the time the kernel spent in `copy_process` creating the
//! child (threads excluded), of which the `dup_mmap` share (where it is
//! inlined, `copy_page_range` summed over the VMAs) is the copy of the
//! address space. A CoW fault is `do_wp_page` from entry to return (reached
//! from user faults, kernel-mode faults and `get_user_pages` alike); it
//! copied when it went through `wp_page_copy` (or, where that function is
//! inlined, when it allocated an order-0 user page), and it was a zero-fill
//! when that page was asked for zeroed.
//!
//! A fault in flight waits in its thread's `PENDING` slot; its outcome goes
//! into the CPU's batch and is timed by the same rules as the tracepoint
//! backend's (`batch`): one protocol for every backend.

use aya_ebpf::{
    cty::c_void,
    helpers::generated as gen,
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};
use cow_trace_common::{counter, vm_fault, FaultRecord, PendingFault as Pending};

use crate::{
    batch::{record_fault, start_fault, Clock},
    emit::{emit, Detail, Outcome},
    pending::{pending_slot, IN_HANDLER},
    shared::{
        bump, current_ids, current_syscall, current_user_ip, is_traced, now, off, read_at, setting, Ids,
        GFP_MOVABLE, GFP_ZERO,
    },
    stacks,
};

/// `copy_process` calls in flight in traced threads, keyed by thread id.
#[map]
static CLONES: HashMap<u32, CloneStart> = HashMap::with_max_entries(16384, 0);

#[repr(C)]
struct CloneStart {
    ts: u64,
    dup_ts: u64,
    dup_ns: u64,
    /// Once `copy_process` has returned a new process: its time, and the
    /// process, until `sched_process_fork` counts it (see `fork_seen`).
    latency_ns: u64,
    child: u32,
    _pad: u32,
}

// What a fault in flight did (`Pending::seen`, beside `IN_HANDLER`).

/// The fault went through `wp_page_copy`.
const SEEN_COPY_PATH: u32 = 1;
/// It allocated an order-0 user page.
const SEEN_ALLOC: u32 = 2;
/// ... asked for zeroed (the page was the shared zero page).
const SEEN_ZERO: u32 = 4;
/// A huge-page (PMD) fault.
const HUGE: u32 = 8;

/// Largest `ERR_PTR` value: the last 4095 addresses are errnos.
const MAX_ERRNO: u64 = 4095;

pub fn clone_enter() {
    if off() {
        return;
    }
    let Ids { tgid, tid } = current_ids();
    if !is_traced(tgid) {
        return;
    }
    let start = CloneStart { ts: now(), dup_ts: 0, dup_ns: 0, latency_ns: 0, child: 0, _pad: 0 };
    let _ = CLONES.insert(tid, start, 0);
}

/// `task`: what `copy_process` returned, a task or an `ERR_PTR`. A new
/// process's time waits in its entry for `sched_process_fork`: a fork is
/// timed only if it is counted (docs/kernel-notes.md, "One definition of a
/// fork").
pub fn clone_exit(task: u64) {
    if off() {
        return;
    }
    let tid = current_ids().tid;
    let Some(c) = CLONES.get_ptr_mut(tid) else {
        return;
    };
    let failed = task == 0 || task >= MAX_ERRNO.wrapping_neg();
    match if failed { Err(0) } else { child_process(task as *const u8) } {
        // SAFETY: entry owned by this thread until its fork is counted.
        Ok(child) => unsafe {
            (*c).latency_ns = now().saturating_sub((*c).ts);
            (*c).child = child;
        },
        // A failed clone, or a new thread.
        _ => {
            let _ = CLONES.remove(tid);
        }
    }
}

/// `sched_process_fork` counted `child`, made by this thread: its time,
/// if `copy_process` was seen from entry to return.
pub fn fork_seen(ids: Ids, child: u32) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(c) = (unsafe { CLONES.get(ids.tid) }) else {
        return;
    };
    let (latency_ns, dup_mmap_ns, made) = (c.latency_ns, c.dup_ns, c.child);
    let _ = CLONES.remove(ids.tid);
    if made == child {
        emit(ids, now(), Detail::ForkLatency { child, latency_ns, dup_mmap_ns });
    }
}

/// The new task's tgid, or an error for a thread (pid != tgid).
#[inline(always)]
fn child_process(task: *const u8) -> Result<u32, i32> {
    // SAFETY: a task pointer the kernel just returned; offsets from its BTF.
    let (pid, tgid): (i32, i32) =
        unsafe { (read_at(task, setting!(task_pid))?, read_at(task, setting!(task_tgid))?) };
    if pid != tgid {
        return Err(0);
    }
    Ok(tgid as u32)
}

pub fn dup_enter() {
    if off() {
        return;
    }
    if let Some(c) = CLONES.get_ptr_mut(current_ids().tid) {
        // SAFETY: entry owned by this thread until copy_process returns.
        unsafe { (*c).dup_ts = now() };
    }
}

pub fn dup_exit() {
    if off() {
        return;
    }
    if let Some(c) = CLONES.get_ptr_mut(current_ids().tid) {
        // SAFETY: as above.
        unsafe {
            if (*c).dup_ts != 0 {
                (*c).dup_ns += now().saturating_sub((*c).dup_ts);
                (*c).dup_ts = 0;
            }
        }
    }
}

/// The faulting address and the flags of `vmf`, a `struct vm_fault *`.
/// `TYPED`: `vmf` is a BTF-typed pointer (fentry's arguments), read by
/// direct loads, which the verifier checks against the kernel's BTF (the
/// offsets are constants of the frozen `CONFIG`) and the JIT makes
/// fault-safe; else a plain address (kprobe's), read with
/// `bpf_probe_read_kernel`, once for both fields where the flags follow the
/// address by 8 to 20 bytes (16 from 5.16 on, 8 on 5.12 to 5.15), else
/// twice. Each helper call costs a copy and its checks on every write
/// fault.
#[inline(always)]
fn address_and_flags<const TYPED: bool>(vmf: *const u8, user_flag: u32) -> (u64, u32) {
    let (a, f) = (setting!(vmf_address), setting!(vmf_flags));
    if TYPED {
        // SAFETY: a BTF pointer the kernel passed; see above.
        return unsafe {
            (
                core::ptr::read_volatile(vmf.add(a as usize) as *const u64),
                if f == 0 { user_flag } else { core::ptr::read_volatile(vmf.add(f as usize) as *const u32) },
            )
        };
    }
    let gap = f.wrapping_sub(a);
    if f != 0 && (8..=20).contains(&gap) && gap % 4 == 0 {
        // Read in place: the helper fills the buffer, nothing is copied
        // again (a `Result` of the array would be, on every fault).
        let mut w = core::mem::MaybeUninit::<[u64; 3]>::uninit();
        // SAFETY: the kernel's own argument, offsets from its BTF; the
        // helper writes all 24 bytes or fails.
        let w = unsafe {
            let dst = w.as_mut_ptr() as *mut c_void;
            if gen::bpf_probe_read_kernel(dst, 24, vmf.add(a as usize) as *const c_void) != 0 {
                return (0, user_flag);
            }
            w.assume_init()
        };
        // x86-64, the only target: little-endian, so a u32 at byte `gap`
        // is the low or high half of the u64 holding it.
        let flags = match gap {
            8 => w[1] as u32,
            12 => (w[1] >> 32) as u32,
            16 => w[2] as u32,
            _ => (w[2] >> 32) as u32,
        };
        return (w[0], flags);
    }
    // SAFETY: as above.
    unsafe {
        let addr = read_at(vmf, a).unwrap_or(0);
        (addr, if f == 0 { user_flag } else { read_at(vmf, f).unwrap_or(user_flag) })
    }
}

/// `vmf`: the `struct vm_fault *` of `do_wp_page` / `do_huge_pmd_wp_page`
/// (see [`address_and_flags`] for `TYPED`). A 4 KiB fault is timed by the
/// batch protocol's sampling; huge-page faults, one per 2 MiB at most, are
/// all timed and left out of it.
#[inline(always)]
pub fn fault_enter<const TYPED: bool>(vmf: *const u8, huge: bool) {
    if off() {
        return;
    }
    let Ids { tgid, tid } = current_ids();
    if !is_traced(tgid) {
        return;
    }
    let Some(p) = pending_slot(tid) else {
        return;
    };
    // A fault the kernel took writing user memory for a system call
    // (read(2) into a buffer shared since the fork) is that call's. Without
    // the flag's offset every fault counts as the user's.
    let user_flag = setting!(fault_flag_user);
    let (addr, flags) = address_and_flags::<TYPED>(vmf, user_flag);
    let (ip, mode) = if user_flag != 0 && flags & user_flag == 0 {
        (current_syscall(), FaultRecord::KERNEL)
    } else {
        (current_user_ip(), 0)
    };
    let (start, sampled, seen) = if huge {
        (now(), 0, IN_HANDLER | HUGE)
    } else {
        let (clock, sampled) = start_fault();
        (clock.now_ns, sampled, IN_HANDLER)
    };
    let addr = (addr & FaultRecord::ADDR_MASK) | sampled | mode;
    // SAFETY: a valid slot (see `pending_slot`).
    unsafe {
        if (*p).tid != 0 {
            // Another thread's fault in flight in the same slot, or this
            // thread's whose return was missed: its outcome is lost.
            bump(counter::UNCLASSIFIED);
        }
        *p = Pending { start, addr, ip, tgid, tid, sent_tid: 0, sent_kind: 0, seen, allocated: 0 };
    }
}

#[inline(always)]
pub fn wp_copy_enter() {
    if off() {
        return;
    }
    let tid = current_ids().tid;
    if let Some(p) = pending_slot(tid) {
        // SAFETY: a valid slot; only its own fault's hooks mark it.
        unsafe {
            if (*p).tid == tid {
                (*p).seen |= SEEN_COPY_PATH;
            }
        }
    }
}

/// `ret`: the `vm_fault_t` the fault handler returned. The copy, reuse or
/// zero-fill is recorded like the tracepoint backend's, in the CPU's batch;
/// the rare huge-page and failed faults are sent as events of their own.
#[inline(always)]
pub fn fault_exit(ret: u32) {
    if off() {
        return;
    }
    let tid = current_ids().tid;
    let Some(p) = pending_slot(tid) else {
        return;
    };
    // SAFETY: a valid slot; closed before anything is recorded. Only the
    // fields used are read (this runs on every write fault).
    let (tgid, faddr, ip, start, seen, allocated) = unsafe {
        if (*p).tid != tid {
            return;
        }
        (*p).tid = 0;
        ((*p).tgid, (*p).addr, (*p).ip, (*p).start, (*p).seen, (*p).allocated)
    };
    let ids = Ids { tgid, tid };
    let addr = faddr & FaultRecord::ADDR_MASK;
    if seen & HUGE != 0 {
        let t = now();
        let latency_ns = t.saturating_sub(start);
        emit(ids, t, Detail::HugeCow { latency_ns, addr, allocated, vm_fault: ret });
        return;
    }
    if vm_fault::failed(ret) {
        // No memory (the cgroup's charge failed), SIGBUS, SIGSEGV: a page
        // it allocated was freed again, nothing was copied or reused.
        let t = now();
        let latency_ns = if start != 0 { t.saturating_sub(start) } else { 0 };
        emit(ids, t, Detail::Failed { latency_ns, addr, replaces: 0, vm_fault: ret, ip });
        return;
    }
    if vm_fault::retried(ret) {
        return;
    }
    let copied = if setting!(wp_copy_hooked) != 0 { seen & SEEN_COPY_PATH } else { seen & SEEN_ALLOC };
    let outcome = if copied == 0 {
        Outcome::Reuse
    } else if seen & SEEN_ZERO != 0 {
        Outcome::ZeroFill
    } else {
        Outcome::Copy
    };
    if matches!(outcome, Outcome::Copy) {
        stacks::count(tgid, tid, 1);
    }
    let (clock, latency_ns) = match start {
        0 => (Clock::events(), 0),
        start => {
            let c = Clock::read();
            (c, c.now_ns.saturating_sub(start))
        }
    };
    record_fault(outcome, ids, latency_ns, faddr, ip, clock);
}

/// Notes the user pages a fault in flight allocates.
#[raw_tracepoint(tracepoint = "mm_page_alloc")]
pub fn mm_page_alloc_wp(ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    // TP_PROTO(struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype)
    let gfp = ctx.arg::<u64>(2) as u32;
    if gfp & GFP_MOVABLE == 0 {
        return 0;
    }
    let tid = current_ids().tid;
    let Some(p) = pending_slot(tid) else {
        return 0;
    };
    let order: u64 = ctx.arg(1);
    // SAFETY: a valid slot; only its own fault's hooks mark it.
    unsafe {
        if (*p).tid != tid {
            return 0;
        }
        // Reported for huge-page faults only.
        if (*p).seen & HUGE != 0 {
            (*p).allocated = (*p).allocated.saturating_add(4096u32 << (order & 15));
        }
        if order == 0 {
            (*p).seen |= SEEN_ALLOC;
            if gfp & GFP_ZERO != 0 {
                (*p).seen |= SEEN_ZERO;
            } else {
                // The page a copy would go to: the only faults whose
                // stack can count.
                stacks::take(&ctx, tid);
            }
        }
    }
    0
}
