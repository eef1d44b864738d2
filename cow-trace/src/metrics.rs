//! The exporter's metrics model: the event stream counted per label set
//! (`comm`, `cgroup`), never per PID, and its Prometheus/OpenMetrics
//! rendering through the official `prometheus-client` encoder.
//!
//! Memory stays bounded under PID churn: a process is only a pointer to its
//! label set while it lives (and for a short while after, for late fault
//! outcomes); the label sets are capped, and the processes beyond the cap
//! count in one `other` series, so totals are never lost.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
    registry::{Registry, Unit},
};

use crate::{
    episode::Episode,
    event::{Comm, Event, What},
    histogram::Log2,
};

/// Label value of the series that takes what the cap leaves out.
pub const OTHER: &str = "other";

/// Exited processes remembered for fault outcomes that arrive after the exit.
const RECENT_EXITS: usize = 1024;

/// Latency buckets, in log2 nanoseconds: the last `le` is 2^LAT_TOP ns
/// (about 34 s); 2^LAT_BOTTOM ns is 1 µs.
const LAT_BOTTOM: usize = 10;
const LAT_TOP: usize = 35;
/// Episode copied-bytes buckets: a page (4 KiB) up to 64 GiB.
const BYTES_BOTTOM: usize = 12;
const BYTES_TOP: usize = 36;

/// A distribution kept in the log2 slots the text output uses, with the sum
/// Prometheus wants.
#[derive(Clone, Debug, Default)]
pub struct Dist {
    log2: Log2,
    sum: u64,
    count: u64,
}

impl Dist {
    pub fn record(&mut self, v: u64, n: u64) {
        self.log2.add(v, n);
        self.sum = self.sum.saturating_add(v.saturating_mul(n));
        self.count += n;
    }

    /// `(le, count)` buckets, each count its own (the encoder makes them
    /// cumulative): log2 slot k (values below 2^(k+1)) is the bucket
    /// `le = 2^(k+1) * scale`; slots below `bottom` go to the first, those
    /// from `top` on to `+Inf`.
    fn buckets(&self, bottom: usize, top: usize, scale: f64) -> Vec<(f64, u64)> {
        let slot = |k: usize| self.log2.slots.get(k).copied().unwrap_or(0);
        let mut out: Vec<(f64, u64)> = (bottom..top)
            .map(|k| {
                let n = if k == bottom { (0..=k).map(slot).sum() } else { slot(k) };
                ((1u64 << (k + 1)) as f64 * scale, n)
            })
            .collect();
        let below: u64 = out.iter().map(|b| b.1).sum();
        out.push((f64::INFINITY, self.count - below));
        out
    }
}

/// What one label set counted.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub forks: u64,
    pub fork_duration: Dist,
    pub dup_mmap: Dist,
    pub copies: u64,
    pub copied_bytes: u64,
    pub reuses: u64,
    pub zero_fills: u64,
    pub huge_faults: u64,
    /// Write faults that failed; a copy or zero-fill one replaces stays in
    /// its counter (counters never go down).
    pub failed: u64,
    pub cow_duration: Dist,
    pub episodes: u64,
    pub episode_bytes: Dist,
    pub child_lifetime: Dist,
}

impl Series {
    fn add(&mut self, what: &What, page_size: u64) {
        match *what {
            What::Spawn { .. } => self.forks += 1,
            What::ForkLatency { latency_ns, dup_mmap_ns, .. } => {
                self.fork_duration.record(latency_ns, 1);
                if let Some(ns) = dup_mmap_ns {
                    self.dup_mmap.record(ns, 1);
                }
            }
            What::Copy(f) => {
                self.copies += 1;
                self.copied_bytes += page_size;
                if f.latency_ns > 0 {
                    self.cow_duration.record(f.latency_ns, f.weight);
                }
            }
            What::Reuse(_) => self.reuses += 1,
            What::ZeroFill(_) => self.zero_fills += 1,
            What::Failed(_) => self.failed += 1,
            What::HugeCow { copied_bytes, .. } => {
                self.huge_faults += 1;
                self.copied_bytes += copied_bytes;
            }
            What::Exit { .. } | What::Exec => {}
        }
    }
}

