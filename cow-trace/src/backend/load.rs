//! The loaded and attached BPF programs, with the maps userspace reads.

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap},
    programs::{FEntry, FExit, KProbe, RawTracePoint},
    Ebpf, EbpfLoader,
};
use cow_trace::{
    counts::{add_batch_counts, KernelCounters},
    stacks::StackCounts,
};
use cow_trace_common::{
    counter,
    hooks::{Attach, Hook},
    stack_lost, Config, FaultBatch, FaultRecord, PendingFault, StackKey, TRACED_ROOT,
};

use super::BackendKind;
use crate::{
    kernel::{KernelBtf, KernelOffsets},
    timings,
};

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
    /// The attached programs' links; dropping the tracer detaches them.
    links: Vec<Link>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        detach_all(std::mem::take(&mut self.links));
    }
}

/// Links being detached on another thread; [`Detaching::wait`] returns once
/// all are.
pub struct Detaching(Option<std::thread::JoinHandle<()>>);

impl Detaching {
    pub fn wait(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Detaching {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

pub struct LoadOptions {
    pub trace_all: bool,
    pub follow: bool,
    pub ring_buffer_size: u32,
    pub empty_programs: bool,
    pub sample_every: u32,
    /// `--cgroup`: the cgroups' ids and the deepest level among them.
    pub cgroups: Vec<CgroupId>,
    /// `--stacks`: count copies by user stack.
    pub stacks: bool,
}

/// `--stacks` map sizes. A stack-trace entry holds 127 frames (1 KiB): the
/// stack map is 16 MiB of kernel memory; the count map is per CPU.
const STACK_TRACE_ENTRIES: u32 = 16384;
const STACK_COUNT_ENTRIES: u32 = 16384;
/// Processes whose image is recorded at once (as many as can be traced).
const STACK_IMAGES: u32 = 65536;
/// `stacks::SLOTS` on the BPF side.
const STACK_SLOTS: u32 = 1 << 16;
/// Frames of a stack-trace map entry (aya's, the kernel's default limit).
const PERF_MAX_STACK_DEPTH: u32 = 127;

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

/// What every attempt at loading a backend shares. aya 0.14 parses the
/// kernel's BTF whenever a loader is made (`EbpfLoader::new`): one loader
/// serves every attempt, and the BTF trampolines bind with is parsed, from
/// the bytes read once, only when a backend that needs it is tried.
pub struct Loader<'a> {
    loader: EbpfLoader<'a>,
    btf: &'a KernelBtf,
    trampolines: Option<aya::Btf>,
}

impl<'a> Loader<'a> {
    pub fn new(btf: &'a KernelBtf) -> Self {
        let loader = timings::time(|| "aya loader made (it parses the kernel's BTF)".into(), EbpfLoader::new);
        Self { loader, btf, trampolines: None }
    }

    fn trampoline_btf(&mut self) -> Result<&aya::Btf> {
        if self.trampolines.is_none() {
            let btf =
                timings::time(|| "BTF parsed by aya for trampolines".into(), || self.btf.for_loading())?;
            self.trampolines = Some(btf);
        }
        Ok(self.trampolines.as_ref().expect("just parsed"))
    }
}

impl Tracer {
    /// Loads `kind`'s programs, set up with `config` (from [`config`]), and
    /// attaches those of `plan` (from
    /// [`KernelFeatures::plan`](super::KernelFeatures::plan)). Dropping the result detaches
    /// everything, so a failed attempt leaves nothing behind.
    pub fn load<'a>(
        kind: BackendKind,
        plan: &[&'static Hook],
        config: &'a Config,
        opts: &LoadOptions,
        loader: &mut Loader<'a>,
    ) -> Result<Self> {
        log::debug!("BPF config for {}: {config:?}", kind.name());
        raise_memlock();
        let t = timings::span(|| format!("{}: object parsed, BTF and maps created", kind.name()));
        // Off, the stack maps keep the one entry they are built with.
        if opts.stacks {
            loader
                .loader
                .map_max_entries("STACK_TRACES", STACK_TRACE_ENTRIES)
                .map_max_entries("STACK_COPIES", STACK_COUNT_ENTRIES)
                .map_max_entries("IMAGES", STACK_IMAGES)
                .map_max_entries("STACK_SLOTS", STACK_SLOTS);
        }
        let mut ebpf = loader
            .loader
            .override_global("CONFIG", config, true)
            .map_max_entries("EVENTS", opts.ring_buffer_size)
            .load(OBJECT)
            .map_err(|e| {
                // The stack map is in the object whether or not --stacks is on;
                // its 127 frames are refused above the kernel's limit on them.
                match std::fs::read_to_string("/proc/sys/kernel/perf_event_max_stack")
                    .ok()
                    .and_then(|v| v.trim().parse::<u32>().ok())
                {
                    Some(max) if max < PERF_MAX_STACK_DEPTH => anyhow!(
                        "cannot load the BPF object: kernel.perf_event_max_stack is {max}, below the 127 frames of its stack map (sysctl -w kernel.perf_event_max_stack=127)"
                    ),
                    _ => anyhow::Error::new(e).context("cannot load the BPF object"),
                }
            })?;
        drop(t);
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("no BPF logger: {e}");
                None
            }
        };
        let btf = match kind {
            BackendKind::Fentry => Some(loader.trampoline_btf()?),
            _ => None,
        };
        if !opts.cgroups.is_empty() {
            let mut map: HashMap<_, u64, u8> =
                HashMap::try_from(ebpf.map_mut("CGROUPS").context("CGROUPS map missing")?)?;
            for c in &opts.cgroups {
                map.insert(c.id, 1, 0).context("cannot fill the cgroup filter")?;
            }
        }
        let mut tracer = Self { ebpf, logger, links: Vec::with_capacity(plan.len()) };
        for hook in plan {
            let link = attach(&mut tracer.ebpf, hook, btf)?;
            tracer.links.push(link);
        }
        Ok(tracer)
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
    /// `CUTOFF` global first, so all stop classifying at once, while all
    /// are still attached. Returns the cut-off time (`CLOCK_MONOTONIC` ns,
    /// the programs' clock), read after the write: every event the programs
    /// accounted is older.
    pub fn cut_off(&mut self) -> Result<u64> {
        // The global's section, a one-element array map holding it alone.
        let mut cut: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(CUTOFF_MAP).context("CUTOFF global missing")?)?;
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
        let map = self.ebpf.map("PENDING").context("PENDING map missing")?;
        // One batched read where the kernel has it, else slot by slot.
        let slots = match map {
            aya::maps::Map::Array(data) => read_array::<PendingFault>(data),
            _ => None,
        };
        if let Some(slots) = slots {
            return Ok(slots.iter().filter(|p| p.tid != 0).count() as u64);
        }
        let pending: Array<_, PendingFault> = Array::try_from(map)?;
        let mut n = 0;
        for slot in pending.iter() {
            n += (slot?.tid != 0) as u64;
        }
        Ok(n)
    }

