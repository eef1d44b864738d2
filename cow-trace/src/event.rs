//! Ring-buffer records decoded, once, into typed [`Event`]s.
//!
//! Two record types share the ring: single wire events (process-level
//! events, and every event of the kprobe and fentry backends) and, from the
//! tracepoint backend's fault hooks, [`FaultBatch`]es of compact
//! [`FaultRecord`]s, one per CPU at a time. Both become `Event`s here, and
//! nothing above this module reads the wire's kind-specific fields.
//!
//! [`FaultBatch`]: cow_trace_common::FaultBatch

use cow_trace_common::{
    Event as Wire, EventKind, FaultRecord, FAULT_BATCH, FAULT_BATCH_HEADER, FAULT_BATCH_LEN, FLAG_DUP_MMAP,
    FLAG_KERNEL_MODE, FLAG_NO_SYSCALL, FLAG_OOM_VICTIM,
};

/// A task comm as the kernel wrote it: NUL-padded, not always UTF-8. Kept
/// raw so that events whose name nobody reads cost no allocation; shown
/// with [`lossless`](crate::sanitize::lossless), which keeps every byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Comm([u8; 16]);

impl Comm {
    pub fn new(raw: [u8; 16]) -> Self {
        Self(raw)
    }

    /// Fault records carry no comm.
    pub fn is_empty(&self) -> bool {
        self.0[0] == 0
    }

    /// The bytes before the first NUL.
    pub fn bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// Whether it names `s` exactly.
    pub fn is(&self, s: &str) -> bool {
        self.bytes() == s.as_bytes()
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::sanitize::lossless(self.bytes()))
    }
}

/// A CoW fault outcome: where, by which instruction, how long, and how
/// many it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub addr: u64,
    /// The user instruction pointer of the write; 0 when unknown. With
    /// `kernel`, the number of the system call the kernel wrote for.
    pub ip: u64,
    /// The fault was taken in kernel mode (a system call writing user
    /// memory).
    pub kernel: bool,
    /// 0 when the fault was not timed.
    pub latency_ns: u64,
    /// How many faults the latency stands for in a histogram: more than one
    /// for a timed sample of a burst (see `EventKind::CowCopy`).
    pub weight: u64,
}

/// A write fault that failed (see `EventKind::CowFailed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub addr: u64,
    /// The outcome already counted for this fault that the failure
    /// replaces: a copy or a zero-fill whose page was freed again.
    pub replaces: Option<Replaced>,
    /// The handler's raw `vm_fault_t` (kprobe/fentry backends), else 0.
    pub vm_fault: u32,
    /// The writing instruction, as for a copy (a system call's number when
    /// the fault was the kernel's); 0 when unknown.
    pub ip: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaced {
    Copy,
    ZeroFill,
}

/// What happened, with the fields of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// The process created `child` (a process, not a thread); the event's
    /// comm is the child's. `no_syscall`: the tracepoint backend saw no
    /// clone-family call start this fork (a kernel-made process, or a
    /// 32-bit call), so no fork latency follows; the kernel-function
    /// backends set it on every fork and time it from `copy_process`.
    Spawn {
        child: u32,
        no_syscall: bool,
    },
    /// The fork that created `child` took `latency_ns`, of which `dup_mmap_ns`
    /// copying the address space where the backend can tell.
    ForkLatency {
        child: u32,
        latency_ns: u64,
        dup_mmap_ns: Option<u64>,
    },
    Copy(Fault),
    Reuse(Fault),
    ZeroFill(Fault),
    Failed(Failure),
    /// The last thread exited with a wait-status `status`; `oom_killed`:
    /// the OOM killer had chosen the process.
    Exit {
        status: u32,
        oom_killed: bool,
    },
    /// The process replaced its program; the event's comm is the new one.
    Exec,
    /// A write fault on a huge-page mapping: `copied_bytes` of user memory
    /// allocated meanwhile, `vm_fault` the handler's raw return.
    HugeCow {
        addr: u64,
        latency_ns: u64,
        copied_bytes: u64,
        vm_fault: u32,
    },
}

