//! Names for code and data locations, read from the files themselves
//! (never from a live process, which may be gone by now): functions with
//! blazesym (ELF symbols, DWARF for file:line), data objects from the ELF
//! symbol table with `object`.
//!
//! A name is given only to an address inside a symbol's known extent: an
//! address past the end of every symbol (a static function of a module
//! that exports only some) is shown as module+offset, never as the
//! neighbouring symbol. A module without a `.symtab` is marked stripped.

use std::{
    collections::{HashMap, HashSet},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    sync::Arc,
};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer as Blaze,
};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::regions::{CodeAt, DataAt};

/// What a code location is called.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodeName {
    /// The function, when the address is inside one's extent.
    pub function: Option<String>,
    /// The module's path, or a region name (`[vdso]`, `[anon ...]`,
    /// `[unknown]`).
    pub module: String,
    /// Offset in the module's file when no function is named.
    pub offset: Option<u64>,
    /// `file:line` where debug information has it.
    pub source: Option<String>,
    /// The module has no `.symtab` (only exported symbols, if any).
    pub stripped: bool,
    /// File offset of the function's first instruction, when named.
    pub start: Option<u64>,
}

/// What a written location is called: a data object of a module where its
/// symbols say, and the mapping it lies in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataName {
    pub object: Option<String>,
    /// The module whose data it is (its data segment or `.bss`).
    pub module: Option<String>,
    pub region: String,
}

/// What is kept of a module's ELF file for naming data.
struct Module {
    /// The file as opened once, checked to be a regular file: blazesym
    /// reads it through `/proc/self/fd/N`, so a path swapped meanwhile
    /// (for a FIFO that would block, say) is never opened again.
    fd: std::fs::File,
    /// Virtual address of the segment holding file offset 0: where the
    /// module's first mapping starts, in its own addresses.
    first_vaddr: u64,
    /// The file's size: what blazesym may map of it.
    size: u64,
    /// Sized data symbols `(start, end, name)`, sorted by start.
    objects: Vec<(u64, u64, String)>,
    has_symtab: bool,
}

/// Names interned before the first purge of those no longer held.
const MIN_PURGE: usize = 4096;

/// Bytes of module files kept open between namings (see
/// [`Symbolizer::release_files`]).
const RELEASE_ABOVE: u64 = 32 << 20;

