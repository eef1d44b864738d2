//! A workload whose copy-on-write cost is known by construction, used by
//! cow-trace's tests and benchmarks as ground truth.
//!
//! It maps `--pages` anonymous pages with transparent huge pages off and
//! writes every one (so all are present and private), then forks. The child
//! writes `--child-writes` distinct pages, each of which must be copied
//! (the parent still shares it); then, while the child is still alive, the
//! parent writes `--parent-writes` *other* pages, each of which must also be
//! copied. Both then exit. Per round: exactly one fork, K copies in the
//! child, M in the parent, plus the few stack and libc pages each touches.
//!
//! `--zero-fills Z` first reads, then writes, Z pages of a second mapping
//! that was never written: each read maps the shared zero page, each write
//! then takes a write-protect fault that needs a zeroed page, not a copy.
//!
//! `--fork-storm N` instead forks N children one after the other, each of
//! which exits at once: the cost of fork itself, for benchmarks.
//!
//! The report includes `elapsed_ns`, the time spent in the rounds (or the
//! storm), which is what benchmarks compare.
//!
//! `--seconds S` repeats rounds until S seconds have passed (instead of
//! `--rounds`), `--pause-ms P` sleeps between rounds: a steady load for
//! soak tests.
//!
//! `--huge` maps the pages as transparent huge pages instead (2 MiB
//! aligned, `MADV_HUGEPAGE`) and reports how much of them the kernel backed
//! with huge pages (`anon_huge_kb`, from /proc/self/smaps_rollup). The
//! first write to each shared huge page then takes a huge-page write fault,
//! which splits the mapping; the 4 KiB copies are the same as without it.
//!
//! `--reuse-pid` (root) asks the kernel, before each round after the first,
//! to give the new child the first child's PID again (through
//! /proc/sys/kernel/ns_last_pid): a dead process's PID reused, as happens on
//! busy hosts. Another process can take that PID first; the report's
//! `children` say which PIDs the children really had.
//!
//! `--main-exits-first MS` does nothing but this: its main thread exits at
//! once (the `exit` syscall, which ends one thread), and another thread keeps the process alive MS
//! milliseconds longer. Meanwhile /proc shows the process as a zombie (its
//! main thread's state), though it has not exited.
//!
//! `--child-cpu N` moves the child to CPU N right after the fork.
//! `--child-spin-ms MS` makes the child, after its writes, busy-loop MS
//! milliseconds in user space (no syscall, so no reason to leave its CPU)
//! before telling the parent it is done; `--parent-spin-ms MS` does the same
//! in the parent after its writes and after telling the child to exit, before
//! waiting for it. With the workload SCHED_FIFO on a CPU of its own, a
//! spinning process is never switched out: tests use this to hold fault
//! outcomes in a tracer's per-CPU batch.
//!
//! With `--go-file PATH` it prints `ready PID` and waits for PATH to exist
//! before forking, so a tracer can attach to a running process first.
//! It ends by printing one JSON line with what it did, and the ids it ran
//! with (`uids`, `gids`, `groups`, as /proc/self/status gives them).

use std::{io::Write as _, path::PathBuf, ptr, time::Duration};

const USAGE: &str = "usage: cow-workload [--pages N] [--child-writes K] [--parent-writes M] \
                     [--zero-fills Z] [--rounds R] [--seconds S] [--pause-ms P] [--fork-storm N] [--huge] [--reuse-pid] [--main-exits-first MS] [--child-cpu N] [--child-spin-ms MS] \
                     [--parent-spin-ms MS] [--go-file PATH]";

