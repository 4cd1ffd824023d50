//! `rotator`: parse flags, start logging, run, exit with the documented code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = rotator::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATREST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rotator: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(rotator::apply::exit::FAILURE);
        }
    };
    std::process::ExitCode::from(runtime.block_on(rotator::cli::run(cli)))
}