pub struct Symbolizer {
    blaze: Blaze,
    modules: HashMap<String, Option<Module>>,
    /// Every name handed out, once: the episodes kept for the summary
    /// share their module paths and function names.
    names: HashSet<Arc<str>>,
    /// Size of `names` at which the names no episode holds any more are
    /// dropped.
    purge_at: usize,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self { blaze: Blaze::new(), modules: HashMap::new(), names: HashSet::new(), purge_at: MIN_PURGE }
    }

    /// `name`, shared with every other holder of the same text.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        if self.names.len() >= self.purge_at {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.purge_at = (2 * self.names.len()).max(MIN_PURGE);
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        n
    }

    /// Lets go of every file opened so far (mappings, parsed symbols and
    /// debug information) once they add up to more than `RELEASE_ABOVE`
    /// bytes: they are read again when next needed. Files a run names
    /// again and again (a fork storm's program, libc) are small enough to
    /// stay; a compiler's 100 MiB library is let go once named.
    pub fn release_files(&mut self) {
        let open: u64 = self.modules.values().flatten().map(|m| m.size).sum();
        if open > RELEASE_ABOVE {
            // Together: blazesym knows each module by its descriptor's
            // number, which a new file may be given once this one is
            // closed.
            self.blaze = Blaze::new();
            self.modules.clear();
        }
    }

    fn module(&mut self, path: &str) -> Option<&Module> {
        self.modules.entry(path.to_string()).or_insert_with(|| read_module(path)).as_ref()
    }

    /// Names each of `locs`, in order. Locations in one file are looked up
    /// in one batch.
    pub fn code(&mut self, locs: &[CodeAt]) -> Vec<CodeName> {
        let mut by_file: HashMap<&str, Vec<(usize, u64)>> = HashMap::new();
        let mut out: Vec<Option<CodeName>> = vec![None; locs.len()];
        for (i, l) in locs.iter().enumerate() {
            match l {
                CodeAt::File { path, offset } => by_file.entry(path).or_default().push((i, *offset)),
                CodeAt::Region(name) => out[i] = Some(unnamed(name, None, false)),
                CodeAt::Unknown => out[i] = Some(unnamed("[unknown]", None, false)),
                CodeAt::Syscall(nr) => {
                    out[i] = Some(CodeName {
                        function: Some(syscall_name(*nr)),
                        ..unnamed("[kernel]", None, false)
                    })
                }
            }
        }
        for (path, items) in by_file {
            let module = self.module(path);
            let stripped = module.is_none_or(|m| !m.has_symtab);
            let opened = module.map(|m| format!("/proc/self/fd/{}", m.fd.as_raw_fd()));
            let offsets: Vec<u64> = items.iter().map(|&(_, o)| o).collect();
            let syms = match opened {
                Some(p) => self.blaze.symbolize(&Source::Elf(Elf::new(p)), Input::FileOffset(&offsets)),
                None => Ok(Vec::new()),
            }
            .unwrap_or_default();
            for (k, &(i, offset)) in items.iter().enumerate() {
                out[i] = Some(match syms.get(k) {
                    Some(Symbolized::Sym(s)) if s.size.is_some_and(|n| s.offset < n) => CodeName {
                        function: Some(s.name.to_string()),
                        module: path.to_string(),
                        offset: None,
                        source: s
                            .code_info
                            .as_ref()
                            .and_then(|c| c.line.map(|l| format!("{}:{l}", c.file.to_string_lossy()))),
                        stripped,
                        start: offset.checked_sub(s.offset as u64),
                    },
                    _ => unnamed(path, Some(offset), stripped),
                });
            }
        }
        out.into_iter().map(|n| n.expect("every location named")).collect()
    }

    /// Whether the function at file offset `start` of module `path` begins
    /// by setting up a frame pointer (x86-64: `push %rbp; mov %rsp,%rbp`,
    /// after an `endbr64`); `None` when the file cannot be read there.
    pub fn sets_up_frame_pointer(&mut self, path: &str, start: u64) -> Option<bool> {
        use std::os::unix::fs::FileExt as _;
        let m = self.module(path)?;
        let mut b = [0u8; 8];
        m.fd.read_exact_at(&mut b, start).ok()?;
        const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
        const PROLOGUE: [u8; 4] = [0x55, 0x48, 0x89, 0xe5];
        let code = if b[..4] == ENDBR64 { &b[4..] } else { &b[..4] };
        Some(code == PROLOGUE)
    }

    /// Names a written location: the data object holding it where the
    /// module's symbols say, always the region.
    pub fn data(&mut self, at: &DataAt) -> DataName {
        match at {
            DataAt::Region(region) => DataName { object: None, module: None, region: region.clone() },
            DataAt::Module { path, region, rel } => {
                let object = self.module(path).and_then(|m| {
                    let vaddr = m.first_vaddr + rel;
                    let i = m.objects.partition_point(|o| o.0 <= vaddr).checked_sub(1)?;
                    let (_, end, name) = &m.objects[i];
                    (vaddr < *end).then(|| name.clone())
                });
                DataName { object, module: Some(path.clone()), region: region.clone() }
            }
        }
    }
}

