//! Runs a parsed command line and maps the outcome to an exit code.

use std::process::ExitCode;

use cli_kit::logging::{LogSettings, init as init_logging};

use crate::cli::{
    AddArgs, Cli, Command, Exit, KeyringCommand, ListFormat, LogFormat, parse_endpoint,
};
use crate::pkcs11::{ModuleConfig, Pin};
use crate::serve::{ServeConfig, serve, shutdown_signal};
use ::keyring::edit;

/// Exit code for a usage error (bad flag value).
pub const EXIT_USAGE: Exit = Exit::Usage;
/// Exit code for a runtime failure.
pub const EXIT_FAILURE: Exit = Exit::Failure;
/// Exit code when the PKCS#11 module, token or PIN cannot be used (a wrong
/// PIN is never retried: a supervisor should not restart in a loop on this).
pub const EXIT_TOKEN: Exit = Exit::Token;

fn fail(message: impl std::fmt::Display, code: Exit) -> ExitCode {
    eprintln!("kms-plugin: {message}");
    code.into()
}

/// `serve` logs at INFO by default; `probe`, which kubelet may run every
/// few seconds and whose output it keeps, only warnings and errors (its
/// verdict is on stdout, its reason for failing on stderr).
fn logging(format: LogFormat, default_filter: &'static str) -> LogSettings {
    LogSettings {
        name: "kms-plugin",
        version: env!("CARGO_PKG_VERSION"),
        format,
        default_filter,
    }
}

/// Runs `cli` to completion.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Keyring(cmd) => keyring(cmd),
        Command::Serve(args) => {
            let format = args.log_format;
            let worker_threads = args.worker_threads;
            let keyring_path = args.keyring.clone();
            let pkcs11 = match crate::pkcs11::setup::from_args(&args.pkcs11) {
                Ok(p) => p,
                Err(e) => return fail(e, EXIT_USAGE),
            };
            let config = match ServeConfig::try_from(args) {
                Ok(c) => c,
                Err(e) => return fail(e, EXIT_USAGE),
            };
            init_logging(logging(format, "info"));
            if let Some(config) = pkcs11
                && let Err(e) = crate::pkcs11::setup::start(config, &keyring_path)
            {
                tracing::error!(error = %e, "PKCS#11 token cannot be used");
                return fail(e, EXIT_TOKEN);
            }
            let served = runtime_with(worker_threads)
                .map(|rt| rt.block_on(serve(config, shutdown_signal())));
            if let Some(hsm) = crate::pkcs11::serving::installed() {
                hsm.log_stats();
            }
            match served {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "kms-plugin failed");
                    fail(e, EXIT_FAILURE)
                }
                Err(e) => fail(format!("cannot start the async runtime: {e}"), EXIT_FAILURE),
            }
        }
        Command::Probe(args) => {
            let timeout = args.timeout;
            let endpoint = match parse_endpoint("--listen", &args.listen) {
                Ok(e) => e,
                Err(e) => return fail(e, EXIT_USAGE),
            };
            init_logging(logging(LogFormat::Plain, "warn"));
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    return fail(format!("cannot start the async runtime: {e}"), EXIT_FAILURE);
                }
            };
            let text = if args.roundtrip {
                match rt.block_on(crate::probe::roundtrip(&endpoint, timeout)) {
                    Ok(report) => probe_output(&report.status, Some(&report), args.output),
                    Err(e) => {
                        let message = format!("round trip failed: {e}");
                        return fail(cli_kit::escape::escape_control(&message), EXIT_FAILURE);
                    }
                }
            } else {
                match rt.block_on(crate::probe::probe(&endpoint, timeout)) {
                    Ok(report) => probe_output(&report, None, args.output),
                    Err(e) => return fail(e, EXIT_FAILURE),
                }
            };
            match cli_kit::output::print(&text) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("cannot write to stdout: {e}"), EXIT_FAILURE),
            }
        }
    }
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `probe` output: a line per result (text) or one JSON object. The test
/// value of a round trip is never part of it.
fn probe_output(
    status: &crate::probe::ProbeReport,
    roundtrip: Option<&crate::probe::RoundTripReport>,
    format: ListFormat,
) -> String {
    match format {
        ListFormat::Json => {
            let rt = roundtrip.map(|r| {
                serde_json::json!({
                    "ok": true,
                    "ciphertext_bytes": r.ciphertext_len,
                    "status_ms": millis(r.status_time),
                    "encrypt_ms": millis(r.encrypt_time),
                    "decrypt_ms": millis(r.decrypt_time),
                })
            });
            serde_json::json!({
                "healthy": true,
                "version": status.version,
                "key_id": status.key_id,
                "roundtrip": rt,
            })
            .to_string()
                + "\n"
        }
        ListFormat::Text => {
            let mut text = format!(
                "healthy: version {} key_id {}\n",
                status.version,
                cli_kit::escape::escape_control(&status.key_id)
            );
            if let Some(r) = roundtrip {
                text.push_str(&format!(
                    "roundtrip: ok: Encrypt + Decrypt of a random 32-byte value gave it back under that key_id ({}-byte ciphertext; Status {} ms, Encrypt {} ms, Decrypt {} ms)\n",
                    r.ciphertext_len,
                    millis(r.status_time),
                    millis(r.encrypt_time),
                    millis(r.decrypt_time)
                ));
            }
            text
        }
    }
}

