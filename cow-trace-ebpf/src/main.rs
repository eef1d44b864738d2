//! cow-trace's BPF programs, all in one object; the loader loads only the
//! chosen backend's programs plus the lifecycle hooks every backend uses.
//!
//! Modules, each depending only on those listed before it:
//! - `shared`: load-time settings (`CONFIG`), the traced set, counters, ids.
//! - `emit`: the event ring buffer and the typed events written to it.
//! - `stacks`: `--stacks`, copies counted by user stack in the kernel.
//! - `batch`: the protocol every backend's fault path uses: per-CPU batches
//!   of fault outcomes, the rules for sending them, and sampled timing.
//! - `pending`: each thread's write fault waiting for its outcome.
//! - `fork_clock`: the tracepoint backend's fork latency.
//! - `tracepoint`: the tracepoint backend's fault classification.
//! - `kernel_path`: what the kprobe and fentry backends measure, with its
//!   thin wrappers `kprobe` and `fentry`.
//! - `lifecycle`: forks, execs and exits, context switches (every
//!   backend).
//!
//! Every hook returns before touching a map it does not need when the event
//! does not concern a traced process. Why the rules hold, and what they rely
//! on in the kernel: docs/kernel-notes.md.
//!
//! On any other target than BPF the crate is an empty program, so that
//! workspace-wide cargo commands (build, test, clippy) pass over it. The
//! programs are linted for their own target: `cargo +nightly clippy -p
//! cow-trace-ebpf --release --target bpfel-unknown-none -Z build-std=core`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod batch;
#[cfg(target_arch = "bpf")]
mod emit;
#[cfg(target_arch = "bpf")]
mod fentry;
#[cfg(target_arch = "bpf")]
mod fork_clock;
#[cfg(target_arch = "bpf")]
mod kernel_path;
#[cfg(target_arch = "bpf")]
mod kprobe;
#[cfg(target_arch = "bpf")]
mod lifecycle;
#[cfg(target_arch = "bpf")]
mod pending;
#[cfg(target_arch = "bpf")]
mod shared;
#[cfg(target_arch = "bpf")]
mod stacks;
#[cfg(target_arch = "bpf")]
mod tracepoint;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
