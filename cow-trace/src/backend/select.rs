//! What the kernel offers, which backend runs on it, and why.

use std::{cell::OnceCell, path::Path};

use anyhow::Result;
use btf_rs::Btf;
use cow_trace_common::{
    hooks::{Attach, Hook, HOOKS},
    Config,
};

use super::{load, BackendKind, LoadOptions, Loader, Tracer};
use crate::{
    cli::BackendChoice,
    kernel::{self, KernelBtf, KernelOffsets},
    timings,
};

/// Environment variable listing optional functions not to hook.
pub const SKIP_HOOKS_ENV: &str = "COW_TRACE_SKIP_HOOKS";

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
    /// The function whose time inside a fork is its address-space (page
    /// table) copy on this kernel, if any is hooked.
    pub fork_share: Option<&'static str>,
}

/// The hooked function that carries the fork's address-space copy:
/// `dup_mmap`, or where it is inlined (6.12) `copy_page_range`, summed over
/// the fork's VMAs.
pub fn fork_share(funcs: &[&'static str]) -> Option<&'static str> {
    ["dup_mmap", "copy_page_range"].into_iter().find(|f| funcs.contains(f))
}

/// Loads the first backend of `choice` the kernel accepts. With `auto`,
/// each one passed over gets a line on stderr saying why; a backend asked
/// for by name that cannot run is an error, never a silent fallback.
pub fn choose(
    choice: BackendChoice,
    offsets: &KernelOffsets,
    features: &mut KernelFeatures,
    opts: &LoadOptions,
    btf: &KernelBtf,
) -> Result<(Selection, Tracer)> {
    let kinds = candidates(choice);
    // Each attempt's settings outlive the loader that holds them.
    let configs: Vec<OnceCell<Config>> = kinds.iter().map(|_| OnceCell::new()).collect();
    let mut loader: Option<Loader> = None;
    let mut rejected = Vec::new();
    for (kind, config) in kinds.into_iter().zip(&configs) {
        if kind == BackendKind::Kprobe {
            features.read_kallsyms();
        }
        // Loading and attaching is the honest test of what a kernel allows
        // (it can list a function and still refuse a trampoline on it).
        let attempt = features.check(kind).map_err(anyhow::Error::msg).and_then(|funcs| {
            if kind == BackendKind::Fentry {
                features.trampolines_allowed()?;
            }
            let plan = features.plan(kind, &funcs);
            let _ = config.set(load::config(kind, &funcs, offsets, opts)?);
            let config = config.get().expect("just set");
            let loader = loader.get_or_insert_with(|| Loader::new(btf));
            Tracer::load(kind, &plan, config, opts, loader).map(|t| (funcs, t))
        });
        match attempt {
            Ok((funcs, tracer)) => {
                let sel = Selection {
                    kind,
                    reason: reason(choice, kind, &rejected),
                    fork_latency_means: kind.fork_latency_means(),
                    cow_latency_means: kind.cow_latency_means(),
                    fork_share: fork_share(&funcs),
                    rejected,
                };
                return Ok((sel, tracer));
            }
            Err(e) if choice == BackendChoice::Auto => {
                let line = format!("{}: {e:#}", kind.name());
                eprintln!("cow-trace: backend {line}");
                rejected.push(line);
            }
            Err(e) => anyhow::bail!(
                "backend {} is not available on this kernel: {e:#} (use --backend auto to pick one that is)",
                kind.name()
            ),
        }
    }
    anyhow::bail!("no backend can run on this kernel: {}", rejected.join("; "))
}

/// The distinct targets of the hooks that `keep`, in table order.
fn targets(keep: impl Fn(&Hook) -> bool) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for h in HOOKS.iter().filter(|h| keep(h)) {
        if !out.contains(&h.target) {
            out.push(h.target);
        }
    }
    out
}

/// What the kernel can do, probed without loading anything.
#[derive(Clone, Debug, Default)]
pub struct KernelFeatures {
    /// A kprobe PMU or tracefs `kprobe_events`: CONFIG_KPROBES.
    pub kprobes: bool,
    /// Raw tracepoints of the hook table this kernel lacks.
    pub missing_raw_tracepoints: Vec<&'static str>,
    /// Hooked kernel functions in /proc/kallsyms (kprobe targets); read
    /// only when the kprobe backend is tried (see
    /// [`KernelFeatures::read_kallsyms`]).
    pub kallsyms: Vec<&'static str>,
    /// Hooked kernel functions with a BTF `FUNC` (fentry targets), with
    /// their BTF ids.
    pub btf_funcs: Vec<(&'static str, u32)>,
    /// Optional functions not to hook (`COW_TRACE_SKIP_HOOKS=a,b`): a way
    /// around a function that misbehaves on some kernel, and a way to run
    /// the fallbacks (e.g. the copy signal used where `wp_page_copy` is
    /// inlined) on a kernel that has them all.
    pub skip: Vec<String>,
}

impl KernelFeatures {
    pub fn probe(btf: &Btf, tracefs: &Path) -> Self {
        let functions = targets(Hook::hooks_function);
        Self {
            kprobes: tracefs.join("kprobe_events").exists()
                || Path::new("/sys/bus/event_source/devices/kprobe").exists(),
            missing_raw_tracepoints: targets(|h| h.attach == Attach::RawTracepoint)
                .into_iter()
                .filter(|tp| !kernel::has_raw_tracepoint(btf, tp))
                .collect(),
            kallsyms: Vec::new(),
            btf_funcs: functions
                .iter()
                .filter_map(|&f| kernel::btf_func_id(btf, f).map(|id| (f, id)))
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

    /// Whether the kernel loads the smallest fentry program on the first
    /// hooked function, before the fentry backend's objects and programs
    /// are loaded (see `load::trampoline_allowed`).
    pub fn trampolines_allowed(&self) -> Result<()> {
        let Some(&(func, id)) = self.btf_funcs.first() else { return Ok(()) };
        timings::time(
            || format!("fentry test program loaded for {func}"),
            || load::trampoline_allowed(func, id),
        )
    }

    /// Fills [`KernelFeatures::kallsyms`]: reading /proc/kallsyms takes
    /// tens of milliseconds, wasted unless the kprobe backend is tried on a
    /// kernel with kprobes.
    pub fn read_kallsyms(&mut self) {
        if !self.kprobes || !self.kallsyms.is_empty() {
            return;
        }
        let _t = timings::span(|| "/proc/kallsyms read".into());
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        self.kallsyms = targets(Hook::hooks_function)
            .into_iter()
            .filter(|f| kernel::kallsyms_has(&kallsyms, f))
            .collect();
    }

    /// The functions `kind` would hook here, or why it cannot run, judged
    /// from what the kernel advertises (loading may still refuse).
    pub fn check(&self, kind: BackendKind) -> Result<Vec<&'static str>, String> {
        let missing: Vec<_> = targets(|h| h.used_by(kind.bit()) && h.attach == Attach::RawTracepoint)
            .into_iter()
            .filter(|tp| self.missing_raw_tracepoints.contains(tp))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "this kernel lacks the tracepoint(s) {} (page_fault_user is x86-only)",
                missing.join(", ")
            ));
        }
        let btf_funcs: Vec<&str> = self.btf_funcs.iter().map(|&(f, _)| f).collect();
        let have = match kind {
            BackendKind::Tracepoint => return Ok(vec![]),
            BackendKind::Kprobe if !self.kprobes => return Err("kernel built without CONFIG_KPROBES".into()),
            BackendKind::Kprobe => &self.kallsyms,
            BackendKind::Fentry => &btf_funcs,
        };
        let where_ = if kind == BackendKind::Fentry { "in the kernel's BTF" } else { "in /proc/kallsyms" };
        let skipped = |f: &str| self.skip.iter().any(|s| s == f);
        for f in targets(|h| h.used_by(kind.bit()) && h.hooks_function() && h.required) {
            if !have.contains(&f) {
                return Err(format!("kernel function {f} not found {where_} (inlined or renamed)"));
            }
            if skipped(f) {
                return Err(format!("{SKIP_HOOKS_ENV} names {f}, which this backend cannot do without"));
            }
        }
        let funcs: Vec<_> = targets(|h| h.used_by(kind.bit()) && h.hooks_function())
            .into_iter()
            .filter(|f| have.contains(f) && !skipped(f))
            .collect();
        // copy_page_range runs inside dup_mmap: timing both would count
        // the page-table copy twice.
        let whole = funcs.contains(&"dup_mmap");
        Ok(funcs.into_iter().filter(|f| !(whole && *f == "copy_page_range")).collect())
    }

    /// Every hook `kind` attaches here: its raw tracepoints, and its
    /// programs on `funcs` (from [`KernelFeatures::check`]).
    pub fn plan(&self, kind: BackendKind, funcs: &[&str]) -> Vec<&'static Hook> {
        let mut plan: Vec<_> = kind.hooks().filter(|h| h.attach == Attach::RawTracepoint).collect();
        plan.extend(function_hooks(kind, funcs));
        plan
    }
}

