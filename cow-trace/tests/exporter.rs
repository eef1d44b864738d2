//! `cow-trace --serve` scraped by a real Prometheus (Debian's `prometheus`
//! package, installed by `cargo xtask setup`): the ground-truth workload run
//! in a cgroup the test makes, read back through Prometheus's HTTP API; the
//! shipped alert rules and a real scrape checked by `promtool`; and a fork
//! storm's memory, series and totals. Need root.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// A cgroup v2 the test makes, removed (with its processes gone) on drop.
struct TestCgroup {
    dir: PathBuf,
    /// Its path below the v2 mount: the exporter's `cgroup` label.
    label: String,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = cow_trace::cgroup::v2_mount(&mountinfo).expect("no cgroup2 mount (findmnt -t cgroup2)");
        let label = format!("{name}-{}", std::process::id());
        let dir = Path::new(&mount).join(&label);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
        TestCgroup { dir, label }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The processes have exited by now; a zombie's entry can linger briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A port nobody listens on now (the kernel's choice).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET `path` from `port` on loopback; the body, or None when refused.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1);
    (head.starts_with("HTTP/1.") && status == Some("200")).then(|| body.to_string())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server scraping one target every second.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("cow-trace-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: cow-trace\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is needed for this test (cargo xtask setup, or apt-get install prometheus)");
        Prometheus { child, port, _dir: TempDir(dir) }
    }

    /// The instant vector of `query`, as (labels, value) pairs; empty while
    /// Prometheus is starting or has no such series yet.
    fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let Some(body) = http_get(self.port, &format!("/api/v1/query?query={}", url_encode(query))) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let results = v["data"]["result"].as_array().cloned().unwrap_or_default();
        results
            .into_iter()
            .map(|r| (r["metric"].clone(), r["value"][1].as_str().unwrap().parse().unwrap()))
            .collect()
    }

    /// The single value of `query` once `done` holds for it, waiting at most
    /// a minute (scrapes every second).
    fn wait_for(&self, query: &str, done: impl Fn(f64) -> bool) -> (Value, f64) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.query(query);
            if let [(labels, v)] = r.as_slice() {
                if done(*v) {
                    return (labels.clone(), *v);
                }
            }
            assert!(Instant::now() < until, "{query}: {r:?} after a minute");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut c = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed for this test (apt-get install prometheus)");
    c.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn shipped_alert_rules_pass_promtool() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/prometheus/cow-trace-rules.yml");
    let (ok, out) = promtool(&["check", "rules", rules], None);
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheus_sees_the_workload_cgroup_series() {
    if !need_root("prometheus_sees_the_workload_cgroup_series") {
        return;
    }
    let cg = TestCgroup::new("cow-trace-prom");
    // Held before its fork, moved into the cgroup: parent and child are in it.
    let wl = HeldWorkload::start(&STANDARD);
    cg.add(wl.pid);
    let port = free_port();
    let serve = format!("127.0.0.1:{port}");
    // Only the test's cgroup is traced: the filter is part of what is shown.
    let mut tracer = Background::start(&["--json", "--serve", &serve, "--cgroup", &cg.label]);
    tracer.wait_attached();
    let prom = Prometheus::start(port);
    wl.go();
    let report = wl.finish();
    let sel = format!("{{cgroup=\"{}\"}}", cg.label);
    // The episode ends after the child's exit: all its copies are in by then.
    prom.wait_for(&format!("sum(cow_trace_fork_episodes_total{sel})"), |v| v >= 1.0);
    let (labels, copies) = prom.wait_for(&format!("cow_trace_cow_copies_total{sel}"), |_| true);
    let (k, m) = (STANDARD.child_writes, STANDARD.parent_writes);
    let copies = copies as u64;
    assert!((k + m..=k + m + 2 * workload::SLACK).contains(&copies), "{copies} copies, wrote {k} + {m}");
    assert_eq!(labels["cgroup"], cg.label.as_str());
    assert_eq!(labels["comm"], "cow-workload");
    let bytes = prom.wait_for(&format!("cow_trace_cow_copied_bytes_total{sel}"), |_| true).1 as u64;
    assert_eq!(bytes, copies * u(&report["page_size"]));
    assert_eq!(prom.wait_for(&format!("cow_trace_forks_total{sel}"), |_| true).1, 1.0);
    assert_eq!(prom.wait_for(&format!("cow_trace_fork_duration_seconds_count{sel}"), |_| true).1, 1.0);
    let fork_s = prom.wait_for(&format!("cow_trace_fork_duration_seconds_sum{sel}"), |_| true).1;
    assert_eq!(prom.wait_for(&format!("sum(cow_trace_fork_episodes_total{sel})"), |_| true).1, 1.0);
    // The exporter's own page, as Prometheus's scraper got it, is valid.
    let scrape = http_get(port, "/metrics").expect("scrape");
    let (ok, out) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok, "promtool check metrics: {out}\n{scrape}");
    assert_eq!(http_get(port, "/health").as_deref(), Some("ok\n"));
    tracer.signal(libc::SIGTERM);
    let r = tracer.finish(Duration::from_secs(30));
    assert!(r.status.success(), "{}", r.stderr);
    // The same run's summary, from the same events: the workload's two
    // processes and nothing else (the cgroup filter).
    let s = r.summary();
    let rows = s["processes"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{s}");
    assert_eq!(rows.iter().map(|p| u(&p["cow_copies"])).sum::<u64>(), copies);
    let fork_ns = u(&row(s, u(&report["pid"])).unwrap()["fork_latency_ns"]["max"]);
    assert!((fork_s * 1e9 - fork_ns as f64).abs() < 1.0, "{fork_s} s vs {fork_ns} ns");
    println!(
        "cgroup {}: {copies} copies (wrote {k} + {m}), 1 fork of {fork_ns} ns, via Prometheus",
        cg.label
    );
}

