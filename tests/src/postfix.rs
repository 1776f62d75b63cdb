//! Postfix for tests: the MTA most providers' front doors behave like, offering PIPELINING
//! (RFC 2920) and enforcing it. A private instance per test (`postfix -c DIR`, its own
//! loopback port, queue and log), relaying everything it accepts to a test SMTP server that
//! stores the messages; recipients whose local part starts with `reject5xx` are refused at
//! RCPT with 550.
//!
//! Without PIPELINING (`pipelining: false`) it does not announce the extension (the worker
//! then speaks a command at a time) and disconnects a client that sends anything where no
//! client may (`smtpd_forbid_unauth_pipelining`: after DATA before the 354, after the final
//! dot; logged as "improper command pipelining"). Postfix 3.7 still serves MAIL, RCPT and
//! DATA sent in one write without the extension, so uninvited pipelining of the envelope is
//! checked by the worker's unit tests, not here. Installed by `scripts/test-servers.sh` (Debian's
//! postfix, no system configuration); runs as root, like the tests here.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::eventually;

const POSTFIX: &str = "/usr/sbin/postfix";

/// A private Postfix, stopped when dropped.
pub struct Postfix {
    /// Its SMTP port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Postfix {
    /// Starts one relaying to 127.0.0.1:`relay_port`.
    pub async fn start(relay_port: u16, pipelining: bool) -> Postfix {
        if !Path::new(POSTFIX).exists() {
            panic!("no Postfix at {POSTFIX}: scripts/test-servers.sh installs it (apt-get install postfix, with \"No configuration\" preseeded)");
        }
        let postfix = Postfix {
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let root = postfix.dir.path();
        let conf = root.join("conf");
        let data = root.join("data");
        for dir in [&conf, &data, &root.join("queue")] {
            std::fs::create_dir_all(dir).expect("postfix directories");
        }
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown postfix {}", data.display());
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("master.cf");
        let smtpd = format!("127.0.0.1:{} inet n - n - - smtpd", postfix.port);
        // No chroot (it would need copies of /etc files in the queue directory), and smtpd
        // on the instance's own port.
        let master: Vec<String> = master
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if line.starts_with("smtp ") && fields.last() == Some(&"smtpd") {
                    smtpd.clone()
                } else if !line.starts_with(['#', ' ', '\t'])
                    && fields.len() >= 8
                    && fields[4] == "y"
                {
                    let mut fields = fields;
                    fields[4] = "n";
                    fields.join(" ")
                } else {
                    line.to_string()
                }
            })
            .collect();
        assert!(
            master.contains(&smtpd),
            "the smtpd line of /etc/postfix/master.cf was not found"
        );
        std::fs::write(conf.join("master.cf"), master.join("\n") + "\n").expect("master.cf");
        std::fs::write(
            conf.join("recipients"),
            "/^reject5xx/ REJECT 5.1.1 mailbox unavailable\n",
        )
        .expect("recipients");
        let root = root.display();
        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtpd_recipient_restrictions = check_recipient_access regexp:{root}/conf/recipients, permit_mynetworks, reject
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
"
        );
        if !pipelining {
            main.push_str(
                "smtpd_discard_ehlo_keywords = pipelining\nsmtpd_forbid_unauth_pipelining = yes\n",
            );
        }
        std::fs::write(conf.join("main.cf"), main).expect("main.cf");
        let started = Command::new(POSTFIX)
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .output()
            .expect("postfix start");
        assert!(
            started.status.success(),
            "postfix start failed ({}); its log: {}",
            String::from_utf8_lossy(&started.stderr),
            postfix.log()
        );
        let port = postfix.port;
        eventually(
            Duration::from_secs(20),
            "postfix to listen",
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            },
        )
        .await;
        postfix
    }

    /// Its mail log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(self.dir.path().join("conf"))
            .arg("abort")
            .output();
    }
}
