//! # kube-apiserver stand-in (for tests only)
//!
//! kube-apiserver cannot run on the test machines, so the rotator's tests talk
//! to this small **stand-in**: the binary `kube-apiserver-standin`
//! (src/main.rs; flags in [`flags::Args`]). It serves only
//! what the rotator uses, with Kubernetes' JSON wire shapes (enough for the
//! `kube` crate's `Api<Secret>`, `Api<DynamicObject>` and discovery):
//!
//! | path | what |
//! |---|---|
//! | `GET /api`, `/api/v1`, `/apis`, `/version` | discovery of the served core/v1 resources (also aggregated discovery v2) |
//! | `GET /api/v1/{resource}` | list across namespaces (`limit`, `continue`) |
//! | `GET, POST /api/v1/namespaces/{ns}/{resource}` | list in a namespace, create |
//! | `GET, PUT, DELETE /api/v1/namespaces/{ns}/{resource}/{name}` | get, update (resourceVersion preconditions → 409), delete |
//! | `GET /metrics` | kube-apiserver's encryption-config, KMS key_id and transformation metrics |
//! | `GET /readyz`, `/healthz`, `/livez` | `ok` when etcd answers and KMS v2 plugins are healthy |
//!
//! Storage is a real etcd, written through `storage-encryption` exactly as
//! kube-apiserver writes it: same keys, value prefixes, AAD (the etcd key),
//! first-provider writes, stale reads re-encrypted on the next write (a no-op
//! update writes only when the read was stale). KMS v2 providers dial the real
//! kms-plugin. One deliberate difference: objects are JSON, where kube-apiserver
//! stores protobuf for built-in types; encryption does not depend on it.
//!
//! Not modelled: watch, patch, admission (the namespace need not exist),
//! cluster-scoped resources, API groups other than core, KMS v1, TLS.
//!
//! Modules: [`flags`] (CLI → [`Config`]), [`api`] (HTTP), [`store`] (etcd),
//! [`encryption`] + [`kms`] (transformers), [`reload`] (config file controller),
//! [`metrics`], [`resources`] (served resources, discovery), [`apierror`] (`Status`).
//! The test kit that runs the binary is `atrest_tests::standin::StandinProcess`.
//!
//! The crate's second binary, `broken-kms-plugin` (src/bin), is a fixture
//! for a broken third-party KMS v2 plugin (see its docs), run by
//! `atrest_tests::broken_kms`.

pub mod api;
pub mod apierror;
pub mod encryption;
pub mod flags;
pub mod kms;
pub mod metrics;
pub mod reload;
pub mod resources;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

pub use flags::{Args, Config};

/// Why the stand-in stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    /// The encryption config could not be loaded at start.
    #[error(transparent)]
    Config(#[from] reload::LoadError),
    /// etcd could not be reached.
    #[error("etcd {endpoints}: {source}")]
    Etcd {
        /// The endpoints.
        endpoints: String,
        /// Why.
        source: etcd_client::Error,
    },
    /// Binding or serving HTTP failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the stand-in until SIGTERM or SIGINT. Prints `listening on ADDR` as
/// the first stdout line once the listener is bound.
pub async fn run(config: Config) -> Result<(), StandinError> {
    let mut metrics = metrics::Metrics::new(&config.apiserver_id);
    metrics.set_config_hash_metric(config.config_hash_metric);
    let metrics = Arc::new(metrics);
    let current = Arc::new(
        reload::load_at_start(
            config.encryption_config.as_deref(),
            &metrics,
            config.kms_status_interval,
        )
        .await?,
    );
    let etcd = etcd_client::Client::connect(
        config.etcd_endpoints.clone(),
        Some(
            etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(10)),
        ),
    )
    .await
    .map_err(|source| StandinError::Etcd {
        endpoints: config.etcd_endpoints.join(","),
        source,
    })?;
    let store = store::Store::new(
        etcd,
        config.etcd_prefix.clone(),
        current.clone(),
        metrics.clone(),
    );

    if let (true, Some(path)) = (config.automatic_reload, &config.encryption_config) {
        let reloader = reload::Reloader {
            path: path.clone(),
            interval: config.reload_interval,
            delay: config.reload_delay,
            kms_interval: config.kms_status_interval,
        };
        tokio::spawn(reloader.run(current.clone(), metrics.clone()));
    }

    let listen_error = |source| StandinError::Listen {
        addr: config.listen.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    let mut config = config;
    config.listen = bound;
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        // The first stdout line is the contract with whoever started us.
        let _ = writeln!(stdout, "listening on {bound}");
        let _ = stdout.flush();
    }
    tracing::info!(%bound, "kube-apiserver stand-in serving (plain HTTP, tests only)");
    let state = Arc::new(api::AppState::new(config, store, current, metrics));
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|source| StandinError::Listen {
            addr: bound.to_string(),
            source,
        })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers, serve until killed.
        _ => std::future::pending::<()>().await,
    }
}