/// A label set: the process's name and its cgroup v2 path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Labels {
    pub comm: String,
    pub cgroup: Arc<str>,
}

/// Where a live (or just exited) process counts, and its cgroup (which its
/// children start in).
#[derive(Clone, Debug)]
struct ProcLabel {
    series: usize,
    cgroup: Arc<str>,
}

pub struct Metrics {
    page_size: u64,
    cap: usize,
    series: Vec<(Labels, Series)>,
    index: HashMap<Labels, usize>,
    /// Index of the `other` series, once the cap made one.
    other: Option<usize>,
    folded: u64,
    procs: HashMap<u32, ProcLabel>,
    recent_exits: VecDeque<(u32, ProcLabel)>,
    cgroup_of: Box<dyn Fn(u32) -> Option<String>>,
    comm_of: Box<dyn Fn(u32) -> Option<String>>,
}

impl Metrics {
    /// `cap`: most label sets kept (besides `other`). `cgroup_of` and
    /// `comm_of` name processes first seen mid-life or after an exec (from
    /// /proc in the real tool).
    pub fn new(
        page_size: u64,
        cap: usize,
        cgroup_of: Box<dyn Fn(u32) -> Option<String>>,
        comm_of: Box<dyn Fn(u32) -> Option<String>>,
    ) -> Self {
        Self {
            page_size,
            cap: cap.max(1),
            series: Vec::new(),
            index: HashMap::new(),
            other: None,
            folded: 0,
            procs: HashMap::new(),
            recent_exits: VecDeque::new(),
            cgroup_of,
            comm_of,
        }
    }

    fn series_for(&mut self, comm: &str, cgroup: &Arc<str>) -> usize {
        let key = Labels { comm: comm.to_string(), cgroup: cgroup.clone() };
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        if self.index.len() >= self.cap {
            self.folded += 1;
            return *self.other.get_or_insert_with(|| {
                let other = Labels { comm: OTHER.into(), cgroup: OTHER.into() };
                self.series.push((other, Series::default()));
                self.series.len() - 1
            });
        }
        self.series.push((key.clone(), Series::default()));
        self.index.insert(key, self.series.len() - 1);
        self.series.len() - 1
    }

    fn label(&mut self, pid: u32, comm: String, cgroup: Arc<str>) -> &ProcLabel {
        let series = self.series_for(&comm, &cgroup);
        self.procs.insert(pid, ProcLabel { series, cgroup });
        &self.procs[&pid]
    }

    /// The series of process `pid`: live, just exited, else looked up
    /// (named `comm` when that is its main thread's name).
    fn series_of(&mut self, pid: u32, tid: u32, comm: &Comm) -> usize {
        if let Some(i) = self.known(pid) {
            return i;
        }
        let comm = match tid == pid && !comm.is_empty() {
            true => comm.to_string(),
            false => (self.comm_of)(pid).unwrap_or_else(|| comm.to_string()),
        };
        let cgroup = self.read_cgroup(pid);
        self.label(pid, comm, cgroup).series
    }

    /// The series of a live or recently exited process.
    fn known(&self, pid: u32) -> Option<usize> {
        match self.procs.get(&pid) {
            Some(p) => Some(p.series),
            None => self.recent_exits.iter().rev().find(|(q, _)| *q == pid).map(|(_, p)| p.series),
        }
    }

    fn read_cgroup(&self, pid: u32) -> Arc<str> {
        (self.cgroup_of)(pid).unwrap_or_default().into()
    }

