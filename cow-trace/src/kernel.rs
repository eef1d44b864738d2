//! What the running kernel offers and where things are in it: structure
//! offsets from BTF, tracepoint record layouts from tracefs, and the
//! preconditions (BTF, tracefs) the BPF programs need.
//!
//! aya's Rust BPF programs get no CO-RE relocations, so every offset the
//! programs use is looked up here, at load time, from the kernel they will
//! run on.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Byte offsets of the kernel structure fields the BPF programs read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_signal: u32,
    pub task_exit_code: u32,
    pub signal_live: u32,
    /// `offsetof(struct signal_struct, oom_mm)`: set when the OOM killer
    /// chose the process; 0 on a kernel without it (then never reported).
    pub signal_oom_mm: u32,
}

impl TaskOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        Ok(Self {
            task_pid: member_offset(btf, "task_struct", "pid")?,
            task_tgid: member_offset(btf, "task_struct", "tgid")?,
            task_signal: member_offset(btf, "task_struct", "signal")?,
            task_exit_code: member_offset(btf, "task_struct", "exit_code")?,
            signal_live: member_offset(btf, "signal_struct", "live")?,
            signal_oom_mm: member_offset(btf, "signal_struct", "oom_mm").unwrap_or(0),
        })
    }
}

/// Every offset the programs of any backend need, read once from BTF so
/// that the parsed BTF can be freed before the programs are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task: TaskOffsets,
    /// `offsetof(struct vm_fault, address)`, for the kprobe and fentry
    /// backends.
    pub vmf_address: Option<u32>,
    /// `offsetof(struct pt_regs, ip)`: the faulting user instruction.
    pub regs_ip: u32,
    /// `offsetof(struct pt_regs, orig_ax)`: the system call in progress.
    pub regs_orig_ax: u32,
    /// `offsetof(struct vm_fault, flags)` and the value of
    /// `FAULT_FLAG_USER`, for the kprobe and fentry backends to tell
    /// kernel-mode faults; `None` when the kernel lacks either.
    pub vmf_user_flag: Option<(u32, u32)>,
}

impl KernelOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        Ok(Self {
            task: TaskOffsets::from_btf(btf)?,
            vmf_address: member_offset(btf, "vm_fault", "address").ok(),
            regs_ip: member_offset(btf, "pt_regs", "ip")?,
            regs_orig_ax: member_offset(btf, "pt_regs", "orig_ax")?,
            vmf_user_flag: member_offset(btf, "vm_fault", "flags").ok().zip(enum_value(
                btf,
                "fault_flag",
                "FAULT_FLAG_USER",
            )),
        })
    }
}

/// The running kernel's BTF, read once. Everything cow-trace needs from it
/// comes from these bytes: structure offsets and what the kernel offers
/// ([`KernelBtf::index`]) and the type information aya loads programs with
/// ([`KernelBtf::for_loading`]).
pub struct KernelBtf {
    bytes: Vec<u8>,
}

impl KernelBtf {
    /// Reads the BTF, with an actionable error when the kernel has none.
    pub fn read() -> Result<Self> {
        if !Path::new(VMLINUX_BTF).exists() {
            bail!(
                "kernel has no BTF ({VMLINUX_BTF} missing): cow-trace needs a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y (the default on current Debian, Ubuntu, Fedora and RHEL); \
                 no backend can run without it"
            );
        }
        let bytes = fs::read(VMLINUX_BTF).with_context(|| format!("cannot read {VMLINUX_BTF}"))?;
        Ok(Self { bytes })
    }

    /// The BTF indexed for lookups by name. btf-rs's cached backend decodes
    /// and indexes every one of the kernel's types up front (150 ms on a
    /// small VM, for a dozen lookups); its mapped backend indexes lazily but
    /// wants a file to map, and sysfs BTF can be mapped only on recent
    /// kernels: the bytes go to a memory file, mapped from there.
    pub fn index(&self) -> Result<Btf> {
        let parse_error = |e: &dyn std::fmt::Display| anyhow!("cannot parse {VMLINUX_BTF}: {e}");
        // SAFETY: a plain memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"cow-trace-btf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            // No memory files (a seccomp filter, say): decode it all.
            return Btf::from_bytes(&self.bytes).map_err(|e| parse_error(&e));
        }
        // SAFETY: a descriptor just created and owned here.
        let mut file = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        io::Write::write_all(&mut file, &self.bytes).context("cannot copy the kernel's BTF")?;
        let path = format!("/proc/self/fd/{fd}");
        let btf = Btf::from_file_with_backend(&path, btf_rs::Backend::Mmap)
            .or_else(|_| Btf::from_bytes(&self.bytes))
            .map_err(|e| parse_error(&e))?;
        Ok(btf)
    }

    /// The BTF as aya loads programs with it (trampolines bind to functions
    /// through it).
    pub fn for_loading(&self) -> Result<aya::Btf> {
        aya::Btf::parse(&self.bytes, aya::Endianness::default())
            .map_err(|e| anyhow!("cannot parse {VMLINUX_BTF}: {e}"))
    }
}

