use clap::Parser;

fn main() -> std::process::ExitCode {
    kms_plugin::run::run(kms_plugin::cli::Cli::parse())
}