    /// Starts detaching every program. Once the run is cut off and no
    /// program still runs (see `run::wait_for_running_programs`), the
    /// programs change nothing: detaching them can go on while userspace
    /// reads what they left, and the maps stay readable.
    pub fn detach_in_background(&mut self) -> Detaching {
        let links = std::mem::take(&mut self.links);
        match std::thread::Builder::new().name("detach".into()).spawn(move || detach_all(links)) {
            Ok(h) => Detaching(Some(h)),
            // The links went with the failed spawn: detached, only not in
            // the background.
            Err(_) => Detaching(None),
        }
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Fault outcomes still in the programs' per-CPU batches, with each
    /// batch's time, read once no program can change them (after the
    /// cut-off and the wait for running programs), and how many batches
    /// were left out because a program was still in the middle of changing
    /// them. That only happens where the wait is a pause rather than an RCU
    /// grace period (one CPU, `nohz_full`) and a preempted fexit held the
    /// batch: reading it could count a batch already sent, or half a record.
    pub fn unsent_faults(&self) -> Result<(Vec<(u64, FaultRecord)>, usize)> {
        let mut out = Vec::new();
        let mut busy = 0;
        for batch in self.batches()?.iter() {
            if batch.busy != 0 {
                busy += 1;
                continue;
            }
            let n = (batch.count as usize).min(batch.records.len());
            out.extend(batch.records[..n].iter().map(|r| (batch.ts_ns, *r)));
        }
        Ok((out, busy))
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

    /// `--stacks`: a reader of the image the kernel recorded for a
    /// process (0: none), for [`cow_trace::stacks::Layouts`].
    pub fn image_reader(&mut self) -> Result<Box<dyn Fn(u32) -> u64>> {
        let images: HashMap<MapData, u32, u64> =
            HashMap::try_from(self.ebpf.take_map("IMAGES").context("IMAGES map missing")?)?;
        Ok(Box::new(move |pid| images.get(&pid, 0).unwrap_or(0)))
    }

    /// `--stacks`: the copies the kernel counted by stack, the stacks, and
    /// what it could not count. Read after the cut-off.
    pub fn stack_counts(&self) -> Result<StackCounts> {
        let copies: PerCpuHashMap<_, StackKey, u64> =
            PerCpuHashMap::try_from(self.ebpf.map("STACK_COPIES").context("STACK_COPIES map missing")?)?;
        let mut out = StackCounts::default();
        for item in copies.iter() {
            let (key, per_cpu) = item?;
            // A copy taken back on another CPU than it was counted on
            // left a wrapped -1 there.
            let n = per_cpu.iter().fold(0u64, |a, &b| a.wrapping_add(b));
            // Below 0 only if a take-back found its thread's slot taken
            // by a colliding thread's stack: nothing to show for it.
            out.copies.push((key, if n > u64::MAX / 2 { 0 } else { n }));
        }
        let traces =
            StackTraceMap::try_from(self.ebpf.map("STACK_TRACES").context("STACK_TRACES map missing")?)?;
        for &(key, _) in &out.copies {
            if key.stack_id < stack_lost::FIRST && !out.traces.contains_key(&key.stack_id) {
                if let Ok(t) = traces.get(&key.stack_id, 0) {
                    out.traces.insert(key.stack_id, t.frames().iter().map(|f| f.ip).collect());
                }
            }
        }
        let lost: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STACK_LOST").context("STACK_LOST map missing")?)?;
        out.counts_full = lost.get(&stack_lost::COUNTS_FULL, 0)?.iter().sum();
        out.images_full = lost.get(&stack_lost::IMAGES_FULL, 0)?.iter().sum();
        Ok(out)
    }

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> Result<KernelCounters> {
        let arr = self.counter_array()?;
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        add_batch_counts(&mut out, self.batches()?.iter().map(|b| &b.counted));
        Ok(KernelCounters::decode(&out))
    }

    /// The events dropped so far, summed over CPUs: the one counter the
    /// run checks as it goes (each second), read alone.
    pub fn dropped(&self) -> Result<u64> {
        Ok(self.counter_array()?.get(&counter::DROPPED, 0)?.iter().sum())
    }

    fn counter_array(&self) -> Result<PerCpuArray<&MapData, u64>> {
        Ok(PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?)
    }
}

/// The map of the data section that holds the programs' `CUTOFF` global
/// alone (`shared.rs` in the BPF crate).
const CUTOFF_MAP: &str = ".data.cutoff";

/// The kernel's `union bpf_attr` as `BPF_PROG_LOAD` reads it, up to the
/// fields a tracing program needs (the rest must be, and are, zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_prog_fd: u32,
    core_relo_cnt: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_FENTRY: u32 = 24;

/// Whether the kernel loads an fentry program for `func` (its BTF id in
/// the kernel's BTF): the two-instruction program `return 0`, loaded and
/// closed. Kernels that lock trampolines down refuse every fentry load
/// alike (this machine kind answers EPERM), so the smallest load says so
/// for the cost of one system call, where trying the backend costs its
/// maps and every program before the first fentry one. A program that
/// loads here proves nothing yet: the backend is still chosen only once
/// its own programs load and attach.
pub fn trampoline_allowed(func: &str, btf_id: u32) -> Result<()> {
    // mov r0, 0; exit
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_FENTRY,
        attach_btf_id: btf_id,
        ..Default::default()
    };
    attr.prog_name[..13].copy_from_slice(b"cow_fe_probe\0");
    // SAFETY: the attribute points at the instructions and the license,
    // both alive for the call.
    let fd = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) };
    if fd < 0 {
        let code = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        bail!("BPF trampoline refused: {} (loading a test program for {func})", errno_name(code));
    }
    // SAFETY: a descriptor the kernel just gave us.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
    Ok(())
}

