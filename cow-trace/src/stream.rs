//! The event stream: ring-buffer records decoded into [`Event`]s.
//!
//! Two record types share the ring: single [`Event`]s (process-level events,
//! and every event of the kprobe and fentry backends) and, from the
//! tracepoint backend's fault hooks, [`FaultBatch`]es of compact
//! [`FaultRecord`]s, one per CPU at a time. Both become `Event`s here, so
//! that the aggregation never knows how an event travelled.

use aya::maps::{MapData, RingBuf};
use cow_trace_common::{Event, EventKind, FaultRecord, FAULT_BATCH, FAULT_BATCH_HEADER, FAULT_BATCH_LEN};

use crate::aggregate::Aggregator;

/// Decodes one single-event record. Records are written by our own BPF
/// programs, so anything else is a bug, counted rather than trusted.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() != size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain integers, valid for any bits;
    // ring-buffer records are 8-byte aligned but read_unaligned does not
    // rely on it.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
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

/// The event a fault record of a batch taken at `ts_ns` stands for, when
/// the programs time one fault in `sample_every`; `None` when the record is
/// not a fault outcome (a copy, reuse or zero-fill). Fault events carry no
/// comm, and the aggregation keys them by process, so the thread is not
/// kept.
pub fn fault_event(ts_ns: u64, r: &FaultRecord, sample_every: u32) -> Option<Event> {
    const OUTCOMES: [u32; 3] =
        [EventKind::CowCopy as u32, EventKind::CowReuse as u32, EventKind::ZeroFill as u32];
    if !OUTCOMES.contains(&r.kind()) {
        return None;
    }
    Some(Event {
        kind: r.kind(),
        pid: r.pid,
        tid: r.pid,
        other: if r.sampled() { sample_every } else { 0 },
        ts_ns,
        latency_ns: r.latency_ns as u64,
        addr: r.addr(),
        comm: [0; 16],
        flags: 0,
        _reserved: 0,
    })
}

/// Feeds a fault record to the aggregator (see `fault_event`).
pub fn apply_fault(ts_ns: u64, r: &FaultRecord, agg: &mut Aggregator, sample_every: u32) {
    match fault_event(ts_ns, r, sample_every) {
        Some(e) => agg.apply(&e),
        None => agg.seen.malformed += 1,
    }
}

/// Feeds one ring-buffer record to the aggregator.
pub fn apply(bytes: &[u8], agg: &mut Aggregator, sample_every: u32) {
    let is_batch = bytes.len() >= 4 && bytes[..4] == FAULT_BATCH.to_ne_bytes();
    if is_batch {
        match decode_batch(bytes) {
            Some((ts, records)) => records.for_each(|r| apply_fault(ts, &r, agg, sample_every)),
            None => agg.seen.malformed += 1,
        }
        return;
    }
    match decode(bytes) {
        Some(e) => agg.apply(&e),
        None => agg.seen.malformed += 1,
    }
}

/// Feeds every record available now to the aggregator; returns how many.
pub fn drain(ring: &mut RingBuf<MapData>, agg: &mut Aggregator, sample_every: u32) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        apply(&item, agg, sample_every);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_roundtrip_and_length_check() {
        let e = Event {
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
        };
        let bytes: [u8; 64] = unsafe { std::mem::transmute(e) };
        assert_eq!(decode(&bytes), Some(e));
        // Unaligned input decodes the same.
        let mut shifted = [0u8; 65];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(decode(&shifted[1..]), Some(e));
        assert_eq!(decode(&bytes[..63]), None);
        assert_eq!(decode(&[0u8; 72]), None);
    }

    fn batch_bytes(ts_ns: u64, records: &[FaultRecord], count: u32) -> Vec<u8> {
        let mut b = FAULT_BATCH.to_ne_bytes().to_vec();
        b.extend_from_slice(&count.to_ne_bytes());
        b.extend_from_slice(&ts_ns.to_ne_bytes());
        for r in records {
            let raw: [u8; 16] = unsafe { std::mem::transmute(*r) };
            b.extend_from_slice(&raw);
        }
        b
    }

    #[test]
    fn fault_batches_decode_into_the_events_they_stand_for() {
        let copy = FaultRecord {
            addr_kind: 0x7f00_1234_5000 | EventKind::CowCopy as u64,
            latency_ns: 2_500,
            pid: 42,
        };
        let sampled = FaultRecord {
            addr_kind: 0x7f00_1234_6000 | FaultRecord::SAMPLED | EventKind::CowCopy as u64,
            latency_ns: 900,
            pid: 42,
        };
        let reuse = FaultRecord { addr_kind: 0x5000 | EventKind::CowReuse as u64, latency_ns: 0, pid: 43 };
        let bytes = batch_bytes(7_000, &[copy, sampled, reuse], 3);
        let (ts, records) = decode_batch(&bytes).expect("a batch");
        let events: Vec<Event> = records.map(|r| fault_event(ts, &r, 16).expect("an outcome")).collect();
        assert_eq!(events.len(), 3);
        assert_eq!(
            (
                events[0].kind,
                events[0].pid,
                events[0].ts_ns,
                events[0].latency_ns,
                events[0].addr,
                events[0].other
            ),
            (EventKind::CowCopy as u32, 42, 7_000, 2_500, 0x7f00_1234_5000, 0)
        );
        // A timed sample stands for `sample_every` copies; its address
        // loses the flag.
        assert_eq!((events[1].addr, events[1].latency_ns, events[1].other), (0x7f00_1234_6000, 900, 16));
        assert_eq!((events[2].kind, events[2].pid, events[2].addr), (EventKind::CowReuse as u32, 43, 0x5000));
        // A count that disagrees with the length, an empty batch, or a
        // count beyond the batch's capacity is malformed.
        assert!(decode_batch(&batch_bytes(1, &[copy, reuse], 3)).is_none());
        assert!(decode_batch(&batch_bytes(1, &[], 0)).is_none());
        let too_many = vec![copy; FAULT_BATCH_LEN + 1];
        assert!(decode_batch(&batch_bytes(1, &too_many, too_many.len() as u32)).is_none());
        // A single event is not a batch.
        assert!(decode_batch(&[3u8; 64]).is_none());
        // A record whose kind is not a fault outcome is not trusted: an
        // exit or a spawn never travels in a batch.
        for kind in [EventKind::Exit, EventKind::Spawn, EventKind::HugeCow] {
            let r = FaultRecord { addr_kind: 0x5000 | kind as u64, latency_ns: 0, pid: 42 };
            assert!(fault_event(1, &r, 16).is_none(), "{kind:?}");
        }
        assert!(fault_event(1, &FaultRecord { addr_kind: 0x5000, latency_ns: 0, pid: 42 }, 16).is_none());
    }
}
