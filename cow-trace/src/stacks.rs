//! `--stacks`: copies by the user stack that made them, as folded stacks
//! (the flame-graph tools' input, `comm;outer;...;inner count`) and as an
//! SVG flame graph.
//!
//! The kernel counts copies by (process image, process, stack id) and
//! keeps each stack's instruction pointers; nothing about stacks crosses
//! the ring buffer. At the end of the run the stacks are placed in the
//! layout each process had (read while it lived, see [`Layouts`]) and
//! named from the files, so a process that exited long before is still
//! named. Frames whose address lies in no known mapping are `[unknown]`,
//! never a guess.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    rc::Rc,
};

use cow_trace_common::{stack_lost, StackKey};
use serde::Serialize;

use crate::{
    event::{Event, What},
    regions::{CodeAt, Maps},
    sanitize::for_terminal,
    symbolize::{CodeName, Symbolizer},
};

/// Process images whose layout is kept, at most: a whole-system run can
/// start many; each costs its parsed maps (children of a fork share their
/// parent's).
const MAX_LAYOUTS: usize = 16384;

/// The frame that stands for those cut from a stack beyond a function
/// without a frame pointer.
pub const CUT: &str = "[stack cut: no frame pointer]";

/// A miss re-reads a live process's layout at most this often (event
/// time): a program maps its libraries after its exec, and later ones as
/// it loads them.
const REREAD_NS: u64 = 100_000_000;

/// One image's layout as last read (shared with the children forked from
/// it), and when.
struct Layout {
    maps: Rc<Maps>,
    read_ns: u64,
    /// Read at a copy right after the image's exec: the loader may still
    /// be mapping its libraries (and a fork, which comes after them, reads
    /// it again at once).
    early: bool,
}

/// What the kernel counted, read at the end of the run.
#[derive(Clone, Debug, Default)]
pub struct StackCounts {
    /// Copies by key (summed over CPUs; a copy taken back on another CPU
    /// than it was counted on sums to 0).
    pub copies: Vec<(StackKey, u64)>,
    /// Instruction pointers of each stack id, innermost first.
    pub traces: HashMap<u32, Vec<u64>>,
    /// Copies not counted: the count map was full.
    pub counts_full: u64,
    /// Processes whose image was not recorded (their stacks count under
    /// image 0, named in their layout when read).
    pub images_full: u64,
}

/// Every traced process image's layout, as read while it lived: a child's
/// is its parent's at the fork; an image that exec'd or existed before the
/// run is read at its first copy, and kept only if the kernel's record
/// says no exec came first (`image_of`).
pub struct Layouts {
    layouts: HashMap<(u32, u64), Layout>,
    /// Each process's image as the events say.
    current: HashMap<u32, u64>,
    comms: HashMap<(u32, u64), String>,
    /// Images whose layout could not be read (the process was gone, or
    /// had exec'd): not read again at each of their copies.
    unreadable: HashSet<(u32, u64)>,
    read_maps: Box<dyn Fn(u32) -> Option<Vec<u8>>>,
    image_of: Box<dyn Fn(u32) -> u64>,
    /// Images whose layout was not kept for want of room.
    not_kept: u64,
}

impl Layouts {
    /// `read_maps(pid)`: the bytes of `/proc/PID/maps`; `image_of(pid)`:
    /// the image the kernel has recorded for `pid` (0: none).
    pub fn new(read_maps: Box<dyn Fn(u32) -> Option<Vec<u8>>>, image_of: Box<dyn Fn(u32) -> u64>) -> Self {
        Self {
            layouts: HashMap::new(),
            current: HashMap::new(),
            comms: HashMap::new(),
            unreadable: HashSet::new(),
            read_maps,
            image_of,
            not_kept: 0,
        }
    }

