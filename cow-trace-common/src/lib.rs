//! Types shared by the BPF programs and the userspace loader.
//!
//! Everything here is `#[repr(C)]` with explicitly sized fields laid out so
//! that there is no implicit padding: the bytes the kernel writes into the
//! ring buffer are exactly the bytes userspace reads back.
#![cfg_attr(not(test), no_std)]

pub mod hooks;

/// Kinds of records sent through the ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A traced process created a new process (not a thread).
    /// `pid` = parent tgid, `other` = child tgid, `comm` = child's comm.
    Spawn = 1,
    /// The clone/fork syscall that created `other` returned in the parent.
    /// `latency_ns` = syscall entry to exit as seen by the parent thread.
    ForkLatency = 2,
    /// A write fault on a present page that was resolved by copying it.
    /// `latency_ns` = fault entry to the allocation of the new page, 0 when
    /// the fault was not timed; `other` = how many copies that latency
    /// stands for in a histogram when it is one timed sample of several
    /// (see [`Config::sample_every`]), else 0 (itself).
    CowCopy = 3,
    /// A write fault on a present, write-protected page that needed no copy
    /// (the page was exclusive and was reused in place).
    CowReuse = 4,
    /// The last thread of a traced process exited. `other` = exit code
    /// (wait status encoding).
    Exit = 5,
    /// A write fault on a present page that mapped the shared zero page
    /// (memory read before it was ever written): resolved by a zeroed new
    /// page, not a copy, and no cost of fork. `latency_ns` as for CowCopy.
    ZeroFill = 6,
    /// A traced process replaced its program (execve). `comm` = the new
    /// program's name. Ends the sharing of its memory with its parent.
    Exec = 7,
    /// A write fault on a huge-page (PMD) mapping, kprobe/fentry backends
    /// only (`do_huge_pmd_wp_page`). `latency_ns` = entry to return,
    /// `other` = bytes of user memory the kernel allocated meanwhile (what
    /// it copied; 0 when it reused the huge page or split it and left the
    /// 4 KiB faults that follow to do the copying), `flags` = the raw
    /// `vm_fault_t` it returned.
    HugeCow = 8,
    /// A write fault on a present page that failed: the kernel could not
    /// resolve it (no memory: the memory cgroup's charge failed and the OOM
    /// killer ran; or SIGBUS, SIGSEGV, ...), so it neither copied nor
    /// reused the page. `other` = the [`EventKind`] of an outcome already
    /// sent for this fault that it replaces (tracepoint backend: the
    /// fault's page was allocated, so it was sent as a copy or zero-fill,
    /// before the fault failed), 0 when none; `flags` = the raw
    /// `vm_fault_t` on the kprobe/fentry backends.
    CowFailed = 9,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Spawn,
            2 => Self::ForkLatency,
            3 => Self::CowCopy,
            4 => Self::CowReuse,
            5 => Self::Exit,
            6 => Self::ZeroFill,
            7 => Self::Exec,
            8 => Self::HugeCow,
            9 => Self::CowFailed,
            _ => return None,
        })
    }
}

/// One record in the ring buffer: 72 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Thread-group id (the userspace "PID") the event belongs to.
    pub pid: u32,
    /// Thread id that caused it.
    pub tid: u32,
    /// Kind-specific: child tgid for Spawn/ForkLatency, exit code for Exit.
    pub other: u32,
    /// `bpf_ktime_get_ns()` when the event completed.
    pub ts_ns: u64,
    /// Kind-specific latency, 0 when unknown.
    pub latency_ns: u64,
    /// Faulting user address for CoW events. ForkLatency with
    /// [`FLAG_DUP_MMAP`]: nanoseconds of `latency_ns` spent in `dup_mmap`
    /// (copying the address space: VMAs and page tables).
    pub addr: u64,
    /// Task comm at the time of the event.
    pub comm: [u8; 16],
    /// Kind-specific flags (see `FLAG_*`).
    pub flags: u32,
    pub _reserved: u32,
    /// CoW events (CowFailed included): the user instruction pointer of
    /// the write that faulted (the task's user registers), 0 when unknown.
    pub ip: u64,
}

/// First `u32` of a [`FaultBatch`] record, where an [`Event`] has its kind
/// (1..=15): tells the two record types apart in the ring buffer.
pub const FAULT_BATCH: u32 = 0x4642_4154; // "TABF"

