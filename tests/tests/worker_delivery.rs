//! Jobs in, mail out: the worker against the real RabbitMQ and real SMTP servers.

use std::collections::BTreeSet;
use std::time::Duration;

use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs;
use mailpipe_tests::smtp::{Maildev, SmtpOptions, SmtpServer};
use mailpipe_tests::worker::WorkerSpec;
use mailpipe_tests::{eventually, unique};

fn test_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_millis(200),
        multiplier: 2.0,
        max: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn a_thousand_jobs_arrive_exactly_once_with_the_right_content() {
    const N: usize = 1000;
    let maildev = Maildev::start().await;
    let names = Names::new("thousand");
    let run = unique("run");
    let worker = WorkerSpec::new(SHARED_URL, &names, maildev.smtp_port)
        .args(&["--concurrency", "16"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;

    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    let emails = eventually(
        Duration::from_secs(120),
        "1000 emails at maildev",
        || async {
            let emails = maildev.emails().await;
            (emails.len() >= N).then_some(emails)
        },
    )
    .await;
    // Give a straggler (a duplicate) the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let emails = if maildev.emails().await.len() > emails.len() {
        maildev.emails().await
    } else {
        emails
    };
    assert_eq!(emails.len(), N, "exactly {N} messages at the SMTP server");
    let mut seen = BTreeSet::new();
    for email in &emails {
        let n = jobs::number_in_subject(&email.subject, &run)
            .unwrap_or_else(|| panic!("unexpected subject {:?}", email.subject));
        assert!(seen.insert(n), "job {n} arrived twice");
        let to: Vec<&str> = email.to.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(to, [format!("user{n}@example.com")], "recipient of job {n}");
        let text = email.text.as_deref().unwrap_or_default();
        assert!(
            text.contains(&format!("this is job {n}.")),
            "text of job {n}: {text:?}"
        );
        let html = email.html.as_deref().unwrap_or_default();
        assert!(
            html.contains(&format!("<b>{n}</b>")),
            "html of job {n}: {html:?}"
        );
    }
    assert_eq!(seen.len(), N);

    assert_eq!(
        amqp::ready(SHARED_URL, &names.queue).await,
        0,
        "work queue empty"
    );
    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    assert_eq!(
        amqp::ready(SHARED_URL, &dlq).await,
        0,
        "nothing dead-lettered"
    );
    let metrics = eventually(Duration::from_secs(10), "metrics to settle", || async {
        let m = worker.metrics().await;
        (m.get("mailpipe_jobs_in_flight") == Some(&0.0)).then_some(m)
    })
    .await;
    assert_eq!(metrics["mailpipe_jobs_consumed_total"], N as f64);
    assert_eq!(metrics["mailpipe_jobs_sent_total"], N as f64);
    assert_eq!(
        metrics["mailpipe_job_processing_duration_seconds_count"],
        N as f64
    );
    assert_eq!(
        metrics["mailpipe_smtp_send_duration_seconds_count"],
        N as f64
    );
    assert_eq!(metrics["mailpipe_worker_ready"], 1.0);
    assert!(
        !metrics
            .iter()
            .any(|(k, v)| k.starts_with("mailpipe_jobs_failed_total") && *v > 0.0),
        "no failures"
    );

    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn invalid_and_rejected_jobs_are_dead_lettered_with_a_reason_and_nothing_loops() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("invalid");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--backoff-initial", "200ms"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;

    let malformed = b"{\"to\": [\"a@example.com\"], \"subject\": ".to_vec();
    let injection = br#"{"id":"inject","to":["a@example.com"],"subject":"Hi\r\nBcc: victim@example.com","text":"x"}"#.to_vec();
    let rejected =
        br#"{"id":"reject","to":["reject5xx@example.com"],"subject":"s","text":"x"}"#.to_vec();
    let expired = br#"{"id":"late","to":["a@example.com"],"subject":"code","text":"123456","not_after":"2020-01-01T00:00:00Z"}"#.to_vec();
    let fine = br#"{"id":"fine","to":["ok@example.com"],"subject":"fine","text":"x"}"#.to_vec();
    amqp::publish(
        SHARED_URL,
        &names.exchange,
        [malformed, injection, rejected, expired, fine],
    )
    .await;

    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    eventually(Duration::from_secs(30), "4 dead-lettered jobs", || async {
        (amqp::ready(SHARED_URL, &dlq).await >= 4).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the valid job delivered",
        || async { (smtp.count().await == 1).then_some(()) },
    )
    .await;
    // Nothing loops: after a pause, no further consumption happened.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics["mailpipe_jobs_consumed_total"], 5.0,
        "each job consumed once"
    );
    assert_eq!(metrics["mailpipe_jobs_sent_total"], 1.0);
    assert_eq!(metrics["mailpipe_jobs_expired_total"], 1.0);
    assert!(
        !metrics
            .iter()
            .any(|(k, v)| k.starts_with("mailpipe_jobs_retried_total") && *v > 0.0),
        "no retries"
    );

    let mut reasons: Vec<(String, String)> = amqp::take_all(SHARED_URL, &dlq)
        .await
        .into_iter()
        .map(|got| {
            assert!(
                got.headers.contains_key("x-mailpipe-detail"),
                "{:?}",
                got.headers
            );
            assert_eq!(
                got.headers.get("x-mailpipe-attempt").map(String::as_str),
                Some("1")
            );
            (
                got.headers["x-mailpipe-job-id"].clone(),
                got.headers["x-mailpipe-reason"].clone(),
            )
        })
        .collect();
    reasons.sort();
    let malformed_id = reasons
        .iter()
        .find(|(id, _)| id.starts_with("sha256:"))
        .map(|(id, _)| id.clone())
        .expect("the malformed job gets a derived id");
    assert_eq!(
        reasons,
        vec![
            ("inject".to_string(), "header_injection".to_string()),
            ("late".to_string(), "expired".to_string()),
            ("reject".to_string(), "smtp_5xx".to_string()),
            (malformed_id, "malformed_json".to_string()),
        ]
    );
    let received = smtp.messages().await;
    assert_eq!(received[0].rcpt_tos, ["ok@example.com"]);
    assert!(received.iter().all(|m| !m.data.contains("victim")));

    amqp::delete_plan(SHARED_URL, &names.plan(&test_retry())).await;
}

#[tokio::test]
async fn templates_render_html_and_text_parts() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("templates");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("otp.subject"), "Your code is {{ code }}").unwrap();
    std::fs::write(dir.path().join("otp.txt"), "Code: {{ code }}").unwrap();
    std::fs::write(
        dir.path().join("otp.html"),
        "<p>Code: <b>{{ code }}</b> for {{ name }}</p>",
    )
    .unwrap();
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--templates-dir", dir.path().to_str().unwrap()])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let job = br#"{"to":["a@example.com"],"template":{"name":"otp","data":{"code":"424242","name":"<Ann>"}}}"#;
    amqp::publish(SHARED_URL, &names.exchange, [job.to_vec()]).await;
    let message = eventually(Duration::from_secs(20), "the templated message", || async {
        smtp.messages().await.pop()
    })
    .await;
    assert!(
        message.data.contains("Subject: Your code is 424242"),
        "{}",
        message.data
    );
    assert!(
        message.data.contains("multipart/alternative"),
        "{}",
        message.data
    );
    assert!(message.data.contains("Code: 424242"), "{}", message.data);
    assert!(message.data.contains("&lt;Ann&gt;"), "{}", message.data);
    amqp::delete_plan(SHARED_URL, &names.plan(&test_retry())).await;
}

