//! The real kms-plugin against every rule of the KMS v2 contract
//! (as `proto/kms/v2/api.proto` and the README state it), over a socket file and
//! over an abstract socket, and with its primary KEK in a SoftHSM2 token. Each
//! behaviour is one function below; `over_both_sockets!` makes a test of it per
//! transport and one with the HSM-backed keyring.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use anyhow::{Result, ensure};
use atrest_proto::kms::v2::{StatusRequest, StatusResponse};
use atrest_tests::plugin::{
    KmsClient, PluginOptions, PluginProcess, Transport, WAIT, decrypt, encrypt, eventually, seed,
};
use atrest_tests::softhsm::{SoftHsm, hsm_keyring};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

async fn start(transport: Transport) -> Result<PluginProcess> {
    PluginProcess::start(PluginOptions::new().transport(transport)).await
}

/// A plugin whose primary KEK lives in a SoftHSM2 token of its own (KEK 2;
/// KEK 1 is the local KEK `init` made, decrypt-only). The token store must
/// outlive the plugin: the caller keeps it.
async fn start_hsm() -> Result<(SoftHsm, PluginProcess)> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let (k, v) = hsm.env();
    let mut options = PluginOptions::new().keyring(keyring.path()).env(k, v);
    for flag in hsm.flags() {
        options = options.arg(&flag);
    }
    let plugin = PluginProcess::start(options).await?;
    // The keyring's directory goes with the plugin's.
    std::mem::forget(dir);
    Ok((hsm, plugin))
}

macro_rules! over_both_sockets {
    ($($behaviour:ident),* $(,)?) => {
        mod file_socket {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $behaviour() -> anyhow::Result<()> {
                    super::$behaviour(super::start(super::Transport::File).await?).await
                }
            )*
        }
        mod hsm_keyring {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $behaviour() -> anyhow::Result<()> {
                    let (hsm, plugin) = super::start_hsm().await?;
                    let result = super::$behaviour(plugin).await;
                    drop(hsm);
                    result
                }
            )*
        }
        mod abstract_socket {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $behaviour() -> anyhow::Result<()> {
                    super::$behaviour(super::start(super::Transport::Abstract).await?).await
                }
            )*
        }
    };
}

over_both_sockets!(
    status_reports_version_v2_healthy_and_a_bounded_key_id,
    encrypt_of_a_seed_meets_the_response_rules,
    encrypt_twice_gives_different_ciphertexts,
    distinct_plaintexts_give_distinct_responses,
    decrypt_returns_the_encrypted_plaintext,
    decrypt_refuses_unknown_key_ids,
    decrypt_refuses_every_single_byte_flip,
    decrypt_refuses_every_truncation,
    decrypt_refuses_an_empty_ciphertext,
    decrypt_refuses_ciphertexts_it_did_not_produce,
    decrypt_refuses_a_ciphertext_under_another_valid_key_id,
    encrypt_refuses_an_empty_plaintext,
    encrypt_refuses_oversized_plaintexts,
    encrypt_accepts_every_size_up_to_its_limit_within_1024_bytes,
    methods_answer_on_their_full_grpc_names,
);

/// Asserts a Decrypt was refused with `code` (never answered with a plaintext).
fn assert_refused(result: Result<Vec<u8>, tonic::Status>, code: Code, what: &str) {
    match result {
        Ok(plaintext) => panic!(
            "Decrypt of {what} was answered with a {}-byte plaintext",
            plaintext.len()
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "Decrypt of {what}: wrong code ({status:?})"
            );
            assert!(
                !status.message().is_empty(),
                "Decrypt of {what}: refusal says nothing"
            );
        }
    }
}

async fn healthy_status(plugin: &PluginProcess) -> Result<StatusResponse> {
    eventually(WAIT, "Status healthz == \"ok\"", || async {
        let status = plugin.status().await?;
        Ok((status.healthz == "ok").then_some(status))
    })
    .await
}

async fn status_reports_version_v2_healthy_and_a_bounded_key_id(
    plugin: PluginProcess,
) -> Result<()> {
    let first = healthy_status(&plugin).await?;
    for _ in 0..20 {
        let status = plugin.status().await?;
        assert_eq!(status.version, "v2", "version must be v2 on every Status");
        assert_eq!(status.healthz, "ok", "healthz fell from ok without a cause");
        assert!(!status.key_id.is_empty(), "empty key_id");
        assert!(
            status.key_id.len() <= 1024,
            "key_id is {} bytes",
            status.key_id.len()
        );
        assert_eq!(
            status.key_id, first.key_id,
            "key_id changed without a keyring change"
        );
    }
    Ok(())
}

