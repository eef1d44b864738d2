//! Integration tests of the tracepoint backend's per-CPU batches of fault
//! outcomes: whatever a batch still holds when it matters is not lost.
//!
//! To hold outcomes in a batch on purpose, the workload runs SCHED_FIFO on
//! CPU 1 and busy-loops after its writes (`--child-spin-ms`,
//! `--parent-spin-ms`): a task that never sleeps and that nothing can
//! preempt never leaves its CPU, so its batch is not sent. (A spin with
//! `--spin-file` makes syscalls that do not sleep on an in-memory file; if
//! one ever did, the batch would be sent early and still counted.)
//! cow-trace runs on CPU 0. They need root (see `common::need_root`) and
//! two CPUs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The workload on CPU 1, first in line there.
const FIFO_ON_CPU1: [&str; 6] = ["taskset", "-c", "1", "chrt", "-f", "99"];

/// Both tests take CPU 1 for themselves.
static CPU1: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether this process may run on CPUs 0 and 1 (the machine's CPU count
/// is not enough: a cpuset can leave either out).
fn two_cpus(test: &str) -> bool {
    // SAFETY: a zeroed cpu_set_t is valid; the kernel fills it.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) == 0
            && libc::CPU_ISSET(0, &set)
            && libc::CPU_ISSET(1, &set)
    };
    if !ok {
        eprintln!("SKIPPED {test}: needs CPUs 0 and 1, and this process may not run on both");
    }
    ok
}

/// Whether the test may run here (root, CPUs 0 and 1); if so, CPU 1 is
/// the caller's until the guard drops.
fn take_cpu1(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !need_root(test) || !two_cpus(test) {
        return None;
    }
    Some(CPU1.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A `cow-workload --spin-file`: in memory (/dev/shm) where there is one,
/// so that the spinner's reads and writes of it never wait for a disk.
/// Dropped, it releases the spinner, so that a failed test does not leave
/// a real-time task holding CPU 1 for the next one.
struct SpinFile(std::path::PathBuf);

impl SpinFile {
    fn new() -> Self {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        SpinFile(dir.join(format!("cow-trace-spin-{}", std::process::id())))
    }

    /// Sets byte 1: the spinner stops.
    fn set_released(&self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        std::fs::OpenOptions::new().write(true).open(&self.0)?.write_all_at(&[1], 1)
    }

    fn release(&self) {
        self.set_released().expect("release the spinner through the file the workload made");
    }
}

impl Drop for SpinFile {
    fn drop(&mut self) {
        let _ = self.set_released();
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn outcomes_still_batched_when_the_run_ends_are_reported() {
    let name = "outcomes_still_batched_when_the_run_ends_are_reported";
    let Some(_cpu1) = take_cpu1(name) else {
        return;
    };
    // The child copies 40 pages (fewer than a batch holds), then spins on
    // CPU 1 until told to stop, which is after the run has ended: its
    // copies stay in CPU 1's batch while the run is ended under it. The
    // spin file says when the spin has started (the bound, a minute, is
    // only a guard against a test that never says stop).
    const K: u64 = 40;
    let spin = SpinFile::new();
    let spin_args = ["--child-spin-ms", "60000", "--spin-file", spin.0.to_str().unwrap()];
    let w = HeldWorkload::start_with(&FIFO_ON_CPU1, 256, K, 0, &spin_args);
    let mut t = Background::start_command(&mut cow_trace_on_cpu0(&["--json", "-p", &w.pid.to_string()]));
    t.wait_attached();
    w.go();
    let spinning = Instant::now();
    while std::fs::read(&spin.0).unwrap().first() != Some(&1) {
        assert!(spinning.elapsed() < Duration::from_secs(60), "the child never started its spin");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.signal(libc::SIGINT);
    let r = t.finish(Duration::from_secs(30));
    // Only now may the child stop spinning and exit.
    spin.release();
    let report = w.finish();
    assert!(r.status.success(), "{}", r.stderr);
    let s = r.summary();
    let child_pid = u(&report["children"][0]);
    let child = row(s, child_pid).unwrap_or_else(|| panic!("no row for child {child_pid}: {s}"));
    // Still spinning when the run ended: it never left CPU 1 or exited, so
    // nothing sent its batch; the copies come from reading it at the end.
    assert_eq!(child["exited"], false, "{child}");
    let cc = u(&child["cow_copies"]);
    assert!((K..=K + SLACK).contains(&cc), "child copied {cc} pages, wrote {K}: {child}");
    assert_eq!(u(&child["cow_latency_ns"]["count"]), cc, "the first 64 faults of a slice are all timed");
    assert_eq!(u(&s["dropped_events"]), 0);
    assert_totals_add_up(s);
}

#[test]
fn a_parents_copies_sent_after_its_childs_exit_count_for_the_fork() {
    let name = "a_parents_copies_sent_after_its_childs_exit_count_for_the_fork";
    let Some(_cpu1) = take_cpu1(name) else {
        return;
    };
    // The child (moved to CPU 0) copies K pages and waits; the parent on
    // CPU 1 copies M, lets the child exit, and spins 300 ms before waiting
    // for it. The child's exit reaches cow-trace at once; the parent's
    // copies, made before it, only when the parent leaves CPU 1.
    const K: u64 = 100;
    const M: u64 = 40;
    let mut args = vec!["--json".to_string(), "--".to_string()];
    args.extend(FIFO_ON_CPU1.iter().map(|s| s.to_string()));
    args.push(WORKLOAD.into());
    for (flag, n) in [("--pages", 512), ("--child-writes", K), ("--parent-writes", M)] {
        args.extend([flag.to_string(), n.to_string()]);
    }
    for a in ["--child-cpu", "0", "--parent-spin-ms", "300"] {
        args.push(a.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_command(&mut cow_trace_on_cpu0(&args), Duration::from_secs(60));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let report = r.workload();
    let (parent, child) = (u(&report["pid"]), u(&report["children"][0]));
    let s = r.summary();
    let eps: Vec<&Value> =
        s["episodes"].as_array().unwrap().iter().filter(|e| u(&e["parent"]) == parent).collect();
    assert_eq!(eps.len(), 1, "{eps:?}");
    let e = eps[0];
    assert_eq!(u(&e["child"]), child);
    let (pc, cc) = (u(&e["parent_copies"]), u(&e["child_copies"]));
    assert!((K..=K + SLACK).contains(&cc), "child copied {cc} pages, wrote {K}: {e}");
    assert!((M..=M + SLACK).contains(&pc), "parent copied {pc} pages while the child lived, wrote {M}: {e}");
    // The parent row agrees: its copies are the fork's.
    let prow = row(s, parent).unwrap();
    assert!(u(&prow["cow_copies"]) >= pc, "{prow}");
    assert!(u(&e["child_lifetime_ns"]) > 0);
    assert_eq!(u(&s["dropped_events"]), 0);
    assert_totals_add_up(s);
}
