//! Helpers shared by the integration tests: running the real binaries,
//! reading their JSON, and skipping loudly where root is missing.
#![allow(dead_code)]

pub mod workload;

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
#[allow(unused_imports)]
pub use workload::{Spec, Timing, KERNEL_WRITES, SLACK, STANDARD, WITH_ZERO_FILLS};

pub const COW_TRACE: &str = env!("CARGO_BIN_EXE_cow-trace");
pub const WORKLOAD: &str = env!("CARGO_BIN_EXE_cow-workload");

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// True when the test may run. Without root it prints a SKIPPED line, or
/// fails when the environment demands every test run (CI sets
/// COW_TRACE_REQUIRE_ROOT=1 through `cargo xtask test` as root).
pub fn need_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("COW_TRACE_REQUIRE_ROOT").is_some() {
        panic!("{test} needs root and COW_TRACE_REQUIRE_ROOT is set");
    }
    eprintln!("SKIPPED {test}: loads BPF programs, needs root (run `sudo -E cargo xtask test`)");
    false
}

pub fn cow_trace() -> Command {
    let mut c = Command::new(COW_TRACE);
    c.env("RUST_LOG", "warn");
    c
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not finish within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Output of a finished run, split into cow-trace's JSON records and any
/// other JSON lines (the workload shares stdout in launch mode).
pub struct Run {
    /// PID of the cow-trace process itself.
    pub child_pid: u32,
    pub status: ExitStatus,
    pub records: Vec<Value>,
    pub others: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(child_pid: u32, status: ExitStatus, stdout: String, stderr: String) -> Self {
        let mut records = Vec::new();
        let mut others = Vec::new();
        for line in stdout.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if v.get("type").is_some() {
                    records.push(v)
                } else {
                    others.push(v)
                }
            }
        }
        Run { child_pid, status, records, others, stdout, stderr }
    }

    pub fn summary(&self) -> &Value {
        self.records.iter().find(|r| r["type"] == "summary").unwrap_or_else(|| {
            panic!("no summary record\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }

    pub fn workload(&self) -> &Value {
        self.others.iter().find(|v| v.get("children").is_some()).expect("workload report")
    }
}

/// Reads a pipe to its end on a thread of its own (so that a full pipe
/// never blocks the child).
fn slurp(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        s
    })
}

/// The cow-trace arguments that launch the ground-truth workload.
pub fn launch_workload(spec: &Spec) -> Vec<String> {
    let mut v: Vec<String> = vec!["--".into(), WORKLOAD.into()];
    v.extend(spec.args());
    v
}

/// Runs `cow-trace ARGS -- WORKLOAD SPEC` to completion (two minutes at
/// most) and checks that it succeeded.
pub fn run_launched(args: &[&str], spec: &Spec) -> Run {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(launch_workload(spec));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let r = run(&all, Duration::from_secs(120));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    r
}

/// Panics with the problems `check` found.
pub fn ok<T>(check: Result<T, String>) -> T {
    check.unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `cmd` with no input and its output piped to the test.
fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// cow-trace with `args`, confined to CPU 0 (`taskset`). With a workload
/// run SCHED_FIFO on the same CPU, its reader cannot run while the workload
/// faults: the way to make ring-buffer overflow certain rather than likely.
pub fn cow_trace_on_cpu0(args: &[&str]) -> Command {
    let mut c = Command::new("taskset");
    c.env("RUST_LOG", "warn").args(["-c", "0", COW_TRACE]).args(args);
    c
}

/// The wrapper that runs a workload SCHED_FIFO on CPU 0 (see above).
pub const FIFO_ON_CPU0: [&str; 6] = ["taskset", "-c", "0", "chrt", "-f", "1"];

/// Runs cow-trace to completion with a time limit.
pub fn run(args: &[&str], limit: Duration) -> Run {
    run_command(cow_trace().args(args), limit)
}

/// Runs `cmd` (cow-trace, or a wrapper that execs it) to completion with a
/// time limit, its output piped to the test.
pub fn run_command(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = spawn_piped(cmd);
    let t_out = slurp(child.stdout.take().unwrap());
    let t_err = slurp(child.stderr.take().unwrap());
    let status = wait_timeout(&mut child, limit);
    Run::from_output(child.id(), status, t_out.join().unwrap(), t_err.join().unwrap())
}

/// A cow-trace started in the background, stopped by the test.
pub struct Background {
    pub child: Child,
    /// Output lines as they come: `(from stderr, line)`.
    lines: std::sync::mpsc::Receiver<(bool, String)>,
    collected: Vec<String>,
    collected_err: Vec<String>,
}

/// Sends each line of `r` to `tx`, tagged with `err`.
fn forward(r: impl Read + Send + 'static, err: bool, tx: std::sync::mpsc::Sender<(bool, String)>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send((err, line)).is_err() {
                break;
            }
        }
    });
}

