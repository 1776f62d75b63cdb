//! Redis for tests: the shared server on 6379 (keys under a unique prefix), or a private
//! `redis-server` on its own port for tests that stop it.

use std::process::Command;
use std::time::Duration;

use crate::eventually;
use crate::process::Proc;

/// The shared Redis URL.
pub const SHARED_URL: &str = "redis://127.0.0.1:6379/0";

/// A private redis-server, killed when dropped.
pub struct RedisServer {
    proc: Option<Proc>,
    /// Its port (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port, keeping nothing on disk.
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            proc: None,
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        let proc = Proc::spawn("redis-server", command, &self.dir.path().join("redis.log"));
        let port = self.port;
        eventually(
            Duration::from_secs(10),
            "redis-server to listen",
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            },
        )
        .await;
        self.proc = Some(proc);
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (its data is gone, which a deduplication store may lose anyway).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.launch().await;
    }
}
