//! Reading etcd the way `etcdctl` connects: endpoints, optional mutual TLS,
//! and a paged range scan pinned to one revision.
//!
//! The scan is the only etcd call this tool makes (besides none: it never
//! writes). Pages are fetched one ahead of the consumer so that network time
//! overlaps with classification, and at most two pages are held in memory at
//! any time, however many keys the prefix holds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KvClient, TlsOptions,
};
use tokio::sync::mpsc;

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
        let urls = self.endpoint_urls();
        let client = Client::connect(&urls, Some(self.options()?))
            .await
            .map_err(|source| EtcdError::Connect {
                endpoints: urls.join(","),
                source,
            })?;
        Ok(client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES))
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

/// One key and its stored value.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The etcd key.
    pub key: Vec<u8>,
    /// The stored bytes (possibly plaintext: never logged).
    pub value: Vec<u8>,
}

impl std::fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .finish()
    }
}

/// A page of the scan.
#[derive(Debug)]
pub struct Page {
    /// The revision every page of this scan is read at.
    pub revision: i64,
    /// Keys in ascending order.
    pub kvs: Vec<KeyValue>,
}

/// A paged scan of `[prefix, prefix_end)` at one revision.
#[derive(Debug)]
pub struct Scan {
    rx: mpsc::Receiver<Result<Page, EtcdError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scan {
    /// Starts scanning; the first page is requested right away and the next
    /// one while the caller works on the current one.
    /// `endpoints` is only used in error messages.
    pub fn start(kv: KvClient, endpoints: String, prefix: Vec<u8>, page_size: i64) -> Self {
        // Capacity 1: one page waiting while the consumer holds another.
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(fetch_pages(kv, endpoints, prefix, page_size.max(1), tx));
        Scan { rx, task }
    }

    /// The next page, `None` at the end of the range.
    pub async fn next_page(&mut self) -> Option<Result<Page, EtcdError>> {
        self.rx.recv().await
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fetch_pages(
    mut kv: KvClient,
    endpoints: String,
    prefix: Vec<u8>,
    page_size: i64,
    tx: mpsc::Sender<Result<Page, EtcdError>>,
) {
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut revision = 0i64;
    let mut limit = page_size;
    loop {
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(limit)
            .with_revision(revision);
        let mut resp = match kv.get(from.clone(), Some(opts)).await {
            Ok(r) => r,
            Err(e) if is_too_large(&e) => {
                if limit == 1 {
                    let _ = tx
                        .send(Err(EtcdError::TooLarge {
                            from: String::from_utf8_lossy(&from).into_owned(),
                            limit: MAX_RESPONSE_BYTES,
                        }))
                        .await;
                    return;
                }
                // Big values: ask for fewer keys per page rather than a bigger buffer.
                limit = (limit / 2).max(1);
                continue;
            }
            Err(source) => {
                let _ = tx
                    .send(Err(EtcdError::Range {
                        endpoints,
                        from: String::from_utf8_lossy(&from).into_owned(),
                        revision,
                        source,
                    }))
                    .await;
                return;
            }
        };
        if revision == 0 {
            match resp.header() {
                Some(h) => revision = h.revision(),
                None => {
                    let _ = tx.send(Err(EtcdError::NoHeader)).await;
                    return;
                }
            }
        }
        let more = resp.more();
        let kvs: Vec<KeyValue> = resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (key, value) = kv.into_key_value();
                KeyValue { key, value }
            })
            .collect();
        let next_from = kvs.last().map(|kv| {
            let mut k = kv.key.clone();
            k.push(0);
            k
        });
        let page_len = kvs.len();
        if tx.send(Ok(Page { revision, kvs })).await.is_err() {
            return; // consumer gone
        }
        match next_from {
            Some(k) if more && page_len > 0 => from = k,
            _ => return,
        }
        // Grow back toward the requested page size after a shrink.
        limit = (limit * 2).min(page_size);
    }
}

fn is_too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            // tonic's decoder refuses an oversized response with this
            // status; etcd itself also uses OutOfRange (future revision), so
            // the message is checked too.
            matches!(
                s.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ) && s.message().contains("message length too large")
        }
        _ => false,
    }
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

    #[test]
    fn debug_hides_values() {
        let kv = KeyValue {
            key: b"/registry/secrets/a/b".to_vec(),
            value: b"CANARY".to_vec(),
        };
        let s = format!("{kv:?}");
        assert!(!s.contains("CANARY"));
        assert!(s.contains("/registry/secrets/a/b"));
    }
}