impl Background {
    pub fn start(args: &[&str]) -> Self {
        Self::start_command(cow_trace().args(args))
    }

    /// Starts `cmd` (cow-trace, or a wrapper that execs it).
    pub fn start_command(cmd: &mut Command) -> Self {
        let mut child = spawn_piped(cmd);
        let (tx, rx) = std::sync::mpsc::channel();
        forward(child.stdout.take().unwrap(), false, tx.clone());
        forward(child.stderr.take().unwrap(), true, tx);
        Background { child, lines: rx, collected: Vec::new(), collected_err: Vec::new() }
    }

    /// Waits until the probes are attached: the JSON start record on
    /// stdout, or the text header's `tracing` line on stderr.
    pub fn wait_attached(&mut self) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok((false, line)) => {
                    self.collected.push(line);
                    return;
                }
                Ok((true, line)) => {
                    let attached = line.starts_with("cow-trace: tracing ");
                    self.collected_err.push(line);
                    if attached {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("cow-trace printed nothing: {}", self.collected_err.join("\n"));
                }
            }
        }
    }

    /// Waits until a stdout line satisfies `pred` (`what` names it, for the
    /// failure); the lines read meanwhile are kept for `finish`.
    pub fn wait_for_stdout(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok((false, line)) => {
                    let found = pred(&line);
                    self.collected.push(line);
                    if found {
                        return;
                    }
                }
                Ok((true, line)) => self.collected_err.push(line),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("cow-trace never printed {what}: {}", self.collected_err.join("\n"));
                }
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn finish(mut self, limit: Duration) -> Run {
        let status = wait_timeout(&mut self.child, limit);
        while let Ok((err, l)) = self.lines.recv_timeout(Duration::from_secs(5)) {
            match err {
                true => self.collected_err.push(l),
                false => self.collected.push(l),
            }
        }
        let stderr = self.collected_err.join("\n") + "\n";
        Run::from_output(self.child.id(), status, self.collected.join("\n") + "\n", stderr)
    }
}

/// A test that fails before `finish` must not leave its tracer running.
impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The process row for `pid` in a summary or interval record.
pub fn row(record: &Value, pid: u64) -> Option<&Value> {
    record["processes"].as_array()?.iter().find(|p| p["pid"] == pid)
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A workload started directly, held before its fork until `go()`.
pub struct HeldWorkload {
    pub child: Child,
    pub pid: u32,
    go_file: PathBuf,
}

impl HeldWorkload {
    /// The workload of `spec` (its zero-fills aside).
    pub fn start(spec: &Spec) -> Self {
        Self::start_wrapped(&[], spec.pages, spec.child_writes, spec.parent_writes)
    }

    /// The same, run through `wrapper` (a command that execs the rest, like
    /// `taskset -c 0`), so that the reported PID is the workload's own.
    pub fn start_wrapped(wrapper: &[&str], pages: u64, child_writes: u64, parent_writes: u64) -> Self {
        Self::start_with(wrapper, pages, child_writes, parent_writes, &[])
    }

    /// The same, with more workload options (`extra`).
    pub fn start_with(
        wrapper: &[&str],
        pages: u64,
        child_writes: u64,
        parent_writes: u64,
        extra: &[&str],
    ) -> Self {
        let go_file =
            std::env::temp_dir().join(format!("cow-trace-go-{}-{}", std::process::id(), rand_suffix()));
        let _ = std::fs::remove_file(&go_file);
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(WORKLOAD);
                c
            }
            None => Command::new(WORKLOAD),
        };
        let mut child = cmd
            .args(["--pages", &pages.to_string()])
            .args(["--child-writes", &child_writes.to_string()])
            .args(["--parent-writes", &parent_writes.to_string()])
            .args(extra)
            .arg("--go-file")
            .arg(&go_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn workload");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid = line.trim().strip_prefix("ready ").expect("ready line").parse().unwrap();
        child.stdout = Some(out.into_inner());
        HeldWorkload { child, pid, go_file }
    }

    pub fn go(&self) {
        std::fs::write(&self.go_file, b"").unwrap();
    }

    /// Waits for the workload and returns its report.
    pub fn finish(mut self) -> Value {
        let mut s = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        assert!(status.success(), "workload failed: {status}");
        let _ = std::fs::remove_file(&self.go_file);
        serde_json::from_str(s.trim()).expect("workload JSON")
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// IDs of the BPF programs loaded right now, from bpftool (the peer a user
/// would check with).
pub fn bpf_prog_ids() -> std::collections::BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool is needed for this test (apt-get install bpftool)");
    assert!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().unwrap().iter().map(|p| u(&p["id"])).collect()
}

/// IDs of the BPF objects of one kind (`prog`, `map` or `link`) the kernel
/// has right now, from bpftool.
pub fn bpf_object_ids(kind: &str) -> std::collections::BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", kind, "show"])
        .output()
        .expect("bpftool is needed for this test (apt-get install bpftool)");
    assert!(out.status.success(), "bpftool {kind} show: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array().map(|a| a.iter().map(|o| u(&o["id"])).collect()).unwrap_or_default()
}

/// IDs of the BPF objects of each kind (`prog`, `map`, `link`) a process
/// holds open, from its fdinfo.
pub fn bpf_objects_held_by(pid: u32) -> Vec<(&'static str, std::collections::BTreeSet<u64>)> {
    let mut held: Vec<(&str, std::collections::BTreeSet<u64>)> =
        vec![("prog", Default::default()), ("map", Default::default()), ("link", Default::default())];
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo").flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        // A link's fdinfo names its program too: classify by the object's
        // own first id line.
        let key = if info.contains("link_type:") {
            "link_id:"
        } else if info.contains("map_type:") {
            "map_id:"
        } else {
            "prog_id:"
        };
        let Some(id) = info.lines().find_map(|l| l.strip_prefix(key)) else { continue };
        let slot = &mut held.iter_mut().find(|(k, _)| key.starts_with(k)).expect("known kind").1;
        slot.insert(id.trim().parse().unwrap());
    }
    held
}

