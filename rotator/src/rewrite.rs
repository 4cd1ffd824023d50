//! The rewrite: a no-op update of every object of the configured resources
//! through the Kubernetes API, so the apiserver re-encrypts each with the
//! provider (and key) that now writes. What kube-storage-version-migrator does:
//!
//! - resources: config names, wildcards expanded by API discovery
//!   (`kube::Discovery`); only resources that support list and update;
//! - paged lists (`limit=500`, `continue`); on 410 Gone the token from the
//!   error is used, or the resource starts again (updates are idempotent);
//! - a `PUT` of each object as read; 409 → GET and PUT again; 404 → skipped;
//!   429 → wait `Retry-After`; 5xx and connection errors → back off and retry;
//! - bounded concurrency and an optional rate limit; a progress bar on a TTY;
//! - a checkpoint per resource after every page, so a restarted run continues
//!   where it stopped; a summary at the end.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope, verbs};
use storage_encryption::GroupResource;
use tokio::sync::{Mutex, Semaphore};

use crate::apiserver::{ApiError, Apiserver};
use crate::state::{Checkpoint, ResourceProgress};

/// One resource to rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Checkpoint key: `group/version/resource` (`/v1/secrets` for core).
    pub key: String,
    /// `apiVersion` to put on each object.
    pub api_version: String,
    /// `kind` to put on each object.
    pub kind: String,
    /// `/api/v1` or `/apis/<group>/<version>`.
    pub base: String,
    /// Plural resource name.
    pub plural: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
}

impl Target {
    fn from_discovery(ar: &ApiResource, caps: &ApiCapabilities) -> Self {
        let base = if ar.group.is_empty() {
            format!("/api/{}", ar.version)
        } else {
            format!("/apis/{}/{}", ar.group, ar.version)
        };
        Target {
            key: format!("{}/{}/{}", ar.group, ar.version, ar.plural),
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
            base,
            plural: ar.plural.clone(),
            namespaced: caps.scope == Scope::Namespaced,
        }
    }

    fn list_path(&self, limit: u32, token: Option<&str>) -> String {
        let mut p = format!("{}/{}?limit={limit}", self.base, self.plural);
        if let Some(t) = token {
            p.push_str("&continue=");
            p.push_str(&percent_encode(t));
        }
        p
    }

    fn item_path(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!(
                "{}/namespaces/{}/{}/{}",
                self.base,
                percent_encode(ns),
                self.plural,
                percent_encode(name)
            ),
            None => format!("{}/{}/{}", self.base, self.plural, percent_encode(name)),
        }
    }
}

/// Encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Does config resource name `name` cover this discovered resource?
pub fn covers(name: &str, group: &str, plural: &str) -> bool {
    let gr = GroupResource::parse(name);
    if gr.is_any() {
        return true;
    }
    if gr.is_group_wildcard() {
        return gr.group == group;
    }
    gr.group == group && gr.resource == plural
}

/// The rewrite failed.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// Discovery failed.
    #[error("API discovery through {host} failed: {source}")]
    Discovery {
        /// Host.
        host: String,
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
    /// A config name matches nothing the API serves.
    #[error(
        "resource {0:?} of the config is not served by the API (or cannot be listed and updated)"
    )]
    UnknownResource(String),
    /// A request failed for good.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// An object could not be updated.
    #[error("{resource} {object}: {message}")]
    Object {
        /// Resource key.
        resource: String,
        /// namespace/name.
        object: String,
        /// What happened (status and the apiserver's message).
        message: String,
    },
    /// A list response could not be read.
    #[error("list {path}: {message}")]
    BadList {
        /// Path.
        path: String,
        /// Why.
        message: String,
    },
    /// Saving the checkpoint failed.
    #[error("saving the checkpoint: {0}")]
    Checkpoint(String),
}

