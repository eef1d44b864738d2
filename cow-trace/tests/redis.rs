//! End to end against a real Redis: cow-trace's fork episodes for BGSAVE and
//! BGREWRITEAOF agree with the figures Redis reports about its own forks
//! (`rdb_last_cow_size`, `aof_last_cow_size`, `latest_fork_usec`), and
//! tracing a live server disturbs neither it nor its clients.
//!
//! Needs root, `redis-server` and `redis-tools` (redis-cli,
//! redis-benchmark). Everything runs on 127.0.0.1 in a temporary directory;
//! about 400 MB of memory and 20-40 seconds.

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
/// The write load: bounded, pipelined SETs of new random keys.
const LOAD_REQUESTS: &str = "1000000";

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
        panic!("{test} needs redis-server and redis-tools (apt-get install redis-server redis-tools)");
    }
    eprintln!(
        "SKIPPED {test}: needs redis-server and redis-tools (apt-get install redis-server redis-tools)"
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

/// Runs `command` (BGSAVE, BGREWRITEAOF) while redis-benchmark writes, waits
/// for the fork's child to finish and the benchmark to complete.
fn fork_under_load(redis: &Redis, command: &str, in_progress: &str) {
    let served = redis.info("stats", "total_commands_processed");
    let mut bench = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(["-q", "-t", "set", "-n", LOAD_REQUESTS, "-P", "16", "-r", "1000000", "-d", "256"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn redis-benchmark");
    // Fork once the load is well under way, so that the child's life is
    // spent under writes.
    let start = Instant::now();
    while redis.info("stats", "total_commands_processed") < served + 100_000 {
        assert!(start.elapsed() < Duration::from_secs(20), "redis-benchmark made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = redis.cli(&[command]);
    assert!(reply.contains("started") || reply.contains("scheduled"), "{command}: {reply}");
    redis.wait_until_zero("persistence", &[in_progress], Duration::from_secs(60));
    let out = common::wait_timeout(&mut bench, Duration::from_secs(60));
    let mut stdout = String::new();
    std::io::Read::read_to_string(bench.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(out.success(), "redis-benchmark failed: {out}\n{stdout}");
    assert!(stdout.contains("requests per second"), "redis-benchmark did not complete:\n{stdout}");
}

fn within(ours: f64, theirs: f64, rel: f64, abs: f64) -> bool {
    (ours - theirs).abs() <= (theirs * rel).max(abs)
}

/// Checks the episode of `child` against Redis's own figures.
fn check_episode(episodes: &[Value], child: u32, page_size: u64, cow_size: u64, fork_usec: u64, what: &str) {
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
    assert!(
        within(copied as f64, cow_size as f64, 0.05, 0.0),
        "{what}: episode copied {copied} bytes, Redis reports {cow_size} (more than 5% apart): {ep}"
    );
    let fork_ns = u(&ep["fork_latency_ns"]);
    assert!(
        within(fork_ns as f64, fork_usec as f64 * 1e3, 0.25, 3e6),
        "{what}: episode fork latency {fork_ns} ns, Redis reports {fork_usec} us: {ep}"
    );
    eprintln!(
        "{what}: episode copied {copied} bytes (parent {} + child {} pages), Redis {cow_size}; \
         fork {fork_ns} ns, Redis {fork_usec} us",
        ep["parent_copies"], ep["child_copies"]
    );
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
    let pid = redis.pid().to_string();
    let mut trace = Background::start(&["--json", "-p", &pid]);
    trace.wait_attached();

    // BGSAVE under writes.
    fork_under_load(&redis, "BGSAVE", "rdb_bgsave_in_progress");
    let rdb_child = redis.last_child("Background saving started by pid");
    let rdb_cow = redis.info("persistence", "rdb_last_cow_size");
    let rdb_fork = redis.info("stats", "latest_fork_usec");

    // Turning the AOF on rewrites it once; then BGREWRITEAOF under writes.
    assert_eq!(redis.cli(&["CONFIG", "SET", "appendonly", "yes"]), "OK");
    redis.wait_until_zero(
        "persistence",
        &["aof_rewrite_in_progress", "aof_rewrite_scheduled"],
        Duration::from_secs(60),
    );
    fork_under_load(&redis, "BGREWRITEAOF", "aof_rewrite_in_progress");
    let aof_child = redis.last_child("Background append only file rewriting started by pid");
    let aof_cow = redis.info("persistence", "aof_last_cow_size");
    let aof_fork = redis.info("stats", "latest_fork_usec");
    assert_eq!(redis.info("stats", "total_forks"), 3, "BGSAVE, the first rewrite, BGREWRITEAOF");

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
    assert_eq!(streamed.len(), 3, "one per fork: {streamed:?}");
    assert_eq!(streamed, summary);
    assert!(streamed.iter().all(|e| e["parent"] == redis.pid()));

    check_episode(&streamed, rdb_child, page_size, rdb_cow, rdb_fork, "BGSAVE");
    check_episode(&streamed, aof_child, page_size, aof_cow, aof_fork, "BGREWRITEAOF");

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
