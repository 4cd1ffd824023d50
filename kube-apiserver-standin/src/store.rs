//! Objects in a real etcd, stored the way kube-apiserver's etcd3 store does:
//! key `<prefix>/<resource key path>/<ns>/<name>`, value = the transformer's
//! output for the object bytes (AAD = key), `resourceVersion` = etcd mod
//! revision (never stored), optimistic concurrency with etcd transactions,
//! paged lists at one revision with kube-apiserver's continue tokens.
//!
//! kube-apiserver stores built-in types as protobuf; the stand-in stores JSON
//! (encryption does not depend on the encoding, and the stand-in has no
//! protobuf schema of the Kubernetes types).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde_json::{Map, Value, json};
use storage_encryption::{key_prefix_for, object_key};

use super::apierror::ApiError;
use super::kms::new_uid;
use super::metrics::Metrics;
use super::reload::Current;
use super::resources::ServedResource;

/// How often an unconditional update retries when etcd changed under it.
const UPDATE_RETRIES: usize = 5;

/// The object store.
#[derive(Clone)]
pub struct Store {
    etcd: etcd_client::Client,
    prefix: String,
    encryption: Arc<Current>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// An object as read from etcd.
struct Existing {
    /// The stored object (no resourceVersion).
    object: Value,
    /// etcd mod revision.
    mod_revision: i64,
    /// The read was stale: the next write re-encrypts even when nothing changed.
    stale: bool,
}

fn etcd_error(e: etcd_client::Error) -> ApiError {
    ApiError::internal(format!("etcd: {e}"))
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// kube-apiserver's continue token: base64url(JSON {v, rv, start}), `start`
/// relative to the listed key prefix.
fn encode_continue(start: &str, rv: i64) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(String, i64), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid continue token: {why}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad("not base64url"))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not JSON"))?;
    if value["v"] != "meta.k8s.io/v1" {
        return Err(bad("unknown version"));
    }
    let rv = value["rv"].as_i64().ok_or_else(|| bad("no rv"))?;
    let start = value["start"].as_str().ok_or_else(|| bad("no start"))?;
    if start.is_empty() || start.starts_with('/') || start.split('/').any(|s| s == "..") {
        return Err(bad("start key is not valid"));
    }
    Ok((start.to_owned(), rv))
}

fn with_resource_version(mut object: Value, revision: i64) -> Value {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(revision.to_string()));
    }
    object
}

/// A DNS-1123 subdomain (what names and namespaces must be); keeps '/' out of keys.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks a namespace or name from the URL.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} {name:?} is invalid: must be a lowercase RFC 1123 subdomain"
        )))
    }
}

fn metadata(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let obj = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

/// `metadata.resourceVersion` of a request body, if set.
fn requested_revision(body: &mut Value) -> Result<Option<i64>, ApiError> {
    match metadata(body)?.get("resourceVersion") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!("metadata.resourceVersion: invalid value {s:?}"))
        }),
        Some(_) => Err(ApiError::bad_request(
            "metadata.resourceVersion must be a string",
        )),
    }
}

/// Normalizes a request body into the object to store: type meta defaulted
/// from the URL, namespace from the URL, no resourceVersion, Secret
/// `stringData` merged into `data` (as kube-apiserver does).
fn prepare(r: &ServedResource, ns: &str, mut body: Value) -> Result<Value, ApiError> {
    let obj = body
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    for (field, want) in [("apiVersion", "v1"), ("kind", r.kind)] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == want || s.is_empty() => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "{field} {other} does not match the URL ({want})"
                )));
            }
        }
        obj.insert(field.into(), json!(want));
    }
    if r.name == "secrets"
        && let Some(Value::Object(string_data)) = obj.remove("stringData")
    {
        let data = obj.entry("data").or_insert_with(|| json!({}));
        let data = data
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("data must be an object"))?;
        for (k, v) in string_data {
            let text = v
                .as_str()
                .ok_or_else(|| ApiError::bad_request(format!("stringData.{k} must be a string")))?;
            data.insert(k, json!(STANDARD.encode(text)));
        }
    }
    let meta = metadata(&mut body)?;
    match meta.get("namespace") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == ns || s.is_empty() => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    meta.insert("namespace".into(), json!(ns));
    meta.remove("resourceVersion");
    Ok(body)
}

fn name_of(object: &mut Value) -> Result<String, ApiError> {
    match metadata(object)?.get("name") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ApiError::bad_request(
            "metadata.name: Required value: name or generateName is required",
        )),
    }
}

