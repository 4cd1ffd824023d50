//! Known answers from the spec (kube-apiserver's own tests) and edge cases of each format.
#![allow(clippy::unwrap_used)]

use storage_encryption::format::{aescbc, aesgcm, kmsv1, kmsv2, secretbox};
use storage_encryption::{
    Classification, EncryptedDekSourceType, FormatError, Seed, classify_value,
};

const GCM_PAYLOAD: &str = "9f27c8fcea8a58c467d8e437dbf2d85955f9b4bd912f4ef967d788a0cb07797dac0a3f0a0845605ca85ac8562b4ae1";
const KMS_V2_SEED: &str = "5d40323a820ff95561675e3b95e81867c5fdd561d35a88a2d08b08aa9d4fcf5c";
const KMS_V2_DATA: &str = "2442759e33945fbad709db577a0f037fd8a709fc76979b8942209debcecb9d57efe3d6ff6a1ef6ee9a5003b9833b3043cec1e47b35175b151107a8d2416b0e296bbf66b5d102fcefdf9a78f293d271";

#[test]
fn aesgcm_known_answer_decrypts_and_reencrypts_identically() {
    let payload = hex::decode(GCM_PAYLOAD).unwrap();
    assert_eq!(payload.len(), 47);
    let plain = aesgcm::open(b"snorlax_awesomes", &payload, b"bamboo").unwrap();
    assert_eq!(plain.expose(), b"pandas are the best");
    let nonce: [u8; 12] = payload[..12].try_into().unwrap();
    let again = aesgcm::seal_with_nonce(
        b"snorlax_awesomes",
        &nonce,
        b"pandas are the best",
        b"bamboo",
    )
    .unwrap();
    assert_eq!(again, payload);
    assert_eq!(
        aesgcm::open(b"snorlax_awesomes", &payload, b"bamboO"),
        Err(FormatError::AuthFailed)
    );
}

#[test]
fn kms_v2_hkdf_known_answer_decrypts_and_reencrypts_identically() {
    let seed = Seed::from_slice(&hex::decode(KMS_V2_SEED).unwrap()).unwrap();
    let data = hex::decode(KMS_V2_DATA).unwrap();
    assert_eq!(data.len(), 79);
    let plain = kmsv2::open_data(
        &seed,
        EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed,
        &data,
        b"bamboo",
    )
    .unwrap();
    assert_eq!(plain.expose(), b"pandas are the best");
    let info: [u8; 32] = data[..32].try_into().unwrap();
    let nonce: [u8; 12] = data[32..44].try_into().unwrap();
    assert_eq!(
        kmsv2::seal_data_with(&seed, &info, &nonce, b"pandas are the best", b"bamboo").unwrap(),
        data
    );
    // The same bytes are not a type-0 value (the seed is not used as the key directly).
    assert!(kmsv2::open_data(&seed, EncryptedDekSourceType::AesGcmKey, &data, b"bamboo").is_err());
}

#[test]
fn kms_v2_legacy_type_0_uses_the_dek_directly() {
    let dek = Seed::new([7; 32]);
    let data = aesgcm::seal(dek.expose(), b"legacy", b"/registry/secrets/a/b").unwrap();
    let plain = kmsv2::open_data(
        &dek,
        EncryptedDekSourceType::AesGcmKey,
        &data,
        b"/registry/secrets/a/b",
    )
    .unwrap();
    assert_eq!(plain.expose(), b"legacy");
}

#[test]
fn aescbc_payload_of_one_block_is_an_error_not_a_panic() {
    let key = [1u8; 32];
    assert_eq!(
        aescbc::decrypt(&key, &[0u8; 16]),
        Err(FormatError::CbcLength { len: 16 })
    );
    assert!(matches!(
        aescbc::decrypt(&key, &[0u8; 15]),
        Err(FormatError::TooShort { .. })
    ));
    assert_eq!(
        aescbc::decrypt(&key, &[0u8; 40]),
        Err(FormatError::CbcLength { len: 40 })
    );
    let mut value = b"k8s:enc:aescbc:v1:key1:".to_vec();
    value.extend_from_slice(&[0u8; 16]);
    assert!(matches!(
        classify_value(&value),
        Classification::Undecodable { .. }
    ));
}

