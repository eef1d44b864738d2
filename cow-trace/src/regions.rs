//! Memory regions of a process, from `/proc/PID/maps`, and which region a
//! faulting address falls in.
//!
//! Regions are named the way a reader of `maps` would: `[heap]`, `[stack]`,
//! the path of a file-backed mapping, and `[anon <start>]` for anonymous
//! mappings (allocator arenas are those; naming each by its start keeps two
//! arenas apart).
//!
//! Every name but the bracketed ones comes from whoever named the file, so
//! the file is read as bytes and parsed without trusting it (see
//! SECURITY.md); names are kept exact (see [`lossless`]) and sanitised only
//! when printed.

use crate::{sanitize::lossless, FastMap};

/// A miss in the cached maps re-reads them at most this often.
const MAPS_REREAD_NS: u64 = 100_000_000;

/// One mapping: `[start, end)`, what to call it, and for a file the offset
/// in it of `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub name: String,
    pub offset: u64,
    /// Maps a file (its name is the file's path).
    pub file: bool,
}

/// Where an instruction is, in terms that outlive the process: a file and
/// an offset in it, else the region's name (anonymous code, the vDSO).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CodeAt {
    File {
        path: String,
        offset: u64,
    },
    Region(String),
    /// Written by the kernel in this system call (x86_64 number).
    Syscall(u64),
    /// In no known mapping, or no instruction pointer at all (0).
    Unknown,
}

/// Where a written address is, for naming the data there: for a module's
/// own data (its file-backed data segment, or the anonymous `.bss` that
/// follows it) the module and the address relative to where its first
/// mapping starts; else just the region.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataAt {
    Module { path: String, region: String, rel: u64 },
    Region(String),
}

/// A process's mappings, sorted by start address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    regions: Vec<Region>,
}

