use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qmodel_server::quantize;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face / sentence-transformers checkpoint into a model artifact.
    Quantize(quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Quantize(args) => quantize::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmodel-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
