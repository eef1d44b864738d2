//! `cargo xtask bench --vm`: the CoW and fork storms under QEMU, on a
//! Debian kernel where all three backends attach, so that the fentry and
//! kprobe fault paths, which the development kernel refuses, are measured
//! too.
//!
//! One VM boot runs every configuration: untraced, each backend, and each
//! backend's floor (the same hooks with programs that return at once),
//! interleaved with the order rotated at each repeat. TCG emulation
//! distorts absolute times (an emulated clock read or trap costs nothing
//! like a real one), so only ratios between configurations of the same run
//! are reported.
//!
//! The guest has one vCPU and QEMU's instruction counter for a clock
//! (`-icount shift=0,sleep=off`: a guest nanosecond is one instruction
//! executed, so the host's speed and load do not reach the figures), and
//! the figure the target is judged by is the workload's own CPU time (`cpu_ns`: user and system time of the workload
//! and its children, the kernel's exact runtime). On hardware the tracer's
//! reader runs on another CPU while the workload faults; in an emulator
//! that runs every vCPU in one host thread it takes turns with the
//! workload, and the wall time charges the reader's work (the same
//! userspace for every backend) to the fault path. With two vCPUs the
//! guest's clock also runs for a task while the host thread emulates the
//! other vCPU, so only one vCPU gives each task its own time. The
//! workload's CPU time then holds what runs in its context, the backend's
//! programs on its faults and forks (and the interrupts that land while it
//! runs, as in the untraced runs); the wall-time ratios are printed beside
//! it.
//!
//! Each repeat also times each backend's start and stop as the host's
//! `bench --only startstop` does (there, beside bpftrace): from just before
//! the tracer's launch to the first instruction of its command (`cow-workload
//! --now`, which prints the clock first thing), and from there to just after
//! the tracer's exit. On the instruction clock these are instructions
//! executed or timer waits the guest sat through, the same for each backend
//! whatever the host does: they compare the backends, not this machine's
//! milliseconds.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::{
    startstop::median,
    vm::{self, VmOptions},
    workspace_root,
};

const BACKENDS: [&str; 3] = ["fentry", "kprobe", "tracepoint"];
const STORMS: [&str; 2] = ["cow", "fork"];
const PREFIX: &str = "bench-vm:";

/// What `--vm` runs: sized for about ten minutes under TCG with the
/// defaults.
#[derive(Clone, Debug)]
pub struct VmBench {
    pub kernel: Option<PathBuf>,
    pub repeats: usize,
    /// Rounds of the CoW storm: fork, the child writes `pages` pages.
    pub rounds: usize,
    pub pages: usize,
    pub forks: usize,
}

/// A configuration: untraced, or a backend with real or empty programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    backend: Option<&'static str>,
    floor: bool,
}

impl Config {
    fn all() -> Vec<Config> {
        let mut v = vec![Config { backend: None, floor: false }];
        for b in BACKENDS {
            v.push(Config { backend: Some(b), floor: false });
            v.push(Config { backend: Some(b), floor: true });
        }
        v
    }

    /// One word, for the console protocol.
    fn key(self) -> String {
        match (self.backend, self.floor) {
            (None, _) => "untraced".into(),
            (Some(b), false) => b.into(),
            (Some(b), true) => format!("{b}-floor"),
        }
    }

    fn label(self) -> String {
        match (self.backend, self.floor) {
            (None, _) => "untraced".into(),
            (Some(b), false) => format!("cow-trace ({b})"),
            (Some(b), true) => format!("floor: {b}, empty programs"),
        }
    }
}

