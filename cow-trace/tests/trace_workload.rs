//! Integration tests: the real BPF programs on this machine's kernel,
//! tracing a workload whose copy-on-write cost is known by construction
//! (it wrote K pages in the child and M in the parent, so K and M copies).
//! They need root; see `common::need_root`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The checks every mode shares (see `common::workload::check_summary`),
/// given the summary and the workload report.
fn assert_ground_truth(summary: &Value, report: &Value, spec: &Spec, timing: Timing) {
    ok(workload::check_summary(summary, report, spec, timing));
}

#[test]
fn launch_mode_counts_the_pages_the_workload_wrote() {
    if !need_root("launch_mode_counts_the_pages_the_workload_wrote") {
        return;
    }
    let r = run_launched(&["--json"], &WITH_ZERO_FILLS);
    assert_eq!(r.records[0]["type"], "start");
    assert_eq!(r.records[0]["backend"], "tracepoint");
    let s = r.summary();
    assert_eq!(s["ended_by"], "command exited");
    assert_eq!(s["command_exit_code"], 0);
    // Zero-page faults are told apart from copies, and not counted as such.
    assert_ground_truth(s, r.workload(), &WITH_ZERO_FILLS, Timing::Sampled);
    // Thousands of outcomes went in batches, and a sample of them was timed.
    if let Err(e) = workload::check_batched_and_sampled(s) {
        panic!("{e}\nsummary: {s}");
    }
}

#[test]
fn copies_made_in_kernel_mode_are_counted_in_the_process_that_made_the_call() {
    if !need_root("copies_made_in_kernel_mode_are_counted_in_the_process_that_made_the_call") {
        return;
    }
    let r = run_launched(&["--json", "--top", "0"], &KERNEL_WRITES);
    assert_eq!(r.records[0]["backend"], "tracepoint");
    // The child's pread(2) copies count as its own (the kernel's write
    // fault in copy_to_user); its /proc/self/mem writes take no fault and
    // are not seen here: the check expects K + R copies, not K + R + W.
    assert_ground_truth(r.summary(), r.workload(), &KERNEL_WRITES, Timing::Sampled);
    // And they are named by their system call: R pages by pread64, the
    // kernel's writes on the process's behalf, not a user instruction.
    let ep = r.records.iter().find(|v| v["type"] == "episode").expect("an episode");
    let by_pread: u64 = ep["top_writers"]
        .as_array()
        .expect("top_writers")
        .iter()
        .filter(|w| w["function"] == "pread64" && w["module"] == "[kernel]")
        .map(|w| u(&w["pages"]))
        .sum();
    assert_eq!(by_pread, KERNEL_WRITES.child_reads, "{ep:#}");
}

#[test]
fn pid_mode_attaches_to_a_running_process_and_follows_its_child() {
    if !need_root("pid_mode_attaches_to_a_running_process_and_follows_its_child") {
        return;
    }
    let w = HeldWorkload::start(&STANDARD);
    let mut t = Background::start(&["--json", "--sample-every", "1", "-p", &w.pid.to_string()]);
    t.wait_attached();
    w.go();
    let report = w.finish();
    // The run ends by itself once the workload and its child are gone.
    let r = t.finish(Duration::from_secs(60));
    assert!(r.status.success(), "{}", r.stderr);
    let s = r.summary();
    assert_eq!(s["ended_by"], "targets exited");
    assert_ground_truth(s, &report, &STANDARD, Timing::EveryCopy);
    // Nothing but the workload and its child was traced.
    assert_eq!(s["processes"].as_array().unwrap().len(), 2, "{s}");
}

#[test]
fn no_follow_traces_the_parent_only() {
    if !need_root("no_follow_traces_the_parent_only") {
        return;
    }
    let w = HeldWorkload::start(&STANDARD);
    let mut t = Background::start(&["--json", "--no-follow", "-p", &w.pid.to_string()]);
    t.wait_attached();
    w.go();
    let report = w.finish();
    let r = t.finish(Duration::from_secs(60));
    let s = r.summary();
    let parent = row(s, u(&report["pid"])).expect("parent row");
    assert_eq!(u(&parent["forks"]), 1);
    let pc = u(&parent["cow_copies"]);
    assert!(workload::copies_ok(pc, STANDARD.parent_writes), "parent copied {pc}");
    // The child is known (it was forked) but its faults were not traced.
    let child = row(s, u(&report["children"][0]));
    assert!(child.is_none_or(|c| u(&c["cow_copies"]) == 0), "{child:?}");
}

#[test]
fn system_wide_mode_sees_the_workload_among_everything_else() {
    if !need_root("system_wide_mode_sees_the_workload_among_everything_else") {
        return;
    }
    let mut t = Background::start(&["--json", "-d", "120"]);
    t.wait_attached();
    let w = HeldWorkload::start(&STANDARD);
    w.go();
    let report = w.finish();
    std::thread::sleep(Duration::from_millis(300));
    t.signal(libc::SIGINT);
    let r = t.finish(Duration::from_secs(60));
    assert!(r.status.success(), "{}", r.stderr);
    let s = r.summary();
    assert_eq!(s["ended_by"], "signal SIGINT");
    assert_ground_truth(s, &report, &STANDARD, Timing::Sampled);
    // cow-trace never traces itself.
    assert!(row(s, r.child_pid as u64).is_none(), "cow-trace traced itself");
}

