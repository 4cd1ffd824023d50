//! `rotator check` and the interlocks of `apply`.
//!
//! **check**: for every host, one row per check —
//!
//! | check | ok when |
//! |---|---|
//! | `apiserver` | its apiserver answers `/metrics` |
//! | `config-file` | its EncryptionConfiguration can be read |
//! | `config-hash` | the file's hash (`sha256:<hex>`) is the hash its apiserver reports (`apiserver_encryption_config_controller_last_config_info{hash}`) |
//! | `config-same` | its file is byte-identical to the first host's |
//! | `keyring-same` | its keyring copy is byte-identical (sha256) to the first host's (hosts with a `keyring:` only) |
//! | `kms-key-id` | for each KMS provider of the config, the key_id hash its apiserver last saw from Status is the first host's |
//!
//! A row is `ok`, `drift` (both values shown), `unverified` (the apiserver
//! does not export the metric: nothing was compared) or `unreachable` (the
//! apiserver or a file could not be read). Only all-`ok` is success; exit
//! codes: drift → [`Exit::Drift`] (7), else unreachable or unverified →
//! [`Exit::Unreachable`] (6). `--accept-unreported` turns `unverified` rows
//! into accepted ones (they still read `unverified`, never `ok`).
//!
//! **Interlocks** (see `apply`): [`preflight`] before a new run (the check
//! above plus an etcd audit for values the current config's writer did not
//! write); [`roundtrips`] before a KMS provider becomes a writer;
//! [`reprove_before_rewrite`] and [`watch_during_rewrite`] around the rewrite.
//!
//! Every read of a host file and every run of the kms-plugin on a host goes
//! through [`HostFs`]: local, or over SSH for a host with an `ssh:` block
//! (the round trip is then `kms-plugin probe --roundtrip` on that host).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use storage_encryption::{
    EncryptionConfiguration, KmsApiVersion, ProviderConfig, config_file_hash,
};
use zeroize::Zeroizing;

use crate::apiserver::Apiserver;
use crate::cli::Exit;
use crate::gate::{self, GateError, GateReport};
use crate::hostfs::HostFs;
use crate::metrics::{self, Sample};
use crate::targets::{Host, Targets};

/// Reads a file of `host` (`Ok(None)`: it does not exist), locally or over SSH.
fn read_host_file(
    fs: &HostFs,
    host: &Host,
    path: &Path,
) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    fs.read(host, path).map_err(|e| e.to_string())
}

/// The result of one check on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Checked and agrees.
    Ok,
    /// Checked and differs.
    Drift,
    /// Nothing to compare with: the apiserver does not report the metric.
    Unverified,
    /// The apiserver or a file could not be read.
    Unreachable,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Drift => "DRIFT",
            Self::Unverified => "unverified",
            Self::Unreachable => "UNREACHABLE",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Host name.
    pub host: String,
    /// Which check (`apiserver`, `config-file`, `config-hash`, `config-same`, `keyring-same`, `kms-key-id`).
    pub check: String,
    /// The result.
    pub result: Outcome,
    /// What should be seen (the file's hash, the first host's hash...), when known.
    pub expected: Option<String>,
    /// What was seen, when known.
    pub found: Option<String>,
    /// In words.
    pub detail: String,
}

/// Every row, and what they add up to.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// One row per host per check.
    pub rows: Vec<Row>,
    /// `unverified` rows were accepted by the operator (`--accept-unreported`).
    pub accept_unreported: bool,
}

impl Report {
    /// Every row agrees (or is an accepted `unverified`).
    pub fn passed(&self) -> bool {
        self.exit_code() == Exit::Ok.code()
    }

    /// 0 all ok; 7 any drift; else 6 when a host could not be checked (or an
    /// `unverified` row was not accepted).
    pub fn exit_code(&self) -> u8 {
        let any = |o: Outcome| self.rows.iter().any(|r| r.result == o);
        if any(Outcome::Drift) {
            Exit::Drift.code()
        } else if any(Outcome::Unreachable) || (any(Outcome::Unverified) && !self.accept_unreported)
        {
            Exit::Unreachable.code()
        } else {
            Exit::Ok.code()
        }
    }

