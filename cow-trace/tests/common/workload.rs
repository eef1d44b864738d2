//! The ground-truth workload (`cow-workload`) and the checks of cow-trace's
//! JSON for it: one specification for the integration tests and for
//! `cargo xtask vm-test`, which includes this file by path. So it depends
//! on `serde_json` alone, and its checks return errors instead of panicking.

use serde_json::Value;

/// Pages a process touches besides the workload's own: its stack, libc's
/// data. Measured at 3-12 here; the bound only has to catch double counting.
pub const SLACK: u64 = 64;

/// What one round of the workload does; the copies follow by construction.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Pages mapped and written before the fork.
    pub pages: u64,
    /// Distinct pages the child writes: each one copied.
    pub child_writes: u64,
    /// Other pages the parent writes while the child lives: each one copied.
    pub parent_writes: u64,
    /// Never-written pages the parent reads, then writes (zero-fills, not copies).
    pub zero_fills: u64,
    /// Other pages the child `pread(2)`s a file into: copies made in
    /// kernel mode (`copy_to_user`), seen by every backend.
    pub child_reads: u64,
    /// Other pages the child writes through /proc/self/mem: copies made
    /// through `get_user_pages` with no page fault, which only the backends
    /// that hook `do_wp_page` see.
    pub child_mem_writes: u64,
}

/// The workload the tests and vm-test trace.
pub const STANDARD: Spec = Spec {
    pages: 8192,
    child_writes: 3000,
    parent_writes: 1200,
    zero_fills: 0,
    child_reads: 0,
    child_mem_writes: 0,
};

/// The same with zero-fills (launch mode, vm-test).
pub const WITH_ZERO_FILLS: Spec = Spec { zero_fills: 700, ..STANDARD };

/// Launch mode with copies made by the kernel on the child's behalf: 1000
/// pages read into the shared buffer, 300 written through /proc/self/mem.
pub const KERNEL_WRITES: Spec = Spec { child_reads: 1000, child_mem_writes: 300, ..WITH_ZERO_FILLS };

impl Spec {
    /// The copies the child makes, as `backend` sees them: the writes
    /// through `get_user_pages` take no fault, so the tracepoint backend
    /// (page-fault tracepoints) cannot see them.
    pub fn child_copies(&self, backend: &str) -> u64 {
        let gup = if backend == "tracepoint" { 0 } else { self.child_mem_writes };
        self.child_writes + self.child_reads + gup
    }

    /// The `cow-workload` arguments for this spec.
    pub fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, n) in [
            ("--pages", self.pages),
            ("--child-writes", self.child_writes),
            ("--parent-writes", self.parent_writes),
            ("--zero-fills", self.zero_fills),
            ("--child-reads", self.child_reads),
            ("--child-mem-writes", self.child_mem_writes),
        ] {
            if !matches!(flag, "--zero-fills" | "--child-reads" | "--child-mem-writes") || n > 0 {
                v.extend([flag.to_string(), n.to_string()]);
            }
        }
        v
    }
}

/// How the run timed copy-on-write faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// The default on every backend: some faults stand for others.
    Sampled,
    /// `--sample-every 1`: one latency per copy.
    EveryCopy,
}

/// What a run counted, for the caller's own checks and report.
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub child_copies: u64,
    pub parent_copies: u64,
    pub zero_fills: u64,
    pub fork_ns: u64,
}

