//! The kube-apiserver metrics the rotator reads, in the Prometheus text format,
//! with kube-apiserver's names and labels (spec/encryption-config.md "Metrics").
//! Labels only ever hold hashes, fixed words and resource names: never key
//! material, never error text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Outcome label of a reload attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReloadStatus {
    /// The new config is serving.
    Success,
    /// The new config was refused; the old one keeps serving.
    Failure,
}

impl ReloadStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// Direction label of `apiserver_storage_transformation_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transformation {
    /// Decrypting a value read from etcd.
    FromStorage,
    /// Encrypting a value to write.
    ToStorage,
}

impl Transformation {
    fn as_str(self) -> &'static str {
        match self {
            Self::FromStorage => "from_storage",
            Self::ToStorage => "to_storage",
        }
    }
}

/// The stand-in's metrics. Cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    apiserver_id_hash: String,
    /// Export `last_config_info` (kube-apiserver 1.34+).
    config_hash_metric: bool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    config_hash: Option<String>,
    reloads: BTreeMap<ReloadStatus, u64>,
    reload_last: BTreeMap<ReloadStatus, f64>,
    /// (provider_name, key_id_hash) → last time Status reported it.
    key_id_seen: BTreeMap<(String, String), f64>,
    /// (resource, type, transformer_prefix, status) → count.
    transformations: BTreeMap<(String, Transformation, String, &'static str), u64>,
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    /// Metrics of the apiserver named `apiserver_id`.
    pub fn new(apiserver_id: &str) -> Self {
        Self {
            // kube-apiserver: "sha256:" + hex(sha256(id)), the same form as key_id hashes.
            apiserver_id_hash: storage_encryption::key_id_hash(apiserver_id),
            config_hash_metric: true,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// `false`: behave like kube-apiserver before 1.34, which has no
    /// `apiserver_encryption_config_controller_last_config_info`.
    pub fn set_config_hash_metric(&mut self, on: bool) {
        self.config_hash_metric = on;
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding this lock cannot leave the maps inconsistent
        // (each update is one insert), so a poisoned lock is still usable.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// The `apiserver_id_hash` label value.
    pub fn apiserver_id_hash(&self) -> &str {
        &self.apiserver_id_hash
    }

    /// The config now serving (`sha256:<hex of file bytes>`).
    pub fn set_config_hash(&self, hash: String) {
        self.with(|m| m.config_hash = Some(hash));
    }

    /// One automatic reload attempt finished.
    pub fn record_reload(&self, status: ReloadStatus) {
        self.with(|m| {
            *m.reloads.entry(status).or_default() += 1;
            m.reload_last.insert(status, now_seconds());
        });
    }

    /// A KMS v2 plugin's Status reported `key_id`.
    pub fn record_key_id_seen(&self, provider: &str, key_id: &str) {
        let hash = storage_encryption::key_id_hash(key_id);
        self.with(|m| {
            m.key_id_seen
                .insert((provider.to_owned(), hash), now_seconds())
        });
    }

    /// One value was transformed by the transformer with `prefix`.
    pub fn record_transformation(
        &self,
        resource: &str,
        kind: Transformation,
        prefix: &str,
        ok: bool,
    ) {
        let status = if ok { "OK" } else { "Unknown" };
        self.with(|m| {
            *m.transformations
                .entry((resource.to_owned(), kind, prefix.to_owned(), status))
                .or_default() += 1;
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let id = &self.apiserver_id_hash;
        self.with(|m| {
            let mut out = String::new();
            if self.config_hash_metric {
                family(
                    &mut out,
                    "apiserver_encryption_config_controller_last_config_info",
                    "gauge",
                    "Information about the last applied encryption configuration with hash as label.",
                );
                if let Some(hash) = &m.config_hash {
                    let _ = writeln!(
                        out,
                        "apiserver_encryption_config_controller_last_config_info{{apiserver_id_hash=\"{id}\",hash=\"{hash}\"}} 1"
                    );
                }
            }
            family(
                &mut out,
                "apiserver_encryption_config_controller_automatic_reloads_total",
                "counter",
                "Total number of reload successes and failures of encryption configuration split by apiserver identity.",
            );
            for (status, n) in &m.reloads {
                let _ = writeln!(
                    out,
                    "apiserver_encryption_config_controller_automatic_reloads_total{{apiserver_id_hash=\"{id}\",status=\"{}\"}} {n}",
                    status.as_str()
                );
            }
            family(
                &mut out,
                "apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds",
                "gauge",
                "Timestamp of the last successful or failed automatic reload of encryption configuration split by apiserver identity.",
            );
            for (status, t) in &m.reload_last {
                let _ = writeln!(
                    out,
                    "apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds{{apiserver_id_hash=\"{id}\",status=\"{}\"}} {t:.3}",
                    status.as_str()
                );
            }
            family(
                &mut out,
                "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds",
                "gauge",
                "The last time in seconds when a keyID was returned by the Status RPC call.",
            );
            for ((provider, hash), t) in &m.key_id_seen {
                let provider = escape(provider);
                let _ = writeln!(
                    out,
                    "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{{apiserver_id_hash=\"{id}\",key_id_hash=\"{hash}\",provider_name=\"{provider}\"}} {t:.3}"
                );
            }
            family(
                &mut out,
                "apiserver_storage_transformation_operations_total",
                "counter",
                "Total number of transformations.",
            );
            for ((resource, kind, prefix, status), n) in &m.transformations {
                let (resource, prefix) = (escape(resource), escape(prefix));
                let _ = writeln!(
                    out,
                    "apiserver_storage_transformation_operations_total{{resource=\"{resource}\",status=\"{status}\",transformation_type=\"{}\",transformer_prefix=\"{prefix}\"}} {n}",
                    kind.as_str()
                );
            }
            out
        })
    }
}

/// Escapes a label value (provider names come from the config file).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} [ALPHA] {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_config_hash_is_exposed() {
        let m = Metrics::new("apiserver-a");
        m.set_config_hash("sha256:aa".into());
        m.set_config_hash("sha256:bb".into());
        m.record_reload(ReloadStatus::Failure);
        let text = m.render();
        assert!(text.contains("hash=\"sha256:bb\"} 1"), "{text}");
        assert!(!text.contains("sha256:aa"), "{text}");
        assert!(text.contains(&format!(
            "apiserver_id_hash=\"{}\",status=\"failure\"}} 1",
            storage_encryption::key_id_hash("apiserver-a")
        )));
    }
}
