use which::which;

/// The BPF object is linked by `bpf-linker`, which cargo does not know
/// about: rebuild when the linker binary changes.
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found on PATH; `cargo xtask run` installs it (see README)");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
