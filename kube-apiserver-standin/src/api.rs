//! The HTTP surface (Kubernetes JSON wire shapes): discovery, the core/v1
//! object endpoints, `/metrics`, `/readyz`, `/healthz`, `/livez`, plus the
//! bearer-token check and the injected faults (409 every Nth PUT, 429 every Nth request).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use super::apierror::ApiError;
use super::flags::Config;
use super::metrics::Metrics;
use super::reload::Current;
use super::resources::{self, ServedResource};
use super::store::{Store, check_name};

/// Shared state of the handlers.
#[derive(Debug)]
pub struct AppState {
    /// Validated flags.
    pub config: Config,
    /// Object store.
    pub store: Store,
    /// Serving encryption config.
    pub encryption: Arc<Current>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Requests counted for the throttle fault.
    requests: AtomicU64,
    /// PUTs counted for the conflict fault.
    puts: AtomicU64,
}

impl AppState {
    /// State for the router.
    pub fn new(
        config: Config,
        store: Store,
        encryption: Arc<Current>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            store,
            encryption,
            metrics,
            requests: AtomicU64::new(0),
            puts: AtomicU64::new(0),
        }
    }

    fn resource(&self, name: &str) -> Result<ServedResource, ApiError> {
        self.config
            .resources
            .iter()
            .find(|r| r.name == name)
            .copied()
            .ok_or_else(|| ApiError::no_such_resource(name))
    }
}

type Shared = Arc<AppState>;

/// A JSON body with `Content-Type: application/json`.
pub fn json_body(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The router.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/api", get(api))
        .route("/api/v1", get(api_v1))
        .route("/apis", get(apis))
        .route(
            "/version",
            get(|| async { json_body(&resources::version()) }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .route("/readyz", get(health))
        .route("/livez", get(|| async { "ok" }))
        .route("/api/v1/{resource}", get(list_all))
        .route(
            "/api/v1/namespaces/{ns}/{resource}",
            get(list_namespaced).post(create),
        )
        .route(
            "/api/v1/namespaces/{ns}/{resource}/{name}",
            get(get_one).put(update).delete(delete),
        )
        .fallback(|| async { ApiError::no_such_resource("no route") })
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Paths that need no token and are not throttled (kube-apiserver lets
/// anonymous clients read health and version).
fn is_public(path: &str) -> bool {
    ["/healthz", "/readyz", "/livez", "/version"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// Authentication, then the injected faults.
async fn gate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if !is_public(&path) {
        if let Some(token) = &state.config.token {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !given.is_some_and(|h| token.matches_header(h)) {
                return ApiError::unauthorized().into_response();
            }
        }
        let every = state.config.fault_throttle_every;
        if every > 0 && path != "/metrics" {
            let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
            if n % every == 0 {
                return ApiError::too_many_requests(1).into_response();
            }
        }
    }
    // Writes are never dry runs here: refuse rather than write for real.
    if request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("dryRun=")))
    {
        return ApiError::bad_request("dryRun is not supported by the kube-apiserver stand-in")
            .into_response();
    }
    let every = state.config.fault_conflict_every;
    if every > 0 && request.method() == Method::PUT {
        let n = state.puts.fetch_add(1, Ordering::Relaxed) + 1;
        if n % every == 0 {
            let name = path.rsplit('/').next().unwrap_or_default().to_owned();
            let resource = path.rsplit('/').nth(1).unwrap_or_default().to_owned();
            return ApiError::conflict(&resource, &name).into_response();
        }
    }
    next.run(request).await
}

/// Aggregated discovery (apidiscovery.k8s.io/v2) is answered when the client asks for it.
fn wants_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=APIGroupDiscoveryList"))
}

fn aggregated_body(value: &Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            ),
        )],
        value.to_string(),
    )
        .into_response()
}

async fn api(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if wants_aggregated(&headers) {
        return aggregated_body(&resources::aggregated_core(&state.config.resources));
    }
    json_body(&resources::api_versions(&state.config.listen.to_string()))
}

async fn api_v1(State(state): State<Shared>) -> Response {
    json_body(&resources::core_v1_resources(&state.config.resources))
}

async fn apis(headers: HeaderMap) -> Response {
    if wants_aggregated(&headers) {
        return aggregated_body(&resources::aggregated_groups());
    }
    json_body(&resources::api_groups())
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `ok` when etcd answers and every KMS v2 plugin is healthy; else 500 with reasons.
async fn health(State(state): State<Shared>) -> Response {
    let mut lines = vec!["[+]ping ok".to_owned()];
    let mut ok = true;
    match state.store.ping().await {
        Ok(()) => lines.push("[+]etcd ok".into()),
        Err(e) => {
            ok = false;
            lines.push(format!("[-]etcd failed: {e}"));
        }
    }
    for (name, health) in state.encryption.get().kms_health() {
        match health {
            Ok(()) => lines.push(format!("[+]kms-providers {name} ok")),
            Err(e) => {
                ok = false;
                lines.push(format!("[-]kms-providers failed: {e}"));
            }
        }
    }
    if ok {
        (StatusCode::OK, "ok").into_response()
    } else {
        lines.push("healthz check failed".into());
        (StatusCode::INTERNAL_SERVER_ERROR, lines.join("\n") + "\n").into_response()
    }
}

fn list_params(query: &HashMap<String, String>) -> Result<(i64, Option<String>), ApiError> {
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::bad_request(format!("limit: invalid value {s:?}")))?,
    };
    let token = query.get("continue").filter(|c| !c.is_empty()).cloned();
    Ok((limit, token))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

async fn list_all(
    State(state): State<Shared>,
    Path(resource): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let r = state.resource(&resource)?;
    let (limit, token) = list_params(&query)?;
    let list = state.store.list(&r, None, limit, token.as_deref()).await?;
    Ok(json_body(&list))
}

async fn list_namespaced(
    State(state): State<Shared>,
    Path((ns, resource)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let r = state.resource(&resource)?;
    check_name("namespace", &ns)?;
    let (limit, token) = list_params(&query)?;
    let list = state
        .store
        .list(&r, Some(&ns), limit, token.as_deref())
        .await?;
    Ok(json_body(&list))
}

async fn create(
    State(state): State<Shared>,
    Path((ns, resource)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r = state.resource(&resource)?;
    check_name("namespace", &ns)?;
    let object = state.store.create(&r, &ns, parse_body(&body)?).await?;
    Ok((StatusCode::CREATED, json_body(&object)).into_response())
}

async fn get_one(
    State(state): State<Shared>,
    Path((ns, resource, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let r = state.resource(&resource)?;
    check_name("namespace", &ns)?;
    check_name("name", &name)?;
    Ok(json_body(&state.store.get(&r, &ns, &name).await?))
}

async fn update(
    State(state): State<Shared>,
    Path((ns, resource, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r = state.resource(&resource)?;
    check_name("namespace", &ns)?;
    check_name("name", &name)?;
    let object = state
        .store
        .update(&r, &ns, &name, parse_body(&body)?)
        .await?;
    Ok(json_body(&object))
}

async fn delete(
    State(state): State<Shared>,
    Path((ns, resource, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let r = state.resource(&resource)?;
    check_name("namespace", &ns)?;
    check_name("name", &name)?;
    Ok(json_body(&state.store.delete(&r, &ns, &name).await?))
}
