//! What the running kernel offers and where things are in it: structure
//! offsets from BTF, and the preconditions (BTF, tracefs) the BPF programs
//! need.
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
    /// `offsetof(struct task_struct, thread_info)` plus
    /// `offsetof(struct thread_info, status)`.
    pub task_ti_status: u32,
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
            task_ti_status: member_offset(btf, "task_struct", "thread_info")?
                + member_offset(btf, "thread_info", "status")?,
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

/// Where tracefs is mounted, mounting it at `/sys/kernel/tracing` if it is
/// not (its `kprobe_events` says whether the kernel has kprobes).
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
                    "cannot read tracefs at {dir} ({e}): cow-trace reads what the kernel can trace from it; \
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

#[cfg(test)]
mod tests {
    use super::*;

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