/// Records per [`FaultBatch`].
pub const FAULT_BATCH_LEN: usize = 64;

/// One CoW-fault outcome (copy, reuse or zero-fill) in a [`FaultBatch`]:
/// what an [`Event`] of that kind carries, in 24 bytes instead of 72. Its
/// time is its batch's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultRecord {
    /// The faulting address rounded down to 4 KiB; the [`EventKind`] in
    /// bits 0-3; [`FaultRecord::SAMPLED`] in bit 4.
    pub addr_kind: u64,
    /// As [`Event::ip`].
    pub ip: u64,
    /// As [`Event::latency_ns`], saturated at `u32::MAX` (4.3 s); 0 when
    /// the fault was not timed.
    pub latency_ns: u32,
    /// Thread-group id.
    pub pid: u32,
}

impl FaultRecord {
    pub const KIND_MASK: u64 = 0xf;
    /// The fault was timed as the sample of the run of
    /// [`Config::sample_every`] faults it closes, so its latency stands for
    /// that many in a histogram.
    pub const SAMPLED: u64 = 0x10;
    /// The fault was taken in kernel mode (the kernel writing user memory
    /// for a system call): `ip` holds the system call's number.
    pub const KERNEL: u64 = 0x20;
    pub const ADDR_MASK: u64 = !0xfff;

    pub fn kind(&self) -> u32 {
        (self.addr_kind & Self::KIND_MASK) as u32
    }

    pub fn addr(&self) -> u64 {
        self.addr_kind & Self::ADDR_MASK
    }

    pub fn sampled(&self) -> bool {
        self.addr_kind & Self::SAMPLED != 0
    }

    pub fn kernel_mode(&self) -> bool {
        self.addr_kind & Self::KERNEL != 0
    }
}

/// Fault outcomes of one CPU, sent as one ring-buffer record: the fault
/// hooks fire for every page a storm copies, and one ring-buffer record per
/// fault costs more than the rest of the hook. The header and the first
/// `count` records are sent; the fields after them are the CPU's own
/// bookkeeping, never sent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FaultBatch {
    /// Always [`FAULT_BATCH`].
    pub magic: u32,
    pub count: u32,
    /// `bpf_ktime_get_ns()` at the first record: the time of every record
    /// in the batch, never before a fork, exec or exit the record followed
    /// (see `batch_fault` on the BPF side).
    pub ts_ns: u64,
    pub records: [FaultRecord; FAULT_BATCH_LEN],
    /// Write faults the running task took since it was scheduled in.
    pub slice_faults: u32,
    /// Non-zero while a program changes the batch: a program that finds it
    /// set interrupted or preempted that writer, and leaves the batch alone
    /// (see `batch` on the BPF side).
    pub busy: u32,
    /// The BPF side's count of traced forks, execs and exits when the batch
    /// started.
    pub window_events: u64,
    /// This CPU's totals of the outcomes added to its batches, by
    /// `counter::*` index (see [`BATCH_COUNTED`]), and of timed faults:
    /// kept here rather than in `COUNTERS` because the batch is already at
    /// hand where they change, and on kernels before 6.10 each lookup of a
    /// per-CPU map is a helper call on every write fault. Userspace adds
    /// them to `COUNTERS`' totals.
    pub counted: [u64; BATCH_COUNTED.len()],
}

/// The counters a [`FaultBatch`] keeps for its CPU, in the order of
/// `FaultBatch::counted`.
pub const BATCH_COUNTED: [u32; 4] =
    [counter::COW_COPIES, counter::COW_REUSES, counter::ZERO_FILLS, counter::TIMED_FAULTS];