    pub fn apply(&mut self, e: &Event) {
        let i = match e.what {
            What::Spawn { child, .. } => {
                // The event's comm is the child's.
                let i = self.series_of(e.pid, e.tid, &Comm::default());
                // The child starts in its parent's cgroup, under the comm
                // it was forked with; an exec renames and may move it.
                let cgroup = self.procs.get(&e.pid).map(|p| p.cgroup.clone()).unwrap_or_default();
                self.label(child, e.comm.to_string(), cgroup);
                i
            }
            What::Exec => {
                // Service managers move a child into its cgroup before exec.
                let cgroup = self.read_cgroup(e.pid);
                self.label(e.pid, e.comm.to_string(), cgroup);
                return;
            }
            What::Exit { .. } => {
                if let Some(p) = self.procs.remove(&e.pid) {
                    self.recent_exits.push_back((e.pid, p));
                    if self.recent_exits.len() > RECENT_EXITS {
                        self.recent_exits.pop_front();
                    }
                }
                return;
            }
            _ => self.series_of(e.pid, e.tid, &e.comm),
        };
        self.series[i].1.add(&e.what, self.page_size);
    }

    /// Counts a finished fork episode for its parent's label set.
    pub fn episode(&mut self, ep: &Episode) {
        let i = match self.known(ep.parent) {
            Some(i) => i,
            None => {
                let cgroup = self.read_cgroup(ep.parent);
                self.series_for(&ep.parent_comm, &cgroup)
            }
        };
        let s = &mut self.series[i].1;
        s.episodes += 1;
        s.episode_bytes.record(ep.copied_bytes, 1);
        if let Some(ns) = ep.child_lifetime_ns {
            s.child_lifetime.record(ns, 1);
        }
    }

    /// Processes whose label set went to `other` because of the cap.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Processes currently remembered (live, plus the recent exits).
    pub fn tracked_processes(&self) -> usize {
        self.procs.len() + self.recent_exits.len()
    }

    /// A copy for the HTTP side to encode while events keep coming.
    pub fn snapshot(&self, health: Health) -> Snapshot {
        Snapshot { series: self.series.clone(), folded: self.folded, health }
    }
}

/// The exporter's own figures, and the run's constant facts.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub backend: String,
    pub events: u64,
    pub dropped: u64,
    /// Whether the backend times the address-space copy within forks
    /// (`dup_mmap`, or `copy_page_range` where that is inlined).
    pub dup_mmap_split: bool,
}

/// What a scrape shows: the series as they were when it was taken.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub series: Vec<(Labels, Series)>,
    pub folded: u64,
    pub health: Health,
}

/// The text formats a scrape can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text,
}

impl Exposition {
    /// OpenMetrics when the scraper's `Accept` header names it.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Exposition::OpenMetrics,
            _ => Exposition::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

impl Snapshot {
    pub fn encode(self: &Arc<Self>, format: Exposition) -> String {
        let mut registry = Registry::with_prefix("cow_trace");
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        let res = match format {
            Exposition::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
            Exposition::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
        };
        res.expect("writing to a String cannot fail");
        out
    }

