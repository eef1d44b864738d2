//! Checks made before anything is loaded into the kernel, each failing with
//! one line that names the problem and the fix.

use std::{fs, io};

use anyhow::{bail, Result};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
/// `PF_KTHREAD` in /proc/PID/stat's flags field.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Effective capability set from a /proc/PID/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Whether the capabilities allow loading and attaching tracing programs:
/// CAP_BPF with CAP_PERFMON (Linux >= 5.8), or CAP_SYS_ADMIN, which covers
/// both on every kernel.
pub fn caps_suffice(caps: u64) -> bool {
    let has = |c: u32| caps & (1u64 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status")?;
    let caps = effective_caps(&status).unwrap_or(0);
    if !caps_suffice(caps) {
        bail!(
            "insufficient privileges: cow-trace loads BPF programs and needs root, or CAP_BPF and \
             CAP_PERFMON (plus CAP_DAC_READ_SEARCH to read a root-only tracefs, CAP_SYS_ADMIN to \
             mount it or on kernels before 5.8); run it with sudo"
        );
    }
    Ok(())
}

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

pub fn proc_info(pid: u32) -> io::Result<ProcInfo> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_proc(&status, &stat).ok_or_else(|| io::Error::other("unparsable /proc entry"))
}

/// Parent PID of a live process, 0 when unknown.
pub fn ppid_of(pid: u32) -> u32 {
    proc_info(pid).map(|p| p.ppid).unwrap_or(0)
}

/// Name of a live process's main thread.
pub fn comm_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end_matches('\n').to_string())
}

pub fn check_pid(pid: u32) -> Result<ProcInfo> {
    let info = match proc_info(pid) {
        Ok(info) => info,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("no process with PID {pid}: check the PID (for example with `pgrep -a NAME`)")
        }
        Err(e) => bail!("cannot inspect PID {pid} in /proc: {e}"),
    };
    if info.kthread {
        bail!(
            "PID {pid} ({}) is a kernel thread: it has no user memory to fork or copy; trace a \
             user process",
            info.name
        );
    }
    if is_zombie(pid) {
        bail!(
            "PID {pid} ({}) has already exited (a zombie its parent has not reaped): there is \
             nothing left to trace",
            info.name
        );
    }
    if info.tgid != pid {
        bail!(
            "PID {pid} is a thread of process {} ({}): trace the process with -p {}",
            info.tgid,
            info.name,
            info.tgid
        );
    }
    Ok(info)
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
        .any(|t| fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| !stat_state_is_dead(&stat)))
}

/// Whether the process is dead but not yet reaped. /proc/PID/stat shows
/// the main thread's state, which is also a zombie's while the process's
/// other threads run on: that process is alive, its exit still to come.
pub fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| stat_state_is_dead(&s))
        && !any_task_running(pid)
}

/// The state field follows the last ')' of the comm.
fn stat_state_is_dead(stat: &str) -> bool {
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x"))
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
    fn capability_sets() {
        let root = effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(caps_suffice(root));
        assert!(!caps_suffice(effective_caps("CapEff:\t0000000000000000\n").unwrap()));
        assert!(caps_suffice((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!caps_suffice(1 << CAP_BPF), "CAP_BPF alone cannot attach tracing programs");
        assert!(caps_suffice(1 << CAP_SYS_ADMIN));
        assert_eq!(effective_caps("Name:\tx\n"), None);
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
    fn checks_against_this_system() {
        let me = std::process::id();
        assert_eq!(check_pid(me).unwrap().tgid, me);
        assert!(alive(me));
        let err = check_pid(crate::cli::PID_MAX_LIMIT).unwrap_err().to_string();
        assert!(err.contains("no process with PID 4194304"), "{err}");
        // kthreadd is PID 2 on every Linux with kernel threads in our namespace.
        if let Ok(info) = proc_info(2) {
            if info.kthread {
                assert!(check_pid(2).unwrap_err().to_string().contains("kernel thread"));
            }
        }
        // A thread of this test process, by its TID.
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        let tid = rx.recv().unwrap();
        let err = check_pid(tid).unwrap_err().to_string();
        assert!(err.contains(&format!("is a thread of process {me}")), "{err}");
        h.join().unwrap();
    }
}
