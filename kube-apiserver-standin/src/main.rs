//! `kube-apiserver-standin`: a stand-in for kube-apiserver, for tests only.
//! See the crate docs (`kube_apiserver_standin`) for what it serves and how it
//! stores objects.

use std::process::ExitCode;

use clap::Parser;
use kube_apiserver_standin::{Args, Config, run};

fn main() -> ExitCode {
    let args = Args::parse();
    cli_kit::logging::init(cli_kit::logging::LogSettings {
        name: "kube-apiserver-standin",
        version: env!("CARGO_PKG_VERSION"),
        format: cli_kit::logging::LogFormat::Plain,
        default_filter: "info",
    });
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kube-apiserver-standin: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kube-apiserver-standin: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube-apiserver-standin: {e}");
            ExitCode::from(1)
        }
    }
}