#[test]
fn aescbc_pads_a_full_block_when_aligned_and_rejects_bad_padding() {
    let key = [3u8; 16];
    let iv = [9u8; 16];
    let sealed = aescbc::encrypt_with_iv(&key, &iv, &[0u8; 32]).unwrap();
    assert_eq!(
        sealed.len(),
        16 + 48,
        "a full block of padding is added to aligned plaintext"
    );
    assert_eq!(aescbc::decrypt(&key, &sealed).unwrap().expose(), &[0u8; 32]);
    // Flipping the last byte of the previous block turns the final 0x10 padding into 0x11.
    let mut tampered = sealed.clone();
    let at = tampered.len() - 17;
    tampered[at] ^= 1;
    assert_eq!(
        aescbc::decrypt(&key, &tampered),
        Err(FormatError::BadPadding)
    );
    let wrong_key = aescbc::decrypt(&[4u8; 16], &sealed)
        .ok()
        .map(|p| p.expose().to_vec());
    assert_ne!(wrong_key, Some(vec![0u8; 32]));
}

#[test]
fn secretbox_is_nacl_layout_nonce_tag_ciphertext() {
    let key = [5u8; 32];
    let nonce = [6u8; 24];
    let sealed = secretbox::seal_with_nonce(&key, &nonce, b"hello").unwrap();
    assert_eq!(sealed.len(), 24 + 16 + 5);
    assert_eq!(&sealed[..24], &nonce);
    assert_eq!(secretbox::open(&key, &sealed).unwrap().expose(), b"hello");
    let mut tampered = sealed.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(
        secretbox::open(&key, &tampered),
        Err(FormatError::AuthFailed)
    );
    assert!(matches!(
        secretbox::seal(&[0u8; 16], b"x"),
        Err(FormatError::KeySize { .. })
    ));
}

#[test]
fn kms_v1_layout_and_cbc_fallback() {
    let dek = Seed::new([8u8; 32]);
    let aad = b"/registry/secrets/ns/s";
    let payload = kmsv1::seal(&dek, b"ENCDEK", b"v1 data", aad).unwrap();
    assert_eq!(&payload[..2], &[0, 6]);
    let parts = kmsv1::split(&payload).unwrap();
    assert_eq!(parts.encrypted_dek, b"ENCDEK");
    assert_eq!(
        kmsv1::open(&dek, parts.data, aad).unwrap(),
        (
            storage_encryption::Plaintext::new(b"v1 data".to_vec()),
            false
        )
    );
    let cbc = aescbc::encrypt(dek.expose(), b"old v1 data").unwrap();
    let (plain, fallback) = kmsv1::open(&dek, &cbc, aad).unwrap();
    assert_eq!((plain.expose(), fallback), (&b"old v1 data"[..], true));
    assert!(matches!(
        kmsv1::split(&[0, 9, 1, 2]),
        Err(FormatError::KmsV1Length {
            dek_len: 9,
            available: 2
        })
    ));
    // provider names may contain ':'; the longest configured match wins
    let rest = b"a:b:\x00\x01Xdata";
    assert_eq!(kmsv1::match_provider(rest, ["a", "a:b", "c"]), Some("a:b"));
    assert_eq!(
        kmsv1::strip_provider(rest, "a:b"),
        Some(&b"\x00\x01Xdata"[..])
    );
}

fn object() -> kmsv2::EncryptedObject {
    kmsv2::EncryptedObject {
        encrypted_data: vec![1; 80],
        key_id: "kid".into(),
        encrypted_dek_source: vec![2; 40],
        annotations: [("kms.example.io".to_string(), b"v".to_vec())].into(),
        encrypted_dek_source_type: 1,
    }
}

fn invalid_field(o: &kmsv2::EncryptedObject) -> &'static str {
    match kmsv2::validate(o) {
        Err(FormatError::InvalidObject { field, .. }) => field,
        other => panic!("expected invalid object, got {other:?}"),
    }
}

