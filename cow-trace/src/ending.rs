//! How a process ended: its wait status, whether the OOM killer chose it,
//! and the memory cgroup it ran in, as JSON fields and in words.

use serde::Serialize;

use crate::{fmt::fmt_bytes, sanitize::for_terminal};

/// The memory cgroup whose limit applied to a process: its own, or the
/// nearest ancestor with a limit (cgroup v1 `memory.limit_in_bytes`, v2
/// `memory.max`). Read when the process was forked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemCgroup {
    /// Path inside the memory hierarchy, as /proc/PID/cgroup gives it.
    #[serde(rename = "memory_cgroup")]
    pub path: String,
    /// `None`: no limit on it or any ancestor.
    #[serde(rename = "memory_limit_bytes", skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
}

/// How a process ended, from its exit event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ending {
    /// The status it passed to exit(2), when it exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed it, by name (`SIGKILL`), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<String>,
    /// The OOM killer chose it (and sent it SIGKILL).
    pub oom_killed: bool,
}

impl Ending {
    /// From a wait status (`status`, as the kernel's `exit_code`) and the
    /// OOM killer's mark.
    pub fn new(status: u32, oom_killed: bool) -> Self {
        let status = status as i32;
        let (exit_code, exit_signal) = if libc::WIFSIGNALED(status) {
            (None, Some(signal_name(libc::WTERMSIG(status))))
        } else {
            (Some(libc::WEXITSTATUS(status)), None)
        };
        Self { exit_code, exit_signal, oom_killed }
    }

    /// In words, for a terminal, e.g. "killed by the OOM killer (memory
    /// cgroup /x, limit 150.0MiB)", "killed by SIGTERM", "exited with status
    /// 3". A cgroup's name is chosen by whoever may create it: sanitised.
    pub fn describe(&self, memcg: Option<&MemCgroup>) -> String {
        if self.oom_killed {
            let within = match memcg {
                Some(MemCgroup { path, limit_bytes: Some(l) }) => {
                    format!(" (memory cgroup {}, limit {})", for_terminal(path), fmt_bytes(*l))
                }
                Some(MemCgroup { path, limit_bytes: None }) => {
                    format!(" (memory cgroup {}, no limit)", for_terminal(path))
                }
                None => String::new(),
            };
            return format!("killed by the OOM killer{within}");
        }
        match (&self.exit_signal, self.exit_code) {
            (Some(sig), _) => format!("killed by {sig}"),
            (None, Some(code)) => format!("exited with status {code}"),
            (None, None) => "ended".into(),
        }
    }

    /// For a table column: `0`, `3`, `SIGKILL`, `OOM-kill`.
    pub fn short(&self) -> String {
        if self.oom_killed {
            return "OOM-kill".into();
        }
        match (&self.exit_signal, self.exit_code) {
            (Some(sig), _) => sig.clone(),
            (None, Some(code)) => code.to_string(),
            (None, None) => "-".into(),
        }
    }
}

/// `SIGKILL` for 9 (x86 and arm64 numbering); `SIG42` for a number without
/// a name here.
pub fn signal_name(sig: i32) -> String {
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match NAMES.get(sig as usize) {
        Some(n) if sig > 0 => (*n).to_string(),
        _ => format!("SIG{sig}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_in_words() {
        let exited = Ending::new(3 << 8, false);
        assert_eq!((exited.exit_code, exited.exit_signal.as_deref()), (Some(3), None));
        assert_eq!(exited.describe(None), "exited with status 3");
        assert_eq!(exited.short(), "3");
        let killed = Ending::new(9, false);
        assert_eq!((killed.exit_code, killed.exit_signal.as_deref()), (None, Some("SIGKILL")));
        assert_eq!(killed.describe(None), "killed by SIGKILL");
        // A core dump sets bit 7; the signal is the low 7 bits.
        assert_eq!(Ending::new(0x80 | 11, false).describe(None), "killed by SIGSEGV");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(40), "SIG40");
    }

    #[test]
    fn an_oom_kill_names_the_cgroup_and_its_limit() {
        let oom = Ending::new(9, true);
        let cg = MemCgroup { path: "/x".into(), limit_bytes: Some(150 << 20) };
        assert_eq!(oom.describe(Some(&cg)), "killed by the OOM killer (memory cgroup /x, limit 150.0MiB)");
        assert_eq!(oom.describe(None), "killed by the OOM killer");
        // A delegated cgroup's name is anyone's text: never raw on a terminal.
        let hostile = MemCgroup { path: "/a\x1b[2J\nb".into(), limit_bytes: None };
        assert_eq!(
            oom.describe(Some(&hostile)),
            "killed by the OOM killer (memory cgroup /a\\x1b[2J\\nb, no limit)"
        );
        assert_eq!(oom.short(), "OOM-kill");
        let v = serde_json::to_value(&oom).unwrap();
        assert_eq!((v["exit_signal"].as_str(), v["oom_killed"].as_bool()), (Some("SIGKILL"), Some(true)));
        assert!(v.get("exit_code").is_none());
        let v = serde_json::to_value(&cg).unwrap();
        assert_eq!(
            (v["memory_cgroup"].as_str(), v["memory_limit_bytes"].as_u64()),
            (Some("/x"), Some(150 << 20))
        );
    }
}
