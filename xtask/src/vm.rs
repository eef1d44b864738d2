//! `cargo xtask vm` and `cargo xtask vm-test`: cow-trace on another kernel,
//! booted under QEMU.
//!
//! The kernel this project develops on has no kprobes and refuses BPF
//! trampolines; Debian's has both. The runner boots such a kernel with an
//! initramfs holding the freshly built `cow-trace` and `cow-workload`, the
//! shared libraries they need and busybox; its `/init` mounts what the tool
//! needs, runs the command, prints a verdict line with the command's exit
//! status and powers off. QEMU runs with TCG: KVM is not usable on these
//! machines. Timings inside the VM mean nothing; counts do.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{
    build_release, run_cmd,
    setup::{self, output, say, which},
    workload::{self, num, Counted, Timing, KERNEL_WRITES},
    workspace_root, Tally,
};

const VERDICT: &str = "cow-trace-vm: exit=";

/// Commands the runner uses, and their Debian packages.
const VM_COMMANDS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("dpkg-deb", "dpkg"),
];

#[derive(Clone, Default)]
pub struct VmOptions {
    pub kernel: Option<PathBuf>,
    /// Files for the command's working directory.
    pub include: Vec<PathBuf>,
    /// Host programs for the VM's /bin, with their shared libraries.
    pub bins: Vec<PathBuf>,
    pub timeout: Duration,
    /// One vCPU instead of two, and QEMU's instruction counter as the
    /// guest's clock: the benchmark's, so that the guest accounts each
    /// task's CPU time in instructions, whatever the host's load (see
    /// `bench_vm`).
    pub one_cpu: bool,
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// The vmlinuz inside an extracted kernel package.
fn vmlinuz_in(dir: &Path) -> Result<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .with_context(|| format!("no boot/ in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| anyhow!("no boot/vmlinuz-* in {}", dir.display()))
}

fn extract_deb(deb: &Path) -> Result<PathBuf> {
    let name = deb.file_stem().and_then(|n| n.to_str()).unwrap_or("kernel").to_string();
    let dir = vm_dir().join("kernels").join(name);
    if vmlinuz_in(&dir).is_err() {
        fs::create_dir_all(&dir)?;
        say(&format!("extracting the kernel image from {}", deb.display()));
        // Only boot/vmlinuz-*: the package's modules (hundreds of MB) are
        // not needed, everything the VM runs is in the initramfs.
        run_cmd(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile {} | tar -x -C {} --wildcards './boot/vmlinuz-*'",
            sh_quote(&deb.to_string_lossy()),
            sh_quote(&dir.to_string_lossy())
        )))?;
    }
    vmlinuz_in(&dir)
}

/// The kernels `vm-test` runs on, by name: Debian's, each as the package
/// its meta-package depends on today.
pub const KERNELS: &[(&str, &str)] = &[
    // bookworm
    ("6.1", "linux-image-amd64"),
    // bookworm-security and bookworm-backports
    ("6.12", "linux-image-6.12-amd64"),
];

/// The kernel `meta` depends on, downloaded once into target/vm/cache.
fn debian_kernel(meta: &str) -> Result<PathBuf> {
    let deps = output(Command::new("apt-cache").args(["depends", meta]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-") && !d.contains("unsigned"))
        .ok_or_else(|| {
            anyhow!("apt-cache names no kernel for {meta}; run apt-get update (6.12: bookworm-backports)")
        })?
        .trim()
        .to_string();
    let cache = vm_dir().join("cache");
    fs::create_dir_all(&cache)?;
    let existing = fs::read_dir(&cache)?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
    });
    let deb = match existing {
        Some(deb) => deb,
        None => {
            say(&format!("downloading Debian's kernel package {pkg} (cached in target/vm/cache)"));
            run_cmd(Command::new("apt-get").args(["download", "-qq", &pkg]).current_dir(&cache))?;
            fs::read_dir(&cache)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb") && p.to_string_lossy().contains(&pkg))
                .ok_or_else(|| anyhow!("apt-get download {pkg} left no .deb"))?
        }
    };
    extract_deb(&deb)
}

/// The matrix kernel named `name` ("6.1", "6.12"), if it is one.
fn matrix_kernel(name: &Path) -> Option<&'static str> {
    KERNELS.iter().find(|(n, _)| name.as_os_str() == *n).map(|(_, meta)| *meta)
}

fn kernel_image(opt: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(meta) = opt.as_deref().and_then(matrix_kernel) {
        return debian_kernel(meta);
    }
    match opt {
        None => debian_kernel(KERNELS[0].1),
        Some(p) if p.extension().is_some_and(|x| x == "deb") => extract_deb(p),
        Some(p) if p.is_file() => Ok(p.clone()),
        Some(p) => {
            let names: Vec<_> = KERNELS.iter().map(|k| k.0).collect();
            bail!("--kernel {}: no such file (give {}, a vmlinuz or a .deb)", p.display(), names.join(", "))
        }
    }
}

