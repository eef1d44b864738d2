//! Userspace throughput: synthetic ring-buffer records through decoding and
//! aggregation, as the event loop does. The kernel side can emit a few
//! hundred thousand CoW events per second on a busy host; the target is
//! at least 5 million events per second on one core.
//!
//! The records are what the tracepoint backend sends: fault outcomes in
//! batches of up to 64, process-level events one per record.

use std::hint::black_box;

use cow_trace::{
    episode::Episodes,
    event::{encode_batch, encode_wire},
    tally::Tally,
};
use cow_trace_common::{Event, EventKind, FaultRecord, FAULT_BATCH_LEN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SAMPLE_EVERY: u32 = 16;

/// A realistic mix of `n` events: mostly copies spread over a few
/// processes, some reuses, a fork with its latency now and then; one copy
/// in 16 timed. Returns the ring-buffer records.
fn records(n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut batch: Vec<FaultRecord> = Vec::new();
    let mut batch_ts = 0;
    let flush = |batch: &mut Vec<FaultRecord>, ts: u64, out: &mut Vec<Vec<u8>>| {
        if batch.is_empty() {
            return;
        }
        out.push(encode_batch(ts, batch, batch.len() as u32));
        batch.clear();
    };
    for i in 0..n {
        let kind = match i % 100 {
            0 => EventKind::Spawn,
            1 => EventKind::ForkLatency,
            2..=9 => EventKind::CowReuse,
            10 => EventKind::ZeroFill,
            _ => EventKind::CowCopy,
        };
        let pid = 1000 + (i % 8) as u32;
        let ts = i as u64 * 1000;
        let addr = 0x7f00_0000_0000 + (i as u64) * 4096;
        match kind {
            EventKind::Spawn | EventKind::ForkLatency => {
                flush(&mut batch, batch_ts, &mut out);
                let e = Event {
                    kind: kind as u32,
                    pid,
                    tid: pid,
                    other: 1000 + (i % 8) as u32,
                    ts_ns: ts,
                    latency_ns: 800 + (i as u64 * 7919) % 50_000,
                    addr: 0,
                    comm: *b"bench\0\0\0\0\0\0\0\0\0\0\0",
                    flags: 0,
                    _reserved: 0,
                };
                out.push(encode_wire(&e));
            }
            _ => {
                if batch.is_empty() {
                    batch_ts = ts;
                }
                let timed = kind == EventKind::CowCopy && i % SAMPLE_EVERY as usize == 0;
                let flag = if timed { FaultRecord::SAMPLED } else { 0 };
                batch.push(FaultRecord {
                    addr_kind: addr | flag | kind as u64,
                    latency_ns: if timed { 800 + (i as u32 * 7919) % 50_000 } else { 0 },
                    pid,
                });
                if batch.len() == FAULT_BATCH_LEN {
                    flush(&mut batch, batch_ts, &mut out);
                }
            }
        }
    }
    flush(&mut batch, batch_ts, &mut out);
    out
}

fn pipeline(c: &mut Criterion) {
    const EVENTS: usize = 100_000;
    let recs = records(EVENTS);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("decode+aggregate", |b| {
        b.iter(|| {
            let mut agg = Tally::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None));
            for r in &recs {
                agg.apply_record(black_box(r), SAMPLE_EVERY);
            }
            assert_eq!(agg.seen().malformed, 0);
            black_box(agg.totals().len())
        })
    });
    // As the tool runs: with fork episodes and region attribution (the maps
    // text comes from memory here instead of /proc).
    g.bench_function("decode+aggregate+episodes", |b| {
        b.iter(|| {
            let maps = b"7f0000000000-7f8000000000 rw-p 00000000 00:00 0 \n".to_vec();
            let eps = Episodes::new(4096, Box::new(move |_| Some(maps.clone())));
            let mut agg =
                Tally::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None)).with_episodes(eps);
            for r in &recs {
                agg.apply_record(black_box(r), SAMPLE_EVERY);
            }
            black_box(agg.totals().len())
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