/// A fully qualified DNS subdomain with at least two labels.
fn is_fqdn_with_two_labels(key: &str) -> bool {
    let labels: Vec<&str> = key.split('.').collect();
    key.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

async fn encrypt_of_a_seed_meets_the_response_rules(plugin: PluginProcess) -> Result<()> {
    let status = healthy_status(&plugin).await?;
    let response = encrypt(&plugin.client(), &seed(1)).await?;
    assert!(!response.ciphertext.is_empty(), "empty ciphertext");
    assert!(
        response.ciphertext.len() <= 1024,
        "ciphertext is {} bytes",
        response.ciphertext.len()
    );
    assert!(!response.key_id.is_empty() && response.key_id.len() <= 1024);
    assert_eq!(
        response.key_id, status.key_id,
        "Encrypt key_id differs from Status key_id"
    );
    let mut annotation_bytes = 0;
    for (key, value) in &response.annotations {
        assert!(
            is_fqdn_with_two_labels(key),
            "annotation key {key:?} is not a DNS subdomain with 2+ labels"
        );
        annotation_bytes += key.len() + value.len();
    }
    assert!(
        annotation_bytes <= 32 * 1024,
        "annotations are {annotation_bytes} bytes"
    );
    assert_ne!(response.ciphertext, seed(1), "ciphertext is the plaintext");
    Ok(())
}

async fn encrypt_twice_gives_different_ciphertexts(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    let a = encrypt(&client, &seed(7)).await?;
    let b = encrypt(&client, &seed(7)).await?;
    assert_eq!(a.key_id, b.key_id);
    assert_ne!(
        a.ciphertext, b.ciphertext,
        "same plaintext encrypted twice gave the same ciphertext"
    );
    assert_eq!(decrypt(&client, &a.ciphertext, &a.key_id).await?, seed(7));
    assert_eq!(decrypt(&client, &b.ciphertext, &b.key_id).await?, seed(7));
    Ok(())
}

async fn distinct_plaintexts_give_distinct_responses(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    let mut seen = HashSet::new();
    for n in 0..64 {
        let response = encrypt(&client, &seed(n)).await?;
        assert!(
            seen.insert((response.ciphertext.clone(), response.key_id.clone())),
            "seed {n} gave a response already returned for another plaintext"
        );
        assert_eq!(
            decrypt(&client, &response.ciphertext, &response.key_id).await?,
            seed(n)
        );
    }
    Ok(())
}

async fn decrypt_returns_the_encrypted_plaintext(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    for plaintext in [
        seed(3),
        vec![0u8; 32],
        vec![0xFF; 32],
        vec![42u8],
        b"a longer plaintext, still a seed".repeat(4),
    ] {
        let response = encrypt(&client, &plaintext).await?;
        let back = decrypt(&client, &response.ciphertext, &response.key_id).await?;
        assert_eq!(back, plaintext, "round trip changed the plaintext");
    }
    Ok(())
}

async fn decrypt_refuses_unknown_key_ids(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    let response = encrypt(&client, &seed(4)).await?;
    let longer = format!("{}x", response.key_id);
    let shorter = response.key_id[..response.key_id.len() - 1].to_owned();
    let huge = "k".repeat(2000);
    for key_id in ["", "unknown-key-id", &longer, &shorter, &huge] {
        assert_refused(
            decrypt(&client, &response.ciphertext, key_id).await,
            Code::FailedPrecondition,
            &format!(
                "a valid ciphertext under unknown key_id {:?}",
                &key_id[..key_id.len().min(40)]
            ),
        );
    }
    Ok(())
}

async fn decrypt_refuses_every_single_byte_flip(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    let response = encrypt(&client, &seed(5)).await?;
    for position in 0..response.ciphertext.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut tampered = response.ciphertext.clone();
            tampered[position] ^= mask;
            assert_refused(
                decrypt(&client, &tampered, &response.key_id).await,
                Code::InvalidArgument,
                &format!("a ciphertext with byte {position} xor {mask:#04x}"),
            );
        }
    }
    // The untouched ciphertext still decrypts: the refusals above were about the flips.
    assert_eq!(
        decrypt(&client, &response.ciphertext, &response.key_id).await?,
        seed(5)
    );
    Ok(())
}

async fn decrypt_refuses_every_truncation(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    let response = encrypt(&client, &seed(6)).await?;
    for len in 0..response.ciphertext.len() {
        assert_refused(
            decrypt(&client, &response.ciphertext[..len], &response.key_id).await,
            Code::InvalidArgument,
            &format!(
                "the first {len} of {} ciphertext bytes",
                response.ciphertext.len()
            ),
        );
    }
    // Dropping bytes from the front is a truncation too.
    for cut in 1..response.ciphertext.len() {
        assert_refused(
            decrypt(&client, &response.ciphertext[cut..], &response.key_id).await,
            Code::InvalidArgument,
            &format!("the ciphertext without its first {cut} bytes"),
        );
    }
    Ok(())
}

