//! A reader that goes away (`cow-trace -i 1 | head -3`) ends the run
//! quietly with status 0, as it does for other command-line tools, and
//! leaves nothing loaded in the kernel.

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    process::Stdio,
    time::Duration,
};

use common::*;

#[test]
fn a_closed_pipe_ends_the_run_quietly_and_detaches_everything() {
    if !need_root("a_closed_pipe_ends_the_run_quietly_and_detaches_everything") {
        return;
    }
    // -d bounds the run should the closed pipe go unnoticed; the wait below
    // is shorter, so only the pipe can end it in time.
    let mut child = cow_trace()
        .args(["-i", "1", "-d", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cow-trace");
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    // What `head -3` reads before it exits.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    for _ in 0..3 {
        out.read_line(&mut first).unwrap();
    }
    // The report alone is on stdout (live episodes, intervals), the status
    // lines on stderr; the report starts once the programs are attached.
    assert!(first.lines().count() == 3 && !first.contains("cow-trace:"), "{first}");
    let held = bpf_objects_held_by(child.id());
    assert!(held.iter().all(|(_, ids)| !ids.is_empty()), "{held:?}");
    drop(out);
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.starts_with("cow-trace: backend "), "{stderr}");
    assert!(!stderr.contains("error") && !stderr.contains("pipe"), "not quiet: {stderr}");
    assert_released(&held, "closed pipe");
}

#[test]
fn a_closed_pipe_ends_the_launched_command_too() {
    if !need_root("a_closed_pipe_ends_the_launched_command_too") {
        return;
    }
    // `cow-trace --json -i 1 -- sleep 600 | head -2`: the run fails on its
    // next write, and the command it started must not run on, untraced.
    let mut child = cow_trace()
        .args(["--json", "-i", "1", "--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cow-trace");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut start = String::new();
    out.read_line(&mut start).unwrap();
    let start: serde_json::Value = serde_json::from_str(&start).expect("start record");
    let sleep = u(&start["pids"][0]);
    // The first interval comes a second after the command was let go.
    let mut interval = String::new();
    out.read_line(&mut interval).unwrap();
    assert!(std::fs::read_to_string(format!("/proc/{sleep}/cmdline")).unwrap().starts_with("sleep"));
    drop(out);
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    // Ended and reaped: no process (not even a zombie) left under its PID
    // that is still the command.
    let left = std::fs::read_to_string(format!("/proc/{sleep}/cmdline")).unwrap_or_default();
    assert!(!left.starts_with("sleep"), "the launched command outlived its run: {left:?}");
}
