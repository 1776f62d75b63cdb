//! `mailpipe`: the command line around the operator's library, for a machine without
//! Kubernetes. `local` runs pipelines here (the operator's validation, topology and
//! scaling engine, with local worker processes); `validate` checks pipeline files as a
//! cluster and the operator would.
//!
//! It is a binary of its own rather than a command of `mailpipe-operator`: it is what a
//! person runs on a laptop or a small server, with a terminal view and no cluster
//! credentials, while the operator image stays what runs in a cluster.
#![forbid(unsafe_code)]

mod local;
mod pipelines;
mod secrets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailpipe",
    version,
    about = "mailpipe without Kubernetes: run and check email pipelines on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the pipelines of FILES on this machine: declares their topology in RabbitMQ,
    /// starts and scales their workers, shows what they do; Ctrl-C drains and stops.
    Local(LocalArgs),
    /// Checks the pipelines of FILES as a cluster and the operator would; prints each
    /// problem with the field it is in.
    Validate {
        /// EmailPipeline YAML files (several documents each are fine); `-` reads stdin.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct LocalArgs {
    /// EmailPipeline YAML files (several documents each are fine); `-` reads stdin.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Secrets as files: key KEY of the Secret NAME is the file DIR/NAME/KEY. Without it
    /// (or for a key not there), the variable MAILPIPE_SECRET_<NAME>_<KEY> (upper-cased,
    /// other characters as `_`).
    #[arg(long, value_name = "DIR", env = "MAILPIPE_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// ConfigMaps (templates) as directories: the keys of the ConfigMap NAME are the files
    /// of DIR/NAME/.
    #[arg(long, value_name = "DIR")]
    config_maps_dir: Option<PathBuf>,
    /// The worker program (default: mailpipe-worker beside this program, else on PATH).
    #[arg(long, value_name = "PATH")]
    worker: Option<PathBuf>,
    /// Where runs keep their worker logs (DIR/runs/<id>/logs).
    #[arg(long, value_name = "DIR", default_value = ".mailpipe")]
    state_dir: PathBuf,
    /// Publishes N test jobs into a pipeline at the start.
    #[arg(long, value_name = "N", default_value_t = 0)]
    burst: u64,
    /// Jobs the `b` key publishes in the live view.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    burst_key: u64,
    /// The pipeline bursts go to, as NAME or NAMESPACE/NAME (default: the first).
    #[arg(long, value_name = "PIPELINE")]
    burst_into: Option<String>,
    /// Stops, drained, once no job waits or is held and every pipeline runs its minimum
    /// of workers (after the scale-down stabilization); for scripts and CI.
    #[arg(long)]
    exit_when_drained: bool,
    /// Plain lines instead of the live view, even on a terminal.
    #[arg(long)]
    plain: bool,
    /// Where the delivered mail can be seen (a web inbox), printed with the summary.
    #[arg(long, value_name = "URL")]
    inbox: Option<String>,
    /// How often plain lines are printed.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    every: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Local(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("mailpipe: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let options = local::Options {
                files: args.files,
                secrets_dir: args.secrets_dir,
                config_maps_dir: args.config_maps_dir,
                worker: args.worker,
                state_dir: args.state_dir,
                burst: args.burst,
                burst_key: args.burst_key,
                burst_into: args.burst_into,
                exit_when_drained: args.exit_when_drained,
                plain: args.plain,
                inbox: args.inbox,
                every: args.every,
            };
            match runtime.block_on(local::run(options)) {
                Ok(code) => code,
                Err(error) => {
                    eprintln!("mailpipe local: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    match pipelines::load(files) {
        Ok(loaded) => {
            for pipeline in loaded {
                let scaling = &pipeline.valid.scaling;
                println!(
                    "{}: valid ({}..{} replicas)",
                    pipeline.origin, scaling.min_replicas, scaling.max_replicas
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in errors {
                eprintln!("{error}");
            }
            ExitCode::from(2)
        }
    }
}