/// Finds the resources the config names (wildcards expanded).
pub async fn discover(api: &Apiserver, names: &[String]) -> Result<Vec<Target>, RewriteError> {
    // Discovery is many requests; a 429, 5xx or connection error on any of them
    // is retried like every other request of the rewrite.
    let mut attempt = 0;
    let discovery = loop {
        attempt += 1;
        // Only the groups the config names: on a real cluster an unhealthy
        // aggregated API elsewhere must not stop the rewrite.
        let mut discovery = Discovery::new(api.client().clone());
        if !names.iter().any(|n| GroupResource::parse(n).is_any()) {
            let groups: Vec<String> = names
                .iter()
                .map(|n| GroupResource::parse(n).group)
                .collect();
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            discovery = discovery.filter(&groups);
        }
        match discovery.run().await {
            Ok(d) => break d,
            Err(e) if attempt < 10 && transient(&e) => {
                tracing::warn!(host = %api.host, error = %e, "discovery failed; retrying");
                tokio::time::sleep(backoff(attempt).max(Duration::from_secs(1))).await;
            }
            Err(source) => {
                return Err(RewriteError::Discovery {
                    host: api.host.clone(),
                    source: Box::new(source),
                });
            }
        }
    };
    let mut out: Vec<Target> = Vec::new();
    for name in names {
        let gr = GroupResource::parse(name);
        let mut found = false;
        for group in discovery.groups_alphabetical() {
            for (ar, caps) in group.recommended_resources() {
                if ar.plural.contains('/') || !covers(name, &ar.group, &ar.plural) {
                    continue;
                }
                if !(caps.supports_operation(verbs::LIST) && caps.supports_operation(verbs::UPDATE))
                {
                    continue;
                }
                found = true;
                let t = Target::from_discovery(&ar, &caps);
                if !out.iter().any(|o| o.key == t.key) {
                    out.push(t);
                }
            }
        }
        // A wildcard may match nothing (no resource in that group yet). An exact
        // name the API does not serve has no objects to update; if etcd still
        // holds values of it, the audit gate before the removal finds them.
        if !found && !gr.is_any() && !gr.is_group_wildcard() {
            tracing::warn!(resource = %name, "the API serves no such resource (or it cannot be listed and updated); skipped");
        }
    }
    Ok(out)
}

/// Knobs.
#[derive(Debug, Clone, Copy)]
pub struct RewriteSettings {
    /// Updates in flight at once.
    pub concurrency: usize,
    /// Updates per second at most (`None`: no limit).
    pub rate: Option<f64>,
    /// List page size.
    pub page_size: u32,
    /// Tries per request before giving up.
    pub max_attempts: u32,
    /// List only; update nothing.
    pub dry_run: bool,
}

impl Default for RewriteSettings {
    fn default() -> Self {
        RewriteSettings {
            concurrency: 4,
            rate: None,
            page_size: 500,
            max_attempts: 10,
            dry_run: false,
        }
    }
}

/// Counts.
#[derive(Debug, Default)]
struct Counters {
    updated: AtomicU64,
    skipped: AtomicU64,
    conflicts: AtomicU64,
    throttled: AtomicU64,
    retried: AtomicU64,
}

/// Per-resource and total counts of a rewrite.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Updated objects per resource (including earlier runs, from the checkpoint).
    pub per_resource: BTreeMap<String, (u64, u64)>,
    /// Updated in this run.
    pub updated: u64,
    /// 404 in this run.
    pub skipped: u64,
    /// 409s retried.
    pub conflicts: u64,
    /// 429s waited out.
    pub throttled: u64,
    /// 5xx / connection errors retried.
    pub retried: u64,
    /// Listed in dry-run mode.
    pub listed: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "rewrite: {} updated, {} gone (404), {} conflicts retried, {} throttled (429), {} transient errors retried, {:.1}s, {:.0} objects/s",
            self.updated,
            self.skipped,
            self.conflicts,
            self.throttled,
            self.retried,
            self.elapsed.as_secs_f64(),
            self.updated as f64 / secs
        )?;
        if self.listed > 0 {
            writeln!(f, "dry run: {} objects listed, none updated", self.listed)?;
        }
        for (r, (u, s)) in &self.per_resource {
            writeln!(f, "  {r}: {u} updated, {s} gone")?;
        }
        Ok(())
    }
}