impl Maps {
    /// Parses the bytes of `/proc/PID/maps`. Lines that do not parse are
    /// skipped: a malformed line is not worth losing the rest for. The
    /// kernel lets go of the address space between two read() calls, so a
    /// process that maps or unmaps meanwhile can make two lines overlap (a
    /// region seen before and after it moved): the one with the lower start
    /// is kept, so that every address has at most one region.
    pub fn parse(text: &[u8]) -> Self {
        let mut regions: Vec<Region> = text.split(|&b| b == b'\n').filter_map(parse_line).collect();
        regions.sort_by_key(|r| (r.start, r.end));
        let mut kept: Vec<Region> = Vec::with_capacity(regions.len());
        for r in regions {
            if kept.last().is_none_or(|last| last.end <= r.start) {
                kept.push(r);
            }
        }
        Self { regions: kept }
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// This layout, with the regions of `older` that none of its own
    /// overlaps: what a process mapped at some time, for addresses seen
    /// before a later read (a library it unmapped since).
    pub fn with_older(mut self, older: &Maps) -> Maps {
        let gone: Vec<Region> = older
            .regions
            .iter()
            .filter(|o| {
                let i = self.regions.partition_point(|r| r.end <= o.start);
                self.regions.get(i).is_none_or(|r| r.start >= o.end)
            })
            .cloned()
            .collect();
        if !gone.is_empty() {
            self.regions.extend(gone);
            self.regions.sort_by_key(|r| r.start);
        }
        self
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The region holding `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&Region> {
        self.index_of(addr).map(|i| &self.regions[i])
    }

    fn index_of(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.start <= addr).checked_sub(1)?;
        (addr < self.regions[i].end).then_some(i)
    }

    /// The file whose `.bss` anonymous region `i` is: the file mapped
    /// right before it, across the anonymous regions an madvise or
    /// mprotect split the `.bss` into.
    fn bss_owner(&self, i: usize) -> Option<&Region> {
        let mut at = i;
        while self.regions[at].name.starts_with("[anon ") {
            let prev = &self.regions[at.checked_sub(1)?];
            if prev.end != self.regions[at].start {
                return None;
            }
            at -= 1;
        }
        Some(&self.regions[at]).filter(|r| r.file)
    }

    /// Where instruction `ip` is (see [`CodeAt`]).
    pub fn code_at(&self, ip: u64) -> CodeAt {
        match self.find(ip) {
            _ if ip == 0 => CodeAt::Unknown,
            Some(r) if r.file => CodeAt::File { path: r.name.clone(), offset: ip - r.start + r.offset },
            Some(r) => CodeAt::Region(r.name.clone()),
            None => CodeAt::Unknown,
        }
    }

    /// Where written address `addr` is (see [`DataAt`]); `None` outside
    /// every mapping. An anonymous region right after a file's mapping is
    /// taken for that file's `.bss`, as the loader lays it out.
    pub fn data_at(&self, addr: u64) -> Option<DataAt> {
        let i = self.index_of(addr)?;
        let r = &self.regions[i];
        let owner = if r.file { Some(r) } else { self.bss_owner(i) };
        let region = DataAt::Region(r.name.clone());
        let Some(owner) = owner else { return Some(region) };
        // The module's load base: the start of its mapping at file offset 0.
        let base = self.regions.iter().find(|m| m.file && m.name == owner.name && m.offset == 0);
        Some(match base {
            Some(b) if addr >= b.start => {
                DataAt::Module { path: owner.name.clone(), region: r.name.clone(), rel: addr - b.start }
            }
            _ => region,
        })
    }
}

fn skip_spaces(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ').count();
    &s[n..]
}

fn hex(field: &[u8]) -> Option<u64> {
    // from_str_radix alone would take a leading `+`.
    if field.is_empty() || field.len() > 16 || !field.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok()
}

fn parse_line(line: &[u8]) -> Option<Region> {
    // start-end perms offset dev inode [pathname]; the pathname may hold
    // spaces, so it is whatever follows the fifth field, padding removed.
    let mut rest = skip_spaces(line);
    let mut fields: [&[u8]; 5] = [&[]; 5];
    for f in &mut fields {
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        *f = &rest[..end];
        rest = skip_spaces(&rest[end..]);
    }
    let dash = fields[0].iter().position(|&b| b == b'-')?;
    let start = hex(&fields[0][..dash])?;
    let end = hex(&fields[0][dash + 1..])?;
    let inode_ok = !fields[4].is_empty() && fields[4].iter().all(u8::is_ascii_digit);
    if fields[1].len() != 4
        || hex(fields[2]).is_none()
        || !fields[3].contains(&b':')
        || !inode_ok
        || end <= start
    {
        return None;
    }
    // Not trimmed at the end: a file name may end in a space. A trailing
    // ` (deleted)` is kept too: the kernel's, or part of the name; either
    // way it is what `maps` shows.
    let name = if rest.is_empty() { format!("[anon {start:x}]") } else { unescape_newlines(rest) };
    let file = rest.first() == Some(&b'/');
    Some(Region { start, end, name, offset: hex(fields[2])?, file })
}

/// The kernel writes a newline in a path as `\012` (and escapes nothing
/// else, not even a backslash). Turned back into the newline the file's
/// name holds, so JSON carries the real path; a name holding the text
/// `\012` reads the same in `maps` and cannot be told apart.
fn unescape_newlines(path: &[u8]) -> String {
    const ESCAPED: &[u8] = b"\\012";
    if !path.windows(ESCAPED.len()).any(|w| w == ESCAPED) {
        return lossless(path).into_owned();
    }
    let mut raw = Vec::with_capacity(path.len());
    let mut rest = path;
    while !rest.is_empty() {
        if rest.starts_with(ESCAPED) {
            raw.push(b'\n');
            rest = &rest[ESCAPED.len()..];
        } else {
            raw.push(rest[0]);
            rest = &rest[1..];
        }
    }
    lossless(&raw).into_owned()
}

struct Cached {
    maps: Maps,
    read_at_ns: u64,
}

/// Processes' maps as last read, re-read when an address is new to them
/// (at most every `MAPS_REREAD_NS`): the layout outlives the process, for
/// outcomes that arrive after it is gone.
pub struct MapsCache {
    cached: FastMap<u32, Cached>,
    /// The bytes of `/proc/PID/maps`, `None` once the process is gone.
    read: Box<dyn Fn(u32) -> Option<Vec<u8>>>,
}

impl MapsCache {
    pub fn new(read: Box<dyn Fn(u32) -> Option<Vec<u8>>>) -> Self {
        Self { cached: FastMap::default(), read }
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
        self.maps(pid, alt, addr, now_ns).find(addr).map(|r| r.name.clone())
    }

    /// `pid`'s layout as [`region`](Self::region) finds it for `addr`.
    pub fn maps(&mut self, pid: u32, alt: u32, addr: u64, now_ns: u64) -> &Maps {
        let read = &self.read;
        let read = |p: u32| read(p).or_else(|| read(alt));
        let cached = self.cached.entry(pid).or_insert_with(|| Cached {
            maps: read(pid).map(|t| Maps::parse(&t)).unwrap_or_default(),
            read_at_ns: now_ns,
        });
        if cached.maps.find(addr).is_none() && now_ns.saturating_sub(cached.read_at_ns) >= MAPS_REREAD_NS {
            if let Some(text) = read(pid) {
                cached.maps = Maps::parse(&text);
            }
            cached.read_at_ns = now_ns;
        }
        &cached.maps
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
    fn code_and_data_locations_outlive_the_process() {
        let m = Maps::parse(REDIS.as_bytes());
        let bin = "/usr/bin/redis-check-rdb".to_string();
        // Text: file offset = address - start + the mapping's offset.
        assert_eq!(m.code_at(0x55d0c4a6b010), CodeAt::File { path: bin.clone(), offset: 0x6b010 });
        assert_eq!(m.code_at(0x7ffd1e1b6100), CodeAt::Region("[vdso]".into()));
        assert_eq!(m.code_at(0), CodeAt::Unknown);
        assert_eq!(m.code_at(0x10), CodeAt::Unknown);
        // Data in the module's own segment: relative to its first mapping.
        let data = m.data_at(0x55d0c4d60008).unwrap();
        assert_eq!(data, DataAt::Module { path: bin.clone(), region: bin.clone(), rel: 0x360008 });
        // The heap follows the binary with a gap: not its .bss.
        assert_eq!(m.data_at(0x55d0c5a1d000), Some(DataAt::Region("[heap]".into())));
        assert_eq!(m.data_at(0x10), None);
        // An anonymous mapping right after a file's is that file's .bss.
        let bss = format!(
            "{REDIS}55d0c4d7c000-55d0c4d7d000 rw-p 00000000 00:00 0\n55d0c4d7d000-55d0c4d90000 rw-p 00000000 00:00 0\n"
        );
        let m = Maps::parse(bss.as_bytes());
        let at = m.data_at(0x55d0c4d7c100).unwrap();
        let region = "[anon 55d0c4d7c000]".to_string();
        assert_eq!(at, DataAt::Module { path: bin.clone(), region, rel: 0x37c100 });
        // Split in two (madvise): the second part is the file's too.
        let at = m.data_at(0x55d0c4d8f000).unwrap();
        let region = "[anon 55d0c4d7d000]".to_string();
        assert_eq!(at, DataAt::Module { path: bin, region, rel: 0x38f000 });
    }

    #[test]
    fn parses_the_kinds_of_mapping() {
        let m = Maps::parse(REDIS.as_bytes());
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
    fn hostile_file_names_are_kept_whole() {
        let long = format!("/tmp/{}", "x".repeat(4000));
        let text = [
            b"1000-2000 rw-p 00000000 fe:01 7                          /tmp/a b  c \n".to_vec(),
            b"2000-3000 rw-p 00000000 fe:01 8 /tmp/\x1b[2J\\012file\x07 (deleted)\n".to_vec(),
            b"3000-4000 rw-p 00000000 fe:01 9 /tmp/bad\xff\xfeutf8\n".to_vec(),
            format!("4000-5000 rw-p 00000000 fe:01 10 {long}\n").into_bytes(),
            // Malformed: no inode, short perms, `+` in a hex field, an end
            // before the start, a truncated line.
            b"5000-6000 rw-p 00000000 fe:01 /x\n6000-7000 rw 00000000 fe:01 1 /x\n".to_vec(),
            b"+7000-8000 rw-p 00000000 fe:01 1 /x\n9000-8000 rw-p 00000000 fe:01 1 /x\n9000-a0".to_vec(),
        ]
        .concat();
        let m = Maps::parse(&text);
        let names: Vec<&str> = m.regions().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["/tmp/a b  c ", "/tmp/\x1b[2J\nfile\x07 (deleted)", "/tmp/bad\\xff\\xfeutf8", long.as_str()]
        );
    }

    #[test]
    fn lines_that_overlap_after_a_concurrent_change_leave_one_region_per_address() {
        // Read a page at a time while the process remapped: the same
        // mapping grown, then a new one inside an old one.
        let text = b"1000-3000 rw-p 00000000 00:00 0 \n1000-2000 rw-p 00000000 00:00 0 \n\
                     5000-9000 rw-p 00000000 fe:01 1 /a\n6000-7000 rw-p 00000000 fe:01 2 /b\n\
                     9000-a000 rw-p 00000000 fe:01 3 /c\n";
        let m = Maps::parse(text);
        let spans: Vec<_> = m.regions().iter().map(|r| (r.start, r.end, r.name.as_str())).collect();
        assert_eq!(spans, [(0x1000, 0x2000, "[anon 1000]"), (0x5000, 0x9000, "/a"), (0x9000, 0xa000, "/c")]);
        assert_eq!(m.find(0x6800).unwrap().name, "/a");
    }

    #[test]
    fn addresses_outside_every_mapping_are_not_attributed() {
        let m = Maps::parse(REDIS.as_bytes());
        assert_eq!(m.find(0), None);
        assert_eq!(m.find(0x55d0c5a3e000), None, "end is exclusive");
        assert_eq!(m.find(0x7f2a6c000000), None, "gap between two anonymous mappings");
        assert_eq!(m.find(u64::MAX), None);
        assert!(Maps::parse(b"").is_empty());
        assert_eq!(Maps::parse(b"").find(0x1000), None);
    }
}

/// Properties of the parser over arbitrary and generated `maps` text.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// A mapping as the kernel would list it: page-aligned gap before it,
    /// length, inode, and a file name (`None`: anonymous).
    type Spec = (u64, u64, u32, Option<Vec<u8>>);

    fn mapping() -> impl Strategy<Value = Spec> {
        // No backslash in generated names: `\012` in a name cannot be told
        // from an escaped newline (see unescape_newlines).
        let name = prop::collection::vec(
            any::<u8>().prop_filter("no NUL or backslash", |&b| b != 0 && b != b'\\'),
            0..300,
        );
        (0u64..64, 1u64..64, any::<u32>(), prop::option::of(name))
    }

    /// The line the kernel writes for a mapping (show_map_vma): a newline
    /// in the path escaped as `\012`, the path padded to column 73.
    fn line(start: u64, end: u64, inode: u32, name: Option<&[u8]>) -> Vec<u8> {
        let mut l = format!("{start:08x}-{end:08x} rw-p 00000000 fe:01 {inode} ").into_bytes();
        if let Some(name) = name {
            l.resize(l.len().max(73), b' ');
            l.push(b'/');
            for &b in name {
                if b == b'\n' {
                    l.extend_from_slice(b"\\012");
                } else {
                    l.push(b);
                }
            }
        }
        l.push(b'\n');
        l
    }

    fn layout(specs: &[Spec]) -> (Vec<u8>, Vec<Region>) {
        let (mut text, mut want, mut at) = (Vec::new(), Vec::new(), 0x1000u64);
        for (gap, len, inode, name) in specs {
            let start = at + gap * 0x1000;
            let end = start + len * 0x1000;
            at = end;
            text.extend(line(start, end, *inode, name.as_deref()));
            let file = name.is_some();
            let name = match name {
                Some(n) => lossless(&[b"/", n.as_slice()].concat()).into_owned(),
                None => format!("[anon {start:x}]"),
            };
            want.push(Region { start, end, name, offset: 0, file });
        }
        (text, want)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_bytes_parse_to_disjoint_sorted_regions(
            bytes in prop::collection::vec(any::<u8>(), 0..2000),
            specs in prop::collection::vec(mapping(), 0..8),
        ) {
            // Garbage alone, and garbage spliced into a real listing.
            let (good, _) = layout(&specs);
            for text in [bytes.clone(), [good.as_slice(), &bytes, &good].concat()] {
                let m = Maps::parse(&text);
                for pair in m.regions().windows(2) {
                    prop_assert!(pair[0].end <= pair[1].start, "{:?}", pair);
                }
                for r in m.regions() {
                    prop_assert!(r.start < r.end);
                    prop_assert_eq!(m.find(r.start), Some(r));
                    prop_assert_eq!(m.find(r.end - 1), Some(r));
                }
            }
        }

        #[test]
        fn kernel_listings_round_trip(specs in prop::collection::vec(mapping(), 0..12)) {
            let (text, want) = layout(&specs);
            let m = Maps::parse(&text);
            prop_assert_eq!(m.regions(), want.as_slice());
        }

        #[test]
        fn a_malformed_line_is_dropped_and_the_rest_kept(
            specs in prop::collection::vec(mapping(), 1..8),
            victim in any::<prop::sample::Index>(),
            how in 0usize..5,
        ) {
            let (text, mut want) = layout(&specs);
            let mut lines: Vec<Vec<u8>> = text.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let i = victim.index(lines.len());
            let l = &mut lines[i];
            let sp = |l: &Vec<u8>, n: usize| l.iter().enumerate().filter(|(_, &b)| b == b' ').nth(n).unwrap().0;
            match how {
                // Start not hex.
                0 => l[0] = b'g',
                // Permissions of three letters.
                1 => {
                    l.remove(sp(l, 0) + 1);
                }
                // No inode.
                2 => {
                    let at = sp(l, 4);
                    l.drain(sp(l, 3)..at);
                }
                // A sign before the hex.
                3 => l.insert(0, b'+'),
                // Cut short after the dash.
                _ => {
                    let d = l.iter().position(|&b| b == b'-').unwrap();
                    l.truncate(d + 1);
                    l.push(b'\n');
                }
            }
            want.remove(i);
            let m = Maps::parse(&lines.concat());
            prop_assert_eq!(m.regions(), want.as_slice());
        }
    }
}
