//! Process lifecycle: forks, execs and exits of traced processes, which
//! every backend loads (they keep the traced set and open and close fork
//! copy windows), the context switch that ends a task's batch and time
//! slice (every backend), and the clone/fork syscall tracepoints that time
//! forks for the tracepoint backend (the kernel-function backends time
//! `copy_process`).
//!
//! Each of the three sched_process hooks sends this CPU's fault batch
//! before its own event and counts a window event after it (see `batch`).

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use cow_trace_common::{counter, TRACED_CHILD};

use crate::{
    batch::{count_window_event, end_slice, flush_batch},
    emit::{emit, Detail},
    kernel_path,
    pending::settle_pending,
    shared::{bump, current_ids, is_traced, now, off, read_at, setting, Ids, TRACED},
};

/// Clone/fork syscalls in flight in traced threads, keyed by thread id.
#[map]
static FORKS: HashMap<u32, ForkStart> = HashMap::with_max_entries(16384, 0);

#[repr(C)]
struct ForkStart {
    ts: u64,
    /// Child tgid once `sched_process_fork` has seen it; 0 for threads.
    child: u32,
    _pad: u32,
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Result<(), i32> {
    let child: *const u8 = ctx.arg(1);
    // SAFETY: the tracepoint's child task; offsets from this kernel's BTF.
    let (child_pid, child_tgid): (i32, i32) =
        unsafe { (read_at(child, setting!(task_pid))?, read_at(child, setting!(task_tgid))?) };
    if child_pid != child_tgid {
        return Ok(()); // a new thread, not a new process
    }
    let ids = current_ids();
    if !is_traced(ids.tgid) {
        return Ok(());
    }
    let child = child_tgid as u32;
    if setting!(follow) != 0 && setting!(trace_all) == 0 && TRACED.insert(child, TRACED_CHILD, 0).is_err() {
        bump(counter::TRACED_FULL);
        warn!(ctx, "cow-trace: cannot follow pid {}: traced-process map is full", child);
    }
    flush_batch(); // the parent's copies before the fork, ahead of it
    let mut in_syscall = false;
    if let Some(f) = FORKS.get_ptr_mut(ids.tid) {
        // SAFETY: entry owned by this thread until its syscall exits.
        unsafe { (*f).child = child };
        in_syscall = true;
    }
    emit(ids, now(), Detail::Spawn { child, in_syscall });
    // The kernel-function backends' time of this fork, after its count.
    kernel_path::fork_seen(ids, child);
    count_window_event();
    Ok(())
}

/// A task leaving the CPU takes its batched fault outcomes with it: the
/// batch never holds another task's records, and no record waits behind a
/// task that sleeps. Its next time slice starts with every fault timed.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(_ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    end_slice();
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    let _ = try_exit();
    0
}

fn try_exit() -> Result<(), i32> {
    let ids = current_ids();
    settle_pending(ids.tid, true);
    // Every fault outcome of this thread reaches userspace before its exit.
    flush_batch();
    if !is_traced(ids.tgid) {
        return Ok(());
    }
    // The process is gone when its last thread exits: `signal->live` is
    // already zero then (kernel/exit.c, do_exit; docs/kernel-notes.md,
    // "Process lifecycle hooks").
    // SAFETY: current task pointer, offsets from this kernel's BTF.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let signal: *const u8 = unsafe { read_at(task, setting!(task_signal))? };
    let live: i32 = unsafe { read_at(signal, setting!(signal_live))? };
    if live != 0 {
        return Ok(());
    }
    let code: i32 = unsafe { read_at(task, setting!(task_exit_code))? };
    // Set by the OOM killer's `mark_oom_victim` alone, for the life of the
    // signal struct (docs/kernel-notes.md, "How a process ended").
    let oom_off = setting!(signal_oom_mm);
    let oom = oom_off != 0 && unsafe { read_at::<u64>(signal, oom_off) }.unwrap_or(0) != 0;
    if setting!(trace_all) == 0 {
        let _ = TRACED.remove(ids.tgid);
    }
    emit(ids, now(), Detail::Exit { code, oom });
    count_window_event();
    Ok(())
}

/// An exec ends the new process's sharing with its parent: userspace closes
/// the fork's copy window here (fork-and-exec children).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    if off() {
        return 0;
    }
    let ids = current_ids();
    if is_traced(ids.tgid) {
        flush_batch();
        emit(ids, now(), Detail::Exec);
        count_window_event();
    }
    0
}

#[inline(always)]
fn fork_enter() {
    let Ids { tgid, tid } = current_ids();
    if !is_traced(tgid) {
        return;
    }
    let _ = FORKS.insert(tid, ForkStart { ts: now(), child: 0, _pad: 0 }, 0);
}

#[inline(always)]
fn fork_exit(ctx: &TracePointContext) {
    let ids = current_ids();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(start) = (unsafe { FORKS.get(ids.tid) }) else {
        return;
    };
    let (ts, child) = (start.ts, start.child);
    let _ = FORKS.remove(ids.tid);
    // SAFETY: the offset of `ret` in this kernel's sys_exit record.
    let ret: i64 = unsafe { ctx.read_at(setting!(sys_exit_ret) as usize) }.unwrap_or(-1);
    // A failed clone, or one that made a thread: nothing to report.
    if child == 0 || ret <= 0 {
        return;
    }
    let t = now();
    emit(ids, t, Detail::ForkLatency { child, latency_ns: t.saturating_sub(ts), dup_mmap_ns: 0 });
}

/// The enter and exit tracepoints of one clone/fork syscall.
macro_rules! fork_syscall {
    ($enter:ident, $exit:ident, $enter_tp:literal, $exit_tp:literal) => {
        #[tracepoint(category = "syscalls", name = $enter_tp)]
        pub fn $enter(_ctx: TracePointContext) -> u32 {
            if off() {
                return 0;
            }
            fork_enter();
            0
        }

        #[tracepoint(category = "syscalls", name = $exit_tp)]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            if off() {
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
