//! Discovery on the kube-apiserver stand-in through the `kube` crate, both the
//! classic walk and aggregated discovery, then dynamic objects from it.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::EtcdServer;
use atrest_tests::standin::StandinProcess;
use atrest_tests::standin::*;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::discovery::{Discovery, Scope, verbs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_the_served_resources_and_dynamic_objects_work() {
    let etcd = EtcdServer::start();
    let standin = StandinProcess::start(
        etcd.endpoint(),
        &["--resources", "secrets,configmaps,serviceaccounts"],
    )
    .unwrap();
    let client = client(&standin, None);

    let version = client.apiserver_version().await.unwrap();
    assert!(version.git_version.contains("standin"), "{version:?}");

    for aggregated in [false, true] {
        let discovery = Discovery::new(client.clone());
        let discovery = if aggregated {
            discovery.run_aggregated().await.unwrap()
        } else {
            discovery.run().await.unwrap()
        };
        let mut found: Vec<String> = Vec::new();
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                assert_eq!(caps.scope, Scope::Namespaced);
                for verb in [verbs::LIST, verbs::GET, verbs::UPDATE, verbs::CREATE] {
                    assert!(caps.supports_operation(verb), "{} lacks {verb}", ar.plural);
                }
                found.push(format!("{}/{}:{}", ar.api_version, ar.plural, ar.kind));
            }
        }
        found.sort();
        assert_eq!(
            found,
            [
                "v1/configmaps:ConfigMap",
                "v1/secrets:Secret",
                "v1/serviceaccounts:ServiceAccount"
            ],
            "aggregated={aggregated}"
        );
    }

    // The rotator's path: ApiResource from discovery, DynamicObject list + no-op replace.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, _) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(ar, _)| ar.plural == "serviceaccounts")
        .unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "ns", &ar);
    let object: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &object).await.unwrap();
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let listed = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    let item = &listed.items[0];
    let again = api
        .replace("robot", &PostParams::default(), item)
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        item.metadata.resource_version
    );
    let (value, _) = raw(&etcd, "/registry/serviceaccounts/ns/robot")
        .await
        .unwrap();
    assert!(value.starts_with(b"{"), "no config: stored in plaintext");

    // Resources that are not served are 404.
    let response = standin.get("/api/v1/pods").await.unwrap();
    assert_eq!(response.status, 404);
}