    /// The rows that are not `ok` (accepted `unverified` rows excluded), in words.
    pub fn problems(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| {
                r.result != Outcome::Ok
                    && !(r.result == Outcome::Unverified && self.accept_unreported)
            })
            .map(|r| format!("{} {}: {} ({})", r.host, r.check, r.result.word(), r.detail))
            .collect()
    }

    /// The table for people.
    pub fn render_table(&self) -> String {
        let head = ["HOST", "CHECK", "RESULT", "DETAIL"];
        let cells: Vec<[String; 4]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.host.clone(),
                    r.check.clone(),
                    r.result.word().to_owned(),
                    cli_kit::escape::escape_control(&r.detail).into_owned(),
                ]
            })
            .collect();
        let width = |i: usize| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        let mut out = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}\n",
            head[0], head[1], head[2], head[3]
        );
        for c in &cells {
            out.push_str(&format!(
                "{:w0$}  {:w1$}  {:w2$}  {}\n",
                c[0], c[1], c[2], c[3]
            ));
        }
        let code = self.exit_code();
        let verdict = if code == Exit::Ok.code() {
            if self.rows.iter().any(|r| r.result == Outcome::Unverified) {
                "ok, with unverified rows accepted (--accept-unreported)".to_owned()
            } else {
                "ok: every host checked and agrees".to_owned()
            }
        } else if code == Exit::Drift.code() {
            format!("DRIFT (exit {code})")
        } else {
            format!(
                "NOT CHECKED: a host could not be checked or a metric is not reported (exit {code})"
            )
        };
        out.push_str(&format!("result: {verdict}\n"));
        out
    }

    /// The JSON document for scripts.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.passed(),
            "exit_code": self.exit_code(),
            "accept_unreported": self.accept_unreported,
            "rows": self.rows,
        })
    }
}

