//! `mailpipe-worker`: parse flags, set up logging, run on a single-threaded runtime until
//! SIGTERM.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use mailpipe_worker::config::{Args, Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    // lapin logs each failed connection attempt twice at ERROR; the worker logs it once,
    // with the delay before the next try. Ask for `lapin=...` to see lapin's own lines.
    let directives = if args.log.contains("lapin") {
        args.log.clone()
    } else {
        format!("{},lapin=off", args.log)
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!(
            "mailpipe-worker: bad log filter {:?} ({e}); using info",
            args.log
        );
        EnvFilter::new("info")
    });
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => subscriber.json().flatten_event(true).init(),
        LogFormat::Text => subscriber.init(),
    }
    let stop_with_parent = args.stop_with_parent;
    let config = match Config::from_args(args, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: a job is a few sends and waits with little CPU between them, and on a
    // machine the broker and the SMTP server share, the multi-thread runtime's wake-ups
    // and work stealing cost more than they bring (the benchmark measured about 15% less
    // CPU a job); more throughput is more replicas.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let stop = CancellationToken::new();
        mailpipe_worker::shutdown::on_signals(stop.clone()).map_err(anyhow::Error::from)?;
        if stop_with_parent {
            mailpipe_worker::shutdown::with_parent(stop.clone());
        }
        mailpipe_worker::run(config, stop)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::from(1)
        }
    }
}