/// Shared libraries (and the loader) a dynamically linked binary needs.
fn libraries(bin: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = output(Command::new("ldd").arg(bin))?;
    let mut libs = BTreeSet::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn copy_into(root: &Path, src: &Path, dest_rel: &Path) -> Result<()> {
    let dest = root.join(dest_rel);
    fs::create_dir_all(dest.parent().expect("has a parent"))?;
    fs::copy(src, &dest).with_context(|| format!("copying {} into the initramfs", src.display()))?;
    Ok(())
}

/// Quotes one word for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn build_initramfs(cmd: &[String], include: &[PathBuf], bins: &[PathBuf]) -> Result<PathBuf> {
    let dir = vm_dir();
    // One staging tree and image per run: concurrent runs must not boot
    // each other's.
    let root = dir.join(format!("initramfs-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "work"] {
        fs::create_dir_all(root.join(d))?;
    }
    let busybox =
        which("busybox").ok_or_else(|| anyhow!("busybox not found (apt-get install busybox-static)"))?;
    copy_into(&root, &busybox, Path::new("bin/busybox"))?;
    let release = workspace_root().join("target/release");
    let mut libs = BTreeSet::new();
    let ours = ["cow-trace", "cow-workload"].map(|b| release.join(b));
    for path in ours.iter().chain(bins) {
        let name = path.file_name().ok_or_else(|| anyhow!("--bin {}: not a program", path.display()))?;
        copy_into(&root, path, &Path::new("bin").join(name))?;
        libs.extend(libraries(path)?);
    }
    for lib in &libs {
        copy_into(&root, lib, lib.strip_prefix("/").expect("absolute"))?;
    }
    for f in include {
        let name = f.file_name().ok_or_else(|| anyhow!("--include {}: not a file", f.display()))?;
        copy_into(&root, f, &Path::new("work").join(name))?;
    }
    let command = cmd.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ");
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tracefs nodev /sys/kernel/tracing\n\
         echo \"cow-trace-vm: kernel $(uname -r), BTF $(test -e /sys/kernel/btf/vmlinux && echo yes || echo no)\"\n\
         cd /work\n\
         {command}\n\
         echo \"{VERDICT}$?\"\n\
         poweroff -f\n"
    );
    let init_path = root.join("init");
    fs::write(&init_path, init)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;
    let initrd = dir.join(format!("initrd-{}.cpio.gz", std::process::id()));
    run_cmd(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        sh_quote(&root.to_string_lossy()),
        sh_quote(&initrd.to_string_lossy())
    )))?;
    let _ = fs::remove_dir_all(&root);
    Ok(initrd)
}

/// Boots the kernel, runs `cmd` in it and returns (exit status, console
/// output). Console lines are echoed as they come when `echo` is set.
pub fn run_in_vm(opts: &VmOptions, cmd: &[String], echo: bool) -> Result<(i32, String)> {
    setup::ensure_packages(VM_COMMANDS)?;
    build_release()?;
    let kernel = kernel_image(&opts.kernel)?;
    let initrd = build_initramfs(cmd, &opts.include, &opts.bins)?;
    say(&format!("booting {} under QEMU (TCG)", kernel.display()));
    let mut child = Command::new("qemu-system-x86_64")
        // Every vCPU in one host thread: multi-threaded TCG lets a vCPU run
        // code another one is patching (a kprobe's breakpoint, a
        // tracepoint's static key) and has crashed guests as probes attached
        // (docs/kernel-notes.md, "Debian's 6.12 kernel").
        .args(["-accel", "tcg,thread=single"])
        .args(["-cpu", "max", "-m", "2048", "-smp", if opts.one_cpu { "1" } else { "2" }])
        // The benchmark's clock: one nanosecond per instruction executed,
        // whatever the host's speed or load (see `bench_vm`).
        .args(if opts.one_cpu { &["-icount", "shift=0,sleep=off"][..] } else { &[][..] })
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            if tx.send(String::from_utf8_lossy(&line).trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut console = String::new();
    let mut verdict = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(code) = line.rsplit(VERDICT).next().filter(|_| line.contains(VERDICT)) {
                    verdict = code.trim().parse::<i32>().ok();
                }
                if echo {
                    println!("{line}");
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() > opts.timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the VM did not finish within {:?}; killed it", opts.timeout);
        }
    }
    let status = child.wait()?;
    let _ = fs::remove_file(&initrd);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    match verdict {
        Some(code) => Ok((code, console)),
        None => {
            // A guest panic reboots, and -no-reboot ends QEMU with status 0:
            // the console's last lines say what happened.
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            bail!("the VM ended ({status}) without a verdict: {}\nlast console lines:\n{tail}", err.trim())
        }
    }
}

pub fn vm(opts: &VmOptions, cmd: &[String]) -> Result<i32> {
    if cmd.is_empty() {
        bail!("give the command to run in the VM after `--`");
    }
    Ok(run_in_vm(opts, cmd, true)?.0)
}

const BACKENDS: [&str; 3] = ["fentry", "kprobe", "tracepoint"];
const HUGE_PAGE: u64 = 2 << 20;

/// The JSON records of one section: cow-trace's summary and the
/// workload's report.
fn records(section: &str) -> Result<(Value, Value)> {
    let mut summary = None;
    let mut report = None;
    for line in section.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if v["type"] == "summary" {
                summary = Some(v);
            } else if v.get("children").is_some() {
                report = Some(v);
            }
        }
    }
    Ok((summary.ok_or_else(|| anyhow!("no summary"))?, report.ok_or_else(|| anyhow!("no workload report"))?))
}

fn proc_row(s: &Value, pid: u64) -> Result<&Value> {
    workload::process_row(s, pid).map_err(|e| anyhow!(e))
}

