//! The container images `scripts/images.sh` builds (the suite builds them first): each agrees
//! with its runtime stage in `deploy/images/Containerfile` (user, entry point, command, ports,
//! labels, files), holds nothing but its static binary, CA certificates and a passwd (no
//! shell, no package manager), and its binary runs from the image's own root filesystem,
//! read-only, as UID 65532: it prints its version and serves `/healthz`; the worker delivers
//! a job from a real RabbitMQ, the operator leads against the Kubernetes API test server.

use std::time::Duration;

use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::cluster::Cluster;
use mailpipe_tests::images::{self, image_config, image_name, PodRoot, Stage, VERSION};
use mailpipe_tests::process::Proc;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::WorkerSpec;
use mailpipe_tests::{eventually, free_port, unique};

/// The goal for the worker image.
const WORKER_MAX_BYTES: u64 = 30 * 1024 * 1024;

fn stage(name: &str) -> Stage {
    images::runtime_stages(VERSION)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("a runtime stage {name} in the Containerfile"))
}

/// The image against its stage, and its files; returns the pod's view of it.
fn checked_image(
    binary: &str,
    max_bytes: Option<u64>,
    volumes: &[(&std::path::Path, &str)],
) -> PodRoot {
    let stage = stage(binary);
    let image = image_name(binary);
    let config = image_config(&image);
    assert_eq!(config["User"], stage.user, "{image}: the user");
    assert_eq!(stage.user, "65532:65532");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(stage.entrypoint),
        "{image}"
    );
    let cmd = if stage.cmd.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!(stage.cmd)
    };
    assert_eq!(config["Cmd"], cmd, "{image}: the command");
    let ports: Vec<String> = config["ExposedPorts"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let expected: Vec<String> = stage.expose.iter().map(|p| format!("{p}/tcp")).collect();
    assert_eq!(ports, expected, "{image}: the ports");
    for (key, value) in &stage.labels {
        assert_eq!(
            config["Labels"][key],
            value.as_str(),
            "{image}: label {key}"
        );
    }
    for key in ["source", "version", "licenses"] {
        let key = format!("org.opencontainers.image.{key}");
        assert!(stage.labels.contains_key(&key), "{binary}: label {key}");
    }
    assert_eq!(
        stage.labels["org.opencontainers.image.version"], VERSION,
        "one version source"
    );

    let pod = PodRoot::new(&image, volumes);
    let files = images::files(&pod.image_root);
    let program = stage.entrypoint[0].trim_start_matches('/').to_string();
    let expected_files = [
        "etc/group".to_string(),
        "etc/passwd".to_string(),
        "etc/ssl/certs/ca-certificates.crt".to_string(),
        program.clone(),
    ];
    assert_eq!(
        files.keys().cloned().collect::<Vec<_>>(),
        expected_files,
        "{image}: nothing but the binary, CA certificates and passwd (no shell, no package manager)"
    );
    for copied in &stage.copies {
        let path = pod.image_root.join(copied.trim_start_matches('/'));
        assert!(path.exists(), "{image}: the stage copies to {copied}");
    }
    let passwd = std::fs::read_to_string(pod.image_root.join("etc/passwd")).expect("passwd");
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    let elf = std::fs::read(pod.image_root.join(&program)).expect("the binary");
    assert!(!images::is_dynamically_linked(&elf), "{program} is static");
    let size: u64 = files.values().sum();
    println!("{image}: {:.1} MiB of files", size as f64 / 1048576.0);
    if let Some(max) = max_bytes {
        assert!(size < max, "{image}: {size} bytes, over {max}");
    }
    // The pod's view is read-only.
    assert!(
        std::fs::write(pod.root.join("probe"), b"x").is_err(),
        "a read-only root"
    );
    pod
}

fn version_from(pod: &PodRoot, program: &str) -> String {
    mailpipe_tests::process::run(
        pod.command(program, &[]).arg("--version"),
        &format!("{program} --version"),
    )
}

async fn healthz(port: u16) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .ok()?;
    response.status().is_success().then_some(())?;
    response.text().await.ok()
}

#[tokio::test]
async fn the_worker_image_runs_read_only_as_65532_and_delivers_a_job() {
    let pod = checked_image("worker", Some(WORKER_MAX_BYTES), &[]);
    let program = "/usr/local/bin/mailpipe-worker";
    assert_eq!(
        version_from(&pod, program).trim(),
        format!("mailpipe-worker {VERSION}")
    );

    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("image");
    let (args, env) = WorkerSpec::with_defaults(SHARED_URL, &names, smtp.port).into_parts();
    let port = free_port();
    let mut command = pod.command(program, &env);
    command
        .args(&args)
        .args(["--http-addr", &format!("127.0.0.1:{port}")]);
    let dir = tempfile::tempdir().expect("temp dir");
    let worker = Proc::spawn("worker (image)", command, &dir.path().join("worker.log"));
    let health = eventually(Duration::from_secs(30), "the worker's /healthz", || {
        healthz(port)
    })
    .await;
    assert_eq!(health.trim(), "ok");
    eventually(Duration::from_secs(30), "the worker ready", || async {
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        ready.then_some(())
    })
    .await;
    let run = unique("image");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..1).await;
    smtp.wait_for_count(1, Duration::from_secs(30)).await;
    drop(worker);
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn the_operator_image_runs_read_only_as_65532_and_leads() {
    let cluster = Cluster::start().await;
    let config = tempfile::tempdir().expect("temp dir");
    std::fs::copy(&cluster.kubeconfig, config.path().join("kubeconfig")).expect("kubeconfig");
    let pod = checked_image("operator", None, &[(config.path(), "/var/run/mailpipe")]);
    let program = "/usr/local/bin/mailpipe-operator";
    assert_eq!(
        version_from(&pod, program).trim(),
        format!("mailpipe-operator {VERSION}")
    );

    let port = free_port();
    let env = [(
        "KUBECONFIG".to_string(),
        "/var/run/mailpipe/kubeconfig".to_string(),
    )];
    let mut command = pod.command(program, &env);
    command.args([
        "run",
        "--identity",
        "from-the-image",
        "--http-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let operator = Proc::spawn(
        "operator (image)",
        command,
        &dir.path().join("operator.log"),
    );
    let health = eventually(Duration::from_secs(30), "the operator's /healthz", || {
        healthz(port)
    })
    .await;
    assert_eq!(health.trim(), "ok");
    eventually(
        Duration::from_secs(30),
        "the operator holds the Lease",
        || async { (cluster.lease_holder().await == "from-the-image").then_some(()) },
    )
    .await;
    drop(operator);
}
