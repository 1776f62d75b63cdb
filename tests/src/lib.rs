//! The end-to-end harness: real servers started per test, and the worker driven as a process.
//!
//! Every test gets its own names (exchange, queue, Redis prefix), its own SMTP server port,
//! and, when it cuts a server, its own RabbitMQ node or Redis server, so tests run in
//! parallel on one machine. A server that cannot be started fails the test with a message
//! saying what is missing; nothing is skipped silently.
//!
//! The harness knows every crate; no product crate knows the harness.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod certs;
pub mod chart;
pub mod cluster;
pub mod images;
pub mod jobs;
pub mod kafka;
pub mod pipelines;
pub mod postfix;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod quiet;
pub mod rabbit_node;
pub mod redis_server;
pub mod smtp;
pub mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A name no other test in any process uses: `prefix_<pid>_<counter>_<nanos>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` saying
/// what was awaited.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where tools installed by `scripts/test-servers.sh` live (outside the clone, cached).
pub fn tools_dir() -> std::path::PathBuf {
    match std::env::var_os("MAILPIPE_TOOLS") {
        Some(dir) => dir.into(),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            std::path::Path::new(&home).join(".cache/mailpipe/tools")
        }
    }
}

/// A workspace binary built beside the test executable (`cargo build --workspace --bins`
/// first, as `.ci/run` does), or the path in the environment variable `override_var`.
pub fn built_binary(name: &str, override_var: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(override_var) {
        return path.into();
    }
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    let bin = [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("..").join(name));
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --workspace --bins), as .ci/run does",
        bin.display()
    );
    bin
}

/// The repository root (for scripts and fixtures).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}
