//! `cargo xtask lint`: formatting and clippy, warnings as errors, on every
//! crate. The BPF crate is linted for its own target with the nightly that
//! builds it: on the host target its `panic_impl` clashes with std's.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{cargo, Tally};

/// One lint step: a name for its report line and the command to run.
fn steps() -> Vec<(&'static str, Command)> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    let mut host = cargo();
    host.args(["clippy", "--release", "--workspace", "--all-targets", "--exclude", "cow-trace-ebpf"])
        .args(["--", "-D", "warnings"]);
    let mut bpf = Command::new("rustup");
    bpf.current_dir(crate::workspace_root())
        .args(["run", crate::setup::NIGHTLY, "cargo", "clippy", "-p", "cow-trace-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"]);
    vec![("cargo fmt --check", fmt), ("clippy host crates", host), ("clippy cow-trace-ebpf (bpfel)", bpf)]
}

/// Runs every step, even after one fails, printing one line per step; a
/// failed step counts as a failed test.
pub fn lint() -> Result<Tally> {
    let mut tally = Tally::default();
    for (name, mut cmd) in steps() {
        let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
        if status.success() {
            println!("lint: {name}: ok");
            tally.passed += 1;
        } else {
            println!("lint: {name}: FAILED ({status}; its output is above)");
            tally.failed += 1;
        }
    }
    println!("lint: {} passed, {} failed", tally.passed, tally.failed);
    Ok(tally)
}
