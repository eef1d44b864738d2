//! Symbolization cost: naming 10,000 distinct code locations, as an
//! episode's report does, from the files (libc's text and this benchmark's
//! own). Prints the time cold (files parsed for the first time) and warm,
//! and the resident memory it took. `cargo bench --bench symbolize`.

use std::time::Instant;

use cow_trace::{regions::CodeAt, symbolize::Symbolizer};
use object::{Object, ObjectSection};

const LOCATIONS: usize = 10_000;

/// `n` distinct offsets spread over the `.text` of the ELF file at `path`.
fn text_offsets(path: &str, n: usize) -> Vec<CodeAt> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let file = object::File::parse(&*bytes).expect("an ELF file");
    let (start, len) = file.section_by_name(".text").and_then(|s| s.file_range()).expect(".text");
    let step = (len / n as u64).max(1);
    (0..n as u64).map(|i| CodeAt::File { path: path.to_string(), offset: start + (i * step) % len }).collect()
}

fn rss_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let me = std::env::current_exe().unwrap().to_string_lossy().into_owned();
    let mut locs = text_offsets(libc, LOCATIONS / 2);
    locs.extend(text_offsets(&me, LOCATIONS - locs.len()));
    let before = rss_kib("VmRSS:");
    let mut sym = Symbolizer::new();
    let t = Instant::now();
    let names = sym.code(&locs);
    let cold = t.elapsed();
    let after = rss_kib("VmRSS:");
    let t = Instant::now();
    let again = sym.code(&locs);
    let warm = t.elapsed();
    assert_eq!(names, again);
    let named = names.iter().filter(|n| n.function.is_some()).count();
    println!(
        "symbolize {} locations ({} in libc, {} in this binary): cold {:.1} ms, warm {:.1} ms; \
         {named} named; resident memory +{} KiB (peak {} KiB)",
        locs.len(),
        LOCATIONS / 2,
        LOCATIONS - LOCATIONS / 2,
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3,
        after.saturating_sub(before),
        rss_kib("VmHWM:"),
    );
}
