//! How children end, against ground truth: an exit status and a signal
//! the workload chose, and a child the kernel's OOM killer kills in a
//! memory cgroup whose limit its copies outgrow. Need root; the OOM test
//! also needs a memory cgroup controller (v1 or v2) and skips loudly
//! without one.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use common::*;
use serde_json::Value;

fn only_episode(r: &Run) -> Value {
    let eps: Vec<_> = r.records.iter().filter(|v| v["type"] == "episode").cloned().collect();
    assert_eq!(eps.len(), 1, "{}", r.stdout);
    eps[0].clone()
}

/// Runs the workload (one small round) with `extra` options under cow-trace.
fn run_small(extra: &[&str]) -> Run {
    let mut args =
        vec!["--json", "--", WORKLOAD, "--pages", "256", "--child-writes", "64", "--parent-writes", "32"];
    args.extend(extra);
    let r = run(&args, Duration::from_secs(60));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    r
}

#[test]
fn exit_status_and_signal_are_reported() {
    if !need_root("exit_status_and_signal_are_reported") {
        return;
    }
    let r = run_small(&["--child-exit", "3"]);
    let report = r.workload();
    // Ground truth: the status the workload's waitpid saw.
    assert_eq!(u(&report["statuses"][0]), 3 << 8);
    let child = u(&report["children"][0]);
    let e = only_episode(&r);
    assert_eq!((e["exit_code"].as_i64(), e["oom_killed"].as_bool()), (Some(3), Some(false)), "{e}");
    assert!(e.get("exit_signal").is_none(), "{e}");
    let p = row(r.summary(), child).unwrap();
    assert_eq!((p["exit_code"].as_i64(), p["exit_status"].as_i64()), (Some(3), Some(3 << 8)), "{p}");

    let r = run_small(&["--child-signal", "9"]);
    let report = r.workload();
    assert_eq!(u(&report["statuses"][0]), 9);
    let child = u(&report["children"][0]);
    let e = only_episode(&r);
    assert_eq!((e["exit_signal"].as_str(), e["oom_killed"].as_bool()), (Some("SIGKILL"), Some(false)), "{e}");
    assert!(e.get("exit_code").is_none(), "{e}");
    let p = row(r.summary(), child).unwrap();
    assert_eq!(p["exit_signal"], "SIGKILL", "{p}");
    // Killed by a signal the workload sent, not by a failed fault.
    assert_eq!(u(&p["cow_failed"]), 0, "{p}");
}

/// A memory cgroup made for the test, removed when dropped.
struct MemCgroup {
    dir: PathBuf,
    /// Path inside its hierarchy, as /proc/PID/cgroup names it.
    path: String,
    v2: bool,
}