#[test]
fn kms_v2_encrypted_object_validation_matches_the_apiserver() {
    assert_eq!(kmsv2::validate(&object()), Ok(()));
    let mut o = object();
    o.encrypted_dek_source_type = 2;
    assert_eq!(invalid_field(&o), "encryptedDEKSourceType");
    let mut o = object();
    o.encrypted_data.clear();
    assert_eq!(invalid_field(&o), "encryptedData");
    for len in [0, 1025] {
        let mut o = object();
        o.encrypted_dek_source = vec![1; len];
        assert_eq!(invalid_field(&o), "encryptedDEKSource", "len {len}");
        let mut o = object();
        o.key_id = "k".repeat(len);
        assert_eq!(invalid_field(&o), "keyID", "len {len}");
    }
    let mut o = object();
    o.encrypted_dek_source = vec![1; 1024];
    o.key_id = "k".repeat(1024);
    assert_eq!(kmsv2::validate(&o), Ok(()), "1024 is the inclusive maximum");
    for bad in [
        "kms",
        "Kms.example.io",
        "-a.example",
        "a..b",
        "",
        &format!("{}.io", "a".repeat(64)),
    ] {
        let mut o = object();
        o.annotations = [(bad.to_string(), vec![])].into();
        assert_eq!(invalid_field(&o), "annotations", "{bad:?}");
    }
    for good in ["a.b", "kms.example.io.", "x-1.y-2.z"] {
        let mut o = object();
        o.annotations = [(good.to_string(), vec![])].into();
        assert_eq!(kmsv2::validate(&o), Ok(()), "{good:?}");
    }
    let mut o = object();
    o.annotations = [("a.example.io".to_string(), vec![0; 32768 - 12])].into();
    assert_eq!(kmsv2::validate(&o), Ok(()));
    o.annotations = [("a.example.io".to_string(), vec![0; 32768 - 11])].into();
    assert_eq!(invalid_field(&o), "annotations");
}

#[test]
fn kms_v2_invalid_objects_classify_as_undecodable() {
    let mut o = object();
    o.key_id.clear();
    let mut value = b"k8s:enc:kms:v2:p:".to_vec();
    value.extend_from_slice(&prost::Message::encode_to_vec(&o));
    match classify_value(&value) {
        Classification::Undecodable { name, reason, .. } => {
            assert_eq!(name.as_deref(), Some("p"));
            assert!(reason.contains("keyID"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        classify_value(b"k8s:enc:kms:v2:p:\xff\xff"),
        Classification::Undecodable { .. }
    ));
    assert!(matches!(
        classify_value(b"k8s:enc:rot13:v1:k:abc"),
        Classification::Undecodable { kind: None, .. }
    ));
    assert!(matches!(
        classify_value(b"k8s:enc:aesgcm:v1:nokeyterminator"),
        Classification::Undecodable { .. }
    ));
}

#[test]
fn plaintext_kinds() {
    use storage_encryption::PlaintextKind;
    match classify_value(b"{\"apiVersion\":\"stable.example.com/v1\",\"kind\":\"Widget\"}\n") {
        Classification::Plaintext(PlaintextKind::Json {
            type_meta: Some(tm),
        }) => {
            assert_eq!(
                (tm.api_version.as_str(), tm.kind.as_str()),
                ("stable.example.com/v1", "Widget")
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        classify_value(&[0xd9, 0xd9, 0xf7, 0xa0]),
        Classification::Plaintext(PlaintextKind::Cbor)
    );
    assert_eq!(
        classify_value(b"hello"),
        Classification::Plaintext(PlaintextKind::Other)
    );
    assert_eq!(
        classify_value(b"{not json"),
        Classification::Plaintext(PlaintextKind::Other)
    );
    assert!(matches!(
        classify_value(b"k8s\x00\xff\xff"),
        Classification::Plaintext(PlaintextKind::Protobuf { type_meta: None })
    ));
}
