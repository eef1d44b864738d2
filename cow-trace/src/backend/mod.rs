//! Backends: which one this kernel can run and why ([`select`]), and the
//! loaded, attached programs ([`load`]). Both read the hook table in
//! `cow_trace_common::hooks`.

mod load;
mod select;

use load::Loader;
pub use load::{CgroupId, LoadOptions, Tracer};
pub use select::{choose, KernelFeatures, Selection};

use cow_trace_common::hooks::{backends, Hook, HOOKS};

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
            BackendKind::Tracepoint => {
                "clone/fork syscall entry to the new process's creation, in the parent"
            }
            _ => "time the kernel spent in copy_process creating the child",
        }
    }

    pub fn cow_latency_means(self) -> &'static str {
        match self {
            BackendKind::Tracepoint => {
                "write fault to the copy's page allocation (copies only; bursts sampled, see --sample-every)"
            }
            _ => "do_wp_page entry to return (copies only; bursts sampled, see --sample-every)",
        }
    }

    /// Its bit in [`Hook::backends`].
    fn bit(self) -> u8 {
        match self {
            BackendKind::Fentry => backends::FENTRY,
            BackendKind::Kprobe => backends::KPROBE,
            BackendKind::Tracepoint => backends::TRACEPOINT,
        }
    }

    /// The hooks of the table this backend uses.
    fn hooks(self) -> impl Iterator<Item = &'static Hook> {
        HOOKS.iter().filter(move |h| h.used_by(self.bit()))
    }
}
