//! `kms-plugin serve`: load the keyring, bind the socket, answer gRPC until a
//! shutdown signal, then drain in-flight calls within the grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use atrest_proto::kms::v2::key_management_service_server::KeyManagementServiceServer;
use thiserror::Error;
use tokio::sync::watch;

use crate::backend::KekSet;
use crate::health::Health;
use crate::keyring::{Keyring, LocalKeyring};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::service::KmsService;
use crate::socket::{self, SocketAccess, SocketError};
use crate::transport::{self, CallTracker, Incoming, Tracker};
use ::keyring::KeyringError;
use kms_client::Endpoint;

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub endpoint: Endpoint,
    /// The keyring file.
    pub keyring: PathBuf,
    /// Loopback address for `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: Option<SocketAddr>,
    /// Socket file mode and group.
    pub socket: SocketAccess,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub grace_period: Duration,
    /// How often to poll the keyring file (besides watching it).
    pub reload_interval: Duration,
    /// How often to run the encrypt/decrypt self-test.
    pub self_test_interval: Duration,
    /// Close a client connection with no call in flight for this long.
    pub idle_timeout: Duration,
}

/// Why `serve` stopped with an error.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The keyring could not be loaded at start.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The metrics listener could not bind.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The gRPC server task died.
    #[error("gRPC server task failed: {0}")]
    Task(String),
}

/// Serves until `shutdown` resolves, then drains within the grace period.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let (keyring, dropped) = Keyring::load_at_start(&config.keyring)?;
    crate::reload::warn_dropped(&dropped, "compared with the keyring's .prev");
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    health.check(&keyring);
    metrics.set_healthy(health.is_healthy());
    metrics.set_keyring(keyring.key_id(), keyring.kek_count());
    tracing::info!(
        keyring = %config.keyring.display(),
        key_id = keyring.key_id(),
        generation = keyring.generation(),
        keks = keyring.kek_count(),
        "keyring loaded"
    );
    let backend = Arc::new(LocalKeyring::new(keyring));

    let mut bound = socket::bind(&config.endpoint, &config.socket)?;
    let std_listener = bound
        .take_listener()
        .ok_or_else(|| SocketError::AlreadyServing(config.endpoint.clone()))?;
    let listener =
        tokio::net::UnixListener::from_std(std_listener).map_err(|source| SocketError::Io {
            what: "cannot register listener",
            endpoint: config.endpoint.to_string(),
            source,
        })?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let mut background = Vec::new();
    if let Some(addr) = config.metrics_addr {
        let (bound, server) = crate::http::serve(addr, metrics.clone(), health.clone(), stopped())
            .await
            .map_err(|source| ServeError::Metrics { addr, source })?;
        tracing::info!(addr = %bound, "metrics listening");
        background.push(tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        }));
    }

    let reloader = Reloader::new(
        config.keyring.clone(),
        backend.clone(),
        health.clone(),
        metrics.clone(),
    );
    background.push(tokio::spawn(
        reloader.run(config.reload_interval, stopped()),
    ));

    {
        let (backend, health, metrics, stop) =
            (backend.clone(), health.clone(), metrics.clone(), stopped());
        let interval = config.self_test_interval;
        background.push(tokio::spawn(async move {
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tick.tick() => {
                        // A token KEK's self-test calls the token.
                        crate::backend::may_block(|| health.check(&*backend.snapshot()));
                        metrics.set_healthy(health.is_healthy());
                    }
                }
            }
        }));
    }

    let limits = transport::Limits {
        idle_timeout: config.idle_timeout,
        ..transport::limits()
    };
    let tracker = Arc::new(Tracker::default());
    let service =
        KeyManagementServiceServer::new(KmsService::new(backend, health, metrics.clone()))
            .max_decoding_message_size(limits.max_message)
            .max_encoding_message_size(limits.max_message);
    // SETTINGS_MAX_FRAME_SIZE and SETTINGS_HEADER_TABLE_SIZE stay h2's
    // defaults: transport::authority's shim relies on both.
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .timeout(limits.call_timeout)
        .layer(CallTracker::new(tracker.clone()))
        .add_service(service)
        .serve_with_incoming_shutdown(
            Incoming::new(listener, tracker.clone(), metrics, &limits),
            stopped(),
        );
    let mut server = tokio::spawn(server);
    tracing::info!(endpoint = %config.endpoint, version = env!("CARGO_PKG_VERSION"), "kms-plugin serving");

    tokio::select! {
        result = &mut server => {
            // The server ended on its own: that is a failure.
            let _ = stop_tx.send(true);
            return match result {
                Ok(r) => r.map_err(ServeError::from),
                Err(join) => Err(ServeError::Task(join.to_string())),
            };
        }
        () = shutdown => {}
    }
    tracing::info!(grace_period = ?config.grace_period, "shutdown requested: no new connections, draining in-flight calls");
    let _ = stop_tx.send(true);
    // Connections got a GOAWAY; the server future ends when every one has
    // closed. Idle connections whose clients keep them open must not hold us
    // for the whole grace period: once no call is in flight, we are done.
    let drained = async {
        loop {
            if tracker.in_flight() == 0 {
                // Look twice: a call that arrived just before the GOAWAY may be
                // between the socket and the service.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if tracker.in_flight() == 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let drained = tokio::time::timeout(config.grace_period, drained);
    tokio::select! {
        result = &mut server => match result {
            Ok(result) => result?,
            Err(join) => tracing::error!(error = %join, "gRPC server task failed while draining"),
        },
        done = drained => {
            match done {
                Ok(()) => tracing::info!(
                    connections = tracker.connections(),
                    "no calls in flight; closing the remaining idle connections"
                ),
                Err(_) => tracing::warn!(
                    calls = tracker.in_flight(),
                    "grace period over with calls still in flight; closing them"
                ),
            }
            server.abort();
        }
    }
    for task in background {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    drop(bound);
    tracing::info!("kms-plugin stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; waiting for ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
