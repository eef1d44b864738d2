//! The ring buffer to userspace and the one place that fills an [`Event`]'s
//! kind-specific fields: callers say what happened in a [`Detail`], with
//! named fields, and [`emit`] lays it out on the wire.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_get_current_comm,
    macros::map,
    maps::RingBuf,
};
use cow_trace_common::{
    counter, Event, EventKind, FLAG_DUP_MMAP, FLAG_KERNEL_MODE, FLAG_NO_SYSCALL, FLAG_OOM_VICTIM,
};

use crate::shared::{bump, setting, Ids};

/// Events to userspace. The loader resizes it (`--ring-buffer-size`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// How a write fault on a present page was resolved.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    /// The page was copied.
    Copy,
    /// The page was exclusive and reused in place.
    Reuse,
    /// The page was the shared zero page, replaced by a zeroed one.
    ZeroFill,
}

impl Outcome {
    #[inline(always)]
    pub(crate) fn kind(self) -> EventKind {
        match self {
            Outcome::Copy => EventKind::CowCopy,
            Outcome::Reuse => EventKind::CowReuse,
            Outcome::ZeroFill => EventKind::ZeroFill,
        }
    }
}

/// What an event says beyond who and when (see `EventKind` for the wire).
#[derive(Clone, Copy)]
pub(crate) enum Detail {
    /// A traced process created process `child`; `in_syscall`: inside a
    /// clone/fork syscall, whose fork latency will follow.
    Spawn { child: u32, in_syscall: bool },
    /// Creating `child` took `latency_ns`, `dup_mmap_ns` of it copying the
    /// address space (0: not measured).
    ForkLatency { child: u32, latency_ns: u64, dup_mmap_ns: u64 },
    /// The process's last thread exited with wait status `code`; `oom`: the
    /// OOM killer had chosen it.
    Exit { code: i32, oom: bool },
    /// The process replaced its program.
    Exec,
    /// A 4 KiB write fault at `addr` by user instruction `ip` (with
    /// `kernel`: by the kernel in system call number `ip`), resolved by
    /// `outcome` in `latency_ns` (0: not timed); `weight`: the faults its
    /// latency stands for when it is a timed sample (0: itself alone).
    /// Sent this way only when the CPU's batch is taken (see `batch`).
    Fault { outcome: Outcome, latency_ns: u64, addr: u64, ip: u64, kernel: bool, weight: u32 },
    /// A huge-page write fault at `addr`: `allocated` bytes of user memory
    /// allocated meanwhile, `vm_fault` the handler's raw return.
    HugeCow { latency_ns: u64, addr: u64, allocated: u32, vm_fault: u32 },
    /// A write fault at `addr` that failed, replacing the outcome of kind
    /// `replaces` already sent for it (0: none); `vm_fault` the handler's
    /// raw return where known; `ip` as for `Fault` (0: not known), so that
    /// a copy taken back leaves its writer too.
    Failed { latency_ns: u64, addr: u64, replaces: u32, vm_fault: u32, ip: u64 },
}

impl Detail {
    #[inline(always)]
    fn kind(&self) -> EventKind {
        match self {
            Detail::Spawn { .. } => EventKind::Spawn,
            Detail::ForkLatency { .. } => EventKind::ForkLatency,
            Detail::Exit { .. } => EventKind::Exit,
            Detail::Exec => EventKind::Exec,
            Detail::Fault { outcome, .. } => outcome.kind(),
            Detail::HugeCow { .. } => EventKind::HugeCow,
            Detail::Failed { .. } => EventKind::CowFailed,
        }
    }

    /// The wire's kind-specific fields: `(other, latency_ns, addr, flags)`.
    #[inline(always)]
    fn fields(self) -> (u32, u64, u64, u32) {
        match self {
            Detail::Spawn { child, in_syscall } => {
                (child, 0, 0, if in_syscall { 0 } else { FLAG_NO_SYSCALL })
            }
            Detail::ForkLatency { child, latency_ns, dup_mmap_ns } => {
                (child, latency_ns, dup_mmap_ns, if dup_mmap_ns > 0 { FLAG_DUP_MMAP } else { 0 })
            }
            Detail::Exit { code, oom } => (code as u32, 0, 0, if oom { FLAG_OOM_VICTIM } else { 0 }),
            Detail::Exec => (0, 0, 0, 0),
            Detail::Fault { latency_ns, addr, kernel, weight, .. } => {
                (weight, latency_ns, addr, if kernel { FLAG_KERNEL_MODE } else { 0 })
            }
            Detail::HugeCow { latency_ns, addr, allocated, vm_fault } => {
                (allocated, latency_ns, addr, vm_fault)
            }
            Detail::Failed { latency_ns, addr, replaces, vm_fault, .. } => {
                (replaces, latency_ns, addr, vm_fault)
            }
        }
    }
}

/// Sends one event about `ids` at `ts_ns` (the caller's one clock read).
/// Only process-level events carry a comm: fault events are many, and
/// userspace names processes from these and from /proc.
#[inline(always)]
pub(crate) fn emit(ids: Ids, ts_ns: u64, detail: Detail) {
    let kind = detail.kind();
    let (other, latency_ns, addr, flags) = detail.fields();
    let ip = match detail {
        Detail::Fault { ip, .. } | Detail::Failed { ip, .. } => ip,
        _ => 0,
    };
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
                pid: ids.tgid,
                tid: ids.tid,
                other,
                ts_ns,
                latency_ns,
                addr,
                comm,
                flags,
                _reserved: 0,
                ip,
            });
            entry.submit(submit_flags(kind));
        }
        None => bump(counter::DROPPED),
    }
}

/// Fault records wake the reader only once `CONFIG.wakeup_bytes` are
/// waiting; below that, userspace drains on a short timer. A wake-up per
/// record costs more than the fault being measured (docs/kernel-notes.md,
/// "Costs worth knowing").
#[inline(always)]
pub(crate) fn submit_flags(kind: EventKind) -> u64 {
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
