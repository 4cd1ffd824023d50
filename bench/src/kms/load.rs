//! The load itself: N caller tasks sharing one channel, each making calls back
//! to back until a deadline or a call budget, recording every latency.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use atrest_proto::kms::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

use super::cpu::{CpuError, CpuMeters, CpuSpent};

/// A KMS v2 method under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Status,
    Encrypt,
    Decrypt,
}

impl Method {
    /// The gRPC method name, as printed in the table.
    pub fn name(self) -> &'static str {
        match self {
            Method::Status => "Status",
            Method::Encrypt => "Encrypt",
            Method::Decrypt => "Decrypt",
        }
    }
}

/// A ciphertext the plugin produced, with the plaintext it must decrypt to.
#[derive(Clone)]
pub struct Sealed {
    plaintext: Vec<u8>,
    ciphertext: Vec<u8>,
    key_id: String,
}

impl fmt::Debug for Sealed {
    // Benchmark plaintexts are not secret, but plaintext stays out of Debug everywhere.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field(
                "plaintext",
                &format_args!("<redacted {} bytes>", self.plaintext.len()),
            )
            .field("ciphertext_len", &self.ciphertext.len())
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// What the callers send: plaintexts for Encrypt, sealed values for Decrypt.
#[derive(Debug, Default)]
pub struct Workload {
    pub plaintexts: Vec<Vec<u8>>,
    pub sealed: Vec<Sealed>,
}

/// `count` distinct pseudo-random plaintexts of `size` bytes; `stream` picks a
/// sequence, so two pools made with different streams share no plaintext.
pub fn plaintexts(count: usize, size: usize, stream: u64) -> Vec<Vec<u8>> {
    (0..count as u64)
        .map(|i| {
            let mut state = stream.wrapping_mul(0x1000_0000_0000_0000) ^ i;
            let mut bytes = Vec::with_capacity(size + 8);
            while bytes.len() < size {
                bytes.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
            }
            bytes.truncate(size);
            bytes
        })
        .collect()
}

/// SplitMix64: a tiny, well-mixed generator; benchmark data needs no CSPRNG.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// When a drive stops: at `deadline` or after `max_calls` calls, whichever first.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub deadline: Instant,
    pub max_calls: u64,
}

/// What one drive observed.
#[derive(Debug)]
pub struct Outcome {
    /// Latency of every call made (failed ones too), in nanoseconds.
    pub histogram: Histogram<u64>,
    pub failures: u64,
    /// The first failure, for the error message.
    pub first_failure: Option<String>,
    /// From the first call started to the last call finished.
    pub wall: Duration,
}

impl Outcome {
    /// Calls made, failed or not.
    pub fn calls(&self) -> u64 {
        self.histogram.len()
    }

    fn absorb_failures(&mut self, failures: u64, first: Option<String>) {
        self.failures += failures;
        if self.first_failure.is_none() {
            self.first_failure = first;
        }
    }
}

/// Histogram range: 1 µs .. 60 s in ns, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy hdrhistogram's rules
    // (low >= 1, high >= 2 * low, sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("constant histogram bounds")
}

fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Same bounds everywhere; saturating_record_n cannot fail, unlike add().
    for v in from.iter_recorded() {
        into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
    }
}

/// Runs `callers` concurrent tasks calling `method` on clones of `channel`
/// (one HTTP/2 connection) until `bound`.
pub async fn drive(
    channel: &Channel,
    method: Method,
    callers: usize,
    bound: Bound,
    work: &Arc<Workload>,
) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let client = KeyManagementServiceClient::new(channel.clone());
            let next = Arc::clone(&next);
            let work = Arc::clone(work);
            tokio::spawn(caller(client, method, bound, next, work))
        })
        .collect();
    let mut outcome = Outcome {
        histogram: new_histogram(),
        failures: 0,
        first_failure: None,
        wall: Duration::ZERO,
    };
    for task in tasks {
        match task.await {
            Ok(part) => {
                merge(&mut outcome.histogram, &part.histogram);
                outcome.absorb_failures(part.failures, part.first_failure);
            }
            Err(join) => outcome.absorb_failures(1, Some(format!("caller task died: {join}"))),
        }
    }
    outcome.wall = started.elapsed();
    outcome
}