/// A write fault waiting for its outcome: one slot of the `PENDING` table,
/// read by userspace at the end of a run to count the faults in flight at
/// the cut-off. On the tracepoint backend the fault waits for the thread's
/// next allocation, fault, syscall or exit; on the kernel-function
/// backends, for `do_wp_page` (or `do_huge_pmd_wp_page`) to return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingFault {
    /// Fault time when the fault is timed, else 0.
    pub start: u64,
    /// The faulting address rounded down to 4 KiB, with
    /// `FaultRecord::SAMPLED` when the fault is a timed sample and
    /// `FaultRecord::KERNEL` when it was taken in kernel mode.
    pub addr: u64,
    /// As [`FaultRecord::ip`].
    pub ip: u64,
    pub tgid: u32,
    /// The thread whose fault is open in this slot; 0 when none is (thread
    /// 0 is the idle task, which takes no user faults).
    pub tid: u32,
    /// The thread whose fault in this slot was sent as a copy or zero-fill
    /// (`sent_kind`) and which has not faulted or entered a syscall since:
    /// that fault can still turn out to have failed. 0 when none.
    pub sent_tid: u32,
    pub sent_kind: u32,
    /// Kernel-function backends: what the fault did while the handler ran
    /// (`kernel_path`'s bits on the BPF side); never 0 in their slots, and
    /// always 0 in the tracepoint backend's.
    pub seen: u32,
    /// Kernel-function backends: bytes of user memory allocated during a
    /// huge-page fault.
    pub allocated: u32,
}

/// Bytes of a [`FaultBatch`] before its records.
pub const FAULT_BATCH_HEADER: usize = 16;

/// Spawn, tracepoint backend: the parent was not inside a clone/fork
/// syscall (kernel-created process), so no fork latency will follow. The
/// kprobe and fentry backends measure fork latency in `copy_process`, which
/// returns before the spawn is seen, and always set it.
pub const FLAG_NO_SYSCALL: u32 = 1;
/// ForkLatency: `addr` holds the time spent in `dup_mmap`.
pub const FLAG_DUP_MMAP: u32 = 2;
/// Exit: the OOM killer chose the process (`signal_struct.oom_mm` set,
/// which only `mark_oom_victim` does).
pub const FLAG_OOM_VICTIM: u32 = 4;
/// CowCopy/CowReuse/ZeroFill: the fault was taken in kernel mode
/// (the kernel writing user memory for a system call); `ip` holds the
/// system call's number.
pub const FLAG_KERNEL_MODE: u32 = 8;

/// Indexes into the per-CPU `COUNTERS` array. The kernel counts every event
/// it classifies, whether or not the ring buffer had room, so that
/// userspace can check its totals against the kernel's: here, or, for the
/// outcomes added to a CPU's fault batch and the timed faults, in that
/// batch (`FaultBatch::counted`), which userspace adds.
pub mod counter {
    /// Events that could not be reserved in the ring buffer.
    pub const DROPPED: u32 = 0;
    // Indexes 1..=15 count the events of each kind, by `EventKind` value
    // (room for new kinds without renumbering anything).
    pub const SPAWNS: u32 = 1;
    pub const FORK_LATENCIES: u32 = 2;
    pub const COW_COPIES: u32 = 3;
    pub const COW_REUSES: u32 = 4;
    pub const EXITS: u32 = 5;
    pub const ZERO_FILLS: u32 = 6;
    pub const EXECS: u32 = 7;
    pub const HUGE_COWS: u32 = 8;
    pub const COW_FAILED: u32 = 9;
    /// Write faults left unclassified because another thread's fault took
    /// their table slot before they were resolved (colliding thread ids);
    /// they are neither copies nor reuses in the totals.
    pub const UNCLASSIFIED: u32 = 16;
    /// Traced-process set full: a child could not be followed.
    pub const TRACED_FULL: u32 = 17;
    /// Write faults timed (the clock read at their start), on every
    /// backend: all of a time slice's first [`TIMED_PER_SLICE`](crate::TIMED_PER_SLICE),
    /// then one in `sample_every`.
    pub const TIMED_FAULTS: u32 = 18;
    /// Number of counters.
    pub const COUNT: u32 = 24;
}

// The BPF side bumps `counter[kind as u32]`: the two numberings must agree.
const _: () = {
    assert!(EventKind::Spawn as u32 == counter::SPAWNS);
    assert!(EventKind::ForkLatency as u32 == counter::FORK_LATENCIES);
    assert!(EventKind::CowCopy as u32 == counter::COW_COPIES);
    assert!(EventKind::CowReuse as u32 == counter::COW_REUSES);
    assert!(EventKind::Exit as u32 == counter::EXITS);
    assert!(EventKind::ZeroFill as u32 == counter::ZERO_FILLS);
    assert!(EventKind::Exec as u32 == counter::EXECS);
    assert!(EventKind::HugeCow as u32 == counter::HUGE_COWS);
    assert!(EventKind::CowFailed as u32 == counter::COW_FAILED);
    assert!((EventKind::CowFailed as u32) < counter::UNCLASSIFIED);
};

