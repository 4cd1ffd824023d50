//! One kube-apiserver, through the `kube` client: raw requests (so the
//! rotator sees status codes and `Retry-After` itself), `/metrics`, `/readyz`.

use std::time::Duration;

use kube::client::Body;
use kube::config::{KubeConfigOptions, Kubeconfig};
use secrecy::SecretString;

use crate::metrics::{self, Sample};
use crate::targets::{ApiserverAccess, Host};

/// Could not build a client or finish a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The URL or kubeconfig is unusable.
    #[error("apiserver of {host}: {message}")]
    Config {
        /// Host name.
        host: String,
        /// What is wrong.
        message: String,
    },
    /// The request failed before an HTTP status came back (connection, TLS...).
    #[error("apiserver of {host}: {method} {path}: {source}")]
    Transport {
        /// Host name.
        host: String,
        /// Method.
        method: String,
        /// Path requested.
        path: String,
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
    /// An unexpected status.
    #[error("apiserver of {host}: {method} {path}: HTTP {status}: {body}")]
    Status {
        /// Host name.
        host: String,
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Status code.
        status: u16,
        /// The start of the response body (a metav1.Status, never object data we sent).
        body: String,
    },
}

/// A raw response.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` in seconds, when present.
    pub retry_after: Option<Duration>,
    /// The body.
    pub body: Vec<u8>,
}

/// A client for one host's apiserver.
#[derive(Clone)]
pub struct Apiserver {
    /// Host name (for messages).
    pub host: String,
    client: kube::Client,
}

impl std::fmt::Debug for Apiserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apiserver")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Apiserver {
    /// Builds the client for `host` (no request is made).
    pub async fn connect(host: &Host) -> Result<Self, ApiError> {
        let cfg_err = |message: String| ApiError::Config {
            host: host.name.clone(),
            message,
        };
        let mut config = match &host.apiserver {
            ApiserverAccess::Url {
                url,
                token,
                ca_file,
            } => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| cfg_err(format!("url {url:?}: {e}")))?;
                let mut c = kube::Config::new(uri);
                if let Some(t) = token {
                    c.auth_info.token = Some(SecretString::from(t.expose().to_owned()));
                }
                c.root_cert_file = ca_file.clone();
                c
            }
            ApiserverAccess::Kubeconfig { path, context } => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| cfg_err(format!("kubeconfig {}: {e}", path.display())))?;
                let opts = KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| cfg_err(format!("kubeconfig {}: {e}", path.display())))?
            }
        };
        // The rotator retries itself, honouring Retry-After and counting.
        config.default_retry = false;
        config.read_timeout = Some(Duration::from_secs(60));
        let client = kube::Client::try_from(config).map_err(|e| cfg_err(e.to_string()))?;
        Ok(Apiserver {
            host: host.name.clone(),
            client,
        })
    }

    /// The underlying kube client (discovery).
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Sends one request; any HTTP status is a success here.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ApiError> {
        let transport = |source| ApiError::Transport {
            host: self.host.clone(),
            method: method.to_string(),
            path: path.to_owned(),
            source: Box::new(source),
        };
        let mut builder = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header("Accept", "application/json");
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let req = builder
            .body(Body::from(body.unwrap_or_default()))
            .map_err(|e| ApiError::Config {
                host: self.host.clone(),
                message: format!("bad request {path}: {e}"),
            })?;
        let res = self.client.send(req).await.map_err(transport)?;
        let status = res.status().as_u16();
        let retry_after = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = res
            .into_body()
            .collect_bytes()
            .await
            .map_err(transport)?
            .to_vec();
        Ok(Response {
            status,
            retry_after,
            body,
        })
    }

    /// `GET path`, requiring 200.
    pub async fn get_ok(&self, path: &str) -> Result<Vec<u8>, ApiError> {
        let r = self.request(http::Method::GET, path, None).await?;
        if r.status != 200 {
            return Err(ApiError::Status {
                host: self.host.clone(),
                method: "GET".into(),
                path: path.to_owned(),
                status: r.status,
                body: String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned(),
            });
        }
        Ok(r.body)
    }

    /// Scrapes `/metrics`.
    pub async fn metrics(&self) -> Result<Vec<Sample>, ApiError> {
        let body = self.get_ok("/metrics").await?;
        Ok(metrics::parse(&String::from_utf8_lossy(&body)))
    }

    /// `GET /readyz` answered 200.
    pub async fn ready(&self) -> Result<bool, ApiError> {
        Ok(self
            .request(http::Method::GET, "/readyz", None)
            .await?
            .status
            == 200)
    }
}