/// The start record of a section.
fn start_record(section: &str) -> Option<Value> {
    section.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v["type"] == "start")
}

/// Checks one backend's run of `KERNEL_WRITES` (the workload, plus copies
/// the kernel makes for the child) with the host tests' checks, plus the
/// kernel backends' address-space copy share; returns the copies it
/// counted and its figures.
fn check_backend(backend: &str, section: &str) -> Result<(Counted, String)> {
    let (s, w) = records(section)?;
    // Every backend batches fault outcomes and samples their timing.
    let checked = workload::check_summary(&s, &w, &KERNEL_WRITES, Timing::Sampled);
    let mut wrong = Vec::new();
    let batching = workload::check_batched_and_sampled(&s).unwrap_or_else(|e| {
        wrong.push(e.clone());
        e
    });
    if s["backend"] != backend {
        wrong.push(format!("ran backend {}, asked for {backend}", s["backend"]));
    }
    // Launch mode: the workload's fork is the only one traced.
    let eps = s["episodes"].as_array().map_or(0, Vec::len);
    if eps != 1 {
        wrong.push(format!("{eps} episodes, expected 1"));
    }
    // The kernel backends time the address-space copy inside copy_process
    // (dup_mmap, or copy_page_range where it is inlined): one fork, one
    // share, and a share cannot exceed the whole.
    let mut dup = String::new();
    if backend != "tracepoint" {
        let share = start_record(section).map(|v| v["fork_share_function"].clone()).unwrap_or_default();
        let row = proc_row(&s, num(&w["pid"]))?;
        let d = &row["fork_dup_mmap_ns"];
        // From the row itself, so a failed summary check does not turn
        // this into a comparison with a 0 ns fork.
        let fork_ns = num(&row["fork_latency_ns"]["max"]);
        let Some(f) = share.as_str() else { bail!("no function carries the fork's share: {share}") };
        if num(&d["count"]) != 1 || num(&d["max"]) == 0 || num(&d["max"]) > fork_ns {
            wrong.push(format!("{f} share {d} of a {fork_ns} ns fork"));
        }
        dup = format!(" ({f} {:.2} ms)", num(&d["max"]) as f64 / 1e6);
    }
    match checked {
        Ok(c) if wrong.is_empty() => {
            let k = &KERNEL_WRITES;
            let figures = format!(
                "child {} copies (wrote {} + read {} + /proc/self/mem {}), parent {} copies, {} zero-fills, \
                 fork {:.2} ms{dup}, episode ok; {batching}",
                c.child_copies,
                k.child_writes,
                k.child_reads,
                k.child_copies(backend) - k.child_writes - k.child_reads,
                c.parent_copies,
                c.zero_fills,
                c.fork_ns as f64 / 1e6
            );
            Ok((c, figures))
        }
        Ok(_) => bail!("{}", wrong.join("; ")),
        Err(e) => {
            wrong.insert(0, e);
            bail!("{}", wrong.join("; "))
        }
    }
}

/// Pages the child `pread(2)`s into shared memory in the `reads` runs.
const READS: u64 = 500;

/// Checks attribution on a kernel backend: the workload's child reads
/// `READS` pages into shared memory, copies the kernel makes in kernel mode
/// for `pread64`; every other copy is written by user code the symbolizer
/// names (the user instruction pointer, from the task's registers). Run
/// with `--stacks`: every copy is also on a stack.
fn check_reads(section: &str) -> Result<String> {
    let (s, _) = records(section)?;
    let ep = &s["episodes"][0];
    let writers = ep["top_writers"].as_array().ok_or_else(|| anyhow!("no top_writers in {ep}"))?;
    let copies = num(&ep["parent_copies"]) + num(&ep["child_copies"]);
    let pages =
        |f: &dyn Fn(&Value) -> bool| writers.iter().filter(|w| f(w)).map(|w| num(&w["pages"])).sum::<u64>();
    let read = pages(&|w| w["function"] == "pread64" && w["module"] == "[kernel]");
    let named = pages(&|w| w["function"].is_string());
    if !(READS..=READS + 4).contains(&read) {
        bail!("{read} copies attributed to pread(2), expected {READS}: {writers:?}");
    }
    if named * 100 < copies * 95 {
        bail!("only {named} of {copies} copies have a named writer: {writers:?}");
    }
    // --stacks: every copy the kernel counted is on a stack, taken where
    // the fault allocated its page and counted where it was classified
    // (none `not_taken`); a stack-map collision is possible, and said.
    let st = &s["stacks"];
    let kernel_copies = num(&s["kernel_totals"]["cow_copies"]);
    let lost = &st["lost"];
    let lost_total: u64 = lost.as_object().map_or(u64::MAX, |l| l.values().map(num).sum());
    if num(&st["copies"]) != kernel_copies || num(&lost["not_taken"]) != 0 || num(&lost["counts_full"]) != 0 {
        bail!("stacks hold {} copies for the kernel's {kernel_copies}, lost {lost}: {st}", st["copies"]);
    }
    // Each stack's innermost frame is the writing instruction (or, for
    // pread, the system call's in libc): in a mapped file, so placed.
    let stacks = st["stacks"].as_array().ok_or_else(|| anyhow!("no stacks in {st}"))?;
    let placed: u64 = stacks
        .iter()
        .filter(|x| x["frames"].as_array().and_then(|f| f.last()).is_some_and(|f| f != "[unknown]"))
        .filter(|x| !x["frames"][0].as_str().unwrap_or("").starts_with("[stack lost"))
        .map(|x| num(&x["copies"]))
        .sum();
    if placed * 100 < kernel_copies * 95 {
        bail!("only {placed} of {kernel_copies} copies on a stack whose writer is placed: {st}");
    }
    Ok(format!(
        "{read} copies by pread(2), {named} of {copies} named; {placed} of {kernel_copies} copies on {} placed stacks, {lost_total} lost",
        stacks.len()
    ))
}