fn add_pkcs11(args: AddArgs) -> ExitCode {
    use crate::pkcs11::add::{AddRequest, Source, add};
    let Some(module) = args.module.pkcs11_module else {
        return fail(
            "--pkcs11-token needs --pkcs11-module PATH (or ATREST_PKCS11_MODULE)",
            EXIT_USAGE,
        );
    };
    let pin = match Pin::resolve(args.module.pkcs11_pin_file.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail(e, EXIT_USAGE),
    };
    let config = ModuleConfig {
        module,
        pin,
        max_sessions: Some(1),
        session_wait: std::time::Duration::from_secs(10),
    };
    let request = AddRequest {
        token: args.pkcs11_token.as_deref().unwrap_or_default(),
        serial: args.pkcs11_serial.as_deref(),
        key_label: args.pkcs11_key_label.as_deref(),
        source: if args.adopt {
            Source::Adopt
        } else {
            Source::Generate
        },
    };
    match add(&args.path.keyring, &config, &request) {
        Ok(n) => match cli_kit::output::print(&format!("{n}\n")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("cannot write to stdout: {e}"), EXIT_FAILURE),
        },
        Err(e) if e.is_token_trouble() => fail(e, EXIT_TOKEN),
        Err(e) => fail(e, EXIT_FAILURE),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with(0)
}

fn runtime_with(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

fn keyring(cmd: KeyringCommand) -> ExitCode {
    // What the command prints on success (a key_id, a KEK number, a listing).
    let result = match cmd {
        KeyringCommand::Init(p) => edit::init(&p.keyring).map(|l| format!("{}\n", l.key_id)),
        KeyringCommand::Rotate(p) => edit::rotate(&p.keyring).map(|l| format!("{}\n", l.key_id)),
        KeyringCommand::Add(args) if args.pkcs11_token.is_some() => return add_pkcs11(args),
        KeyringCommand::Add(args) => {
            if args.module.pkcs11_pin_file.is_some() {
                return fail(
                    "--pkcs11-pin-file needs --pkcs11-token (a KEK in a token)",
                    EXIT_USAGE,
                );
            }
            edit::add(&args.path.keyring).map(|n| format!("{n}\n"))
        }
        KeyringCommand::Promote { path, kek } => {
            edit::promote(&path.keyring, kek).map(|l| format!("{}\n", l.key_id))
        }
        KeyringCommand::Retire { path, kek } => {
            edit::retire(&path.keyring, kek).map(|()| String::new())
        }
        KeyringCommand::List { path, output } => match edit::list(&path.keyring) {
            Err(e) => Err(e),
            Ok(listing) => match output {
                ListFormat::Text => Ok(listing.to_text()),
                // Printing nothing and exiting 0 would read as an empty keyring.
                ListFormat::Json => match listing.to_json() {
                    Ok(json) => Ok(format!("{json}\n")),
                    Err(e) => {
                        return fail(
                            format!("cannot render the keyring listing as JSON: {e}"),
                            EXIT_FAILURE,
                        );
                    }
                },
            },
        },
    };
    match result {
        // A reader that went away (`| head`) ends the program quietly in print.
        Ok(text) => match cli_kit::output::print(&text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("cannot write to stdout: {e}"), EXIT_FAILURE),
        },
        Err(e) => fail(e, EXIT_FAILURE),
    }
}
