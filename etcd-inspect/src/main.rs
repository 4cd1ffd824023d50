//! `etcd-inspect`: parse flags, start logging, run the audit, map the result
//! to the documented exit code ([`etcd_inspect::cli::Exit`]).

use std::process::ExitCode;

use clap::Parser;
use cli_kit::logging::{LogFormat, LogSettings};
use etcd_inspect::cli::Exit;
use etcd_inspect::{Args, Settings};

fn main() -> ExitCode {
    let args = Args::parse(); // clap exits 2 on a usage error
    let settings = match Settings::try_from(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("etcd-inspect: {e}");
            return Exit::Error.into();
        }
    };
    cli_kit::logging::init(LogSettings {
        name: "etcd-inspect",
        version: env!("CARGO_PKG_VERSION"),
        format: LogFormat::Plain,
        default_filter: "warn",
    });

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("etcd-inspect: cannot start the async runtime: {e}");
            return Exit::Error.into();
        }
    };
    let stdout = std::io::stdout();
    match runtime.block_on(etcd_inspect::run(&settings, stdout.lock())) {
        Ok(outcome) => {
            if let Some(why) = outcome.nothing_judged() {
                eprintln!("etcd-inspect: {}", cli_kit::escape::escape_control(&why));
            }
            outcome.exit().into()
        }
        // The reader of the report has gone (`etcd-inspect ... | head`): it
        // read what it wanted, so end quietly.
        Err(e) if cli_kit::output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error's message already includes its cause; it may quote
            // an etcd key or a plugin's words, so control characters are escaped.
            eprintln!(
                "etcd-inspect: {}",
                cli_kit::escape::escape_control(&e.to_string())
            );
            Exit::Error.into()
        }
    }
}
