//! Command-line flags of the stand-in: a clap struct ([`Args`]) and the
//! validated [`Config`] built from it before anything is bound or dialed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cli_kit::duration::at_least;

use super::resources::ServedResource;

/// `kube-apiserver-standin`: flags named after kube-apiserver's where one exists.
#[derive(Debug, Parser)]
#[command(
    name = "kube-apiserver-standin",
    version,
    about = "A stand-in for kube-apiserver, for tests only (kube-apiserver cannot run on the test machines).",
    long_about = "A stand-in for kube-apiserver, for tests only. It serves only what atrest's rotator \
uses: discovery for the configured core/v1 resources, list/get/create/update/delete of those \
objects with resourceVersion and conflict semantics, /metrics (the encryption-config and KMS \
metrics of kube-apiserver), /readyz and /healthz. Objects are stored in a real etcd through \
atrest's storage-encryption library exactly as kube-apiserver stores them (same keys, prefixes, \
AAD and stale rules), except that the object bytes are JSON where kube-apiserver writes protobuf \
for built-in types (encryption does not depend on the encoding). Plain HTTP only; not for \
production.\n\nHTTP (JSON, Kubernetes wire shapes): GET /api, /api/v1, /apis, /version (discovery, also \
aggregated v2); GET /api/v1/{resource}?limit=&continue=; GET|POST \
/api/v1/namespaces/{ns}/{resource}; GET|PUT|DELETE /api/v1/namespaces/{ns}/{resource}/{name}; \
GET /metrics, /readyz, /healthz, /livez. resourceVersion = etcd mod revision; a PUT with a \
stale one is 409 Conflict; failures are Status objects.\n\nExit codes: 0 after SIGTERM/SIGINT, 1 runtime failure (bad config file, bind or \
etcd failure), 2 usage error."
)]
pub struct Args {
    /// Plain-HTTP address to listen on; port 0 picks a free port. The first stdout line is
    /// always `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// etcd client URLs, comma-separated (a real etcd).
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of every object in etcd (kube-apiserver's `--etcd-prefix`).
    #[arg(long, default_value = storage_encryption::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// EncryptionConfiguration file. Without it nothing is encrypted (identity).
    #[arg(long)]
    pub encryption_provider_config: Option<PathBuf>,

    /// Poll the config file (by content hash) every --config-reload-interval and apply a
    /// changed, valid one whose KMS plugins are healthy. Without it the file is read once
    /// at start (restart the stand-in to apply a change).
    #[arg(long)]
    pub encryption_provider_config_automatic_reload: bool,

    /// How often the file is polled with automatic reload (kube-apiserver: every minute; at least 100ms).
    #[arg(long, default_value = "1s", value_parser = at_least(Duration::from_millis(100)))]
    pub config_reload_interval: Duration,

    /// Fault: apply a changed config only this long after first seeing it (a slow apiserver).
    #[arg(long, default_value = "0s", value_parser = at_least(Duration::ZERO))]
    pub reload_delay: Duration,

    /// This apiserver's identity; metrics carry `apiserver_id_hash="sha256:<hex(sha256(NAME))>"`.
    #[arg(long, default_value = "kube-apiserver-standin")]
    pub apiserver_id: String,

    /// How often each KMS v2 plugin's Status is called (kube-apiserver: 60 s; at least 100ms).
    #[arg(long, default_value = "1s", value_parser = at_least(Duration::from_millis(100)))]
    pub kms_status_interval: Duration,

    /// Require `Authorization: Bearer TOKEN` on every request except /healthz, /readyz,
    /// /livez and /version.
    #[arg(long, env = "KUBE_APISERVER_STANDIN_TOKEN", hide_env_values = true)]
    pub token: Option<BearerToken>,

    /// Fault: answer every Nth PUT with 409 Conflict (0 = off).
    #[arg(long, default_value_t = 0)]
    pub fault_conflict_every: u64,

    /// Fault: answer every Nth request with 429 and `Retry-After: 1` (0 = off). Health
    /// probes and /metrics are not counted.
    #[arg(long, default_value_t = 0)]
    pub fault_throttle_every: u64,

    /// Which namespaced core/v1 resources to serve, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "secrets,configmaps")]
    pub resources: Vec<String>,

    /// Behave like kube-apiserver before 1.34: no
    /// `apiserver_encryption_config_controller_last_config_info` metric.
    #[arg(long)]
    pub without_config_hash_metric: bool,
}

/// The `--token` value; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// True when `header` is exactly `Bearer <token>`.
    pub fn matches_header(&self, header: &str) -> bool {
        header.strip_prefix("Bearer ") == Some(self.0.as_str())
    }
}

