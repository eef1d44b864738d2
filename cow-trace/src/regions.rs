//! Memory regions of a process, from `/proc/PID/maps`, and which region a
//! faulting address falls in.
//!
//! Regions are named the way a reader of `maps` would: `[heap]`, `[stack]`,
//! the path of a file-backed mapping, and `[anon <start>]` for anonymous
//! mappings (allocator arenas are those; naming each by its start keeps two
//! arenas apart).

use std::collections::HashMap;

/// A miss in the cached maps re-reads them at most this often.
const MAPS_REREAD_NS: u64 = 100_000_000;

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

struct Cached {
    maps: Maps,
    read_at_ns: u64,
}

/// Processes' maps as last read, re-read when an address is new to them
/// (at most every `MAPS_REREAD_NS`): the layout outlives the process, for
/// outcomes that arrive after it is gone.
pub struct MapsCache {
    cached: HashMap<u32, Cached>,
    /// The text of `/proc/PID/maps`, `None` once the process is gone.
    read: Box<dyn Fn(u32) -> Option<String>>,
}

impl MapsCache {
    pub fn new(read: Box<dyn Fn(u32) -> Option<String>>) -> Self {
        Self { cached: HashMap::new(), read }
    }

    /// Reads `pid`'s maps now unless they are cached already.
    pub fn remember(&mut self, pid: u32, now_ns: u64) {
        if !self.cached.contains_key(&pid) {
            if let Some(text) = (self.read)(pid) {
                self.cached.insert(pid, Cached { maps: Maps::parse(&text), read_at_ns: now_ns });
            }
        }
    }

    pub fn forget(&mut self, pid: u32) {
        self.cached.remove(&pid);
    }

    /// The name of the region of `addr` in `pid`'s layout; `alt`'s maps
    /// stand in when `pid`'s cannot be read (a child has its parent's
    /// layout at the fork). `None`: in no known mapping.
    pub fn region(&mut self, pid: u32, alt: u32, addr: u64, now_ns: u64) -> Option<String> {
        let read = &self.read;
        let read = |p: u32| read(p).or_else(|| read(alt));
        let cached = self.cached.entry(pid).or_insert_with(|| Cached {
            maps: read(pid).map(|t| Maps::parse(&t)).unwrap_or_default(),
            read_at_ns: now_ns,
        });
        if let Some(r) = cached.maps.find(addr) {
            return Some(r.name.clone());
        }
        if now_ns.saturating_sub(cached.read_at_ns) >= MAPS_REREAD_NS {
            if let Some(text) = read(pid) {
                cached.maps = Maps::parse(&text);
            }
            cached.read_at_ns = now_ns;
            return cached.maps.find(addr).map(|r| r.name.clone());
        }
        None
    }
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
}
