//! Who made the copies: an episode's copies counted by the instruction that
//! wrote and by the location written, then named and ranked when the
//! episode is reported.
//!
//! Locations are kept as file + offset the moment a copy is seen (from the
//! layout read at the fork), so a process that exited long before the
//! report is still named from its files.

use std::{collections::HashMap, sync::Arc};

use serde::Serialize;

use crate::{
    episode::UNMAPPED,
    event::Fault,
    regions::{CodeAt, DataAt, Maps},
    symbolize::{CodeName, DataName, Symbolizer},
    FastMap,
};

/// Copies by code location and by written location. Each instruction and
/// each written mapping is placed in the layout once, the first time it is
/// seen: the event path then costs a hash lookup or two per copy.
#[derive(Clone, Debug, Default)]
pub struct Attribution {
    /// By (kernel mode, instruction pointer or system call).
    code: FastMap<(bool, u64), (CodeAt, u64)>,
    /// By the start of the mapping written (`u64::MAX`: none).
    data: FastMap<u64, Written>,
}

/// Copies into one mapping: a module's data by address (to name the
/// objects later), anything else as a count.
#[derive(Clone, Debug)]
enum Written {
    Module { path: String, region: String, base: u64, pages: FastMap<u64, u64> },
    Region(String, u64),
}

/// Code that made copies, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Writer {
    /// `None` when the address is in no symbol's extent.
    pub function: Option<Arc<str>>,
    /// The module's path, or a region name such as `[vdso]`.
    pub module: Arc<str>,
    /// Offset in the module's file, for an unnamed address.
    pub module_offset: Option<u64>,
    /// `file:line` of the instruction that wrote most, where debug
    /// information has it.
    pub source: Option<Arc<str>>,
    /// The module has no symbol table beyond its exports.
    pub stripped: bool,
    pub pages: u64,
    /// Fraction of the episode's copies.
    pub share: f64,
}

/// Data that was copied, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    /// The data object (a global variable), where the module's symbols say.
    pub object: Option<Arc<str>>,
    /// The module whose data segment or `.bss` it is in.
    pub module: Option<Arc<str>>,
    /// The mapping it lies in.
    pub region: Arc<str>,
    pub pages: u64,
    pub share: f64,
}

impl Attribution {
    /// Counts one copy, placed in `maps` (the writer's layout at the fork).
    pub fn record(&mut self, maps: &Maps, f: &Fault) {
        let code = self
            .code
            .entry((f.kernel, f.ip))
            .or_insert_with(|| (if f.kernel { CodeAt::Syscall(f.ip) } else { maps.code_at(f.ip) }, 0));
        code.1 += 1;
        let start = maps.find(f.addr).map_or(u64::MAX, |r| r.start);
        let written = self.data.entry(start).or_insert_with(|| match maps.data_at(f.addr) {
            Some(DataAt::Module { path, region, rel }) => {
                Written::Module { path, region, base: f.addr - rel, pages: FastMap::default() }
            }
            Some(DataAt::Region(r)) => Written::Region(r, 0),
            None => Written::Region(UNMAPPED.to_string(), 0),
        });
        match written {
            Written::Module { base, pages, .. } => *pages.entry(f.addr.wrapping_sub(*base)).or_default() += 1,
            Written::Region(_, n) => *n += 1,
        }
    }

    /// Takes back a copy recorded before (its fault failed after all): the
    /// write of instruction `ip` to `addr`, placed in `maps` as it was.
    pub fn take_back(&mut self, maps: &Maps, addr: u64, ip: u64) {
        // A kernel-mode fault's `ip` is a system call's number, never a
        // user address: the two keys cannot both hold it.
        for key in [(false, ip), (true, ip)] {
            if let Some(c) = self.code.get_mut(&key).filter(|c| c.1 > 0) {
                c.1 -= 1;
                break;
            }
        }
        let start = maps.find(addr).map_or(u64::MAX, |r| r.start);
        match self.data.get_mut(&start) {
            Some(Written::Module { base, pages, .. }) => {
                if let Some(n) = pages.get_mut(&addr.wrapping_sub(*base)).filter(|n| **n > 0) {
                    *n -= 1;
                }
            }
            Some(Written::Region(_, n)) => *n = n.saturating_sub(1),
            None => {}
        }
    }