    pub fn apply(&mut self, e: &Event) {
        match e.what {
            What::Spawn { child, .. } => {
                // Read again if it is old: the child's layout at the fork
                // is the parent's now, libraries loaded since included.
                let parent = self.layout_now(e.pid, e.ts_ns, None);
                self.current.insert(child, e.ts_ns);
                self.name((child, e.ts_ns), e);
                if let Some(maps) = parent {
                    self.keep((child, e.ts_ns), Layout { maps, read_ns: e.ts_ns, early: false });
                }
            }
            What::Exec => {
                self.current.insert(e.pid, e.ts_ns);
                self.name((e.pid, e.ts_ns), e);
            }
            What::Copy(f) => {
                // A copy's own instruction outside the layout says the
                // layout is behind (the loader had not mapped libc yet).
                let ip = (!f.kernel && f.ip != 0).then_some(f.ip);
                self.layout_now(e.pid, e.ts_ns, ip);
            }
            What::Exit { .. } => {
                self.current.remove(&e.pid);
            }
            _ => {}
        }
    }

    fn name(&mut self, key: (u32, u64), e: &Event) {
        if !e.comm.is_empty() && self.comms.len() < MAX_LAYOUTS {
            self.comms.insert(key, e.comm.to_string());
        }
    }

    fn keep(&mut self, key: (u32, u64), l: Layout) {
        if self.layouts.len() >= MAX_LAYOUTS && !self.layouts.contains_key(&key) {
            self.not_kept += 1;
            return;
        }
        self.layouts.insert(key, l);
    }

    /// `pid`'s layout in its current image: read now if not yet known, or
    /// again (at most every `REREAD_NS`) if `ip` is not in it, or, for a
    /// fork (`ip` None), if it was read that long ago or early.
    fn layout_now(&mut self, pid: u32, now_ns: u64, ip: Option<u64>) -> Option<Rc<Maps>> {
        let image = self.current.get(&pid).copied().unwrap_or(0);
        let key = (pid, image);
        let older = match self.layouts.get(&key) {
            Some(l) => {
                let (behind, now) = match ip {
                    Some(ip) => (l.maps.find(ip).is_none(), false),
                    None => (true, l.early),
                };
                if !behind || !now && now_ns.saturating_sub(l.read_ns) < REREAD_NS {
                    return Some(l.maps.clone());
                }
                Some(l.maps.clone())
            }
            None if self.unreadable.contains(&key) => return None,
            None => None,
        };
        // Read after an exec the events have not brought yet: another
        // program's layout, not this image's.
        let text = (self.read_maps)(pid).filter(|_| (self.image_of)(pid) == image);
        let Some(text) = text else {
            if let Some(l) = self.layouts.get_mut(&key) {
                // Gone or exec'd: what was read stays, and is not read again.
                (l.read_ns, l.early) = (u64::MAX, false);
                return Some(l.maps.clone());
            }
            if self.unreadable.len() >= MAX_LAYOUTS {
                self.unreadable.clear();
            }
            self.unreadable.insert(key);
            return None;
        };
        let parsed = Maps::parse(&text);
        let maps = Rc::new(match &older {
            Some(o) => parsed.with_older(o),
            None => parsed,
        });
        let early = ip.is_some() && image != 0 && now_ns.saturating_sub(image) < REREAD_NS;
        self.keep(key, Layout { maps: maps.clone(), read_ns: now_ns, early });
        Some(maps)
    }

    fn get(&self, pid: u32, image: u64) -> Option<&Maps> {
        self.layouts.get(&(pid, image)).map(|l| &*l.maps)
    }
}

/// One folded stack: a process name and its frames, root first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stack {
    pub comm: String,
    pub frames: Vec<String>,
    pub copies: u64,
}

/// A module with functions on the stacks that keep no frame pointer: the
/// kernel's frame-pointer walk cannot vouch for their callers, so stacks
/// are cut there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NoFramePointers {
    pub module: String,
    /// Those functions, by name (sorted).
    pub functions: Vec<String>,
}

/// Copies whose stack is not known, by why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Lost {
    /// The stack's bucket in the stack-trace map held another stack.
    pub collision: u64,
    /// The kernel could not walk the stack.
    pub walk_failed: u64,
    /// No stack was taken for the fault.
    pub not_taken: u64,
    /// Not counted at all: the count map was full.
    pub counts_full: u64,
}

