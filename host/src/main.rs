//! The `digibot` command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = digibot::cli::Cli::parse();
    if let Err(e) = digibot::cli::init_tracing() {
        eprintln!("digibot: {e}");
        return std::process::ExitCode::from(2);
    }
    match digibot::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("digibot: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