/// Resident memory of `pid`, KiB.
fn rss(pid: u32) -> u64 {
    rss_kib(pid).0
}

#[test]
fn pid_churn_keeps_memory_and_series_bounded_and_totals_exact() {
    if !need_root("pid_churn_keeps_memory_and_series_bounded_and_totals_exact") {
        return;
    }
    const CAP: usize = 20;
    const NAMES: usize = 60;
    const ROUNDS: usize = 80;
    let cg = TestCgroup::new("cow-trace-churn");
    // Commands under NAMES names (more label sets than the cap), each
    // process short-lived: the churn of a busy host, in the test's cgroup.
    let bin = TempDir(std::env::temp_dir().join(format!("cow-trace-churn-{}", std::process::id())));
    std::fs::create_dir_all(&bin.0).unwrap();
    for i in 0..NAMES {
        std::os::unix::fs::symlink("/bin/true", bin.0.join(format!("churn{i}"))).unwrap();
    }
    let port = free_port();
    let serve = format!("127.0.0.1:{port}");
    let cap = CAP.to_string();
    let mut tracer =
        Background::start(&["--json", "--serve", &serve, "--series-cap", &cap, "--cgroup", &cg.label]);
    tracer.wait_attached();
    let pid = tracer.child.id();
    let script = format!(
        "read go; for r in $(seq {ROUNDS}); do for i in $(seq 0 {}); do {}/churn$i; done; done",
        NAMES - 1,
        bin.0.display()
    );
    let storm = |rounds_script: &str| {
        let mut sh = Command::new("sh").args(["-c", rounds_script]).stdin(Stdio::piped()).spawn().unwrap();
        cg.add(sh.id());
        sh.stdin.take().unwrap().write_all(b"go\n").unwrap();
        assert!(wait_timeout(&mut sh, Duration::from_secs(300)).success());
    };
    // A first storm fills every bounded store; the second must not grow them.
    storm(&script);
    let after_first = rss(pid);
    storm(&script);
    storm(&script);
    let after_third = rss(pid);
    // The storm is over: wait until two scrapes, more than a publishing
    // period apart, show the same events received, all of them in.
    let until = Instant::now() + Duration::from_secs(60);
    let spawns_in = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("cow_trace_forks_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let events_in = |text: &str| -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix("cow_trace_events_received_total ")).map(str::to_string)
    };
    let want_forks = (3 * ROUNDS * NAMES) as f64;
    let mut last = http_get(port, "/metrics").unwrap_or_default();
    let scrape = loop {
        std::thread::sleep(Duration::from_millis(1500));
        let s = http_get(port, "/metrics").unwrap_or_default();
        if spawns_in(&s) >= want_forks && events_in(&s).is_some() && events_in(&s) == events_in(&last) {
            break s;
        }
        assert!(Instant::now() < until, "the exporter's figures did not settle:\n{s}");
        last = s;
    };
    tracer.signal(libc::SIGTERM);
    let r = tracer.finish(Duration::from_secs(60));
    assert!(r.status.success(), "{}", r.stderr);
    let s = r.summary();
    let kernel = &s["kernel_totals"];
    let sum = |family: &str| -> u64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum()
    };
    let series = scrape.lines().filter(|l| l.starts_with("cow_trace_forks_total{")).count();
    let folded: u64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("cow_trace_series_folded_total "))
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0);
    // The kernel counted every fork and copy of the cgroup; the series add up
    // to exactly those (the storm is over and the scrape came after).
    assert_eq!(u(&s["dropped_events"]), 0, "{s}");
    assert_eq!(sum("cow_trace_forks_total"), u(&kernel["spawns"]), "{scrape}");
    assert_eq!(sum("cow_trace_cow_copies_total"), u(&kernel["cow_copies"]));
    assert!(u(&kernel["spawns"]) >= want_forks as u64);
    assert!(series <= CAP + 1, "{series} series, cap {CAP}");
    assert!(scrape.contains("comm=\"other\",cgroup=\"other\""), "no other series");
    assert!(folded > 0);
    // Twice the processes again, and memory stays where the first storm left it.
    let growth = after_third.saturating_sub(after_first);
    assert!(growth < 4096, "RSS grew {growth} KiB ({after_first} -> {after_third} KiB)");
    println!(
        "{} forks, {} copies in {series} series (cap {CAP}); RSS {after_first} -> {after_third} KiB",
        kernel["spawns"], kernel["cow_copies"]
    );
}

