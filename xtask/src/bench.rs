//! `cargo xtask bench`: what tracing costs the workloads it watches.
//!
//! Two storms, each run untraced and under every tracer, interleaved and
//! repeated so that drift in the machine's speed hits all configurations
//! alike:
//!
//! - CoW storm: fork, the child writes every page of a 50 MiB buffer
//!   (THP off), repeated for several rounds: one CoW copy per 4 KiB page.
//! - fork storm: thousands of fork + immediate exit + wait.
//!
//! Tracers: cow-trace system-wide; the same with `--stacks` (a user stack
//! walked and counted in the kernel for every copy); the same as a Prometheus exporter
//! (`--serve`, scraped every second, as a fleet runs it); the floor (the same hooks with programs
//! that return at once); bpftrace running the same copy/reuse logic on
//! classic tracepoints. The timings are the workload's own (`elapsed_ns`,
//! and its CPU time, `cpu_ns`), so tracer start-up and shutdown are not in
//! them. Medians and ratios to untraced are printed and written to
//! `target/bench/`.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{build_release, workspace_root};

const BPFTRACE_SCRIPT: &str = r#"
tracepoint:exceptions:page_fault_user /(args->error_code & 3) == 3/ {
  if (@pending[tid]) { @reuses[pid] = count(); }
  @pending[tid] = nsecs;
}
tracepoint:kmem:mm_page_alloc /args->order == 0 && (args->gfp_flags & 8) && @pending[tid]/ {
  @copies[pid] = count();
  @cow_ns = hist(nsecs - @pending[tid]);
  delete(@pending[tid]);
}
tracepoint:raw_syscalls:sys_enter /@pending[tid]/ {
  @reuses[pid] = count();
  delete(@pending[tid]);
}
tracepoint:sched:sched_process_fork { @forks[args->parent_pid] = count(); }
tracepoint:syscalls:sys_enter_clone { @fork_start[tid] = nsecs; }
tracepoint:syscalls:sys_exit_clone /@fork_start[tid]/ {
  @fork_ns = hist(nsecs - @fork_start[tid]);
  delete(@fork_start[tid]);
}
END { clear(@pending); clear(@fork_start); clear(@reuses); clear(@copies); clear(@forks); }
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    Untraced,
    CowTrace,
    Stacks,
    Exporter,
    Floor,
    Bpftrace,
}

impl Tracer {
    fn name(self) -> &'static str {
        match self {
            Tracer::Untraced => "untraced",
            Tracer::CowTrace => "cow-trace (tracepoint)",
            Tracer::Stacks => "cow-trace --stacks",
            Tracer::Exporter => "cow-trace --serve, scraped",
            Tracer::Floor => "floor: empty programs",
            Tracer::Bpftrace => "bpftrace, same logic",
        }
    }
}

struct Storm {
    name: &'static str,
    args: Vec<String>,
}

/// A tracer running in the background.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The exporter's scraper: set the flag to stop it; it returns how many
    /// scrapes succeeded.
    scraper: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
}

/// Scrapes `http://127.0.0.1:port/metrics` at once, then every second, as
/// Prometheus would, until told to stop.
fn scrape_every_second(port: u16) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut ok = 0;
        while !flag.load(Ordering::Relaxed) {
            let scrape = || -> std::io::Result<bool> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok(body.starts_with("HTTP/1.1 200"))
            };
            ok += scrape().unwrap_or(false) as u64;
            for _ in 0..10 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        ok
    });
    (stop, handle)
}