/// One decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Thread-group id (the userspace "PID").
    pub pid: u32,
    /// Thread that caused it (the PID for batched faults).
    pub tid: u32,
    /// `bpf_ktime_get_ns()` when it completed.
    pub ts_ns: u64,
    /// The thread's comm (empty for batched faults).
    pub comm: Comm,
    pub what: What,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self.what {
            What::Spawn { .. } => EventKind::Spawn,
            What::ForkLatency { .. } => EventKind::ForkLatency,
            What::Copy(_) => EventKind::CowCopy,
            What::Reuse(_) => EventKind::CowReuse,
            What::ZeroFill(_) => EventKind::ZeroFill,
            What::Failed(_) => EventKind::CowFailed,
            What::Exit { .. } => EventKind::Exit,
            What::Exec => EventKind::Exec,
            What::HugeCow { .. } => EventKind::HugeCow,
        }
    }

    /// Decodes a wire event; `None` for a kind this version does not know.
    pub fn from_wire(w: &Wire) -> Option<Self> {
        let fault = || Fault {
            addr: w.addr,
            ip: w.ip,
            kernel: w.flags & FLAG_KERNEL_MODE != 0,
            latency_ns: w.latency_ns,
            weight: (w.other as u64).max(1),
        };
        let what = match EventKind::from_u32(w.kind)? {
            EventKind::Spawn => What::Spawn { child: w.other, no_syscall: w.flags & FLAG_NO_SYSCALL != 0 },
            EventKind::ForkLatency => What::ForkLatency {
                child: w.other,
                latency_ns: w.latency_ns,
                dup_mmap_ns: (w.flags & FLAG_DUP_MMAP != 0).then_some(w.addr),
            },
            EventKind::CowCopy => What::Copy(fault()),
            EventKind::CowReuse => What::Reuse(fault()),
            EventKind::ZeroFill => What::ZeroFill(fault()),
            EventKind::Exit => What::Exit { status: w.other, oom_killed: w.flags & FLAG_OOM_VICTIM != 0 },
            EventKind::CowFailed => What::Failed(Failure {
                addr: w.addr,
                replaces: match EventKind::from_u32(w.other) {
                    Some(EventKind::CowCopy) => Some(Replaced::Copy),
                    Some(EventKind::ZeroFill) => Some(Replaced::ZeroFill),
                    _ => None,
                },
                vm_fault: w.flags,
                ip: w.ip,
            }),
            EventKind::Exec => What::Exec,
            EventKind::HugeCow => What::HugeCow {
                addr: w.addr,
                latency_ns: w.latency_ns,
                copied_bytes: w.other as u64,
                vm_fault: w.flags,
            },
        };
        Some(Self { pid: w.pid, tid: w.tid, ts_ns: w.ts_ns, comm: Comm(w.comm), what })
    }

    /// The event a fault record of a batch taken at `ts_ns` stands for, when
    /// the programs time one fault in `sample_every`; `None` when the record
    /// is not a fault outcome (a copy, reuse or zero-fill). The aggregation
    /// keys faults by process, so the thread is not kept.
    pub fn from_fault_record(ts_ns: u64, r: &FaultRecord, sample_every: u32) -> Option<Self> {
        let weight = if r.sampled() { sample_every.max(1) as u64 } else { 1 };
        let f = Fault {
            addr: r.addr(),
            ip: r.ip,
            kernel: r.kernel_mode(),
            latency_ns: r.latency_ns as u64,
            weight,
        };
        let what = match EventKind::from_u32(r.kind())? {
            EventKind::CowCopy => What::Copy(f),
            EventKind::CowReuse => What::Reuse(f),
            EventKind::ZeroFill => What::ZeroFill(f),
            _ => return None,
        };
        Some(Self { pid: r.pid, tid: r.pid, ts_ns, comm: Comm::default(), what })
    }
}

/// Decodes one single-event record's bytes. Records are written by our own
/// BPF programs, so anything else is a bug, counted rather than trusted.
pub fn decode_wire(bytes: &[u8]) -> Option<Wire> {
    if bytes.len() != size_of::<Wire>() {
        return None;
    }
    // SAFETY: length checked; the wire event is plain integers, valid for
    // any bits; ring-buffer records are 8-byte aligned but read_unaligned
    // does not rely on it.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Wire>()) })
}

/// A fault batch's time and records, or `None` when `bytes` is not one (or
/// is malformed: its length must match its count).
pub fn decode_batch(bytes: &[u8]) -> Option<(u64, impl Iterator<Item = FaultRecord> + '_)> {
    let word = |i: usize| bytes.get(i..i + 4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    if word(0)? != FAULT_BATCH {
        return None;
    }
    let count = word(4)? as usize;
    let size = size_of::<FaultRecord>();
    if count == 0 || count > FAULT_BATCH_LEN || bytes.len() != FAULT_BATCH_HEADER + count * size {
        return None;
    }
    let ts_ns = u64::from_ne_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let records = bytes[FAULT_BATCH_HEADER..].chunks_exact(size).map(|chunk| {
        // SAFETY: exactly one record's bytes; plain integers.
        unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<FaultRecord>()) }
    });
    Some((ts_ns, records))
}

