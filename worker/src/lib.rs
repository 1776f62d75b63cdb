//! The mailpipe worker: consumes email jobs and sends them over SMTP without losing one.
//!
//! Data flows `source -> pipeline -> mailer`, and each delivery is settled back through the
//! source: `config` builds everything, `pipeline` runs the loop, `disposition` decides what a
//! failure means, `render` builds messages, `idempotency` keeps sends from repeating,
//! `metrics`, `health` and `http` tell the outside world how it goes.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod disposition;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod mailer;
pub mod metrics;
pub mod pipeline;
pub mod reasons;
pub mod render;
pub mod shutdown;
pub mod source;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Mode};
use crate::health::{Component, Health};
use crate::mailer::log::LogMailer;
use crate::mailer::smtp::SmtpMailer;
use crate::mailer::Mailer;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::render::Renderer;
use crate::source::Source;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Templates or the default From are broken.
    #[error(transparent)]
    Render(#[from] render::SetupError),
    /// The SMTP transport cannot be built.
    #[error(transparent)]
    Smtp(#[from] mailer::smtp::BuildError),
    /// The SMTP server refuses us for a reason that waiting will not fix.
    #[error("SMTP server {server} refused the worker: {detail}")]
    SmtpRefused {
        /// host:port
        server: String,
        /// What it said.
        detail: String,
    },
    /// The broker source cannot be set up.
    #[error(transparent)]
    Source(#[from] source::SetupError),
    /// The deduplication store URL is unusable.
    #[error(transparent)]
    Store(#[from] idempotency::StoreError),
    /// The HTTP port cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the worker until `stop` is cancelled (SIGTERM/SIGINT in `main`).
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), StartError> {
    let metrics = Metrics::new();
    let renderer = Renderer::new(
        config.templates_dir.as_deref(),
        config.from_address.as_deref(),
        config.from_name.as_deref(),
    )?;
    if let Some(dir) = &config.templates_dir {
        let names: Vec<&str> = renderer.template_names().collect();
        tracing::info!(dir = %dir.display(), templates = ?names, "templates loaded");
    }
    let health = Health::new(
        config
            .idempotency
            .as_ref()
            .is_some_and(|i| i.on_unavailable == config::OnRedisUnavailable::Pause),
        metrics.clone(),
    );
    // Served before anything waits on the SMTP server, so liveness holds meanwhile.
    let http_stop = CancellationToken::new();
    let http = http::serve(
        config.http_addr,
        metrics.clone(),
        health.clone(),
        http_stop.clone(),
    )
    .await
    .map_err(|source| StartError::Http {
        addr: config.http_addr,
        source,
    })?;
    tracing::info!(addr = %config.http_addr, "serving /metrics, /healthz, /readyz");
    let served = match config.mode {
        Mode::Send => send(config, renderer, metrics, health, stop).await,
        Mode::Log => {
            health.set(Component::Smtp, true);
            tracing::info!("log mode: messages are rendered and logged, not sent");
            serve(config, LogMailer, renderer, metrics, health, stop).await
        }
    };
    http_stop.cancel();
    let _ = http.await;
    served
}

/// Send mode: the SMTP transport (with its share of the pipeline's connection budget, when
/// it has one), checked once, then the pipeline.
async fn send(
    config: Config,
    renderer: Renderer,
    metrics: Metrics,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<(), StartError> {
    if config.smtp.insecure_skip_verify {
        tracing::error!(
            host = %config.smtp.host,
            "SMTP certificate verification is OFF: anyone between the worker and the server can read and change the mail"
        );
    }
    let mailer = SmtpMailer::new(&config.smtp, metrics.clone())?;
    let server = format!("{}:{}", config.smtp.host, config.smtp.port);
    // With a shared budget the pool's slots come with its tokens, taken from the
    // start (the probe below needs one) and given back after the last send.
    let budget_stop = CancellationToken::new();
    let budget = match &config.smtp.budget_queue {
        Some(queue) => {
            let budget = mailer::budget::Budget {
                queue: queue.clone(),
                total: config.smtp.pool_size,
                cap: config.smtp.pool_size.min(config.concurrency as u32),
            };
            // Validation allows a budget queue only with a RabbitMQ source.
            let config::SourceConfig::Rabbit(amqp) = &config.source else {
                unreachable!("a budget queue needs a RabbitMQ source")
            };
            let tls = source::rabbitmq::broker_tls(amqp).map_err(source::SetupError::from)?;
            Some(tokio::spawn(mailer::budget::run(
                amqp.clone(),
                tls,
                budget,
                mailer.pool(),
                budget_stop.clone(),
            )))
        }
        None => None,
    };
    let probed = tokio::select! {
        biased;
        _ = stop.cancelled() => {
            budget_stop.cancel();
            return Ok(());
        }
        probed = mailer.probe() => probed,
    };
    match probed {
        Ok(()) => {
            health.set(Component::Smtp, true);
            tracing::info!(%server, tls = ?config.smtp.tls, "SMTP server reachable");
        }
        Err(error) if matches!(error.reason, "smtp_auth" | "smtp_tls") => {
            budget_stop.cancel();
            return Err(StartError::SmtpRefused {
                server,
                detail: error.detail,
            });
        }
        Err(error) => {
            health.report_down(Component::Smtp);
            tracing::warn!(%server, reason = error.reason, detail = %error.detail, "SMTP server not reachable yet; consuming starts once it answers");
        }
    }
    let served = serve(config, mailer, renderer, metrics, health, stop).await;
    budget_stop.cancel();
    if let Some(budget) = budget {
        let _ = budget.await;
    }
    served
}

async fn serve<M: Mailer>(
    config: Config,
    mailer: M,
    renderer: Renderer,
    metrics: Metrics,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<(), StartError> {
    let dedup = config
        .idempotency
        .as_ref()
        .map(idempotency::Dedup::new)
        .transpose()?;
    let source = Source::from_config(&config, health.clone(), metrics.clone())?;
    let pipeline = Arc::new(Pipeline {
        mailer,
        renderer,
        dedup,
        in_flight: idempotency::InFlight::default(),
        on_store_unavailable: config
            .idempotency
            .as_ref()
            .map_or(config::OnRedisUnavailable::Pause, |i| i.on_unavailable),
        retry: config.retry,
        limits: config.limits,
        metrics,
        health,
        rate: config.smtp.rate_limit.and_then(pipeline::SendRate::new),
        pace: pipeline::drain::Pace::default(),
    });
    let watcher = {
        let pipeline = pipeline.clone();
        let stop = stop.clone();
        tokio::spawn(async move { pipeline.watch_dependencies(stop).await })
    };
    let drained = pipeline::run(
        pipeline,
        source,
        config.concurrency,
        stop,
        config.shutdown_timeout,
    )
    .await;
    let _ = watcher.await;
    tracing::info!(
        given_back = drained.given_back,
        abandoned = drained.abandoned,
        "worker stopped"
    );
    Ok(())
}
