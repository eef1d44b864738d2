//! Bad input: each case ends with a non-zero exit and an error that names
//! the problem, before anything is loaded into the kernel.

mod common;

use std::time::Duration;

use common::*;

/// Our own errors are exactly one line: `cow-trace: error: ...`.
fn one_line_error(args: &[&str]) -> String {
    let r = run(args, Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(1), "{args:?}: {}", r.stderr);
    let lines: Vec<_> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{}", r.stderr);
    assert!(lines[0].starts_with("cow-trace: error: "), "{}", lines[0]);
    assert!(r.stdout.is_empty(), "nothing on stdout on error: {}", r.stdout);
    lines[0].to_string()
}

/// Argument errors: exit 2 (the usage-error convention), one line.
fn usage_error(args: &[&str]) -> String {
    let r = run(args, Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(2), "{args:?}: {}", r.stderr);
    let lines: Vec<_> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{}", r.stderr);
    assert!(lines[0].starts_with("cow-trace: error: "), "{}", lines[0]);
    assert!(r.stdout.is_empty(), "nothing on stdout on error: {}", r.stdout);
    lines[0].to_string()
}

#[test]
fn malformed_arguments_are_refused_by_the_parser() {
    for (args, needle) in [
        (&["-p", "abc"][..], "'abc' is not a PID"),
        (&["-p", "-5"], "-5 is not a valid PID"),
        (&["-p", "0"], "0 is not a valid PID"),
        (&["-p", "99999999"], "99999999 is not a valid PID"),
        (&["-i", "0"], "an interval of 0 s is out of range"),
        (&["-d", "100000000"], "a duration of 100000000 s is out of range"),
        (&["-i", "soon"], "'soon' is not a number of seconds"),
        (&["--ring-buffer-size", "3M"], "not a power of two"),
        (&["--backend", "magic"], "invalid value 'magic'"),
        (&["--no-such-option"], "unexpected argument '--no-such-option'"),
        // A user to run nothing as.
        (&["-u", "nobody"], "-u/--user runs a launched command as USER"),
        (&["--user", "nobody", "-p", "1"], "-u/--user runs a launched command as USER"),
    ] {
        let first = usage_error(args);
        assert!(first.contains(needle), "{args:?}: {first}");
    }
}

#[test]
fn conflicting_options_are_refused() {
    // These are checked before privileges, so they hold for any user.
    // Usage errors, like the parser's: exit 2.
    assert!(usage_error(&["-p", "1", "--", "true"]).contains("use either -p PID or -- COMMAND, not both"));
    assert!(usage_error(&["--no-follow"]).contains("--no-follow needs -p PID or a command"));
    assert!(usage_error(&["--", ""]).contains("the command after `--` is empty"));
    // Not the whole system: a user who typed `--` meant to launch something.
    assert!(usage_error(&["--"]).contains("nothing follows `--`"));
    assert!(usage_error(&["--json", "--"]).contains("nothing follows `--`"));
    let e = one_line_error(&["-u", "no-such-user-xyz", "--", "true"]);
    assert!(e.ends_with("no such user: no-such-user-xyz (see `getent passwd`)"), "{e}");
}

#[test]
fn unknown_kernel_and_thread_pids_are_refused() {
    if !need_root("unknown_kernel_and_thread_pids_are_refused") {
        return;
    }
    let e = one_line_error(&["-p", "4194304"]);
    assert!(e.contains("no process with PID 4194304"), "{e}");
    // One good PID does not excuse a bad one.
    let e = one_line_error(&["-p", "1", "-p", "4194303"]);
    assert!(e.contains("no process with PID 4194303"), "{e}");

    let kthreadd = std::fs::read_to_string("/proc/2/status").unwrap_or_default();
    if kthreadd.contains("Name:\tkthreadd") {
        let e = one_line_error(&["-p", "2"]);
        assert!(e.contains("PID 2 (kthreadd) is a kernel thread"), "{e}");
    } else {
        eprintln!("note: PID 2 is not kthreadd here; kernel-thread case checked in unit tests only");
    }

    // The thread lives until the tool has answered, however long it takes.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap();
    let e = one_line_error(&["-p", &tid.to_string()]);
    drop(done_tx);
    h.join().unwrap();
    assert!(e.contains(&format!("PID {tid} is a thread of process {}", std::process::id())), "{e}");
}