/// The programs that hook `funcs`, in `funcs` order, each function's return
/// program before its entry program. A kretprobe or fexit only sees the
/// calls that enter after it is attached, so attached first it sees the
/// return of every call whose entry the entry program saw: no slot is
/// opened that nothing closes (which would be counted as unclassified).
fn function_hooks(kind: BackendKind, funcs: &[&str]) -> Vec<&'static Hook> {
    funcs
        .iter()
        .flat_map(|f| {
            let mut hooks: Vec<_> = kind.hooks().filter(|h| h.hooks_function() && h.target == *f).collect();
            hooks.sort_by_key(|h| !matches!(h.attach, Attach::Kretprobe | Attach::Fexit));
            hooks
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 5] = ["copy_process", "do_wp_page", "dup_mmap", "wp_page_copy", "do_huge_pmd_wp_page"];

    /// Functions with made-up BTF ids.
    fn ids(funcs: &[&'static str]) -> Vec<(&'static str, u32)> {
        funcs.iter().zip(100..).map(|(&f, id)| (f, id)).collect()
    }

    /// This machine's kind of kernel: tracepoints only.
    fn no_kprobes() -> KernelFeatures {
        KernelFeatures {
            kprobes: false,
            missing_raw_tracepoints: vec![],
            kallsyms: vec!["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"],
            btf_funcs: ids(&["copy_process", "do_wp_page", "dup_mmap", "do_huge_pmd_wp_page"]),
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
        let f = KernelFeatures { btf_funcs: ids(&["do_wp_page"]), ..no_kprobes() };
        let e = f.check(BackendKind::Fentry).unwrap_err();
        assert!(e.contains("copy_process") && e.contains("BTF"), "{e}");
        // Optional functions are just left out.
        let f = KernelFeatures { btf_funcs: ids(&ALL), ..no_kprobes() };
        assert_eq!(f.check(BackendKind::Fentry).unwrap(), ALL.to_vec());
    }

    #[test]
    fn copy_page_range_carries_the_share_only_where_dup_mmap_is_inlined() {
        let with = |funcs: &[&'static str]| KernelFeatures { btf_funcs: ids(funcs), ..no_kprobes() };
        // 6.1: both exist; copy_page_range runs inside dup_mmap, so only
        // dup_mmap is timed.
        let f = with(&["copy_process", "do_wp_page", "dup_mmap", "copy_page_range"]);
        let funcs = f.check(BackendKind::Fentry).unwrap();
        assert_eq!(funcs, vec!["copy_process", "do_wp_page", "dup_mmap"]);
        assert_eq!(fork_share(&funcs), Some("dup_mmap"));
        // 6.12: dup_mmap inlined.
        let f = with(&["copy_process", "do_wp_page", "copy_page_range"]);
        let funcs = f.check(BackendKind::Fentry).unwrap();
        assert_eq!(fork_share(&funcs), Some("copy_page_range"));
        // Neither: no share, and the backend still runs.
        let funcs = with(&["copy_process", "do_wp_page"]).check(BackendKind::Fentry).unwrap();
        assert_eq!(fork_share(&funcs), None);
    }

    #[test]
    fn skipped_hooks() {
        let f = KernelFeatures { btf_funcs: ids(&ALL), skip: vec!["wp_page_copy".into()], ..no_kprobes() };
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
    }

    #[test]
    fn hooks_pair_entry_and_return_programs() {
        let h = function_hooks(BackendKind::Fentry, &["copy_process", "wp_page_copy"]);
        let names: Vec<_> = h.iter().map(|h| format!("{}@{}", h.program, h.target)).collect();
        assert_eq!(
            names,
            ["fx_copy_process@copy_process", "fe_copy_process@copy_process", "fe_wp_page_copy@wp_page_copy"]
        );
        let h = function_hooks(BackendKind::Kprobe, &["do_wp_page"]);
        assert_eq!(h[0].program, "kr_do_wp_page");
        assert_eq!(h[1].program, "kp_do_wp_page");
    }

    #[test]
    fn the_plan_attaches_the_lifecycle_and_what_the_kernel_has() {
        let f = no_kprobes();
        let plan: Vec<_> = f.plan(BackendKind::Tracepoint, &[]).iter().map(|h| h.program).collect();
        assert_eq!(&plan[..3], ["sched_process_fork", "sched_process_exit", "sched_process_exec"]);
        assert!(plan.contains(&"sys_enter"), "{plan:?}");
        assert!(!plan.contains(&"mm_page_alloc_wp"));
        let plan: Vec<_> = f.plan(BackendKind::Kprobe, &["copy_process"]).iter().map(|h| h.program).collect();
        assert_eq!(
            plan,
            [
                "sched_process_fork",
                "sched_process_exit",
                "sched_process_exec",
                "sched_switch",
                "mm_page_alloc_wp",
                "kr_copy_process",
                "kp_copy_process"
            ]
        );
    }

    #[test]
    fn reasons() {
        let rejected = vec!["fentry: EPERM".to_string(), "kprobe: no".to_string()];
        assert!(reason(BackendChoice::Auto, BackendKind::Tracepoint, &rejected)
            .ends_with("(passed over: fentry, kprobe)"));
        assert!(reason(BackendChoice::Kprobe, BackendKind::Kprobe, &[]).contains("--backend kprobe"));
    }
}