#[test]
fn interval_mode_reports_each_interval_then_the_summary() {
    if !need_root("interval_mode_reports_each_interval_then_the_summary") {
        return;
    }
    let script = format!("{WORKLOAD} {}; sleep 2.5", STANDARD.args().join(" "));
    let r = run(&["--json", "-i", "1", "--", "sh", "-c", &script], Duration::from_secs(120));
    assert!(r.status.success(), "{}", r.stderr);
    let intervals: Vec<_> = r.records.iter().filter(|x| x["type"] == "interval").collect();
    assert!(intervals.len() >= 2, "expected >= 2 intervals, got {}", intervals.len());
    let report = r.workload();
    let child = u(&report["children"][0]);
    let in_intervals: u64 = intervals.iter().filter_map(|i| row(i, child)).map(|p| u(&p["cow_copies"])).sum();
    let total = u(&row(r.summary(), child).expect("child row")["cow_copies"]);
    // Each copy is reported in exactly one interval. The workload is done
    // well inside the first second and the command lives 2.5 s more, so
    // every copy falls in an interval that was printed.
    assert_eq!(in_intervals, total, "copies in intervals vs the summary");
    assert!(total >= STANDARD.child_writes);
    assert!(intervals.iter().all(|i| i["dropped_events"] == 0));
}

#[test]
fn launched_command_exit_status_is_reported_and_returned() {
    if !need_root("launched_command_exit_status_is_reported_and_returned") {
        return;
    }
    let r = run(&["--", "sh", "-c", "exit 3"], Duration::from_secs(60));
    assert_eq!(r.status.code(), Some(3), "{}", r.stderr);
    // Status lines on stderr, the report alone on stdout.
    assert!(r.stderr.contains("cow-trace: command exited with status 3"), "{}", r.stderr);
    assert!(r.stderr.contains("cow-trace: backend tracepoint: "), "{}", r.stderr);
    assert!(r.stderr.contains("cow-trace: tracing command sh (PID "), "{}", r.stderr);
    assert!(r.stdout.contains("=== summary"));
    assert!(!r.stdout.contains("cow-trace:"), "{}", r.stdout);
}

#[test]
fn every_ending_gives_a_summary_and_leaves_no_program_map_or_link() {
    if !need_root("every_ending_gives_a_summary_and_leaves_no_program_map_or_link") {
        return;
    }
    let mut sleeper = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let long = sleeper.id().to_string();
    let short_pid = "a target that ends by itself";
    // Arguments, the signal that ends the run if any, and the ending told.
    type Ending<'a> = (&'a [&'a str], Option<(i32, &'a str)>, &'a str);
    let endings: [Ending; 6] = [
        (&["-p", &long], Some((libc::SIGTERM, "SIGTERM")), "signal SIGTERM"),
        (&["-p", &long], Some((libc::SIGHUP, "SIGHUP")), "signal SIGHUP"),
        (&["-p", &long], Some((libc::SIGINT, "SIGINT")), "signal SIGINT"),
        (&["-p", &long, "-d", "1"], None, "duration"),
        (&["-p", short_pid], None, "targets exited"),
        (&["--", "sleep", "1"], None, "command exited"),
    ];
    for (args, sig, ended_by) in endings {
        // Alive until cow-trace is attached, however long that takes; then
        // ended (for the run that traces it) or left to its sleep.
        let mut short = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        let short_id = short.id().to_string();
        let args: Vec<&str> =
            args.iter().map(|&a| if a == short_pid { short_id.as_str() } else { a }).collect();
        let mut t = Background::start(&args);
        t.wait_attached();
        // Other tests run cow-trace in parallel: look only at this one's.
        let held = bpf_objects_held_by(t.child.id());
        let progs = &held[0].1;
        // 5 raw tracepoints + enter/exit for each clone-family syscall.
        assert!(progs.len() >= 7, "expected cow-trace's programs to be loaded: {held:?}");
        assert!(progs.is_subset(&bpf_prog_ids()), "bpftool does not list {progs:?}");
        assert!(!held[1].1.is_empty() && !held[2].1.is_empty(), "maps and links held: {held:?}");
        if let Some((sig, _)) = sig {
            t.signal(sig);
        }
        short.kill().unwrap();
        short.wait().unwrap();
        let r = t.finish(Duration::from_secs(30));
        assert!(r.status.success(), "{ended_by}: {}", r.stderr);
        assert!(r.stdout.contains(&format!("ended by {ended_by} ===")), "{ended_by}: {}", r.stdout);
        assert_released(&held, ended_by);
    }
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// The tracepoint backend times a fork from its system call's entry to the
/// new process (`sched_process_fork`): every fork the workload made is timed
/// within the time the workload itself measured around the call, which a
/// start left by its earlier thread creation or refused clone would
/// exceed; and no process is timed more often than it forked.
#[test]
fn tracepoint_backend_times_each_fork_within_its_call() {
    if !need_root("tracepoint_backend_times_each_fork_within_its_call") {
        return;
    }
    const FORKS: usize = 20;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/forks.py");
    let n = FORKS.to_string();
    let r =
        run(&["--json", "--backend", "tracepoint", "--", "python3", script, &n], Duration::from_secs(120));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let s = r.summary();
    assert_eq!(s["backend"], "tracepoint");
    let report = r.others.iter().find(|v| v.get("forks").is_some()).expect("workload report");
    let forks = report["forks"].as_array().unwrap();
    assert_eq!(forks.len(), FORKS);
    let eps = s["episodes"].as_array().unwrap();
    for f in forks {
        let child = u(&f["child"]);
        let ep = eps.iter().find(|e| u(&e["child"]) == child).unwrap_or_else(|| panic!("no episode for {f}"));
        let latency = u(&ep["fork_latency_ns"]);
        let call = u(&f["after_ns"]) - u(&f["before_ns"]);
        assert!(
            latency > 0 && latency <= call,
            "fork of {child}: {latency} ns timed, {call} ns around the call"
        );
    }
    for p in s["processes"].as_array().unwrap() {
        assert_eq!(u(&p["fork_latency_ns"]["count"]), u(&p["forks"]), "{p}");
    }
}