/// The `vm_fault_t` bits a fault handler returns (`enum vm_fault_reason`,
/// the same values from Linux 5.1 to 6.18), as the kprobe/fentry backends
/// read them at `do_wp_page`'s return.
pub mod vm_fault {
    pub const OOM: u32 = 0x1;
    pub const SIGBUS: u32 = 0x2;
    pub const HWPOISON: u32 = 0x10;
    pub const HWPOISON_LARGE: u32 = 0x20;
    pub const SIGSEGV: u32 = 0x40;
    pub const RETRY: u32 = 0x400;
    /// `VM_FAULT_ERROR` without `VM_FAULT_FALLBACK`, which a huge-page
    /// fault returns to let 4 KiB faults do the work: not a failure.
    pub const FAILED: u32 = OOM | SIGBUS | HWPOISON | HWPOISON_LARGE | SIGSEGV;

    /// The fault failed: it neither copied nor reused the page.
    pub const fn failed(ret: u32) -> bool {
        ret & FAILED != 0
    }

    /// The handler gave up the lock and the fault is taken again: the
    /// outcome is the retry's, not this call's.
    pub const fn retried(ret: u32) -> bool {
        ret & FAILED == 0 && ret & RETRY != 0
    }
}

/// Load-time settings written by the loader into the BPF object's `CONFIG`
/// global. Kernel structure offsets come from the running kernel's BTF,
/// tracepoint field offsets from tracefs `format` files.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// 1: trace every process; 0: only those in the `TRACED` map.
    pub trace_all: u32,
    /// 1: add children of traced processes to `TRACED`.
    pub follow: u32,
    /// `offsetof(struct task_struct, pid)`.
    pub task_pid: u32,
    /// `offsetof(struct task_struct, tgid)`.
    pub task_tgid: u32,
    /// `offsetof(struct task_struct, signal)`.
    pub task_signal: u32,
    /// `offsetof(struct task_struct, exit_code)`.
    pub task_exit_code: u32,
    /// `offsetof(struct signal_struct, live)`.
    pub signal_live: u32,
    /// `offsetof(struct task_struct, thread_info.status)` (x86): its
    /// `TS_COMPAT` bit marks a task inside a 32-bit (ia32) system call.
    pub task_ti_status: u32,
    /// The loader's own tgid: never traced, so that whole-system tracing
    /// does not watch itself drain the ring buffer.
    pub self_tgid: u32,
    /// 1: every program returns at once. Attaches the same hooks with no
    /// work in them: the overhead floor the benchmark compares against.
    pub empty: u32,
    /// Unread ring-buffer bytes above which a fault event wakes the reader
    /// (a quarter of the ring, at most 256 KiB).
    pub wakeup_bytes: u32,
    /// `offsetof(struct vm_fault, address)` (kprobe/fentry backends).
    pub vmf_address: u32,
    /// 1: the kernel has a `wp_page_copy` function and it is hooked, so a
    /// fault that entered it copied; 0: it is inlined, and a fault that
    /// allocated an order-0 user page copied.
    pub wp_copy_hooked: u32,
    /// Every backend: after the first [`TIMED_PER_SLICE`] write faults of a
    /// task's time slice, time one fault in this many (1: every fault).
    /// Each clock read costs about as much as the rest of the hook.
    pub sample_every: u32,
    /// `--cgroup`: 0 when off; else one more than the deepest level of the
    /// cgroups in `CGROUPS`, whose processes (and their descendants') alone
    /// are traced.
    pub cgroup_levels: u32,
    /// `offsetof(struct signal_struct, oom_mm)`; 0 when the kernel has none.
    pub signal_oom_mm: u32,
    /// `offsetof(struct pt_regs, ip)`: the user instruction pointer of a
    /// fault, from the tracepoint's `regs` or the task's user registers.
    pub regs_ip: u32,
    /// `offsetof(struct pt_regs, orig_ax)`: the system call number in a
    /// task's user registers during a system call.
    pub regs_orig_ax: u32,
    /// `offsetof(struct vm_fault, flags)` (kprobe/fentry backends).
    pub vmf_flags: u32,
    /// `FAULT_FLAG_USER` from the kernel's BTF: the fault came from user
    /// mode (kprobe/fentry backends; 0: unknown, every fault is user).
    pub fault_flag_user: u32,
    /// `--stacks`: 1 to count the user stack of every copy (see
    /// [`StackKey`]); 0 leaves the stack maps untouched and empty.
    pub stacks: u32,
}