#[test]
fn commands_that_cannot_run_are_refused_before_loading() {
    if !need_root("commands_that_cannot_run_are_refused_before_loading") {
        return;
    }
    let e = one_line_error(&["--", "/no/such/program"]);
    assert!(e.ends_with("cannot run /no/such/program: no such file"), "{e}");
    let e = one_line_error(&["--", "no-such-program-anywhere"]);
    assert!(e.ends_with("command not found: no-such-program-anywhere (not in PATH)"), "{e}");
}

#[test]
fn unprivileged_users_are_told_what_is_needed() {
    if !need_root("unprivileged_users_are_told_what_is_needed (needs root to drop to nobody)") {
        return;
    }
    // Drop to nobody with no capabilities, as an ordinary user would run it.
    let r = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(COW_TRACE)
        .args(["-p", "1"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("insufficient privileges"), "{stderr}");
    assert!(stderr.contains("CAP_BPF and CAP_PERFMON"), "{stderr}");
    assert!(stderr.contains("sudo"), "{stderr}");
}

#[test]
fn capabilities_without_root_are_enough_and_a_closed_tracefs_is_named() {
    if !need_root(
        "capabilities_without_root_are_enough_and_a_closed_tracefs_is_named (needs root to drop to nobody)",
    ) {
        return;
    }
    // Have tracefs mounted, as cow-trace run as root would leave it.
    let tracing = std::path::Path::new("/sys/kernel/tracing");
    if !tracing.join("events").is_dir() {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount tracefs for this test");
    }
    // User nobody with exactly the capabilities named.
    let as_nobody_with = |caps: &str| {
        let set = format!("-all,{caps}");
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .args([COW_TRACE, "--json", "-d", "1"])
            .output()
            .expect("setpriv (util-linux)")
    };
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(tracing).unwrap().permissions().mode();
    if mode & 0o005 == 0 {
        let r = as_nobody_with("+bpf,+perfmon");
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("cannot read tracefs at /sys/kernel/tracing"), "{stderr}");
        assert!(stderr.contains("CAP_DAC_READ_SEARCH"), "{stderr}");
    } else {
        eprintln!(
            "note: tracefs is mode {mode:o} here, readable by all: the closed-tracefs case is not exercised"
        );
    }
    let r = as_nobody_with("+bpf,+perfmon,+dac_read_search");
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary = Run::from_output(0, r.status, stdout.to_string(), String::new());
    assert_eq!(summary.summary()["ended_by"], "duration");
}

#[test]
fn an_unwritable_report_file_is_refused_before_loading() {
    if !need_root("an_unwritable_report_file_is_refused_before_loading") {
        return;
    }
    let e = one_line_error(&["-o", "/nonexistent-dir/report.json", "-p", "1"]);
    assert!(e.contains("cannot write the report to /nonexistent-dir/report.json"), "{e}");
}

#[test]
fn the_report_goes_to_the_output_file_and_the_commands_own_output_stays_apart() {
    if !need_root("the_report_goes_to_the_output_file_and_the_commands_own_output_stays_apart") {
        return;
    }
    let file = std::env::temp_dir().join(format!("cow-trace-report-{}.json", std::process::id()));
    let r = run(
        &["--json", "-o", file.to_str().unwrap(), "--", "sh", "-c", "echo from-the-command"],
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(r.stdout, "from-the-command\n");
    let report = std::fs::read_to_string(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let types: Vec<String> = report
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("only JSON records")["type"].to_string())
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("\"start\""), "{report}");
    assert_eq!(types.last().map(String::as_str), Some("\"summary\""), "{report}");
}