fn start(tracer: Tracer) -> Result<Option<Running>> {
    let root = workspace_root();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cmd = match tracer {
        Tracer::Untraced => return Ok(None),
        Tracer::CowTrace | Tracer::Stacks | Tracer::Floor | Tracer::Exporter => {
            let mut c = Command::new(root.join("target/release/cow-trace"));
            // The backend the labels name, whatever `auto` would pick.
            c.args(["--json", "-d", "86400", "--backend", "tracepoint"]);
            if tracer == Tracer::Floor {
                c.arg("--bench-empty-programs");
            }
            if tracer == Tracer::Stacks {
                c.arg("--stacks");
            }
            if tracer == Tracer::Exporter {
                c.args(["--serve", &format!("127.0.0.1:{port}")]);
            }
            c
        }
        Tracer::Bpftrace => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", BPFTRACE_SCRIPT]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", tracer.name()))?;
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // cow-trace prints its start record once attached; bpftrace says
    // "Attaching N probes...".
    let first =
        rx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow!("{} did not start", tracer.name()))?;
    if tracer == Tracer::Bpftrace {
        // bpftrace prints "Attaching" before attaching; give it a moment.
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(first);
    let scraper = (tracer == Tracer::Exporter).then(|| scrape_every_second(port));
    Ok(Some(Running { child, lines: rx, scraper }))
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
}

/// Stops the tracer; returns (peak RSS KiB, dropped events) where known.
fn stop(mut r: Running) -> Result<(Option<u64>, Option<u64>)> {
    if let Some((flag, handle)) = r.scraper.take() {
        flag.store(true, Ordering::Relaxed);
        let scrapes = handle.join().map_err(|_| anyhow!("scraper panicked"))?;
        if scrapes == 0 {
            bail!("the exporter answered no scrape");
        }
    }
    let rss = peak_rss_kib(r.child.id());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGINT) };
    let status = r.child.wait()?;
    let mut dropped = None;
    while let Ok(line) = r.lines.recv_timeout(Duration::from_secs(10)) {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["type"] == "summary" {
                dropped = v["dropped_events"].as_u64();
            }
        }
    }
    if !status.success() {
        bail!("tracer exited with {status}");
    }
    Ok((rss, dropped))
}