struct Opts {
    pages: usize,
    child_writes: usize,
    parent_writes: usize,
    rounds: usize,
    zero_fills: usize,
    fork_storm: usize,
    seconds: u64,
    pause_ms: u64,
    huge: bool,
    reuse_pid: bool,
    main_exits_first_ms: u64,
    child_cpu: Option<usize>,
    child_spin_ms: u64,
    parent_spin_ms: u64,
    go_file: Option<PathBuf>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        pages: 4096,
        child_writes: 1000,
        parent_writes: 500,
        rounds: 1,
        zero_fills: 0,
        fork_storm: 0,
        seconds: 0,
        pause_ms: 0,
        huge: false,
        reuse_pid: false,
        main_exits_first_ms: 0,
        child_cpu: None,
        child_spin_ms: 0,
        parent_spin_ms: 0,
        go_file: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"));
        let num = |v: String| v.parse::<usize>().map_err(|_| format!("bad number {v:?}\n{USAGE}"));
        match a.as_str() {
            "--pages" => o.pages = num(val()?)?,
            "--child-writes" => o.child_writes = num(val()?)?,
            "--parent-writes" => o.parent_writes = num(val()?)?,
            "--rounds" => o.rounds = num(val()?)?,
            "--zero-fills" => o.zero_fills = num(val()?)?,
            "--fork-storm" => o.fork_storm = num(val()?)?,
            "--seconds" => o.seconds = num(val()?)? as u64,
            "--pause-ms" => o.pause_ms = num(val()?)? as u64,
            "--go-file" => o.go_file = Some(PathBuf::from(val()?)),
            "--huge" => o.huge = true,
            "--reuse-pid" => o.reuse_pid = true,
            "--main-exits-first" => o.main_exits_first_ms = num(val()?)? as u64,
            "--child-cpu" => o.child_cpu = Some(num(val()?)?),
            "--child-spin-ms" => o.child_spin_ms = num(val()?)? as u64,
            "--parent-spin-ms" => o.parent_spin_ms = num(val()?)? as u64,
            _ => return Err(USAGE.to_string()),
        }
    }
    if o.child_writes + o.parent_writes > o.pages {
        return Err("--child-writes + --parent-writes must not exceed --pages".into());
    }
    Ok(o)
}

/// Busy-loops `ms` milliseconds without a syscall (the clock is read
/// through the vDSO).
fn spin(ms: u64) {
    let until = std::time::Instant::now() + Duration::from_millis(ms);
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}

fn check(rc: libc::c_int, what: &str) {
    if rc < 0 {
        eprintln!("cow-workload: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
}

/// Touches one byte of each page in `range`: one write fault per page.
fn write_pages(base: *mut u8, page: usize, range: std::ops::Range<usize>, value: u8) {
    for i in range {
        // SAFETY: inside the mapping; volatile so every write happens.
        unsafe { ptr::write_volatile(base.add(i * page), value) };
    }
}

const HUGE: usize = 2 << 20;

/// Maps `pages` anonymous pages: 4 KiB pages only, or (`huge`) a 2 MiB
/// aligned range the kernel is asked to back with huge pages.
fn map(pages: usize, page: usize, huge: bool) -> *mut u8 {
    let len = pages.max(1) * page;
    // Room to align the start to a huge page.
    let map_len = if huge { len + HUGE } else { len };
    // SAFETY: plain anonymous mapping.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        check(-1, "mmap");
    }
    if huge {
        let aligned = (base as usize).next_multiple_of(HUGE) as *mut libc::c_void;
        check(unsafe { libc::madvise(aligned, len, libc::MADV_HUGEPAGE) }, "madvise");
        return aligned.cast();
    }
    // 4 KiB pages only: a huge page would be copied (or split) as one unit.
    check(unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) }, "madvise");
    base.cast()
}

