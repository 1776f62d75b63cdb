//! `mailpipe-operator`: `run` reconciles EmailPipelines (one active replica, elected
//! through a Lease), `crd` prints the CRD (YAML). `/metrics`, `/healthz` and `/readyz` are
//! served on `--http-addr`; logs are JSON by default.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use clap::{Parser, Subcommand, ValueEnum};
use kube::runtime::events::{Recorder, Reporter};
use mailpipe_operator::leader::{Elector, Timing};
use mailpipe_operator::metrics::Metrics;
use mailpipe_operator::reconcile::Context;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "The mailpipe operator")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile EmailPipelines until SIGTERM.
    Run(Box<Run>),
    /// Print the EmailPipeline CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Parser)]
struct Run {
    /// Namespaces to watch, comma-separated (default: all).
    #[arg(long, env = "MAILPIPE_OPERATOR_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// The worker image for pipelines that name none.
    #[arg(long, env = "MAILPIPE_OPERATOR_WORKER_IMAGE", default_value = concat!("ghcr.io/mailpipe/mailpipe-worker:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "MAILPIPE_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    http_addr: SocketAddr,
    /// The operator's own namespace (default: the pod's): its leader Lease, and the
    /// broker connections it keeps for the cleanup of `deletionPolicy: Delete` pipelines.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "MAILPIPE_OPERATOR_LEASE",
        default_value = "mailpipe-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "HOSTNAME", default_value = "mailpipe-operator")]
    identity: String,
    /// How long standbys wait, from their last sight of a renewal, before taking the Lease.
    #[arg(long, env = "MAILPIPE_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops (shorter than the lease
    /// duration, so it stops before a standby can take over).
    #[arg(long, env = "MAILPIPE_OPERATOR_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    /// How often candidates try to acquire and the leader renews.
    #[arg(long, env = "MAILPIPE_OPERATOR_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    /// `json` or `text`.
    #[arg(
        long,
        env = "MAILPIPE_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors end as one log line (or one stderr line before logging is set up), never as
    // a Debug dump with a backtrace.
    match start().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{error:#}");
            } else {
                eprintln!("mailpipe-operator: {error:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => {
            print!("{}", mailpipe_operator::crd_yaml());
            Ok(())
        }
        Command::Run(run) => serve(*run).await,
    }
}

async fn serve(run: Run) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILPIPE_OPERATOR_LOG")
        // lapin logs an ERROR for every failed passive declare (an emptiness check of a
        // queue that is gone); the operator reports those outcomes itself.
        .unwrap_or_else(|_| "info,kube=warn,lapin=off".into());
    match run.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let timing = Timing::new(run.lease_duration, run.renew_deadline, run.retry_period)
        .map_err(anyhow::Error::msg)?;
    let client = kube_client().await?;
    let metrics = Metrics::new();
    let stop = CancellationToken::new();

    let http = {
        let metrics = metrics.clone();
        let app = axum::Router::new()
            .route("/metrics", get(move || async move { metrics.render() }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind(run.http_addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        })
    };
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
            stop.cancel();
        });
    }

    let elector = Elector::new(
        client.clone(),
        &run.lease_namespace,
        &run.lease_name,
        &run.identity,
        timing,
    );
    tracing::info!(identity = %run.identity, lease = %run.lease_name, "waiting to lead");
    if !elector.acquire(&stop).await {
        http.await.ok();
        return Ok(());
    }
    tracing::info!(identity = %run.identity, "leading");
    metrics.leader.set(1);

    let service_monitors = client
        .list_api_group_resources("monitoring.coreos.com/v1")
        .await
        .is_ok_and(|list| list.resources.iter().any(|r| r.name == "servicemonitors"));
    let ctx = Arc::new(Context {
        client: client.clone(),
        default_image: run.worker_image.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: mailpipe_operator::MANAGER.into(),
                instance: Some(run.identity.clone()),
            },
        ),
        metrics,
        service_monitors,
        failures: Default::default(),
        own_namespace: run.lease_namespace.clone(),
        kept: Default::default(),
        pipelines: Default::default(),
        deployments: Default::default(),
        broker_urls: Default::default(),
        connections: Default::default(),
    });
    let work = stop.child_token();
    let namespaces: Vec<Option<String>> = if run.namespaces.is_empty() {
        vec![None]
    } else {
        run.namespaces.iter().cloned().map(Some).collect()
    };
    // The Lease is renewed until the controllers have drained after a stop; losing it
    // stops everything at once (the controllers are dropped mid-work: another replica may
    // lead within the lease duration, and the renew deadline ends before that).
    let drained = CancellationToken::new();
    let controllers = async {
        futures::future::join_all(
            namespaces
                .into_iter()
                .map(|ns| mailpipe_operator::controller::run(ctx.clone(), ns, work.clone())),
        )
        .await;
        drained.cancel();
    };
    // The scaler runs beside the controllers, on the pipelines they see, until the stop.
    let scaler = mailpipe_operator::scaling::scaler::run(ctx.clone(), work.clone());
    let controllers = async { tokio::join!(controllers, scaler) };
    tokio::select! {
        _ = controllers => {}
        held = elector.hold(&drained) => {
            if let Err(why) = held {
                anyhow::bail!("stopped leading: {why}; exiting so that this pod restarts as a candidate");
            }
        }
    }
    elector.release().await;
    stop.cancel();
    http.await.ok();
    Ok(())
}

/// The in-cluster or kubeconfig client, introducing itself as `mailpipe-operator/VERSION`
/// (the API server names the field manager of non-apply writes after it, and audit logs
/// show it).
async fn kube_client() -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer().await?;
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!(
            "mailpipe-operator/",
            env!("CARGO_PKG_VERSION")
        )),
    ));
    Ok(kube::Client::try_from(config)?)
}