/// The script the VM runs: every repeat, every configuration in rotated
/// order, both storms under one start of the tracer, after an unmeasured
/// warm-up. Each measurement is one console line,
/// `bench-vm: CONFIG STORM REPEAT ELAPSED_NS CPU_NS`. The tracer's output
/// file is emptied before it starts: otherwise the wait for its start
/// record could find the previous run's before the new tracer's shell
/// truncated the file, and the storm would run while the tracer was still
/// attaching (which the copy counts below catch). A traced
/// configuration adds `bench-vm: CONFIG dropped REPEAT N` and
/// `bench-vm: CONFIG copies REPEAT N` from its summary: a backend that did
/// not see every copy the CoW storm made is not measuring it. Then each
/// backend's start and stop, and the command's alone (`untraced`):
/// `bench-vm: CONFIG startstop REPEAT ATTACH_NS EXIT_NS`.
fn script(b: &VmBench) -> String {
    let configs = Config::all();
    let mut s = String::from("#!/bin/sh\n");
    // Storms write memory the kernel has never backed: transparent huge
    // pages are left as the kernel boots them, and the workload asks for
    // 4 KiB pages (MADV_NOHUGEPAGE) itself.
    let cow = format!(
        "cow-workload --pages {p} --child-writes {p} --parent-writes 0 --rounds {r}",
        p = b.pages,
        r = b.rounds
    );
    let fork = format!("cow-workload --fork-storm {}", b.forks);
    let _ = write!(
        s,
        "elapsed() {{ sed -n 's/.*\"elapsed_ns\":\\([0-9]*\\),\"cpu_ns\":\\([0-9]*\\).*/\\1 \\2/p'; }}\n\
         storms() {{\n\
           echo \"{PREFIX} $1 cow $2 $({cow} | elapsed)\"\n\
           echo \"{PREFIX} $1 fork $2 $({fork} | elapsed)\"\n\
         }}\n\
         traced() {{\n\
           : > /tmp/trace.out\n\
           cow-trace --json -d 86400 --backend \"$3\" $4 > /tmp/trace.out 2> /tmp/trace.err &\n\
           pid=$!\n\
           until grep -q '\"type\":\"start\"' /tmp/trace.out; do\n\
             kill -0 $pid 2>/dev/null || {{ echo \"{PREFIX} $1 failed $2 $(head -c 300 /tmp/trace.err)\"; return; }}\n\
             usleep 100000\n\
           done\n\
           storms \"$1\" \"$2\"\n\
           kill -INT $pid; wait $pid\n\
           echo \"{PREFIX} $1 dropped $2 $(sed -n 's/.*\"type\":\"summary\".*\"dropped_events\":\\([0-9]*\\).*/\\1/p' /tmp/trace.out)\"\n\
           echo \"{PREFIX} $1 copies $2 $(sed -n 's/.*\"type\":\"summary\".*\"kernel_totals\":{{[^}}]*\"cow_copies\":\\([0-9]*\\).*/\\1/p' /tmp/trace.out)\"\n\
         }}\n\
         startstop() {{\n\
           t0=$(cow-workload --now)\n\
           if [ \"$1\" = untraced ]; then cow-workload --now > /tmp/ss.out 2> /tmp/ss.err\n\
           else cow-trace --json --backend \"$1\" -- cow-workload --now > /tmp/ss.out 2> /tmp/ss.err; fi\n\
           rc=$?\n\
           t2=$(cow-workload --now)\n\
           t1=$(grep -m1 '^[0-9]' /tmp/ss.out)\n\
           if [ $rc -ne 0 ] || [ -z \"$t1\" ]; then\n\
             echo \"{PREFIX} $1 failed $2 (start and stop, exit $rc) $(head -c 300 /tmp/ss.err)\"; return\n\
           fi\n\
           echo \"{PREFIX} $1 startstop $2 $((t1 - t0)) $((t2 - t1))\"\n\
         }}\n"
    );
    // A first pass that is not measured: the emulator translates the code
    // paths of the storms for the first time, and the kernel touches its
    // fresh memory.
    let _ = writeln!(s, "storms warm-up -");
    for rep in 0..b.repeats {
        for k in 0..configs.len() {
            let c = configs[(k + rep) % configs.len()];
            let key = c.key();
            match c.backend {
                None => {
                    let _ = writeln!(s, "storms {key} {rep}");
                }
                Some(backend) => {
                    let empty = if c.floor { "--bench-empty-programs" } else { "" };
                    let _ = writeln!(s, "traced {key} {rep} {backend} {empty}");
                }
            }
        }
        for k in 0..configs.len() {
            let c = configs[(k + rep) % configs.len()];
            if !c.floor {
                let _ = writeln!(s, "startstop {} {rep}", c.key());
            }
        }
        let _ = writeln!(s, "echo \"{PREFIX} repeat {} of {} done\"", rep + 1, b.repeats);
    }
    s
}

/// One storm's (elapsed, CPU) times per configuration, by repeat; or the
/// (attach, exit) times of the start and stop.
type Times = Vec<Vec<Option<(u64, u64)>>>;

/// What the console gave: each storm's times, the start and stop times
/// (floors: none), and per configuration the events its tracer dropped.
struct Console {
    storms: Vec<Times>,
    startstop: Times,
    dropped: Vec<u64>,
}

