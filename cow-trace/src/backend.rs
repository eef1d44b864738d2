//! Backend selection and loading: which hooks this kernel offers, why the
//! chosen backend was chosen, and the loaded, attached BPF programs.

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, KProbe, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use btf_rs::Btf;
use cow_trace_common::{counter, Config, FaultBatch, FaultRecord, TRACED_ROOT};

use crate::{
    cli::BackendChoice,
    kernel::{self, KernelOffsets},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cow-trace"));

/// Raw tracepoints every backend uses: the traced set (children followed,
/// exits) and exec (fork+exec episodes) are kept by these.
const SHARED_RAW_TRACEPOINTS: [&str; 3] = ["sched_process_fork", "sched_process_exit", "sched_process_exec"];

/// Raw tracepoints of the tracepoint backend: typed arguments, no record copy.
const TP_RAW_TRACEPOINTS: [&str; 4] = ["page_fault_user", "mm_page_alloc", "sys_enter", "sched_switch"];

/// Classic syscall tracepoints, one pair per syscall that can create a
/// process. Not every architecture has all four.
const FORK_SYSCALLS: [&str; 4] = ["clone", "clone3", "fork", "vfork"];

/// Kernel functions the kprobe and fentry backends hook: (function, whether
/// the backend can do without it). Optional ones add a measurement (the
/// `dup_mmap` share of fork latency, huge-page faults) or a sharper signal
/// (`wp_page_copy`: the kernel's own copy path; without it, a fault that
/// allocated an order-0 user page copied).
const KERNEL_FUNCTIONS: [(&str, bool); 5] = [
    ("copy_process", false),
    ("do_wp_page", false),
    ("dup_mmap", true),
    ("wp_page_copy", true),
    ("do_huge_pmd_wp_page", true),
];

/// Environment variable listing optional functions not to hook.
pub const SKIP_HOOKS_ENV: &str = "COW_TRACE_SKIP_HOOKS";

/// Functions whose return is hooked too (kretprobe / fexit).
const HOOKS_RETURN: [&str; 4] = ["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Fentry => "fentry",
            BackendKind::Kprobe => "kprobe",
            BackendKind::Tracepoint => "tracepoint",
        }
    }

    pub fn fork_latency_means(self) -> &'static str {
        match self {
            BackendKind::Tracepoint => "clone/fork syscall entry to return, in the parent",
            _ => "time the kernel spent in copy_process creating the child",
        }
    }

    pub fn cow_latency_means(self) -> &'static str {
        match self {
            BackendKind::Tracepoint => {
                "write fault to the copy's page allocation (copies only; bursts sampled, see --sample-every)"
            }
            _ => "do_wp_page entry to return (every write-protect fault)",
        }
    }

    /// The program names for a hooked function on this backend:
    /// (entry, return).
    fn programs(self, func: &str) -> (String, String) {
        match self {
            BackendKind::Fentry => (format!("fe_{func}"), format!("fx_{func}")),
            _ => (format!("kp_{func}"), format!("kr_{func}")),
        }
    }
}

/// The order `--backend auto` tries: cheapest and most precise first.
pub fn candidates(choice: BackendChoice) -> Vec<BackendKind> {
    match choice {
        BackendChoice::Auto => vec![BackendKind::Fentry, BackendKind::Kprobe, BackendKind::Tracepoint],
        BackendChoice::Fentry => vec![BackendKind::Fentry],
        BackendChoice::Kprobe => vec![BackendKind::Kprobe],
        BackendChoice::Tracepoint => vec![BackendKind::Tracepoint],
    }
}

#[derive(Clone, Debug)]
pub struct Selection {
    pub kind: BackendKind,
    /// Why this backend: one line a user can act on.
    pub reason: String,
    /// Backends tried before this one, each as "name: why not".
    pub rejected: Vec<String>,
    /// What the latencies mean on this backend.
    pub fork_latency_means: &'static str,
    pub cow_latency_means: &'static str,
    /// Whether fork latency is split into its `dup_mmap` share.
    pub dup_mmap_split: bool,
}

/// What the kernel can do, probed without loading anything.
#[derive(Clone, Debug, Default)]
pub struct KernelFeatures {
    /// A kprobe PMU or tracefs `kprobe_events`: CONFIG_KPROBES.
    pub kprobes: bool,
    pub missing_raw_tracepoints: Vec<&'static str>,
    pub fork_syscalls: Vec<&'static str>,
    /// Of [`KERNEL_FUNCTIONS`], those in /proc/kallsyms (kprobe targets).
    pub kallsyms: Vec<&'static str>,
    /// Of [`KERNEL_FUNCTIONS`], those with a BTF `FUNC` (fentry targets).
    pub btf_funcs: Vec<&'static str>,
    /// Optional functions not to hook (`COW_TRACE_SKIP_HOOKS=a,b`): a way
    /// around a function that misbehaves on some kernel, and a way to run
    /// the fallbacks (e.g. the copy signal used where `wp_page_copy` is
    /// inlined) on a kernel that has them all.
    pub skip: Vec<String>,
}

