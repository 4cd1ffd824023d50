//! Prometheus metrics. Every label value comes from a fixed set (methods,
//! outcomes, reload results, session states); the only free-form label is
//! the current key_id's SHA-256, which is public by design (kube-apiserver
//! logs the same).
//!
//! With `--pkcs11-module`, the `atrest_kms_pkcs11_*` families show the
//! session pools and the time spent inside the module, summed over the
//! tokens the keyring uses (normally one; no token or key label appears).
//! They are read from the pools at each scrape, so the hot path only bumps
//! atomics it keeps anyway.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use crate::pkcs11::TokenStats;

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

/// Where the `atrest_kms_pkcs11_*` families come from: the process's tokens
/// (`None` without `--pkcs11-module`: the families are left out).
pub type Pkcs11Source = fn() -> Option<TokenStats>;

fn installed_tokens() -> Option<TokenStats> {
    crate::pkcs11::serving::installed().map(crate::pkcs11::serving::Hsm::stats)
}

/// The PKCS#11 families, read from the pools at each scrape.
#[derive(Debug)]
struct Pkcs11Collector {
    source: Pkcs11Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SessionLabels {
    state: &'static str,
}

impl Collector for Pkcs11Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = (self.source)() else {
            return Ok(());
        };
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let sessions = [
            ("open", s.open_sessions),
            ("busy", s.busy_sessions),
            ("max", s.max_sessions),
        ];
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "pkcs11_sessions",
            "PKCS#11 sessions for crypto calls: open now, busy (in a call) now, and the pool's bound (--pkcs11-max-sessions)",
            None,
            gauge.metric_type(),
        )?;
        for (state, n) in sessions {
            ConstGauge::new(count(n)).encode(family.encode_family(&SessionLabels { state })?)?;
        }
        let gauges: [(&str, &str, i64); 1] = [(
            "pkcs11_sessions_peak",
            "Most PKCS#11 sessions ever open at once for crypto calls",
            count(s.peak_sessions),
        )];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters: [(&str, &str, u64); 3] = [
            (
                "pkcs11_module_calls",
                "Crypto operations run inside the PKCS#11 module (encrypt, decrypt, check value)",
                s.calls,
            ),
            (
                "pkcs11_session_waits",
                "Calls that found every PKCS#11 session busy and waited for one",
                s.waits,
            ),
            (
                "pkcs11_pool_exhausted",
                "Calls that waited --pkcs11-session-wait for a session in vain and failed with RESOURCE_EXHAUSTED",
                s.exhausted,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let seconds: [(&str, &str, Duration); 3] = [
            (
                "pkcs11_module_seconds",
                "Wall time inside the PKCS#11 module's C_EncryptInit/C_Encrypt/C_DecryptInit/C_Decrypt calls",
                s.inside_wall,
            ),
            (
                "pkcs11_module_cpu_seconds",
                "CPU time of the calling threads inside those module calls (measured on one call in 16, scaled)",
                s.inside,
            ),
            (
                "pkcs11_session_wait_seconds",
                "Time calls spent waiting for a free PKCS#11 session",
                s.waited,
            ),
        ];
        for (name, help, value) in seconds {
            let c = ConstCounter::new(value.as_secs_f64());
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Registers every family under the `atrest_kms` prefix; the PKCS#11
    /// families come from the process's tokens.
    pub fn new() -> Self {
        Self::with_pkcs11(installed_tokens)
    }

    /// As [`Self::new`], with the PKCS#11 families read from `source`.
    pub fn with_pkcs11(source: Pkcs11Source) -> Self {
        let mut registry = Registry::with_prefix("atrest_kms");
        registry.register_collector(Box::new(Pkcs11Collector { source }));
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

    #[test]
    fn pkcs11_families_show_the_pools_only_when_a_module_is_configured() {
        assert!(
            !Metrics::with_pkcs11(|| None).encode().contains("pkcs11"),
            "PKCS#11 families without a module"
        );
        let m = Metrics::with_pkcs11(|| {
            Some(TokenStats {
                calls: 10,
                inside: Duration::from_millis(3),
                inside_wall: Duration::from_millis(4),
                cpu_sampled_calls: 1,
                open_sessions: 2,
                busy_sessions: 1,
                peak_sessions: 3,
                max_sessions: 16,
                waits: 5,
                waited: Duration::from_millis(1500),
                exhausted: 2,
            })
        });
        let text = m.encode();
        for want in [
            "atrest_kms_pkcs11_sessions{state=\"open\"} 2",
            "atrest_kms_pkcs11_sessions{state=\"busy\"} 1",
            "atrest_kms_pkcs11_sessions{state=\"max\"} 16",
            "atrest_kms_pkcs11_sessions_peak 3",
            "# TYPE atrest_kms_pkcs11_module_calls counter",
            "atrest_kms_pkcs11_module_calls_total 10",
            "atrest_kms_pkcs11_session_waits_total 5",
            "atrest_kms_pkcs11_pool_exhausted_total 2",
            "atrest_kms_pkcs11_module_seconds_total 0.004",
            "atrest_kms_pkcs11_module_cpu_seconds_total 0.003",
            "atrest_kms_pkcs11_session_wait_seconds_total 1.5",
            // The other families are still there.
            "atrest_kms_healthy 0",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