/// Reads the console: the times of each storm, and per configuration the
/// events its tracer dropped over the run.
/// `copies`: what the CoW storm makes in one run; every traced run must
/// report its count and have counted at least that many (a lower bound:
/// the count is the whole system's over both storms).
fn parse(console: &str, configs: &[Config], repeats: usize, copies: u64) -> Result<Console> {
    let mut times: Vec<Times> = vec![vec![vec![None; repeats]; configs.len()]; STORMS.len()];
    let mut startstop: Times = vec![vec![None; repeats]; configs.len()];
    let mut dropped = vec![0u64; configs.len()];
    // Repeats whose copy count was reported, per configuration.
    let mut counted = vec![0usize; configs.len()];
    for line in console.lines() {
        let Some(rest) = line.split_once(PREFIX).map(|(_, r)| r.trim()) else { continue };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let Some(c) = configs.iter().position(|c| words.first() == Some(&c.key().as_str())) else { continue };
        match words.get(1..) {
            Some(["failed", ..]) if configs[c].backend.is_none() => {
                bail!("the command alone failed in the VM: {rest}")
            }
            Some(["failed", ..]) => {
                bail!("the tracer of {} did not start in the VM: {rest}", configs[c].label())
            }
            Some(["dropped", rest @ ..]) => match rest {
                [_, n] if n.parse::<u64>().is_ok() => dropped[c] += n.parse::<u64>().unwrap_or(0),
                _ => bail!("{} ended without its summary in the VM: {}", configs[c].label(), words.join(" ")),
            },
            Some(["copies", rest @ ..]) if !configs[c].floor => match rest {
                [_, n] if n.parse::<u64>().is_ok_and(|n| n >= copies) => counted[c] += 1,
                _ => bail!(
                    "{} reported {} copies (repeat, count), where the CoW storm made {copies}: it did not trace the storm",
                    configs[c].label(),
                    rest.join(" ")
                ),
            },
            Some(["startstop", rep, attach, exit]) => {
                let (Ok(rep), Ok(attach), Ok(exit)) =
                    (rep.parse::<usize>(), attach.parse::<u64>(), exit.parse::<u64>())
                else {
                    bail!("a start and stop failed in the VM: {rest}");
                };
                if let Some(slot) = startstop[c].get_mut(rep) {
                    *slot = Some((attach, exit));
                }
            }
            Some([storm, rep, ns, cpu]) => {
                let (Some(s), Ok(rep), Ok(ns), Ok(cpu)) = (
                    STORMS.iter().position(|x| x == storm),
                    rep.parse::<usize>(),
                    ns.parse::<u64>(),
                    cpu.parse::<u64>(),
                ) else {
                    bail!("a storm failed in the VM: {rest}");
                };
                if let Some(slot) = times[s][c].get_mut(rep) {
                    *slot = Some((ns, cpu));
                }
            }
            Some([storm, ..]) if STORMS.contains(storm) => bail!("a storm failed in the VM: {rest}"),
            _ => {}
        }
    }
    for (c, config) in configs.iter().enumerate() {
        if config.backend.is_some() && !config.floor && counted[c] < repeats {
            bail!("{}: {} of {repeats} runs reported their copy count", config.label(), counted[c]);
        }
    }
    for (s, storm) in STORMS.iter().enumerate() {
        for (c, config) in configs.iter().enumerate() {
            if times[s][c].iter().any(Option::is_none) {
                bail!(
                    "{storm} storm under {}: a repeat has no time (the VM's console is incomplete)",
                    config.label()
                );
            }
        }
    }
    for (c, config) in configs.iter().enumerate() {
        if !config.floor && startstop[c].iter().any(Option::is_none) {
            bail!(
                "start and stop of {}: a repeat has no time (the VM's console is incomplete)",
                config.label()
            );
        }
    }
    Ok(Console { storms: times, startstop, dropped })
}

/// One configuration's start and stop: medians in millions of guest
/// instructions, and over the tracepoint backend's medians (the backend
/// whose milliseconds the host measures).
struct StartStop {
    config: usize,
    label: String,
    attach_m: f64,
    exit_m: f64,
    attach_ratio: f64,
    exit_ratio: f64,
}

