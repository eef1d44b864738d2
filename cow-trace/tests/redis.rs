//! End to end against a real Redis: cow-trace's fork episodes for BGSAVE and
//! BGREWRITEAOF agree with the figures Redis reports about its own forks
//! (`rdb_last_cow_size`, `aof_last_cow_size`, `latest_fork_usec`), and
//! tracing a live server disturbs neither it nor its clients.
//!
//! The write load is a fixed number of writes, made while the fork's child
//! is paused (SIGSTOP), so what is copied does not depend on how fast the
//! machine runs. Redis also counts what cow-trace does not (the child's own
//! new pages, pages the parent freed): a save with no writes measures that,
//! and bounds the difference.
//!
//! Needs root, `redis-server` and `redis-tools` (redis-cli). Everything
//! runs on 127.0.0.1 in a temporary directory; about 800 MB of memory and
//! 20-40 seconds.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{u, Background};
use serde_json::Value;

/// Keys and value size for `DEBUG POPULATE`: about 375 MB of data.
const KEYS: u64 = 1_000_000;
const VALUE_SIZE: u64 = 256;
/// The write load: the first WRITES keys overwritten with values of the
/// same size, in Lua batches of WRITE_BATCH (each well inside Redis's
/// slow-script threshold): about 190 MB copied.
const WRITES: u64 = 500_000;
const WRITE_BATCH: u64 = 50_000;
/// `rdb-key-save-delay`: negative, Redis sleeps 1 us at one key in 100.
/// It only gives the test time to pause the child before the save ends.
const SAVE_DELAY: &str = "-100";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Like `need_root`, for the Redis binaries.
fn need_redis(test: &str) -> bool {
    if have("redis-server") && have("redis-cli") && have("redis-benchmark") {
        return true;
    }
    if std::env::var_os("COW_TRACE_REQUIRE_ROOT").is_some() {
        panic!("{test} needs redis-server, redis-cli and redis-benchmark (apt-get install redis-server redis-tools)");
    }
    eprintln!(
        "SKIPPED {test}: needs redis-server, redis-cli and redis-benchmark (apt-get install redis-server redis-tools)"
    );
    false
}

