//! Command-line flags (clap) and their validation into [`Settings`].
//!
//! Everything a user can get wrong on the command line is refused here,
//! before etcd or a KMS plugin is contacted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use cli_kit::duration::at_least;

use crate::etcd::EtcdConnection;
use crate::record::Finding;
use crate::scan::ScanOptions;

cli_kit::exit_codes! {
    /// What `etcd-inspect` exits with (shown in `--help` and the README).
    pub enum Exit {
        /// Nothing in `--fail-on` was found.
        Clean = 0 => "clean: no finding in --fail-on",
        /// At least one finding in `--fail-on`.
        Findings = 1 => "findings: at least one key has a finding in --fail-on",
        /// Nothing (more) could be judged.
        Error = 2 => "usage, config, connection or KMS plugin error, or an audit that judged no value\n\
                      (an empty prefix, or no key mapped to a resource): nothing was judged,\n\
                      or nothing past the last key named in the message",
    }
}

/// The shortest `--dial-timeout` and `--command-timeout`.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

fn after_help() -> String {
    format!("{}\n{FINDINGS_HELP}", Exit::help())
}

/// The findings and JSON shape, shown in `--help` after the exit codes.
const FINDINGS_HELP: &str = "\
Findings (with --config):
  ok              stored as the first provider (and its first key) of the matching entry
  plaintext       not encrypted, but the config expects encryption
  stale           encrypted with a provider or key of the config that is not first: rewrite it
  kms-key-stale   KMS v2 keyID is not the plugin's current key_id: rewrite before retiring the KEK
  unreadable      provider or key not in the config at all: data at risk
  undecodable     garbage, truncated, or an invalid encrypted envelope
  decrypt-failed  --decrypt-check could not decrypt it with the config's keys or the plugin
  unmapped        the key maps to no resource below --etcd-prefix: not judged (fail closed)

--output json writes one JSON document, streamed while scanning:
  {\"prefix\":..,\"revision\":..,\"records\":[{\"key\":..,\"resource\":..,\"namespace\":..,\"name\":..,
   \"provider\":..,\"provider_name\":..,\"key_name\":..,\"key_id\":..,\"finding\":..},..],
   \"needs\":[{\"provider\":..,\"key_name\":..,\"key_id\":..,\"fingerprints\":[..],\"values\":..},..],\"summary\":{..}}
Plaintext and keys are never printed.";

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A summary table for people.
    Table,
    /// One record per key plus the summary, streamed.
    Json,
    /// JUnit XML for CI systems.
    Junit,
}

/// Audit kube-apiserver's etcd: classify every stored value and check it
/// against an EncryptionConfiguration. Read-only.
#[derive(Debug, Parser)]
#[command(name = "etcd-inspect", version, after_help = after_help())]
pub struct Args {
    /// etcd endpoints, comma-separated or repeated (like etcdctl).
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// CA bundle (PEM) to verify etcd's server certificate.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's client-cert auth.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Client private key (PEM) for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Time allowed to connect to etcd (e.g. 5s, 500ms; at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = at_least(MIN_TIMEOUT))]
    pub dial_timeout: Duration,

    /// Time allowed for each etcd page read or KMS call (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = at_least(MIN_TIMEOUT))]
    pub command_timeout: Duration,

    /// kube-apiserver's --etcd-prefix: keys are mapped to resources below it
    /// [default: /registry; a --prefix outside it]
    #[arg(long, value_name = "PREFIX", global = true)]
    pub etcd_prefix: Option<String>,

    /// Key prefix to scan [default: the --etcd-prefix].
    #[arg(long, value_name = "PREFIX", global = true)]
    pub prefix: Option<String>,

    /// Keys per etcd range request [default: as many as fit a 4 MiB page].
    /// Larger: fewer round trips, more memory; smaller: the reverse.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub page_size: Option<i64>,

