//! The memory cgroup of a live process and the limit that applies to it:
//! cgroup v1 (`memory` controller hierarchy, `memory.limit_in_bytes`) or v2
//! (`memory.max`, when the v2 hierarchy has the memory controller). Hybrid
//! hosts mount both; the one with the memory controller is used.

use std::{
    fs,
    path::{Path, PathBuf},
};

use cow_trace::ending::MemCgroup;

/// v1 reports "no limit" as the largest page-aligned `long`; anything this
/// large is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// Where the memory hierarchies are mounted, from /proc/self/mountinfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// A cgroup v1 mount with the memory controller.
    pub v1_memory: Option<PathBuf>,
    /// The cgroup v2 mount, when its root enables the memory controller.
    pub v2: Option<PathBuf>,
}

/// Parses mountinfo: fields are `id parent dev root mountpoint opts
/// [optional...] - fstype source superopts`.
pub fn parse_mountinfo(text: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut v1, mut v2) = (None, None);
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount) = left.split_whitespace().nth(4) else { continue };
        let mut r = right.split_whitespace();
        let (fstype, superopts) = (r.next(), r.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup") if superopts.split(',').any(|o| o == "memory") => {
                v1.get_or_insert_with(|| PathBuf::from(mount));
            }
            Some("cgroup2") => {
                v2.get_or_insert_with(|| PathBuf::from(mount));
            }
            _ => {}
        }
    }
    (v1, v2)
}

impl Mounts {
    pub fn read() -> Self {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (v1_memory, v2) = parse_mountinfo(&text);
        let v2 = v2.filter(|root| {
            fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|w| w == "memory"))
        });
        Self { v1_memory, v2 }
    }

    /// The memory cgroup of live process `pid` and its limit, or `None`
    /// when the process is gone or no hierarchy has the memory controller.
    pub fn of(&self, pid: u32) -> Option<MemCgroup> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let (v1_path, v2_path) = parse_proc_cgroup(&text);
        if let (Some(root), Some(path)) = (&self.v1_memory, v1_path) {
            return Some(limit_of(root, &path, "memory.limit_in_bytes"));
        }
        if let (Some(root), Some(path)) = (&self.v2, v2_path) {
            return Some(limit_of(root, &path, "memory.max"));
        }
        None
    }
}

/// The v1 memory path and the v2 path in /proc/PID/cgroup
/// (`hierarchy-id:controllers:path` lines; v2's is `0::path`).
pub fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v1, mut v2) = (None, None);
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else if ctrls.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    (v1, v2)
}

/// A limit file's value: `None` for no limit (`max`, or v1's huge value).
pub fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&v| v < V1_UNLIMITED)
}

/// The nearest cgroup from `path` up to the root of the hierarchy at `root`
/// with a limit in `file`; `path` itself, with no limit, when none has one.
fn limit_of(root: &Path, path: &str, file: &str) -> MemCgroup {
    let mut at = Path::new(path);
    loop {
        let rel = at.strip_prefix("/").unwrap_or(at);
        if let Some(limit) = fs::read_to_string(root.join(rel).join(file)).ok().and_then(|t| parse_limit(&t))
        {
            return MemCgroup { path: at.display().to_string(), limit_bytes: Some(limit) };
        }
        match at.parent() {
            Some(up) => at = up,
            None => return MemCgroup { path: path.to_string(), limit_bytes: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_and_unified_mounts() {
        let hybrid = "\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw
30 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
";
        assert_eq!(
            parse_mountinfo(hybrid),
            (Some("/sys/fs/cgroup/memory".into()), Some("/sys/fs/cgroup/unified".into()))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mountinfo(unified), (None, Some("/sys/fs/cgroup".into())));
    }

    #[test]
    fn proc_cgroup_lines() {
        let hybrid = "12:memory:/x/y\n4:cpu,cpuacct:/\n1:name=systemd:/init.scope\n0::/init.scope\n";
        assert_eq!(parse_proc_cgroup(hybrid), (Some("/x/y".into()), Some("/init.scope".into())));
        // A path may hold ':'.
        assert_eq!(parse_proc_cgroup("0::/a:b\n"), (None, Some("/a:b".into())));
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("157286400\n"), Some(150 << 20));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
    }
}
