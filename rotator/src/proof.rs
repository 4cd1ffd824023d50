//! Waiting until every apiserver proves it runs the current stage, with a
//! timeout that names the apiserver that lags and what it shows.
//!
//! Config stages, per apiserver (its `proof:` setting, or `auto`, which picks
//! the best its metrics offer): the config hash metric shows the file's hash;
//! else a successful automatic reload after the write; else the operator is
//! told to restart it and the proof is readiness after a restart
//! (`process_start_time_seconds` after the write, or a not-ready → ready
//! transition). KEK promotion: every apiserver reports the new key_id's hash.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::apiserver::Apiserver;
use crate::metrics::{self, Observation};
use crate::targets::{Host, ProofMode};

/// What to wait for.
#[derive(Debug, Clone)]
pub enum Wanted {
    /// The config file with this hash, written at or after `since` (unix seconds).
    Config {
        /// `sha256:<hex>`.
        hash: String,
        /// When the write began.
        since: f64,
    },
    /// KMS key_id hash `sha256:<hex>` seen by every apiserver.
    KeyId {
        /// The hash.
        key_id_hash: String,
    },
}

/// Timing.
#[derive(Debug, Clone, Copy)]
pub struct ProofSettings {
    /// Give up after this long.
    pub timeout: Duration,
    /// Poll this often.
    pub poll: Duration,
}