#[test]
fn serve_works_with_pid_and_launch_modes() {
    if !need_root("serve_works_with_pid_and_launch_modes") {
        return;
    }
    // -p: the exporter answers while the target runs; the run ends with it.
    let wl = HeldWorkload::start(&STANDARD);
    let (port, pid) = (free_port(), wl.pid.to_string());
    let serve = format!("127.0.0.1:{port}");
    let mut tracer = Background::start(&["--json", "--serve", &serve, "-p", &pid]);
    tracer.wait_attached();
    assert_eq!(http_get(port, "/health").as_deref(), Some("ok\n"));
    let until = Instant::now() + Duration::from_secs(30);
    while !http_get(port, "/metrics").unwrap_or_default().contains("backend=\"") {
        assert!(Instant::now() < until, "no snapshot published");
        std::thread::sleep(Duration::from_millis(200));
    }
    wl.go();
    let report = wl.finish();
    let r = tracer.finish(Duration::from_secs(60));
    assert!(r.status.success(), "{}", r.stderr);
    ok(workload::check_summary(r.summary(), &report, &STANDARD, Timing::Sampled));
    // Launch mode: ends with the command, with the same figures.
    let serve = format!("127.0.0.1:{}", free_port());
    let r = run_launched(&["--json", "--serve", &serve], &STANDARD);
    ok(workload::check_summary(r.summary(), r.workload(), &STANDARD, Timing::Sampled));
}

#[test]
fn a_cgroup_that_does_not_exist_is_refused_in_one_line() {
    if !need_root("a_cgroup_that_does_not_exist_is_refused_in_one_line") {
        return;
    }
    let r = run(&["--cgroup", "no/such/cgroup-here", "-d", "1"], Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(lines[0].contains("--cgroup no/such/cgroup-here: no such cgroup"), "{}", lines[0]);
    assert!(r.stdout.is_empty());
}

#[test]
fn a_hostile_name_reaches_prometheus_exactly() {
    if !need_root("a_hostile_name_reaches_prometheus_exactly") {
        return;
    }
    // tests/workloads/hostile.py names itself with an escape sequence, a
    // newline and a bell, then forks; its child, named so, writes 2 x CHILD
    // pages. Prometheus must give the label back byte for byte.
    const NAME: &str = "\x1b[31mEV\nIL\x07";
    const CHILD: u64 = 1000;
    let cg = TestCgroup::new("cow-trace-hostile");
    let dir = TempDir(std::env::temp_dir().join(format!("cow-trace-hostile-prom-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let port = free_port();
    let serve = format!("127.0.0.1:{port}");
    let mut tracer = Background::start(&["--json", "--serve", &serve, "--cgroup", &cg.label]);
    tracer.wait_attached();
    let prom = Prometheus::start(port);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/hostile.py");
    let procs = cg.dir.join("cgroup.procs");
    let out = Command::new("sh")
        .args(["-c", "echo 0 > \"$1\" && shift && exec \"$@\"", "sh"])
        .arg(&procs)
        .args(["python3", script])
        .arg(&dir.0)
        .args(["2048", &CHILD.to_string(), "500"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["name"], NAME);
    let query = format!("cow_trace_cow_copies_total{{cgroup=\"{}\",comm=~\"(?s).*EV.*\"}}", cg.label);
    let (labels, copies) = prom.wait_for(&query, |v| v >= (2 * CHILD) as f64);
    assert_eq!(labels["comm"], NAME, "the label came back altered: {labels}");
    // At least the pages the child wrote (Python's own copies come on top,
    // as in tests/hostile.rs).
    assert!(copies as u64 >= 2 * CHILD, "{copies} copies, wrote {}", 2 * CHILD);
    let scrape = http_get(port, "/metrics").expect("scrape");
    let (ok, out) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok, "promtool check metrics: {out}");
    tracer.signal(libc::SIGTERM);
    assert!(tracer.finish(Duration::from_secs(30)).status.success());
}
