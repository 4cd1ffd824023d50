//! Reaching etcd the way `etcdctl` connects: endpoints, optional mutual TLS.
//! The range scan over these connections is in [`crate::scan`], the watch
//! that reads history (`--history`) in [`crate::history`]; the tool never
//! writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, KvClient, TlsOptions, WatchClient,
};

/// How to reach etcd; mirrors etcdctl's flags.
#[derive(Debug, Clone)]
pub struct EtcdConnection {
    /// `http(s)://host:port` URLs (a bare `host:port` gets `http://`, or
    /// `https://` when TLS material is given).
    pub endpoints: Vec<String>,
    /// Trusted CA bundle (PEM) to verify the server certificate.
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for client-cert auth; needs `key`.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for `cert`.
    pub key: Option<PathBuf>,
    /// Dial timeout per endpoint.
    pub dial_timeout: Duration,
    /// Timeout of each range request.
    pub command_timeout: Duration,
}

/// What went wrong talking to etcd. Messages name the endpoint, file or key.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file could not be read.
    #[error("cannot read {what} file {path}: {source}")]
    ReadTlsFile {
        /// Which flag the file came from (`--cacert`...).
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `--cert` without `--key` or the reverse.
    #[error("--cert and --key must be given together")]
    HalfIdentity,
    /// Building the client or the first request failed.
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        /// Endpoints, comma-separated.
        endpoints: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// A range request failed (the first one also when etcd is unreachable
    /// or refuses the client; later ones e.g. when the revision was compacted).
    #[error(
        "etcd at {endpoints}: range read from key {from:?} at revision {revision} failed: {source}"
    )]
    Range {
        /// Endpoints, comma-separated.
        endpoints: String,
        /// The first key of the failed page.
        from: String,
        /// The pinned revision (0 before the first page).
        revision: i64,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// Even a single key did not fit the largest accepted response.
    #[error("etcd value at or after key {from:?} is larger than {limit} bytes; cannot read it")]
    TooLarge {
        /// The key the page started at.
        from: String,
        /// The response size limit.
        limit: usize,
    },
    /// etcd answered without a header (never seen from a real server).
    #[error("etcd response without a header")]
    NoHeader,
    /// The history watch failed or was cancelled (`--history`).
    #[error("etcd at {endpoints}: history watch from revision {from} failed: {reason}")]
    Watch {
        /// Endpoints, comma-separated.
        endpoints: String,
        /// The revision the watch started at.
        from: i64,
        /// What etcd or the client said.
        reason: String,
    },
}

/// Largest gRPC response accepted. A Kubernetes object is at most ~1.5 MiB
/// (etcd's default request limit); pages that would exceed this are retried
/// with fewer keys, so memory stays bounded.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

impl EtcdConnection {
    fn uses_tls(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some()
    }

    fn endpoint_urls(&self) -> Vec<String> {
        let scheme = if self.uses_tls() {
            "https://"
        } else {
            "http://"
        };
        self.endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}{e}")
                }
            })
            .collect()
    }

    fn options(&self) -> Result<ConnectOptions, EtcdError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.dial_timeout)
            .with_timeout(self.command_timeout);
        if self.uses_tls()
            || self
                .endpoint_urls()
                .iter()
                .any(|e| e.starts_with("https://"))
        {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.cacert {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--cacert")?));
            }
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(read(c, "--cert")?, read(k, "--key")?));
                }
                (None, None) => {}
                _ => return Err(EtcdError::HalfIdentity),
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    /// Builds a KV client (no request is sent yet).
    pub async fn kv_client(&self) -> Result<KvClient, EtcdError> {
        Ok(self
            .client()
            .await?
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES))
    }

    /// Builds a KV and a watch client on one connection (`--history`).
    pub async fn kv_and_watch_clients(&self) -> Result<(KvClient, WatchClient), EtcdError> {
        let client = self.client().await?;
        Ok((
            client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
        ))
    }

    async fn client(&self) -> Result<Client, EtcdError> {
        let urls = self.endpoint_urls();
        Client::connect(&urls, Some(self.options()?))
            .await
            .map_err(|source| EtcdError::Connect {
                endpoints: urls.join(","),
                source,
            })
    }

    /// Endpoints as given, for messages.
    pub fn endpoints_display(&self) -> String {
        self.endpoint_urls().join(",")
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::ReadTlsFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The end of the range holding every key that starts with `prefix`
/// (etcd's "prefix end": increment the last byte that is not 0xff).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix or all 0xff: the whole key space from here ("\0" means "to the end").
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/registry"), b"/registrz".to_vec());
        assert_eq!(prefix_end(b"/registry/"), b"/registry0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
