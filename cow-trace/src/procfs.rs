//! Readers of `/proc` used while the run goes on: who a process is, whether
//! it still lives, and its memory layout.

use std::{fs, io};

use cow_trace::sanitize::lossless;

/// `PF_KTHREAD` in /proc/PID/stat's flags field.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What /proc says about a PID given on the command line.
#[derive(Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub tgid: u32,
    pub ppid: u32,
    pub name: String,
    pub kthread: bool,
}

/// Parses /proc/PID/status (Name, Tgid, PPid) and the flags field of
/// /proc/PID/stat. The stat comm may hold spaces and parentheses, so fields
/// are counted from the last ')'.
pub fn parse_proc(status: &str, stat: &str) -> Option<ProcInfo> {
    let get = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string());
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after comm: state(3) ppid(4) pgrp(5) session(6) tty_nr(7)
    // tpgid(8) flags(9).
    let flags: u64 = after_comm.split_whitespace().nth(6)?.parse().ok()?;
    Some(ProcInfo {
        tgid: get("Tgid:")?.parse().ok()?,
        ppid: get("PPid:")?.parse().ok()?,
        name: get("Name:")?,
        kthread: flags & PF_KTHREAD != 0,
    })
}

/// Read as bytes: a name that is not UTF-8 must not make the entry unreadable.
pub fn proc_info(pid: u32) -> io::Result<ProcInfo> {
    let status = fs::read(format!("/proc/{pid}/status"))?;
    // Gone after the first read: reaped since, not a wrong PID.
    let stat = fs::read(format!("/proc/{pid}/stat")).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::from_raw_os_error(libc::ESRCH),
        _ => e,
    })?;
    parse_proc(&lossless(&status), &lossless(&stat)).ok_or_else(|| io::Error::other("unparsable /proc entry"))
}

/// Parent PID of a live process, 0 when unknown.
pub fn ppid_of(pid: u32) -> u32 {
    proc_info(pid).map(|p| p.ppid).unwrap_or(0)
}

/// Name of a live process's main thread.
pub fn comm_of(pid: u32) -> Option<String> {
    let comm = fs::read(format!("/proc/{pid}/comm")).ok()?;
    Some(lossless(comm.strip_suffix(b"\n").unwrap_or(&comm)).into_owned())
}

/// Cgroup v2 path of a live process, as a metric label.
pub fn cgroup_of(pid: u32) -> Option<String> {
    cow_trace::cgroup::parse_proc_cgroup(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    // A zombie still answers signal 0 but will never exit again: waiting
    // for its exit event would wait forever.
    (rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)) && !is_zombie(pid)
}

/// Whether any thread of `pid` is not dead, from /proc/PID/task.
fn any_task_running(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks
        .flatten()
        .any(|t| fs::read(t.path().join("stat")).is_ok_and(|stat| !stat_state_is_dead(&lossless(&stat))))
}

/// Whether the process is dead but not yet reaped. /proc/PID/stat shows
/// the main thread's state, which is also a zombie's while the process's
/// other threads run on: that process is alive, its exit still to come.
pub fn is_zombie(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| stat_state_is_dead(&lossless(&s)))
        && !any_task_running(pid)
}

/// The state field follows the last ')' of the comm.
fn stat_state_is_dead(stat: &str) -> bool {
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x"))
}

/// Reads a live process's maps; `None` once it is gone or unreadable.
/// Bytes, not text: one file name that is not UTF-8 must not lose the map.
pub fn read_maps(pid: u32) -> Option<Vec<u8>> {
    fs::read(format!("/proc/{pid}/maps")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_has_a_running_task_and_a_missing_one_none() {
        assert!(any_task_running(std::process::id()));
        assert!(!any_task_running(crate::cli::PID_MAX_LIMIT));
    }

    #[test]
    fn zombie_state_is_read_after_the_comm() {
        assert!(stat_state_is_dead("42 (a) Z) Z 1 42 42 0 -1 4194560"));
        assert!(!stat_state_is_dead("42 (Z) S 1 42 42 0 -1 4194560"));
        assert!(!stat_state_is_dead("garbage"));
    }

    #[test]
    fn proc_parsing_survives_odd_comms() {
        let status = "Name:\tweird ) name\nTgid:\t42\nPid:\t42\nPPid:\t1\n";
        let stat = "42 (weird ) name) S 1 42 42 0 -1 4194560 100 0";
        assert_eq!(
            parse_proc(status, stat).unwrap(),
            ProcInfo { tgid: 42, ppid: 1, name: "weird ) name".into(), kthread: false }
        );
        let kstat = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0";
        let kstatus = "Name:\tkthreadd\nTgid:\t2\nPPid:\t0\n";
        assert!(parse_proc(kstatus, kstat).unwrap().kthread);
        assert_eq!(parse_proc("Name:\tx\n", stat), None);
    }

    #[test]
    fn own_maps_contain_own_stack_and_heap_data() {
        let m = cow_trace::regions::Maps::parse(&read_maps(std::process::id()).expect("own maps"));
        let local = 0u64;
        assert!(m.find(&local as *const u64 as u64).is_some(), "a local lies on some stack");
        let boxed = Box::new([0u8; 64]);
        assert!(m.find(boxed.as_ptr() as u64).is_some(), "heap data lies in some mapping");
        assert!(read_maps(u32::MAX).is_none());
    }

    #[test]
    fn maps_read_while_another_thread_remaps_still_hold_what_did_not_move() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let page = 4096;
        // A mapping that stays, amid one that comes and goes, grows and
        // shrinks next to others on another thread.
        let stay = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(stay, libc::MAP_FAILED);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let remaps = std::sync::Arc::new(AtomicUsize::new(0));
        let churn = {
            let (stop, remaps) = (stop.clone(), remaps.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let len = (1 + n % 7) * page;
                    let prot = if n.is_multiple_of(2) {
                        libc::PROT_READ
                    } else {
                        libc::PROT_READ | libc::PROT_WRITE
                    };
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            prot,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    assert_ne!(p, libc::MAP_FAILED);
                    unsafe { libc::munmap(p, len) };
                    n += 1;
                    remaps.store(n, Ordering::Relaxed);
                }
            })
        };
        let local = 0u64;
        // At least 300 reads, and on until the other thread has remapped
        // many times since the first: however the two are scheduled, the
        // reads overlap the churn.
        let mut reads = 0;
        let mut first = None;
        // (A churn thread that died, by a failed mmap, ends the loop and
        // fails the join below.)
        while !churn.is_finished()
            && (reads < 300 || first.is_none_or(|f| remaps.load(Ordering::Relaxed) < f + 300))
        {
            if first.is_none() {
                first = Some(remaps.load(Ordering::Relaxed)).filter(|&n| n > 0);
            }
            reads += 1;
            let m = cow_trace::regions::Maps::parse(&read_maps(std::process::id()).expect("own maps"));
            assert!(m.find(stay as u64).is_some_and(|r| r.start <= stay as u64), "the mapping that stayed");
            assert!(m.find(&local as *const u64 as u64).is_some(), "this thread's stack");
            assert!(m.regions().windows(2).all(|w| w[0].end <= w[1].start));
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        unsafe { libc::munmap(stay, 4 * page) };
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
    }
}
