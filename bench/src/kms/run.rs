//! One whole `kms-loadgen` run: plugin up, seal, cells, burst, plugin down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atrest_proto::kms::v2::StatusRequest;
use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use tracing::info;

use super::config::{Config, PluginSource};
use super::cpu::{CpuError, CpuMeters, ModuleCpu};
use super::load::{self, Bound, CellSpec, Method, Workload};
use super::machine::Machine;
use super::plugin::{PluginError, SpawnedPlugin, build_profile};
use super::report::{BurstResult, Report};
use kms_client::{ConnectError, Endpoint};

/// Distinct ciphertexts the Decrypt cells cycle through.
const DECRYPT_POOL: usize = 1024;
/// Callers used to seal the ciphertexts before measuring.
const SEAL_CALLERS: usize = 16;
/// Hard stop for the burst, so a stuck plugin cannot hang the run (stated in --help).
const BURST_DEADLINE: Duration = Duration::from_secs(30);
/// Plaintext streams: the cell pool and the burst set share no plaintext.
const POOL_STREAM: u64 = 1;
const BURST_STREAM: u64 = 2;

/// The run could not be carried out (failed calls are reported in [`Report`] instead).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the plugin at {endpoint} is not healthy: {detail}")]
    Unhealthy { endpoint: String, detail: String },
    #[error("preparing ciphertexts with Encrypt failed: {0}")]
    Seal(String),
    #[error("the plugin failed ({run}) and then did not stop cleanly: {stop}")]
    RunAndStop {
        run: Box<BenchError>,
        stop: PluginError,
    },
}

struct Target {
    endpoint: Endpoint,
    pid: u32,
    bin: String,
    profile: String,
    origin: &'static str,
}

/// Runs the benchmark `config` describes and returns what it measured.
pub async fn run(config: Config) -> Result<Report, BenchError> {
    match &config.plugin {
        PluginSource::Spawn { bin } => {
            info!(bin = %bin.display(), "starting the plugin");
            let plugin = SpawnedPlugin::start(bin, config.startup_timeout).await?;
            let target = Target {
                endpoint: plugin.endpoint().clone(),
                pid: plugin.pid(),
                bin: bin.display().to_string(),
                profile: build_profile(bin),
                origin: "started by kms-loadgen",
            };
            let measured = measure(&config, target).await;
            let stopped = plugin.stop().await;
            match (measured, stopped) {
                (Ok(report), Ok(())) => Ok(report),
                (Ok(_), Err(stop)) => Err(stop.into()),
                (Err(run), Ok(())) => Err(run),
                (Err(run), Err(stop)) => Err(BenchError::RunAndStop {
                    run: Box::new(run),
                    stop,
                }),
            }
        }
        PluginSource::Attach { endpoint, pid } => {
            // /proc/PID/exe tells which build is running, when we may read it.
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let target = Target {
                endpoint: endpoint.clone(),
                pid: *pid,
                bin: exe
                    .as_deref()
                    .map_or_else(|| "unknown".into(), |p| p.display().to_string()),
                profile: exe
                    .as_deref()
                    .map_or_else(|| "unknown".into(), build_profile),
                origin: "attached",
            };
            measure(&config, target).await
        }
    }
}

