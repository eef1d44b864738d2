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
//! `--child-reads R` makes the child also `pread(2)` R pages of a file
//! (written before the fork) into R other pages of the shared mapping: the
//! kernel writes them in `copy_to_user`, a write fault taken in kernel mode
//! that copies each page. `--child-mem-writes W` makes it write W more
//! pages through /proc/self/mem, which the kernel does through
//! `get_user_pages` with no page fault at all, copying each page. Those
//! pages follow the parent's: `pages` must hold K + M + R + W.
//!
//! `--fork-storm N` instead forks N children one after the other, each of
//! which exits at once: the cost of fork itself, for benchmarks.
//!
//! The report includes `elapsed_ns`, the time spent in the rounds (or the
//! storm), which is what benchmarks compare, and `cpu_ns`, the CPU time the
//! workload and its children spent meanwhile (user and system, as the
//! kernel accounts it to them): work done in their own context, such as a
//! tracer's programs on their faults, without the time they waited for a
//! CPU while something else ran.
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
//! `--until-file PATH` repeats rounds until PATH exists (instead of
//! `--rounds`): a load that goes on across the end of a trace, for as long
//! as the test needs. `--write-log DIR` makes each child note the time
//! (`CLOCK_MONOTONIC`, the tracer's clock) right after each of its page
//! writes, and the parent save them in `DIR/<child pid>` (little-endian
//! u64s, one per write): how many pages a child had written by any instant.
//! `--child-cpu N` moves the child to CPU N right after the fork.
//! `--child-write-pause-ms MS` makes the child sleep MS milliseconds half-way
//! through its writes (a run's end then lands mid-way by construction).
//! `--child-spin-ms MS` makes the child, after its writes, busy-loop MS
//! milliseconds in user space (no syscall, so no reason to leave its CPU)
//! before telling the parent it is done; `--parent-spin-ms MS` does the same
//! in the parent after its writes and after telling the child to exit, before
//! waiting for it. With the workload SCHED_FIFO on a CPU of its own, a
//! spinning process is never switched out: tests use this to hold fault
//! outcomes in a tracer's per-CPU batch. With `--spin-file PATH` (created,
//! two zero bytes) a spin is a handshake instead: the spinning process sets
//! byte 0 when it starts, and spins until byte 1 is set (by the test, with
//! `pwrite`), MS being only a bound. It checks with `pread`, once a
//! millisecond: on an in-memory file (/dev/shm) a syscall that does not
//! sleep, so the spinner keeps its CPU. One file serves one spin: once
//! byte 1 is set, every later spin ends at once.
//!
//! `--child-exit CODE` makes each child exit with CODE, `--child-signal SIG`
//! makes it kill itself with signal number SIG, after its writes. A child
//! that dies before telling the parent it is done (e.g. killed by the OOM
//! killer) ends the round early; the report's `statuses` give each child's
//! raw wait status. `--child-oom-score-adj N` (0 to 1000) makes each child
//! the OOM killer's first choice, as Redis does for its BGSAVE child.
//!
//! With `--go-file PATH` it prints `ready PID` and waits for PATH to exist
//! before forking, so a tracer can attach to a running process first.
//! It ends by printing one JSON line with what it did, and the ids it ran
//! with (`uids`, `gids`, `groups`, as /proc/self/status gives them).
//!
//! `--now` does nothing but print `CLOCK_MONOTONIC` in ns, first thing: a
//! clock for shell scripts where `date` has no nanoseconds (busybox), as
//! `cargo xtask bench --vm` times a tracer's start and stop with it.

use std::{io::Write as _, path::PathBuf, ptr, time::Duration};

const USAGE: &str = "usage: cow-workload --now | [--pages N] [--child-writes K] [--parent-writes M] \
                     [--zero-fills Z] [--child-reads R] [--child-mem-writes W] [--rounds R] [--seconds S] [--pause-ms P] [--fork-storm N] [--huge] [--reuse-pid] [--main-exits-first MS] [--child-cpu N] [--child-spin-ms MS] [--child-write-pause-ms MS] \
                     [--parent-spin-ms MS] [--child-exit CODE] [--child-signal SIG] [--child-oom-score-adj N] [--go-file PATH] [--until-file PATH] [--write-log DIR] [--spin-file PATH]";