/// Checks a run cut off by `-d` while the workload forks and copies: the
/// kernel backends' faults in flight at the cut-off are neither copies nor
/// reuses (a clean run makes a few reuses per fork), every fork has its
/// latency, and the launched command is ended with the run.
fn check_cut(section: &str) -> Result<String> {
    let summary = section
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .ok_or_else(|| anyhow!("no summary"))?;
    let eps = summary["episodes"].as_array().cloned().unwrap_or_default();
    let t = &summary["kernel_totals"];
    let (reuses, copies) = (num(&t["cow_reuses"]), num(&t["cow_copies"]));
    let figures = format!(
        "{} episodes, {copies} copies, {reuses} reuses, {} in flight at the end",
        eps.len(),
        summary["faults_in_flight_at_end"]
    );
    if eps.len() < 2 || reuses > 64 + 8 * eps.len() as u64 {
        bail!("{figures}: expected forks across the end and a clean run's reuses");
    }
    if let Some(ep) = eps.iter().find(|e| !e["fork_latency_ns"].is_u64()) {
        bail!("{figures}: a fork without its latency: {ep}");
    }
    if summary["command_signal"] != "SIGTERM" || num(&summary["faults_in_flight_at_end"]) > 2 {
        bail!(
            "{figures}: command {}, in flight {}",
            summary["command_signal"],
            summary["faults_in_flight_at_end"]
        );
    }
    Ok(figures)
}

/// Checks a run of the workload on transparent huge pages under a backend
/// that hooks `do_huge_pmd_wp_page`: each side's first write to each huge
/// page it touches is one huge-page write fault.
fn check_huge(section: &str) -> Result<String> {
    let (s, w) = records(section)?;
    let page = num(&w["page_size"]);
    let huge_pages = |from: u64, to: u64| (to * page - 1) / HUGE_PAGE - (from * page) / HUGE_PAGE + 1;
    let spec = &workload::STANDARD;
    if num(&w["anon_huge_kb"]) * 1024 < spec.pages * page {
        bail!(
            "the kernel backed {} KiB of the buffer with huge pages, not all of it",
            num(&w["anon_huge_kb"])
        );
    }
    let parent = proc_row(&s, num(&w["pid"]))?;
    let child = proc_row(&s, num(&w["children"][0]))?;
    let (hc, hp) = (num(&child["huge_cow_faults"]), num(&parent["huge_cow_faults"]));
    let (k, m) = (spec.child_writes, spec.parent_writes);
    let (want_c, want_p) = (huge_pages(0, k), huge_pages(k, k + m));
    let figures = format!("huge-page faults: child {hc} (wrote {want_c} huge pages), parent {hp} ({want_p})");
    if (hc, hp) != (want_c, want_p) {
        bail!("{figures}");
    }
    Ok(figures)
}

/// The OOM scenario in the VM: cgroup v2 (Debian's default) mounted at
/// /sys/fs/cgroup with the memory controller handed down, a cgroup per
/// backend limited to 150 MiB without swap, the workload held in it before
/// its fork while cow-trace attaches. Prints the cgroup's charge before the
/// fork (`held`), the CPU count, the run and the cgroup's `oom_kill` count.
const OOM_LIMIT: u64 = 150 << 20;
const OOM_PAGES: u64 = 25_600;

fn oom_function(args: &str) -> String {
    format!(
        r#"oom_run() {{
  CG=/sys/fs/cgroup/cow-oom-$1
  [ -e /sys/fs/cgroup/cgroup.controllers ] || mount -t cgroup2 none /sys/fs/cgroup || return 90
  echo +memory > /sys/fs/cgroup/cgroup.subtree_control || return 91
  mkdir $CG && echo {OOM_LIMIT} > $CG/memory.max || return 92
  [ -e $CG/memory.swap.max ] && echo 0 > $CG/memory.swap.max
  rm -f /tmp/go /tmp/w.out /tmp/oom.out
  sh -c "echo \$\$ > $CG/cgroup.procs && exec cow-workload {args} --go-file /tmp/go" > /tmp/w.out &
  i=0
  until grep -q ready /tmp/w.out 2>/dev/null; do i=$((i+1)); [ $i -gt 3000 ] && return 93; usleep 10000; done
  cow-trace --backend $1 --json -p $(sed -n 's/^ready //p' /tmp/w.out) > /tmp/oom.out 2> /tmp/oom.err &
  CT=$!
  i=0
  until [ -s /tmp/oom.out ]; do i=$((i+1)); [ $i -gt 1200 ] && return 94; usleep 100000; done
  sleep 1
  echo "held $(cat $CG/memory.current)"
  echo "cpus $(grep -c ^processor /proc/cpuinfo)"
  touch /tmp/go
  wait $CT
  rc=$?
  wait
  cat /tmp/oom.out /tmp/w.out
  grep oom_kill $CG/memory.events
  cat /tmp/oom.err >&2
  return $rc
}}
"#
    )
}

