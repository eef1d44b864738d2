//! Backend selection on the running kernel: a backend asked for by name
//! that the kernel cannot give is a one-line error and a non-zero exit,
//! never a silent fallback; `auto` says why it passed over each backend.
//!
//! What the kernel can give is read from the kernel itself (the kprobe PMU
//! and tracefs `kprobe_events` exist exactly when CONFIG_KPROBES is set),
//! so these tests hold on kernels with and without kprobes. The kprobe and
//! fentry backends' figures are checked on a kernel that has them by
//! `cargo xtask vm-test`. About 2 s in all.

mod common;

use std::{path::Path, time::Duration};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn kernel_has_kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists()
}

fn start_record(r: &Run) -> &serde_json::Value {
    r.records
        .iter()
        .find(|v| v["type"] == "start")
        .unwrap_or_else(|| panic!("no start record\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr))
}

/// `--backend NAME -- true`: either the kernel gives NAME and the run says
/// so, or it is refused in one line before the command ever runs.
fn named_backend(name: &str) -> Result<Run, String> {
    let r = run(&["--backend", name, "--json", "--", "sh", "-c", "echo ran-the-command"], LIMIT);
    if r.status.success() {
        assert_eq!(start_record(&r)["backend"], name, "{}", r.stdout);
        assert_eq!(r.summary()["backend"], name);
        return Ok(r);
    }
    assert_eq!(r.status.code(), Some(1), "{name}: {}", r.stderr);
    let lines: Vec<_> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: expected one line, got:\n{}", r.stderr);
    assert!(
        lines[0].starts_with(&format!("cow-trace: error: backend {name} is not available on this kernel: ")),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("--backend auto"), "the error names the fix: {}", lines[0]);
    assert!(!r.stdout.contains("ran-the-command"), "the command ran without its backend");
    Err(lines[0].to_string())
}

#[test]
fn kprobe_backend_is_refused_exactly_when_the_kernel_has_no_kprobes() {
    if !need_root("kprobe_backend_is_refused_exactly_when_the_kernel_has_no_kprobes") {
        return;
    }
    match (named_backend("kprobe"), kernel_has_kprobes()) {
        (Err(e), false) => assert!(e.contains("kernel built without CONFIG_KPROBES"), "{e}"),
        (Ok(_), true) => {}
        (Err(e), true) => panic!("the kernel has kprobes, but: {e}"),
        (Ok(r), false) => panic!("no kprobes in this kernel, yet the kprobe backend ran:\n{}", r.stdout),
    }
}

#[test]
fn fentry_backend_runs_or_says_why_not() {
    if !need_root("fentry_backend_runs_or_says_why_not") {
        return;
    }
    if let Err(e) = named_backend("fentry") {
        // The two ways a kernel says no: no BTF function to bind to, or a
        // refused trampoline (with the errno).
        assert!(
            e.contains("BPF trampoline refused: E") || e.contains("not found in the kernel's BTF"),
            "{e}"
        );
    }
}

#[test]
fn auto_prints_one_line_per_rejected_backend_and_names_the_one_used() {
    if !need_root("auto_prints_one_line_per_rejected_backend_and_names_the_one_used") {
        return;
    }
    let r = run(&["--json", "--", "true"], LIMIT);
    assert!(r.status.success(), "{}", r.stderr);
    let start = start_record(&r);
    let used = start["backend"].as_str().unwrap().to_string();
    assert_eq!(r.summary()["backend"], used.as_str());
    let order = ["fentry", "kprobe", "tracepoint"];
    let pos = order.iter().position(|b| *b == used).expect("a known backend");
    let lines: Vec<_> = r.stderr.lines().filter(|l| l.starts_with("cow-trace: backend ")).collect();
    // Every backend before the one used was tried and rejected, in order,
    // each with its reason; the JSON carries the same lines.
    assert_eq!(lines.len(), pos, "{}", r.stderr);
    let rejected = start["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), pos);
    for (i, b) in order[..pos].iter().enumerate() {
        let prefix = format!("cow-trace: backend {b}: ");
        assert!(lines[i].starts_with(&prefix) && lines[i].len() > prefix.len() + 5, "{}", lines[i]);
        assert_eq!(lines[i].strip_prefix("cow-trace: backend "), rejected[i].as_str());
    }
    if !kernel_has_kprobes() {
        assert!(pos >= 2 || used == "fentry", "auto chose kprobe on a kernel without kprobes");
        if pos == 2 {
            assert_eq!(lines[1], "cow-trace: backend kprobe: kernel built without CONFIG_KPROBES");
        }
    }
}
