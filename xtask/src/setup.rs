//! Installs the BPF toolchain when it is missing, saying what it does.
//!
//! The BPF programs are built with the nightly toolchain (`-Z build-std`
//! needs its `rust-src`) and linked by `bpf-linker`, which must be built
//! against an LLVM of the same major version as the nightly's. The nightly
//! ships its LLVM as a shared library, so bpf-linker is built against that
//! very library: no system LLVM is needed.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::run_cmd;

pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "^0.13";

pub fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Runs a command and returns its stdout, or an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ensure_toolchain() -> Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn ensure_nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the BPF programs")?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("nightly toolchain: present");
        return Ok(());
    }
    say("installing the nightly toolchain (builds the BPF programs)");
    run_cmd(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

fn ensure_rust_src() -> Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("nightly rust-src: present");
        return Ok(());
    }
    say("installing rust-src for nightly (the BPF target builds core from source)");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// LLVM major version of the nightly compiler, e.g. 22.
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let v = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow!("nightly rustc does not report its LLVM version"))?;
    v.split('.').next().unwrap_or("").parse().with_context(|| format!("odd LLVM version {v}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// The libLLVM a binary is dynamically linked against, from `ldd` output.
fn linked_libllvm(ldd: &str) -> Option<&str> {
    ldd.lines().map(str::trim).find(|l| l.starts_with("libLLVM")).and_then(|l| l.split_whitespace().next())
}

fn ensure_bpf_linker() -> Result<()> {
    let sysroot = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
    let nightly_lib = PathBuf::from(sysroot.trim()).join("lib");
    let lib = fs::read_dir(&nightly_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", nightly_lib.display()))?;
    let want = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if bpf_linker_works() {
        // A bpf-linker built against another LLVM (an older nightly's, or a
        // system one) runs, then fails on the nightly's bitcode with an
        // obscure error: rebuild it rather than call it present.
        let ldd = which("bpf-linker")
            .and_then(|b| Command::new("ldd").arg(b).output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        match linked_libllvm(&ldd) {
            Some(have) if have != want => {
                say(&format!("bpf-linker: linked against {have}, not the nightly's {want}; rebuilding it"))
            }
            _ => {
                say("bpf-linker: present");
                return Ok(());
            }
        }
    }
    let major = nightly_llvm_major()?;
    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so and records
    // the directory as its rpath: keep it somewhere that outlives the build.
    let prefix = cargo_home().join("bpf-linker-llvm");
    let dir = prefix.join("lib");
    fs::create_dir_all(&dir)?;
    for name in [lib.file_name().expect("file name").to_os_string(), "libLLVM.so".into()] {
        let link = dir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), lib.display()))?;
    }
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} ({}); this takes a minute",
        lib.display()
    ));
    run_cmd(
        Command::new("cargo")
            .args(["install", "--locked", "--force", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but does not run; is {} on PATH?",
            cargo_home().join("bin").display()
        );
    }
    Ok(())
}

/// Commands the test suite runs, and the Debian packages that provide them.
const TEST_COMMANDS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("redis-benchmark", "redis-tools"),
    // The exporter tests: a real Prometheus scrapes cow-trace --serve.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
];

/// Where `cmd` is on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(cmd)).find(|p| p.is_file())
}

/// Installs the Debian packages whose commands the tests need and that are
/// missing, with `apt-get` (as root), saying what it installs.
pub fn ensure_packages(commands: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> =
        commands.iter().filter(|(cmd, _)| which(cmd).is_none()).map(|&(_, pkg)| pkg).collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        let mut have: Vec<&str> = commands.iter().map(|&(_, pkg)| pkg).collect();
        have.sort_unstable();
        have.dedup();
        say(&format!("Debian packages ({}): present", have.join(", ")));
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "these Debian packages are needed: {}; install them as root (apt-get install ...)",
            missing.join(" ")
        );
    }
    say(&format!("installing missing Debian packages: {}", missing.join(" ")));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn ensure_test_packages() -> Result<()> {
    ensure_packages(TEST_COMMANDS)
}

#[cfg(test)]
mod tests {
    use super::linked_libllvm;

    #[test]
    fn finds_the_libllvm_a_binary_links() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                   \tlibLLVM.so.22.1-rust-1.97.0-nightly => /x/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x7fc2)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7fc1)\n";
        assert_eq!(linked_libllvm(ldd), Some("libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert_eq!(linked_libllvm("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"), None, "a static build");
    }
}