impl MemCgroup {
    /// In cgroup v1's memory hierarchy if mounted, else in cgroup v2 with
    /// the memory controller; `None` when neither is there.
    fn create(limit: u64) -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = |want: &dyn Fn(&str, &str) -> bool| {
            mountinfo.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut r = right.split_whitespace();
                let (fstype, superopts) = (r.next()?, r.nth(1).unwrap_or(""));
                want(fstype, superopts).then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
            })
        };
        let v1 = mount(&|t, o| t == "cgroup" && o.split(',').any(|c| c == "memory"));
        let v2 = mount(&|t, _| t == "cgroup2").filter(|root| {
            fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| c.contains("memory"))
        });
        let (root, v2) = match (v1, v2) {
            (Some(r), _) => (r, false),
            (None, Some(r)) => {
                // Children of the root get memory.max only when it hands
                // the controller down.
                let _ = fs::write(r.join("cgroup.subtree_control"), "+memory");
                (r, true)
            }
            (None, None) => return None,
        };
        let name = format!("cow-trace-test-{}", std::process::id());
        let dir = root.join(&name);
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap();
        let cg = MemCgroup { dir, path: format!("/{name}"), v2 };
        let write = |file: &str, v: &str| fs::write(cg.dir.join(file), v).map_err(|e| format!("{file}: {e}"));
        let limit = limit.to_string();
        if v2 {
            write("memory.max", &limit).unwrap();
            // No swap: the limit is on memory alone.
            if cg.dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0").unwrap();
            }
        } else {
            write("memory.limit_in_bytes", &limit).unwrap();
            if cg.dir.join("memory.memsw.limit_in_bytes").exists() {
                write("memory.memsw.limit_in_bytes", &limit).unwrap();
            }
        }
        Some(cg)
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// Bytes charged to it now.
    fn usage(&self) -> u64 {
        let file = if self.v2 { "memory.current" } else { "memory.usage_in_bytes" };
        self.read(file).trim().parse().unwrap()
    }

    /// OOM kills in it so far (v1 memory.oom_control, v2 memory.events).
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        let text = self.read(file);
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).map_or(0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Its processes have exited; the kernel may take a moment to let go.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !Path::new(&self.dir).exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 150 * MIB;
/// The parent's buffer: 100 MiB of the 150 MiB the cgroup may hold.
const PAGES: u64 = 25_600;

#[test]
fn oom_killed_child_is_reported_with_its_cgroup_and_copies_up_to_the_limit() {
    let test = "oom_killed_child_is_reported_with_its_cgroup_and_copies_up_to_the_limit";
    if !need_root(test) {
        return;
    }
    let Some(cg) = MemCgroup::create(LIMIT) else {
        eprintln!("SKIPPED {test}: no memory cgroup controller mounted (cgroup v1 memory or v2 with memory)");
        return;
    };
    // The workload alone goes into the cgroup: the tracer's maps are
    // charged to its own.
    let procs = cg.dir.join("cgroup.procs");
    let script = format!("echo $$ > {} && exec \"$@\"", procs.display());
    let wrapper = ["sh", "-c", script.as_str(), "sh"];
    let mut sc = workload::OomScenario {
        pages: PAGES,
        limit_bytes: LIMIT,
        cgroup: cg.path.clone(),
        held_bytes: 0,
        cpus: unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) } as u64,
    };
    let args = sc.workload_args();
    let extra: Vec<&str> = args[6..].iter().map(String::as_str).collect();
    let w = HeldWorkload::start_with(&wrapper, PAGES, PAGES, 0, &extra);
    let pid = w.pid.to_string();
    // With --stacks: the copy the failed fault takes back leaves its stack.
    let mut bg = Background::start(&["--json", "--stacks", "-p", &pid]);
    bg.wait_attached();
    // What the parent holds at the fork: the rest of the limit is what the
    // child's copies can take.
    let kills_before = cg.oom_kills();
    sc.held_bytes = cg.usage();
    w.go();
    let report = w.finish();
    let r = bg.finish(Duration::from_secs(120));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    // Ground truth from the kernel.
    assert_eq!(cg.oom_kills(), kills_before + 1, "the cgroup's oom_kill count");
    let s = r.summary();
    let (copies, failed) = ok(workload::check_oom(s, &report, &sc));
    // On this kernel the victim's charge fails at once (measured with
    // ftrace: its page allocated, then freed, no retry of the fault), well
    // before the OOM reaper's 2 s delay: exactly one write fault failed.
    assert_eq!(failed, 1, "{}", r.stdout);
    ok(workload::check_nothing_lost(s));
    // The stacks, counted in the kernel, hold every copy the per-process
    // figures do, and no copy a failed fault took back (the failed fault's
    // page was allocated, so `kernel_totals.cow_copies` is one higher).
    let rows: u64 = s["processes"].as_array().unwrap().iter().map(|p| u(&p["cow_copies"])).sum();
    assert_eq!(u(&s["stacks"]["copies"]), rows, "{}", s["stacks"]);
    eprintln!(
        "OOM kill: child copied {copies} pages, {} fit under the limit; {failed} failed",
        (LIMIT - sc.held_bytes) / u(&report["page_size"])
    );
}