async fn decrypt_refuses_an_empty_ciphertext(plugin: PluginProcess) -> Result<()> {
    let key_id = plugin.status().await?.key_id;
    assert_refused(
        decrypt(&plugin.client(), &[], &key_id).await,
        Code::InvalidArgument,
        "an empty ciphertext",
    );
    Ok(())
}

async fn decrypt_refuses_ciphertexts_it_did_not_produce(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    let ours = encrypt(&client, &seed(8)).await?;

    // Another plugin with its own keyring: same format, other keys.
    let other = PluginProcess::start(PluginOptions::new()).await?;
    let theirs = encrypt(&other.client(), &seed(8)).await?;
    assert_ne!(
        theirs.key_id, ours.key_id,
        "two fresh keyrings share a key_id"
    );
    assert_refused(
        decrypt(&client, &theirs.ciphertext, &ours.key_id).await,
        Code::InvalidArgument,
        "another keyring's ciphertext under our key_id",
    );
    assert_refused(
        decrypt(&client, &theirs.ciphertext, &theirs.key_id).await,
        Code::FailedPrecondition,
        "another keyring's ciphertext under its own key_id",
    );

    // Bytes that never came from any plugin, of sizes around the real one.
    let mut appended = ours.ciphertext.clone();
    appended.push(0);
    let foreign: Vec<(&str, Vec<u8>)> = vec![
        (
            "a kube-apiserver-style value",
            b"k8s:enc:kms:v2:provider:\x0a\x20garbage".to_vec(),
        ),
        ("the plaintext itself", seed(8)),
        (
            "zeros of the right length",
            vec![0u8; ours.ciphertext.len()],
        ),
        (
            "a seed-derived blob of the right length",
            seed(9).repeat(ours.ciphertext.len() / 32 + 1)[..ours.ciphertext.len()].to_vec(),
        ),
        ("one byte", vec![b'A']),
        ("1025 bytes", vec![0x41; 1025]),
        ("4 KiB", vec![0x42; 4096]),
        ("our ciphertext with a byte appended", appended),
        (
            "our ciphertext twice",
            [ours.ciphertext.clone(), ours.ciphertext.clone()].concat(),
        ),
    ];
    for (what, bytes) in foreign {
        assert_refused(
            decrypt(&client, &bytes, &ours.key_id).await,
            Code::InvalidArgument,
            what,
        );
    }
    Ok(())
}

async fn decrypt_refuses_a_ciphertext_under_another_valid_key_id(
    plugin: PluginProcess,
) -> Result<()> {
    let client = plugin.client();
    let keyring = plugin.keyring();
    let mut made = vec![encrypt(&client, &seed(10)).await?];

    // KEK 2 becomes primary, then KEK 1 again under a new key_id: three valid
    // key_ids, two of them of the same KEK.
    let second = keyring.rotate().await?;
    plugin.wait_for_key_id_change(&made[0].key_id).await?;
    made.push(encrypt(&client, &seed(11)).await?);
    ensure!(
        made[1].key_id == second,
        "Encrypt after rotate returned {} not {second}",
        made[1].key_id
    );
    keyring.promote(1).await?;
    plugin.wait_for_key_id_change(&second).await?;
    made.push(encrypt(&client, &seed(12)).await?);

    let key_ids: HashSet<&str> = made.iter().map(|r| r.key_id.as_str()).collect();
    assert_eq!(
        key_ids.len(),
        3,
        "expected three distinct key_ids, got {key_ids:?}"
    );
    for (i, response) in made.iter().enumerate() {
        assert_eq!(
            decrypt(&client, &response.ciphertext, &response.key_id).await?,
            seed(10 + i as u64)
        );
        for other in &made {
            if other.key_id != response.key_id {
                assert_refused(
                    decrypt(&client, &response.ciphertext, &other.key_id).await,
                    Code::InvalidArgument,
                    &format!(
                        "a ciphertext of {} presented under {}",
                        response.key_id, other.key_id
                    ),
                );
            }
        }
    }
    Ok(())
}

fn assert_encrypt_refused(
    result: Result<atrest_proto::kms::v2::EncryptResponse, tonic::Status>,
    what: &str,
) {
    match result {
        Ok(response) => panic!(
            "Encrypt of {what} answered with {} bytes",
            response.ciphertext.len()
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "Encrypt of {what}: {status:?}"
            );
            assert!(
                !status.message().is_empty(),
                "Encrypt of {what}: refusal says nothing"
            );
        }
    }
}

async fn encrypt_refuses_an_empty_plaintext(plugin: PluginProcess) -> Result<()> {
    assert_encrypt_refused(encrypt(&plugin.client(), &[]).await, "an empty plaintext");
    Ok(())
}