/// The x86_64 system calls that write user memory on a process's behalf
/// (the kernel-mode copies worth naming); others by number.
pub fn syscall_name(nr: u64) -> String {
    let name = match nr as i64 {
        // Not in a system call (orig_ax -1): signal delivery, for one.
        n if n < 0 => "(no system call)",
        libc::SYS_read => "read",
        libc::SYS_pread64 => "pread64",
        libc::SYS_readv => "readv",
        libc::SYS_preadv => "preadv",
        libc::SYS_preadv2 => "preadv2",
        libc::SYS_recvfrom => "recvfrom",
        libc::SYS_recvmsg => "recvmsg",
        libc::SYS_recvmmsg => "recvmmsg",
        libc::SYS_getdents64 => "getdents64",
        libc::SYS_epoll_wait => "epoll_wait",
        libc::SYS_epoll_pwait => "epoll_pwait",
        libc::SYS_poll => "poll",
        libc::SYS_select => "select",
        libc::SYS_pselect6 => "pselect6",
        libc::SYS_ppoll => "ppoll",
        libc::SYS_wait4 => "wait4",
        libc::SYS_waitid => "waitid",
        libc::SYS_fstat => "fstat",
        libc::SYS_newfstatat => "newfstatat",
        libc::SYS_statx => "statx",
        libc::SYS_clock_gettime => "clock_gettime",
        libc::SYS_gettimeofday => "gettimeofday",
        libc::SYS_getrusage => "getrusage",
        libc::SYS_sysinfo => "sysinfo",
        libc::SYS_futex => "futex",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_rt_sigprocmask => "rt_sigprocmask",
        libc::SYS_pipe => "pipe",
        libc::SYS_pipe2 => "pipe2",
        libc::SYS_socketpair => "socketpair",
        libc::SYS_accept => "accept",
        libc::SYS_accept4 => "accept4",
        libc::SYS_getsockopt => "getsockopt",
        libc::SYS_getsockname => "getsockname",
        libc::SYS_getpeername => "getpeername",
        libc::SYS_io_getevents => "io_getevents",
        libc::SYS_io_uring_enter => "io_uring_enter",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_uname => "uname",
        libc::SYS_getcwd => "getcwd",
        libc::SYS_readlink => "readlink",
        libc::SYS_readlinkat => "readlinkat",
        libc::SYS_getrandom => "getrandom",
        _ => return format!("syscall {nr}"),
    };
    name.to_string()
}

fn unnamed(module: &str, offset: Option<u64>, stripped: bool) -> CodeName {
    CodeName { function: None, module: module.to_string(), offset, source: None, stripped, start: None }
}

/// Opens and reads the file a traced process's maps name: without
/// blocking (a FIFO put in its place), and only a regular file. Only the
/// parts parsed are read (headers, symbol table), not the whole file: a
/// large library costs its symbol table, not its size.
fn read_module(path: &str) -> Option<Module> {
    let fd = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).ok()?;
    let meta = fd.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let (first_vaddr, objects, has_symtab) = {
        let cache = object::ReadCache::new(&fd);
        let file = object::File::parse(&cache).ok()?;
        let first_vaddr = file.segments().find(|s| s.file_range().0 == 0).map(|s| s.address() & !0xfff)?;
        let mut objects: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Data && s.size() > 0 && s.is_definition())
            .filter_map(|s| Some((s.address(), s.address() + s.size(), s.name().ok()?.to_string())))
            .collect();
        objects.sort();
        (first_vaddr, objects, file.section_by_name(".symtab").is_some())
    };
    Some(Module { fd, size: meta.len(), first_vaddr, objects, has_symtab })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_without_a_file_keep_their_name() {
        let mut s = Symbolizer::new();
        let names = s.code(&[CodeAt::Region("[vdso]".into()), CodeAt::Unknown]);
        assert_eq!(names[0].module, "[vdso]");
        assert_eq!(names[1].module, "[unknown]");
        assert!(names.iter().all(|n| n.function.is_none()));
        let d = s.data(&DataAt::Region("[heap]".into()));
        assert_eq!(d, DataName { object: None, module: None, region: "[heap]".into() });
    }

    #[test]
    fn a_fifo_in_a_modules_place_is_not_opened_for_good() {
        let dir = std::env::temp_dir().join(format!("cow-trace-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("lib.so");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut s = Symbolizer::new();
        let at = CodeAt::File { path: fifo.to_str().unwrap().into(), offset: 0x10 };
        // Returns (no writer ever comes) with module + offset.
        assert_eq!(s.code(&[at])[0].offset, Some(0x10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_gives_module_and_offset() {
        let mut s = Symbolizer::new();
        let at = CodeAt::File { path: "/nonexistent/cow-trace-test.so".into(), offset: 0x1234 };
        let n = &s.code(&[at])[0];
        assert_eq!((n.function.as_deref(), n.offset), (None, Some(0x1234)));
    }
}