    /// kube-apiserver EncryptionConfiguration to audit against.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Reach KMS provider NAME at ENDPOINT instead of the config's endpoint (repeatable).
    #[arg(long, value_name = "NAME=ENDPOINT", requires = "config", global = true)]
    pub kms_endpoint: Vec<String>,

    /// Take KMS v2 provider NAME's current key_id as given instead of calling Status (repeatable).
    #[arg(long, value_name = "NAME=KEY_ID", requires = "config", global = true)]
    pub kms_key_id: Vec<String>,

    /// Decrypt every value with the config's keys (KMS v2 seeds through the plugin); plaintext is never shown.
    #[arg(long, requires = "config", global = true)]
    pub decrypt_check: bool,

    /// Findings that fail the run (exit 1), comma-separated, or `none`.
    #[arg(
        long,
        value_name = "FINDINGS",
        default_value = "plaintext,unreadable,undecodable,decrypt-failed,unmapped",
        global = true
    )]
    pub fail_on: String,

    /// Report format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    pub output: OutputFormat,

    /// Print only what the values need to be read back (for a backup
    /// catalogue): provider, key name and a fingerprint of the key from
    /// --config (never the key), KMS v2 key_ids, KMS v1 provider names.
    /// Exit 0 when listed (2 on error or when no key is under the prefix).
    #[arg(long, global = true)]
    pub needs: bool,

    /// Judge every revision still stored (history since the last
    /// compaction, tombstones listed), not only the latest: in a snapshot
    /// file, or live (`--history`, read with a watch of the whole key space
    /// from the compaction revision). Old plaintext revisions are findings.
    #[arg(long, visible_alias = "history", global = true)]
    pub all_revisions: bool,

    /// With `snapshot FILE`: look for unencrypted Kubernetes objects in the
    /// file's freed and unused pages (counts, kinds and page numbers only).
    /// Exit 1 when some are found.
    #[arg(long, global = true)]
    pub free_pages: bool,

    /// Audit something other than a live etcd.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands (without one, the live etcd at --endpoints is scanned).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Audit an etcd snapshot file or a stopped member's db, offline.
    ///
    /// FILE is an `etcdctl snapshot save` file (its appended SHA-256 is
    /// checked) or a stopped member's `member/snap/db`, read directly and
    /// read-only at its latest revision: same flags, records, reports and
    /// exit codes as the live scan. A torn, truncated or foreign file exits 2.
    Snapshot {
        /// The snapshot file or bolt database.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Where the values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The live etcd at `--endpoints`.
    Live,
    /// A snapshot file or a member's bolt database.
    Snapshot(PathBuf),
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Live etcd or a snapshot file.
    pub source: Source,
    /// How to reach etcd.
    pub etcd: EtcdConnection,
    /// kube-apiserver's etcd prefix (no trailing `/`): `--etcd-prefix`, or
    /// the first of `etcd_prefixes`.
    pub etcd_prefix: String,
    /// The apiserver prefixes tried, in order, to map a key to a resource:
    /// just `etcd_prefix`, or ancestors of a `--prefix` outside `/registry`.
    pub etcd_prefixes: Vec<String>,
    /// Scan prefix.
    pub prefix: String,
    /// How the scan sizes its pages (`--page-size` or the byte budget).
    pub scan: ScanOptions,
    /// Config to audit against.
    pub config: Option<PathBuf>,
    /// KMS provider name -> endpoint overrides.
    pub kms_endpoints: BTreeMap<String, String>,
    /// KMS v2 provider name -> current key_id given on the command line.
    pub kms_key_ids: BTreeMap<String, String>,
    /// Timeout of KMS calls (when the config gives none).
    pub kms_timeout: Duration,
    /// Decrypt every value.
    pub decrypt_check: bool,
    /// Findings that fail the run.
    pub fail_on: BTreeSet<Finding>,
    /// Report format.
    pub output: OutputFormat,
    /// `--needs`: print what the values need instead of the audit.
    pub needs: bool,
    /// `--all-revisions` / `--history`: every stored revision.
    pub all_revisions: bool,
    /// `--free-pages` (snapshot only): scan free pages instead of auditing.
    pub free_pages: bool,
}

