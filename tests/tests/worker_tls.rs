//! TLS and authentication against real servers: STARTTLS with AUTH and implicit TLS to
//! SMTP, amqps to RabbitMQ, each verified against a CA file; a wrong password and an
//! untrusted certificate are clear start-up errors.

use std::time::Duration;

use base64::Engine;

use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::certs::{self, TestPki};
use mailpipe_tests::rabbit_node::RabbitNode;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer, SmtpTls};
use mailpipe_tests::worker::WorkerSpec;
use mailpipe_tests::{eventually, jobs, unique};

fn pki() -> (TestPki, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (certs::make(dir.path()), dir)
}

/// A test SMTP server with `tls`, requiring AUTH as mailer / s3cret.
async fn tls_server(pki: &TestPki, tls: SmtpTls) -> SmtpServer {
    SmtpServer::start(SmtpOptions {
        tls,
        cert: Some((pki.cert.clone(), pki.key.clone())),
        auth: Some(("mailer".into(), "s3cret".into())),
        ..SmtpOptions::default()
    })
    .await
}

fn tls_spec(
    names: &Names,
    smtp: &SmtpServer,
    mode: &str,
    ca: &std::path::Path,
    password: &str,
) -> WorkerSpec {
    WorkerSpec::new(SHARED_URL, names, smtp.port)
        .args(&[
            "--smtp-host",
            "localhost",
            "--smtp-tls",
            mode,
            "--smtp-ca-file",
            ca.to_str().unwrap(),
            "--smtp-username",
            "mailer",
        ])
        .env("MAILPIPE_SMTP_PASSWORD", password)
}

