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
    assert!(first.starts_with("cow-trace: backend "), "{first}");
    // The header comes once the programs are attached.
    let held = bpf_objects_held_by(child.id());
    assert!(held.iter().all(|(_, ids)| !ids.is_empty()), "{held:?}");
    drop(out);
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error") && !stderr.contains("pipe"), "not quiet: {stderr}");
    assert_released(&held, "closed pipe");
}
