//! `kms-loadgen`: drive a real kms-plugin like kube-apiserver does and print a
//! latency/CPU table. Logic lives in `atrest_bench::kms`.

use std::process::ExitCode;

use anyhow::Context as _;
use atrest_bench::kms::{Args, Config, run};
use clap::Parser as _;

fn main() -> ExitCode {
    let args = Args::parse();
    // Progress goes to stderr; the table alone goes to stdout.
    cli_kit::logging::init(cli_kit::logging::LogSettings {
        name: "kms-loadgen",
        version: env!("CARGO_PKG_VERSION"),
        format: cli_kit::logging::LogFormat::Plain,
        default_filter: "info",
    });
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kms-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    match main_inner(config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kms-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main_inner(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let report = runtime.block_on(run(config))?;
    cli_kit::output::print(&report.to_markdown()).context("cannot write the table")?;
    let failures = report.failure_summary();
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("kms-loadgen: {} calls failed:", report.failed_calls());
    for line in failures {
        eprintln!("  {line}");
    }
    Ok(ExitCode::FAILURE)
}
