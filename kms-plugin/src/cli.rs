//! The command line: clap definitions (raw) and their validated forms.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cli_kit::duration::at_least;
use thiserror::Error;

use crate::serve::ServeConfig;
use crate::socket::SocketAccess;
use kms_client::Endpoint;

pub use cli_kit::logging::LogFormat;

cli_kit::exit_codes! {
    /// What `kms-plugin` exits with (shown in `--help`).
    pub enum Exit {
        /// Done.
        Success = 0 => "success (serve: stopped by SIGTERM/SIGINT after draining; probe: healthy,\n\
                        and with --roundtrip the test value came back under Status's key_id)",
        /// Runtime failure.
        Failure = 1 => "failure (serve: cannot start or failed; probe: unhealthy, unreachable, or the\n\
                        round trip failed;\n\
                        keyring: the file could not be read, edited or written)",
        /// Bad flags.
        Usage = 2 => "usage error",
        /// The PKCS#11 module, token or PIN cannot be used.
        Token = 3 => "the PKCS#11 module, token or PIN cannot be used (a refused PIN is never retried)",
    }
}

/// The shortest `--reload-interval` and `--self-test-interval`: a shorter
/// period would only burn CPU.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The shortest `--grace-period` and probe `--timeout`.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// The shortest `--idle-timeout`: below it, connections between calls of a
/// busy client would be closed and reopened.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// The shortest `--pkcs11-session-wait`.
pub const MIN_SESSION_WAIT: Duration = Duration::from_millis(10);

fn after_help() -> String {
    format!(
        "{}
Logs go to stderr; set ATREST_LOG (e.g. info, debug, kms_plugin=debug) to filter.
Durations are written like 500ms, 10s, 1m30s.
Keys are never taken from the command line: they are generated into the keyring file.",
        Exit::help()
    )
}

/// atrest kms-plugin: a Kubernetes KMS v2 plugin with a local, rotating keyring.
#[derive(Debug, Parser)]
#[command(name = "kms-plugin", version, after_help = after_help())]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, rotate and inspect the keyring file of KEKs.
    #[command(subcommand)]
    Keyring(KeyringCommand),
    /// Serve the KMS v2 gRPC API on a unix socket.
    Serve(ServeArgs),
    /// Call Status on a running plugin; exit 0 only when it is healthy (for pod probes).
    /// With --roundtrip also Encrypt + Decrypt a random test value (any KMS v2 plugin).
    Probe(ProbeArgs),
}

/// `--keyring PATH`.
#[derive(Debug, Args)]
pub struct KeyringPath {
    /// The keyring file.
    #[arg(long, value_name = "PATH")]
    pub keyring: PathBuf,
}

/// `keyring` subcommands. Every edit is atomic, keeps `<PATH>.prev` (0600),
/// and bumps the generation so running plugins pick it up (and refuse
/// rollbacks). A PATH that is a symlink is edited where it leads.
#[derive(Debug, Subcommand)]
pub enum KeyringCommand {
    /// Create a keyring with one primary KEK; refuses to overwrite. Prints its key_id.
    Init(KeyringPath),
    /// Add a new KEK and make it primary; old KEKs stay for decrypt. Prints the new key_id.
    Rotate(KeyringPath),
    /// Add a new decrypt-only KEK (promote it later, once every host has it). Prints its number.
    /// With --pkcs11-token, the KEK is a key in a PKCS#11 token (generated or adopted); the
    /// keyring holds only its reference and public check value.
    Add(AddArgs),
    /// Make KEK N primary; it gets a key_id never used before. Prints that key_id.
    Promote {
        /// `--keyring PATH`.
        #[command(flatten)]
        path: KeyringPath,
        /// The KEK number (see `keyring list`).
        #[arg(long, value_name = "N")]
        kek: u32,
    },
    /// Remove decrypt-only KEK N. Anything still encrypted with it is lost: audit first.
    Retire {
        /// `--keyring PATH`.
        #[command(flatten)]
        path: KeyringPath,
        /// The KEK number (see `keyring list`).
        #[arg(long, value_name = "N")]
        kek: u32,
    },
    /// Show KEK numbers, states, creation times and key_ids (never key bytes).
    List {
        /// `--keyring PATH`.
        #[command(flatten)]
        path: KeyringPath,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Text)]
        output: ListFormat,
    },
}