/// A simple pacing limiter: one slot every `1/rate` seconds.
struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)))
}

enum PutOutcome {
    Updated,
    Gone,
}

fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

async fn put_one(
    api: &Apiserver,
    target: &Target,
    mut obj: serde_json::Value,
    counters: &Counters,
    max_attempts: u32,
) -> Result<PutOutcome, RewriteError> {
    let meta = obj.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned();
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .map(str::to_owned);
    let object = match &ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    };
    let fail = |message: String| RewriteError::Object {
        resource: target.key.clone(),
        object: object.clone(),
        message,
    };
    if name.is_empty() {
        return Err(fail("listed object has no metadata.name".into()));
    }
    let path = target.item_path(ns.as_deref(), &name);
    let mut attempt = 0;
    loop {
        attempt += 1;
        if attempt > max_attempts {
            return Err(fail(format!("gave up after {max_attempts} attempts")));
        }
        // List items carry no apiVersion/kind; a PUT body should.
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), target.api_version.clone().into());
            m.insert("kind".into(), target.kind.clone().into());
        }
        let body = serde_json::to_vec(&obj).map_err(|e| fail(e.to_string()))?;
        let Some(r) = send(api, http::Method::PUT, &path, Some(body), counters, attempt).await?
        else {
            continue;
        };
        match r.status {
            200 | 201 => return Ok(PutOutcome::Updated),
            404 => return Ok(PutOutcome::Gone),
            409 => {
                counters.conflicts.fetch_add(1, Ordering::Relaxed);
                // Someone changed it since the list: take the current object and try again.
                let Some(g) = send(api, http::Method::GET, &path, None, counters, attempt).await?
                else {
                    continue;
                };
                match g.status {
                    200 => {
                        obj = serde_json::from_slice(&g.body)
                            .map_err(|e| fail(format!("GET returned bad JSON: {e}")))?
                    }
                    404 => return Ok(PutOutcome::Gone),
                    429 | 500..=599 => {
                        counters.retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(g.retry_after.unwrap_or_else(|| backoff(attempt))).await;
                    }
                    s => {
                        return Err(fail(format!(
                            "GET after conflict: HTTP {s}: {}",
                            status_message(&g.body)
                        )));
                    }
                }
            }
            429 => {
                counters.throttled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(r.retry_after.unwrap_or(Duration::from_secs(1))).await;
            }
            500..=599 => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(r.retry_after.unwrap_or_else(|| backoff(attempt))).await;
            }
            s => return Err(fail(format!("HTTP {s}: {}", status_message(&r.body)))),
        }
    }
}

