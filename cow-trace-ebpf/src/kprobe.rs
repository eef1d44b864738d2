//! The kprobe backend: kprobes and kretprobes on the kernel functions that
//! do the work. Attached by name from userspace.

use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::kernel_path as k;

#[kprobe]
pub fn kp_copy_process(_ctx: ProbeContext) -> u32 {
    k::clone_enter();
    0
}

#[kretprobe]
pub fn kr_copy_process(ctx: RetProbeContext) -> u32 {
    k::clone_exit(ctx.ret::<u64>());
    0
}

#[kprobe]
pub fn kp_dup_mmap(_ctx: ProbeContext) -> u32 {
    k::dup_enter();
    0
}

#[kretprobe]
pub fn kr_dup_mmap(_ctx: RetProbeContext) -> u32 {
    k::dup_exit();
    0
}

/// Where `dup_mmap` is inlined (6.12): the page-table copy itself, one
/// call per VMA, summed over the fork.
#[kprobe]
pub fn kp_copy_page_range(_ctx: ProbeContext) -> u32 {
    k::dup_enter();
    0
}

#[kretprobe]
pub fn kr_copy_page_range(_ctx: RetProbeContext) -> u32 {
    k::dup_exit();
    0
}

#[kprobe]
pub fn kp_do_wp_page(ctx: ProbeContext) -> u32 {
    if let Some(vmf) = ctx.arg::<*const u8>(0) {
        k::fault_enter::<false>(vmf, false);
    }
    0
}

#[kretprobe]
pub fn kr_do_wp_page(ctx: RetProbeContext) -> u32 {
    k::fault_exit(ctx.ret::<u64>() as u32);
    0
}

#[kprobe]
pub fn kp_wp_page_copy(_ctx: ProbeContext) -> u32 {
    k::wp_copy_enter();
    0
}

#[kprobe]
pub fn kp_do_huge_pmd_wp_page(ctx: ProbeContext) -> u32 {
    if let Some(vmf) = ctx.arg::<*const u8>(0) {
        k::fault_enter::<false>(vmf, true);
    }
    0
}

#[kretprobe]
pub fn kr_do_huge_pmd_wp_page(ctx: RetProbeContext) -> u32 {
    k::fault_exit(ctx.ret::<u64>() as u32);
    0
}