/// Loads the running kernel's BTF, indexed for lookups by name.
#[cfg(test)]
pub fn load_vmlinux_btf() -> Result<Btf> {
    KernelBtf::read()?.index()
}

/// The value of enumerator `member` of `enum name`.
pub fn enum_value(btf: &Btf, name: &str, member: &str) -> Option<u32> {
    btf.resolve_types_by_name(name).ok()?.into_iter().find_map(|ty| match ty {
        Type::Enum(e) => {
            e.members.iter().find(|m| btf.resolve_name(*m).is_ok_and(|n| n == member)).map(|m| m.val())
        }
        _ => None,
    })
}

/// Byte offset of `member` in `struct name`, looking through anonymous
/// structs and unions (task_struct wraps much of itself in them).
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32> {
    let types =
        btf.resolve_types_by_name(name).map_err(|e| anyhow!("kernel BTF has no struct {name}: {e}"))?;
    for ty in types {
        if let Type::Struct(s) = ty {
            if s.members.is_empty() {
                continue; // a forward declaration
            }
            if let Some(bits) = find_member(btf, &s, member)? {
                if bits % 8 != 0 {
                    bail!("{name}.{member} is a bitfield; cannot read it");
                }
                return Ok(bits / 8);
            }
        }
    }
    bail!("kernel BTF: struct {name} has no member {member}")
}

fn find_member(btf: &Btf, s: &btf_rs::Struct, wanted: &str) -> Result<Option<u32>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == wanted {
            return Ok(Some(m.bit_offset()));
        }
        if name.is_empty() {
            // Anonymous member: descend, skipping qualifiers and typedefs.
            let mut ty = btf.resolve_chained_type(m).map_err(|e| anyhow!("{e}"))?;
            loop {
                match ty {
                    Type::Struct(ref inner) | Type::Union(ref inner) => {
                        if let Some(off) = find_member(btf, inner, wanted)? {
                            return Ok(Some(m.bit_offset() + off));
                        }
                        break;
                    }
                    Type::Const(_) | Type::Volatile(_) | Type::Typedef(_) | Type::TypeTag(_) => {
                        let Some(bt) = ty.as_btf_type() else { break };
                        ty = btf.resolve_chained_type(bt).map_err(|e| anyhow!("{e}"))?;
                    }
                    _ => break,
                }
            }
        }
    }
    Ok(None)
}

/// Whether a raw tracepoint exists, by its `btf_trace_<name>` typedef.
pub fn has_raw_tracepoint(btf: &Btf, name: &str) -> bool {
    btf.resolve_ids_by_name(&format!("btf_trace_{name}")).map(|ids| !ids.is_empty()).unwrap_or(false)
}

/// The BTF id of the `FUNC` named `name`: a function fentry can attach to
/// (inlined functions have none), named by its id when a program loads.
pub fn btf_func_id(btf: &Btf, name: &str) -> Option<u32> {
    let ids = btf.resolve_ids_by_name(name).ok()?;
    ids.into_iter().find(|&id| matches!(btf.resolve_type_by_id(id), Ok(Type::Func(_))))
}

/// Whether `/proc/kallsyms` text lists a text symbol `name` exactly
/// (`copy_process`, not `copy_process.cold`).
pub fn kallsyms_has(kallsyms: &str, name: &str) -> bool {
    kallsyms.lines().any(|l| {
        let mut it = l.split_whitespace();
        let (_, ty, sym) = (it.next(), it.next(), it.next());
        matches!(ty, Some("t" | "T")) && sym == Some(name)
    })
}

/// One field of a tracepoint record, from a tracefs `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// Parses the `format` file of a tracefs event.
///
/// Lines look like
/// `\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;`; array fields carry
/// their dimension in the name (`char comm[16]`), `__data_loc` fields a
/// prefix.
pub fn parse_format(text: &str) -> Result<Vec<Field>> {
    let mut fields = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else { continue };
        let mut decl = None;
        let (mut offset, mut size, mut signed) = (None, None, false);
        for part in rest.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(v.parse::<u32>().with_context(|| format!("bad offset in {line:?}"))?);
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(v.parse::<u32>().with_context(|| format!("bad size in {line:?}"))?);
            } else if let Some(v) = part.strip_prefix("signed:") {
                signed = v == "1";
            } else if decl.is_none() {
                decl = Some(part);
            }
        }
        let decl = decl.ok_or_else(|| anyhow!("field without declaration: {line:?}"))?;
        // The name is the declaration's last word, without any `[N]`:
        // `char comm[16]`, `__data_loc char[] comm`, `struct x * p`.
        let last = decl.rsplit(|c: char| c.is_whitespace() || c == '*').next().unwrap_or("");
        let name = last.split('[').next().filter(|n| !n.is_empty());
        let name = name.ok_or_else(|| anyhow!("no field name in {line:?}"))?;
        fields.push(Field {
            name: name.to_string(),
            offset: offset.ok_or_else(|| anyhow!("no offset in {line:?}"))?,
            size: size.ok_or_else(|| anyhow!("no size in {line:?}"))?,
            signed,
        });
    }
    if fields.is_empty() {
        bail!("no fields in tracepoint format");
    }
    Ok(fields)
}