/// Checks an OOM section (see [`oom_function`]) with the host test's check.
fn check_oom(backend: &str, section: &str) -> Result<String> {
    let (s, w) = records(section)?;
    let field = |name: &str| section.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
    let sc = workload::OomScenario {
        pages: OOM_PAGES,
        limit_bytes: OOM_LIMIT,
        cgroup: format!("/cow-oom-{backend}"),
        held_bytes: field("held ").ok_or_else(|| anyhow!("no held line"))?,
        cpus: field("cpus ").ok_or_else(|| anyhow!("no cpus line"))?,
    };
    let kills = field("oom_kill ").unwrap_or(0);
    let (copies, failed) = workload::check_oom(&s, &w, &sc).map_err(|e| anyhow!(e))?;
    if kills != 1 {
        bail!("the cgroup's oom_kill count is {kills}, expected 1");
    }
    let room = (OOM_LIMIT - sc.held_bytes) / num(&w["page_size"]);
    Ok(format!(
        "child OOM-killed (oom_kill 1) after {copies} copies, {room} fit under the limit; {failed} failed"
    ))
}

/// The `=== begin NAME` ... `=== end` sections of the console, in order.
fn sections(console: &str) -> Vec<(String, String)> {
    console
        .split("=== begin ")
        .skip(1)
        .map(|part| {
            let (name, body) = part.split_once('\n').unwrap_or((part, ""));
            let body = body.split("=== end").next().unwrap_or("");
            (name.trim().to_string(), body.to_string())
        })
        .collect()
}

/// Redis in the VM: per kernel backend, a BGSAVE with no writes (the
/// baseline: what Redis counts on its own), then a traced BGSAVE during
/// which a fixed set of keys is overwritten while the child is paused
/// (SIGSTOP), so the copies do not depend on the emulator's speed; each
/// followed by Redis's own figures. A unix socket spares the VM any
/// networking. `paused_save WRITES` prints whether the child stayed paused.
const REDIS_SCRIPT: &str = r#"#!/bin/sh
S=/tmp/redis.sock
R="redis-cli -s $S"
KEYS=200000
WRITES=100000
BATCH=20000
LUA="local v = string.rep('x', ARGV[3]) for i = ARGV[1], ARGV[2] - 1 do redis.call('SET', 'key:' .. i, v) end return 'OK'"
paused_save() {
  $R BGSAVE > /dev/null
  C=""
  i=0
  until [ -n "$C" ]; do
    read C < /proc/$P/task/$P/children; i=$((i+1)); [ $i -gt 100000 ] && break
  done
  C=${C%% *}
  # No save child found: say so rather than wait on /proc//status forever.
  [ -n "$C" ] || { echo "child paused: no (no save child found)"; return; }
  kill -STOP $C
  until grep -q "^State:.*T" /proc/$C/status 2>/dev/null; do
    [ -e /proc/$C ] || break; usleep 1000
  done
  n=0
  while [ $n -lt $1 ]; do
    $R EVAL "$LUA" 0 $n $((n+BATCH)) 256 | grep -q OK || echo "writes failed"
    n=$((n+BATCH))
  done
  if grep -q "^State:.*T" /proc/$C/status 2>/dev/null; then echo "child paused: yes"; else echo "child paused: no"; fi
  kill -CONT $C
  i=0
  until $R INFO persistence | grep -q "rdb_bgsave_in_progress:0"; do
    i=$((i+1)); [ $i -gt 1500 ] && { echo "the save did not finish"; break; }; usleep 200000
  done
}
for b in fentry kprobe; do
  echo "=== begin redis $b"
  # A fresh server per run: a second save on the same data set would be
  # measured against the first one's load.
  redis-server --port 0 --unixsocket $S --save "" --appendonly no --enable-debug-command local \
    --daemonize yes --dir /tmp --logfile /tmp/redis-$b.log --pidfile /tmp/redis-$b.pid
  i=0
  until $R PING 2>/dev/null | grep -q PONG; do
    i=$((i+1)); [ $i -gt 600 ] && { echo "redis did not start"; cat /tmp/redis-$b.log; break; }; usleep 100000
  done
  P=$(cat /tmp/redis-$b.pid)
  $R DEBUG POPULATE $KEYS key 256 > /dev/null
  # Only slow enough that the child is paused before its save ends.
  $R CONFIG SET rdb-key-save-delay -100 > /dev/null
  paused_save 0
  echo "baseline_$($R INFO persistence | grep rdb_last_cow_size)"
  # A fresh file per run: the wait below must see this run's start record.
  OUT=/tmp/trace-$b.out
  cow-trace --backend $b --json -p $P > $OUT 2> /tmp/trace-$b.err &
  CT=$!
  i=0
  until [ -s $OUT ]; do i=$((i+1)); [ $i -gt 1200 ] && break; usleep 100000; done
  paused_save $WRITES
  $R INFO persistence | grep -E "rdb_last_cow_size|rdb_last_bgsave_status"
  $R INFO stats | grep latest_fork_usec
  $R SHUTDOWN NOSAVE > /dev/null 2>&1
  # The server's exit is the targets' end: cow-trace stops by itself.
  wait $CT
  echo "=== rc $?"
  cat $OUT
  echo "=== stderr"
  cat /tmp/trace-$b.err
  echo "=== end"