/// `--stacks`: the key of the count of copies by user stack. `image` tells
/// apart the programs one PID ran: the time (`bpf_ktime_get_ns`) of the
/// fork or exec that started its current address space, the same as that
/// Spawn or Exec event's `ts_ns`; 0 for a process that existed before the
/// run and has not exec'd since.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub image: u64,
    pub tgid: u32,
    /// An id in the stack-trace map, or one of [`stack_lost`].
    pub stack_id: u32,
}

/// `StackKey::stack_id` of copies whose stack could not be kept, by why,
/// and the per-CPU `STACK_LOST` counters.
pub mod stack_lost {
    /// Stack ids `>=` this are not ids but reasons.
    pub const FIRST: u32 = 0xffff_fff0;
    /// The stack hashed to a bucket that holds another stack (the
    /// stack-trace map does not replace one it has handed out).
    pub const COLLISION: u32 = 0xffff_fff0;
    /// The walk failed (no user stack to read, no memory).
    pub const FAILED: u32 = 0xffff_fff1;
    /// No stack was taken for the copy's fault.
    pub const NOT_TAKEN: u32 = 0xffff_fff2;
    /// Index in `STACK_LOST`: copies not counted because the count map was
    /// full.
    pub const COUNTS_FULL: u32 = 0;
    /// Index in `STACK_LOST`: processes whose image could not be recorded
    /// (the image map was full); their stacks are counted under image 0.
    pub const IMAGES_FULL: u32 = 1;
    pub const COUNT: u32 = 4;
}

/// Deepest cgroup v2 level `--cgroup` can name (the kernel's own default
/// limit on depth is far above what services use).
pub const MAX_CGROUP_LEVELS: u32 = 32;

/// Write faults a task takes after being scheduled in that are all timed,
/// before sampling starts: a task that faults now and then has every fault
/// timed; only bursts are sampled.
pub const TIMED_PER_SLICE: u32 = 64;

/// Value stored in the `TRACED` map for each traced tgid.
pub const TRACED_ROOT: u8 = 1;
pub const TRACED_CHILD: u8 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are `#[repr(C)]`, made of integers only, with no padding.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FaultBatch {}
    unsafe impl aya::Pod for super::PendingFault {}
    unsafe impl aya::Pod for super::StackKey {}
}

// Layout checks: a change that introduces padding fails to compile.
const _: () = assert!(core::mem::size_of::<Event>() == 72);
const _: () = assert!(core::mem::size_of::<PendingFault>() == 48);
const _: () = assert!(core::mem::size_of::<Config>() == 84);
const _: () = assert!(core::mem::size_of::<FaultRecord>() == 24);
const _: () = assert!(core::mem::size_of::<StackKey>() == 16);
const _: () = assert!(
    core::mem::size_of::<FaultBatch>()
        == FAULT_BATCH_HEADER + FAULT_BATCH_LEN * 24 + 16 + 8 * BATCH_COUNTED.len()
);

#[cfg(test)]
mod tests {
    use super::vm_fault;

    #[test]
    fn failed_write_faults_are_told_from_retries_and_successes() {
        // No memory (the memory cgroup's charge failed), SIGBUS, SIGSEGV.
        for ret in [vm_fault::OOM, vm_fault::SIGBUS, vm_fault::SIGSEGV, vm_fault::HWPOISON] {
            assert!(vm_fault::failed(ret) && !vm_fault::retried(ret), "{ret:#x}");
        }
        // A plain copy or reuse returns 0; a copy may add VM_FAULT_MAJOR (4).
        for ret in [0, 0x4] {
            assert!(!vm_fault::failed(ret) && !vm_fault::retried(ret), "{ret:#x}");
        }
        // VM_FAULT_FALLBACK (0x800): a huge-page fault leaves the work to
        // 4 KiB faults; not a failure.
        assert!(!vm_fault::failed(0x800));
        assert!(vm_fault::retried(vm_fault::RETRY));
        assert!(!vm_fault::retried(vm_fault::RETRY | vm_fault::OOM));
    }
}
