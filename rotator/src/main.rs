//! `rotator`: parse flags, start logging, run, exit with the documented code
//! ([`rotator::cli::Exit`]).

use clap::Parser;
use cli_kit::logging::{LogFormat, LogSettings};
use rotator::cli::Exit;

fn main() -> std::process::ExitCode {
    let cli = rotator::cli::Cli::parse();
    cli_kit::logging::init(LogSettings {
        name: "rotator",
        version: env!("CARGO_PKG_VERSION"),
        format: LogFormat::Plain,
        default_filter: "warn",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rotator: error: cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    std::process::ExitCode::from(runtime.block_on(rotator::cli::run(cli)))
}
