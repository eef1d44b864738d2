//! cow-trace's userspace logic that needs no kernel: event decoding,
//! aggregation, episodes, histograms and output. The binary (`main.rs`) adds the kernel side;
//! this library exists so that benchmarks can drive the same code.

pub mod aggregate;
pub mod episode;
pub mod histogram;
pub mod output;
pub mod regions;
pub mod stream;
