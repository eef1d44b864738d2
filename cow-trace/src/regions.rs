//! Memory regions of a process, from `/proc/PID/maps`, and which region a
//! faulting address falls in.
//!
//! Regions are named the way a reader of `maps` would: `[heap]`, `[stack]`,
//! the path of a file-backed mapping, and `[anon <start>]` for anonymous
//! mappings (allocator arenas are those; naming each by its start keeps two
//! arenas apart).

/// One mapping: `[start, end)` and what to call it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub name: String,
}

/// A process's mappings, sorted by start address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    regions: Vec<Region>,
}

impl Maps {
    /// Parses the text of `/proc/PID/maps`. Lines that do not parse are
    /// skipped: the file is the kernel's, a malformed line is not worth
    /// losing the rest for.
    pub fn parse(text: &str) -> Self {
        let mut regions: Vec<Region> = text.lines().filter_map(parse_line).collect();
        regions.sort_by_key(|r| r.start);
        Self { regions }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The region holding `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.start <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (addr < r.end).then_some(r)
    }
}

fn parse_line(line: &str) -> Option<Region> {
    // start-end perms offset dev inode [pathname]; the pathname may hold
    // spaces, so it is whatever follows the fifth field.
    let mut rest = line.trim_start();
    let mut fields = [""; 5];
    for f in &mut fields {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        *f = &rest[..end];
        rest = rest[end..].trim_start();
    }
    let (start, end) = fields[0].split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if fields[1].len() != 4 || fields[4].parse::<u64>().is_err() || end <= start {
        return None;
    }
    let path = rest.trim_end();
    let name = if path.is_empty() { format!("[anon {start:x}]") } else { path.to_string() };
    Some(Region { start, end, name })
}

/// Reads a live process's maps; `None` once it is gone or unreadable.
pub fn read_maps(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIS: &str = "\
55d0c4a00000-55d0c4a6b000 r--p 00000000 fe:01 1316374                    /usr/bin/redis-check-rdb
55d0c4a6b000-55d0c4c3c000 r-xp 0006b000 fe:01 1316374                    /usr/bin/redis-check-rdb
55d0c4d5e000-55d0c4d7c000 rw-p 0025d000 fe:01 1316374                    /usr/bin/redis-check-rdb
55d0c5a1d000-55d0c5a3e000 rw-p 00000000 00:00 0                          [heap]
7f2a34000000-7f2a6c000000 rw-p 00000000 00:00 0 
7f2a6c5f2000-7f2a6c5f6000 rw-p 00000000 00:00 0 
7f2a6c600000-7f2a6c628000 r--p 00000000 fe:01 1311010                    /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd1e0f4000-7ffd1e115000 rw-p 00000000 00:00 0                          [stack]
7ffd1e1b6000-7ffd1e1b8000 r-xp 00000000 00:00 0                          [vdso]
7f00000000-7f00001000 rw-p 00000000 fe:01 42                             /tmp/a file (deleted)
garbage line
";

    #[test]
    fn parses_the_kinds_of_mapping() {
        let m = Maps::parse(REDIS);
        assert_eq!(m.regions.len(), 10);
        assert_eq!(m.find(0x55d0c5a1d000).unwrap().name, "[heap]");
        assert_eq!(m.find(0x55d0c5a3dfff).unwrap().name, "[heap]");
        assert_eq!(m.find(0x7f2a34001234).unwrap().name, "[anon 7f2a34000000]");
        assert_eq!(m.find(0x7f2a6c5f2000).unwrap().name, "[anon 7f2a6c5f2000]");
        assert_eq!(m.find(0x55d0c4d60000).unwrap().name, "/usr/bin/redis-check-rdb");
        assert_eq!(m.find(0x7ffd1e114fff).unwrap().name, "[stack]");
        assert_eq!(m.find(0x7f00000800).unwrap().name, "/tmp/a file (deleted)");
    }

    #[test]
    fn addresses_outside_every_mapping_are_not_attributed() {
        let m = Maps::parse(REDIS);
        assert_eq!(m.find(0), None);
        assert_eq!(m.find(0x55d0c5a3e000), None, "end is exclusive");
        assert_eq!(m.find(0x7f2a6c000000), None, "gap between two anonymous mappings");
        assert_eq!(m.find(u64::MAX), None);
        assert!(Maps::parse("").is_empty());
        assert_eq!(Maps::parse("").find(0x1000), None);
    }

    #[test]
    fn own_maps_contain_own_stack_and_heap_data() {
        let m = Maps::parse(&read_maps(std::process::id()).expect("own maps"));
        let local = 0u64;
        assert!(m.find(&local as *const u64 as u64).is_some(), "a local lies on some stack");
        let boxed = Box::new([0u8; 64]);
        assert!(m.find(boxed.as_ptr() as u64).is_some(), "heap data lies in some mapping");
        assert!(read_maps(u32::MAX).is_none());
    }
}
