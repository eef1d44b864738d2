//! Every BPF program the object holds, and where each is attached: the one
//! place that says which backend uses which hook. The loader attaches from
//! this table only; a unit test in `cow-trace` checks it against the built
//! object, both ways.

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// `raw_tracepoint/<target>`: typed arguments, no record copy.
    RawTracepoint,
    Kprobe,
    Kretprobe,
    /// BPF trampolines, bound to the function through the kernel's BTF.
    Fentry,
    Fexit,
}

/// Backends, as a set of bits (see [`Hook::backends`]).
pub mod backends {
    pub const FENTRY: u8 = 1;
    pub const KPROBE: u8 = 2;
    pub const TRACEPOINT: u8 = 4;
    /// The two that hook kernel functions.
    pub const KERNEL_FUNCTIONS: u8 = FENTRY | KPROBE;
    pub const ALL: u8 = FENTRY | KPROBE | TRACEPOINT;
}

/// One program and its attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The program's name in the BPF object (its function name).
    pub program: &'static str,
    pub attach: Attach,
    /// The tracepoint or kernel function it attaches to.
    pub target: &'static str,
    /// The backends that attach it ([`backends`] bits).
    pub backends: u8,
    /// Whether a backend that uses it can run without it. Optional kernel
    /// functions add a measurement (`dup_mmap` or, where it is inlined,
    /// `copy_page_range`; huge-page faults) or a
    /// sharper signal (`wp_page_copy`).
    pub required: bool,
}

impl Hook {
    pub const fn used_by(&self, backend: u8) -> bool {
        self.backends & backend != 0
    }

    /// Whether it hooks a kernel function (kprobe, kretprobe, fentry, fexit).
    pub const fn hooks_function(&self) -> bool {
        matches!(self.attach, Attach::Kprobe | Attach::Kretprobe | Attach::Fentry | Attach::Fexit)
    }
}

const fn raw(program: &'static str, target: &'static str, backends: u8) -> Hook {
    Hook { program, attach: Attach::RawTracepoint, target, backends, required: true }
}

const fn func(program: &'static str, attach: Attach, target: &'static str, required: bool) -> Hook {
    let backends = match attach {
        Attach::Fentry | Attach::Fexit => backends::FENTRY,
        _ => backends::KPROBE,
    };
    Hook { program, attach, target, backends, required }
}

use Attach::{Fentry, Fexit, Kprobe, Kretprobe};

pub const HOOKS: &[Hook] = &[
    // Process lifecycle, every backend: the traced set (children followed,
    // exits) and exec (fork+exec episodes).
    raw("sched_process_fork", "sched_process_fork", backends::ALL),
    raw("sched_process_exit", "sched_process_exit", backends::ALL),
    raw("sched_process_exec", "sched_process_exec", backends::ALL),
    // Every backend's fault batches: a task leaving the CPU sends its
    // batch and ends its time slice of fully timed faults.
    raw("sched_switch", "sched_switch", backends::ALL),
    // Tracepoint backend: fault classification and its sampling.
    raw("page_fault_user", "page_fault_user", backends::TRACEPOINT),
    raw("page_fault_kernel", "page_fault_kernel", backends::TRACEPOINT),
    raw("mm_page_alloc", "mm_page_alloc", backends::TRACEPOINT),
    // `sys_enter` also starts a fork's clock, which `sched_process_fork`
    // stops.
    raw("sys_enter", "sys_enter", backends::TRACEPOINT),
    // Tracepoint backend: a fault that ends in SIGKILL (the OOM killer),
    // SIGBUS or SIGSEGV for the faulting thread failed.
    raw("signal_generate", "signal_generate", backends::TRACEPOINT),
    // Kernel-function backends: the pages a fault in flight allocates.
    raw("mm_page_alloc_wp", "mm_page_alloc", backends::KERNEL_FUNCTIONS),
    func("kp_copy_process", Kprobe, "copy_process", true),
    func("kr_copy_process", Kretprobe, "copy_process", true),
    func("kp_do_wp_page", Kprobe, "do_wp_page", true),
    func("kr_do_wp_page", Kretprobe, "do_wp_page", true),
    func("kp_dup_mmap", Kprobe, "dup_mmap", false),
    func("kr_dup_mmap", Kretprobe, "dup_mmap", false),
    // Where dup_mmap is inlined: its page-table copy, per VMA.
    func("kp_copy_page_range", Kprobe, "copy_page_range", false),
    func("kr_copy_page_range", Kretprobe, "copy_page_range", false),
    func("kp_wp_page_copy", Kprobe, "wp_page_copy", false),
    func("kp_do_huge_pmd_wp_page", Kprobe, "do_huge_pmd_wp_page", false),
    func("kr_do_huge_pmd_wp_page", Kretprobe, "do_huge_pmd_wp_page", false),
    func("fe_copy_process", Fentry, "copy_process", true),
    func("fx_copy_process", Fexit, "copy_process", true),
    func("fe_do_wp_page", Fentry, "do_wp_page", true),
    func("fx_do_wp_page", Fexit, "do_wp_page", true),
    func("fe_dup_mmap", Fentry, "dup_mmap", false),
    func("fx_dup_mmap", Fexit, "dup_mmap", false),
    func("fe_copy_page_range", Fentry, "copy_page_range", false),
    func("fx_copy_page_range", Fexit, "copy_page_range", false),
    func("fe_wp_page_copy", Fentry, "wp_page_copy", false),
    func("fe_do_huge_pmd_wp_page", Fentry, "do_huge_pmd_wp_page", false),
    func("fx_do_huge_pmd_wp_page", Fexit, "do_huge_pmd_wp_page", false),
];

// Program names are unique, and a function is required on both kernel-function
// backends or on neither.
const _: () = {
    let mut i = 0;
    while i < HOOKS.len() {
        let mut j = i + 1;
        while j < HOOKS.len() {
            assert!(!str_eq(HOOKS[i].program, HOOKS[j].program));
            if HOOKS[i].hooks_function()
                && HOOKS[j].hooks_function()
                && str_eq(HOOKS[i].target, HOOKS[j].target)
            {
                assert!(HOOKS[i].required == HOOKS[j].required);
            }
            j += 1;
        }
        i += 1;
    }
};

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_has_the_lifecycle_hooks() {
        for b in [backends::FENTRY, backends::KPROBE, backends::TRACEPOINT] {
            for tp in ["sched_process_fork", "sched_process_exit", "sched_process_exec"] {
                assert!(HOOKS.iter().any(|h| h.used_by(b) && h.target == tp && h.required));
            }
        }
    }

    #[test]
    fn kprobe_and_fentry_hook_the_same_functions() {
        let targets = |attach: &[Attach]| {
            let mut v: [&str; 16] = [""; 16];
            let mut n = 0;
            for h in HOOKS.iter().filter(|h| attach.contains(&h.attach)) {
                v[n] = h.target;
                n += 1;
            }
            (v, n)
        };
        assert_eq!(targets(&[Kprobe]), targets(&[Fentry]));
        assert_eq!(targets(&[Kretprobe]), targets(&[Fexit]));
    }
}