pub fn field<'a>(fields: &'a [Field], name: &str) -> Option<&'a Field> {
    fields.iter().find(|f| f.name == name)
}

/// Where tracefs is mounted, mounting it at `/sys/kernel/tracing` if it is
/// not (classic tracepoints are attached by their tracefs id).
pub fn tracefs() -> Result<PathBuf> {
    for dir in TRACEFS_MOUNTS {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
        // tracefs is mode 0700 root by default: mounted, but closed to a
        // non-root user with CAP_BPF and CAP_PERFMON alone. Say that, not
        // "not mounted". (Only for its own mount point: the debugfs path
        // is closed whenever debugfs is, tracefs or not.)
        if dir != TRACEFS_MOUNTS[0] {
            continue;
        }
        if let Err(e) = fs::read_dir(dir) {
            if e.kind() == io::ErrorKind::PermissionDenied {
                bail!(
                    "cannot read tracefs at {dir} ({e}): cow-trace reads tracepoint formats from it; \
                     run it as root, or add CAP_DAC_READ_SEARCH to CAP_BPF and CAP_PERFMON"
                );
            }
        }
    }
    let target = TRACEFS_MOUNTS[0];
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it failed ({err}); mount it with \
             `mount -t tracefs nodev {target}` and try again"
        );
    }
    // A lasting change to the host: say so.
    log::warn!("tracefs was not mounted; mounted it at {target}");
    Ok(PathBuf::from(target))
}

/// The fields of tracefs event `group/name`.
pub fn event_format(tracefs: &Path, group: &str, name: &str) -> Result<Vec<Field>> {
    let path = tracefs.join("events").join(group).join(name).join("format");
    let text = fs::read_to_string(&path).map_err(|e| {
        anyhow!("tracepoint {group}:{name} is not available on this kernel ({}: {e})", path.display())
    })?;
    parse_format(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim from Linux 6.18.
    const SYS_EXIT_CLONE_618: &str = "name: sys_exit_clone
ID: 195
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;

print fmt: \"0x%lx\", REC->ret
";

    // sched_process_fork as Linux 6.1 lays it out (fixed char arrays), and as
    // 6.18 does (__data_loc strings): the pids move.
    const FORK_61: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";
    const FORK_618: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    #[test]
    fn parses_syscall_exit_ret() {
        let f = parse_format(SYS_EXIT_CLONE_618).unwrap();
        assert_eq!(f.len(), 6);
        let ret = field(&f, "ret").unwrap();
        assert_eq!((ret.offset, ret.size, ret.signed), (16, 8, true));
        assert_eq!(field(&f, "__syscall_nr").unwrap().offset, 8);
    }

    #[test]
    fn parses_arrays_and_data_loc_across_kernels() {
        let old = parse_format(FORK_61).unwrap();
        assert_eq!(field(&old, "parent_comm").unwrap().size, 16);
        assert_eq!(field(&old, "parent_pid").unwrap().offset, 24);
        assert_eq!(field(&old, "child_pid").unwrap().offset, 44);
        let new = parse_format(FORK_618).unwrap();
        assert_eq!(field(&new, "parent_comm").unwrap().size, 4);
        assert_eq!(field(&new, "parent_pid").unwrap().offset, 12);
        assert_eq!(field(&new, "child_pid").unwrap().offset, 20);
    }

    #[test]
    fn parses_pointer_fields() {
        let f = parse_format("\tfield:struct clone_args * uargs;\toffset:16;\tsize:8;\tsigned:0;\n").unwrap();
        assert_eq!(f[0].name, "uargs");
        assert!(!f[0].signed);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_format("name: x\nID: 1\n").is_err());
        assert!(parse_format("\tfield:int a;\toffset:x;\tsize:4;\tsigned:1;\n").is_err());
        assert!(parse_format("\tfield:int a;\tsize:4;\tsigned:1;\n").is_err());
    }

    #[test]
    fn task_offsets_from_running_kernel_btf() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: no {VMLINUX_BTF} on this kernel");
            return;
        }
        let btf = load_vmlinux_btf().unwrap();
        let off = TaskOffsets::from_btf(&btf).unwrap();
        // pid and tgid are adjacent pid_t fields in every kernel since 2.6.
        assert_eq!(off.task_tgid, off.task_pid + 4);
        assert!(off.task_signal > 0 && off.task_exit_code > 0);
        assert!(has_raw_tracepoint(&btf, "sched_process_fork"));
        assert!(!has_raw_tracepoint(&btf, "no_such_tracepoint_anywhere"));
        assert!(member_offset(&btf, "task_struct", "no_such_member").is_err());
        // Inside an anonymous const struct in every kernel that has one.
        assert!(member_offset(&btf, "vm_fault", "address").is_ok());
        // x86_64's pt_regs: r15..r8, ax, cx, dx, si, di, orig_ax, then ip.
        assert_eq!(member_offset(&btf, "pt_regs", "ip").unwrap(), 16 * 8);
        assert_eq!(member_offset(&btf, "pt_regs", "orig_ax").unwrap(), 15 * 8);
        // FAULT_FLAG_USER = 1 << 6 since 5.x (enum fault_flag).
        assert_eq!(enum_value(&btf, "fault_flag", "FAULT_FLAG_USER"), Some(1 << 6));
        assert_eq!(enum_value(&btf, "fault_flag", "NO_SUCH_FLAG"), None);
        let id = btf_func_id(&btf, "copy_process").unwrap();
        assert!(matches!(btf.resolve_type_by_id(id), Ok(Type::Func(_))));
        assert_eq!(btf_func_id(&btf, "task_struct"), None);
    }

    #[test]
    fn kallsyms_matches_whole_text_symbols() {
        let text = "ffffffff81206f50 t copy_process.cold\nffffffff81354870 T copy_process\n\
                    ffffffff82000000 d do_wp_page\nffffffff815e2f50 t wp_page_reuse\t[kvm]\n";
        assert!(kallsyms_has(text, "copy_process"));
        assert!(kallsyms_has(text, "wp_page_reuse"));
        assert!(!kallsyms_has(text, "do_wp_page")); // data, not text
        assert!(!kallsyms_has(text, "copy_process.co"));
        assert!(!kallsyms_has(text, "wp_page_copy"));
    }
}