/// A number in the JSON, 0 when absent (a check on it then fails).
pub fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The process row for `pid` in a summary or interval record.
pub fn process_row(record: &Value, pid: u64) -> Result<&Value, String> {
    record["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
        .ok_or_else(|| format!("no row for PID {pid}"))
}

/// Whether `n` copies are what `wrote` writes give (plus a process's own).
pub fn copies_ok(n: u64, wrote: u64) -> bool {
    (wrote..=wrote + SLACK).contains(&n)
}

/// Checks a summary of a run of `spec` against the workload's `report`:
/// one fork, the copies and zero-fills by construction, the latencies, the
/// fork's episode, and nothing lost between the kernel and userspace.
/// Every problem found is listed in the error.
pub fn check_summary(
    summary: &Value,
    report: &Value,
    spec: &Spec,
    timing: Timing,
) -> Result<Counted, String> {
    let (parent_pid, child_pid) = (num(&report["pid"]), num(&report["children"][0]));
    let parent = process_row(summary, parent_pid)?;
    let child = process_row(summary, child_pid)?;
    let backend = summary["backend"].as_str().unwrap_or("");
    let (k, m, z) = (spec.child_copies(backend), spec.parent_writes, spec.zero_fills);
    let counted = Counted {
        child_copies: num(&child["cow_copies"]),
        parent_copies: num(&parent["cow_copies"]),
        zero_fills: num(&parent["zero_fills"]),
        fork_ns: num(&parent["fork_latency_ns"]["max"]),
    };
    let (cc, pc, zf) = (counted.child_copies, counted.parent_copies, counted.zero_fills);
    let mut wrong = Vec::new();
    let fork_lat = &parent["fork_latency_ns"];
    if num(&parent["forks"]) != 1 || num(&fork_lat["count"]) != 1 {
        wrong.push(format!("{} forks with {} latencies, expected 1", parent["forks"], fork_lat["count"]));
    }
    if num(&fork_lat["min"]) == 0 {
        wrong.push(format!("fork latency 0: {fork_lat}"));
    }
    if num(&child["ppid"]) != parent_pid || num(&child["forks"]) != 0 {
        wrong.push(format!("child's ppid {}, forks {}", child["ppid"], child["forks"]));
    }
    if !copies_ok(cc, k) {
        wrong.push(format!("child copied {cc} pages, wrote {k}"));
    }
    if !copies_ok(pc, m) {
        wrong.push(format!("parent copied {pc} pages, wrote {m}"));
    }
    if z > 0 && !copies_ok(zf, z) {
        wrong.push(format!("parent zero-filled {zf} pages, wrote {z}"));
    }
    if num(&child["copied_bytes"]) != cc * num(&report["page_size"]) {
        wrong.push(format!("child copied {} bytes in {cc} pages", child["copied_bytes"]));
    }
    let lat = &child["cow_latency_ns"];
    let lat_n = num(&lat["count"]);
    let lat_ok = match timing {
        Timing::Sampled => check_sampled_latencies(lat, cc).map_err(|e| wrong.push(e)).is_ok(),
        Timing::EveryCopy => lat_n == cc,
    };
    if !lat_ok || num(&lat["p50"]) == 0 {
        wrong.push(format!("{lat_n} CoW latencies for {cc} child copies ({timing:?}): {lat}"));
    }
    if child["exited"] != true || parent["exited"] != true {
        wrong.push(format!("exited: child {}, parent {}", child["exited"], parent["exited"]));
    }
    if let Err(e) = check_fork_episode(summary, report, spec, counted.fork_ns) {
        wrong.push(e);
    }
    if let Err(e) = check_nothing_lost(summary) {
        wrong.push(e);
    }
    if wrong.is_empty() {
        Ok(counted)
    } else {
        Err(format!("{}\nsummary: {summary}", wrong.join("; ")))
    }
}

/// The workload's fork as an episode: the one fork of its parent, to its
/// child, with the parent's fork latency and the copies each side made
/// while the other lived.
pub fn check_fork_episode(summary: &Value, report: &Value, spec: &Spec, fork_ns: u64) -> Result<(), String> {
    let (parent, child) = (&report["pid"], &report["children"][0]);
    let all = summary["episodes"].as_array().map(Vec::as_slice).unwrap_or_default();
    let eps: Vec<&Value> = all.iter().filter(|e| &e["parent"] == parent).collect();
    let [ep] = eps.as_slice() else {
        return Err(format!("{} episodes of the workload's parent {parent}, expected 1", eps.len()));
    };
    let mut wrong = Vec::new();
    if &ep["child"] != child {
        wrong.push(format!("episode {parent} -> {}, child is {child}", ep["child"]));
    }
    if num(&ep["fork_latency_ns"]) != fork_ns {
        wrong.push(format!("episode fork latency {} vs the parent's {fork_ns}", ep["fork_latency_ns"]));
    }
    let (ec, epc) = (num(&ep["child_copies"]), num(&ep["parent_copies"]));
    let backend = summary["backend"].as_str().unwrap_or("");
    if !copies_ok(ec, spec.child_copies(backend)) || !copies_ok(epc, spec.parent_writes) {
        wrong.push(format!("episode copies: child {ec}, parent {epc}"));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// No event dropped, and what userspace received is what the kernel counted.
pub fn check_nothing_lost(summary: &Value) -> Result<(), String> {
    let mut wrong = Vec::new();
    if num(&summary["dropped_events"]) != 0 {
        wrong.push(format!("{} events dropped", summary["dropped_events"]));
    }
    let (kt, seen) = (&summary["kernel_totals"], &summary["events_received"]);
    for k in
        ["spawns", "fork_latencies", "cow_copies", "cow_reuses", "zero_fills", "cow_failed", "exits", "execs"]
    {
        if kt[k].is_null() || kt[k] != seen[k] {
            wrong.push(format!("{k}: kernel {} vs received {}", kt[k], seen[k]));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// Checks a CoW latency summary of `copies` copies taken with the default
/// sampling (`--sample-every 16`): a task's first 64 write faults after it
/// is scheduled in are timed, then one in 16, which stands for the 16 it
/// closes. So the weighted count never exceeds the write faults, and falls
/// short of the copies by fewer than 16 per time slice (a few here).
pub fn check_sampled_latencies(lat: &Value, copies: u64) -> Result<(), String> {
    let count = num(&lat["count"]);
    if count > copies + 64 {
        return Err(format!("{count} latencies stand for more than the {copies} copies: {lat}"));
    }
    if count + copies / 10 < copies {
        return Err(format!("{count} latencies stand for too few of the {copies} copies: {lat}"));
    }
    let (min, p50, p99, max) = (num(&lat["min"]), num(&lat["p50"]), num(&lat["p99"]), num(&lat["max"]));
    if min == 0 || p50 < min || max < p99 {
        return Err(format!("latency quantiles out of order: {lat}"));
    }
    Ok(())
}

/// Checks that a run of many write faults sent their outcomes in batches
/// and timed a sample of them, from its own counts: the records read from
/// the ring buffer (a batch counts once) and the faults the kernel timed,
/// each against the outcomes it classified. One record or one timing per
/// fault, as before batching and sampling, fails both.
pub fn check_batched_and_sampled(summary: &Value) -> Result<String, String> {
    let (kt, seen) = (&summary["kernel_totals"], &summary["events_received"]);
    let outcomes = num(&kt["cow_copies"]) + num(&kt["cow_reuses"]) + num(&kt["zero_fills"]);
    let (records, timed) = (num(&seen["ring_records"]), num(&kt["timed_faults"]));
    // What the copy latencies stand for, summed over the processes: each
    // sample counts for the faults it closes.
    let weighted: u64 = summary["processes"]
        .as_array()
        .map_or(0, |ps| ps.iter().map(|p| num(&p["cow_latency_ns"]["count"])).sum());
    let figures = format!(
        "{outcomes} fault outcomes in {records} ring-buffer records, {timed} faults timed, \
         copy latencies standing for {weighted}"
    );
    // Batches of 64, sent early at context switches, forks and exits: far
    // fewer than 1 record in 4 outcomes unless every fault went alone.
    if outcomes < 1000 || records == 0 || records * 4 > outcomes {
        return Err(format!("{figures}: not batched"));
    }
    // A slice's first 64 faults are timed, then one in 16, which stands
    // for 16 in the histograms: the latencies stand for more copies than
    // there were timed faults, reuses included.
    if timed == 0 || timed * 2 > outcomes || weighted <= timed {
        return Err(format!("{figures}: not sampled"));
    }
    Ok(figures)
}

/// An OOM scenario: a parent holding `pages` pages in a memory cgroup
/// limited to `limit_bytes`, whose child (the OOM killer's first choice)
/// writes every one of them.
#[derive(Clone, Debug)]
pub struct OomScenario {
    pub pages: u64,
    pub limit_bytes: u64,
    /// The cgroup's path in its hierarchy (`/name`).
    pub cgroup: String,
    /// Bytes charged to the cgroup just before the fork: the parent's.
    pub held_bytes: u64,
    /// CPUs of the machine: each can hold a charge stock.
    pub cpus: u64,
}

impl OomScenario {
    pub fn workload_args(&self) -> Vec<String> {
        let n = self.pages.to_string();
        ["--pages", &n, "--child-writes", &n, "--parent-writes", "0", "--child-oom-score-adj", "1000"]
            .map(String::from)
            .to_vec()
    }
}

/// Checks the run of an [`OomScenario`]: the parent saw its child killed by
/// SIGKILL; the episode and the child's row say the OOM killer chose it, in
/// which cgroup, under which limit; its copies fill what the parent left of
/// the limit; at most the one fault that met the limit failed, and no
/// reuse was invented. Returns the child's copies and failed faults.
pub fn check_oom(summary: &Value, report: &Value, sc: &OomScenario) -> Result<(u64, u64), String> {
    let mut wrong = Vec::new();
    if report["statuses"][0] != 9 {
        wrong.push(format!("the parent's waitpid saw status {}, not SIGKILL", report["statuses"][0]));
    }
    let (page, child) = (num(&report["page_size"]), num(&report["children"][0]));
    let eps = summary["episodes"].as_array().cloned().unwrap_or_default();
    let Some(e) = eps.iter().find(|e| e["child"] == child) else {
        return Err(format!("no episode for child {child}: {summary}"));
    };
    let row = process_row(summary, child)?;
    for (what, v) in [("episode", e), ("child's row", row)] {
        if v["oom_killed"] != true || v["exit_signal"] != "SIGKILL" || v.get("exit_code").is_some() {
            wrong.push(format!("{what} does not say OOM-killed by SIGKILL: {v}"));
        }
        if v["memory_cgroup"] != sc.cgroup.as_str() || num(&v["memory_limit_bytes"]) != sc.limit_bytes {
            wrong.push(format!("{what}: cgroup {} limit {}", v["memory_cgroup"], v["memory_limit_bytes"]));
        }
    }
    // The copies fill what the parent left of the limit. Below it: the
    // kernel's own charges for the child (page tables: 2 KiB per MiB
    // shared; its stack and libc pages) come out of the same limit. Above
    // it: the usage read counts each CPU's charge stock, up to 64 pages
    // (`MEMCG_CHARGE_BATCH`) charged but not yet used.
    let room = sc.limit_bytes.saturating_sub(sc.held_bytes) / page;
    let (cc, failed) = (num(&e["child_copies"]), num(&e["cow_failed"]));
    let (below, above) = ((2 << 20) / page, 64 * sc.cpus);
    if cc > room + above || cc + below < room {
        wrong.push(format!("child copied {cc} pages, {room} fit under the limit (slack -{below}/+{above})"));
    }
    if num(&row["cow_copies"]) != cc {
        wrong.push(format!("child's row copied {}, its episode {cc}", row["cow_copies"]));
    }
    // The fault that met the limit fails, unless the OOM reaper freed the
    // victim's memory before the charge's last retry (seen on 6.1 under
    // emulation): then it completed as a copy.
    if failed > 1 || num(&row["cow_failed"]) != failed {
        wrong.push(format!("failed faults: episode {failed}, row {}", row["cow_failed"]));
    }
    // Every page the child wrote was shared: each write copied or failed.
    if num(&row["cow_reuses"]) >= SLACK {
        wrong.push(format!("child reused {} pages", row["cow_reuses"]));
    }
    if wrong.is_empty() {
        Ok((cc, failed))
    } else {
        Err(format!("{}\nepisode: {e}", wrong.join("; ")))
    }
}