done
"#;

/// A numeric `field:value` line of Redis's INFO in `text`.
fn redis_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':')?.trim().parse().ok())
}

/// Checks one traced BGSAVE against Redis's own figures: the episode's
/// copied bytes within 5% of `rdb_last_cow_size`, and apart from it by no
/// more than Redis counts in a save with no writes; its fork latency, the
/// time spent in `copy_process` on these backends, above 0 and within the
/// `fork()` that Redis timed (`latest_fork_usec`, which also holds the
/// rest of the syscall and the allocator's fork handlers in user space).
fn check_redis(section: &str) -> Result<String> {
    let summary = section
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .ok_or_else(|| anyhow!("no summary"))?;
    let cow = redis_field(section, "rdb_last_cow_size").ok_or_else(|| anyhow!("no rdb_last_cow_size"))?;
    let fork_us = redis_field(section, "latest_fork_usec").ok_or_else(|| anyhow!("no latest_fork_usec"))?;
    let baseline =
        redis_field(section, "baseline_rdb_last_cow_size").ok_or_else(|| anyhow!("no baseline save"))?;
    if !section.contains("rdb_last_bgsave_status:ok") || section.contains("writes failed") {
        bail!("the save or the writes failed");
    }
    if !section.contains("child paused: yes") {
        bail!("the save's child was not paused through the writes");
    }
    let eps = summary["episodes"].as_array().cloned().unwrap_or_default();
    let [ep] = eps.as_slice() else { bail!("{} episodes, expected the BGSAVE alone", eps.len()) };
    let copied = num(&ep["copied_bytes"]);
    let fork_ns = num(&ep["fork_latency_ns"]);
    let figures = format!(
        "episode copied {copied} bytes (parent {} + child {} pages), Redis {cow} ({baseline} with no writes); \
         fork {fork_ns} ns in copy_process, Redis's fork() {fork_us} us",
        num(&ep["parent_copies"]),
        num(&ep["child_copies"])
    );
    // A save under no load copies next to nothing: nothing to compare.
    if cow < 4 << 20 {
        bail!("{figures}: Redis copied too little for a comparison; was the load running?");
    }
    let apart = (copied as f64 - cow as f64).abs() / cow as f64;
    if apart > 0.05 {
        bail!("{figures}: {:.1}% apart", apart * 100.0);
    }
    // The copies dominate what Redis counts on its own, and the figures
    // differ by no more than that.
    if baseline * 20 > cow || copied.abs_diff(cow) > baseline {
        bail!("{figures}: the difference is not bounded by the baseline");
    }
    if fork_ns == 0 || fork_ns > fork_us * 1000 {
        bail!("{figures}: fork latency outside Redis's fork()");
    }
    if num(&summary["dropped_events"]) != 0 {
        bail!("{figures}: {} events dropped", num(&summary["dropped_events"]));
    }
    Ok(format!("{figures}: {:.1}% apart", apart * 100.0))
}

/// Prints one check's line and counts it.
fn report(tally: &mut Tally, name: &str, checked: Result<String>) {
    match checked {
        Ok(figures) => {
            println!("vm-test: {name}: ok: {figures}");
            tally.passed += 1;
        }
        Err(e) => {
            println!("vm-test: {name}: FAILED: {e:#}");
            tally.failed += 1;
        }
    }
}

/// Commands the Redis check puts in the VM.
const REDIS_COMMANDS: &[(&str, &str)] = &[("redis-server", "redis-server"), ("redis-cli", "redis-tools")];

/// The exit status the vm-test script ends with: `cargo xtask vm` must
/// hand a command's own status back.
const SCRIPT_EXIT: i32 = 7;