/// The kernel's `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every value of an array map, in a few `BPF_MAP_LOOKUP_BATCH` calls
/// (Linux 5.6) where aya's iterator makes one system call per slot: 65,536
/// of them, most of 100 ms, for the pending-fault table at the end of every
/// run. `None` when the kernel cannot (the caller then iterates).
fn read_array<V: aya::Pod + Default + Clone>(map: &MapData) -> Option<Vec<V>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let len = map.info().ok()?.max_entries() as usize;
    let mut keys = vec![0u32; len];
    let mut values = vec![V::default(); len];
    let mut read = 0usize;
    let mut next: u32 = 0;
    while read < len {
        let mut attr = BatchAttr {
            // Null the first time: from the start.
            in_batch: if read == 0 { 0 } else { &next as *const u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys[read..].as_mut_ptr() as u64,
            values: values[read..].as_mut_ptr() as u64,
            count: (len - read) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the buffers hold `count` keys and values of the map's
        // sizes, and `next` one key; all outlive the call.
        let rc = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // The kernel says how many it copied, and ENOENT at the end.
        read += attr.count as usize;
        if rc != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno == Some(libc::ENOENT) {
                break;
            }
            log::debug!("BPF_MAP_LOOKUP_BATCH: errno {errno:?}; reading slot by slot");
            return None;
        }
    }
    values.truncate(read);
    (read == len).then_some(values)
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`, in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The load-time settings of `kind`'s programs; `funcs` are the kernel
/// functions hooked.
pub fn config(
    kind: BackendKind,
    funcs: &[&str],
    offsets: &KernelOffsets,
    opts: &LoadOptions,
) -> Result<Config> {
    let off = &offsets.task;
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
        task_ti_status: off.task_ti_status,
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
        stacks: opts.stacks as u32,
    })
}

/// An attached program's link, owned apart from the program so that the
/// links can be dropped (detached) all at once, see [`detach_all`].
type Link = (&'static str, Box<dyn Send>);

/// Loads and attaches one program as the hook table says; returns its link.
fn attach(ebpf: &mut Ebpf, hook: &Hook, btf: Option<&aya::Btf>) -> Result<Link> {
    let (name, target) = (hook.program, hook.target);
    let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("BPF program {name} missing from the object"))?;
    let verify = || format!("verify {name}");
    let attaching = || format!("attach {name}");
    Ok(match hook.attach {
        Attach::RawTracepoint => {
            let p: &mut RawTracePoint = prog.try_into()?;
            timings::time(verify, || p.load()).map_err(|e| load_error(name, e))?;
            let id = timings::time(attaching, || p.attach(target))
                .with_context(|| format!("cannot attach to raw tracepoint {target}"))?;
            (name, Box::new(p.take_link(id)?))
        }
        Attach::Kprobe | Attach::Kretprobe => {
            let p: &mut KProbe = prog.try_into()?;
            timings::time(verify, || p.load()).map_err(|e| load_error(name, e))?;
            let id = timings::time(attaching, || p.attach(target, 0))
                .with_context(|| format!("cannot attach a kprobe to {target}"))?;
            (name, Box::new(p.take_link(id)?))
        }
        Attach::Fentry => {
            let btf = btf.context("fentry needs the kernel's BTF")?;
            let p: &mut FEntry = prog.try_into()?;
            timings::time(verify, || p.load(target, btf)).map_err(|e| trampoline_error(name, target, e))?;
            let id = timings::time(attaching, || p.attach())
                .with_context(|| format!("cannot attach fentry to {target}"))?;
            (name, Box::new(p.take_link(id)?))
        }
        Attach::Fexit => {
            let btf = btf.context("fexit needs the kernel's BTF")?;
            let p: &mut FExit = prog.try_into()?;
            timings::time(verify, || p.load(target, btf)).map_err(|e| trampoline_error(name, target, e))?;
            let id = timings::time(attaching, || p.attach())
                .with_context(|| format!("cannot attach fexit to {target}"))?;
            (name, Box::new(p.take_link(id)?))
        }
    })
}

/// Drops every link, each on a thread of its own. Some detachments wait
/// for an RCU grace period in the kernel; one after another such waits add
/// up, while waits made at the same time end with the same grace period.
/// Returns once every link is detached.
fn detach_all(links: Vec<Link>) {
    if links.is_empty() {
        return;
    }
    let _t = timings::span(|| format!("{} programs detached", links.len()));
    std::thread::scope(|s| {
        for link in links {
            // A thread that cannot be started drops its link as the
            // error returns: detached all the same, only not in parallel.
            let _ = std::thread::Builder::new()
                .name("detach".into())
                .spawn_scoped(s, move || timings::time(|| format!("detach {}", link.0), || drop(link.1)));
        }
    });
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

/// The `bpf(2)` system call with `attr`, for the two commands aya does not
/// offer here.
///
/// # Safety
/// Every pointer `attr` holds must be valid for what `cmd` does with it.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> libc::c_long {
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>() as u32) }
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

    /// `cut_off` writes the programs' `CUTOFF` global through the map aya
    /// makes of its section: the two names must agree, or the run could
    /// not end.
    #[test]
    fn the_cut_off_global_has_its_own_map() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded BPF object parses");
        let map = obj.maps.get(CUTOFF_MAP).expect("the CUTOFF global's section");
        assert_eq!(map.value_size(), 8, "CUTOFF alone in its section");
    }

    /// The batched read of the pending-fault table gives what reading it
    /// slot by slot gives, on the real map in the kernel.
    #[test]
    fn batched_array_reads_match_slot_by_slot_reads() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: creating BPF maps needs root");
            return;
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("the BPF object loads");
        let mut pending: Array<_, PendingFault> = Array::try_from(ebpf.map_mut("PENDING").unwrap()).unwrap();
        // Slots set at both ends and in between, by construction.
        let set = [0u32, 1, 4097, 40_000, pending.len() - 1];
        for (n, &i) in set.iter().enumerate() {
            let p = PendingFault { tid: 1000 + n as u32, addr: u64::from(i) << 12, ..Default::default() };
            pending.set(i, p, 0).unwrap();
        }
        let aya::maps::Map::Array(data) = ebpf.map("PENDING").unwrap() else { panic!("PENDING is an array") };
        let batched: Vec<PendingFault> =
            read_array(data).expect("BPF_MAP_LOOKUP_BATCH on arrays (Linux 5.6)");
        let pending: Array<_, PendingFault> = Array::try_from(ebpf.map("PENDING").unwrap()).unwrap();
        let one_by_one: Vec<PendingFault> = pending.iter().map(Result::unwrap).collect();
        assert_eq!(batched.len(), one_by_one.len());
        for (i, (a, b)) in batched.iter().zip(&one_by_one).enumerate() {
            assert_eq!((a.tid, a.addr), (b.tid, b.addr), "slot {i}");
        }
        let open: Vec<u32> =
            batched.iter().enumerate().filter(|(_, p)| p.tid != 0).map(|(i, _)| i as u32).collect();
        assert_eq!(open, set);
    }
}
