//! Prometheus metrics. Every label value comes from a fixed set (methods,
//! outcomes, reload results); the only free-form label is the current
//! key_id's SHA-256, which is public by design (kube-apiserver logs the same).

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

/// A gRPC method of the KMS v2 service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Status
    Status,
    /// Encrypt
    Encrypt,
    /// Decrypt
    Decrypt,
}

impl Method {
    const ALL: [Method; 3] = [Method::Status, Method::Encrypt, Method::Decrypt];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Status => "status",
            Method::Encrypt => "encrypt",
            Method::Decrypt => "decrypt",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Refused because of what the caller sent.
    InvalidArgument,
    /// Decrypt named a key_id this keyring does not hold.
    UnknownKeyId,
    /// Failed on our side.
    Internal,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::InvalidArgument,
        Outcome::UnknownKeyId,
        Outcome::Internal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::InvalidArgument => "invalid_argument",
            Outcome::UnknownKeyId => "unknown_key_id",
            Outcome::Internal => "internal",
        }
    }
}

/// The result of one attempt to reload the keyring file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// The new keyring is in service.
    Success,
    /// The file could not be read.
    RejectedUnreadable,
    /// The file is not a valid keyring.
    RejectedInvalid,
    /// The file is older than (or as old as, but different from) the one in service.
    RejectedRollback,
    /// The new keyring failed its encrypt/decrypt self-test.
    RejectedSelfTest,
    /// Not a successor of the keyring in service (another lineage, changed
    /// key material, or the primary gone).
    RejectedSuccessor,
}

impl ReloadResult {
    /// Every result, in label order.
    pub const ALL: [ReloadResult; 6] = [
        ReloadResult::Success,
        ReloadResult::RejectedUnreadable,
        ReloadResult::RejectedInvalid,
        ReloadResult::RejectedRollback,
        ReloadResult::RejectedSuccessor,
        ReloadResult::RejectedSelfTest,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::RejectedUnreadable => "rejected_unreadable",
            ReloadResult::RejectedInvalid => "rejected_invalid",
            ReloadResult::RejectedRollback => "rejected_rollback",
            ReloadResult::RejectedSelfTest => "rejected_self_test",
            ReloadResult::RejectedSuccessor => "rejected_successor",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(Method, Outcome, ReloadResult);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    method: Method,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyIdLabels {
    key_id_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectedLabels {
    reason: ReloadResult,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
        0.5,
    ])
}

/// The plugin's metrics. Call handles are resolved once, so recording a call
/// costs two atomic updates, not a map lookup.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Vec<(Counter, Histogram)>,
    key_id_hash: Family<KeyIdLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    reads: Counter,
    connections: Gauge,
    accept_backoffs: Counter,
    file_ok: Gauge,
    file_rejected: Family<RejectedLabels, Gauge>,
    keks: Gauge,
    healthy: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `sha256:<hex>` of a key_id, as kube-apiserver shows it.
pub fn key_id_hash(key_id: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key_id.as_bytes())))
}

impl Metrics {
    /// Registers every family under the `atrest_kms` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("atrest_kms");
        let requests = Family::<CallLabels, Counter>::default();
        let durations = Family::<CallLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let key_id_hash = Family::<KeyIdLabels, Gauge>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let reads = Counter::default();
        let connections = Gauge::default();
        let accept_backoffs = Counter::default();
        let file_ok = Gauge::default();
        let file_rejected = Family::<RejectedLabels, Gauge>::default();
        let keks = Gauge::default();
        let healthy = Gauge::default();
        registry.register(
            "requests",
            "KMS v2 gRPC calls by method and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a KMS v2 gRPC call, by method and outcome",
            durations.clone(),
        );
        registry.register(
            "key_id_hash_info",
            "SHA-256 of the key_id Status reports now (value is always 1)",
            key_id_hash.clone(),
        );
        registry.register(
            "keyring_reloads",
            "Keyring file reload attempts by result",
            reloads.clone(),
        );
        registry.register(
            "keyring_reads",
            "Reads of the keyring file (poll ticks and content-changing watch events)",
            reads.clone(),
        );
        registry.register(
            "keyring_file_ok",
            "1 when the keyring file on disk is the keyring in service (or an accepted newer one), 0 while it is refused",
            file_ok.clone(),
        );
        registry.register(
            "keyring_file_rejected",
            "1 for the reason the keyring file on disk is refused now, 0 for the others",
            file_rejected.clone(),
        );
        registry.register(
            "connections",
            "Client connections open on the gRPC socket",
            connections.clone(),
        );
        registry.register(
            "accept_backoffs",
            "Accepts that failed for lack of file descriptors or memory (each followed by a pause)",
            accept_backoffs.clone(),
        );
        registry.register("keks", "KEKs in the keyring in service", keks.clone());
        registry.register(
            "healthy",
            "1 when the last self-test passed, else 0",
            healthy.clone(),
        );

