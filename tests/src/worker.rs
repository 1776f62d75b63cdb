//! The worker as a process, the way it runs in production: flags and environment in,
//! `/readyz` and `/metrics` out, SIGTERM and SIGKILL to stop it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::amqp::Names;
use crate::process::Proc;
use crate::{eventually, free_port};

/// The `mailpipe-worker` binary built beside the test executable
/// (`cargo build -p mailpipe-worker` first), or `MAILPIPE_WORKER_BIN`.
pub fn binary() -> PathBuf {
    crate::built_binary("mailpipe-worker", "MAILPIPE_WORKER_BIN")
}

/// The retry policy of [`WorkerSpec::new`]: 5 attempts, 200 ms doubling up to 2 s (its
/// delay queues are those of `names.plan(&TEST_RETRY)`).
pub const TEST_RETRY: mailpipe_contract::RetryPolicy = mailpipe_contract::RetryPolicy {
    max_attempts: 5,
    initial: Duration::from_millis(200),
    multiplier: 2.0,
    max: Duration::from_secs(2),
};

/// How to start a worker: flags and environment on top of test defaults.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

impl WorkerSpec {
    /// A worker for `names` on broker `amqp_url`, sending plain SMTP to 127.0.0.1:`smtp_port`,
    /// with short retry delays ([`TEST_RETRY`]) and a 20 s drain deadline.
    pub fn new(amqp_url: &str, names: &Names, smtp_port: u16) -> WorkerSpec {
        WorkerSpec::with_defaults(amqp_url, names, smtp_port).test_retry()
    }

    /// The short retry delays and drain deadline of [`WorkerSpec::new`].
    fn test_retry(self) -> WorkerSpec {
        self.args(&[
            "--from-name",
            "mailpipe tests",
            "--backoff-initial",
            "200ms",
            "--backoff-max",
            "2s",
            "--shutdown-timeout",
            "20s",
        ])
    }

    /// A worker consuming `topic` on the Kafka brokers `bootstrap` as a member of `group`,
    /// creating its topics (3 partitions each) and sending plain SMTP to
    /// 127.0.0.1:`smtp_port`, with the short retry delays of [`WorkerSpec::new`].
    pub fn kafka(bootstrap: &str, topic: &str, group: &str, smtp_port: u16) -> WorkerSpec {
        let args = [
            "--source",
            "kafka",
            "--kafka-bootstrap-servers",
            bootstrap,
            "--kafka-topic",
            topic,
            "--kafka-group",
            group,
        ];
        WorkerSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
        }
        .args(&SmtpArgs::plain(smtp_port).list())
        .test_retry()
    }

    /// A worker for `names` on broker `amqp_url` sending plain SMTP to 127.0.0.1:`smtp_port`
    /// with everything else as users get it: the default attempts, backoff, timeouts and
    /// drain deadline. Tests of faults users meet run with these.
    pub fn with_defaults(amqp_url: &str, names: &Names, smtp_port: u16) -> WorkerSpec {
        let args = ["--exchange", &names.exchange, "--queue", &names.queue]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut env = BTreeMap::new();
        env.insert("MAILPIPE_AMQP_URL".to_string(), amqp_url.to_string());
        WorkerSpec { args, env }.args(&SmtpArgs::plain(smtp_port).list())
    }

    /// Its flags and environment, for a supervisor of its own to start it with
    /// ([`WorkerSpec::spawn`] adds the HTTP address and a log file).
    pub fn into_parts(self) -> (Vec<String>, Vec<(String, String)>) {
        (self.args, self.env.into_iter().collect())
    }

    /// Adds flags; a flag given again replaces the earlier value (clap refuses repeats).
    pub fn args(mut self, args: &[&str]) -> WorkerSpec {
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            if let Some(at) = self.args.iter().position(|a| a == flag) {
                let takes_value = self.args.get(at + 1).is_some_and(|v| !v.starts_with("--"));
                self.args.drain(at..at + 1 + usize::from(takes_value));
            }
        }
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> WorkerSpec {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// Starts the worker.
    pub fn spawn(&self) -> Worker {
        let http_port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(binary());
        for (key, _) in std::env::vars() {
            if key.starts_with("MAILPIPE_") {
                command.env_remove(key);
            }
        }
        command
            .args(&self.args)
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .envs(&self.env);
        let proc = Proc::spawn("mailpipe-worker", command, &dir.path().join("worker.log"));
        Worker {
            proc,
            http_port,
            _dir: dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
        }
    }
}

/// The flags of plain SMTP to a local test server.
struct SmtpArgs {
    port: String,
}

impl SmtpArgs {
    fn plain(port: u16) -> SmtpArgs {
        SmtpArgs {
            port: port.to_string(),
        }
    }

    fn list(&self) -> [&str; 8] {
        [
            "--smtp-host",
            "127.0.0.1",
            "--smtp-port",
            &self.port,
            "--smtp-tls",
            "none",
            "--from-address",
            "noreply@mailpipe.test",
        ]
    }
}

/// A running worker process.
pub struct Worker {
    proc: Proc,
    /// The port of /metrics, /healthz, /readyz.
    pub http_port: u16,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Worker {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        match self.http.get(self.url("/readyz")).send().await {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        }
    }

    /// Waits until `/readyz` answers 200, or panics with the worker's output.
    pub async fn wait_ready(&self, timeout: Duration) {
        let what = "the worker to become ready";
        let ready = tokio::time::timeout(timeout, async {
            while !self.is_ready().await {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if ready.is_err() {
            panic!(
                "timed out waiting for {what}; worker output:\n{}",
                self.output()
            );
        }
    }

    /// Waits until `/readyz` answers 503.
    pub async fn wait_unready(&self, timeout: Duration) {
        eventually(timeout, "the worker to report not ready", || async {
            (!self.is_ready().await).then_some(())
        })
        .await;
    }

    /// Every sample of `/metrics`: `name{labels}` -> value.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// One sample, 0 when absent (counters with labels appear on first use).
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics().await.get(sample).copied().unwrap_or(0.0)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        self.proc.signal(signal);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.proc.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "worker did not exit within {timeout:?}; output:\n{}",
                self.output()
            ),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// What it logged.
    pub fn output(&self) -> String {
        self.proc.output()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let output = self.output();
            let tail: Vec<&str> = output.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- {} output (last lines) ---\n{}",
                self.proc.name(),
                tail.join("\n")
            );
        }
    }
}