async fn measure(config: &Config, target: Target) -> Result<Report, BenchError> {
    let machine = Machine::current();
    let cpu = CpuMeters::new(target.pid, config.module_metrics.map(ModuleCpu::new))?;
    let channel = kms_client::connect(&target.endpoint, config.call_timeout).await?;
    check_healthy(&channel, &target.endpoint).await?;

    let decrypting = config.methods.contains(&Method::Decrypt);
    let pool = load::plaintexts(DECRYPT_POOL, config.plaintext_size, POOL_STREAM);
    let sealed = if decrypting {
        info!(
            count = DECRYPT_POOL,
            "sealing ciphertexts for the Decrypt cells"
        );
        load::seal(&channel, pool.clone(), SEAL_CALLERS)
            .await
            .map_err(BenchError::Seal)?
    } else {
        Vec::new()
    };
    let work = Arc::new(Workload {
        plaintexts: pool,
        sealed,
    });

    // Sealed before any cell runs, so the burst decrypts values the plugin
    // has never been asked to decrypt, as after an apiserver restart.
    let burst_work = if config.burst_calls > 0 {
        info!(
            count = config.burst_calls,
            "sealing distinct ciphertexts for the restart burst"
        );
        let plaintexts = load::plaintexts(config.burst_calls, config.plaintext_size, BURST_STREAM);
        let sealed = load::seal(&channel, plaintexts, SEAL_CALLERS)
            .await
            .map_err(BenchError::Seal)?;
        Some(Arc::new(Workload {
            plaintexts: Vec::new(),
            sealed,
        }))
    } else {
        None
    };

    let mut cells = Vec::new();
    for &method in &config.methods {
        for &callers in &config.callers {
            info!(method = method.name(), callers, "measuring");
            let spec = CellSpec {
                method,
                callers,
                warmup: config.warmup,
                duration: config.duration,
                max_calls: config.max_calls,
            };
            cells.push(load::run_cell(&channel, spec, &work, &cpu).await?);
        }
    }

    let burst = match burst_work {
        Some(work) => {
            info!(
                calls = config.burst_calls,
                callers = config.burst_callers,
                "restart burst"
            );
            // A restarted apiserver dials anew: the burst gets its own connection.
            let fresh = kms_client::connect(&target.endpoint, config.call_timeout).await?;
            let wanted = config.burst_calls as u64;
            let before = cpu.read().await?;
            let bound = Bound {
                deadline: Instant::now() + BURST_DEADLINE,
                max_calls: wanted,
            };
            let outcome =
                load::drive(&fresh, Method::Decrypt, config.burst_callers, bound, &work).await;
            let after = cpu.read().await?;
            Some(BurstResult {
                wanted,
                callers: config.burst_callers,
                outcome,
                cpu: after.since(before),
            })
        }
        None => None,
    };

    Ok(Report {
        machine,
        plugin_bin: target.bin,
        plugin_profile: target.profile,
        plugin_origin: target.origin,
        plugin_pid: target.pid,
        endpoint: target.endpoint.to_string(),
        loadgen_profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        plaintext_size: config.plaintext_size,
        duration: config.duration,
        warmup: config.warmup,
        cpu_ticks_per_sec: cpu.ticks_per_sec(),
        module_metrics: cpu.module().map(|m| m.addr()),
        cells,
        burst,
    })
}

async fn check_healthy(
    channel: &tonic::transport::Channel,
    endpoint: &Endpoint,
) -> Result<(), BenchError> {
    let unhealthy = |detail| BenchError::Unhealthy {
        endpoint: endpoint.to_string(),
        detail,
    };
    let resp = KeyManagementServiceClient::new(channel.clone())
        .status(StatusRequest {})
        .await
        .map_err(|s| unhealthy(format!("Status failed: {:?}: {}", s.code(), s.message())))?
        .into_inner();
    if resp.healthz != "ok" {
        return Err(unhealthy(format!("healthz {:?}", resp.healthz)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[tokio::test]
    async fn attaching_to_nothing_names_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            plugin: PluginSource::Attach {
                endpoint: Endpoint::Path(dir.path().join("none.sock")),
                pid: std::process::id(),
            },
            duration: Duration::from_millis(10),
            warmup: Duration::ZERO,
            max_calls: 10,
            callers: vec![1],
            methods: vec![Method::Status],
            burst_calls: 0,
            burst_callers: 1,
            plaintext_size: 32,
            call_timeout: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(1),
            module_metrics: None,
        };
        let err = run(config).await.unwrap_err();
        assert!(matches!(err, BenchError::Connect(_)), "{err}");
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    #[test]
    fn profile_of_unknown_path() {
        assert_eq!(build_profile(Path::new("/")), "unknown");
    }
}