async fn encrypt_refuses_oversized_plaintexts(plugin: PluginProcess) -> Result<()> {
    let client = plugin.client();
    for len in [1024, 1025, 4096, 60 * 1024] {
        assert_encrypt_refused(
            encrypt(&client, &vec![0x5A; len]).await,
            &format!("{len} bytes"),
        );
    }
    // Past the transport's 64 KiB message limit, tonic refuses the request
    // before it is decoded: OutOfRange, with a message naming only sizes.
    match encrypt(&client, &vec![0x5A; 1024 * 1024]).await {
        Ok(r) => panic!(
            "Encrypt of 1 MiB answered with {} bytes",
            r.ciphertext.len()
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                Code::OutOfRange,
                "Encrypt of 1 MiB: {status:?}"
            );
            assert!(status.message().len() < 200, "{status:?}");
        }
    }
    Ok(())
}

async fn encrypt_accepts_every_size_up_to_its_limit_within_1024_bytes(
    plugin: PluginProcess,
) -> Result<()> {
    let client = plugin.client();
    let mut largest_accepted = 0;
    for len in 1..=1024usize {
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        match encrypt(&client, &plaintext).await {
            Ok(response) => {
                assert_eq!(
                    largest_accepted,
                    len - 1,
                    "{len} bytes accepted after a smaller size was refused"
                );
                assert!(
                    response.ciphertext.len() <= 1024,
                    "{len}-byte plaintext gave a {}-byte ciphertext",
                    response.ciphertext.len()
                );
                if len % 97 == 1 || len >= 980 {
                    assert_eq!(
                        decrypt(&client, &response.ciphertext, &response.key_id).await?,
                        plaintext
                    );
                }
                largest_accepted = len;
            }
            Err(status) => assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{len} bytes: {status:?}"
            ),
        }
    }
    assert!(
        largest_accepted >= 32,
        "a 32-byte seed must be accepted (largest accepted: {largest_accepted})"
    );
    Ok(())
}

async fn methods_answer_on_their_full_grpc_names(plugin: PluginProcess) -> Result<()> {
    use atrest_proto::kms::v2::{
        DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusResponse,
    };
    use tonic_prost::ProstCodec;

    // Spelled out here rather than taken from the generated code: these are
    // the names kube-apiserver dials.
    let mut grpc = tonic::client::Grpc::new(plugin.channel());
    grpc.ready().await?;
    let status: StatusResponse = grpc
        .unary(
            tonic::Request::new(StatusRequest {}),
            PathAndQuery::from_static("/v2.KeyManagementService/Status"),
            ProstCodec::<StatusRequest, StatusResponse>::default(),
        )
        .await?
        .into_inner();
    assert_eq!(status.version, "v2");

    grpc.ready().await?;
    let encrypted: EncryptResponse = grpc
        .unary(
            tonic::Request::new(EncryptRequest {
                plaintext: seed(13),
                uid: "full-name".into(),
            }),
            PathAndQuery::from_static("/v2.KeyManagementService/Encrypt"),
            ProstCodec::<EncryptRequest, EncryptResponse>::default(),
        )
        .await?
        .into_inner();

    grpc.ready().await?;
    let decrypted: DecryptResponse = grpc
        .unary(
            tonic::Request::new(DecryptRequest {
                ciphertext: encrypted.ciphertext.clone(),
                uid: "full-name".into(),
                key_id: encrypted.key_id.clone(),
                annotations: Default::default(),
            }),
            PathAndQuery::from_static("/v2.KeyManagementService/Decrypt"),
            ProstCodec::<DecryptRequest, DecryptResponse>::default(),
        )
        .await?
        .into_inner();
    assert_eq!(decrypted.plaintext, seed(13));

    // The generated client (used by every other test) calls the same paths.
    let generated: KmsClient = plugin.client();
    assert_eq!(
        generated
            .clone()
            .status(StatusRequest {})
            .await?
            .into_inner()
            .key_id,
        status.key_id
    );

    // Names that are not the v2 contract are not served.
    for path in [
        "/v2beta1.KeyManagementService/Status",
        "/v1beta1.KeyManagementService/Version",
        "/KeyManagementService/Status",
    ] {
        grpc.ready().await?;
        let refused = grpc
            .unary(
                tonic::Request::new(StatusRequest {}),
                PathAndQuery::from_static(path),
                ProstCodec::<StatusRequest, StatusResponse>::default(),
            )
            .await;
        let code = refused.as_ref().err().map(tonic::Status::code);
        assert_eq!(
            code,
            Some(Code::Unimplemented),
            "{path} answered: {refused:?}"
        );
    }
    Ok(())
}