/// Anonymous memory the kernel backs with huge pages, in KiB.
fn anon_huge_kb() -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The ids the kernel says this process runs with (`Uid:` real, effective,
/// saved, fs; `Groups:` supplementary), from /proc/self/status.
fn status_ids(key: &str) -> Vec<u32> {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("");
    line.split_whitespace().filter_map(|n| n.parse().ok()).collect()
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cow-workload: {e}");
            std::process::exit(2);
        }
    };
    if o.main_exits_first_ms > 0 {
        println!("ready {}", std::process::id());
        std::io::stdout().flush().ok();
        let ms = o.main_exits_first_ms;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            std::process::exit(0);
        });
        // The raw exit syscall ends this thread alone (exit_group would end
        // the process) and, unlike pthread_exit, unwinds nothing through
        // Rust frames.
        // SAFETY: the other thread owns nothing of this one's stack.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        unreachable!("the exit syscall returned");
    }
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let base = map(o.pages, page, o.huge);
    write_pages(base, page, 0..o.pages, 1);
    let huge_kb = anon_huge_kb();

    let me = std::process::id();
    if let Some(go) = &o.go_file {
        println!("ready {me}");
        std::io::stdout().flush().ok();
        while !go.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    if o.zero_fills > 0 {
        let zero = map(o.zero_fills, page, false);
        let mut sum = 0u8;
        for i in 0..o.zero_fills {
            // SAFETY: inside the mapping; volatile so the read happens.
            sum = sum.wrapping_add(unsafe { ptr::read_volatile(zero.add(i * page)) });
        }
        write_pages(zero, page, 0..o.zero_fills, sum.wrapping_add(1));
    }

    if o.fork_storm > 0 {
        let start = std::time::Instant::now();
        for _ in 0..o.fork_storm {
            // SAFETY: the child exits at once without touching shared state.
            let pid = unsafe { libc::fork() };
            check(pid, "fork");
            if pid == 0 {
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
        let ns = start.elapsed().as_nanos();
        println!("{{\"pid\":{me},\"children\":[],\"fork_storm\":{},\"elapsed_ns\":{ns}}}", o.fork_storm);
        return;
    }

    let start = std::time::Instant::now();
    let mut children = Vec::new();
    let rounds = if o.seconds > 0 { usize::MAX } else { o.rounds };
    for round in 0..rounds {
        if o.seconds > 0 && start.elapsed() >= Duration::from_secs(o.seconds) {
            break;
        }
        if round > 0 && o.pause_ms > 0 {
            std::thread::sleep(Duration::from_millis(o.pause_ms));
        }
        let (mut done, mut exit) = ([0; 2], [0; 2]);
        check(unsafe { libc::pipe(done.as_mut_ptr()) }, "pipe");
        check(unsafe { libc::pipe(exit.as_mut_ptr()) }, "pipe");
        // Last thing before the fork: any fork on the machine in between
        // takes the PID.
        if o.reuse_pid {
            if let Some(&first) = children.first() {
                // The next PID handed out is ns_last_pid + 1, if it is free.
                if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", first - 1)) {
                    eprintln!("cow-workload: --reuse-pid: cannot write /proc/sys/kernel/ns_last_pid: {e}");
                    std::process::exit(1);
                }
            }
        }
        let value = round as u8 + 2;
        // SAFETY: the child only writes to the mapping and uses pipes before
        // _exit; nothing that needs locks held by other threads.
        let pid = unsafe { libc::fork() };
        check(pid, "fork");
        if pid == 0 {
            unsafe {
                if let Some(cpu) = o.child_cpu {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    check(
                        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                        "sched_setaffinity",
                    );
                }
                write_pages(base, page, 0..o.child_writes, value);
                spin(o.child_spin_ms);
                let b = 0u8;
                libc::write(done[1], (&b as *const u8).cast(), 1);
                let mut r = 0u8;
                libc::read(exit[0], (&mut r as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        let mut b = 0u8;
        unsafe { libc::read(done[0], (&mut b as *mut u8).cast(), 1) };
        // The child still lives and shares these pages: each write copies.
        write_pages(base, page, o.child_writes..o.child_writes + o.parent_writes, value);
        unsafe {
            libc::write(exit[1], (&b as *const u8).cast(), 1);
            spin(o.parent_spin_ms);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            for fd in done.into_iter().chain(exit) {
                libc::close(fd);
            }
        }
        children.push(pid);
    }
    let [uids, gids, groups] = ["Uid:", "Gid:", "Groups:"].map(status_ids);
    println!(
        "{{\"pid\":{me},\"children\":{children:?},\"pages\":{},\"child_writes\":{},\"parent_writes\":{},\"rounds\":{},\"zero_fills\":{},\"page_size\":{page},\"huge\":{},\"anon_huge_kb\":{huge_kb},\"elapsed_ns\":{},\"uids\":{uids:?},\"gids\":{gids:?},\"groups\":{groups:?}}}",
        o.pages, o.child_writes, o.parent_writes, children.len(), o.zero_fills, o.huge, start.elapsed().as_nanos()
    );
}
