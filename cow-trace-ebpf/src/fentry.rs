//! The fentry backend: the kprobe backend's measurements through BPF
//! trampolines (typed arguments, no breakpoint trap). The loader binds each
//! program to its function through the kernel's BTF.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};

use crate::kernel_path as k;

#[fentry(function = "copy_process")]
pub fn fe_copy_process(_ctx: FEntryContext) -> u32 {
    k::clone_enter();
    0
}

#[fexit(function = "copy_process")]
pub fn fx_copy_process(ctx: FExitContext) -> u32 {
    if let Ok(task) = ctx.ret::<u64>() {
        k::clone_exit(task);
    }
    0
}

#[fentry(function = "dup_mmap")]
pub fn fe_dup_mmap(_ctx: FEntryContext) -> u32 {
    k::dup_enter();
    0
}

#[fexit(function = "dup_mmap")]
pub fn fx_dup_mmap(_ctx: FExitContext) -> u32 {
    k::dup_exit();
    0
}

/// Where `dup_mmap` is inlined (6.12): see `kp_copy_page_range`.
#[fentry(function = "copy_page_range")]
pub fn fe_copy_page_range(_ctx: FEntryContext) -> u32 {
    k::dup_enter();
    0
}

#[fexit(function = "copy_page_range")]
pub fn fx_copy_page_range(_ctx: FExitContext) -> u32 {
    k::dup_exit();
    0
}

#[fentry(function = "do_wp_page")]
pub fn fe_do_wp_page(ctx: FEntryContext) -> u32 {
    k::fault_enter::<true>(ctx.arg::<*const u8>(0), false);
    0
}

#[fexit(function = "do_wp_page")]
pub fn fx_do_wp_page(ctx: FExitContext) -> u32 {
    k::fault_exit(ctx.ret::<u64>().unwrap_or(0) as u32);
    0
}

#[fentry(function = "wp_page_copy")]
pub fn fe_wp_page_copy(_ctx: FEntryContext) -> u32 {
    k::wp_copy_enter();
    0
}

#[fentry(function = "do_huge_pmd_wp_page")]
pub fn fe_do_huge_pmd_wp_page(ctx: FEntryContext) -> u32 {
    k::fault_enter::<true>(ctx.arg::<*const u8>(0), true);
    0
}

#[fexit(function = "do_huge_pmd_wp_page")]
pub fn fx_do_huge_pmd_wp_page(ctx: FExitContext) -> u32 {
    k::fault_exit(ctx.ret::<u64>().unwrap_or(0) as u32);
    0
}
