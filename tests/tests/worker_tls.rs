//! TLS and authentication against real servers: STARTTLS with AUTH and implicit TLS to
//! SMTP, amqps to RabbitMQ, each verified against a CA file; a wrong password and an
//! untrusted certificate are clear start-up errors.

use std::time::Duration;

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
        .args(&["--log", "debug"])
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
    assert!(
        !worker.output().contains("s3cret"),
        "the password leaked into the log"
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
    assert!(
        output.to_lowercase().contains("certificate") || output.contains("UnknownIssuer"),
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