/// Waits until none of `held` is known to the kernel any more (freeing can
/// lag the process exit by an RCU grace period).
pub fn assert_released(held: &[(&'static str, std::collections::BTreeSet<u64>)], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (kind, ids) in held {
        loop {
            let left: Vec<_> = ids.intersection(&bpf_object_ids(kind)).copied().collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: {kind}s left behind: {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// IDs of the BPF maps a process holds open, from its fdinfo.
pub fn map_ids_held_by(pid: u32) -> std::collections::BTreeSet<u64> {
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo").flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if info.contains("map_type:") {
            for line in info.lines() {
                if let Some(id) = line.strip_prefix("map_id:") {
                    ids.insert(id.trim().parse().unwrap());
                }
            }
        }
    }
    ids
}

/// Entries in a hash map, by its name among the maps of `pid`, via bpftool.
pub fn hash_map_entries(pid: u32, name: &str) -> usize {
    for id in map_ids_held_by(pid) {
        let show =
            Command::new("bpftool").args(["-j", "map", "show", "id", &id.to_string()]).output().unwrap();
        let v: Value = serde_json::from_slice(&show.stdout).unwrap_or(Value::Null);
        if v["name"] == name {
            let dump =
                Command::new("bpftool").args(["-j", "map", "dump", "id", &id.to_string()]).output().unwrap();
            let d: Value = serde_json::from_slice(&dump.stdout).expect("bpftool map dump JSON");
            return d.as_array().map_or(0, Vec::len);
        }
    }
    panic!("process {pid} holds no map named {name}");
}

/// Resident memory and its anonymous part (the heap: what grows if state
/// leaks; the ring buffer's pages are mapped, not anonymous), in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssAnon:"))
}

/// Asserts that what the kernel counted equals what was received plus
/// what was dropped, kind by kind summed.
pub fn assert_totals_add_up(summary: &Value) {
    let (kt, seen) = (&summary["kernel_totals"], &summary["events_received"]);
    let kinds = [
        "spawns",
        "fork_latencies",
        "cow_copies",
        "cow_reuses",
        "zero_fills",
        "cow_failed",
        "huge_cows",
        "exits",
        "execs",
    ];
    let lost: u64 = kinds
        .iter()
        .map(|k| {
            let (k_n, s_n) = (u(&kt[*k]), u(&seen[*k]));
            assert!(k_n >= s_n, "{k}: received {s_n} > counted {k_n}");
            k_n - s_n
        })
        .sum();
    assert_eq!(lost, u(&summary["dropped_events"]), "kernel {kt} vs received {seen}");
}

/// Checks a CoW latency summary taken with the default sampling (see
/// `workload::check_sampled_latencies`).
pub fn assert_sampled_latencies(lat: &Value, copies: u64) {
    ok(workload::check_sampled_latencies(lat, copies))
}