/// A Redis server owned by the test: shut down (without saving) and its
/// directory removed however the test ends.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("cow-trace-redis-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--protected-mode", "yes"])
            .args(["--save", "", "--appendonly", "no", "--enable-debug-command", "local"])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let r = Redis { child, port, dir };
        let start = Instant::now();
        while r.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not answer PING:\n{}",
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Starts `redis-benchmark` against the server, output piped.
    fn benchmark(&self, args: &[&str]) -> Child {
        Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-benchmark")
    }

    fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// A numeric field of `INFO <section>`.
    fn info(&self, section: &str, field: &str) -> u64 {
        let text = self.cli(&["INFO", section]);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in INFO {section}:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn wait_until_zero(&self, section: &str, fields: &[&str], limit: Duration) {
        let start = Instant::now();
        while fields.iter().any(|f| self.info(section, f) != 0) {
            assert!(start.elapsed() < limit, "{fields:?} still set after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// The PID of the newest child whose start the log announces with
    /// `what` ("Background saving started by pid 1234").
    fn last_child(&self, what: &str) -> u32 {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` in log:\n{log}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.try_cli(&["SHUTDOWN", "NOSAVE"]);
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The state letter of a process in /proc/PID/stat, None once it is gone.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Waits until `pid` is in state `want`; panics with `why` otherwise.
fn wait_state(pid: u32, want: char, why: &str) {
    let start = Instant::now();
    while state(pid) != Some(want) {
        assert!(start.elapsed() < Duration::from_secs(10), "{why}: child {pid} is in state {:?}", state(pid));
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Gives thread `tid` SCHED_FIFO (or back SCHED_OTHER): a real-time task
/// is not preempted by the machine's other work.
fn real_time(tid: u32, on: bool) {
    let (policy, prio) = if on { (libc::SCHED_FIFO, 1) } else { (libc::SCHED_OTHER, 0) };
    let param = libc::sched_param { sched_priority: prio };
    // SAFETY: a valid sched_param for the policy.
    let rc = unsafe { libc::sched_setscheduler(tid as i32, policy, &param) };
    assert_eq!(rc, 0, "sched_setscheduler({tid}): {}", std::io::Error::last_os_error());
}

/// Runs `command` (BGSAVE, BGREWRITEAOF), pauses its child at once, makes
/// `writes` writes (see WRITES), checks the child is still paused, lets it
/// finish and waits for it. Returns the child's PID.
fn fork_with_writes(redis: &Redis, command: &str, in_progress: &str, writes: u64) -> u32 {
    // Redis times its fork() from user space: preempted on a busy machine,
    // that time would include the wait. Its main thread forks real-time.
    real_time(redis.pid(), true);
    let reply = redis.cli(&[command]);
    assert!(reply.contains("started"), "{command}: {reply}");
    let children = format!("/proc/{0}/task/{0}/children", redis.pid());
    let start = Instant::now();
    let child: u32 = loop {
        let list = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = list.split_whitespace().next() {
            break pid.parse().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{command}: no child");
        std::thread::sleep(Duration::from_millis(1));
    };
    unsafe { libc::kill(child as i32, libc::SIGSTOP) };
    wait_state(child, 'T', &format!("{command}: the save ended before it could be paused"));
    real_time(redis.pid(), false);
    real_time(child, false);
    // Other clients keep being served while the server is traced and its
    // child holds memory: a bounded read-only load beside the writes. It
    // writes no key (and Redis leaves access times alone while a child
    // lives); what its connections allocate, the baseline save has too.
    let clients = redis.benchmark(&["-t", "ping,get", "-n", "100000", "-c", "8", "-P", "16", "-q"]);
    let script = "local v = string.rep('x', ARGV[3]) \
                  for i = ARGV[1], ARGV[2] - 1 do redis.call('SET', 'key:' .. i, v) end return 'OK'";
    for from in (0..writes).step_by(WRITE_BATCH as usize) {
        let to = (from + WRITE_BATCH).min(writes);
        let args = [from, to, VALUE_SIZE].map(|n| n.to_string());
        assert_eq!(redis.cli(&["EVAL", script, "0", &args[0], &args[1], &args[2]]), "OK");
    }
    let out = clients.wait_with_output().expect("redis-benchmark");
    let report = String::from_utf8_lossy(&out.stdout);
    // `-q` prints one final line per test, after progress lines ended by \r.
    let finished = |test: &str| {
        report
            .split(['\r', '\n'])
            .any(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second"))
    };
    assert!(
        out.status.success() && ["PING_INLINE", "PING_MBULK", "GET"].into_iter().all(finished),
        "{command}: the client load beside the writes failed: {:?} {report} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Every write happened while the child lived.
    assert_eq!(state(child), Some('T'), "{command}: child {child} no longer paused");
    assert_eq!(redis.info("persistence", in_progress), 1);
    unsafe { libc::kill(child as i32, libc::SIGCONT) };
    redis.wait_until_zero("persistence", &[in_progress], Duration::from_secs(60));
    child
}

fn within(ours: f64, theirs: f64, rel: f64, abs: f64) -> bool {
    (ours - theirs).abs() <= (theirs * rel).max(abs)
}

/// Redis's figures for one fork: the bytes it copied, those it copied in
/// the same fork with no writes at all, and its fork() time.
struct Figures {
    cow_size: u64,
    baseline: u64,
    fork_usec: u64,
}

/// A Redis command that forks, and where Redis reports on its fork.
struct Forking {
    command: &'static str,
    /// The `INFO persistence` field set while the child runs.
    in_progress: &'static str,
    /// The log line that names the child, up to its PID.
    started_by: &'static str,
    /// The `INFO persistence` field with the child's copy-on-write size.
    cow_size: &'static str,
}

const BGSAVE: Forking = Forking {
    command: "BGSAVE",
    in_progress: "rdb_bgsave_in_progress",
    started_by: "Background saving started by pid",
    cow_size: "rdb_last_cow_size",
};

const BGREWRITEAOF: Forking = Forking {
    command: "BGREWRITEAOF",
    in_progress: "aof_rewrite_in_progress",
    started_by: "Background append only file rewriting started by pid",
    cow_size: "aof_last_cow_size",
};

/// Runs `f` with writes while its child lives; returns the child (checked
/// against the one Redis's log names) and Redis's figures for the fork.
fn measured_fork(redis: &Redis, f: &Forking, baseline: u64) -> (u32, Figures) {
    let child = fork_with_writes(redis, f.command, f.in_progress, WRITES);
    assert_eq!(redis.last_child(f.started_by), child);
    let figures = Figures {
        cow_size: redis.info("persistence", f.cow_size),
        baseline,
        fork_usec: redis.info("stats", "latest_fork_usec"),
    };
    (child, figures)
}

/// Checks the episode of `child` against Redis's own figures.
fn check_episode(episodes: &[Value], child: u32, page_size: u64, f: &Figures, what: &str) {
    let Figures { cow_size, baseline, fork_usec } = *f;
    let ep = episodes
        .iter()
        .find(|e| e["child"] == child)
        .unwrap_or_else(|| panic!("{what}: no episode for child {child} in {episodes:?}"));
    assert_eq!(ep["kind"], "fork", "{what}: {ep}");
    assert!(ep["child_lifetime_ns"].is_u64(), "{what}: the child exited: {ep}");
    let copies = u(&ep["parent_copies"]) + u(&ep["child_copies"]);
    let copied = u(&ep["copied_bytes"]);
    assert_eq!(copied, copies * page_size, "{what}: {ep}");
    // A write load during the child's life must have cost something, or the
    // comparison below says nothing.
    assert!(cow_size >= 8 << 20, "{what}: Redis reports only {cow_size} bytes copied: was the load running?");
    // The copies dominate what Redis counts on its own, and the two figures
    // differ by no more than that.
    assert!(baseline * 20 <= cow_size, "{what}: {baseline} bytes with no writes vs {cow_size} with them");
    assert!(
        copied.abs_diff(cow_size) <= baseline,
        "{what}: episode copied {copied} bytes, Redis reports {cow_size}: further apart than the \
         {baseline} bytes Redis counts in the same fork with no writes: {ep}"
    );
    assert!(
        within(copied as f64, cow_size as f64, 0.05, 0.0),
        "{what}: episode copied {copied} bytes, Redis reports {cow_size} (more than 5% apart): {ep}"
    );
    let fork_ns = u(&ep["fork_latency_ns"]);
    assert!(
        within(fork_ns as f64, fork_usec as f64 * 1e3, 0.25, 3e6),
        "{what}: episode fork latency {fork_ns} ns, Redis reports {fork_usec} us: {ep}"
    );
    check_writers(ep, copies, what);
    eprintln!(
        "{what}: episode copied {copied} bytes (parent {} + child {} pages), Redis {cow_size} \
         ({baseline} with no writes); fork {fork_ns} ns, Redis {fork_usec} us",
        ep["parent_copies"], ep["child_copies"]
    );
}

/// The copies are named to Redis's own code, its allocator (jemalloc,
/// linked into the Debian binary) or libc: at least 95% of them to a
/// function, never a name outside those modules.
fn check_writers(ep: &Value, copies: u64, what: &str) {
    let writers = ep["top_writers"].as_array().expect("top_writers");
    let named: u64 = writers.iter().filter(|w| w["function"].is_string()).map(|w| u(&w["pages"])).sum();
    assert!(named * 100 >= copies * 95, "{what}: only {named} of {copies} copies named: {ep:#}");
    for w in writers.iter().filter(|w| w["function"].is_string()) {
        let module = w["module"].as_str().unwrap();
        let base = module.rsplit('/').next().unwrap();
        let ours = ["redis-", "libc.so", "libjemalloc", "ld-linux"].iter().any(|m| base.starts_with(m));
        assert!(ours, "{what}: writer in an unexpected module: {w}");
    }
    for w in writers.iter().take(5) {
        eprintln!(
            "{what}: writer {} ({}) {} pages ({:.1}%)",
            w["function"],
            w["module"],
            w["pages"],
            w["share"].as_f64().unwrap() * 100.0
        );
    }
}

/// Log lines written once the server was ready that are warnings (`#`) or
/// speak of errors or failures.
fn log_problems(log: &str) -> Vec<&str> {
    let ready = log.find("Ready to accept connections").expect("server became ready");
    log[ready..]
        .lines()
        .skip(1)
        .filter(|l| {
            let lower = l.to_lowercase();
            l.split_whitespace().nth(5) == Some("#") || lower.contains("error") || lower.contains("fail")
        })
        .collect()
}

#[test]
fn bgsave_and_aof_rewrite_episodes_match_redis_figures() {
    if !common::need_root("bgsave_and_aof_rewrite_episodes_match_redis_figures")
        || !need_redis("bgsave_and_aof_rewrite_episodes_match_redis_figures")
    {
        return;
    }
    let started = Instant::now();
    let redis = Redis::start();
    assert_eq!(redis.cli(&["DEBUG", "POPULATE", &KEYS.to_string(), "key", &VALUE_SIZE.to_string()]), "OK");
    assert_eq!(redis.info("stats", "total_forks"), 0);
    assert_eq!(redis.cli(&["CONFIG", "SET", "rdb-key-save-delay", SAVE_DELAY]), "OK");
    // What Redis counts in a save with no writes: the baseline, untraced.
    fork_with_writes(&redis, BGSAVE.command, BGSAVE.in_progress, 0);
    let rdb_baseline = redis.info("persistence", BGSAVE.cow_size);
    let pid = redis.pid().to_string();
    let mut trace = Background::start(&["--json", "-p", &pid]);
    trace.wait_attached();

    let (rdb_child, rdb) = measured_fork(&redis, &BGSAVE, rdb_baseline);

    // Turning the AOF on rewrites it once, with no writes: the baseline of
    // BGREWRITEAOF with writes.
    assert_eq!(redis.cli(&["CONFIG", "SET", "appendonly", "yes"]), "OK");
    redis.wait_until_zero(
        "persistence",
        &["aof_rewrite_in_progress", "aof_rewrite_scheduled"],
        Duration::from_secs(60),
    );
    let aof_baseline = redis.info("persistence", BGREWRITEAOF.cow_size);
    let (aof_child, aof) = measured_fork(&redis, &BGREWRITEAOF, aof_baseline);
    assert_eq!(redis.info("stats", "total_forks"), 4, "2 BGSAVEs, the first rewrite, BGREWRITEAOF");

    trace.signal(libc::SIGINT);
    let run = trace.finish(Duration::from_secs(30));
    assert!(run.status.success(), "cow-trace failed: {}\n{}", run.status, run.stderr);
    let page_size = u(&run.records.iter().find(|r| r["type"] == "start").expect("start record")["page_size"]);

    // Episodes are printed as their children exit, and listed again in the
    // summary.
    let streamed: Vec<Value> = run
        .records
        .iter()
        .filter(|r| r["type"] == "episode")
        .map(|r| {
            let mut e = r.clone();
            e.as_object_mut().unwrap().remove("type");
            e
        })
        .collect();
    let summary = run.summary()["episodes"].as_array().expect("summary episodes").clone();
    assert_eq!(streamed.len(), 3, "one per traced fork: {streamed:?}");
    assert_eq!(streamed, summary);
    assert!(streamed.iter().all(|e| e["parent"] == redis.pid()));

    check_episode(&streamed, rdb_child, page_size, &rdb, "BGSAVE");
    check_episode(&streamed, aof_child, page_size, &aof, "BGREWRITEAOF");

    // The traced server carried on as if untraced.
    assert_eq!(redis.cli(&["PING"]), "PONG");
    let log = redis.log();
    let problems = log_problems(&log);
    assert!(problems.is_empty(), "redis log has problems:\n{}", problems.join("\n"));
    assert_eq!(run.summary()["dropped_events"], 0);
    eprintln!("redis test took {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn log_problem_filter() {
    let log = "1:C 23 Nov 2026 08:13:26.376 # WARNING Memory overcommit must be enabled! may fail\n\
               1:M 23 Nov 2026 08:13:26.377 * Ready to accept connections\n\
               1:M 23 Nov 2026 08:13:28.001 * Background saving started by pid 7\n\
               7:C 23 Nov 2026 08:13:29.001 * Fork CoW for RDB: current 62 MB, peak 62 MB, average 31 MB\n\
               1:M 23 Nov 2026 08:13:30.001 # Background saving error\n\
               1:M 23 Nov 2026 08:13:30.002 * Write error saving DB on disk: No space left on device\n";
    let p = log_problems(log);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("Background saving error") && p[1].contains("Write error"));
}