/// `keyring add` flags.
#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    /// The keyring file.
    pub path: KeyringPath,
    /// Put the KEK in this PKCS#11 token (its label) instead of the keyring file.
    #[arg(long, value_name = "LABEL")]
    pub pkcs11_token: Option<String>,
    /// The token's serial number, when several tokens share the label.
    #[arg(long, value_name = "SERIAL", requires = "pkcs11_token")]
    pub pkcs11_serial: Option<String>,
    /// The key object's label (default for --generate: atrest-kek-<CKA_ID prefix>).
    #[arg(long, value_name = "LABEL", requires = "pkcs11_token")]
    pub pkcs11_key_label: Option<String>,
    /// Generate a new non-extractable AES-256 key in the token (the default).
    #[arg(long, requires = "pkcs11_token", conflicts_with = "adopt")]
    pub generate: bool,
    /// Adopt the existing AES key labelled --pkcs11-key-label.
    #[arg(long, requires_all = ["pkcs11_token", "pkcs11_key_label"])]
    pub adopt: bool,
    #[command(flatten)]
    /// Module and PIN.
    pub module: Pkcs11ModuleArgs,
}

/// The PKCS#11 module and PIN (never on the command line).
#[derive(Debug, Args)]
pub struct Pkcs11ModuleArgs {
    /// The PKCS#11 module (shared library) of the HSM client.
    #[arg(long, value_name = "PATH", env = "ATREST_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// A file holding the token user PIN (else the ATREST_PKCS11_PIN environment variable).
    #[arg(long, value_name = "PATH")]
    pub pkcs11_pin_file: Option<PathBuf>,
}

/// `keyring list --output`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ListFormat {
    /// A table for people.
    Text,
    /// JSON for scripts.
    Json,
}

/// `serve` flags, as typed.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Socket to listen on: /path, unix:///path or unix:///@abstract-name.
    #[arg(
        long,
        value_name = "ENDPOINT",
        default_value = "unix:///var/run/kmsplugin/socket.sock"
    )]
    pub listen: String,
    /// The keyring file (see `kms-plugin keyring init`).
    #[arg(long, value_name = "PATH", default_value = "/etc/atrest/keyring.json")]
    pub keyring: PathBuf,
    /// Serve /metrics, /healthz and /readyz on this loopback address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Permission bits of the socket file, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600")]
    pub socket_mode: String,
    /// Group owning the socket file (name or id).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// How long in-flight calls may take to finish after SIGTERM (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = at_least(MIN_TIMEOUT))]
    pub grace_period: Duration,
    /// How often to poll the keyring file for changes (it is also watched; at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = at_least(MIN_INTERVAL))]
    pub reload_interval: Duration,
    /// How often to run the encrypt/decrypt self-test that feeds healthz (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = at_least(MIN_INTERVAL))]
    pub self_test_interval: Duration,
    /// Close a client connection that has had no call in flight for this long
    /// (clients such as kube-apiserver reconnect by themselves; at least 1s).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = at_least(MIN_IDLE_TIMEOUT))]
    pub idle_timeout: Duration,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Threads answering gRPC calls (0: one per CPU core). One thread serves
    /// tens of thousands of calls a second; more threads cost CPU in wakeups.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub worker_threads: usize,
    /// KEKs kept in a PKCS#11 token.
    #[command(flatten)]
    pub pkcs11: Pkcs11ServeArgs,
}

/// `serve` flags for KEKs kept in a PKCS#11 token.
#[derive(Debug, Args)]
pub struct Pkcs11ServeArgs {
    #[command(flatten)]
    /// Module and PIN.
    pub module: Pkcs11ModuleArgs,
    /// Most token sessions open at once for Encrypt/Decrypt (also the
    /// threads that make those calls). Default: 16 for a hardware slot (a
    /// network or PCIe HSM, whose calls mostly wait on the device: 16 keep
    /// it busy through an apiserver restart, which decrypts every DEK seed at
    /// once, without exhausting its session table when several plugins share
    /// it); one per CPU for a software token (a slot without CKF_HW_SLOT,
    /// e.g. SoftHSM2: its calls compute on this host's CPUs, and more
    /// sessions than CPUs only contend).
    #[arg(long, value_name = "N")]
    pub pkcs11_max_sessions: Option<usize>,
    /// How long a call waits for a free session before failing with RESOURCE_EXHAUSTED
    /// (at least 10ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = at_least(MIN_SESSION_WAIT))]
    pub pkcs11_session_wait: Duration,
}