/// Sends one request. A transport error (connection refused or reset, etcd
/// behind the apiserver restarting) counts as a retry and backs off: `None`
/// tells the caller to try again. Any HTTP status is returned to the caller.
async fn send(
    api: &Apiserver,
    method: http::Method,
    path: &str,
    body: Option<Vec<u8>>,
    counters: &Counters,
    attempt: u32,
) -> Result<Option<crate::apiserver::Response>, RewriteError> {
    match api.request(method, path, body).await {
        Ok(r) => Ok(Some(r)),
        Err(ApiError::Transport { .. }) => {
            counters.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff(attempt)).await;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

struct Page {
    items: Vec<serde_json::Value>,
    next: Option<String>,
    remaining: Option<u64>,
}

/// Lists one page, retrying transient errors; `Ok(Err(token))` on 410 Gone
/// (with the token to resume from, if the apiserver gave one).
async fn list_page(
    api: &Apiserver,
    path: &str,
    counters: &Counters,
    max_attempts: u32,
) -> Result<Result<Page, Option<String>>, RewriteError> {
    let bad = |message: String| RewriteError::BadList {
        path: path.to_owned(),
        message,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        if attempt > max_attempts {
            return Err(bad(format!("gave up after {max_attempts} attempts")));
        }
        let Some(r) = send(api, http::Method::GET, path, None, counters, attempt).await? else {
            continue;
        };
        match r.status {
            200 => {
                let v: serde_json::Value =
                    serde_json::from_slice(&r.body).map_err(|e| bad(format!("bad JSON: {e}")))?;
                let meta = v.get("metadata");
                let next = meta
                    .and_then(|m| m.get("continue"))
                    .and_then(|c| c.as_str())
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned);
                let remaining = meta
                    .and_then(|m| m.get("remainingItemCount"))
                    .and_then(|c| c.as_u64());
                let items = match v.get("items") {
                    Some(serde_json::Value::Array(a)) => a.clone(),
                    Some(serde_json::Value::Null) | None => Vec::new(),
                    Some(_) => return Err(bad("items is not a list".into())),
                };
                return Ok(Ok(Page {
                    items,
                    next,
                    remaining,
                }));
            }
            410 => {
                let token = serde_json::from_slice::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|v| {
                        v.get("metadata")?
                            .get("continue")?
                            .as_str()
                            .filter(|c| !c.is_empty())
                            .map(str::to_owned)
                    });
                return Ok(Err(token));
            }
            429 => {
                counters.throttled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(r.retry_after.unwrap_or(Duration::from_secs(1))).await;
            }
            500..=599 => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(r.retry_after.unwrap_or_else(|| backoff(attempt))).await;
            }
            s => return Err(bad(format!("HTTP {s}: {}", status_message(&r.body)))),
        }
    }
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:>20} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// Rewrites every object of `targets`, continuing from `checkpoint` and
/// calling `save` after every page.
pub async fn run(
    api: &Apiserver,
    targets: &[Target],
    checkpoint: &mut Checkpoint,
    settings: RewriteSettings,
    save: &mut dyn FnMut(&Checkpoint) -> Result<(), String>,
) -> Result<Summary, RewriteError> {
    let start = Instant::now();
    let counters = Arc::new(Counters::default());
    let sem = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let pacer = settings.rate.filter(|r| *r > 0.0).map(|r| {
        Arc::new(Pacer {
            interval: Duration::from_secs_f64(1.0 / r),
            next: Mutex::new(Instant::now()),
        })
    });
    let bar = progress_bar();
    let mut listed = 0u64;
    for target in targets {
        let prog = checkpoint
            .resources
            .entry(target.key.clone())
            .or_default()
            .clone();
        if prog.done {
            continue;
        }
        let mut prog: ResourceProgress = prog;
        if let Some(b) = &bar {
            b.set_prefix(target.plural.clone());
            b.set_position(prog.updated + prog.skipped);
            b.set_length(prog.updated + prog.skipped);
            b.reset_eta();
        }
        let mut restarts = 0;
        loop {
            let path = target.list_path(settings.page_size, prog.continue_token.as_deref());
            let page = match list_page(api, &path, &counters, settings.max_attempts).await? {
                Ok(p) => p,
                Err(token) => {
                    // 410 Gone: the continue token expired (etcd compacted).
                    restarts += 1;
                    if restarts > settings.max_attempts {
                        return Err(RewriteError::BadList {
                            path,
                            message: "410 Gone again and again".into(),
                        });
                    }
                    tracing::warn!(resource = %target.key, resumed = token.is_some(), "list continue token expired (410); resuming");
                    prog.continue_token = token;
                    continue;
                }
            };
            let n = page.items.len() as u64;
            if let Some(b) = &bar {
                b.set_length(prog.updated + prog.skipped + n + page.remaining.unwrap_or(0));
            }
            if settings.dry_run {
                listed += n;
            } else {
                let mut set = tokio::task::JoinSet::new();
                for obj in page.items {
                    let permit = Arc::clone(&sem).acquire_owned().await;
                    if let Some(p) = &pacer {
                        p.wait().await;
                    }
                    let (api, target, counters, max) = (
                        api.clone(),
                        target.clone(),
                        Arc::clone(&counters),
                        settings.max_attempts,
                    );
                    set.spawn(async move {
                        let _permit = permit;
                        put_one(&api, &target, obj, &counters, max).await
                    });
                }
                let mut first_err = None;
                while let Some(res) = set.join_next().await {
                    match res {
                        Ok(Ok(PutOutcome::Updated)) => {
                            prog.updated += 1;
                            counters.updated.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(PutOutcome::Gone)) => {
                            prog.skipped += 1;
                            counters.skipped.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            first_err.get_or_insert(e);
                        }
                        Err(join) => {
                            first_err.get_or_insert(RewriteError::Checkpoint(format!(
                                "update task failed: {join}"
                            )));
                        }
                    }
                    if let Some(b) = &bar {
                        b.inc(1);
                    }
                }
                if let Some(e) = first_err {
                    // The checkpoint still points at this page: a resume redoes it.
                    checkpoint.resources.insert(target.key.clone(), prog);
                    let _ = save(checkpoint);
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    return Err(e);
                }
            }
            prog.continue_token = page.next.clone();
            prog.done = page.next.is_none();
            if !settings.dry_run {
                checkpoint
                    .resources
                    .insert(target.key.clone(), prog.clone());
                save(checkpoint).map_err(RewriteError::Checkpoint)?;
            }
            if bar.is_none() {
                tracing::info!(resource = %target.key, updated = prog.updated, gone = prog.skipped, "rewrite page done");
            }
            if prog.done {
                break;
            }
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let per_resource = checkpoint
        .resources
        .iter()
        .filter(|(k, _)| targets.iter().any(|t| &t.key == *k))
        .map(|(k, p)| (k.clone(), (p.updated, p.skipped)))
        .collect();
    Ok(Summary {
        per_resource,
        updated: counters.updated.load(Ordering::Relaxed),
        skipped: counters.skipped.load(Ordering::Relaxed),
        conflicts: counters.conflicts.load(Ordering::Relaxed),
        throttled: counters.throttled.load(Ordering::Relaxed),
        retried: counters.retried.load(Ordering::Relaxed),
        listed,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_cover_resources() {
        assert!(covers("secrets", "", "secrets"));
        assert!(covers("secrets.", "", "secrets"));
        assert!(!covers("secrets", "", "configmaps"));
        assert!(covers("*.", "", "configmaps"));
        assert!(!covers("*.", "apps", "deployments"));
        assert!(covers("*.apps", "apps", "deployments"));
        assert!(covers("deployments.apps", "apps", "deployments"));
        assert!(covers("*.*", "x.example", "widgets"));
    }

    #[test]
    fn paths() {
        let t = Target {
            key: "/v1/secrets".into(),
            api_version: "v1".into(),
            kind: "Secret".into(),
            base: "/api/v1".into(),
            plural: "secrets".into(),
            namespaced: true,
        };
        assert_eq!(t.list_path(500, None), "/api/v1/secrets?limit=500");
        assert_eq!(
            t.list_path(500, Some("a+b/c=")),
            "/api/v1/secrets?limit=500&continue=a%2Bb%2Fc%3D"
        );
        assert_eq!(
            t.item_path(Some("ns"), "x.y"),
            "/api/v1/namespaces/ns/secrets/x.y"
        );
        let c = Target {
            namespaced: false,
            base: "/apis/g/v1".into(),
            plural: "things".into(),
            ..t
        };
        assert_eq!(c.item_path(None, "n"), "/apis/g/v1/things/n");
    }
}
