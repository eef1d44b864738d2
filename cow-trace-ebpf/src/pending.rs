//! Write faults waiting for their outcome, one slot per thread, for both
//! fault paths: the tracepoint backend's pending faults (open from the
//! page-fault tracepoint until the thread's next allocation, fault, syscall
//! or exit) and the kernel-function backends' faults in flight (open from
//! `do_wp_page`'s entry to its return). Userspace counts the slots still
//! open at the cut-off as faults in flight.

use aya_ebpf::{macros::map, maps::Array};
use cow_trace_common::{counter, FaultRecord, PendingFault as Pending};

use crate::{
    batch::{record_fault, Clock},
    emit::{emit, Detail, Outcome},
    shared::{bump, now, Ids},
};

/// A direct-mapped table indexed by thread id modulo its size, because an
/// array lookup is inlined where a hash lookup is a call, on the hottest
/// path of the tool. When two threads collide, the older fault is counted
/// unclassified, never guessed.
#[map]
static PENDING: Array<Pending> = Array::with_max_entries(PENDING_SLOTS, 0);
const PENDING_SLOTS: u32 = 1 << 16;

/// Set in `Pending::seen` of every slot the kernel-function backends open:
/// the fault is inside the kernel's handler, and only the handler's return
/// says what it did.
pub(crate) const IN_HANDLER: u32 = 1 << 31;

/// The slot of thread `tid`, whoever holds it now. Only a thread with a
/// colliding id can write it concurrently; every writer closes the slot
/// (`tid = 0`) before recording its outcome, so an allocation in an
/// interrupt meanwhile is never taken for that fault's.
#[inline(always)]
pub(crate) fn pending_slot(tid: u32) -> Option<*mut Pending> {
    PENDING.get_ptr_mut(tid & (PENDING_SLOTS - 1))
}

/// The thread's next fault, syscall or exit: its pending write fault, if
/// any, allocated nothing, so it was resolved by reuse. Recorded in this
/// CPU's batch when `batched` (the hook runs with preemption off), else
/// sent at once. A kernel-function fault still open here lost its return
/// (a missed kretprobe): its outcome is unknown.
#[inline(always)]
pub(crate) fn settle_pending(tid: u32, batched: bool) {
    let Some(p) = pending_slot(tid) else {
        return;
    };
    // SAFETY: a valid slot (see `pending_slot`).
    unsafe {
        if (*p).sent_tid == tid {
            (*p).sent_tid = 0;
        }
        if (*p).tid != tid {
            return;
        }
        (*p).tid = 0;
        if (*p).seen & IN_HANDLER != 0 {
            bump(counter::UNCLASSIFIED);
            return;
        }
        let ids = Ids { tgid: (*p).tgid, tid };
        // A reuse has no latency, so no sample to stand for others.
        let addr = (*p).addr & !FaultRecord::SAMPLED;
        let ip = (*p).ip;
        if batched {
            record_fault(Outcome::Reuse, ids, 0, addr, ip, Clock::events());
        } else {
            let kernel = addr & FaultRecord::KERNEL != 0;
            let addr = addr & FaultRecord::ADDR_MASK;
            let fault = Detail::Fault { outcome: Outcome::Reuse, latency_ns: 0, addr, ip, kernel, weight: 0 };
            emit(ids, now(), fault);
        }
    }
}