impl KernelFeatures {
    pub fn probe(btf: &Btf, tracefs: &Path) -> Self {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Self {
            kprobes: tracefs.join("kprobe_events").exists()
                || Path::new("/sys/bus/event_source/devices/kprobe").exists(),
            missing_raw_tracepoints: SHARED_RAW_TRACEPOINTS
                .into_iter()
                .chain(TP_RAW_TRACEPOINTS)
                .filter(|tp| !kernel::has_raw_tracepoint(btf, tp))
                .collect(),
            fork_syscalls: FORK_SYSCALLS
                .into_iter()
                .filter(|s| tracefs.join(format!("events/syscalls/sys_enter_{s}")).is_dir())
                .collect(),
            kallsyms: KERNEL_FUNCTIONS
                .iter()
                .map(|&(f, _)| f)
                .filter(|f| kernel::kallsyms_has(&kallsyms, f))
                .collect(),
            btf_funcs: KERNEL_FUNCTIONS
                .iter()
                .map(|&(f, _)| f)
                .filter(|f| kernel::has_btf_func(btf, f))
                .collect(),
            skip: std::env::var(SKIP_HOOKS_ENV)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    /// The functions `kind` would hook here, or why it cannot run, judged
    /// from what the kernel advertises (loading may still refuse).
    pub fn check(&self, kind: BackendKind) -> Result<Vec<&'static str>, String> {
        let shared: Vec<_> = self
            .missing_raw_tracepoints
            .iter()
            .filter(|tp| SHARED_RAW_TRACEPOINTS.contains(tp) || kind == BackendKind::Tracepoint)
            .copied()
            .collect();
        if !shared.is_empty() {
            return Err(format!(
                "this kernel lacks the tracepoint(s) {} (page_fault_user is x86-only)",
                shared.join(", ")
            ));
        }
        let have = match kind {
            BackendKind::Tracepoint => {
                if !self.fork_syscalls.contains(&"clone") {
                    return Err("this kernel has no syscalls:sys_enter_clone tracepoint \
                                (CONFIG_FTRACE_SYSCALLS)"
                        .into());
                }
                return Ok(vec![]);
            }
            BackendKind::Kprobe => {
                if !self.kprobes {
                    return Err("kernel built without CONFIG_KPROBES".into());
                }
                &self.kallsyms
            }
            BackendKind::Fentry => &self.btf_funcs,
        };
        let where_ = if kind == BackendKind::Fentry { "in the kernel's BTF" } else { "in /proc/kallsyms" };
        for (f, optional) in KERNEL_FUNCTIONS {
            if !optional && !have.contains(&f) {
                return Err(format!("kernel function {f} not found {where_} (inlined or renamed)"));
            }
            if !optional && self.skip.iter().any(|s| s == f) {
                return Err(format!("{SKIP_HOOKS_ENV} names {f}, which this backend cannot do without"));
            }
        }
        Ok(KERNEL_FUNCTIONS
            .iter()
            .map(|&(f, _)| f)
            .filter(|f| have.contains(f) && !self.skip.iter().any(|s| s == f))
            .collect())
    }
}

/// The one line saying why `kind` was picked.
pub fn reason(choice: BackendChoice, kind: BackendKind, rejected: &[String]) -> String {
    let passed_over: Vec<_> = rejected.iter().filter_map(|r| r.split(':').next()).collect();
    match choice {
        BackendChoice::Auto if rejected.is_empty() => "the best backend this kernel offers".into(),
        // The reasons are on the lines printed before this one.
        BackendChoice::Auto => {
            format!("the best backend this kernel accepts (passed over: {})", passed_over.join(", "))
        }
        _ => format!("requested with --backend {}", kind.name()),
    }
}

pub fn errno_name(code: i32) -> String {
    match code {
        libc::EPERM => "EPERM".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::EACCES => "EACCES".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::E2BIG => "E2BIG".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        524 => "ENOTSUPP".into(),
        n => format!("errno {n}"),
    }
}

/// The loaded and attached programs, with the maps userspace reads.
pub struct Tracer {
    pub ebpf: Ebpf,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

pub struct LoadOptions {
    pub trace_all: bool,
    pub follow: bool,
    pub ring_buffer_size: u32,
    pub empty_programs: bool,
    pub sample_every: u32,
}

fn raise_memlock() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain setrlimit. Kernels >= 5.11 account BPF memory to the
    // memory cgroup and ignore RLIMIT_MEMLOCK, so failure is harmless there.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        log::debug!("setrlimit(RLIMIT_MEMLOCK): {}", std::io::Error::last_os_error());
    }
}

