//! `mailpipe-kube-api [ADDR] [KUBECONFIG] [--run IMAGE=PROGRAM]...`: runs the test server
//! (default 127.0.0.1:0) and writes a kubeconfig for kubectl (default ./kubeconfig), until
//! interrupted (SIGINT or SIGTERM; the runner stops its pods first). With `--run`, the runner plays kubelet: Deployments matching `--selector`
//! whose image is IMAGE run as local PROGRAM processes (pod files under `--pods`).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use mailpipe_kube_api::runner::{Runner, RunnerConfig};
use mailpipe_kube_api::KubeApiServer;

#[derive(Parser)]
#[command(about = "The Kubernetes API test server of mailpipe's tests (and a local kubelet)")]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    /// Where to write a kubeconfig for this server.
    #[arg(default_value = "kubeconfig")]
    kubeconfig: PathBuf,
    /// IMAGE=PROGRAM: run Deployments of image IMAGE (its last path segment, no tag) as
    /// local PROGRAM processes. Repeatable.
    #[arg(long = "run", value_parser = image_program)]
    run: Vec<(String, PathBuf)>,
    /// Label selector of the Deployments the runner runs.
    #[arg(long, default_value = mailpipe_contract::labels::WORKER_SELECTOR)]
    selector: String,
    /// Directory for the pods' volumes and logs.
    #[arg(long, default_value = "pods")]
    pods: PathBuf,
}

fn image_program(value: &str) -> Result<(String, PathBuf), String> {
    let (image, program) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not IMAGE=PROGRAM"))?;
    Ok((image.to_string(), PathBuf::from(program)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let server = KubeApiServer::start_on(args.addr).await?;
    server.write_kubeconfig(&args.kubeconfig)?;
    println!("serving the Kubernetes API test server on {}", server.url());
    println!("export KUBECONFIG={}", args.kubeconfig.display());
    let runner = if args.run.is_empty() {
        None
    } else {
        let mut config = RunnerConfig::new(&args.selector, &std::path::absolute(&args.pods)?)
            .api_server(&server.url());
        for (image, program) in &args.run {
            config = config.program(image, &std::path::absolute(program)?);
        }
        println!(
            "running Deployments matching {:?} (pods in {})",
            args.selector,
            args.pods.display()
        );
        Some(Runner::start(server.client(), config))
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    if let Some(runner) = runner {
        runner.shutdown().await;
    }
    Ok(())
}