fn row(host: &Host, check: &str, result: Outcome, detail: impl Into<String>) -> Row {
    Row {
        host: host.name.clone(),
        check: check.to_owned(),
        result,
        expected: None,
        found: None,
        detail: detail.into(),
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What one host has.
struct Seen {
    /// `/metrics`, or why not.
    metrics: Result<Vec<Sample>, String>,
    /// The config file's hash (`None`: no file), or why it could not be read.
    config: Result<Option<String>, String>,
    /// The parsed config, when it parses.
    parsed: Option<EncryptionConfiguration>,
    /// The keyring copy's sha256 (when the host has a `keyring:`).
    keyring: Option<Result<Option<String>, String>>,
}

async fn look(fs: &HostFs, host: &Host) -> Seen {
    let metrics = match Apiserver::connect(host).await {
        Err(e) => Err(e.to_string()),
        Ok(api) => api.metrics().await.map_err(|e| e.to_string()),
    };
    let (config, parsed) = match read_host_file(fs, host, &host.encryption_config) {
        Err(e) => (Err(e), None),
        Ok(None) => (Ok(None), None),
        Ok(Some(bytes)) => (
            Ok(Some(config_file_hash(&bytes))),
            EncryptionConfiguration::parse_bytes(&bytes).ok(),
        ),
    };
    let keyring = host
        .keyring
        .as_deref()
        .map(|p| read_host_file(fs, host, p).map(|b| b.map(|b| sha256(&b))));
    Seen {
        metrics,
        config,
        parsed,
        keyring,
    }
}

/// The config hashes an apiserver reports.
fn reported_hashes(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.name == metrics::CONFIG_INFO && s.value > 0.0)
        .map(|s| s.label("hash").to_owned())
        .collect()
}

/// The key_id hash the apiserver saw last from provider `name`'s Status.
fn latest_key_id_hash(samples: &[Sample], name: &str) -> Option<String> {
    samples
        .iter()
        .filter(|s| s.name == metrics::KEY_ID_STATUS && s.label("provider_name") == name)
        .max_by(|a, b| a.value.total_cmp(&b.value))
        .map(|s| s.label("key_id_hash").to_owned())
}

fn kms_names(config: &EncryptionConfiguration) -> Vec<String> {
    let mut names: Vec<String> = config
        .resources
        .iter()
        .flat_map(|r| &r.providers)
        .filter_map(|p| match p {
            // KMS v1 plugins report no key_id: only v2 providers are compared.
            ProviderConfig::Kms(k) if k.api_version == KmsApiVersion::V2 => Some(k.name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Compares `value` of every host with the first host's that has one.
fn same_rows(
    hosts: &[Host],
    values: &[Option<Result<Option<String>, String>>],
    check: &str,
    what: &str,
) -> Vec<Row> {
    let reference = hosts.iter().zip(values).find_map(|(h, v)| match v {
        Some(Ok(hash)) => Some((h, hash.clone())),
        _ => None,
    });
    let mut rows = Vec::new();
    for (h, v) in hosts.iter().zip(values) {
        let Some(v) = v else { continue };
        let r = match (v, &reference) {
            (Err(e), _) => row(h, check, Outcome::Unreachable, e.clone()),
            (Ok(_), None) => row(h, check, Outcome::Unreachable, "no host to compare with"),
            (Ok(found), Some((first, want))) => {
                let show = |x: &Option<String>| x.clone().unwrap_or_else(|| "no file".into());
                let mut r = if found == want {
                    row(
                        h,
                        check,
                        Outcome::Ok,
                        if first.name == h.name {
                            format!("{} (the reference)", show(found))
                        } else {
                            format!("{} (same as {})", show(found), first.name)
                        },
                    )
                } else {
                    row(
                        h,
                        check,
                        Outcome::Drift,
                        format!(
                            "{what} is {} but {}'s is {}",
                            show(found),
                            first.name,
                            show(want)
                        ),
                    )
                };
                r.expected = want.clone();
                r.found = found.clone();
                r
            }
        };
        rows.push(r);
    }
    rows
}

/// `rotator check`: every host, every check (see the module docs).
pub async fn check(fs: &HostFs, targets: &Targets, accept_unreported: bool) -> Report {
    let hosts = targets.hosts();
    let mut seen = Vec::new();
    for h in hosts {
        seen.push(look(fs, h).await);
    }
    let mut rows = Vec::new();
    for (h, s) in hosts.iter().zip(&seen) {
        rows.push(match &s.metrics {
            Ok(_) => row(h, "apiserver", Outcome::Ok, "answers /metrics"),
            Err(e) => row(h, "apiserver", Outcome::Unreachable, e.clone()),
        });
        rows.push(match &s.config {
            Ok(Some(_)) => row(
                h,
                "config-file",
                Outcome::Ok,
                format!("{} read", h.encryption_config.display()),
            ),
            Ok(None) => row(
                h,
                "config-file",
                Outcome::Ok,
                format!("{} does not exist", h.encryption_config.display()),
            ),
            Err(e) => row(h, "config-file", Outcome::Unreachable, e.clone()),
        });
        let hash_row = match (&s.config, &s.metrics) {
            (Err(_), _) => row(
                h,
                "config-hash",
                Outcome::Unreachable,
                "the file could not be read",
            ),
            (_, Err(_)) => row(
                h,
                "config-hash",
                Outcome::Unreachable,
                "the apiserver did not answer",
            ),
            (Ok(disk), Ok(samples)) => {
                let reported = reported_hashes(samples);
                let disk_text = disk.clone().unwrap_or_else(|| "no file".into());
                let mut r = if reported.is_empty() && disk.is_none() {
                    row(
                        h,
                        "config-hash",
                        Outcome::Ok,
                        "no file on disk and no config reported by the apiserver",
                    )
                } else if reported.is_empty() {
                    row(
                        h,
                        "config-hash",
                        Outcome::Unverified,
                        format!(
                            "on disk {disk_text}; the apiserver does not report {} (kube-apiserver before 1.34?): not compared",
                            metrics::CONFIG_INFO
                        ),
                    )
                } else if disk.as_ref().is_some_and(|d| reported.contains(d)) {
                    row(
                        h,
                        "config-hash",
                        Outcome::Ok,
                        format!("{disk_text} on disk and in the apiserver"),
                    )
                } else {
                    row(
                        h,
                        "config-hash",
                        Outcome::Drift,
                        format!(
                            "on disk {disk_text}, the apiserver runs {}",
                            reported.join(", ")
                        ),
                    )
                };
                r.expected = disk.clone();
                r.found = (!reported.is_empty()).then(|| reported.join(","));
                r
            }
        };
        rows.push(hash_row);
    }
    let configs: Vec<_> = seen.iter().map(|s| Some(s.config.clone())).collect();
    rows.extend(same_rows(
        hosts,
        &configs,
        "config-same",
        "the config file's hash",
    ));
    if hosts.iter().any(|h| h.keyring.is_some()) {
        let keyrings: Vec<_> = hosts
            .iter()
            .zip(&seen)
            .map(|(h, s)| {
                Some(s.keyring.clone().unwrap_or_else(|| {
                    Err(format!(
                        "host {} has no keyring: path in the rotator config",
                        h.name
                    ))
                }))
            })
            .collect();
        rows.extend(same_rows(
            hosts,
            &keyrings,
            "keyring-same",
            "the keyring copy's sha256",
        ));
    }
    // KMS providers of the (first readable) config.
    let names = seen
        .iter()
        .find_map(|s| s.parsed.as_ref())
        .map(kms_names)
        .unwrap_or_default();
    for name in names {
        let check_name = format!("kms-key-id {name}");
        let values: Vec<_> = seen
            .iter()
            .map(|s| {
                Some(match &s.metrics {
                    Err(_) => Err("the apiserver did not answer".to_owned()),
                    Ok(samples) => Ok(latest_key_id_hash(samples, &name)),
                })
            })
            .collect();
        for mut r in same_rows(hosts, &values, &check_name, "the last key_id hash seen") {
            if r.result != Outcome::Unreachable && r.found.is_none() {
                r.result = Outcome::Unverified;
                r.detail = format!(
                    "the apiserver reports no {} for provider {name}: not compared",
                    metrics::KEY_ID_STATUS
                );
            }
            rows.push(r);
        }
    }
    // One block per host, checks in the order above.
    rows.sort_by_key(|r| hosts.iter().position(|h| h.name == r.host));
    Report {
        rows,
        accept_unreported,
    }
}

/// What [`preflight`] found that `--force` may override.
#[derive(Debug, Clone, Default)]
pub struct Preflight {
    /// The check's problem rows (drift, unreachable, unverified).
    pub check: Option<Report>,
    /// Values the current config's first provider did not write.
    pub not_migrated: Option<GateReport>,
}

impl Preflight {
    /// Nothing to refuse for.
    pub fn passed(&self) -> bool {
        self.check.as_ref().is_none_or(Report::passed)
            && self.not_migrated.as_ref().is_none_or(GateReport::passed)
    }

    /// One line per overridden finding, for the state file's `forced`.
    pub fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = &self.check {
            out.extend(c.problems().into_iter().map(|p| format!("check: {p}")));
        }
        if let Some(g) = &self.not_migrated
            && !g.passed()
        {
            for ((resource, stored), r) in &g.blocking {
                out.push(format!(
                    "not migrated: {} {resource} stored with {stored}",
                    r.count
                ));
            }
        }
        out
    }
}

/// Before a new run: `rotator check` and an etcd audit under the first
/// host's config (when it has one that parses; a config that does not parse
/// is refused by the plan) for values its writer did not write (the last
/// rotation was not migrated).
pub async fn preflight(
    fs: &HostFs,
    targets: &Targets,
    accept_unreported: bool,
) -> Result<Preflight, GateError> {
    let report = check(fs, targets, accept_unreported).await;
    let first = targets.first();
    let config = read_host_file(fs, first, &first.encryption_config)
        .ok()
        .flatten()
        .and_then(|b| EncryptionConfiguration::parse_bytes(&b).ok());
    let not_migrated = match &config {
        Some(c) => Some(gate::not_migrated(&targets.etcd, c).await?),
        None => None,
    };
    Ok(Preflight {
        check: Some(report),
        not_migrated,
    })
}

/// KMS providers that are first for some resource in `after` but not first
/// for that resource in `before` (by name): about to become writers.
pub fn new_kms_writers<'a>(
    before: Option<&EncryptionConfiguration>,
    after: &'a EncryptionConfiguration,
) -> Vec<&'a storage_encryption::KmsConfig> {
    let first_kms = |c: &EncryptionConfiguration| -> Vec<String> {
        c.resources
            .iter()
            .filter_map(|r| match r.providers.first() {
                Some(ProviderConfig::Kms(k)) => Some(k.name.clone()),
                _ => None,
            })
            .collect()
    };
    let already = before.map(first_kms).unwrap_or_default();
    let mut out: Vec<&storage_encryption::KmsConfig> = Vec::new();
    for r in &after.resources {
        if let Some(ProviderConfig::Kms(k)) = r.providers.first()
            && !already.contains(&k.name)
            && !out.iter().any(|o| o.name == k.name)
        {
            out.push(k);
        }
    }
    out
}

/// A round trip failed on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundTripFailure {
    /// Host.
    pub host: String,
    /// KMS provider name.
    pub provider: String,
    /// Why (the probe's words, or a key_id that differs from another host's).
    pub reason: String,
}

/// `kms-plugin probe --roundtrip` through `kms`'s endpoint on every host:
/// Status + Encrypt + Decrypt must pass everywhere, with the same key_id on
/// every host. Returns the failures (empty: every host passed).
pub async fn roundtrips(
    fs: &std::sync::Arc<HostFs>,
    targets: &Targets,
    kms: &storage_encryption::KmsConfig,
) -> Vec<RoundTripFailure> {
    let mut failures = Vec::new();
    let mut key_ids: Vec<(String, String)> = Vec::new();
    let timeout = kms.effective_timeout().max(Duration::from_secs(1));
    for h in targets.hosts() {
        let args: Vec<String> = vec![
            "probe".into(),
            "--roundtrip".into(),
            "--listen".into(),
            kms.endpoint.clone(),
            "--timeout".into(),
            format!("{}ms", timeout.as_millis()),
            "--output".into(),
            "json".into(),
        ];
        let (host, fs) = (h.clone(), fs.clone());
        let out = tokio::task::spawn_blocking(move || fs.kms_plugin(&host, &args)).await;
        let fail = |reason: String| RoundTripFailure {
            host: h.name.clone(),
            provider: kms.name.clone(),
            reason,
        };
        let out = match out {
            Err(e) => {
                failures.push(fail(format!("the probe task failed: {e}")));
                continue;
            }
            Ok(Err(e)) => {
                failures.push(fail(e.to_string()));
                continue;
            }
            Ok(Ok(o)) => o,
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let reason = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message")
                .trim_start_matches("kms-plugin: ")
                .to_owned();
            failures.push(fail(format!("{reason} (exit {:?})", out.status.code())));
            continue;
        }
        let parsed: Option<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .filter(|v| v["roundtrip"]["ok"] == true)
            .and_then(|v| v["key_id"].as_str().map(str::to_owned));
        match parsed {
            None => failures.push(fail(
                "the probe exited 0 but its output is not a passed round trip".into(),
            )),
            Some(id) => key_ids.push((h.name.clone(), id)),
        }
    }
    if let Some((first, id)) = key_ids.first() {
        for (h, other) in &key_ids[1..] {
            if other != id {
                failures.push(RoundTripFailure {
                    host: h.clone(),
                    provider: kms.name.clone(),
                    reason: format!(
                        "its plugin's key_id is {other} but {first}'s is {id}: the keyrings differ"
                    ),
                });
            }
        }
    }
    failures
}

/// A config changed under a running rewrite.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} on host {host} changed during the rewrite: it is {found} but this stage expects {expected}; someone else edited it. The rewrite stopped (its checkpoint is kept): look at the file, restore it (its previous version is {backup}) and run `rotator resume`"
)]
pub struct ConfigChanged {
    /// Host.
    pub host: String,
    /// `the EncryptionConfiguration file /path` or `the apiserver's config hash`.
    pub what: String,
    /// What the stage expects.
    pub expected: String,
    /// What was found.
    pub found: String,
    /// The `.prev` backup path.
    pub backup: String,
}

