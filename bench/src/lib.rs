//! What the benchmarks share.
#![forbid(unsafe_code)]

pub mod procfs;