struct Opts {
    pages: usize,
    child_writes: usize,
    parent_writes: usize,
    rounds: usize,
    zero_fills: usize,
    child_reads: usize,
    child_mem_writes: usize,
    fork_storm: usize,
    seconds: u64,
    pause_ms: u64,
    huge: bool,
    reuse_pid: bool,
    main_exits_first_ms: u64,
    child_cpu: Option<usize>,
    child_spin_ms: u64,
    child_write_pause_ms: u64,
    parent_spin_ms: u64,
    child_exit: i32,
    child_signal: i32,
    child_oom_score_adj: i32,
    go_file: Option<PathBuf>,
    until_file: Option<PathBuf>,
    write_log: Option<PathBuf>,
    spin_file: Option<PathBuf>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        pages: 4096,
        child_writes: 1000,
        parent_writes: 500,
        rounds: 1,
        zero_fills: 0,
        child_reads: 0,
        child_mem_writes: 0,
        fork_storm: 0,
        seconds: 0,
        pause_ms: 0,
        huge: false,
        reuse_pid: false,
        main_exits_first_ms: 0,
        child_cpu: None,
        child_spin_ms: 0,
        child_write_pause_ms: 0,
        parent_spin_ms: 0,
        child_exit: 0,
        child_signal: 0,
        child_oom_score_adj: 0,
        go_file: None,
        until_file: None,
        write_log: None,
        spin_file: None,
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
            "--child-reads" => o.child_reads = num(val()?)?,
            "--child-mem-writes" => o.child_mem_writes = num(val()?)?,
            "--fork-storm" => o.fork_storm = num(val()?)?,
            "--seconds" => o.seconds = num(val()?)? as u64,
            "--pause-ms" => o.pause_ms = num(val()?)? as u64,
            "--go-file" => o.go_file = Some(PathBuf::from(val()?)),
            "--until-file" => o.until_file = Some(PathBuf::from(val()?)),
            "--write-log" => o.write_log = Some(PathBuf::from(val()?)),
            "--spin-file" => o.spin_file = Some(PathBuf::from(val()?)),
            "--huge" => o.huge = true,
            "--reuse-pid" => o.reuse_pid = true,
            "--main-exits-first" => o.main_exits_first_ms = num(val()?)? as u64,
            "--child-cpu" => o.child_cpu = Some(num(val()?)?),
            "--child-spin-ms" => o.child_spin_ms = num(val()?)? as u64,
            "--child-write-pause-ms" => o.child_write_pause_ms = num(val()?)? as u64,
            "--parent-spin-ms" => o.parent_spin_ms = num(val()?)? as u64,
            "--child-exit" => o.child_exit = num(val()?)? as i32,
            "--child-signal" => o.child_signal = num(val()?)? as i32,
            "--child-oom-score-adj" => o.child_oom_score_adj = num(val()?)? as i32,
            _ => return Err(USAGE.to_string()),
        }
    }
    if o.child_writes + o.parent_writes + o.child_reads + o.child_mem_writes > o.pages {
        return Err(
            "--child-writes + --parent-writes + --child-reads + --child-mem-writes must not exceed --pages"
                .into(),
        );
    }
    Ok(o)
}

/// Busy-loops `ms` milliseconds without leaving the CPU: no syscall (the
/// clock is read through the vDSO), or with `--spin-file` its handshake:
/// says the spin has started (byte 0), then ends early once told to stop
/// (byte 1), checked once a millisecond.
fn spin(ms: u64, file: Option<&std::fs::File>) {
    use std::os::unix::fs::FileExt as _;
    if ms == 0 {
        return;
    }
    if let Some(Err(e)) = file.map(|f| f.write_all_at(&[1], 0)) {
        eprintln!("cow-workload: --spin-file: {e}");
        unsafe { libc::_exit(1) };
    }
    let until = std::time::Instant::now() + Duration::from_millis(ms);
    let mut next_check = std::time::Instant::now();
    let mut b = [0u8];
    while std::time::Instant::now() < until {
        if let Some(f) = file.filter(|_| std::time::Instant::now() >= next_check) {
            if f.read_exact_at(&mut b, 1).is_ok() && b[0] != 0 {
                return;
            }
            next_check += Duration::from_millis(1);
        }
        std::hint::spin_loop();
    }
}

