//! The migration of a running cluster from a local KEK to a KEK in a PKCS#11
//! token with `rotator rotate-kek`: two control-plane hosts (stand-ins, each
//! with its own plugin and keyring copy) over one real etcd, one SoftHSM2
//! token both plugins reach (as a network HSM would be). The rotator config's
//! `kek.pkcs11` block makes its `keyring add` generate the new KEK in the
//! token; at the end every Secret is under the token KEK's key_id, the local
//! KEK is retired, and `etcd-inspect --decrypt-check` is clean.
#![allow(clippy::unwrap_used)]

use atrest_tests::cluster::{Cluster, Options, text};
use atrest_tests::plugin::Keyring;
use atrest_tests::softhsm::{MODULE, SoftHsm};

const PROVIDER: &str = "atrest";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_moves_a_cluster_from_a_local_kek_to_a_token_kek() {
    let hsm = SoftHsm::new("atrest").unwrap();
    let (k, v) = hsm.env();
    let mut opts = Options::new(2);
    opts.kms = vec!["a"];
    opts.config = format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: {PROVIDER}\n          endpoint: unix://{{KMS_DIR}}/a.sock\n          timeout: 3s\n      - identity: {{}}\n"
    );
    opts.run_flags
        .extend(["--plugin-settle".to_owned(), "2s".to_owned()]);
    opts.plugin_args = hsm.flags();
    opts.env = vec![(k.to_owned(), v)];
    opts.rotator_config_extra = format!(
        "kek:\n  pkcs11:\n    module: {MODULE}\n    token: atrest\n    pinFile: {}\n",
        hsm.pin_file().display()
    );
    let mut c = Cluster::start(opts).await;
    let first = Keyring::at(&c.hosts[0].keyring);
    let old = first.list().await.unwrap();
    assert_eq!(old.primary_kek().unwrap().kind, "local");
    let old_key_id = old.key_id.clone();
    c.seed(40, 0).await;

    let out = c.apply(&[], &["rotate-kek"]).await;
    assert!(out.status.success(), "{}", text(&out));

    let now = first.list().await.unwrap();
    let primary = now.primary_kek().unwrap();
    assert_eq!(primary.kind, "pkcs11", "{now:?}");
    assert_eq!(primary.pkcs11.as_ref().unwrap().token, "atrest");
    assert!(now.kek(old.primary).is_none(), "the local KEK was retired");
    assert_ne!(now.key_id, old_key_id);
    assert_eq!(
        Keyring::at(&c.hosts[1].keyring).list().await.unwrap(),
        now,
        "both hosts hold the same keyring"
    );
    for h in &c.hosts {
        assert_eq!(h.plugins[0].status().await.unwrap().key_id, now.key_id);
    }
    c.audit("kms-v2", Some(PROVIDER));
    drop(c);
    drop(hsm);
}