/// The vm-test script: the workload under every backend, the huge-page
/// variant, `auto`, then Redis; transparent huge pages `always` (as
/// Debian ships them), which must not change a count.
fn vm_test_script() -> String {
    let workload = format!("cow-workload {}", KERNEL_WRITES.args().join(" "));
    let huge = format!("cow-workload --huge {}", workload::STANDARD.args().join(" "));
    let oom = workload::OomScenario {
        pages: OOM_PAGES,
        limit_bytes: OOM_LIMIT,
        cgroup: String::new(),
        held_bytes: 0,
        cpus: 0,
    };
    let mut body = format!(
        "#!/bin/sh\n\
         echo always > /sys/kernel/mm/transparent_hugepage/enabled\n\
         echo \"cow-trace-vm: thp $(cat /sys/kernel/mm/transparent_hugepage/enabled)\"\n{}",
        oom_function(&oom.workload_args().join(" "))
    );
    let section = |body: &mut String, name: &str, cmd: &str| {
        body.push_str(&format!(
            "echo '=== begin {name}'\n{cmd} > /tmp/out 2> /tmp/err\n\
             echo \"=== rc $?\"\ncat /tmp/out\necho '=== stderr'\ncat /tmp/err\necho '=== end'\n"
        ));
    };
    for b in BACKENDS {
        section(&mut body, &format!("backend {b}"), &format!("cow-trace --backend {b} --json -- {workload}"));
    }
    for b in ["fentry", "kprobe"] {
        section(&mut body, &format!("huge {b}"), &format!("cow-trace --backend {b} --json -- {huge}"));
    }
    let reads =
        format!("cow-workload --pages 2048 --child-writes 300 --parent-writes 200 --child-reads {READS}");
    for b in ["fentry", "kprobe"] {
        section(
            &mut body,
            &format!("reads {b}"),
            &format!("cow-trace --backend {b} --json --top 0 --stacks -- {reads}"),
        );
    }
    // A child OOM-killed in a memory cgroup: how it ended, and the fault
    // that failed, as do_wp_page's return says.
    for b in ["fentry", "kprobe"] {
        section(&mut body, &format!("oom {b}"), &format!("oom_run {b}"));
    }
    // A run cut off in the middle of forks and copies.
    let busy =
        "cow-workload --pages 4096 --child-writes 1000 --parent-writes 1000 --pause-ms 5 --until-file /never";
    for b in ["fentry", "kprobe"] {
        section(&mut body, &format!("cut {b}"), &format!("cow-trace --backend {b} --json -d 3 -- {busy}"));
    }
    // With no --backend, the best backend the kernel accepts must be picked.
    section(&mut body, "auto", "cow-trace --json -- true");
    // System-wide, a known number of forks made while the run is surely
    // attached (its start record is out), among whatever else forks. The
    // run ends when the storm is over, however long the emulator took.
    section(
        &mut body,
        "system fentry",
        &format!(
            "sh -c 'cow-trace --backend fentry --json -d 600 > /tmp/sys & CT=$!; i=0; \
             until [ -s /tmp/sys ]; do i=$((i+1)); [ $i -gt 1200 ] && break; usleep 100000; done; \
             cow-workload --fork-storm {SYSTEM_FORKS} > /tmp/storm; kill -INT $CT; wait $CT; \
             cat /tmp/storm /tmp/sys'"
        ),
    );
    body.push_str(&format!("sh redis-vm.sh\nexit {SCRIPT_EXIT}\n"));
    body
}

/// Forks the system-wide check makes.
const SYSTEM_FORKS: u64 = 50;

/// A system-wide run: a fork is counted and timed by one definition (the
/// latency figures are over counted forks only), and the fork storm made
/// during the run is there in full.
fn check_system(section: &str) -> Result<String> {
    let recs: Vec<Value> = section.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let s = recs.iter().find(|v| v["type"] == "summary").ok_or_else(|| anyhow!("no summary"))?;
    let storm =
        recs.iter().find(|v| v.get("fork_storm").is_some()).ok_or_else(|| anyhow!("no storm report"))?;
    let rows = s["processes"].as_array().cloned().unwrap_or_default();
    let mut wrong: Vec<String> = rows
        .iter()
        .filter(|p| num(&p["fork_latency_ns"]["count"]) > num(&p["forks"]))
        .map(|p| {
            format!(
                "{} ({}): {} forks, {} timed",
                p["comm"], p["pid"], p["forks"], p["fork_latency_ns"]["count"]
            )
        })
        .collect();
    let row = proc_row(s, num(&storm["pid"]))?;
    let (forks, timed) = (num(&row["forks"]), num(&row["fork_latency_ns"]["count"]));
    if forks != SYSTEM_FORKS || timed != SYSTEM_FORKS {
        wrong.push(format!("the storm made {SYSTEM_FORKS} forks: {forks} counted, {timed} timed"));
    }
    let (all_forks, all_timed) =
        rows.iter().fold((0, 0), |(f, t), p| (f + num(&p["forks"]), t + num(&p["fork_latency_ns"]["count"])));
    let figures = format!(
        "{} processes, {all_forks} forks counted, {all_timed} timed; the storm's {forks} of {SYSTEM_FORKS}",
        rows.len()
    );
    if wrong.is_empty() {
        Ok(figures)
    } else {
        bail!("{figures}: {}", wrong.join("; "))
    }
}

/// Runs vm-test on each kernel of `kernels` (all of [`KERNELS`] when
/// empty), one boot each, and prints one final line for all.
pub fn vm_test_matrix(kernels: &[PathBuf], timeout: Duration) -> Result<Tally> {
    let all: Vec<PathBuf> = KERNELS.iter().map(|k| PathBuf::from(k.0)).collect();
    let mut tally = Tally::default();
    for k in if kernels.is_empty() { &all } else { kernels } {
        let opts = VmOptions { kernel: Some(k.clone()), timeout, ..Default::default() };
        match vm_test(&opts) {
            Ok(t) => {
                tally.passed += t.passed;
                tally.failed += t.failed;
            }
            Err(e) => {
                println!("vm-test: {}: FAILED: {e:#}", k.display());
                tally.failed += 1;
            }
        }
    }
    println!("vm-test: {} passed, {} failed", tally.passed, tally.failed);
    Ok(tally)
}