async fn caller(
    mut client: KeyManagementServiceClient<Channel>,
    method: Method,
    bound: Bound,
    next: Arc<AtomicU64>,
    work: Arc<Workload>,
) -> Outcome {
    let mut out = Outcome {
        histogram: new_histogram(),
        failures: 0,
        first_failure: None,
        wall: Duration::ZERO,
    };
    while Instant::now() < bound.deadline {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= bound.max_calls {
            break;
        }
        let t0 = Instant::now();
        let result = call(&mut client, method, i, &work).await;
        let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        out.histogram.saturating_record(nanos);
        if let Err(e) = result {
            out.absorb_failures(1, Some(e));
        }
    }
    out
}

/// A UUID-shaped uid, as kube-apiserver sends (the plugin may log it).
fn uid(i: u64) -> String {
    format!("00000000-0000-4000-8000-{:012x}", i & 0xFFFF_FFFF_FFFF)
}

fn status_text(method: Method, status: tonic::Status) -> String {
    format!(
        "{} failed: {:?}: {}",
        method.name(),
        status.code(),
        status.message()
    )
}

fn pick<T>(pool: &[T], i: u64) -> Option<&T> {
    let len = u64::try_from(pool.len()).ok()?;
    pool.get(usize::try_from(i.checked_rem(len)?).ok()?)
}

/// One call; Ok only when the answer is also right (Status healthy, Decrypt
/// giving back exactly the plaintext that was sealed).
async fn call(
    client: &mut KeyManagementServiceClient<Channel>,
    method: Method,
    i: u64,
    work: &Workload,
) -> Result<(), String> {
    match method {
        Method::Status => {
            let resp = client
                .status(StatusRequest {})
                .await
                .map_err(|s| status_text(method, s))?
                .into_inner();
            if resp.healthz != "ok" {
                return Err(format!(
                    "Status reports unhealthy: healthz {:?}",
                    resp.healthz
                ));
            }
        }
        Method::Encrypt => {
            let plaintext = pick(&work.plaintexts, i).ok_or("no plaintexts prepared")?;
            let req = EncryptRequest {
                plaintext: plaintext.clone(),
                uid: uid(i),
            };
            let resp = client
                .encrypt(req)
                .await
                .map_err(|s| status_text(method, s))?
                .into_inner();
            if resp.ciphertext.is_empty() || resp.key_id.is_empty() {
                return Err("Encrypt returned an empty ciphertext or key_id".into());
            }
        }
        Method::Decrypt => {
            let sealed = pick(&work.sealed, i).ok_or("no ciphertexts prepared")?;
            let req = DecryptRequest {
                ciphertext: sealed.ciphertext.clone(),
                uid: uid(i),
                key_id: sealed.key_id.clone(),
                annotations: Default::default(),
            };
            let resp = client
                .decrypt(req)
                .await
                .map_err(|s| status_text(method, s))?
                .into_inner();
            if resp.plaintext != sealed.plaintext {
                return Err(format!(
                    "Decrypt returned a wrong plaintext for ciphertext #{} (key_id {:?})",
                    i % work.sealed.len() as u64,
                    sealed.key_id
                ));
            }
        }
    }
    Ok(())
}

/// Encrypts every plaintext once (with `callers` concurrent callers) and keeps
/// the results for Decrypt.
pub async fn seal(
    channel: &Channel,
    plaintexts: Vec<Vec<u8>>,
    callers: usize,
) -> Result<Vec<Sealed>, String> {
    let plaintexts = Arc::new(plaintexts);
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..callers.max(1))
        .map(|_| {
            let mut client = KeyManagementServiceClient::new(channel.clone());
            let (next, plaintexts) = (Arc::clone(&next), Arc::clone(&plaintexts));
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(plaintext) = usize::try_from(i).ok().and_then(|i| plaintexts.get(i))
                    else {
                        return Ok(done);
                    };
                    let req = EncryptRequest {
                        plaintext: plaintext.clone(),
                        uid: uid(i),
                    };
                    let resp = client
                        .encrypt(req)
                        .await
                        .map_err(|s| status_text(Method::Encrypt, s))?
                        .into_inner();
                    done.push((
                        i,
                        Sealed {
                            plaintext: plaintext.clone(),
                            ciphertext: resp.ciphertext,
                            key_id: resp.key_id,
                        },
                    ));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(plaintexts.len());
    for task in tasks {
        let part: Result<Vec<_>, String> = task
            .await
            .map_err(|join| format!("sealing task died: {join}"))?;
        all.extend(part?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, s)| s).collect())
}