impl Store {
    /// A store on `etcd` under `prefix` (e.g. `/registry`).
    pub fn new(
        etcd: etcd_client::Client,
        prefix: String,
        encryption: Arc<Current>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            etcd,
            prefix,
            encryption,
            metrics,
        }
    }

    /// etcd answers within 2 s.
    pub async fn ping(&self) -> Result<(), String> {
        let mut etcd = self.etcd.clone();
        match tokio::time::timeout(Duration::from_secs(2), etcd.status()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("etcd: {e}")),
            Err(_) => Err("etcd: no answer within 2s".into()),
        }
    }

    fn key(&self, r: &ServedResource, ns: &str, name: &str) -> String {
        object_key(&r.group_resource(), Some(ns), name, &self.prefix)
    }

    /// Decrypts and decodes a stored value.
    async fn decode(
        &self,
        r: &ServedResource,
        key: &str,
        raw: &[u8],
    ) -> Result<(Value, bool), ApiError> {
        let encryption = self.encryption.get();
        let decrypted = encryption
            .read(&r.group_resource(), key, raw, &self.metrics)
            .await
            .map_err(|e| ApiError::internal(format!("unable to transform key {key:?}: {e}")))?;
        let object = serde_json::from_slice(decrypted.plaintext.expose()).map_err(|e| {
            ApiError::internal(format!("unable to decode object at key {key:?}: {e}"))
        })?;
        Ok((object, decrypted.read.is_stale()))
    }

    async fn read(&self, r: &ServedResource, key: &str) -> Result<Option<Existing>, ApiError> {
        let mut etcd = self.etcd.clone();
        let response = etcd.get(key, None).await.map_err(etcd_error)?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let (object, stale) = self.decode(r, key, kv.value()).await?;
        Ok(Some(Existing {
            object,
            mod_revision: kv.mod_revision(),
            stale,
        }))
    }

    fn encode(&self, r: &ServedResource, key: &str, object: &Value) -> Result<Vec<u8>, ApiError> {
        let mut plain = serde_json::to_vec(object).map_err(ApiError::internal)?;
        plain.push(b'\n'); // what kube-apiserver's JSON serializer writes
        let encryption = self.encryption.get();
        encryption
            .write(&r.group_resource(), key, &plain, &self.metrics)
            .map_err(|e| ApiError::internal(format!("unable to transform key {key:?}: {e}")))
    }

    /// GET one object.
    pub async fn get(&self, r: &ServedResource, ns: &str, name: &str) -> Result<Value, ApiError> {
        let key = self.key(r, ns, name);
        let existing = self
            .read(r, &key)
            .await?
            .ok_or_else(|| ApiError::not_found(r.name, name))?;
        Ok(with_resource_version(
            existing.object,
            existing.mod_revision,
        ))
    }

    /// LIST, one namespace or all, paged by `limit` (0 = all) and `continue`.
    pub async fn list(
        &self,
        r: &ServedResource,
        ns: Option<&str>,
        limit: i64,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut list_prefix = key_prefix_for(&r.group_resource(), &self.prefix);
        if let Some(ns) = ns {
            list_prefix.push_str(ns);
            list_prefix.push('/');
        }
        let (start, revision) = match continue_token {
            Some(token) => {
                let (start, rv) = decode_continue(token)?;
                (start, rv)
            }
            None => (String::new(), 0),
        };
        let mut options = GetOptions::new().with_range(prefix_end(&list_prefix));
        if limit > 0 {
            options = options.with_limit(limit);
        }
        // rv -1 (from a 410 answer) continues at the latest revision.
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut etcd = self.etcd.clone();
        let response = match etcd
            .get(format!("{list_prefix}{start}"), Some(options))
            .await
        {
            Ok(r) => r,
            Err(e) if is_compacted(&e) && continue_token.is_some() => {
                return Err(ApiError::expired_continue(encode_continue(&start, -1)));
            }
            Err(e) => return Err(etcd_error(e)),
        };
        let list_revision = if revision > 0 {
            revision
        } else {
            response.header().map(|h| h.revision()).unwrap_or_default()
        };
        let mut items = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let (mut object, _) = self.decode(r, &key, kv.value()).await?;
            // Items of a list carry no apiVersion/kind (the list has them).
            if let Some(obj) = object.as_object_mut() {
                obj.remove("apiVersion");
                obj.remove("kind");
            }
            items.push(with_resource_version(object, kv.mod_revision()));
        }
        let mut metadata = json!({"resourceVersion": list_revision.to_string()});
        if response.more()
            && let Some(last) = response.kvs().last()
        {
            let last = String::from_utf8_lossy(last.key());
            let rest = last.strip_prefix(&list_prefix).unwrap_or(&last);
            metadata["continue"] = json!(encode_continue(&format!("{rest}\0"), list_revision));
            let remaining = response.count() - response.kvs().len() as i64;
            if remaining > 0 {
                metadata["remainingItemCount"] = json!(remaining);
            }
        }
        Ok(json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": "v1",
            "metadata": metadata,
            "items": items,
        }))
    }

    /// POST: create; 409 AlreadyExists when the key exists.
    pub async fn create(
        &self,
        r: &ServedResource,
        ns: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let mut body = body;
        if requested_revision(&mut body)?.is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut object = prepare(r, ns, body)?;
        let meta = metadata(&mut object)?;
        if !matches!(meta.get("name"), Some(Value::String(s)) if !s.is_empty())
            && let Some(Value::String(base)) = meta.get("generateName")
        {
            let suffix: String = new_uid().replace('-', "").chars().take(5).collect();
            let name = format!("{base}{suffix}");
            meta.insert("name".into(), json!(name));
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert(
            "creationTimestamp".into(),
            json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        );
        let name = name_of(&mut object)?;
        check_name("metadata.name", &name)?;
        let key = self.key(r, ns, &name);
        let value = self.encode(r, &key, &object)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        let mut etcd = self.etcd.clone();
        let response = etcd.txn(txn).await.map_err(etcd_error)?;
        if !response.succeeded() {
            return Err(ApiError::already_exists(r.name, &name));
        }
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        Ok(with_resource_version(object, revision))
    }

    /// PUT: update. With `metadata.resourceVersion` it must be current (else 409);
    /// without, unconditional. A no-op update of a non-stale read writes nothing and
    /// returns the same resourceVersion; a stale read is re-encrypted and written.
    pub async fn update(
        &self,
        r: &ServedResource,
        ns: &str,
        name: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let mut body = body;
        let precondition = requested_revision(&mut body)?;
        let body_name = name_of(&mut body)?;
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = self.key(r, ns, name);
        for _ in 0..UPDATE_RETRIES {
            let existing = self
                .read(r, &key)
                .await?
                .ok_or_else(|| ApiError::not_found(r.name, name))?;
            if precondition.is_some_and(|rv| rv != existing.mod_revision) {
                return Err(ApiError::conflict(r.name, name));
            }
            let mut object = prepare(r, ns, body.clone())?;
            // uid and creationTimestamp are the server's, as in kube-apiserver.
            let old_meta = existing.object.get("metadata").cloned().unwrap_or_default();
            let meta = metadata(&mut object)?;
            for field in ["uid", "creationTimestamp"] {
                match old_meta.get(field) {
                    Some(v) => meta.insert(field.into(), v.clone()),
                    None => meta.remove(field),
                };
            }
            if object == existing.object && !existing.stale {
                return Ok(with_resource_version(object, existing.mod_revision));
            }
            let value = self.encode(r, &key, &object)?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    existing.mod_revision,
                )])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            let mut etcd = self.etcd.clone();
            let response = etcd.txn(txn).await.map_err(etcd_error)?;
            if response.succeeded() {
                let revision = response.header().map(|h| h.revision()).unwrap_or_default();
                return Ok(with_resource_version(object, revision));
            }
            if precondition.is_some() {
                return Err(ApiError::conflict(r.name, name));
            }
        }
        Err(ApiError::conflict(r.name, name))
    }

    /// DELETE: removes the object and returns it as it was.
    pub async fn delete(
        &self,
        r: &ServedResource,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = self.key(r, ns, name);
        for _ in 0..UPDATE_RETRIES {
            let existing = self
                .read(r, &key)
                .await?
                .ok_or_else(|| ApiError::not_found(r.name, name))?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    existing.mod_revision,
                )])
                .and_then([TxnOp::delete(key.clone(), None)]);
            let mut etcd = self.etcd.clone();
            if etcd.txn(txn).await.map_err(etcd_error)?.succeeded() {
                return Ok(with_resource_version(
                    existing.object,
                    existing.mod_revision,
                ));
            }
        }
        Err(ApiError::conflict(r.name, name))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_refuse_traversal() {
        let token = encode_continue("ns/a\0", 42);
        assert_eq!(decode_continue(&token).unwrap(), ("ns/a\0".to_owned(), 42));
        let evil = URL_SAFE_NO_PAD.encode(r#"{"v":"meta.k8s.io/v1","rv":1,"start":"../x"}"#);
        assert_eq!(decode_continue(&evil).unwrap_err().code, 400);
        assert_eq!(decode_continue("%%%").unwrap_err().code, 400);
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end("/registry/secrets/"),
            b"/registry/secrets0".to_vec()
        );
    }

    #[test]
    fn names_must_be_subdomains() {
        assert!(valid_name("db-password.v1"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
        assert!(!valid_name("Upper"));
    }
}