/// Decodes one ring-buffer record and hands each event it holds to `each`:
/// `None` for a malformed record (or, in a batch, a malformed fault record),
/// to be counted.
pub fn decode_record(bytes: &[u8], sample_every: u32, mut each: impl FnMut(Option<Event>)) {
    let is_batch = bytes.len() >= 4 && bytes[..4] == FAULT_BATCH.to_ne_bytes();
    if is_batch {
        match decode_batch(bytes) {
            Some((ts, records)) => {
                records.for_each(|r| each(Event::from_fault_record(ts, &r, sample_every)));
            }
            None => each(None),
        }
        return;
    }
    each(decode_wire(bytes).as_ref().and_then(Event::from_wire));
}

/// The bytes of a fault batch record: what the BPF side sends. For tests
/// and benchmarks.
#[doc(hidden)]
pub fn encode_batch(ts_ns: u64, records: &[FaultRecord], count: u32) -> Vec<u8> {
    let mut b = FAULT_BATCH.to_ne_bytes().to_vec();
    b.extend_from_slice(&count.to_ne_bytes());
    b.extend_from_slice(&ts_ns.to_ne_bytes());
    for r in records {
        // SAFETY: FaultRecord is 24 bytes of plain integers.
        b.extend_from_slice(&unsafe { std::mem::transmute::<FaultRecord, [u8; 24]>(*r) });
    }
    b
}

