//! The kube-apiserver stand-in through the `kube` crate: objects land in a real
//! etcd encrypted with the config's first provider, paged lists, conflicts,
//! no-op updates, 404s, undecryptable values, compacted continue tokens.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use atrest_tests::etcd::EtcdServer;
use atrest_tests::standin::StandinProcess;
use atrest_tests::standin::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::Value;

const CANARY: &[u8] = b"canary-plaintext-4b1d";

fn secret(name: &str) -> Secret {
    secret_object(name, "password", CANARY)
}

fn api_status(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

async fn start(etcd: &EtcdServer, dir: &std::path::Path) -> StandinProcess {
    let config = dir.join("encryption.yaml");
    write_config(&config, &aescbc_config(&[("key1", 1)]));
    StandinProcess::start(
        etcd.endpoint(),
        &["--encryption-provider-config", config.to_str().unwrap()],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_encrypted_in_etcd_listed_in_pages_and_updated_with_conflicts() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let standin = start(&etcd, dir.path()).await;
    let client = client(&standin, None);
    let pp = PostParams::default();

    for (ns, n) in [("ns-a", 5), ("ns-b", 3)] {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        for i in 0..n {
            let created = api.create(&pp, &secret(&format!("s{i}"))).await.unwrap();
            assert!(created.metadata.uid.is_some());
            assert!(created.metadata.creation_timestamp.is_some());
        }
    }
    // Same key as kube-apiserver, ciphertext with the first key's prefix, no plaintext.
    let (value, mod_revision) = raw(&etcd, "/registry/secrets/ns-a/s0").await.unwrap();
    assert!(
        value.starts_with(b"k8s:enc:aescbc:v1:key1:"),
        "{:?}",
        String::from_utf8_lossy(&value[..30.min(value.len())])
    );
    let canary_b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, CANARY);
    let text = String::from_utf8_lossy(&value);
    assert!(!text.contains(&canary_b64) && !text.contains("s0"));

    // configmaps match no rule: plaintext JSON.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns-a");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("plain".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
        ..Default::default()
    };
    cms.create(&pp, &cm).await.unwrap();
    let (value, _) = raw(&etcd, "/registry/configmaps/ns-a/plain").await.unwrap();
    let stored: Value = serde_json::from_slice(&value).unwrap();
    assert_eq!(stored["data"]["k"], "v");
    assert_eq!(stored["kind"], "ConfigMap");
    assert!(stored["metadata"].get("resourceVersion").is_none());

    // GET: resourceVersion is the etcd mod revision.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ns-a");
    let s0 = secrets.get("s0").await.unwrap();
    assert_eq!(s0.metadata.resource_version, Some(mod_revision.to_string()));
    assert_eq!(s0.data.as_ref().unwrap()["password"].0, CANARY);

    // Paged list across namespaces, every page at one revision.
    let all: Api<Secret> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut revisions = Vec::new();
    let mut params = ListParams::default().limit(3);
    let mut pages = 0;
    loop {
        let page = all.list(&params).await.unwrap();
        pages += 1;
        revisions.push(page.metadata.resource_version.clone().unwrap());
        names.extend(page.items.iter().map(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap(),
                s.metadata.name.as_deref().unwrap()
            )
        }));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        [
            "ns-a/s0", "ns-a/s1", "ns-a/s2", "ns-a/s3", "ns-a/s4", "ns-b/s0", "ns-b/s1", "ns-b/s2"
        ]
    );
    assert!(
        revisions.iter().all(|r| *r == revisions[0]),
        "{revisions:?}"
    );
    let ns_b: Api<Secret> = Api::namespaced(client.clone(), "ns-b");
    assert_eq!(
        ns_b.list(&ListParams::default()).await.unwrap().items.len(),
        3
    );

    // No-op update of a fresh (non-stale) read: no etcd write, same resourceVersion.
    let same = secrets.replace("s0", &pp, &s0).await.unwrap();
    assert_eq!(same.metadata.resource_version, s0.metadata.resource_version);
    assert_eq!(
        raw(&etcd, "/registry/secrets/ns-a/s0").await.unwrap().1,
        mod_revision
    );

    // A real change bumps the revision; the old resourceVersion then conflicts.
    let mut changed = s0.clone();
    changed
        .data
        .as_mut()
        .unwrap()
        .insert("extra".into(), ByteString(b"x".to_vec()));
    let updated = secrets.replace("s0", &pp, &changed).await.unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        s0.metadata.resource_version
    );
    assert_eq!(updated.metadata.uid, s0.metadata.uid);
    let (code, reason) = api_status(secrets.replace("s0", &pp, &s0).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    // Without a resourceVersion the update is unconditional.
    let mut unconditional = s0.clone();
    unconditional.metadata.resource_version = None;
    secrets.replace("s0", &pp, &unconditional).await.unwrap();
    assert!(
        !secrets
            .get("s0")
            .await
            .unwrap()
            .data
            .unwrap()
            .contains_key("extra")
    );

    // Create of an existing name, get/delete of a missing one.
    let (code, reason) = api_status(secrets.create(&pp, &secret("s1")).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    secrets
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    let (code, reason) = api_status(secrets.get("s1").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert!(raw(&etcd, "/registry/secrets/ns-a/s1").await.is_none());
    let (code, _) = api_status(secrets.replace("s1", &pp, &secret("s1")).await.unwrap_err());
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_no_provider_can_read_is_an_internal_error_naming_the_key() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let standin = start(&etcd, dir.path()).await;
    // Written with a key the config does not have (a valid aescbc payload shape).
    let mut value = b"k8s:enc:aescbc:v1:gone:".to_vec();
    value.extend_from_slice(&[7u8; 48]);
    etcd.put("/registry/secrets/ns/lost", &value);
    let secrets: Api<Secret> = Api::namespaced(client(&standin, None), "ns");
    match secrets.get("lost").await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 500);
            assert!(
                s.message
                    .contains("unable to transform key \"/registry/secrets/ns/lost\""),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 500 Status, got {other:?}"),
    }
    // A list that meets it fails the same way.
    let (code, _) = api_status(secrets.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_continue_token_is_410_with_a_token_that_resumes() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let standin = start(&etcd, dir.path()).await;
    let secrets: Api<Secret> = Api::namespaced(client(&standin, None), "ns");
    for i in 0..5 {
        secrets
            .create(&PostParams::default(), &secret(&format!("s{i}")))
            .await
            .unwrap();
    }
    let first = secrets.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    // Advance and compact past the list's revision.
    let mut etcd_client = etcd.client().await;
    let revision = etcd_client
        .put("/registry/unrelated", "x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    etcd_client.compact(revision, None).await.unwrap();

    let path = format!("/api/v1/namespaces/ns/secrets?limit=2&continue={token}");
    let response = standin.request("GET", &path, None, None).await.unwrap();
    assert_eq!(response.status, 410, "{}", response.body);
    let status: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Expired");
    let fresh = status["metadata"]["continue"].as_str().unwrap().to_owned();
    let mut rest = Vec::new();
    let mut params = ListParams::default().limit(2).continue_token(&fresh);
    loop {
        let page = secrets.list(&params).await.unwrap();
        rest.extend(page.items.into_iter().map(|s| s.metadata.name.unwrap()));
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => params = params.continue_token(&t),
            _ => break,
        }
    }
    assert_eq!(rest, ["s2", "s3", "s4"]);
}
