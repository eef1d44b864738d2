//! Launch mode: start the command held at a gate until tracing is attached,
//! so that nothing it does (its first fork included) goes unseen; with
//! `-u USER`, as that user.
//!
//! `std::process::Command::spawn` waits for the child's exec, which would
//! deadlock with a gate in `pre_exec`; hence a plain fork/exec here, done
//! before the async runtime starts its threads.

use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::PathBuf,
};

use anyhow::{anyhow, bail, Context as _, Result};
use cow_trace::sanitize::for_terminal;

/// What the child reports failed, with its errno, before it exits.
const STAGE_EXEC: i32 = 0;
const STAGE_USER: i32 = 1;

pub struct Gated {
    pub pid: u32,
    pub program: String,
    gate: Option<OwnedFd>,
    exec_err: OwnedFd,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Resolves the program as a shell would: a name with a slash is a path,
/// anything else is looked up in PATH.
pub fn resolve(program: &OsString) -> Result<PathBuf> {
    // The command line is the operator's, but may be pasted from anywhere.
    let shown = program.to_string_lossy();
    let shown = for_terminal(&shown);
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        if !path.is_file() {
            bail!("cannot run {shown}: no such file");
        }
        return Ok(path);
    }
    which::which(program).map_err(|_| anyhow!("command not found: {shown} (not in PATH)"))
}

/// Who a launched command runs as (`-u USER`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups, the user's primary group among them.
    pub groups: Vec<libc::gid_t>,
}

/// Looks `name` up in the user database (as `id USER` would), with the
/// groups `initgroups` would give it: done before the fork, since the child
/// may only make async-signal-safe calls.
pub fn lookup_user(name: &str) -> Result<Identity> {
    let unknown = || anyhow!("no such user: {} (see `getent passwd`)", for_terminal(name));
    let c_name = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data, filled in by getpwnam_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives pw's use.
    let rc =
        unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc)).context("cannot read the user database");
    }
    if found.is_null() {
        return Err(unknown());
    }
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: groups holds n entries; getgrouplist sets n to the count.
        let rc = unsafe { libc::getgrouplist(c_name.as_ptr(), pw.pw_gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            break;
        }
        groups.resize((n as usize).max(groups.len() * 2), 0);
    }
    Ok(Identity { uid: pw.pw_uid, gid: pw.pw_gid, groups })
}

/// Forks a child that waits at the gate, then execs `argv`, as `user` when
/// given.
pub fn spawn_gated(argv: &[OsString], user: Option<&Identity>) -> Result<Gated> {
    let path = resolve(&argv[0])?;
    let c_path = CString::new(path.as_os_str().as_bytes()).context("NUL in command path")?;
    let c_args = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("NUL byte in a command argument")?;
    let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    c_argv.push(std::ptr::null());

    let (gate_r, gate_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // SAFETY: the child only calls async-signal-safe functions (read, signal, execv,
    // write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error()).context("fork failed");
    }
    if pid == 0 {
        unsafe {
            libc::close(gate_w.as_raw_fd());
            libc::close(err_r.as_raw_fd());
            let mut b = 0u8;
            // EOF instead of a byte: the tracer gave up; do not run.
            if libc::read(gate_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1) != 1 {
                libc::_exit(127);
            }
            // The Rust runtime ignores SIGPIPE, and an exec keeps ignored
            // signals ignored: give the command the default a shell would.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // Groups first, then the gid, then the uid: each needs the
            // privilege the next one drops. Failing any is reported, not run.
            let dropped = match user {
                Some(u) => {
                    libc::setgroups(u.groups.len(), u.groups.as_ptr()) == 0
                        && libc::setgid(u.gid) == 0
                        && libc::setuid(u.uid) == 0
                }
                None => true,
            };
            let stage: i32 = if dropped {
                libc::execv(c_path.as_ptr(), c_argv.as_ptr());
                STAGE_EXEC
            } else {
                STAGE_USER
            };
            let report = [stage, *libc::__errno_location()];
            libc::write(err_w.as_raw_fd(), report.as_ptr().cast(), 8);
            libc::_exit(127);
        }
    }
    drop(gate_r);
    drop(err_w);
    Ok(Gated {
        pid: pid as u32,
        program: argv[0].to_string_lossy().into_owned(),
        gate: Some(gate_w),
        exec_err: err_r,
    })
}