/// The bytes of a single-event record. For tests and benchmarks.
#[doc(hidden)]
pub fn encode_wire(e: &Wire) -> Vec<u8> {
    // SAFETY: the wire event is 72 bytes of plain integers.
    unsafe { std::mem::transmute::<Wire, [u8; 72]>(*e) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_roundtrip_and_length_check() {
        let e = Wire {
            kind: EventKind::CowCopy as u32,
            pid: 7,
            tid: 8,
            other: 9,
            ts_ns: 10,
            latency_ns: 11,
            addr: 0xdead_b000,
            comm: *b"redis-server\0\0\0\0",
            flags: 0,
            _reserved: 0,
            ip: 0x5555_5555_1234,
        };
        let bytes = encode_wire(&e);
        assert_eq!(decode_wire(&bytes), Some(e));
        // Unaligned input decodes the same.
        let mut shifted = [0u8; 73];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(decode_wire(&shifted[1..]), Some(e));
        assert_eq!(decode_wire(&bytes[..71]), None);
        assert_eq!(decode_wire(&[0u8; 80]), None);
        let copy = Event::from_wire(&e).unwrap();
        assert!(matches!(copy.what, What::Copy(Fault { ip: 0x5555_5555_1234, kernel: false, .. })));
        let read = Event::from_wire(&Wire { flags: FLAG_KERNEL_MODE, ip: 0, ..e }).unwrap();
        assert!(matches!(read.what, What::Copy(Fault { ip: 0, kernel: true, .. })));
    }

    #[test]
    fn wire_fields_become_named_fields_per_kind() {
        let w = Wire {
            kind: EventKind::ForkLatency as u32,
            pid: 100,
            tid: 101,
            other: 200,
            ts_ns: 5,
            latency_ns: 20_000_000,
            addr: 15_000_000,
            comm: *b"redis-server\0\0\0\0",
            flags: FLAG_DUP_MMAP,
            _reserved: 0,
            ip: 0,
        };
        let e = Event::from_wire(&w).unwrap();
        assert_eq!(
            e.what,
            What::ForkLatency { child: 200, latency_ns: 20_000_000, dup_mmap_ns: Some(15_000_000) }
        );
        assert_eq!((e.pid, e.tid, e.ts_ns, e.comm.to_string()), (100, 101, 5, "redis-server".into()));
        let no_split = Event::from_wire(&Wire { flags: 0, ..w }).unwrap();
        assert!(matches!(no_split.what, What::ForkLatency { dup_mmap_ns: None, .. }));
        let spawn = Event::from_wire(&Wire { kind: 1, flags: FLAG_NO_SYSCALL, ..w }).unwrap();
        assert_eq!(spawn.what, What::Spawn { child: 200, no_syscall: true });
        let exit = Event::from_wire(&Wire { kind: EventKind::Exit as u32, other: 2 << 8, ..w }).unwrap();
        assert_eq!(exit.what, What::Exit { status: 512, oom_killed: false });
        let oom =
            Event::from_wire(&Wire { kind: EventKind::Exit as u32, other: 9, flags: FLAG_OOM_VICTIM, ..w });
        assert_eq!(oom.unwrap().what, What::Exit { status: 9, oom_killed: true });
        let failed = Event::from_wire(&Wire {
            kind: EventKind::CowFailed as u32,
            other: EventKind::CowCopy as u32,
            flags: 1,
            ..w
        });
        assert_eq!(
            failed.unwrap().what,
            What::Failed(Failure { addr: 15_000_000, replaces: Some(Replaced::Copy), vm_fault: 1, ip: 0 })
        );
        let huge =
            Event::from_wire(&Wire { kind: EventKind::HugeCow as u32, other: 2 << 20, flags: 0x800, ..w });
        assert_eq!(
            huge.unwrap().what,
            What::HugeCow {
                addr: 15_000_000,
                latency_ns: 20_000_000,
                copied_bytes: 2 << 20,
                vm_fault: 0x800
            }
        );
        // A single copy event's weight: `other`, at least 1.
        let copy = Event::from_wire(&Wire { kind: EventKind::CowCopy as u32, other: 0, ..w }).unwrap();
        assert!(matches!(copy.what, What::Copy(Fault { weight: 1, addr: 15_000_000, .. })));
        assert_eq!(Event::from_wire(&Wire { kind: 99, ..w }), None);
    }

    fn events(bytes: &[u8], sample_every: u32) -> Vec<Option<Event>> {
        let mut v = Vec::new();
        decode_record(bytes, sample_every, |e| v.push(e));
        v
    }

    #[test]
    fn fault_batches_decode_into_the_events_they_stand_for() {
        let copy = FaultRecord {
            addr_kind: 0x7f00_1234_5000 | EventKind::CowCopy as u64,
            ip: 0x5555_0000_1000,
            latency_ns: 2_500,
            pid: 42,
        };
        let sampled = FaultRecord {
            addr_kind: 0x7f00_1234_6000 | FaultRecord::SAMPLED | EventKind::CowCopy as u64,
            ip: 0x5555_0000_2000,
            latency_ns: 900,
            pid: 42,
        };
        // A kernel-mode reuse: its ip is the system call (read).
        let reuse = FaultRecord {
            addr_kind: 0x5000 | FaultRecord::KERNEL | EventKind::CowReuse as u64,
            ip: 0,
            latency_ns: 0,
            pid: 43,
        };
        let bytes = encode_batch(7_000, &[copy, sampled, reuse], 3);
        let events: Vec<Event> = events(&bytes, 16).into_iter().map(|e| e.expect("an outcome")).collect();
        assert_eq!(events.len(), 3);
        assert_eq!(
            (events[0].pid, events[0].ts_ns, events[0].what),
            (
                42,
                7_000,
                What::Copy(Fault {
                    addr: 0x7f00_1234_5000,
                    ip: 0x5555_0000_1000,
                    kernel: false,
                    latency_ns: 2_500,
                    weight: 1
                })
            )
        );
        // A timed sample stands for `sample_every` copies; its address
        // loses the flag.
        assert_eq!(
            events[1].what,
            What::Copy(Fault {
                addr: 0x7f00_1234_6000,
                ip: 0x5555_0000_2000,
                kernel: false,
                latency_ns: 900,
                weight: 16
            })
        );
        assert_eq!(
            (events[2].pid, events[2].what),
            (43, What::Reuse(Fault { addr: 0x5000, ip: 0, kernel: true, latency_ns: 0, weight: 1 }))
        );
        // A count that disagrees with the length, an empty batch, or a
        // count beyond the batch's capacity is malformed.
        assert!(decode_batch(&encode_batch(1, &[copy, reuse], 3)).is_none());
        assert!(decode_batch(&encode_batch(1, &[], 0)).is_none());
        let too_many = vec![copy; FAULT_BATCH_LEN + 1];
        assert!(decode_batch(&encode_batch(1, &too_many, too_many.len() as u32)).is_none());
        assert_eq!(events_of_malformed(&encode_batch(1, &[copy, reuse], 3)), 1);
        // A single event is not a batch.
        assert!(decode_batch(&[3u8; 72]).is_none());
        // A record whose kind is not a fault outcome is not trusted: an
        // exit or a spawn never travels in a batch.
        for kind in [EventKind::Exit, EventKind::Spawn, EventKind::HugeCow] {
            let r = FaultRecord { addr_kind: 0x5000 | kind as u64, ip: 0, latency_ns: 0, pid: 42 };
            assert!(Event::from_fault_record(1, &r, 16).is_none(), "{kind:?}");
        }
        let r = FaultRecord { addr_kind: 0x5000, ip: 0, latency_ns: 0, pid: 42 };
        assert!(Event::from_fault_record(1, &r, 16).is_none());
    }

    fn events_of_malformed(bytes: &[u8]) -> usize {
        events(bytes, 16).iter().filter(|e| e.is_none()).count()
    }

    #[test]
    fn comm_decoding() {
        let s = |raw: &[u8; 16]| Comm::new(*raw).to_string();
        assert_eq!(s(b"redis-server\0\0\0\0"), "redis-server");
        assert_eq!(s(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(s(&[0xff, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "\\xffa");
        assert!(Comm::default().is_empty());
        assert!(Comm::new(*b"redis-server\0\0\0\0").is("redis-server"));
    }
}

/// Properties of the decoders over arbitrary bytes: records come from our
/// own programs, but a decoder must survive anything (see SECURITY.md).
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn wire() -> impl Strategy<Value = Wire> {
        (any::<[u32; 4]>(), any::<[u64; 4]>(), any::<[u8; 16]>(), any::<[u32; 2]>()).prop_map(
            |([kind, pid, tid, other], [ts_ns, latency_ns, addr, ip], comm, [flags, _reserved])| Wire {
                kind: kind % 12,
                pid,
                tid,
                other,
                ts_ns,
                latency_ns,
                addr,
                comm,
                flags,
                _reserved,
                ip,
            },
        )
    }

    fn record() -> impl Strategy<Value = FaultRecord> {
        any::<(u64, u64, u32, u32)>().prop_map(|(addr_kind, ip, latency_ns, pid)| FaultRecord {
            addr_kind,
            ip,
            latency_ns,
            pid,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn any_bytes_decode_to_one_verdict_per_event_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..1200),
            batch_magic in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if batch_magic && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&FAULT_BATCH.to_ne_bytes());
            }
            let mut n = 0;
            decode_record(&bytes, 16, |_| n += 1);
            let expected = decode_batch(&bytes).map_or(1, |(_, records)| records.count());
            prop_assert_eq!(n, expected);
        }

        #[test]
        fn well_formed_wire_events_round_trip(w in wire()) {
            let bytes = encode_wire(&w);
            prop_assert_eq!(decode_wire(&bytes), Some(w));
            let e = Event::from_wire(&w);
            // Known kinds decode, unknown ones are refused, never guessed.
            prop_assert_eq!(e.is_some(), EventKind::from_u32(w.kind).is_some());
            if let Some(e) = e {
                prop_assert_eq!((e.pid, e.tid, e.ts_ns, e.kind() as u32), (w.pid, w.tid, w.ts_ns, w.kind));
            }
            // A record of any other length is not an event.
            prop_assert_eq!(decode_wire(&bytes[..bytes.len() - 1]), None);
            prop_assert_eq!(decode_wire(&[bytes.as_slice(), &[0]].concat()), None);
        }

        #[test]
        fn well_formed_batches_round_trip_and_miscounted_ones_are_refused(
            ts in any::<u64>(),
            records in prop::collection::vec(record(), 1..=FAULT_BATCH_LEN),
            wrong in 0u32..=FAULT_BATCH_LEN as u32 + 1,
        ) {
            let count = records.len() as u32;
            let bytes = encode_batch(ts, &records, count);
            let (t, decoded) = decode_batch(&bytes).expect("well-formed");
            let decoded: Vec<FaultRecord> = decoded.collect();
            prop_assert_eq!(t, ts);
            prop_assert_eq!(decoded, records.clone());
            // Each record is an outcome of its own kind, or refused.
            let mut events = Vec::new();
            decode_record(&encode_batch(ts, &records, count), 8, |e| events.push(e));
            for (e, r) in events.iter().zip(&records) {
                let outcome = matches!(
                    EventKind::from_u32(r.kind()),
                    Some(EventKind::CowCopy | EventKind::CowReuse | EventKind::ZeroFill)
                );
                prop_assert_eq!(e.is_some(), outcome);
                if let Some(e) = e {
                    prop_assert_eq!((e.pid, e.ts_ns), (r.pid, ts));
                    if let What::Copy(f) | What::Reuse(f) | What::ZeroFill(f) = e.what {
                        prop_assert_eq!((f.ip, f.kernel, f.addr), (r.ip, r.kernel_mode(), r.addr()));
                    }
                }
            }
            prop_assume!(wrong != count);
            prop_assert!(decode_batch(&encode_batch(ts, &records, wrong)).is_none());
        }
    }
}
