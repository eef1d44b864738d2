//! What every program uses: the load-time settings, the traced set, the
//! counters, and the few helpers around them. Depends on nothing else in
//! the crate.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_task_pt_regs, generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use cow_trace_common::{counter, Config, MAX_CGROUP_LEVELS};

/// Written by the loader before the object is loaded (read-only after).
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config {
    trace_all: 0,
    follow: 0,
    task_pid: 0,
    task_tgid: 0,
    task_signal: 0,
    task_exit_code: 0,
    signal_live: 0,
    task_ti_status: 0,
    self_tgid: 0,
    empty: 0,
    wakeup_bytes: 0,
    sample_every: 1,
    vmf_address: 0,
    wp_copy_hooked: 0,
    cgroup_levels: 0,
    regs_ip: 0,
    regs_orig_ax: 0,
    vmf_flags: 0,
    fault_flag_user: 0,
    signal_oom_mm: 0,
    stacks: 0,
};

/// Traced thread-group ids (unused when `trace_all`).
#[map]
pub(crate) static TRACED: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// `--cgroup`: ids (inode numbers) of the cgroups v2 whose processes are
/// traced, with their descendants'.
#[map]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(64, 0);

/// The end of the run: non-zero once userspace has cut the run off. Every
/// program checks it first, so all of them stop accounting at one instant,
/// before any is detached (docs/kernel-notes.md, "The end of a run").
///
/// A global in a data section of its own (a one-element array map the
/// loader writes as `.data.cutoff`): a program reads it with one load,
/// where a lookup in an array map costs a dozen instructions, in every
/// program, on every write fault.
#[unsafe(link_section = ".data.cutoff")]
static mut CUTOFF: u64 = 0;

/// In-kernel totals and drop counts, indexed by `counter::*` (the batched
/// fault outcomes are counted in their batch instead: `batch`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// `__GFP_MOVABLE`: one of the four zone-modifier bits, fixed since they were
/// introduced. User pages (including CoW copies) carry it; page tables and
/// atomic allocations from interrupts do not.
pub(crate) const GFP_MOVABLE: u32 = 0x08;
/// `__GFP_ZERO`, bit 8 from Linux 2.6 to 6.18 (`___GFP_ZERO_BIT = 8`).
/// A write fault on the shared zero page asks for a zeroed page; a real
/// copy does not.
pub(crate) const GFP_ZERO: u32 = 0x100;

/// One field of `CONFIG`. A volatile read stops the compiler from folding
/// the zeros the object was compiled with; reading one field at a time keeps
/// the hot hooks from loading the whole struct for the one or two they use.
macro_rules! setting {
    ($field:ident) => {{
        // SAFETY: CONFIG is plain data, written only before loading.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&$crate::shared::CONFIG.$field) };
        v
    }};
}
pub(crate) use setting;

/// The process (thread-group id, the userspace PID) and the thread an
/// event is about.
#[derive(Clone, Copy)]
pub(crate) struct Ids {
    pub(crate) tgid: u32,
    pub(crate) tid: u32,
}

#[inline(always)]
pub(crate) fn current_ids() -> Ids {
    let id = bpf_get_current_pid_tgid();
    Ids { tgid: (id >> 32) as u32, tid: id as u32 }
}

/// True once the run is over.
#[inline(always)]
pub(crate) fn cut_off() -> bool {
    // SAFETY: plain data; a volatile read, since userspace writes it.
    unsafe { core::ptr::read_volatile(&raw const CUTOFF) != 0 }
}

/// True when a program must do nothing: built empty (benchmarks), or the
/// run is over.
#[inline(always)]
pub(crate) fn off() -> bool {
    setting!(empty) != 0 || cut_off()
}

#[inline(always)]
pub(crate) fn is_traced(tgid: u32) -> bool {
    // SAFETY: lookup result is only tested for presence.
    tgid != setting!(self_tgid)
        && (setting!(trace_all) != 0 || unsafe { TRACED.get(tgid).is_some() })
        && (setting!(cgroup_levels) == 0 || in_cgroups())
}

/// Whether the current task's cgroup v2, or one of its ancestors, is one of
/// `CGROUPS`: checked level by level from the root, as deep as asked.
#[inline(always)]
fn in_cgroups() -> bool {
    let levels = setting!(cgroup_levels);
    for level in 0..MAX_CGROUP_LEVELS {
        if level >= levels {
            break;
        }
        // SAFETY: helper has no preconditions; 0 means deeper than the task.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        // SAFETY: lookup result is only tested for presence.
        if id == 0 || unsafe { CGROUPS.get(id).is_some() } {
            return id != 0;
        }
    }
    false
}

/// Adds `n` to counter `idx` (`counter::*`) on this CPU.
#[inline(always)]
pub(crate) fn count(idx: u32, n: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot. A preempted fexit lets another program
        // run on this CPU: an increment can then, rarely, be lost (a
        // counter, never a pointer, is at stake).
        unsafe { *c += n };
    }
}

#[inline(always)]
pub(crate) fn bump(idx: u32) {
    count(idx, 1);
}

#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Reads a `T` at `base + offset` in kernel memory (offsets come from the
/// running kernel's BTF, through `CONFIG`).
///
/// # Safety
/// `base` must be a kernel pointer the hook received or read.
#[inline(always)]
pub(crate) unsafe fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

/// The current task's user register at `offset` in `struct pt_regs`:
/// where it was in user space when it entered the kernel (the write that
/// faulted, for a user fault; the system call, for a fault the kernel took
/// on its behalf).
///
/// A direct load, not `bpf_probe_read_kernel`: the helper's pointer is
/// typed by the kernel's BTF and `offset` is a constant to the verifier
/// (a setting of the frozen, read-only `CONFIG`), so the verifier checks
/// the field against the kernel's own layout and the JIT makes the load a
/// fault-safe one. On the hottest path of the tool, that is a load where
/// the helper cost a call, its checks and a copy, for every fault.
#[inline(always)]
fn current_user_reg(offset: u32) -> Option<u64> {
    // SAFETY: both helpers take and return kernel pointers only.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // SAFETY: a non-null BTF pointer from the helper; the verifier checks
    // the offset and the JIT handles a fault.
    Some(unsafe { core::ptr::read_volatile(regs.add(offset as usize) as *const u64) })
}

/// The current task's user instruction pointer, 0 when unknown. For a
/// fault taken in user mode these registers are the fault's own (the
/// exception saved them on entry from user space): the writing
/// instruction.
#[inline(always)]
pub(crate) fn current_user_ip() -> u64 {
    current_user_reg(setting!(regs_ip)).unwrap_or(0)
}

/// The system call the current task is in (its user registers'
/// `orig_ax`), for a fault the kernel took on its behalf.
#[inline(always)]
pub(crate) fn current_syscall() -> u64 {
    current_user_reg(setting!(regs_orig_ax)).unwrap_or(u64::MAX)
}
