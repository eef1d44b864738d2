//! The tracepoint backend's fork clock: started at the entry of a system
//! call that can create a process (`sys_enter`), stopped when the process
//! exists (`sched_process_fork`, in the parent, after `copy_process`): the
//! parent's time from the call to its new process. For vfork that leaves
//! out the wait for the child's exec or exit, in which the parent is not
//! copying anything. The kernel-function backends time `copy_process`
//! itself (`kernel_path`).

use aya_ebpf::{helpers::bpf_get_current_task, macros::map, maps::HashMap};

use crate::shared::{current_ids, is_traced, now, read_at, setting, Ids};

/// Tracepoint backend: when each traced thread entered the clone, clone3,
/// fork or vfork it is in, keyed by thread id. `sched_process_fork` takes
/// the entry; one left by a syscall that made no process (it failed before
/// or in `copy_process`) is replaced at the thread's next such entry, so no
/// fork is timed from another's start, and removed at the thread's exit.
#[map]
static FORKS: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// x86-64 system call numbers of clone, fork, vfork and clone3.
const NR_CLONE: i64 = 56;
const NR_FORK: i64 = 57;
const NR_VFORK: i64 = 58;
const NR_CLONE3: i64 = 435;

/// x86's `TS_COMPAT` in `thread_info.status`: the task is in a 32-bit
/// (ia32) system call (`in_ia32_syscall()`), unchanged since x86-64 began.
const TS_COMPAT: u32 = 0x0002;

/// Tracepoint backend, from `sys_enter` (system call `id`): starts the
/// clock of a fork. The number is matched first, so that every other
/// system call costs one comparison more.
///
/// The numbers are x86-64's. A 32-bit (ia32) task's system calls come
/// through `sys_enter` with ia32 numbers, where 57 is `setpgid`, 56 and 58
/// do nothing, and 435 is clone3 too: those never start a clock. ia32
/// forks are not timed, as the classic `syscalls` tracepoints this replaces
/// never saw them (kernel/trace/trace_syscalls.c: `trace_get_syscall_nr` is
/// -1 for them on x86, `arch_trace_is_compat_syscall`).
#[inline(always)]
pub(crate) fn syscall_entered(id: i64) {
    if !matches!(id, NR_CLONE | NR_FORK | NR_VFORK | NR_CLONE3) {
        return;
    }
    let Ids { tgid, tid } = current_ids();
    if !is_traced(tgid) || in_ia32_syscall() {
        return;
    }
    let _ = FORKS.insert(tid, now(), 0);
}

/// From `sched_process_fork`, in the parent: takes this thread's start,
/// if its current system call set one. An ia32 fork (int 0x80 from a 64-bit task can follow a failed 64-bit
/// clone in the same thread) finds the failed clone's start: dropped, not
/// taken for its own.
#[inline(always)]
pub(crate) fn take(tid: u32) -> Option<u64> {
    // SAFETY: the value is copied out before the entry is removed.
    let ts = *unsafe { FORKS.get(tid) }?;
    let _ = FORKS.remove(tid);
    (!in_ia32_syscall()).then_some(ts)
}

/// Drops this thread's start: it made a thread, not a process, or it
/// exits.
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    let _ = FORKS.remove(tid);
}

/// Whether the current task is in a 32-bit system call (x86's
/// `in_ia32_syscall()`); unreadable counts as yes, so that nothing is timed
/// from a doubtful start.
#[inline(always)]
fn in_ia32_syscall() -> bool {
    // SAFETY: current task pointer, offset from this kernel's BTF.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    unsafe { read_at::<u32>(task, setting!(task_ti_status)) }.map_or(true, |s| s & TS_COMPAT != 0)
}