#[tokio::test]
async fn log_mode_renders_and_acks_without_sending() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("logmode");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--mode", "log"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..3).await;
    eventually(Duration::from_secs(20), "3 jobs handled", || async {
        (worker.metric("mailpipe_jobs_sent_total").await == 3.0).then_some(())
    })
    .await;
    assert_eq!(smtp.count().await, 0, "log mode sends nothing");
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, 0);
    let output = worker.output();
    assert!(output.contains("log mode: message rendered"), "{output}");
    assert!(
        !output.contains("user1@example.com"),
        "no recipients at info level"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&test_retry())).await;
}

/// Jobs that are valid, or broken in ways producers really break them, each ending where it
/// belongs: long header lines are folded and delivered (a server refuses lines over 998
/// characters), a non-ASCII address to a server without SMTPUTF8 is dead-lettered at once
/// (not taken for a server outage), and schema violations are told apart from bad JSON.
#[tokio::test]
async fn long_headers_non_ascii_addresses_and_schema_violations_end_where_they_belong() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("edgejobs");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let long_subject = format!("Your link https://example.com/{}", "a".repeat(1200));
    let jobs = [
        serde_json::json!({"id": "long", "to": ["a@example.com"], "subject": long_subject,
            "text": "t", "headers": {"X-Trace": "x".repeat(1500)}})
        .to_string(),
        serde_json::json!({"id": "utf8", "to": ["jos\u{e9}@example.com"], "subject": "s", "text": "t"})
            .to_string(),
        r#"[1, ["a@example.com"], [], [], null, null, "s", "t"]"#.to_string(),
        r#"{"id": "typed", "to": "a@example.com", "subject": "s", "text": "t"}"#.to_string(),
        r#"{"id": "when", "to": ["a@example.com"], "subject": "s", "text": "t", "not_after": "tomorrow"}"#
            .to_string(),
    ];
    amqp::publish(
        SHARED_URL,
        &names.exchange,
        jobs.iter().map(|j| j.as_bytes().to_vec()),
    )
    .await;
    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    eventually(Duration::from_secs(20), "4 jobs dead-lettered", || async {
        (amqp::ready(SHARED_URL, &dlq).await == 4).then_some(())
    })
    .await;
    smtp.wait_for_count(1, Duration::from_secs(20)).await;
    let received = smtp.messages().await;
    let longest = received[0].data.lines().map(str::len).max().unwrap();
    assert!(longest <= 998, "a line of {longest} characters");
    assert!(
        worker.is_ready().await,
        "a job's address is not a server outage"
    );
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics["mailpipe_jobs_consumed_total"], 5.0,
        "each consumed once"
    );
    let mut reasons: Vec<(String, String, String)> = amqp::take_all(SHARED_URL, &dlq)
        .await
        .into_iter()
        .map(|got| {
            (
                got.headers["x-mailpipe-reason"].clone(),
                got.headers["x-mailpipe-job-id"].clone(),
                got.headers["x-mailpipe-detail"].clone(),
            )
        })
        .collect();
    reasons.sort();
    let summary: Vec<(&str, &str)> = reasons
        .iter()
        .map(|(reason, id, _)| {
            (
                reason.as_str(),
                if id.starts_with("sha256:") {
                    "derived"
                } else {
                    id.as_str()
                },
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("malformed_json", "derived"),
            ("schema_violation", "typed"),
            ("schema_violation", "when"),
            ("smtputf8_unsupported", "utf8"),
        ]
    );
    assert!(reasons[2].2.contains("not_after"), "{:?}", reasons[2]);
    amqp::delete_plan(SHARED_URL, &names.plan(&test_retry())).await;
}

