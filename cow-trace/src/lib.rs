//! cow-trace's userspace logic that needs no kernel: event decoding,
//! aggregation, episodes, histograms and output. The binary (`main.rs`) adds
//! the kernel side; this library exists so that benchmarks can drive the
//! same code.
//!
//! Dependencies point one way, down this list: `tally` feeds `aggregate`
//! (with `retired`, both keeping `process` records), `targets` and
//! `episode`, which read `event`; `output` renders what they produce with
//! `fmt` and `sanitize`; `metrics` counts the same events per label set
//! for the exporter. `histogram`, `regions`, `counts`, `cgroup`, `sanitize`
//! and `fmt` are leaves.

pub mod aggregate;
pub mod attribution;
pub mod cgroup;
pub mod counts;
pub mod ending;
pub mod episode;
pub mod event;
pub mod fmt;
pub mod histogram;
pub mod metrics;
pub mod output;
pub mod process;
pub mod regions;
pub mod retired;
pub mod sanitize;
pub mod stacks;
pub mod symbolize;
pub mod tally;
pub mod targets;

/// A hash map for the event path, where every copy costs a few lookups
/// keyed by PIDs, addresses and region names: foldhash (hashbrown's own
/// default), seeded per run, instead of the standard SipHash, which took a
/// third of the consumer's time in a CoW storm (docs/performance.md, "The
/// userspace side"). Build one with `FastMap::default()`.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
