//! The optional loopback HTTP listener: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics_page(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// `/healthz`: 200 while the keyring in service passes its self-test. A
/// refused keyring file on disk is reported in the text but stays 200: the
/// plugin serves correctly, and a restart (what liveness failures cause)
/// would only try to load the refused file.
async fn healthz_page(State(state): State<AppState>) -> impl IntoResponse {
    page(&state, false)
}

/// `/readyz`: like `/healthz`, but 503 while the keyring file on disk is
/// refused, so an operator sees it before the next rotation depends on it.
async fn readyz_page(State(state): State<AppState>) -> impl IntoResponse {
    page(&state, true)
}

fn page(state: &AppState, file_refusal_fails: bool) -> (StatusCode, String) {
    let refused = state.health.keyring_file_refused();
    if !state.health.is_healthy() {
        let healthz = state.health.healthz();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {healthz}\n"),
        );
    }
    match refused.as_ref() {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(reason) => {
            let code = if file_refusal_fails {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let head = if file_refusal_fails {
                "not ready"
            } else {
                "ok"
            };
            (
                code,
                format!(
                    "{head}: keyring file on disk refused ({reason}); the keyring in service keeps serving\n"
                ),
            )
        }
    }
}

/// Binds `addr` (callers check it is loopback) and returns the address bound
/// (port 0 picks a free port) and the server future.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz_page))
        .route("/readyz", get(readyz_page))
        .with_state(AppState { metrics, health });
    Ok((bound, async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }))
}
