//! `etcd-inspect`: parse flags, start logging, run the audit, map the result
//! to the documented exit code (0 clean, 1 findings, 2 error).

use std::process::ExitCode;

use clap::Parser;
use etcd_inspect::{Args, Settings};

fn main() -> ExitCode {
    let args = Args::parse(); // clap exits 2 on a usage error
    let settings = match Settings::try_from(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("etcd-inspect: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATREST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("etcd-inspect: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    match runtime.block_on(etcd_inspect::run(&settings, stdout.lock())) {
        Ok(outcome) => {
            if let Some(why) = outcome.nothing_judged() {
                eprintln!("etcd-inspect: {why}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            // Every error's message already includes its cause.
            eprintln!("etcd-inspect: {e}");
            ExitCode::from(2)
        }
    }
}