/// Some apiserver did not prove it in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for every apiserver to {what}: {}", lagging_words(.lagging))]
pub struct ProofTimeout {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub waited: Duration,
    /// (host, proof mode, what it shows).
    pub lagging: Vec<(String, &'static str, String)>,
}

fn lagging_words(lagging: &[(String, &'static str, String)]) -> String {
    lagging
        .iter()
        .map(|(h, m, shows)| format!("apiserver {h} ({m}) shows: {shows}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How long a config-hash apiserver gets before the rotator suspects that
/// automatic reload is off (kube-apiserver polls the file every minute).
const RELOAD_GRACE: Duration = Duration::from_secs(90);

struct HostWatch {
    since: Instant,
    mode: Option<ProofMode>,
    proven: bool,
    shows: String,
    told: bool,
    /// Restart mode without a start-time metric: saw it down or not ready.
    saw_down: bool,
    /// The operator was told that the run waits for this apiserver.
    named: bool,
}

/// How long the run waits for an apiserver before saying which one it waits
/// for (sooner when every other apiserver has proven the stage).
const NAME_LAGGARD_AFTER: Duration = Duration::from_secs(10);

async fn observe(
    api: &Apiserver,
    host: &Host,
    w: &mut HostWatch,
    wanted: &Wanted,
    notify: &mut dyn FnMut(String),
) -> Observation {
    let samples = match api.metrics().await {
        Ok(s) => s,
        Err(e) => {
            // Only a connection that fails shows a restart; an HTTP error
            // (401, 403, 500...) comes from an apiserver that is up, and
            // must not later read as "seen restarting".
            if matches!(e, crate::apiserver::ApiError::Transport { .. }) {
                w.saw_down = true;
            }
            return Observation::Waiting(format!("unreachable: {e}"));
        }
    };
    match wanted {
        Wanted::KeyId { key_id_hash } => metrics::key_id_seen(&samples, key_id_hash),
        Wanted::Config { hash, since } => {
            let mode = *w.mode.get_or_insert(match host.proof {
                ProofMode::Auto => metrics::detect_mode(&samples),
                m => m,
            });
            match mode {
                ProofMode::ConfigHash | ProofMode::Auto => {
                    let seen = metrics::config_hash(&samples, hash);
                    // The hash metric is set at startup too. Reload metrics
                    // appear only after a first reload, so their absence
                    // proves nothing at first; but past one reload period
                    // (kube-apiserver polls every minute) without the new
                    // hash and without them, automatic reload is most likely
                    // off and only a restart brings the file in: say so once.
                    if seen != Observation::Proven
                        && !metrics::has_reload_metrics(&samples)
                        && !w.told
                        && w.since.elapsed() > RELOAD_GRACE
                    {
                        w.told = true;
                        notify(format!(
                            "restart kube-apiserver on {} now: it shows no automatic-reload metrics, so it reads {} only after a restart",
                            host.name,
                            host.encryption_config.display()
                        ));
                    }
                    seen
                }
                ProofMode::Reload => metrics::reload_after(&samples, *since),
                ProofMode::Restart => {
                    if !w.told {
                        w.told = true;
                        notify(format!(
                            "restart kube-apiserver on {} now: it has no reload metrics, so it reads {} only after a restart",
                            host.name,
                            host.encryption_config.display()
                        ));
                    }
                    let ready = api.ready().await.unwrap_or(false);
                    if !ready {
                        w.saw_down = true;
                        return Observation::Waiting("not ready (restarting?)".into());
                    }
                    match metrics::process_start(&samples) {
                        Some(start) if start >= *since => Observation::Proven,
                        Some(start) => Observation::Waiting(format!(
                            "ready, but running since unix time {start:.0}, before the write: restart it"
                        )),
                        None if w.saw_down => Observation::Proven,
                        None => Observation::Waiting(
                            "ready, not yet seen restarting: restart it".into(),
                        ),
                    }
                }
            }
        }
    }
}

/// Waits until every apiserver proves `wanted`. `notify` receives messages
/// for the operator (restart requests).
pub async fn wait_all(
    apis: &[Apiserver],
    hosts: &[Host],
    wanted: &Wanted,
    settings: ProofSettings,
    notify: &mut dyn FnMut(String),
) -> Result<BTreeMap<String, &'static str>, ProofTimeout> {
    let start = Instant::now();
    let mut watch: Vec<HostWatch> = hosts
        .iter()
        .map(|_| HostWatch {
            since: Instant::now(),
            mode: None,
            proven: false,
            shows: String::new(),
            told: false,
            saw_down: false,
            named: false,
        })
        .collect();
    loop {
        for ((api, host), w) in apis.iter().zip(hosts).zip(watch.iter_mut()) {
            if w.proven {
                continue;
            }
            match observe(api, host, w, wanted, notify).await {
                Observation::Proven => w.proven = true,
                Observation::Waiting(shows) => w.shows = shows,
            }
        }
        // An operator watching a slow run should learn which apiserver holds it up,
        // not only when the timeout ends it.
        let unproven = watch.iter().filter(|w| !w.proven).count();
        for (host, w) in hosts.iter().zip(watch.iter_mut()) {
            if !w.proven
                && !w.named
                && start.elapsed() >= settings.poll * 5
                && (unproven < hosts.len() || start.elapsed() >= NAME_LAGGARD_AFTER)
            {
                w.named = true;
                notify(format!(
                    "waiting for {}",
                    lagging_words(&[(
                        host.name.clone(),
                        w.mode.map(ProofMode::as_str).unwrap_or("key-id"),
                        w.shows.clone(),
                    )])
                ));
            }
        }
        if watch.iter().all(|w| w.proven) {
            let modes = hosts
                .iter()
                .zip(&watch)
                .map(|(h, w)| {
                    (
                        h.name.clone(),
                        w.mode.map(ProofMode::as_str).unwrap_or("key-id"),
                    )
                })
                .collect();
            return Ok(modes);
        }
        if start.elapsed() >= settings.timeout {
            let what = match wanted {
                Wanted::Config { hash, .. } => format!("run config {hash}"),
                Wanted::KeyId { key_id_hash } => format!("see KMS key_id {key_id_hash}"),
            };
            return Err(ProofTimeout {
                what,
                waited: start.elapsed(),
                lagging: hosts
                    .iter()
                    .zip(&watch)
                    .filter(|(_, w)| !w.proven)
                    .map(|(h, w)| {
                        (
                            h.name.clone(),
                            w.mode.map(ProofMode::as_str).unwrap_or("key-id"),
                            w.shows.clone(),
                        )
                    })
                    .collect(),
            });
        }
        tokio::time::sleep(settings.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::ApiserverAccess;

    /// A host whose apiserver is a plain HTTP listener on loopback `port`.
    fn local_host(name: &str, port: u16, proof: ProofMode) -> Host {
        Host {
            name: name.into(),
            encryption_config: "/nonexistent/config.yaml".into(),
            keyring: None,
            apiserver: ApiserverAccess::Url {
                url: format!("http://127.0.0.1:{port}"),
                token: None,
                ca_file: None,
            },
            proof,
            ssh: None,
        }
    }

    /// An apiserver that does not answer is waited for and named, in every
    /// proof mode: never proven.
    #[tokio::test]
    async fn an_apiserver_that_does_not_answer_is_never_proven() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for (mode, wanted) in [
            (
                ProofMode::Auto,
                Wanted::Config {
                    hash: "sha256:aa".into(),
                    since: 0.0,
                },
            ),
            (
                ProofMode::Reload,
                Wanted::Config {
                    hash: "sha256:aa".into(),
                    since: 0.0,
                },
            ),
            (
                ProofMode::Restart,
                Wanted::Config {
                    hash: "sha256:aa".into(),
                    since: 0.0,
                },
            ),
            (
                ProofMode::Auto,
                Wanted::KeyId {
                    key_id_hash: "sha256:bb".into(),
                },
            ),
        ] {
            let host = local_host("gone", port, mode);
            let api = Apiserver::connect(&host).await.unwrap();
            let mut told = Vec::new();
            let e = wait_all(
                &[api],
                std::slice::from_ref(&host),
                &wanted,
                ProofSettings {
                    timeout: Duration::from_millis(300),
                    poll: Duration::from_millis(100),
                },
                &mut |m| told.push(m),
            )
            .await
            .unwrap_err();
            assert_eq!(e.lagging.len(), 1, "{mode:?}: {e}");
            assert_eq!(e.lagging[0].0, "gone");
            assert!(
                e.lagging[0].2.contains("unreachable") || e.lagging[0].2.contains("not ready"),
                "{mode:?}: {e}"
            );
        }
    }

    /// Restart mode without a start-time metric: an HTTP error from an
    /// apiserver that is up (here 500 on the first scrape) is not a restart,
    /// so it never becomes proof.
    #[tokio::test]
    async fn an_http_error_is_not_seen_as_a_restart() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut scrapes = 0;
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (status, body) = if head.starts_with("GET /metrics") {
                    scrapes += 1;
                    if scrapes == 1 {
                        ("500 Internal Server Error", "")
                    } else {
                        ("200 OK", "some_other_metric 1\n")
                    }
                } else {
                    ("200 OK", "ok")
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        });
        let host = local_host("up", port, ProofMode::Restart);
        let api = Apiserver::connect(&host).await.unwrap();
        let e = wait_all(
            &[api],
            std::slice::from_ref(&host),
            &Wanted::Config {
                hash: "sha256:aa".into(),
                since: 0.0,
            },
            ProofSettings {
                timeout: Duration::from_millis(500),
                poll: Duration::from_millis(100),
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(e.lagging[0].2.contains("not yet seen restarting"), "{e}");
    }
}
