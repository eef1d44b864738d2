//! Userspace throughput: synthetic ring-buffer records through decoding and
//! aggregation, as the event loop does. The kernel side can emit a few
//! hundred thousand CoW events per second on a busy host; the target is
//! at least 5 million events per second on one core.

use std::hint::black_box;

use cow_trace::{aggregate::Aggregator, episode::Episodes, stream::decode};
use cow_trace_common::{Event, EventKind};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// A realistic mix: mostly copies spread over a few processes, some
/// reuses, a fork with its latency now and then.
fn records(n: usize) -> Vec<[u8; 64]> {
    (0..n)
        .map(|i| {
            let kind = match i % 100 {
                0 => EventKind::Spawn,
                1 => EventKind::ForkLatency,
                2..=9 => EventKind::CowReuse,
                10 => EventKind::ZeroFill,
                _ => EventKind::CowCopy,
            };
            let pid = 1000 + (i % 8) as u32;
            let e = Event {
                kind: kind as u32,
                pid,
                tid: pid,
                other: 1000 + (i % 8) as u32,
                ts_ns: i as u64 * 1000,
                latency_ns: 800 + (i as u64 * 7919) % 50_000,
                addr: 0x7f00_0000_0000 + (i as u64) * 4096,
                comm: *b"bench\0\0\0\0\0\0\0\0\0\0\0",
                flags: 0,
                _reserved: 0,
            };
            // SAFETY: Event is 64 bytes of plain integers.
            unsafe { std::mem::transmute::<Event, [u8; 64]>(e) }
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let recs = records(100_000);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.bench_function("decode+aggregate", |b| {
        b.iter(|| {
            let mut agg = Aggregator::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None));
            for r in &recs {
                if let Some(e) = decode(black_box(r)) {
                    agg.apply(&e);
                }
            }
            black_box(agg.totals().len())
        })
    });
    // As the tool runs: with fork episodes and region attribution (the maps
    // text comes from memory here instead of /proc).
    g.bench_function("decode+aggregate+episodes", |b| {
        b.iter(|| {
            let maps = "7f0000000000-7f8000000000 rw-p 00000000 00:00 0 \n".to_string();
            let eps = Episodes::new(4096, Box::new(move |_| Some(maps.clone())));
            let mut agg =
                Aggregator::new(4096, None, true, Box::new(|_| 1), Box::new(|_| None)).with_episodes(eps);
            for r in &recs {
                if let Some(e) = decode(black_box(r)) {
                    agg.apply(&e);
                }
            }
            black_box(agg.totals().len())
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
