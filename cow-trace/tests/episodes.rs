//! Fork episodes on the real kernel: a workload whose fork cost is known by
//! construction, and fork-and-exec children from a shell. Need root.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn episodes(r: &Run, kind: &str) -> Vec<Value> {
    r.records.iter().filter(|v| v["type"] == "episode" && v["kind"] == kind).cloned().collect()
}

#[test]
fn workload_fork_is_one_episode_with_its_known_copies() {
    if !need_root("workload_fork_is_one_episode_with_its_known_copies") {
        return;
    }
    let r = run_launched(&["--json"], &STANDARD);
    let report = r.workload();
    let (parent, child) = (u(&report["pid"]), u(&report["children"][0]));
    let page = u(&report["page_size"]);
    let eps = episodes(&r, "fork");
    assert_eq!(eps.len(), 1, "{eps:?}");
    let e = &eps[0];
    assert_eq!((u(&e["parent"]), u(&e["child"])), (parent, child));
    let (pc, cc) = (u(&e["parent_copies"]), u(&e["child_copies"]));
    let s = r.summary();
    let prow = row(s, parent).unwrap();
    // The same fork seen by the per-process figures, with the copies each
    // side made while the other lived.
    ok(workload::check_fork_episode(s, report, &STANDARD, u(&prow["fork_latency_ns"]["max"])));
    assert_eq!(u(&e["copied_bytes"]), (pc + cc) * page);
    assert_sampled_latencies(&e["cow_latency_ns"], pc + cc);
    assert!(u(&e["peak_copy_bytes_per_s"]) > 0 && u(&e["peak_copy_bytes_per_s"]) <= (pc + cc) * page);
    assert!(u(&e["child_lifetime_ns"]) > 0);
    assert_eq!(e["exit_status"], 0);
    // The buffer is one anonymous mapping: it holds the written pages.
    let top = &e["top_regions"][0];
    assert!(top["region"].as_str().unwrap().starts_with("[anon "), "{e}");
    assert!(u(&top["bytes"]) >= (STANDARD.child_writes + STANDARD.parent_writes) * page, "{e}");
    // Listed again in the summary.
    let mut streamed = e.clone();
    streamed.as_object_mut().unwrap().remove("type");
    assert_eq!(s["episodes"].as_array().unwrap(), &vec![streamed]);
}

#[test]
fn fork_and_exec_children_read_as_such() {
    if !need_root("fork_and_exec_children_read_as_such") {
        return;
    }
    // dash forks for each command but the last, which it may exec itself.
    let r = run(
        &["--json", "--", "sh", "-c", "/bin/true; /bin/true; /bin/true; exit 0"],
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let execs = episodes(&r, "fork+exec");
    assert!(execs.len() >= 2, "{}", r.stdout);
    for e in &execs {
        assert_eq!(e["child_comm"], "true", "{e}");
        let (exec_at, lifetime) = (u(&e["exec_after_ns"]), u(&e["child_lifetime_ns"]));
        assert!(exec_at > 0 && exec_at <= lifetime, "{e}");
        // Between fork and exec a shell child touches a handful of pages.
        assert!(u(&e["parent_copies"]) + u(&e["child_copies"]) < SLACK, "{e}");
    }
    assert!(episodes(&r, "fork").is_empty(), "{}", r.stdout);
    let s = r.summary();
    assert!(u(&s["kernel_totals"]["execs"]) >= execs.len() as u64);
    assert_eq!(s["kernel_totals"]["execs"], s["events_received"]["execs"]);
}

#[test]
fn table_mode_prints_one_line_per_episode() {
    if !need_root("table_mode_prints_one_line_per_episode") {
        return;
    }
    let r = run(&["--", "sh", "-c", "/bin/true; /bin/true; exit 0"], Duration::from_secs(60));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let live: Vec<_> = r.stdout.lines().filter(|l| l.starts_with("episode: fork+exec sh[")).collect();
    assert!(!live.is_empty(), "{}", r.stdout);
    assert!(live.iter().all(|l| l.contains("-> true[") && l.contains("exec after")), "{live:?}");
    assert!(r.stdout.contains("\nfork episodes ("), "{}", r.stdout);
}

#[test]
fn a_busy_host_shows_only_the_episodes_that_matter() {
    if !need_root("a_busy_host_shows_only_the_episodes_that_matter") {
        return;
    }
    const COMMANDS: u64 = 300;
    // The default copy threshold (1 MiB) decides; a fork's time depends on
    // the machine's load (a preempted fork is slow), so that threshold is
    // set out of reach.
    let mut bg = Background::start(&["--json", "--min-episode-fork-ms", "1000000"]);
    bg.wait_attached();
    // A shell running short commands: each a cheap fork+exec.
    let mut sh = std::process::Command::new("sh")
        .args(["-c", &format!("i=0; while [ $i -lt {COMMANDS} ]; do /bin/true; i=$((i+1)); done")])
        .spawn()
        .unwrap();
    let sh_pid = sh.id() as u64;
    assert!(wait_timeout(&mut sh, Duration::from_secs(120)).success());
    // The workload's fork copies K + M pages (16 MiB): above the 1 MiB default.
    let wl = HeldWorkload::start(&STANDARD);
    wl.go();
    let report = wl.finish();
    std::thread::sleep(Duration::from_secs(2));
    bg.signal(libc::SIGTERM);
    let r = bg.finish(Duration::from_secs(60));
    assert!(r.status.success(), "{}", r.stderr);
    let live: Vec<&Value> = r.records.iter().filter(|v| v["type"] == "episode").collect();
    let shown: Vec<_> = live.iter().filter(|e| e["parent"] == sh_pid).collect();
    assert!(shown.is_empty(), "a shell's command was shown: {shown:?}");
    assert!(live.iter().any(|e| e["parent"] == report["pid"]), "the workload's fork was not shown");
    let s = r.summary();
    let listed = s["episodes"].as_array().unwrap();
    assert!(listed.iter().all(|e| e["parent"] != sh_pid));
    assert!(listed.iter().any(|e| e["parent"] == report["pid"]));
    assert!(listed.windows(2).all(|w| u(&w[0]["copied_bytes"]) >= u(&w[1]["copied_bytes"])), "not ranked");
    // Counted all the same.
    assert!(u(&s["episodes_total"]) > COMMANDS, "{}", s["episodes_total"]);
    assert!(u(&s["episodes_total"]) >= listed.len() as u64);
}