/// The storm's elapsed time and the CPU time the workload spent in it
/// (its own and its children's: the tracer's work in their context, not
/// the time they waited for a CPU).
fn run_storm(storm: &Storm) -> Result<(u64, u64)> {
    let out = Command::new(workspace_root().join("target/release/cow-workload"))
        .args(&storm.args)
        .output()
        .context("cow-workload")?;
    if !out.status.success() {
        bail!("cow-workload failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("cow-workload report")?;
    let field = |k: &str| v[k].as_u64().ok_or_else(|| anyhow!("no {k} in {v}"));
    Ok((field("elapsed_ns")?, field("cpu_ns")?))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn bench(repeats: usize, rounds: usize, forks: usize) -> Result<()> {
    build_release()?;
    // The peer runs the same logic: a comparison the benchmark owes its
    // reader, so it is installed like everything else, not skipped.
    crate::setup::ensure_packages(&[("bpftrace", "bpftrace"), ("bpftool", "bpftool")])?;
    let tracers = [
        Tracer::Untraced,
        Tracer::CowTrace,
        Tracer::Stacks,
        Tracer::Exporter,
        Tracer::Floor,
        Tracer::Bpftrace,
    ];
    let pages = 50 * 1024 * 1024 / 4096;
    let storms = [
        Storm {
            name: "CoW storm",
            args: [
                "--pages",
                &pages.to_string(),
                "--child-writes",
                &pages.to_string(),
                "--parent-writes",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(["--rounds".to_string(), rounds.to_string()])
            .collect(),
        },
        Storm { name: "fork storm", args: vec!["--fork-storm".into(), forks.to_string()] },
    ];

    let mut report = String::new();
    let kernel = sh("uname", &["-r"]);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let _ = writeln!(
        report,
        "date: {}\nkernel: {kernel}\ncpu: {cpu} x {}\nrepeats: {repeats}, CoW storm: {rounds} rounds x 50 MiB, fork storm: {forks} forks\n",
        sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        sh("nproc", &[])
    );
    let mut json = serde_json::Map::new();
    for storm in &storms {
        let mut times: Vec<Vec<u64>> = vec![Vec::new(); tracers.len()];
        let mut rss: Vec<u64> = vec![0; tracers.len()];
        let mut drops: Vec<u64> = vec![0; tracers.len()];
        let mut cpu: Vec<Vec<u64>> = vec![Vec::new(); tracers.len()];
        for rep in 0..repeats {
            // Rotate the order so no configuration always runs first.
            for k in 0..tracers.len() {
                let i = (k + rep) % tracers.len();
                let running = start(tracers[i])?;
                let (t, c) = run_storm(storm)?;
                if let Some(r) = running {
                    let (peak, dropped) = stop(r)?;
                    rss[i] = rss[i].max(peak.unwrap_or(0));
                    drops[i] += dropped.unwrap_or(0);
                }
                times[i].push(t);
                cpu[i].push(c);
            }
            eprintln!("xtask: {} repeat {}/{repeats} done", storm.name, rep + 1);
        }
        // Each configuration against the untraced run of the same repeat,
        // minutes apart at most: the machine's slow drift cancels out.
        let paired_of = |times: &[Vec<u64>]| -> Vec<f64> {
            let ratios = |t: &Vec<u64>| -> Vec<f64> {
                t.iter().zip(&times[0]).map(|(&a, &b)| a as f64 / b as f64).collect()
            };
            times.iter().map(|t| crate::startstop::median(&ratios(t))).collect()
        };
        let paired = paired_of(&times);
        let cpu_paired = paired_of(&cpu);
        let cpu_meds: Vec<u64> = cpu.iter().map(|c| median(&mut c.clone())).collect();
        let meds: Vec<u64> = times.iter_mut().map(|t| median(t)).collect();
        // `median` sorted the samples: the first is the fastest run, the
        // figure least disturbed by anything else the machine did.
        let mins: Vec<u64> = times.iter().map(|t| t[0]).collect();
        let _ = writeln!(report, "{}:", storm.name);
        let _ = writeln!(
            report,
            "  {:<26} {:>12} {:>8} {:>12} {:>9} {:>8} {:>9} {:>8} {:>12} {:>8}",
            "configuration",
            "median",
            "ratio",
            "fastest",
            "ratio",
            "paired",
            "CPU ratio",
            "paired",
            "tracer RSS",
            "dropped"
        );
        let mut entries = Vec::new();
        for (i, t) in tracers.iter().enumerate() {
            let ratio = meds[i] as f64 / meds[0] as f64;
            let min_ratio = mins[i] as f64 / mins[0] as f64;
            let rss_s =
                if *t == Tracer::Untraced { "-".to_string() } else { format!("{} MiB", rss[i] / 1024) };
            let drop_s = match t {
                Tracer::CowTrace | Tracer::Stacks | Tracer::Exporter => drops[i].to_string(),
                _ => "-".into(),
            };
            let _ = writeln!(
                report,
                "  {:<26} {:>9.1} ms {:>8.3} {:>9.1} ms {:>9.3} {:>8.3} {:>9.3} {:>8.3} {:>12} {:>8}",
                t.name(),
                meds[i] as f64 / 1e6,
                ratio,
                mins[i] as f64 / 1e6,
                min_ratio,
                paired[i],
                cpu_meds[i] as f64 / cpu_meds[0] as f64,
                cpu_paired[i],
                rss_s,
                drop_s
            );
            entries.push(serde_json::json!({
                "configuration": t.name(), "median_ns": meds[i], "ratio": ratio,
                "min_ns": mins[i], "min_ratio": min_ratio, "paired_ratio": paired[i],
                "samples_ns": times[i], "tracer_peak_rss_kib": rss[i],
                "cpu_ratio": cpu_meds[i] as f64 / cpu_meds[0] as f64, "cpu_paired_ratio": cpu_paired[i],
                "cpu_samples_ns": cpu[i], "dropped_events": drops[i],
            }));
        }
        let _ = writeln!(report);
        json.insert(storm.name.to_string(), Value::Array(entries));
    }
    print!("{report}");
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("overhead.txt"), &report)?;
    std::fs::write(dir.join("overhead.json"), serde_json::to_string_pretty(&Value::Object(json))?)?;
    eprintln!("xtask: written to target/bench/overhead.txt and overhead.json");
    Ok(())
}
