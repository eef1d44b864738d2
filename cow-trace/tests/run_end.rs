//! The end of a run: figures are those of the instant the run was cut off,
//! whether it ends by `-d` or by SIGINT in the middle of forks and copies.
//! Ground truth: each child of the workload notes the time right after each
//! page it writes, so the copies it had made by the reported cut-off are
//! known; a run that ends by its target's exit gives the workload's own
//! level of reuses.

mod common;

use std::{collections::HashMap, path::PathBuf, time::Duration};

use common::*;
use serde_json::Value;

const PAGES: u64 = 8192;
const CHILD_WRITES: u64 = 3000;
const PARENT_WRITES: u64 = 3000;
/// Runs of each kind of end, one after another.
const RUNS: usize = 5;

enum Ending {
    Duration,
    Sigint,
}

struct Traced {
    summary: Value,
    /// Per child PID, the times right after each of its page writes.
    logs: HashMap<u64, Vec<u64>>,
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("cow-trace-end-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

fn read_logs(dir: &PathBuf) -> HashMap<u64, Vec<u64>> {
    let mut logs = HashMap::new();
    for e in std::fs::read_dir(dir).expect("log dir").flatten() {
        let pid: u64 = e.file_name().to_string_lossy().parse().expect("a child PID");
        let bytes = std::fs::read(e.path()).unwrap();
        let times = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        logs.insert(pid, times);
    }
    logs
}

/// One `-p` run over a workload that forks and copies until told to stop,
/// which it is told only after cow-trace has ended.
fn traced_run(ending: Ending) -> Traced {
    let (dir, until) = (scratch("log"), scratch("until"));
    std::fs::create_dir_all(&dir).unwrap();
    // Each child pauses half-way through its writes for most of its life,
    // so the cut-off lands there by construction in nearly every run (the
    // test asks for one in ten), however fast the machine writes.
    let extra = [
        "--until-file",
        until.to_str().unwrap(),
        "--write-log",
        dir.to_str().unwrap(),
        "--pause-ms",
        "5",
        "--child-write-pause-ms",
        "100",
    ];
    let w = HeldWorkload::start_with(&[], PAGES, CHILD_WRITES, PARENT_WRITES, &extra);
    let pid = w.pid.to_string();
    let mut args = vec!["--json", "-p", &pid];
    if matches!(ending, Ending::Duration) {
        args.extend(["-d", "1"]);
    }
    let mut bg = Background::start(&args);
    bg.wait_attached();
    w.go();
    if matches!(ending, Ending::Sigint) {
        // Explicit progress, not a time: three children reaped, a fourth
        // under way.
        while std::fs::read_dir(&dir).unwrap().count() < 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        bg.signal(libc::SIGINT);
    }
    let run = bg.finish(Duration::from_secs(60));
    assert!(run.status.success(), "cow-trace failed: {}", run.stderr);
    std::fs::write(&until, b"").unwrap();
    w.finish();
    let logs = read_logs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&until);
    Traced { summary: run.summary().clone(), logs }
}

/// Reuses per episode of a run that ends by its target's own exit.
fn clean_reuses_per_episode() -> f64 {
    let w = HeldWorkload::start_with(
        &[],
        PAGES,
        CHILD_WRITES,
        PARENT_WRITES,
        &["--rounds", "20", "--pause-ms", "5"],
    );
    let pid = w.pid.to_string();
    let mut bg = Background::start(&["--json", "-p", &pid]);
    bg.wait_attached();
    w.go();
    let run = bg.finish(Duration::from_secs(120));
    w.finish();
    let s = run.summary();
    assert_eq!(s["ended_by"], "targets exited");
    let eps = s["episodes"].as_array().unwrap().len() as f64;
    assert_eq!(eps, 20.0, "{s}");
    u(&s["kernel_totals"]["cow_reuses"]) as f64 / eps
}

/// Checks one cut run; returns whether an episode was cut mid-way (its
/// child still running, with some of its writes done).
fn check(t: &Traced, clean_rate: f64, what: &str) -> bool {
    let s = &t.summary;
    let cut = u(&s["cut_off_ns"]);
    let eps = s["episodes"].as_array().unwrap();
    let reuses = u(&s["kernel_totals"]["cow_reuses"]);
    // A clean run's level, with room for noise: the bug this guards
    // against made tens of thousands.
    let bound = (4.0 * clean_rate * (eps.len() as f64 + 1.0)) as u64 + SLACK;
    eprintln!(
        "{what}: {} episodes, reuses {reuses} (bound {bound}, clean {clean_rate:.1}/episode), in flight {}",
        eps.len(),
        s["faults_in_flight_at_end"]
    );
    assert!(reuses <= bound, "{what}: {reuses} reuses, a clean run's level is {clean_rate:.1} per episode");
    // One thread each in parent and child: at most one open fault each.
    assert!(u(&s["faults_in_flight_at_end"]) <= 2, "{what}: {s}");
    let mut cut_mid_way = false;
    for ep in eps {
        let child = u(&ep["child"]);
        // Every backend sends a fork's latency from the program that counts
        // the fork: a cut-off cannot fall between the two.
        assert!(ep["fork_latency_ns"].is_u64(), "{what}: a fork without its latency: {ep}");
        let Some(times) = t.logs.get(&child) else { continue };
        let wrote = times.iter().filter(|&&ts| ts != 0 && ts <= cut).count() as u64;
        let copies = u(&ep["child_copies"]);
        // The write under way at the cut-off may or may not have been
        // classified; the child's own pages (stack) add up to SLACK.
        assert!(
            copies + 2 >= wrote && copies <= wrote + SLACK,
            "{what}: child {child} wrote {wrote} pages by the cut-off, episode says {copies} copies: {ep}"
        );
        if ep["child_lifetime_ns"].is_null() {
            assert!(ep.get("child_exit_unseen").is_none(), "{what}: {ep}");
            cut_mid_way |= wrote > 0 && wrote < CHILD_WRITES;
        } else {
            assert_eq!(wrote, CHILD_WRITES, "{what}: child {child} exited before the cut-off: {ep}");
        }
    }
    cut_mid_way
}

#[test]
fn runs_cut_off_by_duration_or_sigint_count_nothing_after_the_cut() {
    if !need_root("runs_cut_off_by_duration_or_sigint_count_nothing_after_the_cut") {
        return;
    }
    let clean_rate = clean_reuses_per_episode();
    let mut cut_mid_way = 0;
    for i in 0..RUNS {
        cut_mid_way += check(&traced_run(Ending::Duration), clean_rate, &format!("-d run {i}")) as usize;
        cut_mid_way += check(&traced_run(Ending::Sigint), clean_rate, &format!("SIGINT run {i}")) as usize;
    }
    // The child lives through most of each round: the runs must have cut
    // some episode mid-way, or they tested nothing.
    assert!(cut_mid_way > 0, "no run ended in the middle of a child's writes");
}

#[test]
fn the_intervals_of_a_run_add_up_to_its_summary() {
    if !need_root("the_intervals_of_a_run_add_up_to_its_summary") {
        return;
    }
    let until = scratch("never");
    let mut args = vec!["--json", "-i", "2", "-d", "5", "--", WORKLOAD];
    args.extend(["--pages", "2048", "--child-writes", "500", "--parent-writes", "500", "--zero-fills", "16"]);
    args.extend(["--pause-ms", "5", "--until-file", until.to_str().unwrap()]);
    let run = run(&args, Duration::from_secs(60));
    assert!(run.status.success(), "{}", run.stderr);
    let intervals: Vec<&Value> = run.records.iter().filter(|r| r["type"] == "interval").collect();
    // Two whole intervals and the partial last one.
    assert_eq!(intervals.len(), 3, "{}", run.stdout);
    let total = |records: &[&Value], key: &str| -> u64 {
        records.iter().flat_map(|r| r["processes"].as_array().unwrap()).map(|p| u(&p[key])).sum()
    };
    let summary = run.summary();
    for key in ["cow_copies", "cow_reuses", "zero_fills", "forks"] {
        let whole = total(&[summary], key);
        assert_eq!(total(&intervals, key), whole, "{key}: intervals vs summary");
        eprintln!("{key}: intervals add up to the summary's {whole}");
    }
    // The workload's own zero-fills, and forks that went on all along.
    assert!(total(&[summary], "zero_fills") >= 16 && total(&[summary], "forks") > 2, "{summary}");
    // The command did not outlive the run.
    assert_eq!(summary["command_signal"], "SIGTERM", "{summary}");
    assert_eq!(summary["command_ended_by_cow_trace"], true, "{summary}");
}

/// The launched command's PID, from the start record.
fn launched_pid(run: &Run) -> u32 {
    let start = run.records.iter().find(|r| r["type"] == "start").expect("start record");
    let pids = start["pids"].as_array().expect("start names the traced PIDs");
    assert_eq!(pids.len(), 1, "{start}");
    u(&pids[0]) as u32
}

/// Whether `pid` is a `sleep` still around (running or unreaped).
fn sleep_left(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
}

#[test]
fn a_launched_command_is_ended_with_the_run_by_duration_or_signal() {
    if !need_root("a_launched_command_is_ended_with_the_run_by_duration_or_signal") {
        return;
    }
    let timed = run(&["--json", "-d", "1", "--", "sleep", "30"], Duration::from_secs(60));
    assert!(timed.status.success(), "{}", timed.stderr);
    assert!(!sleep_left(launched_pid(&timed)), "sleep outlived cow-trace -d 1");
    let s = timed.summary();
    assert_eq!((s["ended_by"].as_str(), s["command_signal"].as_str()), (Some("duration"), Some("SIGTERM")));
    assert_eq!(s["command_exit_code"], 128 + libc::SIGTERM);
    assert!(timed.stderr.contains("command killed by SIGTERM"), "{}", timed.stderr);

    let mut bg = Background::start(&["--json", "--", "sleep", "30"]);
    bg.wait_attached();
    bg.signal(libc::SIGINT);
    let signalled = bg.finish(Duration::from_secs(60));
    assert!(signalled.status.success(), "{}", signalled.stderr);
    assert!(!sleep_left(launched_pid(&signalled)), "sleep outlived cow-trace after SIGINT");
    let s = signalled.summary();
    assert_eq!(s["ended_by"], "signal SIGINT");
    // sleep dies of the SIGINT forwarded to it, or of the SIGKILL that
    // follows if it ignores it; either way the summary says which.
    assert!(["SIGINT", "SIGKILL"].contains(&s["command_signal"].as_str().unwrap_or("")), "{s}");
    assert_eq!(s["command_ended_by_cow_trace"], true);
}
