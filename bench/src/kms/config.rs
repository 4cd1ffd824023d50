//! Command-line flags (raw, clap) and the validated [`Config`] built from them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use cli_kit::duration::at_least;

use super::load::Method;
use kms_client::{Endpoint, EndpointError};

/// The plugin binary's file name, looked for beside `kms-loadgen`.
const PLUGIN_BIN_NAME: &str = "kms-plugin";

/// Raw flags of `kms-loadgen`.
#[derive(Debug, Parser)]
#[command(
    name = "kms-loadgen",
    version,
    about = "Drive a real kms-plugin over its unix socket like kube-apiserver does \
             (one HTTP/2 connection, many concurrent callers) and print latency \
             percentiles and the plugin's CPU time per call as a Markdown table.",
    after_help = "By default the plugin binary beside this executable (target/<profile>/kms-plugin) \
                  is started in a temp dir with a fresh keyring and stopped afterwards. Every \
                  cell ends by itself (--duration or --max-calls, each call within \
                  --call-timeout; the burst within 30 s).\n\n\
                  Exit codes: 0 the benchmark ran (targets missed or not); 1 a call failed or \
                  the plugin could not be started/stopped; 2 usage error."
)]
pub struct Args {
    /// kms-plugin binary to start (default: the one beside this executable).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["listen", "plugin_pid"])]
    pub plugin_bin: Option<PathBuf>,

    /// Attach to a running plugin on this endpoint (`/path`, `unix:///path`, `unix:///@abstract`).
    #[arg(long, value_name = "ENDPOINT", requires = "plugin_pid")]
    pub listen: Option<String>,

    /// Process id of the attached plugin (its CPU time is read from /proc/PID/stat).
    #[arg(long, value_name = "PID", requires = "listen")]
    pub plugin_pid: Option<u32>,

    /// The attached plugin's `--metrics-addr`: each row then splits plugin CPU
    /// into the time inside the PKCS#11 module (the plugin's
    /// atrest_kms_pkcs11_module_cpu_seconds_total) and ours. An error when the
    /// plugin serves no token KEK.
    #[arg(long, value_name = "IP:PORT", requires = "listen")]
    pub plugin_metrics: Option<std::net::SocketAddr>,

    /// Measured time per cell (method × callers), e.g. `3s`, `500ms` (at least 10ms).
    #[arg(long, default_value = "3s", value_parser = at_least(Duration::from_millis(10)))]
    pub duration: Duration,

    /// Unmeasured warm-up before each cell (`0` for none).
    #[arg(long, default_value = "500ms", value_parser = at_least(Duration::ZERO))]
    pub warmup: Duration,

    /// Upper bound on measured calls per cell (the cell ends at this count or at --duration).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_calls: u64,

    /// Concurrent callers per cell, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub callers: Vec<usize>,

    /// Methods to measure, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "status,encrypt,decrypt"
    )]
    pub methods: Vec<Method>,

    /// Decrypt calls in the restart burst (distinct ciphertexts); 0 skips the burst.
    #[arg(long, default_value_t = 10_000)]
    pub burst_calls: usize,

    /// Concurrent callers in the restart burst.
    #[arg(long, default_value_t = 100)]
    pub burst_callers: usize,

    /// Plaintext size in bytes (kube-apiserver sends 32-byte DEK seeds).
    #[arg(long, default_value_t = 32)]
    pub plaintext_size: usize,

    /// Per-call deadline, like kube-apiserver's per-provider `timeout` (at least 10ms).
    #[arg(long, default_value = "3s", value_parser = at_least(Duration::from_millis(10)))]
    pub call_timeout: Duration,

    /// How long to wait for a started plugin to report healthy (at least 100ms).
    #[arg(long, default_value = "15s", value_parser = at_least(Duration::from_millis(100)))]
    pub startup_timeout: Duration,
}

/// Where the plugin under test comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// Start this binary (keyring init + serve in a temp dir), stop it after.
    Spawn { bin: PathBuf },
    /// Use a plugin that is already running.
    Attach { endpoint: Endpoint, pid: u32 },
}

