//! Real SMTP servers for tests: the project's aiosmtpd server (plain, STARTTLS, implicit
//! TLS, AUTH, scripted faults) and maildev (a popular development SMTP server with a REST
//! API), each on its own ports.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::jobs;
use crate::process::Proc;
use crate::quiet::Quiet;
use crate::{eventually, repo_root, tools_dir};

/// Transport security of the test server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP.
    None,
    /// STARTTLS required before anything else.
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

/// How to start the aiosmtpd server.
#[derive(Debug, Clone)]
pub struct SmtpOptions {
    /// Transport security.
    pub tls: SmtpTls,
    /// Certificate and key, for TLS.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Required credentials.
    pub auth: Option<(String, String)>,
    /// Delay before each DATA reply.
    pub delay_ms: u32,
    /// Offer PIPELINING (RFC 2920) at EHLO, as providers do.
    pub pipelining: bool,
}

impl Default for SmtpOptions {
    fn default() -> Self {
        SmtpOptions {
            tls: SmtpTls::None,
            cert: None,
            auth: None,
            delay_ms: 0,
            pipelining: true,
        }
    }
}

/// One message as the server received it.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    /// MAIL FROM.
    pub mail_from: String,
    /// RCPT TO.
    pub rcpt_tos: Vec<String>,
    /// The whole message.
    pub data: String,
}

/// The server's connection count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Connections {
    /// Open now.
    pub open: u32,
    /// The most open at once.
    pub peak: u32,
}

#[derive(Deserialize)]
struct Ports {
    smtp_port: u16,
    control_port: u16,
}

/// The aiosmtpd-based test server.
pub struct SmtpServer {
    proc: Option<Proc>,
    /// The SMTP port (kept across restarts).
    pub port: u16,
    control_port: u16,
    options: SmtpOptions,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

const PYTHON: &str = "/usr/bin/python3";

impl SmtpServer {
    /// Starts a server on a free port.
    pub async fn start(options: SmtpOptions) -> SmtpServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = SmtpServer {
            proc: None,
            port: 0,
            control_port: 0,
            options,
            dir,
            http: reqwest::Client::new(),
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let check = Command::new(PYTHON)
            .args(["-c", "import aiosmtpd"])
            .output();
        if !check.map(|o| o.status.success()).unwrap_or(false) {
            panic!("the test SMTP server needs {PYTHON} with aiosmtpd: apt-get install -y python3-aiosmtpd (scripts/test-servers.sh does it)");
        }
        let log = self.dir.path().join(format!("smtp-{}.log", self.port));
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new(PYTHON);
        command
            .arg(repo_root().join("tests/servers/smtp_server.py"))
            .args(["--port", &self.port.to_string()])
            .args(["--control-port", &self.control_port.to_string()])
            .args(["--delay-ms", &self.options.delay_ms.to_string()])
            .args((!self.options.pipelining).then_some("--no-pipelining"))
            .arg("--store")
            .arg(self.store())
            .args([
                "--tls",
                match self.options.tls {
                    SmtpTls::None => "none",
                    SmtpTls::Starttls => "starttls",
                    SmtpTls::Implicit => "implicit",
                },
            ]);
        if let Some((cert, key)) = &self.options.cert {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if let Some((user, password)) = &self.options.auth {
            command.args(["--auth", &format!("{user}:{password}")]);
        }
        let proc = Proc::spawn("smtp server", command, &log);
        let ports: Ports = eventually(Duration::from_secs(15), "the SMTP server to start", || {
            let text = proc.output();
            async move {
                text.lines()
                    .find(|l| l.starts_with('{'))
                    .and_then(|l| serde_json::from_str(l).ok())
            }
        })
        .await;
        self.port = ports.smtp_port;
        self.control_port = ports.control_port;
        self.proc = Some(proc);
    }

    fn control(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.control_port)
    }

    fn store(&self) -> std::path::PathBuf {
        self.dir.path().join("received.jsonl")
    }