impl Tracer {
    /// Loads and attaches `kind`'s programs, hooking `funcs` (from
    /// [`KernelFeatures::check`]) for the kprobe and fentry backends.
    /// Dropping the result detaches everything, so a failed attempt leaves
    /// nothing behind.
    pub fn load(
        kind: BackendKind,
        funcs: &[&str],
        offsets: &KernelOffsets,
        tracefs: &Path,
        features: &KernelFeatures,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let off = &offsets.task;
        let sys_exit_ret = match kind {
            BackendKind::Tracepoint => {
                let exit_fmt = kernel::event_format(tracefs, "syscalls", "sys_exit_clone")?;
                kernel::field(&exit_fmt, "ret")
                    .ok_or_else(|| anyhow!("syscalls:sys_exit_clone has no `ret` field"))?
                    .offset
            }
            _ => 0,
        };
        let vmf_address = match kind {
            BackendKind::Tracepoint => 0,
            _ => offsets
                .vmf_address
                .ok_or_else(|| anyhow!("kernel BTF: struct vm_fault has no member address"))?,
        };
        let config = Config {
            trace_all: opts.trace_all as u32,
            follow: opts.follow as u32,
            task_pid: off.task_pid,
            task_tgid: off.task_tgid,
            task_signal: off.task_signal,
            task_exit_code: off.task_exit_code,
            signal_live: off.signal_live,
            sys_exit_ret,
            self_tgid: std::process::id(),
            empty: opts.empty_programs as u32,
            wakeup_bytes: (opts.ring_buffer_size / 4).min(256 << 10),
            sample_every: opts.sample_every,
            vmf_address,
            wp_copy_hooked: funcs.contains(&"wp_page_copy") as u32,
        };
        log::debug!("BPF config for {}: {config:?}", kind.name());
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", opts.ring_buffer_size)
            .load(OBJECT)
            .context("cannot load the BPF object")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("no BPF logger: {e}");
                None
            }
        };

        let raw: &[&str] = match kind {
            BackendKind::Tracepoint => &TP_RAW_TRACEPOINTS,
            // Notes the pages a fault in flight allocates.
            _ => &["mm_page_alloc_wp"],
        };
        for name in SHARED_RAW_TRACEPOINTS.iter().chain(raw) {
            let tp = name.trim_end_matches("_wp");
            let prog: &mut RawTracePoint = program(&mut ebpf, name)?.try_into()?;
            prog.load().map_err(|e| load_error(name, e))?;
            prog.attach(tp).with_context(|| format!("cannot attach to raw tracepoint {tp}"))?;
        }
        match kind {
            BackendKind::Tracepoint => attach_fork_syscalls(&mut ebpf, features)?,
            BackendKind::Kprobe => attach_kprobes(&mut ebpf, funcs)?,
            BackendKind::Fentry => attach_fentries(&mut ebpf, funcs)?,
        }
        Ok(Self { ebpf, logger })
    }

    /// Adds processes to the in-kernel traced set.
    pub fn trace_pids(&mut self, pids: &[u32]) -> Result<()> {
        let mut traced: HashMap<_, u32, u8> =
            HashMap::try_from(self.ebpf.map_mut("TRACED").context("TRACED map missing")?)?;
        for &pid in pids {
            traced.insert(pid, TRACED_ROOT, 0).with_context(|| format!("cannot trace PID {pid}"))?;
        }
        Ok(())
    }

    /// Detaches and unloads every program, keeping the maps: after this the
    /// counters and the ring buffer stop moving, so a final drain and the
    /// counters describe the same set of events.
    pub fn detach(&mut self) {
        use aya::programs::Program;
        for (name, prog) in self.ebpf.programs_mut() {
            let result = match prog {
                Program::RawTracePoint(p) => p.unload(),
                Program::TracePoint(p) => p.unload(),
                Program::BtfTracePoint(p) => p.unload(),
                Program::KProbe(p) => p.unload(),
                Program::FEntry(p) => p.unload(),
                Program::FExit(p) => p.unload(),
                _ => Ok(()),
            };
            // Programs this kernel had no hook for were never loaded.
            if let Err(e) = result {
                log::debug!("unloading {name}: {e}");
            }
        }
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Fault outcomes still in the programs' per-CPU batches, with each
    /// batch's time. Only complete once the programs are detached: until
    /// then the kernel is still adding to them and sending them.
    pub fn unsent_faults(&self) -> Result<Vec<(u64, FaultRecord)>> {
        let mut out = Vec::new();
        for batch in self.batches()?.iter() {
            let n = (batch.count as usize).min(batch.records.len());
            out.extend(batch.records[..n].iter().map(|r| (batch.ts_ns, *r)));
        }
        Ok(out)
    }

    /// The time of the oldest fault outcome some CPU holds unsent, if any.
    pub fn oldest_unsent(&self) -> Result<Option<u64>> {
        Ok(self.batches()?.iter().filter(|b| b.count > 0).map(|b| b.ts_ns).min())
    }

    /// Every CPU's fault batch, as it is now.
    fn batches(&self) -> Result<aya::maps::PerCpuValues<FaultBatch>> {
        let arr: PerCpuArray<_, FaultBatch> =
            PerCpuArray::try_from(self.ebpf.map("BATCH").context("BATCH map missing")?)?;
        Ok(arr.get(&0, 0)?)
    }

    /// The kernel's counters, summed over CPUs, indexed by `counter::*`.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize]> {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?;
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

fn attach_fork_syscalls(ebpf: &mut Ebpf, features: &KernelFeatures) -> Result<()> {
    for s in &features.fork_syscalls {
        for (prefix, dir) in [("enter", "sys_enter"), ("exit", "sys_exit")] {
            let name = format!("{prefix}_{s}");
            let event = format!("{dir}_{s}");
            let prog: &mut TracePoint = program(ebpf, &name)?.try_into()?;
            prog.load().map_err(|e| load_error(&name, e))?;
            prog.attach("syscalls", &event)
                .with_context(|| format!("cannot attach to tracepoint syscalls:{event}"))?;
        }
    }
    Ok(())
}

/// The (program, function) pairs that hook `funcs`.
fn hooks(kind: BackendKind, funcs: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &f in funcs {
        let (entry, ret) = kind.programs(f);
        out.push((entry, f.to_string()));
        if HOOKS_RETURN.contains(&f) {
            out.push((ret, f.to_string()));
        }
    }
    out
}

fn attach_kprobes(ebpf: &mut Ebpf, funcs: &[&str]) -> Result<()> {
    for (name, func) in hooks(BackendKind::Kprobe, funcs) {
        let prog: &mut KProbe = program(ebpf, &name)?.try_into()?;
        prog.load().map_err(|e| load_error(&name, e))?;
        prog.attach(&func, 0).with_context(|| format!("cannot attach a kprobe to {func}"))?;
    }
    Ok(())
}

fn attach_fentries(ebpf: &mut Ebpf, funcs: &[&str]) -> Result<()> {
    let btf = aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
    for (name, func) in hooks(BackendKind::Fentry, funcs) {
        let prog = program(ebpf, &name)?;
        if name.starts_with("fe_") {
            let p: &mut FEntry = prog.try_into()?;
            p.load(&func, &btf).map_err(|e| trampoline_error(&name, &func, e))?;
            p.attach().with_context(|| format!("cannot attach fentry to {func}"))?;
        } else {
            let p: &mut FExit = prog.try_into()?;
            p.load(&func, &btf).map_err(|e| trampoline_error(&name, &func, e))?;
            p.attach().with_context(|| format!("cannot attach fexit to {func}"))?;
        }
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("BPF program {name} missing from the object"))
}

/// Kernels that lock trampolines down refuse every fentry load alike: the
/// errno is the news, the verifier log is not.
fn trampoline_error(name: &str, func: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    match &e {
        aya::programs::ProgramError::LoadError { io_error, .. } if io_error.raw_os_error().is_some() => {
            log::debug!("loading {name}: {e:?}");
            let code = io_error.raw_os_error().unwrap_or(0);
            anyhow!("BPF trampoline refused: {} (loading {name} for {func})", errno_name(code))
        }
        _ => load_error(name, e),
    }
}

fn load_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    // The verifier log is long; keep it for --verbose users.
    log::debug!("loading {name}: {e:?}");
    let errno = match &e {
        aya::programs::ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        aya::programs::ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(code) => anyhow!(
            "the kernel refused BPF program {name}: {} (RUST_LOG=debug shows the verifier log)",
            errno_name(code)
        ),
        None => anyhow!("the kernel refused BPF program {name}: {e} (RUST_LOG=debug shows the verifier log)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 5] = ["copy_process", "do_wp_page", "dup_mmap", "wp_page_copy", "do_huge_pmd_wp_page"];

    /// This machine's kind of kernel: tracepoints only.
    fn no_kprobes() -> KernelFeatures {
        KernelFeatures {
            kprobes: false,
            missing_raw_tracepoints: vec![],
            fork_syscalls: vec!["clone", "clone3"],
            kallsyms: vec!["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"],
            btf_funcs: vec!["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"],
            skip: vec![],
        }
    }

    #[test]
    fn auto_tries_fentry_then_kprobe_then_tracepoint() {
        use BackendKind::*;
        assert_eq!(candidates(BackendChoice::Auto), vec![Fentry, Kprobe, Tracepoint]);
        assert_eq!(candidates(BackendChoice::Kprobe), vec![Kprobe]);
        assert_eq!(candidates(BackendChoice::Fentry), vec![Fentry]);
        assert_eq!(candidates(BackendChoice::Tracepoint), vec![Tracepoint]);
    }

    #[test]
    fn kprobe_needs_config_kprobes() {
        let e = no_kprobes().check(BackendKind::Kprobe).unwrap_err();
        assert_eq!(e, "kernel built without CONFIG_KPROBES");
        let f = KernelFeatures { kprobes: true, ..no_kprobes() };
        // wp_page_copy inlined: hooked set without it, the rest kept.
        assert_eq!(
            f.check(BackendKind::Kprobe).unwrap(),
            vec!["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"]
        );
    }

    #[test]
    fn required_functions_are_named_when_missing() {
        let f = KernelFeatures { kprobes: true, kallsyms: vec!["copy_process"], ..no_kprobes() };
        let e = f.check(BackendKind::Kprobe).unwrap_err();
        assert!(e.contains("do_wp_page") && e.contains("kallsyms"), "{e}");
        let f = KernelFeatures { btf_funcs: vec!["do_wp_page"], ..no_kprobes() };
        let e = f.check(BackendKind::Fentry).unwrap_err();
        assert!(e.contains("copy_process") && e.contains("BTF"), "{e}");
        // Optional functions are just left out.
        let f = KernelFeatures { btf_funcs: ALL.to_vec(), ..no_kprobes() };
        assert_eq!(f.check(BackendKind::Fentry).unwrap(), ALL.to_vec());
    }

    #[test]
    fn skipped_hooks() {
        let f = KernelFeatures { btf_funcs: ALL.to_vec(), skip: vec!["wp_page_copy".into()], ..no_kprobes() };
        assert_eq!(
            f.check(BackendKind::Fentry).unwrap(),
            vec!["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"]
        );
        let f = KernelFeatures { skip: vec!["do_wp_page".into()], ..f };
        let e = f.check(BackendKind::Fentry).unwrap_err();
        assert!(e.contains("COW_TRACE_SKIP_HOOKS") && e.contains("do_wp_page"), "{e}");
    }

    #[test]
    fn missing_tracepoints_are_named() {
        let f = KernelFeatures { missing_raw_tracepoints: vec!["page_fault_user"], ..no_kprobes() };
        assert!(f.check(BackendKind::Tracepoint).unwrap_err().contains("page_fault_user"));
        // The kprobe and fentry backends do not need it.
        assert!(f.check(BackendKind::Fentry).is_ok());
        let f = KernelFeatures { missing_raw_tracepoints: vec!["sched_process_exit"], ..no_kprobes() };
        assert!(f.check(BackendKind::Fentry).unwrap_err().contains("sched_process_exit"));
        let f = KernelFeatures { fork_syscalls: vec![], ..no_kprobes() };
        assert!(f.check(BackendKind::Tracepoint).unwrap_err().contains("sys_enter_clone"));
    }

    #[test]
    fn hooks_pair_entry_and_return_programs() {
        let h = hooks(BackendKind::Fentry, &["copy_process", "wp_page_copy"]);
        let names: Vec<_> = h.iter().map(|(p, f)| format!("{p}@{f}")).collect();
        assert_eq!(
            names,
            ["fe_copy_process@copy_process", "fx_copy_process@copy_process", "fe_wp_page_copy@wp_page_copy"]
        );
        let h = hooks(BackendKind::Kprobe, &["do_wp_page"]);
        assert_eq!(h[1].0, "kr_do_wp_page");
    }

    #[test]
    fn reasons() {
        let rejected = vec!["fentry: EPERM".to_string(), "kprobe: no".to_string()];
        assert!(reason(BackendChoice::Auto, BackendKind::Tracepoint, &rejected)
            .ends_with("(passed over: fentry, kprobe)"));
        assert!(reason(BackendChoice::Kprobe, BackendKind::Kprobe, &[]).contains("--backend kprobe"));
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(524), "ENOTSUPP");
    }
}