impl std::str::FromStr for BearerToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Validated settings; tests may build one directly.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix, without a trailing `/`.
    pub etcd_prefix: String,
    /// EncryptionConfiguration file, if any.
    pub encryption_config: Option<PathBuf>,
    /// Poll the file for changes.
    pub automatic_reload: bool,
    /// Poll period.
    pub reload_interval: Duration,
    /// Delay before a changed file is applied.
    pub reload_delay: Duration,
    /// Identity (hashed in metric labels).
    pub apiserver_id: String,
    /// KMS Status poll period.
    pub kms_status_interval: Duration,
    /// Bearer token required, if any.
    pub token: Option<BearerToken>,
    /// Every Nth PUT gets 409 (0 = off).
    pub fault_conflict_every: u64,
    /// Every Nth request gets 429 (0 = off).
    pub fault_throttle_every: u64,
    /// Served resources.
    pub resources: Vec<ServedResource>,
    /// Export the config hash metric (kube-apiserver 1.34+).
    pub config_hash_metric: bool,
}

/// A flag value that is not acceptable.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct FlagError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

impl TryFrom<Args> for Config {
    type Error = FlagError;

    fn try_from(args: Args) -> Result<Self, FlagError> {
        let bad = |flag, message: String| FlagError { flag, message };
        let etcd_endpoints: Vec<String> = args
            .etcd_endpoints
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if etcd_endpoints.is_empty() {
            return Err(bad("etcd-endpoints", "at least one URL is required".into()));
        }
        if let Some(e) = etcd_endpoints
            .iter()
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return Err(bad(
                "etcd-endpoints",
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        }
        let etcd_prefix = args.etcd_prefix.trim_end_matches('/').to_owned();
        if !etcd_prefix.starts_with('/') {
            return Err(bad(
                "etcd-prefix",
                format!("{:?} must start with '/'", args.etcd_prefix),
            ));
        }
        for (flag, d) in [
            ("config-reload-interval", args.config_reload_interval),
            ("kms-status-interval", args.kms_status_interval),
        ] {
            if d.is_zero() {
                return Err(bad(flag, "must be greater than 0".into()));
            }
        }
        if args.apiserver_id.is_empty() {
            return Err(bad("apiserver-id", "must not be empty".into()));
        }
        if args.token.as_ref().is_some_and(|t| t.0.is_empty()) {
            return Err(bad("token", "must not be empty".into()));
        }
        if args.encryption_provider_config_automatic_reload
            && args.encryption_provider_config.is_none()
        {
            return Err(bad(
                "encryption-provider-config-automatic-reload",
                "needs --encryption-provider-config".into(),
            ));
        }
        let mut resources: Vec<ServedResource> = Vec::new();
        for name in args.resources.iter().map(|r| r.trim()) {
            let served = ServedResource::core_v1(name)
                .ok_or_else(|| bad("resources", super::resources::unknown(name)))?;
            if resources.iter().any(|r| r.name == served.name) {
                return Err(bad("resources", format!("{name:?} is listed twice")));
            }
            resources.push(served);
        }
        if resources.is_empty() {
            return Err(bad("resources", "at least one resource is required".into()));
        }
        Ok(Config {
            listen: args.listen,
            etcd_endpoints,
            etcd_prefix,
            encryption_config: args.encryption_provider_config,
            automatic_reload: args.encryption_provider_config_automatic_reload,
            reload_interval: args.config_reload_interval,
            reload_delay: args.reload_delay,
            apiserver_id: args.apiserver_id,
            kms_status_interval: args.kms_status_interval,
            token: args.token,
            fault_conflict_every: args.fault_conflict_every,
            fault_throttle_every: args.fault_throttle_every,
            resources,
            config_hash_metric: !args.without_config_hash_metric,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, FlagError> {
        let mut argv = vec![
            "kube-apiserver-standin",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.etcd_prefix, "/registry");
        assert_eq!(c.reload_interval, Duration::from_secs(1));
        let names: Vec<&str> = c.resources.iter().map(|r| r.name).collect();
        assert_eq!(names, ["secrets", "configmaps"]);
    }

    #[test]
    fn debug_does_not_show_the_token() {
        let c = parse(&["--token", "sekrit-token-value"]).unwrap();
        assert!(c.token.unwrap().matches_header("Bearer sekrit-token-value"));
        let c = parse(&["--token", "sekrit-token-value"]).unwrap();
        assert!(!format!("{c:?}").contains("sekrit"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--resources", "secrets,nodes"]).unwrap_err();
        assert_eq!(e.flag, "resources");
        assert!(e.to_string().contains("nodes"), "{e}");
        // Intervals below their minimum are refused by clap (exit 2), naming the flag.
        let e = Args::try_parse_from([
            "kube-apiserver-standin",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--kms-status-interval",
            "1ns",
        ])
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--kms-status-interval"), "{e}");
        let e = parse(&["--encryption-provider-config-automatic-reload"]).unwrap_err();
        assert_eq!(e.flag, "encryption-provider-config-automatic-reload");
    }
}