#[tokio::test]
async fn starttls_with_auth_delivers_and_the_password_never_reaches_the_log() {
    let (pki, _dir) = pki();
    let smtp = tls_server(&pki, SmtpTls::Starttls).await;
    let names = Names::new("starttls");
    let worker = tls_spec(&names, &smtp, "starttls", &pki.ca, "s3cret")
        .args(&["--log", "trace"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..3).await;
    eventually(
        Duration::from_secs(20),
        "3 messages over STARTTLS",
        || async { (smtp.count().await == 3).then_some(()) },
    )
    .await;
    let output = worker.output();
    assert!(
        !output.contains("s3cret"),
        "the password leaked into the log"
    );
    // AUTH PLAIN and LOGIN carry it in base64: decode every token that could be base64.
    let leaks: Vec<&str> = output
        .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=')))
        .filter(|token| token.len() >= 8)
        .filter(|token| {
            base64::engine::general_purpose::STANDARD
                .decode(token)
                .is_ok_and(|bytes| bytes.windows(6).any(|w| w == b"s3cret"))
        })
        .collect();
    assert!(leaks.is_empty(), "the password leaked in base64: {leaks:?}");
    assert!(
        output.contains("TRACE") || output.contains("DEBUG"),
        "the log ran at the most verbose level"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn a_wrong_smtp_password_is_a_clear_start_up_error() {
    let (pki, _dir) = pki();
    let smtp = tls_server(&pki, SmtpTls::Starttls).await;
    let names = Names::new("badpass");
    let mut worker = tls_spec(&names, &smtp, "starttls", &pki.ca, "wrong").spawn();
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let output = worker.output();
    assert!(output.contains("refused the worker"), "{output}");
    assert!(
        output.contains("535"),
        "the server's answer is shown: {output}"
    );
    assert!(
        !output.contains("wrong"),
        "the password is not logged: {output}"
    );
}

#[tokio::test]
async fn an_untrusted_smtp_certificate_is_a_clear_start_up_error() {
    let (pki, _dir) = pki();
    let smtp = tls_server(&pki, SmtpTls::Starttls).await;
    let names = Names::new("untrusted");
    let mut worker = tls_spec(&names, &smtp, "starttls", &pki.other_ca, "s3cret").spawn();
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let output = worker.output();
    assert!(output.contains("refused the worker"), "{output}");
    // The other CA has the same name as the one that signed the certificate, so the
    // verifier finds it and the signature does not match.
    assert!(
        output.contains("not signed by") && output.contains("--smtp-ca-file"),
        "the error says what to change: {output}"
    );
    assert_eq!(
        output.matches("invalid peer certificate").count(),
        1,
        "said once, not three times: {output}"
    );
}

/// A self-signed CA certificate served as the server's own (a common mistake): the error
/// says so and what to do, instead of `Other(OtherError(CaUsedAsEndEntity))`.
#[tokio::test]
async fn a_ca_certificate_served_as_the_server_certificate_is_explained() {
    let (pki, _dir) = pki();
    let smtp = SmtpServer::start(SmtpOptions {
        tls: SmtpTls::Starttls,
        cert: Some((pki.ca.clone(), pki.ca.with_file_name("ca.key"))),
        auth: Some(("mailer".into(), "s3cret".into())),
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("caleaf");
    let mut worker = tls_spec(&names, &smtp, "starttls", &pki.ca, "s3cret").spawn();
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let output = worker.output();
    assert!(
        output.contains("presents a CA certificate (CA:TRUE) as its own"),
        "{output}"
    );
}

#[tokio::test]
async fn implicit_tls_delivers() {
    let (pki, _dir) = pki();
    let smtp = tls_server(&pki, SmtpTls::Implicit).await;
    let names = Names::new("implicit");
    let worker = tls_spec(&names, &smtp, "tls", &pki.ca, "s3cret").spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish(SHARED_URL, &names.exchange, [jobs::numbered(&run, 0)]).await;
    eventually(
        Duration::from_secs(20),
        "a message over implicit TLS",
        || async { (smtp.count().await == 1).then_some(()) },
    )
    .await;
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn implicit_tls_refuses_an_untrusted_certificate() {
    let (pki, _dir) = pki();
    let smtp = tls_server(&pki, SmtpTls::Implicit).await;
    let names = Names::new("implicituntrusted");
    let mut worker = tls_spec(&names, &smtp, "tls", &pki.other_ca, "s3cret").spawn();
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let output = worker.output();
    assert!(output.contains("refused the worker"), "{output}");
    assert!(
        output.contains("UnknownIssuer") || output.contains("BadSignature"),
        "{output}"
    );
}

#[tokio::test]
async fn private_broker_amqps_with_a_ca_file_delivers_and_a_wrong_ca_is_refused() {
    let (pki, _dir) = pki();
    let (ca, cert, key, other) = (
        pki.ca.clone(),
        pki.cert.clone(),
        pki.key.clone(),
        pki.other_ca.clone(),
    );
    let node = tokio::task::spawn_blocking(move || {
        RabbitNode::start(Some(&TestPki {
            ca,
            cert,
            key,
            other_ca: other,
        }))
    })
    .await
    .unwrap();
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("amqps");

    let refused = WorkerSpec::new(&node.tls_url(), &names, smtp.port)
        .args(&["--amqp-ca-file", pki.other_ca.to_str().unwrap()])
        .spawn();
    eventually(
        Duration::from_secs(20),
        "a certificate error in the log",
        || async {
            let output = refused.output();
            (output.contains("cannot connect to the broker")).then_some(())
        },
    )
    .await;
    assert!(
        !refused.is_ready().await,
        "not ready with an untrusted broker certificate"
    );
    drop(refused);

    let worker = WorkerSpec::new(&node.tls_url(), &names, smtp.port)
        .args(&["--amqp-ca-file", pki.ca.to_str().unwrap()])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(&node.url(), &names.exchange, &run, 0..3).await;
    eventually(
        Duration::from_secs(20),
        "3 jobs consumed over amqps",
        || async { (smtp.count().await == 3).then_some(()) },
    )
    .await;
    drop(worker);
    drop(node);
}

/// Mid-run the server starts refusing the worker: first it stops offering STARTTLS, then it
/// takes a rotated password the worker does not have yet. Neither is the jobs' fault: the
/// worker pauses (not ready), spends no attempt and dead-letters nothing, and once the
/// server accepts it again every job goes out once.
#[tokio::test]
async fn a_server_that_refuses_the_worker_mid_run_costs_the_jobs_nothing() {
    const N: usize = 60;
    let (pki, _dir) = pki();
    let options = |tls, password: &str| SmtpOptions {
        tls,
        cert: Some((pki.cert.clone(), pki.key.clone())),
        auth: Some(("mailer".into(), password.into())),
        delay_ms: 200,
        ..SmtpOptions::default()
    };
    let mut smtp = SmtpServer::start(options(SmtpTls::Starttls, "s3cret")).await;
    let names = Names::new("refused");
    let worker = tls_spec(&names, &smtp, "starttls", &pki.ca, "s3cret")
        .args(&["--concurrency", "4"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(10, Duration::from_secs(30)).await;

    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    let refusals = [
        (SmtpTls::None, "s3cret", "smtp_tls"),
        (SmtpTls::Starttls, "rotated", "smtp_auth"),
    ];
    for (tls, password, reason) in refusals {
        smtp.stop().await;
        // AUTH over plain text is refused by the test server itself; STARTTLS is what is
        // missing here.
        let mut next = options(tls, password);
        if tls == SmtpTls::None {
            next.cert = None;
            next.auth = None;
        }
        smtp.restart_with(next).await;
        worker.wait_unready(Duration::from_secs(20)).await;
        // The worker's probe (backing off up to 10 s) meets the new refusal and names it.
        let counted = format!("mailpipe_smtp_unavailable_total{{reason=\"{reason}\"}}");
        eventually(Duration::from_secs(30), &counted, || async {
            (worker.metric(&counted).await > 0.0).then_some(())
        })
        .await;
        assert!(!worker.is_ready().await);
        assert_eq!(amqp::ready(SHARED_URL, &dlq).await, 0);
    }
    let metrics = worker.metrics().await;
    for reason in ["smtp_tls", "smtp_auth"] {
        assert!(
            metrics
                .get(&format!(
                    "mailpipe_smtp_unavailable_total{{reason=\"{reason}\"}}"
                ))
                .is_some_and(|v| *v > 0.0),
            "{reason} counted: {metrics:?}"
        );
    }
    smtp.stop().await;
    smtp.restart_with(options(SmtpTls::Starttls, "s3cret"))
        .await;
    worker.wait_ready(Duration::from_secs(30)).await;
    let quiet = mailpipe_tests::quiet::Quiet {
        url: SHARED_URL,
        plan: names.plan(&mailpipe_tests::worker::TEST_RETRY),
        workers: vec![&worker],
    };
    let tally = smtp
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    assert_eq!(tally, jobs::Tally::EXACT);
    let metrics = worker.metrics().await;
    assert!(
        !metrics.iter().any(|(k, v)| *v > 0.0
            && (k.starts_with("mailpipe_jobs_failed_total{reason=\"smtp_tls")
                || k.starts_with("mailpipe_jobs_failed_total{reason=\"smtp_auth"))),
        "no attempt spent on the refusals: {metrics:?}"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&mailpipe_tests::worker::TEST_RETRY)).await;
}
