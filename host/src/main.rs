//! The `digibot` command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = digibot::cli::Cli::parse();
    digibot::cli::init_tracing();
    match digibot::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("digibot: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
