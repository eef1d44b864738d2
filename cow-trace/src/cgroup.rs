//! Cgroup v2 paths: a process's, from /proc/PID/cgroup, and where the v2
//! hierarchy is mounted, from /proc/self/mountinfo (at /sys/fs/cgroup on a
//! v2-only system, /sys/fs/cgroup/unified on a hybrid one).

use std::path::{Component, Path, PathBuf};

/// The v2 path in /proc/PID/cgroup text (its `0::/path` line), as a label:
/// without the leading `/`, and `/` for the root.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = path.strip_prefix('/').unwrap_or(path);
    Some(if path.is_empty() { "/".into() } else { path.to_string() })
}

/// Mount point of the cgroup2 filesystem in mountinfo text.
pub fn v2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        // Fields before " - " are the mount's; the first after it is the fstype.
        let (mount, fs) = l.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2").then(|| mount.split_whitespace().nth(4).map(unescape))?
    })
}

/// The directory a `--cgroup` argument names: an absolute path under the
/// mount as is, anything else relative to the mount (a leading `/` of a
/// path outside the mount, as /proc/PID/cgroup prints it, is dropped);
/// with its depth below the mount. `None` for a path that climbs out.
pub fn locate(mount: &Path, arg: &Path) -> Option<(PathBuf, u32)> {
    let rel = match arg.strip_prefix(mount) {
        Ok(rel) => rel,
        Err(_) => arg.strip_prefix("/").unwrap_or(arg),
    };
    let mut level = 0;
    for c in rel.components() {
        match c {
            Component::Normal(_) => level += 1,
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some((if level == 0 { mount.to_path_buf() } else { mount.join(rel) }, level))
}

/// Mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        let octal =
            b.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_line_of_hybrid_and_pure_hierarchies() {
        let hybrid =
            "12:memory:/user.slice\n1:name=systemd:/user.slice/x\n0::/system.slice/redis-server.service\n";
        assert_eq!(parse_proc_cgroup(hybrid).as_deref(), Some("system.slice/redis-server.service"));
        assert_eq!(parse_proc_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_proc_cgroup("3:cpu:/a\n"), None);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let mi = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                  26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
                  27 25 0:24 / /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,memory\n";
        assert_eq!(v2_mount(mi).as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(v2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn cgroup_arguments_are_located_under_the_mount() {
        let m = Path::new("/sys/fs/cgroup/unified");
        let at = |a: &str| locate(m, Path::new(a)).map(|(p, l)| (p.to_string_lossy().into_owned(), l));
        let want = |p: &str, l| Some((p.to_string(), l));
        assert_eq!(
            at("/sys/fs/cgroup/unified/system.slice/x.service"),
            want("/sys/fs/cgroup/unified/system.slice/x.service", 2)
        );
        assert_eq!(at("system.slice/x.service"), want("/sys/fs/cgroup/unified/system.slice/x.service", 2));
        assert_eq!(at("/system.slice"), want("/sys/fs/cgroup/unified/system.slice", 1));
        assert_eq!(at("/sys/fs/cgroup/unified"), want("/sys/fs/cgroup/unified", 0));
        assert_eq!(at("a/../../etc"), None);
    }
}
