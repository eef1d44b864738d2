//! Process lifecycle: forks, execs and exits of traced processes, which
//! every backend loads (they keep the traced set and open and close fork
//! copy windows), the context switch that ends a task's batch and time
//! slice (every backend), and stop the tracepoint backend's fork clock
//! (`fork_clock`).
//!
//! Each of the three sched_process hooks sends this CPU's fault batch
//! before its own event and counts a window event after it (see `batch`).

use aya_ebpf::{helpers::bpf_get_current_task, macros::raw_tracepoint, programs::RawTracePointContext};
use aya_log_ebpf::warn;
use cow_trace_common::{counter, TRACED_CHILD};

use crate::{
    batch::{count_window_event, end_slice, flush_batch},
    emit::{emit, Detail},
    fork_clock, kernel_path,
    pending::settle_pending,
    shared::{bump, current_ids, is_traced, now, off, read_at, setting, TRACED},
    stacks,
};

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
        // A new thread, not a new process: its clone's clock stops here.
        fork_clock::forget(current_ids().tid);
        return Ok(());
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
    let start = fork_clock::take(ids.tid);
    let t = now();
    // Only a child that is traced: an untraced one's exit never clears it.
    if setting!(follow) != 0 || setting!(trace_all) != 0 {
        stacks::new_image(child, t);
    }
    emit(ids, t, Detail::Spawn { child, in_syscall: start.is_some() });
    // This fork's time, after its count, from the same program: no cut-off
    // falls between the two.
    if let Some(ts) = start {
        emit(ids, t, Detail::ForkLatency { child, latency_ns: t.saturating_sub(ts), dup_mmap_ns: 0 });
    }
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
    // A start its clone left by failing, which no later clone replaced.
    fork_clock::forget(ids.tid);
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
    stacks::gone(ids.tgid);
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
        let t = now();
        stacks::new_image(ids.tgid, t);
        emit(ids, t, Detail::Exec);
        count_window_event();
    }
    0
}
