//! A private RabbitMQ node for tests that restart or stop the broker (or need a TLS
//! listener), so they never pull the shared node from under other tests.
//!
//! It is a second `rabbitmq-server` with its own node name, ports and data directory,
//! started detached, stopped when dropped.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::certs::TestPki;
use crate::{free_port, unique};

/// A running private node.
pub struct RabbitNode {
    /// Erlang node name, e.g. `mp_123@localhost`.
    pub name: String,
    /// Plain AMQP port.
    pub port: u16,
    /// AMQPS port, when started with TLS.
    pub tls_port: Option<u16>,
    _dir: tempfile::TempDir,
}

fn rabbitmqctl(node: &str, args: &[&str]) -> Result<String, String> {
    crate::amqp::rabbitmqctl(Some(node), args)
}

fn chown_to_rabbitmq(dir: &Path) {
    // rabbitmq-server drops to the rabbitmq user when started as root.
    let _ = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir)
        .status();
}

impl RabbitNode {
    /// Starts a node (blocking, about 5-10 s) with a TLS listener when `pki` is given.
    pub fn start(pki: Option<&TestPki>) -> RabbitNode {
        let dir = tempfile::Builder::new()
            .prefix("mailpipe-rabbit-")
            .tempdir()
            .expect("temp dir");
        let name = format!("{}@localhost", unique("mp"));
        let port = free_port();
        let dist_port = free_port();
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n");
        let tls_port = pki.map(|pki| {
            let tls_port = free_port();
            for (file, target) in [
                (&pki.ca, "ca.pem"),
                (&pki.cert, "cert.pem"),
                (&pki.key, "key.pem"),
            ] {
                std::fs::copy(file, dir.path().join(target)).expect("copy TLS files");
            }
            let d = dir.path().display();
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/cert.pem\nssl_options.keyfile = {d}/key.pem\n\
                 ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
            ));
            tls_port
        });
        std::fs::write(dir.path().join("rabbitmq.conf"), conf).expect("write config");
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("write plugins");
        chown_to_rabbitmq(dir.path());
        let d = dir.path();
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .status()
            .expect("rabbitmq-server is installed (apt-get install -y rabbitmq-server)");
        assert!(
            status.success(),
            "rabbitmq-server -detached failed for {name}"
        );
        let node = RabbitNode {
            name,
            port,
            tls_port,
            _dir: dir,
        };
        node.await_running(Duration::from_secs(90));
        node
    }

    fn await_running(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let started = rabbitmqctl(&self.name, &["await_startup", "--timeout", "30"]);
            let listening = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if started.is_ok() && listening {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(
                    self._dir
                        .path()
                        .join("log")
                        .join(format!("{}.log", self.name)),
                )
                .unwrap_or_default();
                let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
                panic!(
                    "private RabbitMQ node {} did not start: {started:?}\n{tail}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://guest:guest@localhost:PORT/%2f`
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("node started with TLS");
        format!("amqps://guest:guest@localhost:{port}/%2f")
    }

    /// Runs rabbitmqctl against this node.
    pub fn ctl(&self, args: &[&str]) -> String {
        rabbitmqctl(&self.name, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Stops the RabbitMQ application (clients are dropped; the Erlang node stays).
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    /// Starts the application again and waits until it accepts connections.
    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.await_running(Duration::from_secs(60));
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&self.name, &["stop"]);
    }
}
