//! `mailpipe-operator`: reconciles `EmailPipeline` resources into broker topology and worker
//! Deployments. This crate is a skeleton until the operator issue lands; it shares the
//! topology plan and the worker's environment contract through `mailpipe-contract`.
#![forbid(unsafe_code)]

fn main() {
    println!("mailpipe-operator {}", env!("CARGO_PKG_VERSION"));
}