/// Validated settings of one `kms-loadgen` run.
#[derive(Debug, Clone)]
pub struct Config {
    pub plugin: PluginSource,
    pub duration: Duration,
    pub warmup: Duration,
    pub max_calls: u64,
    pub callers: Vec<usize>,
    pub methods: Vec<Method>,
    pub burst_calls: usize,
    pub burst_callers: usize,
    pub plaintext_size: usize,
    pub call_timeout: Duration,
    pub startup_timeout: Duration,
    /// The plugin's metrics listener, to split its CPU (`--plugin-metrics`).
    pub module_metrics: Option<std::net::SocketAddr>,
}

/// A flag value that cannot be used; each names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("--listen: {0}")]
    Endpoint(#[from] EndpointError),
    #[error(
        "no {PLUGIN_BIN_NAME} binary beside {}: build it (`cargo build --release -p kms-plugin`) or pass --plugin-bin PATH",
        loadgen.display()
    )]
    PluginNotFound { loadgen: PathBuf },
    #[error("--plugin-bin {}: not a file", path.display())]
    PluginBinMissing { path: PathBuf },
    #[error(
        "cannot locate kms-loadgen's own executable to find kms-plugin beside it: {0}; pass --plugin-bin PATH"
    )]
    CurrentExe(std::io::Error),
}

/// Upper bound on callers: each is a task holding one in-flight stream.
const MAX_CALLERS: usize = 10_000;
/// Largest plaintext the KMS v2 contract lets a plugin accept (ciphertext <= 1024 bytes).
const MAX_PLAINTEXT: usize = 1024;

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let mut config = Config {
            // Resolved below, once the numbers are known to be fine: a bad
            // number is reported even when no plugin binary is around.
            plugin: PluginSource::Spawn {
                bin: PathBuf::new(),
            },
            duration: args.duration,
            warmup: args.warmup,
            max_calls: args.max_calls,
            callers: args.callers,
            methods: args.methods,
            burst_calls: args.burst_calls,
            burst_callers: args.burst_callers,
            plaintext_size: args.plaintext_size,
            call_timeout: args.call_timeout,
            startup_timeout: args.startup_timeout,
            module_metrics: args.plugin_metrics,
        };
        config.validate()?;
        config.plugin = resolve_plugin(args.listen, args.plugin_pid, args.plugin_bin)?;
        Ok(config)
    }
}

fn resolve_plugin(
    listen: Option<String>,
    pid: Option<u32>,
    bin: Option<PathBuf>,
) -> Result<PluginSource, ConfigError> {
    match (listen, pid, bin) {
        (Some(_), Some(0), _) => Err(invalid("plugin-pid", "must be a process id > 0")),
        (Some(listen), Some(pid), _) => Ok(PluginSource::Attach {
            endpoint: listen.parse()?,
            pid,
        }),
        (Some(_), None, _) | (None, Some(_), _) => {
            Err(invalid("listen", "--listen and --plugin-pid go together"))
        }
        (None, None, Some(bin)) if !bin.is_file() => {
            Err(ConfigError::PluginBinMissing { path: bin })
        }
        (None, None, Some(bin)) => Ok(PluginSource::Spawn { bin }),
        (None, None, None) => {
            let loadgen = std::env::current_exe().map_err(ConfigError::CurrentExe)?;
            Ok(PluginSource::Spawn {
                bin: plugin_beside(&loadgen)?,
            })
        }
    }
}

impl Config {
    /// Checks the numbers; [`Config::try_from`] calls it, tests may too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.duration.is_zero() {
            return Err(invalid("duration", "must be > 0"));
        }
        if self.max_calls == 0 {
            return Err(invalid("max-calls", "must be >= 1"));
        }
        if self.callers.is_empty() {
            return Err(invalid("callers", "give at least one count"));
        }
        if let Some(bad) = self.callers.iter().find(|&&n| n == 0 || n > MAX_CALLERS) {
            return Err(invalid(
                "callers",
                format!("{bad} is not in 1..={MAX_CALLERS}"),
            ));
        }
        if self.methods.is_empty() {
            return Err(invalid("methods", "give at least one method"));
        }
        if self.burst_calls > 0 && !(1..=MAX_CALLERS).contains(&self.burst_callers) {
            return Err(invalid(
                "burst-callers",
                format!("{} is not in 1..={MAX_CALLERS}", self.burst_callers),
            ));
        }
        if !(1..=MAX_PLAINTEXT).contains(&self.plaintext_size) {
            return Err(invalid(
                "plaintext-size",
                format!("{} is not in 1..={MAX_PLAINTEXT}", self.plaintext_size),
            ));
        }
        if self.call_timeout.is_zero() {
            return Err(invalid("call-timeout", "must be > 0"));
        }
        if self.startup_timeout.is_zero() {
            return Err(invalid("startup-timeout", "must be > 0"));
        }
        Ok(())
    }
}

