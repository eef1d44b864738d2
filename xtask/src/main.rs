//! Project automation: `cargo xtask run|test|setup`.
//!
//! Every subcommand first makes sure the BPF toolchain is present (see
//! [`setup`]), so a fresh machine needs nothing but Rust and rustup.

mod bench;
mod bench_vm;
mod lint;
mod setup;
mod startstop;
mod vm;
/// The ground-truth workload and its checks, shared with the integration tests.
#[path = "../../cow-trace/tests/common/workload.rs"]
#[allow(dead_code)]
mod workload;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "cow-trace project tasks")]
enum Cli {
    /// Install what is missing, build, and run cow-trace as root with ARGS.
    Run {
        /// Arguments for cow-trace (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what is missing, then run every test: the lints, unit tests
    /// and the integration tests that load the BPF programs (those need root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting and run clippy (warnings as errors) on every crate,
    /// the BPF crate for its own target.
    Lint,
    /// Only install what is missing: the BPF toolchain (nightly rust-src,
    /// bpf-linker) and the Debian packages the tests use.
    Setup,
    /// Boot a kernel under QEMU with cow-trace inside and run CMD there.
    Vm {
        /// Kernel to boot: 6.1 or 6.12 (Debian's), a vmlinuz or a Debian
        /// kernel .deb. Default: Debian's 6.1, downloaded and cached.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Copy FILE into the command's working directory (repeatable).
        #[arg(long, value_name = "FILE")]
        include: Vec<PathBuf>,
        /// Put this host program in the VM's /bin, with the shared
        /// libraries it needs (repeatable), e.g. `--bin $(which redis-server)`.
        #[arg(long = "bin", value_name = "PROGRAM")]
        bins: Vec<PathBuf>,
        /// Give up on the VM after SECS seconds.
        #[arg(long, value_name = "SECS", default_value_t = 900)]
        timeout: u64,
        /// Boot as `bench --vm` does: one vCPU, and QEMU's instruction
        /// counter as the guest's clock, so that the guest's times (and
        /// `kernel.bpf_stats_enabled`'s run times) count instructions.
        #[arg(long)]
        instruction_clock: bool,
        /// Command to run in the VM, as root (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run the ground-truth workload and Redis under every backend in the
    /// VM kernels: each of the matrix (Debian's 6.1 and 6.12) by default.
    VmTest {
        /// Kernel to test: 6.1 or 6.12 (Debian's), a vmlinuz or a Debian
        /// kernel .deb (repeatable).
        #[arg(long)]
        kernel: Vec<PathBuf>,
        #[arg(long, value_name = "SECS", default_value_t = 900)]
        timeout: u64,
    },
    /// Measure tracing overhead on a CoW storm and a fork storm, and the
    /// time to attach and to exit beside bpftrace (root).
    Bench {
        /// Repetitions of each configuration (interleaved). Default 7; 5
        /// with --vm.
        #[arg(long)]
        repeats: Option<usize>,
        /// Rounds of the CoW storm (fork + 50 MiB written by the child;
        /// with --vm, 16 MiB). Default 20; 12 with --vm.
        #[arg(long)]
        rounds: Option<usize>,
        /// Forks in the fork storm. Default 3000; 200 with --vm.
        #[arg(long)]
        forks: Option<usize>,
        /// Run the storms in a VM (QEMU, TCG) on a Debian kernel, under
        /// each backend and each backend's empty-program floor; ratios only.
        #[arg(long)]
        vm: bool,
        /// With --vm: the kernel to boot, 6.1 or 6.12 (Debian's), a vmlinuz
        /// or a Debian kernel .deb. Default: Debian's 6.1.
        #[arg(long, requires = "vm")]
        kernel: Option<PathBuf>,
        /// Run one part only: `overhead` (the storms) or `startstop` (time
        /// to attach and to exit, beside bpftrace). Not with --vm.
        #[arg(long, value_enum, conflicts_with = "vm")]
        only: Option<BenchPart>,
    },
}

/// The parts of `cargo xtask bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    Overhead,
    Startstop,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Passed and failed counts from libtest's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test`, echoing its output and adding up its results, so that
/// the last line states the total over every test binary.
fn run_tests(cmd: &mut Command) -> Result<Tally> {
    use std::io::BufRead as _;
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let mut tally = Tally::default();
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == 0 {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(tally)
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Builds cow-trace and the test workload (release), BPF object included.
pub fn build_release() -> Result<()> {
    run_cmd(cargo().args(["build", "--release", "--package", "cow-trace"]))
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse() {
        Cli::Vm { kernel, include, bins, timeout, instruction_clock, command } => {
            setup::ensure_toolchain()?;
            let timeout = std::time::Duration::from_secs(timeout);
            let opts = vm::VmOptions { kernel, include, bins, timeout, one_cpu: instruction_clock };
            let code = vm::vm(&opts, &command)?;
            std::process::exit(code);
        }
        Cli::VmTest { kernel, timeout } => {
            setup::ensure_toolchain()?;
            let t = vm::vm_test_matrix(&kernel, std::time::Duration::from_secs(timeout))?;
            if t.failed > 0 {
                bail!("vm-test: {} failed", t.failed);
            }
            Ok(())
        }
        Cli::Lint => {
            setup::ensure_toolchain()?;
            let t = lint::lint()?;
            if t.failed > 0 {
                bail!("lint: {} failed", t.failed);
            }
            Ok(())
        }
        Cli::Setup => {
            setup::ensure_toolchain()?;
            setup::ensure_test_packages()
        }
        Cli::Bench { repeats, rounds, forks, vm: true, kernel, .. } => {
            setup::ensure_toolchain()?;
            let b = bench_vm::VmBench {
                kernel,
                repeats: repeats.unwrap_or(5),
                rounds: rounds.unwrap_or(12),
                pages: 16 << 20 >> 12,
                forks: forks.unwrap_or(200),
            };
            bench_vm::bench_vm(&b)
        }
        Cli::Bench { repeats, rounds, forks, vm: false, only, .. } => {
            setup::ensure_toolchain()?;
            let repeats = repeats.unwrap_or(7);
            if only != Some(BenchPart::Startstop) {
                bench::bench(repeats, rounds.unwrap_or(20), forks.unwrap_or(3000))?;
            }
            if only != Some(BenchPart::Overhead) {
                startstop::bench(repeats)?;
            }
            Ok(())
        }
        Cli::Run { args } => {
            setup::ensure_toolchain()?;
            build_release()?;
            let bin = workspace_root().join("target/release/cow-trace");
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                eprintln!("xtask: cow-trace needs root; running it with sudo");
                let mut c = Command::new("sudo");
                c.arg("-E").arg(&bin);
                c
            };
            let status =
                cmd.args(&args).status().with_context(|| format!("cannot start {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cli::Test { args } => {
            setup::ensure_toolchain()?;
            setup::ensure_test_packages()?;
            if !is_root() {
                eprintln!(
                    "xtask: WARNING: not root: the integration tests will be SKIPPED (run `sudo -E cargo xtask test`)"
                );
            }
            // A lint failure is reported and counted like a failed test.
            let mut tally = lint::lint()?;
            let mut cmd = cargo();
            cmd.args(["test", "--release", "--no-fail-fast", "--workspace", "--exclude", "cow-trace-ebpf"])
                .args(&args);
            if is_root() {
                // Root tests must run, not skip, when we can run them.
                cmd.env("COW_TRACE_REQUIRE_ROOT", "1");
            }
            let tests = run_tests(&mut cmd)?;
            tally.passed += tests.passed;
            tally.failed += tests.failed;
            // The same workload on kernels with kprobes and BPF trampolines.
            match vm::vm_test_matrix(&[], std::time::Duration::from_secs(900)) {
                Ok(t) => {
                    tally.passed += t.passed;
                    tally.failed += t.failed;
                }
                Err(e) => {
                    println!("vm-test: FAILED: {e:#}");
                    tally.failed += 1;
                }
            }
            println!("tests: {} passed, {} failed", tally.passed, tally.failed);
            if tally.failed > 0 {
                bail!("{} tests failed", tally.failed);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_adds_up_libtest_summaries() {
        let mut t = Tally::default();
        t.add_line(
            "test result: ok. 42 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.36s",
        );
        t.add_line("test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add_line("running 7 tests");
        t.add_line("test foo ... ok");
        assert_eq!(t, Tally { passed: 48, failed: 1 });
    }
}