/// One refused recipient no longer costs the others their mail: the server's answer is
/// taken recipient by recipient, a recipient refused for now is retried alone, and one
/// refused for good is dead-lettered alone, named in `x-mailpipe-recipients`. The server
/// offers PIPELINING, so the replies to a whole envelope are read after one write.
#[tokio::test]
async fn refused_recipients_are_retried_or_dead_lettered_alone() {
    refused_recipients(true).await;
}

/// The same, command by command, with a server that does not offer PIPELINING.
#[tokio::test]
async fn refused_recipients_are_retried_or_dead_lettered_alone_without_pipelining() {
    refused_recipients(false).await;
}

async fn refused_recipients(pipelining: bool) {
    let smtp = SmtpServer::start(SmtpOptions {
        pipelining,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("rcpts");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let jobs = [
        serde_json::json!({"id": "mixed", "to": ["ok@example.com", "deferonce1@example.com"],
            "cc": ["reject5xx-a@example.com"], "subject": "mixed", "text": "t"}),
        serde_json::json!({"id": "bounce", "to": ["ok2@example.com"],
            "bcc": ["reject5xx-b@example.com"], "subject": "bounce", "text": "t"}),
    ];
    amqp::publish(
        SHARED_URL,
        &names.exchange,
        jobs.iter().map(|j| j.to_string().into_bytes()),
    )
    .await;
    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    smtp.wait_for_count(3, Duration::from_secs(20)).await;
    eventually(
        Duration::from_secs(20),
        "the bounce dead-lettered",
        || async { (amqp::ready(SHARED_URL, &dlq).await == 1).then_some(()) },
    )
    .await;
    let quiet = mailpipe_tests::quiet::Quiet {
        url: SHARED_URL,
        plan: names.plan(&test_retry()),
        workers: vec![&worker],
    };
    quiet.wait(Duration::from_secs(20)).await;
    let mut delivered: Vec<Vec<String>> = smtp
        .messages()
        .await
        .into_iter()
        .map(|m| m.rcpt_tos)
        .collect();
    delivered.sort();
    assert_eq!(
        delivered,
        [
            vec!["deferonce1@example.com".to_string()],
            vec!["ok2@example.com".to_string()],
            vec!["ok@example.com".to_string()],
        ],
        "each served recipient once, the deferred one on the retry alone"
    );
    let dead = amqp::take_all(SHARED_URL, &dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["x-mailpipe-reason"], "recipient_refused");
    assert_eq!(dead[0].headers["x-mailpipe-job-id"], "bounce");
    assert_eq!(
        dead[0].headers["x-mailpipe-recipients"],
        r#"["reject5xx-b@example.com"]"#
    );
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics["mailpipe_recipients_refused_total{class=\"transient\"}"],
        1.0
    );
    assert_eq!(
        metrics["mailpipe_recipients_refused_total{class=\"permanent\"}"],
        2.0
    );
    assert_eq!(metrics["mailpipe_jobs_sent_total"], 3.0);
    amqp::delete_plan(SHARED_URL, &names.plan(&test_retry())).await;
}