/// Every host's file must still be the one the stage expects.
fn disk_unchanged(fs: &HostFs, targets: &Targets, expected: &str) -> Result<(), ConfigChanged> {
    for h in targets.hosts() {
        let found = match read_host_file(fs, h, &h.encryption_config) {
            Ok(Some(b)) => config_file_hash(&b),
            Ok(None) => "missing".to_owned(),
            Err(e) => format!("unreadable ({e})"),
        };
        if found != expected {
            return Err(ConfigChanged {
                host: h.name.clone(),
                what: format!(
                    "the EncryptionConfiguration file {}",
                    h.encryption_config.display()
                ),
                expected: expected.to_owned(),
                found,
                backup: crate::fsio::backup_path(&h.encryption_config)
                    .display()
                    .to_string(),
            });
        }
    }
    Ok(())
}

/// What one apiserver's config-hash metric says: `Ok(true)` shows `expected`,
/// `Ok(false)` reports nothing, `Err(found)` shows another hash.
async fn apiserver_hash(api: &Apiserver, expected: &str) -> Result<bool, Option<String>> {
    match api.metrics().await {
        Err(_) => Err(None),
        Ok(samples) => {
            let reported = reported_hashes(&samples);
            if reported.is_empty() {
                Ok(false)
            } else if reported.iter().any(|r| r == expected) {
                Ok(true)
            } else {
                Err(Some(reported.join(", ")))
            }
        }
    }
}