fn check(rc: libc::c_int, what: &str) {
    if rc < 0 {
        eprintln!("cow-workload: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
}

/// `CLOCK_MONOTONIC` in ns, through the vDSO (no syscall).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `write_pages`, noting in `log` (one slot per page) the time right
/// after each write.
fn write_pages_logged(base: *mut u8, page: usize, range: std::ops::Range<usize>, value: u8, log: *mut u64) {
    for i in range {
        // SAFETY: inside the mapping and the log; volatile so every write
        // happens, in order.
        unsafe {
            ptr::write_volatile(base.add(i * page), value);
            ptr::write_volatile(log.add(i), monotonic_ns());
        }
    }
}

/// A mapping shared with the children, written before any fork: their
/// writes to it are not copy-on-write and take no fault.
fn shared_log(slots: usize) -> *mut u64 {
    let len = (slots.max(1) * 8).next_multiple_of(4096);
    // SAFETY: plain shared anonymous mapping.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        check(-1, "mmap");
    }
    // SAFETY: inside the mapping.
    unsafe { ptr::write_bytes(p.cast::<u8>(), 0, len) };
    p.cast()
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

/// A file of `pages` pages, written now (so in the page cache) and already
/// unlinked, for the child's reads.
fn source_file(pages: usize, page: usize) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("cow-workload-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| die(&format!("cannot create {}: {e}", path.display())));
    let _ = std::fs::remove_file(&path);
    let chunk = vec![7u8; page];
    for _ in 0..pages {
        f.write_all(&chunk).unwrap_or_else(|e| die(&format!("cannot write {}: {e}", path.display())));
    }
    f
}

fn die(msg: &str) -> ! {
    eprintln!("cow-workload: {msg}");
    std::process::exit(1);
}

/// Reads `len` bytes of `fd` from offset 0 into `dst`, in as many calls as
/// it takes: each page is written by the kernel.
fn pread_all(fd: libc::c_int, dst: *mut u8, len: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: `dst..dst + len` lies inside the workload's mapping.
        let n = unsafe { libc::pread(fd, dst.add(done).cast(), len - done, done as libc::off_t) };
        if n <= 0 {
            die(&format!("pread: {}", std::io::Error::last_os_error()));
        }
        done += n as usize;
    }
}

/// Writes `len` bytes at `dst` in this process through /proc/self/mem.
fn mem_write(dst: *mut u8, len: usize) {
    use std::os::unix::fs::FileExt as _;
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap_or_else(|e| die(&format!("cannot open /proc/self/mem: {e}")));
    let data = vec![9u8; len];
    mem.write_all_at(&data, dst as u64).unwrap_or_else(|e| die(&format!("/proc/self/mem: {e}")));
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

/// User and system time of this process and of its children waited for so
/// far, in nanoseconds (the kernel's exact runtime, split by ticks).
fn cpu_ns() -> u64 {
    let ns = |who| {
        // SAFETY: getrusage writes the struct it is given.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut r) };
        let t = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
        t(r.ru_utime) + t(r.ru_stime)
    };
    ns(libc::RUSAGE_SELF) + ns(libc::RUSAGE_CHILDREN)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--now") {
        println!("{}", monotonic_ns());
        return;
    }
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

    let source = (o.child_reads > 0).then(|| source_file(o.child_reads, page));
    let spin_file = o.spin_file.as_ref().map(|path| {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path);
        match f.and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[0, 0], 0).map(|()| f)) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cow-workload: --spin-file {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    });
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
        let cpu = cpu_ns();
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
        let cpu = cpu_ns() - cpu;
        println!(
            "{{\"pid\":{me},\"children\":[],\"fork_storm\":{},\"elapsed_ns\":{ns},\"cpu_ns\":{cpu}}}",
            o.fork_storm
        );
        return;
    }

    let cpu = cpu_ns();
    let start = std::time::Instant::now();
    let (mut children, mut statuses) = (Vec::new(), Vec::new());
    let rounds = if o.seconds > 0 || o.until_file.is_some() { usize::MAX } else { o.rounds };
    let log = o.write_log.as_ref().map(|_| shared_log(o.child_writes));
    for round in 0..rounds {
        if o.seconds > 0 && start.elapsed() >= Duration::from_secs(o.seconds) {
            break;
        }
        if o.until_file.as_ref().is_some_and(|f| f.exists()) {
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
                // Only the parent holds the write end of `exit`: a parent that dies
                // early (killed at a traced run's end) ends the child's wait.
                libc::close(exit[1]);
                libc::close(done[0]);
                if o.child_oom_score_adj != 0 {
                    let adj = o.child_oom_score_adj.to_string();
                    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj) {
                        eprintln!("cow-workload: --child-oom-score-adj: {e}");
                        libc::_exit(1);
                    }
                }
                if let Some(cpu) = o.child_cpu {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    check(
                        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                        "sched_setaffinity",
                    );
                }
                // Half the writes, an optional pause, the other half: a run
                // ended meanwhile is cut in the middle of the child's writes.
                let half = o.child_writes / 2;
                for (i, range) in [0..half, half..o.child_writes].into_iter().enumerate() {
                    if i == 1 && o.child_write_pause_ms > 0 {
                        std::thread::sleep(Duration::from_millis(o.child_write_pause_ms));
                    }
                    match log {
                        Some(log) => write_pages_logged(base, page, range, value, log),
                        None => write_pages(base, page, range, value),
                    }
                }
                let after = o.child_writes + o.parent_writes;
                if let Some(f) = &source {
                    use std::os::fd::AsRawFd as _;
                    pread_all(f.as_raw_fd(), base.add(after * page), o.child_reads * page);
                }
                if o.child_mem_writes > 0 {
                    mem_write(base.add((after + o.child_reads) * page), o.child_mem_writes * page);
                }
                spin(o.child_spin_ms, spin_file.as_ref());
                let b = 0u8;
                libc::write(done[1], (&b as *const u8).cast(), 1);
                let mut r = 0u8;
                libc::read(exit[0], (&mut r as *mut u8).cast(), 1);
                if o.child_signal > 0 {
                    libc::kill(libc::getpid(), o.child_signal);
                }
                libc::_exit(o.child_exit);
            }
        }
        // Only the child holds the write end now: a child that dies early
        // ends the read below with end of file.
        unsafe { libc::close(done[1]) };
        let mut b = 0u8;
        unsafe { libc::read(done[0], (&mut b as *mut u8).cast(), 1) };
        // The child still lives and shares these pages: each write copies.
        write_pages(base, page, o.child_writes..o.child_writes + o.parent_writes, value);
        unsafe {
            libc::write(exit[1], (&b as *const u8).cast(), 1);
            spin(o.parent_spin_ms, spin_file.as_ref());
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            statuses.push(status);
            for fd in [done[0], exit[0], exit[1]] {
                libc::close(fd);
            }
        }
        if let (Some(dir), Some(log)) = (&o.write_log, log) {
            // SAFETY: the child is reaped; the log holds its writes' times.
            let times = unsafe { std::slice::from_raw_parts(log.cast::<u8>(), o.child_writes * 8) };
            if let Err(e) = std::fs::write(dir.join(pid.to_string()), times) {
                eprintln!("cow-workload: --write-log: {e}");
                std::process::exit(1);
            }
        }
        children.push(pid);
    }
    let [uids, gids, groups] = ["Uid:", "Gid:", "Groups:"].map(status_ids);
    println!(
        "{{\"pid\":{me},\"children\":{children:?},\"statuses\":{statuses:?},\"pages\":{},\"child_writes\":{},\"parent_writes\":{},\"rounds\":{},\"zero_fills\":{},\"child_reads\":{},\"child_mem_writes\":{},\"page_size\":{page},\"huge\":{},\"anon_huge_kb\":{huge_kb},\"elapsed_ns\":{},\"cpu_ns\":{},\"uids\":{uids:?},\"gids\":{gids:?},\"groups\":{groups:?}}}",
        o.pages, o.child_writes, o.parent_writes, children.len(), o.zero_fills, o.child_reads, o.child_mem_writes, o.huge, start.elapsed().as_nanos(), cpu_ns() - cpu
    );
}