/// Properties of the tracefs format parser: tracefs is the kernel's, but
/// what we make of it sets where the BPF programs read.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn field_name() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(b"abcdefghijklmnopqrstuvwxyz_0123456789".to_vec()), 0..20)
            .prop_map(|tail| format!("f{}", String::from_utf8(tail).unwrap()))
    }

    /// A field and its declaration, in the shapes tracefs uses.
    fn field() -> impl Strategy<Value = (String, Field)> {
        (field_name(), 0usize..5, any::<u32>(), any::<u32>(), any::<bool>(), 1u32..64).prop_map(
            |(name, shape, offset, size, signed, dim)| {
                let decl = match shape {
                    0 => format!("int {name}"),
                    1 => format!("unsigned long {name}"),
                    2 => format!("char {name}[{dim}]"),
                    3 => format!("__data_loc char[] {name}"),
                    _ => format!("struct clone_args * {name}"),
                };
                let line =
                    format!("\tfield:{decl};\toffset:{offset};\tsize:{size};\tsigned:{};\n", signed as u8);
                (line, Field { name, offset, size, signed })
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_text_is_parsed_or_refused_without_panicking(text in any::<String>(), bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_format(&text);
            let _ = parse_format(&format!("\tfield:{text};\toffset:1;\tsize:{text};\n"));
            let _ = parse_format(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn formats_round_trip(fields in prop::collection::vec(field(), 1..12)) {
            let text = format!("name: x\nID: 1\nformat:\n{}\nprint fmt: \"\"\n",
                fields.iter().map(|(l, _)| l.as_str()).collect::<String>());
            let want: Vec<Field> = fields.into_iter().map(|(_, f)| f).collect();
            prop_assert_eq!(parse_format(&text).unwrap(), want);
        }

        #[test]
        fn a_field_without_a_number_is_refused(fields in prop::collection::vec(field(), 1..6), victim in any::<prop::sample::Index>(), how in 0usize..4) {
            let mut lines: Vec<String> = fields.into_iter().map(|(l, _)| l).collect();
            let i = victim.index(lines.len());
            let l = &lines[i];
            lines[i] = match how {
                0 => l.replacen("offset:", "offset:x", 1),
                1 => l.replacen("size:", "size:-", 1),
                2 => { let at = l.find("\toffset:").unwrap(); let end = at + l[at + 1..].find('\t').unwrap() + 1; format!("{}{}", &l[..at], &l[end..]) }
                _ => { let at = l.find("\tsize:").unwrap(); let end = at + l[at + 1..].find('\t').unwrap() + 1; format!("{}{}", &l[..at], &l[end..]) }
            };
            prop_assert!(parse_format(&lines.concat()).is_err(), "{:?}", lines[i]);
        }
    }
}