impl Lost {
    pub fn total(&self) -> u64 {
        self.collision + self.walk_failed + self.not_taken + self.counts_full
    }
}

/// The stacks of a run, named.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StackReport {
    /// Copies counted by stack (those of `lost` but `counts_full`
    /// included, under a `[stack lost: ...]` frame).
    pub copies: u64,
    /// Most copies first.
    pub stacks: Vec<Stack>,
    pub lost: Lost,
    pub no_frame_pointers: Vec<NoFramePointers>,
    /// Process images whose layout was not kept (more than 16,384 in the
    /// run) or not recorded by the kernel (its image map full): their
    /// frames may read `[unknown]`.
    pub layouts_missing: u64,
}

impl StackReport {
    /// Names the stacks of `counts` in `layouts`; `comm_of(pid)` names a
    /// process the events did not name.
    pub fn build(
        counts: &StackCounts,
        layouts: &Layouts,
        comm_of: impl Fn(u32) -> Option<String>,
        sym: &mut Symbolizer,
    ) -> Self {
        let mut lost = Lost { counts_full: counts.counts_full, ..Lost::default() };
        // Every frame of every stack, placed, then named in one batch.
        let mut locs: Vec<CodeAt> = Vec::new();
        let mut index: HashMap<CodeAt, usize> = HashMap::new();
        let mut placed: Vec<(String, Vec<usize>, u64)> = Vec::new();
        for &(key, n) in &counts.copies {
            if n == 0 {
                continue;
            }
            let comm = layouts
                .comms
                .get(&(key.tgid, key.image))
                .cloned()
                .or_else(|| comm_of(key.tgid))
                .unwrap_or_else(|| format!("[pid {}]", key.tgid));
            if key.stack_id >= stack_lost::FIRST {
                let (why, tally) = match key.stack_id {
                    stack_lost::COLLISION => ("[stack lost: map collision]", &mut lost.collision),
                    stack_lost::NOT_TAKEN => ("[stack lost: not taken]", &mut lost.not_taken),
                    _ => ("[stack lost: walk failed]", &mut lost.walk_failed),
                };
                *tally += n;
                let i = locs_push(&mut locs, &mut index, CodeAt::Region(why.into()));
                placed.push((comm, vec![i], n));
                continue;
            }
            let maps = layouts.get(key.tgid, key.image);
            let ips = counts.traces.get(&key.stack_id).map_or(&[][..], |v| &v[..]);
            let mut frames = Vec::with_capacity(ips.len());
            for (depth, &ip) in ips.iter().enumerate() {
                // A return address is past its call: the call is the byte
                // before, in the caller (which may end with the call).
                let at = if depth == 0 { ip } else { ip.saturating_sub(1) };
                let loc = maps.map_or(CodeAt::Unknown, |m| m.code_at(at));
                frames.push(locs_push(&mut locs, &mut index, loc));
            }
            if frames.is_empty() {
                frames.push(locs_push(&mut locs, &mut index, CodeAt::Unknown));
            }
            frames.reverse();
            placed.push((comm, frames, n));
        }
        let names = sym.code(&locs);
        let (no_fp, without_fp) = frame_pointer_notes(&locs, &names, sym);
        let mut folded: BTreeMap<(String, Vec<String>), u64> = BTreeMap::new();
        for (comm, mut frames, n) in placed {
            // Outside a function that keeps no frame pointer the walk
            // followed a register that may be anything: those frames are
            // cut, not shown as callers they may not be.
            let mut cut = false;
            if let Some(p) = frames.iter().rposition(|i| without_fp.contains(i)).filter(|&p| p > 0) {
                frames.drain(..p);
                cut = true;
            }
            let frames: Vec<String> = cut
                .then(|| CUT.to_string())
                .into_iter()
                .chain(frames.into_iter().map(|i| frame_name(&names[i])))
                .collect();
            *folded.entry((comm, frames)).or_default() += n;
        }
        let mut stacks: Vec<Stack> =
            folded.into_iter().map(|((comm, frames), copies)| Stack { comm, frames, copies }).collect();
        stacks.sort_by(|a, b| {
            b.copies.cmp(&a.copies).then_with(|| (&a.comm, &a.frames).cmp(&(&b.comm, &b.frames)))
        });
        let copies = stacks.iter().map(|s| s.copies).sum();
        let layouts_missing = layouts.not_kept + counts.images_full;
        Self { copies, stacks, lost, no_frame_pointers: no_fp, layouts_missing }
    }

