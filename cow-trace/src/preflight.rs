//! Checks made before anything is loaded into the kernel, each failing with
//! one line that names the problem and the fix.

use std::{fs, io};

use anyhow::{bail, Result};
use cow_trace::sanitize::for_terminal;

use crate::procfs::{is_zombie, proc_info, ProcInfo};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

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

pub fn check_pid(pid: u32) -> Result<ProcInfo> {
    let info = proc_info(pid).map_err(|e| unreadable_pid(pid, &e))?;
    if info.kthread {
        bail!(
            "PID {pid} ({}) is a kernel thread: it has no user memory to fork or copy; trace a \
             user process",
            for_terminal(&info.name)
        );
    }
    if is_zombie(pid) {
        bail!(
            "PID {pid} ({}) has already exited (a zombie its parent has not reaped): there is \
             nothing left to trace",
            for_terminal(&info.name)
        );
    }
    if info.tgid != pid {
        bail!(
            "PID {pid} is a thread of process {} ({}): trace the process with -p {}",
            info.tgid,
            for_terminal(&info.name),
            info.tgid
        );
    }
    Ok(info)
}

/// The error for a target that was there when named but is gone before it
/// could be traced: found so here, or after the attach (`run`).
pub fn exited_before_tracing(pid: u32) -> anyhow::Error {
    anyhow::anyhow!("PID {pid} exited before tracing started")
}

/// The one-line error for a /proc/PID entry that could not be read.
fn unreadable_pid(pid: u32, e: &io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) => {
            anyhow::anyhow!("no process with PID {pid}: check the PID (for example with `pgrep -a NAME`)")
        }
        // The directory was there and the process was reaped before its
        // file could be read: the PID was right, the process just ended.
        Some(libc::ESRCH) => exited_before_tracing(pid),
        _ => anyhow::anyhow!("cannot inspect PID {pid} in /proc: {e}"),
    }
}

/// The cgroups `--cgroup` names, as the kernel identifies them.
pub fn resolve_cgroups(args: &[std::path::PathBuf]) -> Result<Vec<crate::backend::CgroupId>> {
    use std::os::unix::fs::MetadataExt;
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let Some(mount) = cow_trace::cgroup::v2_mount(&mountinfo) else {
        bail!("--cgroup needs the cgroup v2 hierarchy, and none is mounted (mount -t cgroup2 none /sys/fs/cgroup)");
    };
    let mount = std::path::Path::new(&mount);
    args.iter()
        .map(|arg| {
            let Some((dir, level)) = cow_trace::cgroup::locate(mount, arg) else {
                bail!("--cgroup {}: not a path under the cgroup v2 mount {}", arg.display(), mount.display());
            };
            let meta = fs::metadata(&dir).ok().filter(|m| m.is_dir()).ok_or_else(|| {
                anyhow::anyhow!(
                    "--cgroup {}: no such cgroup ({} does not exist; paths are relative to {} or absolute under it)",
                    arg.display(),
                    dir.display(),
                    mount.display()
                )
            })?;
            if level >= cow_trace_common::MAX_CGROUP_LEVELS {
                bail!("--cgroup {}: deeper than {} levels", arg.display(), cow_trace_common::MAX_CGROUP_LEVELS);
            }
            Ok(crate::backend::CgroupId { id: meta.ino(), level })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::alive;

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
    fn a_process_reaped_while_read_is_said_to_have_exited() {
        let gone = unreadable_pid(7, &io::Error::from_raw_os_error(libc::ESRCH)).to_string();
        assert_eq!(gone, "PID 7 exited before tracing started");
        let absent = unreadable_pid(7, &io::Error::from_raw_os_error(libc::ENOENT)).to_string();
        assert!(absent.starts_with("no process with PID 7: "), "{absent}");
        let other = unreadable_pid(7, &io::Error::from_raw_os_error(libc::EACCES)).to_string();
        assert!(other.starts_with("cannot inspect PID 7 in /proc: "), "{other}");
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
        // It lives until the check is done, however long that takes.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let err = check_pid(tid).unwrap_err().to_string();
        drop(done_tx);
        h.join().unwrap();
        assert!(err.contains(&format!("is a thread of process {me}")), "{err}");
    }
}
