//! Soak: ten minutes of steady copy-on-write traffic under cow-trace. Its
//! memory must stop growing once its bounded tables have filled, the kernel
//! maps must stay small, and nothing may be lost. Needs root.
//!
//! It takes COW_TRACE_SOAK_SECS seconds (default 600, what CI runs); set a
//! smaller value for a quick local run.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn ten_minutes_of_cow_traffic_leave_memory_flat_and_lose_nothing() {
    if !need_root("ten_minutes_of_cow_traffic_leave_memory_flat_and_lose_nothing") {
        return;
    }
    let secs: u64 = std::env::var("COW_TRACE_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    // One long-lived parent forking a round every ~50 ms: each round the
    // child copies 1,600 pages and the parent 800; about one core's worth
    // of work at most, so the rest of the suite can run beside it.
    let mut t = Background::start(&[
        "--json",
        "--",
        WORKLOAD,
        "--pages",
        "4096",
        "--child-writes",
        "1600",
        "--parent-writes",
        "800",
        "--seconds",
        &secs.to_string(),
        "--pause-ms",
        "50",
    ]);
    t.wait_attached();
    let tracer = t.child.id();
    let start = Instant::now();
    let mut samples = Vec::new(); // (seconds, RSS KiB, anonymous KiB, TRACED entries, FORKS entries)
    while t.child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_secs(5));
        let probe = std::panic::catch_unwind(|| {
            (rss_kib(tracer), hash_map_entries(tracer, "TRACED"), hash_map_entries(tracer, "FORKS"))
        });
        if let Ok(((rss, anon), traced, forks)) = probe {
            if rss > 0 {
                samples.push((start.elapsed().as_secs(), rss, anon, traced, forks));
            }
        }
    }
    let r = t.finish(Duration::from_secs(120));
    eprintln!("samples (s, RSS KiB, anon KiB, TRACED, FORKS): {samples:?}");
    assert!(r.status.success(), "{}", r.stderr);
    let s = r.summary();
    let report = r.workload();
    let rounds = u(&report["rounds"]);
    assert!(rounds >= secs, "only {rounds} rounds in {secs} s");

    // Nothing lost, and the counts are the workload's.
    assert_eq!(u(&s["dropped_events"]), 0);
    assert_totals_add_up(s);
    let parent = row(s, u(&report["pid"])).expect("parent row");
    assert_eq!(u(&parent["forks"]), rounds);
    let pc = u(&parent["cow_copies"]);
    assert!(pc >= rounds * 800 && pc <= rounds * (800 + 64), "parent copies {pc} for {rounds} rounds");
    let all_copies = u(&s["kernel_totals"]["cow_copies"]);
    assert!(all_copies >= rounds * 2400, "{all_copies} copies for {rounds} rounds");

    // Kernel tables: only the live processes are in them.
    assert!(samples.len() >= 3, "too few samples: {samples:?}");
    assert!(samples.iter().all(|&(_, _, _, traced, forks)| traced <= 4 && forks <= 4), "{samples:?}");
    // Memory: bounded, and flat in the second half of the run (the
    // per-process and per-episode tables are capped at 4,096 each).
    let peak = samples.iter().map(|x| x.1).max().unwrap();
    assert!(peak < 64 * 1024, "RSS peaked at {peak} KiB");
    let half = &samples[samples.len() / 2..];
    let (lo, hi) = (half.iter().map(|x| x.2).min().unwrap(), half.iter().map(|x| x.2).max().unwrap());
    assert!(hi - lo <= 4 * 1024, "heap moved {lo}..{hi} KiB in the second half");
}
