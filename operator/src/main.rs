//! `mailpipe-operator`: `crd` prints the EmailPipeline CRD (YAML). The reconciler (`run`)
//! arrives with the rest of the operator.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "The mailpipe operator")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the EmailPipeline CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => print!("{}", mailpipe_operator::crd_yaml()),
    }
    Ok(())
}