/// Before a rewrite starts or resumes: every host's file is the one the
/// stage expects, and every apiserver that reports a config hash shows it
/// (waiting up to `timeout` for an apiserver that is reloading a restored
/// file). An apiserver that does not answer is waited for, never passed.
pub async fn reprove_before_rewrite(
    fs: &HostFs,
    targets: &Targets,
    apis: &[Apiserver],
    expected: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<(), ConfigChanged> {
    disk_unchanged(fs, targets, expected)?;
    let start = Instant::now();
    loop {
        let mut lagging = None;
        for (h, api) in targets.hosts().iter().zip(apis) {
            match apiserver_hash(api, expected).await {
                Ok(_) => {}
                Err(found) => {
                    lagging = Some((h, found));
                    break;
                }
            }
        }
        let Some((h, found)) = lagging else {
            return Ok(());
        };
        if start.elapsed() >= timeout {
            return Err(ConfigChanged {
                host: h.name.clone(),
                what: "the config its apiserver runs".into(),
                expected: expected.to_owned(),
                found: found.unwrap_or_else(|| "unknown: the apiserver did not answer".into()),
                backup: crate::fsio::backup_path(&h.encryption_config)
                    .display()
                    .to_string(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// Runs until some host's file or some apiserver's reported config hash
/// differs from `expected`, then returns what changed. An apiserver that
/// does not answer for a moment is not a change (its file is still read).
pub async fn watch_during_rewrite(
    fs: &HostFs,
    targets: &Targets,
    apis: &[Apiserver],
    expected: &str,
    poll: Duration,
) -> ConfigChanged {
    loop {
        tokio::time::sleep(poll).await;
        if let Err(e) = disk_unchanged(fs, targets, expected) {
            return e;
        }
        for (h, api) in targets.hosts().iter().zip(apis) {
            if let Err(Some(found)) = apiserver_hash(api, expected).await {
                return ConfigChanged {
                    host: h.name.clone(),
                    what: "the config its apiserver runs".into(),
                    expected: expected.to_owned(),
                    found,
                    backup: crate::fsio::backup_path(&h.encryption_config)
                        .display()
                        .to_string(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(providers: &str) -> EncryptionConfiguration {
        EncryptionConfiguration::parse(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n{providers}"
        ))
        .unwrap()
    }

    const KMS_A: &str =
        "  - kms:\n      apiVersion: v2\n      name: a\n      endpoint: unix:///a.sock\n";
    const KMS_B: &str =
        "  - kms:\n      apiVersion: v2\n      name: b\n      endpoint: unix:///b.sock\n";
    const ID: &str = "  - identity: {}\n";

    #[test]
    fn a_kms_provider_becomes_a_writer_only_when_it_moves_first() {
        let reader = cfg(&format!("{ID}{KMS_A}"));
        let writer = cfg(&format!("{KMS_A}{ID}"));
        let names = |v: Vec<&storage_encryption::KmsConfig>| {
            v.into_iter().map(|k| k.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(new_kms_writers(Some(&reader), &writer)), ["a"]);
        assert_eq!(names(new_kms_writers(None, &writer)), ["a"]);
        assert!(new_kms_writers(Some(&writer), &writer).is_empty());
        assert!(new_kms_writers(Some(&writer), &reader).is_empty());
        let switch = cfg(&format!("{KMS_B}{KMS_A}{ID}"));
        assert_eq!(names(new_kms_writers(Some(&writer), &switch)), ["b"]);
        assert_eq!(kms_names(&switch), ["a", "b"]);
    }

    fn report(results: &[Outcome], accept: bool) -> Report {
        Report {
            rows: results
                .iter()
                .map(|r| Row {
                    host: "cp0".into(),
                    check: "config-hash".into(),
                    result: *r,
                    expected: None,
                    found: None,
                    detail: String::new(),
                })
                .collect(),
            accept_unreported: accept,
        }
    }

    #[test]
    fn only_all_ok_passes_and_unverified_never_reads_as_ok() {
        use Outcome::*;
        assert_eq!(report(&[Ok, Ok], false).exit_code(), 0);
        assert_eq!(report(&[Ok, Drift, Unreachable], false).exit_code(), 7);
        assert_eq!(report(&[Ok, Unreachable], true).exit_code(), 6);
        assert_eq!(report(&[Ok, Unverified], false).exit_code(), 6);
        let accepted = report(&[Ok, Unverified], true);
        assert_eq!(accepted.exit_code(), 0);
        assert!(accepted.render_table().contains("unverified rows accepted"));
        assert!(accepted.render_table().contains("unverified"));
        assert!(accepted.problems().is_empty());
        assert_eq!(report(&[Unverified], false).problems().len(), 1);
        // A report with no rows has checked nothing... it still has the
        // per-host rows in practice; an empty host list is refused by the config.
    }

    #[test]
    fn the_latest_key_id_hash_per_provider_wins() {
        let s = metrics::parse(&format!(
            "{k}{{key_id_hash=\"sha256:old\",provider_name=\"a\"}} 100\n{k}{{key_id_hash=\"sha256:new\",provider_name=\"a\"}} 200\n{k}{{key_id_hash=\"sha256:x\",provider_name=\"b\"}} 300\n",
            k = metrics::KEY_ID_STATUS
        ));
        assert_eq!(latest_key_id_hash(&s, "a").as_deref(), Some("sha256:new"));
        assert_eq!(latest_key_id_hash(&s, "c"), None);
    }
}