    /// Every message accepted, across restarts and kills: the server writes each one to its
    /// store before it answers 250.
    pub async fn messages(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(self.store()).unwrap_or_default();
        // A line cut short by a kill was never acknowledged to the client.
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// How many messages arrived, across restarts.
    pub async fn count(&self) -> usize {
        self.messages().await.len()
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) {
        eventually(
            timeout,
            &format!("{n} messages at the SMTP server"),
            || async { (self.count().await >= n).then_some(()) },
        )
        .await;
    }

    /// Waits until `n` messages arrived and nothing more can arrive (see [`Quiet`]), then
    /// tallies the numbered jobs 0..n of `run`.
    pub async fn settled_tally(
        &self,
        run: &str,
        n: usize,
        timeout: Duration,
        quiet: &Quiet<'_>,
    ) -> jobs::Tally {
        self.wait_for_count(n, timeout).await;
        quiet.wait(timeout).await;
        self.tally(run, n).await
    }

    /// Which of the numbered jobs 0..n of `run` arrived, how often (see [`jobs::numbered`]).
    pub async fn tally(&self, run: &str, n: usize) -> jobs::Tally {
        let messages = self.messages().await;
        jobs::tally(
            messages
                .iter()
                .filter_map(|m| jobs::number_in_message(&m.data, run)),
            n,
        )
    }

    /// From now on every DATA is answered with `code text`.
    pub async fn set_fault(&self, code: u16, text: &str) {
        self.http
            .post(self.control("/fault"))
            .json(&serde_json::json!({"code": code, "text": text}))
            .send()
            .await
            .expect("SMTP control API answers");
    }

    /// From now on every message is stored and then the connection is cut before the reply
    /// to its final dot: the client cannot know the message arrived (RFC 1047).
    pub async fn set_drop_after_data(&self) {
        self.http
            .post(self.control("/fault"))
            .json(&serde_json::json!({"drop": true}))
            .send()
            .await
            .expect("SMTP control API answers");
    }

    /// Back to accepting messages.
    pub async fn clear_fault(&self) {
        self.http
            .delete(self.control("/fault"))
            .send()
            .await
            .expect("SMTP control API answers");
    }

    /// Connections open now, and the most open at once since the start or the last
    /// [`SmtpServer::reset_peak`].
    pub async fn connections(&self) -> Connections {
        self.http
            .get(self.control("/connections"))
            .send()
            .await
            .expect("SMTP control API answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// Starts counting the peak again from the connections open now.
    pub async fn reset_peak(&self) {
        self.http
            .post(self.control("/connections/reset"))
            .send()
            .await
            .expect("SMTP control API answers");
    }

    /// Stops the server (what it received stays counted).
    pub async fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again on the same ports with other options (a rotated password, TLS
    /// turned off), keeping what it received.
    pub async fn restart_with(&mut self, options: SmtpOptions) {
        self.options = options;
        self.restart().await;
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) {
        assert!(self.proc.is_none(), "stop the server first");
        self.launch().await;
    }

    /// The server's own log.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::output).unwrap_or_default()
    }
}

/// A message as maildev reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct MaildevEmail {
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    #[serde(default)]
    pub text: Option<String>,
    /// HTML body.
    #[serde(default)]
    pub html: Option<String>,
    /// Recipients.
    pub to: Vec<MaildevAddress>,
    /// The Message-ID header, among others.
    #[serde(default)]
    pub headers: serde_json::Map<String, serde_json::Value>,
}

/// One address in a maildev message.
#[derive(Debug, Clone, Deserialize)]
pub struct MaildevAddress {
    /// The address.
    pub address: String,
}

/// maildev on its own SMTP and web ports.
pub struct Maildev {
    _proc: Proc,
    /// SMTP port.
    pub smtp_port: u16,
    web_port: u16,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Maildev {
    /// Starts maildev from the tools directory.
    pub async fn start() -> Maildev {
        let bin = tools_dir().join("node_modules/.bin/maildev");
        if !bin.exists() {
            panic!("maildev is not installed at {}: run scripts/test-servers.sh (npm install maildev@3)", bin.display());
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (smtp_port, web_port) = (crate::free_port(), crate::free_port());
        let mut command = Command::new(bin);
        command
            .args(["--smtp", &smtp_port.to_string(), "--ip", "127.0.0.1"])
            .args(["--web", &web_port.to_string(), "--web-ip", "127.0.0.1"]);
        let proc = Proc::spawn("maildev", command, &dir.path().join("maildev.log"));
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{web_port}/api/email");
        eventually(Duration::from_secs(20), "maildev to start", || {
            let request = http.get(&url).send();
            async move {
                request
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(drop)
            }
        })
        .await;
        Maildev {
            _proc: proc,
            smtp_port,
            web_port,
            _dir: dir,
            http,
        }
    }

    /// Every message maildev holds.
    pub async fn emails(&self) -> Vec<MaildevEmail> {
        self.http
            .get(format!("http://127.0.0.1:{}/api/email", self.web_port))
            .send()
            .await
            .expect("maildev answers")
            .json()
            .await
            .expect("maildev emails are JSON")
    }
}