    /// The `top` writers and written targets (0: all), most pages first,
    /// named by `sym`; shares are of `total` copies.
    pub fn report(self, sym: &mut Symbolizer, total: u64, top: usize) -> (Vec<Writer>, Vec<Target>) {
        let share = |pages: u64| if total == 0 { 0.0 } else { pages as f64 / total as f64 };
        let (locs, counts): (Vec<CodeAt>, Vec<u64>) = self.code.into_values().unzip();
        // One writer per function (or per unnamed address): the source
        // line shown is that of its busiest instruction.
        // (function, module, offset) -> (pages, busiest location's pages, its name)
        type Key = (Option<String>, String, Option<u64>);
        let mut writers: HashMap<Key, (u64, u64, CodeName)> = HashMap::new();
        for (name, n) in sym.code(&locs).into_iter().zip(counts) {
            let key = (name.function.clone(), name.module.clone(), name.offset);
            let w = writers.entry(key).or_insert((0, 0, name.clone()));
            w.0 += n;
            if n > w.1 {
                (w.1, w.2) = (n, name);
            }
        }
        let mut writers: Vec<(u64, CodeName)> =
            writers.into_values().filter(|w| w.0 > 0).map(|(pages, _, n)| (pages, n)).collect();
        writers.sort_by(|(pa, a), (pb, b)| {
            (pb, &a.function, &a.module, a.offset).cmp(&(pa, &b.function, &b.module, b.offset))
        });
        let mut targets: HashMap<DataName, u64> = HashMap::new();
        for written in self.data.into_values() {
            match written {
                Written::Module { path, region, pages, .. } => {
                    for (rel, n) in pages {
                        let at = DataAt::Module { path: path.clone(), region: region.clone(), rel };
                        *targets.entry(sym.data(&at)).or_default() += n;
                    }
                }
                Written::Region(region, n) => {
                    *targets.entry(sym.data(&DataAt::Region(region))).or_default() += n
                }
            }
        }
        let mut targets: Vec<(DataName, u64)> = targets.into_iter().filter(|&(_, pages)| pages > 0).collect();
        targets.sort_by(|(a, pa), (b, pb)| (pb, &a.object, &a.region).cmp(&(pa, &b.object, &b.region)));
        if top != 0 {
            writers.truncate(top);
            targets.truncate(top);
        }
        // Only what is kept is interned: names shared by every episode
        // that holds them. Collected afresh, the lists are sized to what
        // they hold: an episode kept for the summary holds no room for the
        // writers and targets left out.
        let mut writers: Vec<Writer> = writers
            .into_iter()
            .map(|(pages, n)| Writer {
                function: n.function.map(|f| sym.intern(&f)),
                module: sym.intern(&n.module),
                module_offset: n.offset,
                source: n.source.map(|f| sym.intern(&f)),
                stripped: n.stripped,
                pages,
                share: share(pages),
            })
            .collect();
        let mut targets: Vec<Target> = targets
            .into_iter()
            .map(|(d, pages)| Target {
                object: d.object.map(|o| sym.intern(&o)),
                module: d.module.map(|m| sym.intern(&m)),
                region: sym.intern(&d.region),
                pages,
                share: share(pages),
            })
            .collect();
        writers.shrink_to_fit();
        targets.shrink_to_fit();
        (writers, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
1000-2000 r-xp 00000000 fe:01 1 /no/such/bin
2000-3000 rw-p 00001000 fe:01 1 /no/such/bin
3000-9000 rw-p 00000000 00:00 0
10000-20000 rw-p 00000000 00:00 0 [heap]
";

    fn fault(ip: u64, addr: u64) -> Fault {
        Fault { addr, ip, kernel: false, latency_ns: 0, weight: 1 }
    }

    #[test]
    fn a_kernel_mode_copy_is_its_system_calls() {
        let maps = Maps::parse(MAPS.as_bytes());
        let mut a = Attribution::default();
        // read(2) is 0 on x86_64: never taken for an unknown address.
        a.record(&maps, &Fault { kernel: true, ..fault(libc::SYS_read as u64, 0x3000) });
        a.record(&maps, &Fault { kernel: true, ..fault(libc::SYS_recvfrom as u64, 0x3000) });
        let (w, t) = a.report(&mut Symbolizer::new(), 2, 0);
        let mut names: Vec<_> = w.iter().map(|w| (w.function.clone().unwrap(), w.module.clone())).collect();
        names.sort();
        assert_eq!(names, [("read".into(), "[kernel]".into()), ("recvfrom".into(), "[kernel]".into())]);
        assert_eq!((&*t[0].region, t[0].pages), ("[anon 3000]", 2));
    }

    #[test]
    fn copies_rank_by_writer_and_target_with_shares() {
        let maps = Maps::parse(MAPS.as_bytes());
        let mut a = Attribution::default();
        for _ in 0..3 {
            a.record(&maps, &fault(0x1010, 0x3000));
        }
        a.record(&maps, &fault(0x1020, 0x10000));
        a.record(&maps, &fault(0, 0x10000));
        a.record(&maps, &fault(0x99_0000, 0x99_0000));
        let (w, t) = a.report(&mut Symbolizer::new(), 6, 0);
        // No such file: module + offset, never a name.
        assert_eq!((&*w[0].module, w[0].module_offset, w[0].pages), ("/no/such/bin", Some(0x10), 3));
        assert_eq!(w[0].share, 0.5);
        assert_eq!(&*w[1].module, "[unknown]");
        assert_eq!(w[1].pages, 2);
        assert_eq!(w.iter().map(|w| w.pages).sum::<u64>(), 6);
        // The anonymous mapping after the binary is its .bss.
        assert_eq!((&*t[0].region, t[0].pages), ("[anon 3000]", 3));
        assert_eq!((&*t[1].region, t[1].pages), ("[heap]", 2));
        let (w, t) = Attribution { ..a_clone(&maps) }.report(&mut Symbolizer::new(), 1, 1);
        assert_eq!((w.len(), t.len()), (1, 1));
    }

    fn a_clone(maps: &Maps) -> Attribution {
        let mut a = Attribution::default();
        a.record(maps, &fault(0x1010, 0x3000));
        a.record(maps, &fault(0x1020, 0x10000));
        a
    }
}