/// `target/<profile>/kms-loadgen` → `target/<profile>/kms-plugin`, if it exists.
fn plugin_beside(loadgen: &Path) -> Result<PathBuf, ConfigError> {
    let candidate = loadgen
        .parent()
        .map(|dir| dir.join(PLUGIN_BIN_NAME))
        .filter(|p| p.is_file());
    candidate.ok_or_else(|| ConfigError::PluginNotFound {
        loadgen: loadgen.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["kms-loadgen"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn durations_use_the_shared_grammar_with_minimums() {
        assert_eq!(
            args(&["--duration", "1.5s"]).duration,
            Duration::from_millis(1500)
        );
        assert_eq!(args(&["--warmup", "0"]).warmup, Duration::ZERO);
        for bad in [
            &["--duration", "1ns"][..],
            &["--duration", "3"],
            &["--call-timeout", "1us"],
            &["--startup-timeout", "1ms"],
        ] {
            let mut argv = vec!["kms-loadgen"];
            argv.extend_from_slice(bad);
            let e = Args::try_parse_from(argv).unwrap_err();
            assert!(e.to_string().contains(bad[0]), "{bad:?}: {e}");
        }
    }

    #[test]
    fn defaults_match_the_issue() {
        let a = args(&["--plugin-bin", "/bin/sh"]);
        assert_eq!(a.callers, vec![1, 16, 64]);
        assert_eq!(
            a.methods,
            vec![Method::Status, Method::Encrypt, Method::Decrypt]
        );
        assert_eq!(a.duration, Duration::from_secs(3));
        assert_eq!(
            (a.burst_calls, a.burst_callers, a.plaintext_size),
            (10_000, 100, 32)
        );
        let c = Config::try_from(a).unwrap();
        assert_eq!(
            c.plugin,
            PluginSource::Spawn {
                bin: "/bin/sh".into()
            }
        );
    }

    #[test]
    fn attach_needs_listen_and_pid_together() {
        assert!(Args::try_parse_from(["kms-loadgen", "--listen", "/run/k.sock"]).is_err());
        assert!(Args::try_parse_from(["kms-loadgen", "--plugin-pid", "7"]).is_err());
        assert!(
            Args::try_parse_from([
                "kms-loadgen",
                "--listen",
                "/run/k.sock",
                "--plugin-pid",
                "7",
                "--plugin-bin",
                "/bin/sh"
            ])
            .is_err()
        );
        let c = Config::try_from(args(&["--listen", "unix:///@kms", "--plugin-pid", "7"])).unwrap();
        assert_eq!(
            c.plugin,
            PluginSource::Attach {
                endpoint: Endpoint::Abstract("kms".into()),
                pid: 7
            }
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: [(&[&str], &str); 4] = [
            (&["--callers", "1,0"], "--callers"),
            (&["--plaintext-size", "0"], "--plaintext-size"),
            (&["--max-calls", "0"], "--max-calls"),
            (&["--burst-callers", "0"], "--burst-callers"),
        ];
        for (extra, flag) in cases {
            let mut all = vec!["--plugin-bin", "/bin/sh"];
            all.extend_from_slice(extra);
            let err = Config::try_from(args(&all)).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{extra:?}: {err}");
        }
    }

    #[test]
    fn missing_plugin_binary_is_named() {
        let err = Config::try_from(args(&["--plugin-bin", "/nonexistent/kms-plugin"])).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kms-plugin"), "{err}");
        let err = plugin_beside(Path::new("/nonexistent/dir/kms-loadgen")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cargo build --release -p kms-plugin"),
            "{err}"
        );
    }
}
