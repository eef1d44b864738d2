//! Empty library target: it lets the userspace crate declare a build
//! dependency on this package so that cargo rebuilds the embedded BPF object
//! when these sources change. The programs themselves are in `main.rs` and
//! its modules.
#![no_std]
