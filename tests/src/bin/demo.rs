//! `mailpipe-demo`: the worker end to end on one machine, no Kubernetes.
//!
//! Starts maildev (a real SMTP server with a web UI), starts the worker against the local
//! RabbitMQ, publishes jobs the way an application would (plain text, HTML, templated, one
//! invalid), and shows what arrived, what was dead-lettered and the worker's metrics.
//! `scripts/demo.sh` installs and starts what is missing first.
#![forbid(unsafe_code)]

use std::time::Duration;

use mailpipe_contract::naming::dead_letter_queue;
use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::smtp::Maildev;
use mailpipe_tests::worker::WorkerSpec;
use mailpipe_tests::{eventually, repo_root};
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20);
    println!("== starting maildev (SMTP) and the worker");
    let maildev = Maildev::start().await;
    let names = Names::new("demo");
    let templates = repo_root().join("deploy/examples/templates");
    let worker = WorkerSpec::new(SHARED_URL, &names, maildev.smtp_port)
        .args(&["--templates-dir", templates.to_str().expect("UTF-8 path")])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    println!(
        "   worker ready: metrics on http://127.0.0.1:{}/metrics",
        worker.http_port
    );
    println!("   exchange {} -> queue {}", names.exchange, names.queue);

    println!(
        "== publishing {jobs} jobs and 1 invalid one to {}",
        names.exchange
    );
    let mut bodies = Vec::new();
    for n in 0..jobs {
        let job = match n % 3 {
            0 => json!({"id": format!("demo-{n}"), "to": [format!("user{n}@example.com")],
                        "subject": format!("Plain text #{n}"), "text": "Hello from mailpipe."}),
            1 => json!({"id": format!("demo-{n}"), "to": [format!("Ann {n} <ann{n}@example.com>")],
                        "subject": format!("Text and HTML #{n}"), "text": "Hello!",
                        "html": "<h1>Hello!</h1><p>From <b>mailpipe</b>.</p>", "priority": "high"}),
            _ => json!({"id": format!("demo-{n}"), "to": [format!("bob{n}@example.com")],
                        "template": {"name": "welcome", "data": {"name": format!("Bob {n}"), "product": "mailpipe"}}}),
        };
        bodies.push(serde_json::to_vec(&job)?);
    }
    bodies.push(br#"{"id":"demo-invalid","to":["x@example.com"],"subject":"a\r\nBcc: y@example.com","text":"x"}"#.to_vec());
    amqp::publish(SHARED_URL, &names.exchange, bodies).await;

    let emails = eventually(Duration::from_secs(60), "the jobs to arrive", || async {
        let emails = maildev.emails().await;
        (emails.len() >= jobs).then_some(emails)
    })
    .await;
    println!("== {} messages arrived at the SMTP server:", emails.len());
    for email in emails.iter().take(9) {
        let to: Vec<&str> = email.to.iter().map(|a| a.address.as_str()).collect();
        println!("   {:<32} {}", to.join(", "), email.subject);
    }
    if emails.len() > 9 {
        println!("   ... and {} more", emails.len() - 9);
    }
    let dlq = dead_letter_queue(&names.queue);
    eventually(
        Duration::from_secs(10),
        "the invalid job in the dead-letter queue",
        || async { (amqp::ready(SHARED_URL, &dlq).await >= 1).then_some(()) },
    )
    .await;
    for dead in amqp::take_all(SHARED_URL, &dlq).await {
        println!(
            "== dead-lettered {}: {} ({})",
            dead.headers
                .get("x-mailpipe-job-id")
                .map_or("?", String::as_str),
            dead.headers
                .get("x-mailpipe-reason")
                .map_or("?", String::as_str),
            dead.headers
                .get("x-mailpipe-detail")
                .map_or("", String::as_str),
        );
    }
    println!("== worker metrics:");
    for (name, value) in worker.metrics().await {
        let shown = [
            "mailpipe_jobs_",
            "mailpipe_worker_ready",
            "mailpipe_smtp_pool",
        ];
        if shown.iter().any(|p| name.starts_with(p)) {
            println!("   {name} {value}");
        }
    }
    worker.signal(Signal::SIGTERM);
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
    println!("== done: the worker drained and stopped on SIGTERM");
    Ok(())
}