    /// Writes the stacks in the folded format, one per line, root first:
    /// `comm;outer;...;inner copies`. Names are made safe for the format
    /// and for a terminal (see [`folded_frame`]).
    pub fn write_folded(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for s in &self.stacks {
            out.write_all(folded_line(s).as_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Renders the folded stacks as an SVG flame graph.
    pub fn write_flamegraph(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        let lines: Vec<String> = self.stacks.iter().map(folded_line).collect();
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = "Copy-on-write copies by user stack".into();
        opts.count_name = "copies".into();
        if lines.is_empty() {
            // inferno refuses an empty graph; an empty picture is the truth.
            out.write_all(EMPTY_SVG.as_bytes())?;
            return Ok(());
        }
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(|s| s.as_str()), out)?;
        Ok(())
    }
}

const EMPTY_SVG: &str = "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\"><text x=\"600\" y=\"30\" text-anchor=\"middle\">no copies were counted</text></svg>\n";

fn locs_push(locs: &mut Vec<CodeAt>, index: &mut HashMap<CodeAt, usize>, loc: CodeAt) -> usize {
    *index.entry(loc.clone()).or_insert_with(|| {
        locs.push(loc);
        locs.len() - 1
    })
}

/// What a frame is called: its function, else `module+0xOFFSET` (the
/// module's file name) or the region's name.
fn frame_name(n: &CodeName) -> String {
    match (&n.function, n.offset) {
        (Some(f), _) => f.clone(),
        (None, Some(off)) => format!("{}+{off:#x}", basename(&n.module)),
        (None, None) => n.module.clone(),
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A name as one field of a folded line: escaped for a terminal (control
/// characters, so no newline, and backslashes), and with `;`, the frame
/// separator, written `\x3b` (unambiguous: a real backslash is `\\`).
pub fn folded_frame(name: &str) -> String {
    for_terminal(name).replace(';', "\\x3b")
}

fn folded_line(s: &Stack) -> String {
    let mut line = folded_frame(&s.comm);
    for f in &s.frames {
        line.push(';');
        line.push_str(&folded_frame(f));
    }
    line.push(' ');
    line.push_str(&s.copies.to_string());
    line
}

/// The modules whose named functions on the stacks do not begin by setting
/// up a frame pointer (`push %rbp; mov %rsp,%rbp`, after an `endbr64`),
/// and the indexes in `locs` of those functions' frames.
fn frame_pointer_notes(
    locs: &[CodeAt],
    names: &[CodeName],
    sym: &mut Symbolizer,
) -> (Vec<NoFramePointers>, HashSet<usize>) {
    let mut without: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut at: HashSet<usize> = HashSet::new();
    let mut checked: HashMap<(String, u64), bool> = HashMap::new();
    for (k, (loc, n)) in locs.iter().zip(names).enumerate() {
        let (CodeAt::File { path, .. }, Some(f), Some(start)) = (loc, &n.function, n.start) else { continue };
        let has = *checked
            .entry((path.clone(), start))
            .or_insert_with(|| sym.sets_up_frame_pointer(path, start).unwrap_or(true));
        if !has {
            at.insert(k);
            let fns = without.entry(path.clone()).or_default();
            if !fns.contains(f) {
                fns.push(f.clone());
            }
        }
    }
    let notes = without
        .into_iter()
        .map(|(module, mut functions)| {
            functions.sort();
            NoFramePointers { module, functions }
        })
        .collect();
    (notes, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_cannot_add_a_frame_or_a_line_to_the_folded_format() {
        let s = Stack {
            comm: "evil;main\nfake;line 99".into(),
            frames: vec!["f;g".into(), "h\\x3b".into()],
            copies: 3,
        };
        let line = folded_line(&s);
        assert_eq!(line.lines().count(), 1);
        // The comm and two frames: three fields, the count after the last space.
        assert_eq!(line.rsplit_once(' ').unwrap().0.split(';').count(), 3, "{line}");
        assert!(line.ends_with(" 3"));
        // A real backslash and an escaped `;` read apart.
        assert_ne!(folded_frame("a;b"), folded_frame("a\\x3bb"));
    }

    fn layouts(maps: &'static str, image: u64) -> Layouts {
        Layouts::new(Box::new(move |_| Some(maps.as_bytes().to_vec())), Box::new(move |_| image))
    }

    const MAPS: &str = "1000-2000 r-xp 00000000 fe:01 1 /no/such/bin\n";

    fn copy_event(pid: u32, kind: cow_trace_common::EventKind, other: u32, ts: u64) -> Event {
        let w = cow_trace_common::Event {
            kind: kind as u32,
            pid,
            tid: pid,
            other,
            ts_ns: ts,
            latency_ns: 0,
            addr: 0x1000,
            comm: *b"prog\0\0\0\0\0\0\0\0\0\0\0\0",
            flags: 0,
            _reserved: 0,
            ip: 0x1010,
        };
        Event::from_wire(&w).expect("a valid event")
    }

    #[test]
    fn stacks_are_folded_root_first_per_process_name_and_lost_ones_said_so() {
        use cow_trace_common::EventKind;
        let mut l = layouts(MAPS, 0);
        l.apply(&copy_event(7, EventKind::CowCopy, 0, 10));
        let key = |stack_id| StackKey { image: 0, tgid: 7, stack_id };
        let counts = StackCounts {
            copies: vec![(key(1), 5), (key(2), 2), (key(stack_lost::COLLISION), 1), (key(3), 0)],
            traces: HashMap::from([(1, vec![0x1010, 0x1101]), (2, vec![0x1020, 0x1101]), (3, vec![0x1030])]),
            counts_full: 4,
            images_full: 0,
        };
        let r = StackReport::build(&counts, &l, |_| Some("prog".into()), &mut Symbolizer::new());
        // No such file: module+offset, the return address's call byte.
        assert_eq!(r.stacks[0].frames, ["bin+0x100", "bin+0x10"]);
        assert_eq!((r.stacks[0].comm.as_str(), r.stacks[0].copies), ("prog", 5));
        assert_eq!(r.stacks[1].frames, ["bin+0x100", "bin+0x20"]);
        assert_eq!(r.stacks[2].frames, ["[stack lost: map collision]"]);
        assert_eq!((r.copies, r.lost.collision, r.lost.counts_full, r.lost.total()), (8, 1, 4, 5));
        let mut out = Vec::new();
        r.write_folded(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().next(), Some("prog;bin+0x100;bin+0x10 5"));
    }

    /// Layouts whose first read of a process's maps gives `first` and every
    /// later one `later`, with every process image made at `image_ns`; and
    /// the count of reads.
    fn layouts_reading(
        first: &'static str,
        later: &'static str,
        image_ns: u64,
    ) -> (Layouts, std::rc::Rc<std::cell::Cell<u32>>) {
        let reads = std::rc::Rc::new(std::cell::Cell::new(0));
        let r = reads.clone();
        let l = Layouts::new(
            Box::new(move |_| {
                r.set(r.get() + 1);
                Some(if r.get() == 1 { first } else { later }.as_bytes().to_vec())
            }),
            Box::new(move |_| image_ns),
        );
        (l, reads)
    }

    #[test]
    fn a_layout_behind_the_copies_is_read_again_and_keeps_what_it_had() {
        use cow_trace_common::EventKind;
        // Right after the exec only the program and the loader are mapped;
        // then the loader maps libc.
        const EARLY: &str =
            "1000-2000 r-xp 00000000 fe:01 1 /bin/prog\n9000-a000 r-xp 00000000 fe:01 2 /lib/ld.so\n";
        const LATER: &str =
            "1000-2000 r-xp 00000000 fe:01 1 /bin/prog\n5000-6000 r-xp 00000000 fe:01 3 /lib/libc.so\n";
        let (mut l, reads) = layouts_reading(EARLY, LATER, 0);
        let copy_at = |ip, ts| Event {
            what: What::Copy(crate::event::Fault { ip, ..fault() }),
            ..copy_event(7, EventKind::CowCopy, 0, ts)
        };
        l.apply(&copy_at(0x1010, 0));
        // libc's instruction, too soon after the read: not read again yet.
        l.apply(&copy_at(0x5010, 1_000));
        assert_eq!(reads.get(), 1);
        l.apply(&copy_at(0x5010, REREAD_NS + 1));
        assert_eq!(reads.get(), 2);
        let m = l.get(7, 0).unwrap();
        // The new read, and the loader's mapping it no longer shows.
        assert_eq!(m.find(0x5010).unwrap().name, "/lib/libc.so");
        assert_eq!(m.find(0x9010).unwrap().name, "/lib/ld.so");
        // Instructions inside the layout read nothing.
        l.apply(&copy_at(0x1010, 10 * REREAD_NS));
        assert_eq!(reads.get(), 2);
    }

    #[test]
    fn a_fork_soon_after_an_exec_gives_the_child_the_layout_with_its_libraries() {
        use cow_trace_common::EventKind;
        const EARLY: &str = "1000-2000 r-xp 00000000 fe:01 1 /bin/prog\n";
        const LATER: &str =
            "1000-2000 r-xp 00000000 fe:01 1 /bin/prog\n5000-6000 r-xp 00000000 fe:01 3 /lib/libc.so\n";
        let (mut l, reads) = layouts_reading(EARLY, LATER, 1_000);
        l.apply(&copy_event(7, EventKind::Exec, 0, 1_000));
        // The loader's first copy: read while libc is not mapped yet.
        l.apply(&copy_event(7, EventKind::CowCopy, 0, 2_000));
        // A fork right after: its child's copies in libc (a pread, whose
        // kernel-mode copy names no instruction) must be placed.
        l.apply(&copy_event(7, EventKind::Spawn, 8, 3_000));
        assert_eq!(reads.get(), 2);
        assert_eq!(l.get(8, 3_000).unwrap().find(0x5010).unwrap().name, "/lib/libc.so");
        // Not read again at every fork.
        l.apply(&copy_event(7, EventKind::Spawn, 9, 4_000));
        assert_eq!(reads.get(), 2);
    }

    fn fault() -> crate::event::Fault {
        crate::event::Fault { addr: 0x1000, ip: 0, kernel: false, latency_ns: 0, weight: 1 }
    }

    #[test]
    fn a_layout_read_after_an_exec_not_yet_seen_is_not_kept_for_the_old_image() {
        use cow_trace_common::EventKind;
        // The kernel has recorded an exec (image 50) the events have not
        // brought: maps read now are the new program's.
        let mut l = layouts(MAPS, 50);
        l.apply(&copy_event(7, EventKind::CowCopy, 0, 10));
        assert!(l.get(7, 0).is_none());
        l.apply(&copy_event(7, EventKind::Exec, 0, 50));
        l.apply(&copy_event(7, EventKind::CowCopy, 0, 60));
        assert!(l.get(7, 50).is_some());
        // A child has its parent's layout at the fork, read or not.
        l.apply(&copy_event(7, EventKind::Spawn, 8, 70));
        assert!(std::ptr::eq(l.get(8, 70).unwrap(), l.get(7, 50).unwrap()));
    }
}