/// A flag value that is wrong; names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct UsageError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

fn usage(flag: &'static str, message: impl Into<String>) -> UsageError {
    UsageError {
        flag,
        message: message.into(),
    }
}

impl TryFrom<Args> for Settings {
    type Error = UsageError;

    fn try_from(a: Args) -> Result<Self, UsageError> {
        let endpoints: Vec<String> = a
            .endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(usage("--endpoints", "at least one endpoint is needed"));
        }
        for e in &endpoints {
            if let Some((scheme, _)) = e.split_once("://")
                && scheme != "http"
                && scheme != "https"
            {
                return Err(usage(
                    "--endpoints",
                    format!("{e:?}: scheme must be http or https"),
                ));
            }
        }
        for (flag, path) in [
            ("--cacert", &a.cacert),
            ("--cert", &a.cert),
            ("--key", &a.key),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(usage(
                    flag,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        let (etcd_prefixes, prefix) = resolve_prefixes(a.etcd_prefix.as_deref(), a.prefix)?;
        let etcd_prefix = etcd_prefixes
            .first()
            .cloned()
            .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_owned());
        let fail_on = parse_fail_on(&a.fail_on).map_err(|m| usage("--fail-on", m))?;
        let kms_endpoints = parse_pairs(&a.kms_endpoint).map_err(|m| usage("--kms-endpoint", m))?;
        for (name, ep) in &kms_endpoints {
            crate::kms::parse_endpoint(ep)
                .map_err(|e| usage("--kms-endpoint", format!("{name}: {e}")))?;
        }
        let kms_key_ids = parse_pairs(&a.kms_key_id).map_err(|m| usage("--kms-key-id", m))?;
        if a.free_pages && a.command.is_none() {
            return Err(usage(
                "--free-pages",
                "reads a snapshot file: etcd-inspect snapshot FILE --free-pages",
            ));
        }
        let source = match a.command {
            None => Source::Live,
            Some(Command::Snapshot { file }) => {
                if !file.is_file() {
                    return Err(usage(
                        "snapshot FILE",
                        format!("{} is not a readable file", file.display()),
                    ));
                }
                Source::Snapshot(file)
            }
        };
        Ok(Settings {
            source,
            etcd: EtcdConnection {
                endpoints,
                cacert: a.cacert,
                cert: a.cert,
                key: a.key,
                dial_timeout: a.dial_timeout,
                command_timeout: a.command_timeout,
            },
            etcd_prefix,
            etcd_prefixes,
            prefix,
            scan: a
                .page_size
                .map_or_else(ScanOptions::default, ScanOptions::keys),
            config: a.config,
            kms_endpoints,
            kms_key_ids,
            kms_timeout: Duration::from_secs(3),
            decrypt_check: a.decrypt_check,
            fail_on,
            output: a.output,
            needs: a.needs,
            all_revisions: a.all_revisions,
            free_pages: a.free_pages,
        })
    }
}

/// kube-apiserver's default `--etcd-prefix`.
pub const DEFAULT_ETCD_PREFIX: &str = "/registry";

/// Decides the apiserver prefixes keys are mapped below, and the scan
/// prefix. Without `--etcd-prefix`, a `--prefix` outside `/registry` says
/// where the apiserver's prefix is (an apiserver run with
/// `--etcd-prefix=/wild` stores `/wild/secrets/...`): each of its ancestors,
/// shortest first, is tried per key (`/wild/secrets/ns1` → `/wild`,
/// `/wild/secrets`, `/wild/secrets/ns1`). Keys that still map to no
/// resource become `unmapped` findings whose detail names `--etcd-prefix`.
fn resolve_prefixes(
    etcd_prefix: Option<&str>,
    prefix: Option<String>,
) -> Result<(Vec<String>, String), UsageError> {
    let given = etcd_prefix.is_some();
    let raw = etcd_prefix.unwrap_or(DEFAULT_ETCD_PREFIX);
    let etcd_prefix = raw.trim_end_matches('/').to_owned();
    if !etcd_prefix.starts_with('/') {
        return Err(usage("--etcd-prefix", format!("{raw:?} must start with /")));
    }
    let Some(prefix) = prefix else {
        return Ok((vec![etcd_prefix.clone()], etcd_prefix));
    };
    if prefix.is_empty() {
        return Err(usage("--prefix", "must not be empty"));
    }
    let under = prefix == etcd_prefix || prefix.starts_with(&format!("{etcd_prefix}/"));
    if given || under || !prefix.starts_with('/') {
        return Ok((vec![etcd_prefix], prefix));
    }
    let trimmed = prefix.trim_end_matches('/');
    let ancestors: Vec<String> = trimmed
        .match_indices('/')
        .map(|(i, _)| &trimmed[..i])
        .filter(|a| !a.is_empty())
        .chain(std::iter::once(trimmed))
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if ancestors.is_empty() {
        return Ok((vec![etcd_prefix], prefix));
    }
    Ok((ancestors, prefix))
}

/// Parses `--fail-on`: comma-separated finding names, or `none`.
pub fn parse_fail_on(s: &str) -> Result<BTreeSet<Finding>, String> {
    if s.trim() == "none" {
        return Ok(BTreeSet::new());
    }
    let set: BTreeSet<Finding> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if set.contains(&Finding::Ok) {
        return Err("`ok` cannot fail a run".into());
    }
    if set.is_empty() {
        return Err("give finding names, or `none`".into());
    }
    Ok(set)
}

fn parse_pairs(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for item in items {
        let (name, value) = item
            .split_once('=')
            .filter(|(n, v)| !n.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("{item:?} is not NAME=VALUE"))?;
        if map.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(format!("{name} given twice"));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let a = Args::try_parse_from(std::iter::once("etcd-inspect").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Settings::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.etcd.endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(s.prefix, "/registry");
        assert_eq!(s.etcd_prefix, "/registry");
        assert_eq!(s.output, OutputFormat::Table);
        assert_eq!(s.fail_on, Finding::DEFAULT_FAIL_ON.into_iter().collect());
    }

    #[test]
    fn prefix_outside_registry_becomes_the_apiserver_prefix() {
        let s = parse(&["--prefix", "/wild"]).unwrap();
        assert_eq!(
            (s.prefix.as_str(), s.etcd_prefix.as_str()),
            ("/wild", "/wild")
        );
        assert_eq!(s.etcd_prefixes, ["/wild"]);
        let s = parse(&["--prefix", "/wild/secrets/ns1/"]).unwrap();
        assert_eq!(
            s.etcd_prefixes,
            ["/wild", "/wild/secrets", "/wild/secrets/ns1"]
        );
        let s = parse(&["--prefix", "/registry/secrets/"]).unwrap();
        assert_eq!(s.etcd_prefixes, ["/registry"]);
        // An explicit --etcd-prefix always wins.
        let s = parse(&["--prefix", "/wild", "--etcd-prefix", "/registry"]).unwrap();
        assert_eq!(s.etcd_prefixes, ["/registry"]);
        let s = parse(&["--etcd-prefix", "/wild/"]).unwrap();
        assert_eq!(
            (s.prefix.as_str(), s.etcd_prefix.as_str()),
            ("/wild", "/wild")
        );
        let s = parse(&["--prefix", "/"]).unwrap();
        assert_eq!(s.etcd_prefixes, ["/registry"]);
        assert!(parse(&["--prefix", ""]).is_err());
        assert!(parse(&["--etcd-prefix", "wild"]).is_err());
    }

    #[test]
    fn endpoints_comma_and_repeat() {
        let s = parse(&["--endpoints", "a:1,b:2", "--endpoints", "https://c:3"]).unwrap();
        assert_eq!(s.etcd.endpoints, vec!["a:1", "b:2", "https://c:3"]);
        assert!(
            parse(&["--endpoints", "tcp://x:1"])
                .unwrap_err()
                .contains("--endpoints")
        );
    }

    #[test]
    fn fail_on_values() {
        assert_eq!(parse_fail_on("none").unwrap(), BTreeSet::new());
        assert_eq!(
            parse_fail_on("stale, kms-key-stale").unwrap(),
            [Finding::Stale, Finding::KmsKeyStale].into_iter().collect()
        );
        assert!(parse_fail_on("ok").is_err());
        assert!(parse_fail_on("bogus").unwrap_err().contains("bogus"));
        assert!(
            parse(&["--fail-on", "bogus"])
                .unwrap_err()
                .contains("--fail-on")
        );
    }

    #[test]
    fn kms_overrides_need_name_equals_value() {
        let s = parse(&[
            "--config",
            "c.yaml",
            "--kms-endpoint",
            "p=unix:///@x",
            "--kms-key-id",
            "p=k1",
        ])
        .unwrap();
        assert_eq!(s.kms_endpoints["p"], "unix:///@x");
        assert_eq!(s.kms_key_ids["p"], "k1");
        assert!(
            parse(&["--config", "c", "--kms-endpoint", "p"])
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(
            parse(&["--config", "c", "--kms-endpoint", "p=tcp://x"])
                .unwrap_err()
                .contains("--kms-endpoint")
        );
        assert!(
            parse(&[
                "--config",
                "c",
                "--kms-key-id",
                "p=a",
                "--kms-key-id",
                "p=b"
            ])
            .unwrap_err()
            .contains("twice")
        );
        // Overrides without a config make no sense.
        assert!(parse(&["--kms-key-id", "p=a"]).is_err());
    }

    #[test]
    fn snapshot_subcommand_takes_the_same_flags() {
        let s = parse(&[
            "snapshot",
            "/etc/hostname",
            "--config",
            "c.yaml",
            "--output",
            "json",
            "--prefix",
            "/wild",
            "--fail-on",
            "stale",
        ])
        .unwrap();
        assert_eq!(s.source, Source::Snapshot("/etc/hostname".into()));
        assert_eq!(s.output, OutputFormat::Json);
        assert_eq!(s.etcd_prefix, "/wild");
        assert_eq!(s.fail_on, [Finding::Stale].into_iter().collect());
        assert_eq!(parse(&[]).unwrap().source, Source::Live);
        assert!(
            parse(&["snapshot", "/nonexistent/snap.db"])
                .unwrap_err()
                .contains("/nonexistent/snap.db")
        );
        assert!(parse(&["snapshot"]).is_err());
    }

    #[test]
    fn cert_and_key_go_together() {
        assert!(parse(&["--cert", "/etc/hostname"]).is_err());
    }

    #[test]
    fn durations_use_the_go_grammar_and_a_minimum() {
        let s = parse(&["--dial-timeout", "1m30s", "--command-timeout", "1.5s"]).unwrap();
        assert_eq!(s.etcd.dial_timeout, Duration::from_secs(90));
        assert_eq!(s.etcd.command_timeout, Duration::from_millis(1500));
        for (flag, bad) in [
            ("--dial-timeout", "1ns"),
            ("--dial-timeout", "0"),
            ("--command-timeout", "99ms"),
            ("--command-timeout", "7"),
            ("--command-timeout", "5x"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err();
            assert!(e.contains(flag), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn help_lists_every_exit_code() {
        use clap::CommandFactory as _;
        let help = Args::command().render_long_help().to_string();
        assert_eq!(Exit::missing_from(&help), Vec::<Exit>::new(), "{help}");
    }
}
