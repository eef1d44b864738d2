//! The event stream: ring-buffer records decoded into [`Event`]s.

use aya::maps::{MapData, RingBuf};
use cow_trace_common::Event;

use crate::aggregate::Aggregator;

/// Decodes one ring-buffer record. Records are written by our own BPF
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

/// Feeds every record available now to the aggregator; returns how many.
pub fn drain(ring: &mut RingBuf<MapData>, agg: &mut Aggregator) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(e) => agg.apply(&e),
            None => agg.seen.malformed += 1,
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use cow_trace_common::EventKind;

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
        let mut shifted = vec![0u8; 65];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(decode(&shifted[1..]), Some(e));
        assert_eq!(decode(&bytes[..63]), None);
        assert_eq!(decode(&[0u8; 72]), None);
    }
}