/// One table row's settings.
#[derive(Debug, Clone, Copy)]
pub struct CellSpec {
    pub method: Method,
    pub callers: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_calls: u64,
}

/// One table row's measurements.
#[derive(Debug)]
pub struct CellResult {
    pub method: Method,
    pub callers: usize,
    /// Measured calls only; warm-up failures are counted in `outcome.failures`.
    pub outcome: Outcome,
    /// CPU time of the plugin and of kms-loadgen over the measured part.
    pub cpu: CpuSpent,
}

impl CellResult {
    /// Plugin CPU time per measured call, in µs.
    pub fn cpu_micros_per_call(&self) -> Option<f64> {
        per_call_micros(self.cpu.plugin, self.outcome.calls())
    }

    /// Measured calls per second.
    pub fn ops_per_sec(&self) -> f64 {
        ops_per_sec(self.outcome.calls(), self.outcome.wall)
    }
}

pub(crate) fn per_call_micros(cpu: Duration, calls: u64) -> Option<f64> {
    (calls > 0).then(|| cpu.as_secs_f64() * 1e6 / calls as f64)
}

pub(crate) fn ops_per_sec(calls: u64, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        calls as f64 / wall.as_secs_f64()
    }
}

/// Warm-up (unmeasured), then the measured drive with the plugin's CPU read
/// before and after.
pub async fn run_cell(
    channel: &Channel,
    spec: CellSpec,
    work: &Arc<Workload>,
    cpu: &CpuMeters,
) -> Result<CellResult, CpuError> {
    let mut warm_failures = (0, None);
    if !spec.warmup.is_zero() {
        let bound = Bound {
            deadline: Instant::now() + spec.warmup,
            max_calls: u64::MAX,
        };
        let warm = drive(channel, spec.method, spec.callers, bound, work).await;
        warm_failures = (warm.failures, warm.first_failure);
    }
    let before = cpu.read().await?;
    let bound = Bound {
        deadline: Instant::now() + spec.duration,
        max_calls: spec.max_calls,
    };
    let mut outcome = drive(channel, spec.method, spec.callers, bound, work).await;
    let after = cpu.read().await?;
    outcome.absorb_failures(warm_failures.0, warm_failures.1);
    Ok(CellResult {
        method: spec.method,
        callers: spec.callers,
        outcome,
        cpu: after.since(before),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_pools_are_distinct_and_sized() {
        let a = plaintexts(1000, 32, 1);
        let b = plaintexts(1000, 32, 2);
        assert!(a.iter().all(|p| p.len() == 32));
        let mut all: Vec<_> = a.iter().chain(b.iter()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 2000);
        assert_eq!(plaintexts(3, 5, 9), plaintexts(3, 5, 9));
    }

    #[test]
    fn merging_keeps_counts_and_percentiles() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in 1..=500u64 {
            a.saturating_record(v * 1_000);
            b.saturating_record((v + 500) * 1_000);
        }
        merge(&mut a, &b);
        assert_eq!(a.len(), 1000);
        let p50 = a.value_at_quantile(0.5);
        assert!((499_000..=501_000).contains(&p50), "{p50}");
    }

    #[test]
    fn per_call_math() {
        assert_eq!(per_call_micros(Duration::from_millis(10), 1000), Some(10.0));
        assert_eq!(per_call_micros(Duration::from_millis(10), 0), None);
        assert_eq!(ops_per_sec(3000, Duration::from_secs(3)), 1000.0);
        assert_eq!(ops_per_sec(5, Duration::ZERO), 0.0);
    }

    #[test]
    fn pick_cycles_and_handles_empty_pools() {
        let pool = [10, 20, 30];
        assert_eq!(pick(&pool, 4), Some(&20));
        assert_eq!(pick::<u8>(&[], 4), None);
    }

    #[test]
    fn sealed_debug_hides_plaintext() {
        let s = Sealed {
            plaintext: b"CANARY".to_vec(),
            ciphertext: vec![1; 40],
            key_id: "k1".into(),
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("CANARY") && !shown.contains("67, 65"),
            "{shown}"
        );
    }
}