    fn counter(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        get: impl Fn(&Series) -> u64,
    ) -> std::fmt::Result {
        let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (l, s) in &self.series {
            let labels = [("comm", l.comm.as_str()), ("cgroup", &*l.cgroup)];
            ConstCounter::new(get(s)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: &Unit,
        (bottom, top, scale): (usize, usize, f64),
        get: impl Fn(&Series) -> &Dist,
    ) -> std::fmt::Result {
        let mut family = enc.encode_descriptor(name, help, Some(unit), MetricType::Histogram)?;
        for (l, s) in &self.series {
            let labels = [("comm", l.comm.as_str()), ("cgroup", &*l.cgroup)];
            let d = get(s);
            family.encode_family(&labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                d.sum as f64 * scale,
                d.count,
                &d.buckets(bottom, top, scale),
                None,
            )?;
        }
        Ok(())
    }

    fn scalar(&self, enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
        ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
    }
}

const LAT: (usize, usize, f64) = (LAT_BOTTOM, LAT_TOP, 1e-9);
const BYTES: (usize, usize, f64) = (BYTES_BOTTOM, BYTES_TOP, 1.0);

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let (s, b) = (Unit::Seconds, Unit::Bytes);
        let e = &mut enc;
        self.counter(e, "forks", "Processes forked (fork, vfork, clone of a process).", None, |s| s.forks)?;
        self.histogram(e, "fork_duration", "Time the parent was held by each fork.", &s, LAT, |s| {
            &s.fork_duration
        })?;
        if self.health.dup_mmap_split {
            self.histogram(
                e,
                "fork_dup_mmap",
                "Time each fork spent copying the address space (dup_mmap).",
                &s,
                LAT,
                |s| &s.dup_mmap,
            )?;
        }
        self.counter(e, "cow_copies", "Copy-on-write faults that copied a page.", None, |s| s.copies)?;
        self.counter(e, "cow_copied", "Memory copied by copy-on-write faults.", Some(&b), |s| {
            s.copied_bytes
        })?;
        self.counter(e, "cow_reuses", "Copy-on-write faults resolved without a copy.", None, |s| s.reuses)?;
        self.counter(e, "cow_zero_fills", "Write faults on the shared zero page.", None, |s| s.zero_fills)?;
        self.counter(e, "cow_huge_faults", "Write faults on huge-page mappings.", None, |s| s.huge_faults)?;
        self.counter(
            e,
            "cow_failed_faults",
            "Write faults that failed (a copy they undo stays counted).",
            None,
            |s| s.failed,
        )?;
        self.histogram(
            e,
            "cow_fault_duration",
            "Time taken by copy-on-write faults that copied.",
            &s,
            LAT,
            |s| &s.cow_duration,
        )?;
        self.counter(
            e,
            "fork_episodes",
            "Fork episodes finished (the child exited or exec'd).",
            None,
            |s| s.episodes,
        )?;
        self.histogram(e, "episode_copied", "Memory copied per fork episode.", &b, BYTES, |s| {
            &s.episode_bytes
        })?;
        self.histogram(e, "episode_child_lifetime", "Fork to exit of each episode's child.", &s, LAT, |s| {
            &s.child_lifetime
        })?;
        let h = &self.health;
        self.scalar(e, "dropped_events", "Events lost because the ring buffer was full.", h.dropped)?;
        self.scalar(e, "events_received", "Events the exporter took from the kernel.", h.events)?;
        self.scalar(e, "series_folded", "Processes counted in the other series (series cap).", self.folded)?;
        let info = [("version", env!("CARGO_PKG_VERSION")), ("backend", h.backend.as_str())];
        let build = prometheus_client::metrics::info::Info::new(info);
        build.encode(enc.encode_descriptor(
            "build",
            "cow-trace build and backend.",
            None,
            MetricType::Info,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Fault;

    fn comm(s: &[u8]) -> Comm {
        let mut c = [0u8; 16];
        c[..s.len()].copy_from_slice(s);
        Comm::new(c)
    }

    fn ev(pid: u32, c: &[u8], what: What) -> Event {
        Event { pid, tid: pid, ts_ns: 0, comm: comm(c), what }
    }

    fn copy() -> What {
        What::Copy(Fault { addr: 0x1000, ip: 0, kernel: false, latency_ns: 3_000, weight: 1 })
    }

    fn metrics(cap: usize) -> Metrics {
        Metrics::new(
            4096,
            cap,
            Box::new(|pid| Some(format!("svc{}.service", pid % 2))),
            Box::new(|_| Some("sh".into())),
        )
    }

    fn sum(m: &Metrics, f: impl Fn(&Series) -> u64) -> u64 {
        m.series.iter().map(|(_, s)| f(s)).sum()
    }

    #[test]
    fn pid_churn_folds_into_labels_and_the_cap_keeps_totals() {
        let mut m = metrics(3);
        for pid in 1000..21000u32 {
            // Each child gets its own name: far more label sets than the cap.
            m.apply(&ev(1, b"init", What::Spawn { child: pid, no_syscall: false }));
            m.apply(&ev(pid, format!("w{}", pid % 50).as_bytes(), What::Exec));
            m.apply(&ev(pid, b"", copy()));
            m.apply(&ev(pid, b"", What::Exit { status: 0, oom_killed: false }));
        }
        assert_eq!(sum(&m, |s| s.copies), 20_000);
        assert_eq!(sum(&m, |s| s.copied_bytes), 20_000 * 4096);
        assert_eq!(sum(&m, |s| s.forks), 20_000);
        assert_eq!(m.series.len(), 4, "the cap and one other series");
        assert!(m.tracked_processes() <= 1 + RECENT_EXITS);
        let other = m.series.iter().find(|(l, _)| l.comm == OTHER).unwrap();
        assert!(other.1.copies > 0 && m.folded() == other.1.copies);
        // The parent was seen first, so it has a series of its own, named
        // from /proc: a spawn event carries the child's comm.
        let init = m.series.iter().find(|(l, _)| l.comm == "sh").unwrap();
        assert_eq!((init.1.forks, &*init.0.cgroup), (20_000, "svc1.service"));
    }

    #[test]
    fn a_child_takes_its_parents_cgroup_until_exec_and_late_faults_count() {
        let mut m = metrics(100);
        m.apply(&ev(
            2,
            b"redis-server",
            What::ForkLatency { child: 7, latency_ns: 5_000_000, dup_mmap_ns: None },
        ));
        m.apply(&ev(2, b"redis-server", What::Spawn { child: 7, no_syscall: false }));
        m.apply(&ev(7, b"", copy()));
        m.apply(&ev(7, b"", What::Exit { status: 0, oom_killed: false }));
        m.apply(&ev(7, b"", copy())); // another thread's, sent after the exit
        let s = m.snapshot(Health::default());
        let parent = s.series.iter().find(|(l, _)| l.comm == "redis-server").unwrap();
        assert_eq!(&*parent.0.cgroup, "svc0.service");
        assert_eq!((parent.1.forks, parent.1.copies, parent.1.fork_duration.count), (1, 2, 1));
    }

    #[test]
    fn log2_slots_are_the_le_buckets_in_base_units() {
        let mut m = metrics(10);
        let fork = |ns| What::ForkLatency { child: 9, latency_ns: ns, dup_mmap_ns: None };
        for ns in [0, 1_500, 1_500, 5_000_000, 1 << 40] {
            m.apply(&ev(4, b"p", fork(ns)));
        }
        let text = Arc::new(m.snapshot(Health::default())).encode(Exposition::Text);
        let bucket = |le: &str| {
            let name = format!(
                "cow_trace_fork_duration_seconds_bucket{{comm=\"p\",cgroup=\"svc0.service\",le=\"{le}\"}} "
            );
            let line =
                text.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{name}: {text}"));
            line[name.len()..].parse::<u64>().unwrap()
        };
        // 0 and 1.5 us are below 2^11 ns; 5 ms below 2^23 ns; 2^40 ns past the last.
        assert_eq!(bucket("2.048e-06"), 3);
        assert_eq!(bucket("0.004194304"), 3);
        assert_eq!(bucket("0.008388608"), 4);
        assert_eq!(bucket("34.359738368"), 4);
        assert_eq!(bucket("+Inf"), 5);
        assert!(text.contains("cow_trace_fork_duration_seconds_count{comm=\"p\",cgroup=\"svc0.service\"} 5"));
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let mut m = metrics(100);
        m.apply(&ev(3, b"a\"b\\c\nd\xff", copy()));
        let mut snap = m.snapshot(Health { backend: "tracepoint".into(), ..Health::default() });
        snap.series[0].0.cgroup = "x\"}\ny".into();
        let snap = Arc::new(snap);
        for format in [Exposition::Text, Exposition::OpenMetrics] {
            let text = snap.encode(format);
            let line = text.lines().find(|l| l.starts_with("cow_trace_cow_copies_total{")).unwrap();
            // The invalid byte is written `\xff`, as in JSON; the encoder
            // escapes its backslash like the others.
            assert_eq!(line, r#"cow_trace_cow_copies_total{comm="a\"b\\c\nd\\xff",cgroup="x\"}\ny"} 1"#);
            assert!(text.contains("cow_trace_build_info{"), "{text}");
        }
        assert!(snap.encode(Exposition::OpenMetrics).ends_with("# EOF\n"));
    }

    #[test]
    fn accept_header_picks_the_format() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Exposition::negotiate(Some(prom)), Exposition::OpenMetrics);
        assert_eq!(Exposition::negotiate(Some("text/plain")), Exposition::Text);
        assert_eq!(Exposition::negotiate(None), Exposition::Text);
    }
}