fn startstop_rows(configs: &[Config], startstop: &Times) -> Vec<StartStop> {
    let med = |c: usize, k: usize| {
        let v: Vec<f64> = startstop[c]
            .iter()
            .map(|x| x.map_or(0, |(a, e)| if k == 0 { a } else { e }) as f64 / 1e6)
            .collect();
        median(&v)
    };
    let tp = configs.iter().position(|c| c.backend == Some("tracepoint") && !c.floor);
    let over = |c: usize, k: usize| tp.map_or(f64::NAN, |t| med(c, k) / med(t, k));
    configs
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.floor)
        .map(|(c, config)| StartStop {
            config: c,
            label: if config.backend.is_none() { "the command alone".into() } else { config.label() },
            attach_m: med(c, 0),
            exit_m: med(c, 1),
            attach_ratio: over(c, 0),
            exit_ratio: over(c, 1),
        })
        .collect()
}

pub fn bench_vm(b: &VmBench) -> Result<()> {
    if b.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let configs = Config::all();
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench-vm.sh");
    std::fs::write(&path, script(b))?;
    // Per repeat, each traced configuration starts and stops cow-trace
    // once for the storms, each backend once more for its start and stop;
    // allow for a slow emulator on a shared machine.
    let timeout = Duration::from_secs(600 + 360 * b.repeats as u64);
    let opts =
        VmOptions { kernel: b.kernel.clone(), include: vec![path], bins: vec![], timeout, one_cpu: true };
    let (code, console) = vm::run_in_vm(&opts, &["sh".into(), "bench-vm.sh".into()], true)?;
    if code != 0 {
        bail!("the benchmark script exited {code} in the VM");
    }
    let kernel = console
        .lines()
        .find_map(|l| {
            l.split_once("cow-trace-vm: kernel ")
                .map(|(_, k)| k.split(',').next().unwrap_or(k).trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let Console { storms: times, startstop, dropped } =
        parse(&console, &configs, b.repeats, (b.rounds * b.pages) as u64)?;

    let mut report = String::new();
    let _ = writeln!(
        report,
        "kernel: {kernel} under QEMU, TCG emulation (1 vCPU, instruction clock: 1 ns = 1 instruction)\n\
         repeats: {}, CoW storm: {} rounds x {} pages, fork storm: {} forks\n\
         Ratios only, each against the untraced runs of this same VM boot: emulation distorts\n\
         absolute times (clock reads, traps and ring-buffer writes cost nothing like they do on\n\
         hardware), so no time from this run means anything alone. \"CPU\" is the workload's own\n\
         CPU time (the work done in its context: the backend's programs); \"wall\" also holds the\n\
         tracer's reader, which shares the one vCPU here and runs on another CPU on hardware.\n",
        b.repeats, b.rounds, b.pages, b.forks
    );
    let mut out = serde_json::Map::new();
    out.insert("kernel".into(), json!(kernel));
    out.insert("emulation".into(), json!("QEMU TCG, 1 vCPU, -icount shift=0"));
    out.insert("repeats".into(), json!(b.repeats));
    for (s, storm) in STORMS.iter().enumerate() {
        let t = &times[s];
        // Figure `k` (0: elapsed, 1: CPU) of configuration `c`, repeat `r`.
        let at =
            |k: usize, c: usize, r: usize| t[c][r].map_or(0, |(e, cpu)| if k == 0 { e } else { cpu }) as f64;
        let med = |k: usize, c: usize| median(&(0..b.repeats).map(|r| at(k, c, r)).collect::<Vec<_>>());
        let ratio = |k: usize, c: usize| med(k, c) / med(k, 0);
        // Each run against the untraced run of its own repeat.
        let paired = |k: usize, c: usize| {
            median(&(0..b.repeats).map(|r| at(k, c, r) / at(k, 0, r)).collect::<Vec<_>>())
        };
        let _ = writeln!(report, "{storm} storm:");
        let _ = writeln!(
            report,
            "  {:<34} {:>6} {:>7} {:>6} {:>7} {:>26} {:>8}",
            "configuration", "CPU", "paired", "wall", "paired", "above its floor (CPU)", "dropped"
        );
        let mut entries = Vec::new();
        for (c, config) in configs.iter().enumerate() {
            let floor = config
                .backend
                .filter(|_| !config.floor)
                .and_then(|b| configs.iter().position(|x| x.backend == Some(b) && x.floor));
            let above = floor.map(|f| (ratio(1, c) - ratio(1, f), paired(1, c) - paired(1, f)));
            let above_s = above.map_or("-".to_string(), |(m, p)| format!("{m:+.3} / {p:+.3} paired"));
            let drop_s =
                if config.backend.is_some() && !config.floor { dropped[c].to_string() } else { "-".into() };
            let _ = writeln!(
                report,
                "  {:<34} {:>6.3} {:>7.3} {:>6.3} {:>7.3} {:>26} {:>8}",
                config.label(),
                ratio(1, c),
                paired(1, c),
                ratio(0, c),
                paired(0, c),
                above_s,
                drop_s
            );
            entries.push(json!({
                "configuration": config.label(),
                "cpu_ratio": ratio(1, c),
                "cpu_paired_ratio": paired(1, c),
                "wall_ratio": ratio(0, c),
                "wall_paired_ratio": paired(0, c),
                "above_floor_cpu": above.map(|(m, _)| m),
                "above_floor_cpu_paired": above.map(|(_, p)| p),
                "samples_ns": t[c].iter().map(|x| x.map(|(e, _)| e)).collect::<Vec<_>>(),
                "cpu_samples_ns": t[c].iter().map(|x| x.map(|(_, cpu)| cpu)).collect::<Vec<_>>(),
                "dropped_events": dropped[c],
            }));
        }
        let _ = writeln!(report);
        out.insert(format!("{storm} storm"), Value::Array(entries));
    }
    let _ = writeln!(
        report,
        "\"above its floor\": the backend's CPU ratio minus its own empty-program floor's, by the\n\
         median and the paired ratio (target for the CoW storm: within 0.05).\n"
    );
    let _ = writeln!(
        report,
        "start and stop (medians; millions of guest instructions, and over the tracepoint backend's):"
    );
    let _ = writeln!(
        report,
        "  {:<34} {:>10} {:>8} {:>10} {:>8}",
        "configuration", "attach", "ratio", "exit", "ratio"
    );
    let rows = startstop_rows(&configs, &startstop);
    for r in &rows {
        let _ = writeln!(
            report,
            "  {:<34} {:>10.1} {:>8.2} {:>10.1} {:>8.2}",
            r.label, r.attach_m, r.attach_ratio, r.exit_m, r.exit_ratio
        );
    }
    let entries: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "configuration": r.label,
                "attach_minstructions_median": r.attach_m,
                "exit_minstructions_median": r.exit_m,
                "attach_over_tracepoint": r.attach_ratio,
                "exit_over_tracepoint": r.exit_ratio,
                "attach_exit_samples_ns": startstop[r.config].iter().map(|x| x.map(|(a, e)| [a, e])).collect::<Vec<_>>(),
            })
        })
        .collect();
    out.insert("start and stop".into(), Value::Array(entries));
    let _ = writeln!(
        report,
        "\n\"attach\": from just before the tracer's launch to the first instruction of its command\n\
         (`cow-workload --now`); \"exit\": from there to just after the tracer's exit. Both include\n\
         starting a process, as \"the command alone\" shows. Emulated instructions are not\n\
         milliseconds: compare the backends by the ratios. The host's `cargo xtask bench --only\n\
         startstop` gives the tracepoint backend's milliseconds, beside bpftrace."
    );
    print!("{report}");
    std::fs::write(dir.join("vm-overhead.txt"), &report)?;
    std::fs::write(dir.join("vm-overhead.json"), serde_json::to_string_pretty(&Value::Object(out))?)?;
    eprintln!("xtask: written to target/bench/vm-overhead.txt and vm-overhead.json");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> VmBench {
        VmBench { kernel: None, repeats: 2, rounds: 1, pages: 64, forks: 5 }
    }

    #[test]
    fn every_configuration_runs_once_per_repeat_in_a_rotating_order() {
        let s = script(&small());
        let configs = Config::all();
        // The calls, not the functions' own lines (which pass "$1").
        let runs: Vec<&str> = s
            .lines()
            .filter(|l| (l.starts_with("storms ") || l.starts_with("traced ")) && !l.contains('$'))
            .collect();
        let (warm_up, runs) = runs.split_first().expect("runs");
        assert_eq!(*warm_up, "storms warm-up -");
        assert_eq!(runs.len(), 2 * configs.len());
        for c in &configs {
            let key = c.key();
            let n = runs.iter().filter(|l| l.split(' ').nth(1) == Some(key.as_str())).count();
            assert_eq!(n, 2, "{key}: {runs:?}");
        }
        assert_ne!(runs[0].split(' ').nth(1), runs[configs.len()].split(' ').nth(1), "{runs:?}");
        assert!(s.contains("traced kprobe-floor 0 kprobe --bench-empty-programs"), "{s}");
        // Start and stop: every backend and the command alone, each repeat;
        // a floor's empty programs start like the real ones, so not those.
        let starts: Vec<&str> = s.lines().filter(|l| l.starts_with("startstop ")).collect();
        assert_eq!(starts.len(), 2 * 4, "{starts:?}");
        assert!(!starts.iter().any(|l| l.contains("floor")), "{starts:?}");
        assert!(
            starts.contains(&"startstop untraced 1") && starts.contains(&"startstop kprobe 0"),
            "{starts:?}"
        );
    }

    #[test]
    fn the_console_gives_each_storm_its_times_and_a_missing_one_is_an_error() {
        let configs = Config::all();
        let mut console = format!("noise\n{PREFIX} warm-up cow - 5000\n");
        for c in &configs {
            for rep in 0..2 {
                for storm in STORMS {
                    console.push_str(&format!(
                        "{PREFIX} {} {storm} {rep} {} {}\n",
                        c.key(),
                        1000 + rep,
                        900 + rep
                    ));
                }
                if !c.floor {
                    console.push_str(&format!("{PREFIX} {} startstop {rep} {} 40\n", c.key(), 500 + rep));
                }
                if c.backend.is_some() {
                    console.push_str(&format!("{PREFIX} {} dropped {rep} 3\n", c.key()));
                    let n = if c.floor { 0 } else { 70 };
                    console.push_str(&format!("{PREFIX} {} copies {rep} {n}\n", c.key()));
                }
            }
        }
        let Console { storms: times, startstop, dropped } =
            parse(&console, &configs, 2, 64).expect("complete");
        assert_eq!(times[1][3], vec![Some((1000, 900)), Some((1001, 901))]);
        assert_eq!((dropped[0], dropped[1]), (0, 6));
        assert_eq!(startstop[1], vec![Some((500, 40)), Some((501, 40))]);
        assert_eq!(startstop[2], vec![None, None], "a floor has no start and stop of its own");
        let no_start = console.replace(&format!("{PREFIX} tracepoint startstop 1 501 40\n"), "");
        assert!(parse(&no_start, &configs, 2, 64).is_err());
        let rows = startstop_rows(&configs, &startstop);
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            ["the command alone", "cow-trace (fentry)", "cow-trace (kprobe)", "cow-trace (tracepoint)"]
        );
        let tp = &rows[3];
        assert_eq!((tp.attach_ratio, tp.exit_ratio), (1.0, 1.0));
        // Medians of 500 and 501 instructions: 500.5, in millions.
        assert!((tp.attach_m - 500.5e-6).abs() < 1e-12 && (tp.exit_m - 40e-6).abs() < 1e-12);
        let start_failed = format!("{console}{PREFIX} fentry failed 1 (start and stop, exit 1) no BTF\n");
        assert!(parse(&start_failed, &configs, 2, 64).is_err());
        // A figure that is not a count (a clock that went backwards, a
        // missing field) is an error, not a zero.
        for bad in ["-12 40", "500", "x 40"] {
            let garbled = console.replace(
                &format!("{PREFIX} kprobe startstop 0 500 40\n"),
                &format!("{PREFIX} kprobe startstop 0 {bad}\n"),
            );
            assert!(parse(&garbled, &configs, 2, 64).is_err(), "{bad}");
        }
        let cut = console.replace(&format!("{PREFIX} fentry-floor cow 1 1001 901\n"), "");
        assert!(parse(&cut, &configs, 2, 64).is_err());
        let failed = format!("{console}{PREFIX} kprobe failed 0 no kprobes\n");
        assert!(parse(&failed, &configs, 2, 64).is_err());
        // A backend that missed the storm's copies is not measuring it; one
        // whose count is missing or unreadable proves nothing.
        let missed = console
            .replace(&format!("{PREFIX} kprobe copies 1 70\n"), &format!("{PREFIX} kprobe copies 1 12\n"));
        assert!(parse(&missed, &configs, 2, 64).is_err());
        let unread = console
            .replace(&format!("{PREFIX} kprobe copies 1 70\n"), &format!("{PREFIX} kprobe copies 1\n"));
        assert!(parse(&unread, &configs, 2, 64).is_err());
        let absent = console.replace(&format!("{PREFIX} fentry copies 0 70\n"), "");
        assert!(parse(&absent, &configs, 2, 64).is_err());
    }
}