/// Runs the workload under every backend, then the Redis BGSAVE
/// comparison, in one VM boot of `opts.kernel`, and checks each. On a
/// kernel of the matrix every backend must run: a backend refused there is
/// a failure, not a skip. Another kernel (a path) may lack some; those are
/// reported as skipped.
pub fn vm_test(opts: &VmOptions) -> Result<Tally> {
    setup::ensure_packages(REDIS_COMMANDS)?;
    fs::create_dir_all(vm_dir())?;
    let script = vm_dir().join("vm-test.sh");
    fs::write(&script, vm_test_script())?;
    let redis = vm_dir().join("redis-vm.sh");
    fs::write(&redis, REDIS_SCRIPT)?;
    let bins = REDIS_COMMANDS
        .iter()
        .map(|(cmd, _)| which(cmd).ok_or_else(|| anyhow!("{cmd} not on PATH")))
        .collect::<Result<Vec<_>>>()?;
    let vm_opts = VmOptions { include: vec![script, redis], bins, ..opts.clone() };
    let (code, console) = run_in_vm(&vm_opts, &["sh".into(), "vm-test.sh".into()], false)?;
    // The console line may follow the firmware's terminal escapes.
    let line = |key: &str| {
        console
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, k)| k.trim().to_string()))
            .unwrap_or("?".into())
    };
    let name = opts.kernel.as_deref().map_or("?".into(), |k| k.display().to_string());
    println!("vm-test: {name}: kernel {}, THP {}", line("cow-trace-vm: kernel"), line("cow-trace-vm: thp"));
    let may_skip = opts.kernel.as_deref().is_some_and(|k| matrix_kernel(k).is_none());
    let mut tally = Tally::default();
    let mut copies = Vec::new();
    let mut skipped = Vec::new();
    let mut auto = String::new();
    let mut redis_runs = 0;
    for (section, part) in sections(&console) {
        let rc: i32 = part
            .lines()
            .find_map(|l| l.strip_prefix("=== rc "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1);
        let stderr = part.split("=== stderr").nth(1).unwrap_or("").trim();
        let (what, backend) = section.split_once(' ').unwrap_or((section.as_str(), ""));
        let label = format!("{name}: {section}");
        if what == "auto" {
            auto = part;
            continue;
        }
        if what != "backend" && skipped.iter().any(|b| b == backend) {
            continue; // the kernel has no such backend: said above
        }
        if rc != 0 && may_skip && stderr.contains("is not available on this kernel") {
            println!("vm-test: {label}: skipped: {}", stderr.lines().next().unwrap_or(""));
            skipped.push(backend.to_string());
            continue;
        }
        let checked = if rc != 0 {
            Err(anyhow!("exit status {rc}: {stderr}"))
        } else if what == "huge" {
            check_huge(&part)
        } else if what == "reads" {
            check_reads(&part)
        } else if what == "system" {
            check_system(&part)
        } else if what == "oom" {
            check_oom(backend, &part)
        } else if what == "redis" {
            redis_runs += 1;
            check_redis(&part)
        } else if what == "cut" {
            check_cut(&part)
        } else {
            check_backend(backend, &part).map(|(c, figures)| {
                copies.push((backend.to_string(), c.child_copies, c.parent_copies));
                figures
            })
        };
        report(&mut tally, &label, checked);
    }
    check_auto(&name, &auto, copies.first().map(|c| c.0.as_str()), &mut tally);
    check_agreement(&name, &copies, &mut tally);
    if redis_runs + skipped.len() < 2 {
        println!("vm-test: {name}: FAILED: the Redis runs did not all happen:\n{console}");
        tally.failed += 1;
    }
    // `cargo xtask vm` hands back the command's own exit status.
    if code == SCRIPT_EXIT {
        println!("vm-test: {name}: a command's exit status comes back from the VM ({code})");
        tally.passed += 1;
    } else {
        println!("vm-test: {name}: FAILED: the VM returned {code} for a script that exited {SCRIPT_EXIT}");
        tally.failed += 1;
    }
    Ok(tally)
}

/// `auto` must choose the first backend, in fentry, kprobe, tracepoint
/// order, that ran here.
fn check_auto(name: &str, auto: &str, first: Option<&str>, tally: &mut Tally) {
    let chosen = start_record(auto).and_then(|v| v["backend"].as_str().map(str::to_string));
    match (chosen, first) {
        (Some(c), Some(first)) if c == first => {
            println!("vm-test: {name}: auto chose {c}, the first backend that ran");
            tally.passed += 1;
        }
        (c, first) => {
            println!("vm-test: {name}: FAILED: auto chose {c:?}, expected {first:?}");
            tally.failed += 1;
        }
    }
}

/// The backends watch the same faults through different hooks: they must
/// agree to within a few pages, once the writes the tracepoint backend
/// cannot see (/proc/self/mem) are taken out.
fn check_agreement(name: &str, copies: &[(String, u64, u64)], tally: &mut Tally) {
    if copies.len() < 2 {
        println!("vm-test: {name}: FAILED: fewer than two backends ran");
        tally.failed += 1;
        return;
    }
    let seen =
        |c: &(String, u64, u64)| c.1 + KERNEL_WRITES.child_copies("") - KERNEL_WRITES.child_copies(&c.0);
    let spread = |v: Vec<u64>| v.iter().max().unwrap() - v.iter().min().unwrap();
    let sc = spread(copies.iter().map(seen).collect());
    let sp = spread(copies.iter().map(|c| c.2).collect());
    let names: Vec<_> = copies.iter().map(|c| c.0.as_str()).collect();
    if sc <= 8 && sp <= 8 {
        println!(
            "vm-test: {name}: {} agree: child copies within {sc} pages, parent within {sp}",
            names.join(", ")
        );
        tally.passed += 1;
    } else {
        println!(
            "vm-test: {name}: FAILED: {} disagree: child copies spread {sc}, parent {sp}",
            names.join(", ")
        );
        tally.failed += 1;
    }
}