        let mut calls = Vec::with_capacity(Method::ALL.len() * Outcome::ALL.len());
        for method in Method::ALL {
            for outcome in Outcome::ALL {
                let labels = CallLabels { method, outcome };
                calls.push((
                    requests.get_or_create(&labels).clone(),
                    durations.get_or_create(&labels).clone(),
                ));
            }
        }
        for result in ReloadResult::ALL {
            let _ = reloads.get_or_create(&ReloadLabels { result });
            if result != ReloadResult::Success {
                let _ = file_rejected.get_or_create(&RejectedLabels { reason: result });
            }
        }
        file_ok.set(1);
        Metrics {
            registry,
            calls,
            key_id_hash,
            reloads,
            reads,
            connections,
            accept_backoffs,
            file_ok,
            file_rejected,
            keks,
            healthy,
        }
    }

    /// Records one answered call.
    pub fn observe_call(&self, method: Method, outcome: Outcome, elapsed: Duration) {
        let m = Method::ALL.iter().position(|x| *x == method).unwrap_or(0);
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        if let Some((counter, histogram)) = self.calls.get(m * Outcome::ALL.len() + o) {
            counter.inc();
            histogram.observe(elapsed.as_secs_f64());
        }
    }

    /// Records a reload attempt.
    pub fn observe_reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Counts one read of the keyring file.
    pub fn observe_read(&self) {
        self.reads.inc();
    }

    /// Publishes how many client connections are open.
    pub fn set_connections(&self, open: i64) {
        self.connections.set(open);
    }

    /// Counts one accept that failed for lack of resources.
    pub fn observe_accept_backoff(&self) {
        self.accept_backoffs.inc();
    }

    /// Publishes whether the keyring file on disk is refused, and why
    /// (`None` or [`ReloadResult::Success`]: it is not).
    pub fn set_file_refused(&self, reason: Option<ReloadResult>) {
        let reason = reason.filter(|r| *r != ReloadResult::Success);
        self.file_ok.set(i64::from(reason.is_none()));
        for result in ReloadResult::ALL {
            if result != ReloadResult::Success {
                self.file_rejected
                    .get_or_create(&RejectedLabels { reason: result })
                    .set(i64::from(Some(result) == reason));
            }
        }
    }

    /// Publishes the keyring now in service.
    pub fn set_keyring(&self, key_id: &str, keks: usize) {
        self.key_id_hash.clear();
        self.key_id_hash
            .get_or_create(&KeyIdLabels {
                key_id_hash: key_id_hash(key_id),
            })
            .set(1);
        self.keks.set(i64::try_from(keks).unwrap_or(i64::MAX));
    }

    /// Publishes the self-test result.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.set(i64::from(healthy));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_with_fixed_labels() {
        let m = Metrics::new();
        m.observe_call(
            Method::Decrypt,
            Outcome::UnknownKeyId,
            Duration::from_micros(30),
        );
        m.observe_reload(ReloadResult::RejectedRollback);
        m.set_keyring("atrest-v1-k1-e1-00", 1);
        m.set_healthy(true);
        let text = m.encode();
        for want in [
            "atrest_kms_requests_total{method=\"decrypt\",outcome=\"unknown_key_id\"} 1",
            "atrest_kms_requests_total{method=\"status\",outcome=\"ok\"} 0",
            "atrest_kms_request_duration_seconds_bucket{le=\"0.00005\",method=\"decrypt\",outcome=\"unknown_key_id\"} 1",
            "atrest_kms_keyring_reloads_total{result=\"rejected_rollback\"} 1",
            "atrest_kms_keyring_reloads_total{result=\"success\"} 0",
            "atrest_kms_keks 1",
            "atrest_kms_keyring_file_ok 1",
            "atrest_kms_keyring_file_rejected{reason=\"rejected_invalid\"} 0",
            "atrest_kms_keyring_reads_total 0",
            "atrest_kms_healthy 1",
            &format!(
                "atrest_kms_key_id_hash_info{{key_id_hash=\"{}\"}} 1",
                key_id_hash("atrest-v1-k1-e1-00")
            ),
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        m.set_file_refused(Some(ReloadResult::RejectedRollback));
        let text = m.encode();
        for want in [
            "atrest_kms_keyring_file_ok 0",
            "atrest_kms_keyring_file_rejected{reason=\"rejected_rollback\"} 1",
            "atrest_kms_keyring_file_rejected{reason=\"rejected_invalid\"} 0",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        m.set_keyring("other", 2);
        assert!(
            !m.encode().contains(&key_id_hash("atrest-v1-k1-e1-00")),
            "old key_id hash kept"
        );
    }
}