/// `probe` flags.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Socket of the plugin: /path, unix:///path or unix:///@abstract-name.
    #[arg(
        long,
        value_name = "ENDPOINT",
        default_value = "unix:///var/run/kmsplugin/socket.sock"
    )]
    pub listen: String,
    /// How long to wait for each answer (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = at_least(MIN_TIMEOUT))]
    pub timeout: Duration,
    /// Also Encrypt a random 32-byte test value and Decrypt it: exit 0 only when the
    /// same bytes come back under Status's key_id (the value is never printed).
    #[arg(long)]
    pub roundtrip: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ListFormat::Text)]
    pub output: ListFormat,
}

/// A flag value that does not make sense; names the flag.
#[derive(Debug, Error)]
#[error("invalid value for {flag}: {reason}")]
pub struct FlagError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn flag(flag: &'static str) -> impl Fn(String) -> FlagError {
    move |reason| FlagError { flag, reason }
}

/// Parses an endpoint flag.
pub fn parse_endpoint(name: &'static str, text: &str) -> Result<Endpoint, FlagError> {
    text.parse()
        .map_err(|e: kms_client::EndpointError| flag(name)(e.to_string()))
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = FlagError;

    fn try_from(args: ServeArgs) -> Result<Self, FlagError> {
        let endpoint = parse_endpoint("--listen", &args.listen)?;
        let mode = u32::from_str_radix(args.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                flag("--socket-mode")(format!(
                    "{:?} is not an octal mode like 0600",
                    args.socket_mode
                ))
            })?;
        if matches!(endpoint, Endpoint::Abstract(_))
            && (args.socket_group.is_some() || mode != 0o600)
        {
            return Err(flag("--socket-mode/--socket-group")(
                "abstract sockets have no file, so no mode or group".into(),
            ));
        }
        let metrics_addr = match args.metrics_addr {
            None => None,
            Some(text) => {
                let addr: SocketAddr = text
                    .parse()
                    .map_err(|_| flag("--metrics-addr")(format!("{text:?} is not IP:PORT")))?;
                if !addr.ip().is_loopback() {
                    return Err(flag("--metrics-addr")(format!(
                        "{addr} is not a loopback address; metrics are served on loopback only"
                    )));
                }
                Some(addr)
            }
        };
        Ok(ServeConfig {
            endpoint,
            keyring: args.keyring,
            metrics_addr,
            socket: SocketAccess {
                mode,
                group: args.socket_group,
            },
            grace_period: args.grace_period,
            reload_interval: args.reload_interval,
            self_test_interval: args.self_test_interval,
            idle_timeout: args.idle_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["kms-plugin", "serve", "--keyring", "/k.json"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Serve(a) => ServeConfig::try_from(a).map_err(|e| e.to_string()),
            _ => Err("not serve".into()),
        }
    }

    #[test]
    fn defaults_are_sensible() {
        let c = args(&[]).unwrap();
        assert_eq!(
            c.endpoint,
            Endpoint::Path("/var/run/kmsplugin/socket.sock".into())
        );
        assert_eq!(c.socket.mode, 0o600);
        assert_eq!(c.grace_period, Duration::from_secs(10));
        assert!(c.metrics_addr.is_none());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (extra, flag) in [
            (&["--listen", "tcp://x:1"][..], "--listen"),
            (&["--socket-mode", "0999"][..], "--socket-mode"),
            (&["--metrics-addr", "0.0.0.0:9464"][..], "--metrics-addr"),
            (&["--metrics-addr", "nope"][..], "--metrics-addr"),
            (&["--grace-period", "0s"][..], "--grace-period"),
            (&["--reload-interval", "soon"][..], "--reload-interval"),
            (&["--self-test-interval", "1ns"][..], "--self-test-interval"),
            (&["--reload-interval", "99ms"][..], "--reload-interval"),
            (
                &["--listen", "unix:///@x", "--socket-group", "0"][..],
                "--socket-group",
            ),
        ] {
            let err = args(extra).unwrap_err();
            assert!(err.contains(flag), "{err} should name {flag}");
        }
        assert_eq!(args(&["--socket-mode", "0660"]).unwrap().socket.mode, 0o660);
    }

    #[test]
    fn help_lists_every_exit_code() {
        use clap::CommandFactory as _;
        let help = Cli::command().render_long_help().to_string();
        assert_eq!(Exit::missing_from(&help), Vec::<Exit>::new(), "{help}");
    }
}
