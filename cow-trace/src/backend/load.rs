//! The loaded and attached BPF programs, with the maps userspace reads.

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, KProbe, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use cow_trace::counts::KernelCounters;
use cow_trace_common::{
    counter,
    hooks::{Attach, Hook},
    Config, FaultBatch, FaultRecord, PendingFault, TRACED_ROOT,
};

use super::BackendKind;
use crate::kernel::{self, KernelOffsets};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cow-trace"));

/// The errno names a refused load or attach is reported with.
fn errno_name(code: i32) -> String {
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
    /// `--cgroup`: the cgroups' ids and the deepest level among them.
    pub cgroups: Vec<CgroupId>,
}

/// A cgroup v2 to trace: its id (the directory's inode number) and depth
/// (0 for the root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupId {
    pub id: u64,
    pub level: u32,
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
    /// Loads `kind`'s programs and attaches those of `plan` (from
    /// [`KernelFeatures::plan`](super::KernelFeatures::plan)); `funcs` are
    /// the kernel functions hooked. Dropping the result detaches
    /// everything, so a failed attempt leaves nothing behind.
    pub fn load(
        kind: BackendKind,
        plan: &[&'static Hook],
        funcs: &[&str],
        offsets: &KernelOffsets,
        tracefs: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let config = config(kind, funcs, offsets, tracefs, opts)?;
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
        let btf = match kind {
            BackendKind::Fentry => Some(aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?),
            _ => None,
        };
        if !opts.cgroups.is_empty() {
            let mut map: HashMap<_, u64, u8> =
                HashMap::try_from(ebpf.map_mut("CGROUPS").context("CGROUPS map missing")?)?;
            for c in &opts.cgroups {
                map.insert(c.id, 1, 0).context("cannot fill the cgroup filter")?;
            }
        }
        for hook in plan {
            attach(&mut ebpf, hook, btf.as_ref())?;
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

    /// Ends the run's accounting at one instant: every program checks the
    /// `CUTOFF` value first, so all stop classifying at once, while all are
    /// still attached. Returns the cut-off time (`CLOCK_MONOTONIC` ns, the
    /// programs' clock), read after the write: every event the programs
    /// accounted is older.
    pub fn cut_off(&mut self) -> Result<u64> {
        let mut cut: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut("CUTOFF").context("CUTOFF map missing")?)?;
        cut.set(0, 1, 0).context("cannot cut the run off")?;
        Ok(monotonic_ns())
    }

    /// Write faults the programs opened and never resolved before the
    /// cut-off: neither copies nor reuses. Only meaningful after `cut_off`
    /// (and a pause for programs still running on other CPUs).
    pub fn faults_in_flight(&self) -> Result<u64> {
        // One slot per thread on every backend, open while its tid is set:
        // the tracepoint backend's faults waiting for their outcome, the
        // kernel-function backends' faults whose handler had not returned.
        let pending: Array<_, PendingFault> =
            Array::try_from(self.ebpf.map("PENDING").context("PENDING map missing")?)?;
        let mut n = 0;
        for slot in pending.iter() {
            n += (slot?.tid != 0) as u64;
        }
        Ok(n)
    }

    /// The children of forks whose syscall had not returned by the
    /// cut-off (tracepoint backend; the kernel-function backends time
    /// `copy_process`, which returns before the child is announced).
    pub fn forks_in_flight(&self) -> Result<Vec<u32>> {
        let forks: HashMap<_, u32, [u64; 2]> =
            HashMap::try_from(self.ebpf.map("FORKS").context("FORKS map missing")?)?;
        // `ForkStart { ts, child: u32, _pad }`: the child in the low half.
        Ok(forks.iter().filter_map(Result::ok).map(|(_, v)| v[1] as u32).filter(|&c| c != 0).collect())
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

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> Result<KernelCounters> {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?;
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(KernelCounters::decode(&out))
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`, in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The load-time settings of `kind`'s programs.
fn config(
    kind: BackendKind,
    funcs: &[&str],
    offsets: &KernelOffsets,
    tracefs: &Path,
    opts: &LoadOptions,
) -> Result<Config> {
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
        _ => {
            offsets.vmf_address.ok_or_else(|| anyhow!("kernel BTF: struct vm_fault has no member address"))?
        }
    };
    Ok(Config {
        trace_all: opts.trace_all as u32,
        follow: opts.follow as u32,
        task_pid: off.task_pid,
        task_tgid: off.task_tgid,
        task_signal: off.task_signal,
        task_exit_code: off.task_exit_code,
        signal_live: off.signal_live,
        signal_oom_mm: off.signal_oom_mm,
        sys_exit_ret,
        self_tgid: std::process::id(),
        empty: opts.empty_programs as u32,
        wakeup_bytes: (opts.ring_buffer_size / 4).min(256 << 10),
        sample_every: opts.sample_every,
        vmf_address,
        wp_copy_hooked: funcs.contains(&"wp_page_copy") as u32,
        cgroup_levels: opts.cgroups.iter().map(|c| c.level + 1).max().unwrap_or(0),
        regs_ip: offsets.regs_ip,
        regs_orig_ax: offsets.regs_orig_ax,
        vmf_flags: offsets.vmf_user_flag.map_or(0, |(off, _)| off),
        fault_flag_user: offsets.vmf_user_flag.map_or(0, |(_, flag)| flag),
    })
}

/// Loads and attaches one program as the hook table says.
fn attach(ebpf: &mut Ebpf, hook: &Hook, btf: Option<&aya::Btf>) -> Result<()> {
    let (name, target) = (hook.program, hook.target);
    let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("BPF program {name} missing from the object"))?;
    match hook.attach {
        Attach::RawTracepoint => {
            let p: &mut RawTracePoint = prog.try_into()?;
            p.load().map_err(|e| load_error(name, e))?;
            p.attach(target).with_context(|| format!("cannot attach to raw tracepoint {target}"))?;
        }
        Attach::Tracepoint { category } => {
            let p: &mut TracePoint = prog.try_into()?;
            p.load().map_err(|e| load_error(name, e))?;
            p.attach(category, target)
                .with_context(|| format!("cannot attach to tracepoint {category}:{target}"))?;
        }
        Attach::Kprobe | Attach::Kretprobe => {
            let p: &mut KProbe = prog.try_into()?;
            p.load().map_err(|e| load_error(name, e))?;
            p.attach(target, 0).with_context(|| format!("cannot attach a kprobe to {target}"))?;
        }
        Attach::Fentry => {
            let btf = btf.context("fentry needs the kernel's BTF")?;
            let p: &mut FEntry = prog.try_into()?;
            p.load(target, btf).map_err(|e| trampoline_error(name, target, e))?;
            p.attach().with_context(|| format!("cannot attach fentry to {target}"))?;
        }
        Attach::Fexit => {
            let btf = btf.context("fexit needs the kernel's BTF")?;
            let p: &mut FExit = prog.try_into()?;
            p.load(target, btf).map_err(|e| trampoline_error(name, target, e))?;
            p.attach().with_context(|| format!("cannot attach fexit to {target}"))?;
        }
    }
    Ok(())
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

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(524), "ENOTSUPP");
    }

    /// The hook table and the built object name the same programs.
    #[test]
    fn every_program_in_the_object_is_in_the_hook_table_and_back() {
        use cow_trace_common::hooks::HOOKS;
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded BPF object parses");
        let mut in_object: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        in_object.sort_unstable();
        let mut in_table: Vec<&str> = HOOKS.iter().map(|h| h.program).collect();
        in_table.sort_unstable();
        assert_eq!(in_table, in_object);
    }
}