impl Gated {
    /// Lets the child exec; fails if the exec did.
    pub fn release(&mut self) -> Result<()> {
        let gate = self.gate.take().expect("released once");
        let one = 1u8;
        // SAFETY: writing one byte from a valid buffer.
        if unsafe { libc::write(gate.as_raw_fd(), (&one as *const u8).cast(), 1) } != 1 {
            return Err(io::Error::last_os_error()).context("cannot release the command");
        }
        drop(gate);
        let mut report = [0i32; 2];
        // The close-on-exec pipe reads EOF when the exec succeeded.
        let n = unsafe { libc::read(self.exec_err.as_raw_fd(), report.as_mut_ptr().cast(), 8) };
        if n == 8 {
            reap(self.pid);
            let [stage, errno] = report;
            let err = io::Error::from_raw_os_error(errno);
            let program = for_terminal(&self.program);
            if stage == STAGE_USER {
                bail!("cannot run {program} as the user given with -u: {err}");
            }
            bail!("cannot run {program}: {err}");
        }
        Ok(())
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        // Never released: closing the gate makes the child exit unrun.
        if self.gate.take().is_some() {
            reap(self.pid);
        }
    }
}

/// Waits for `pid` and returns its raw wait status.
pub fn reap(pid: u32) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: plain waitpid on our own child.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return status;
        }
    }
}

/// The shell convention: exit code, or 128 + signal number.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Ends a command whose run failed before its shutdown: SIGTERM, SIGKILL
/// after `grace`, then reaps it. Signals go through `pidfd`, so a command
/// that already ended (and whose PID may be reused) is left alone.
pub fn end_abandoned(pid: u32, pidfd: OwnedFd, grace: std::time::Duration) {
    let signal = |sig: i32| {
        // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, 0usize, 0u32) == 0 }
    };
    if !signal(libc::SIGTERM) {
        return; // already gone
    }
    let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; a pidfd polls readable once the process exits.
    if unsafe { libc::poll(&mut pfd, 1, grace.as_millis() as i32) } <= 0 {
        signal(libc::SIGKILL);
    }
    reap(pid);
}

/// How the command ended, from its raw wait status.
pub fn command_end(status: i32, ended_by_cow_trace: bool) -> cow_trace::output::CommandEnd {
    let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
    cow_trace::output::CommandEnd { exit_code: exit_code(status), signal, ended_by_cow_trace }
}

/// A pidfd becomes readable when the process exits.
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gated_command_runs_only_when_released() {
        let mut g = spawn_gated(&["sh".into(), "-c".into(), "exit 7".into()], None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Still at the gate: not exited.
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(g.pid as i32, &mut status, libc::WNOHANG) }, 0);
        g.release().unwrap();
        assert_eq!(exit_code(reap(g.pid)), 7);
    }

    #[test]
    fn unreleased_command_never_runs() {
        let dir = std::env::temp_dir().join(format!("cow-trace-gate-{}", std::process::id()));
        let marker = dir.to_string_lossy().to_string();
        let g = spawn_gated(&["sh".into(), "-c".into(), format!("touch {marker}").into()], None).unwrap();
        drop(g);
        assert!(!dir.exists());
    }

    #[test]
    fn missing_commands_fail_early() {
        let e = spawn_gated(&["no-such-command-xyz".into()], None).err().unwrap().to_string();
        assert_eq!(e, "command not found: no-such-command-xyz (not in PATH)");
        let e = spawn_gated(&["/nonexistent/bin".into()], None).err().unwrap().to_string();
        assert_eq!(e, "cannot run /nonexistent/bin: no such file");
        // A file that exists but is no program fails at release.
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("cow-trace-notexec-{}", std::process::id()));
        std::fs::write(&path, [0u8, 1, 2, 3]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut g = spawn_gated(&[path.clone().into()], None).unwrap();
        let e = g.release().unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(e, format!("cannot run {}: Exec format error (os error 8)", path.display()));
    }

    #[test]
    fn users_are_looked_up_with_their_groups() {
        let root = lookup_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        let e = lookup_user("no-such-user-xyz").unwrap_err().to_string();
        assert_eq!(e, "no such user: no-such-user-xyz (see `getent passwd`)");
        assert!(lookup_user("\x1b[2J").unwrap_err().to_string().contains("\\x1b[2J"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 128 + 9);
    }
}
