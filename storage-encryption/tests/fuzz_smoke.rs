//! Runs the fuzz targets' entry functions on stable: over the vector corpus, over
//! mutations of it, and over random bytes. (`fuzz/` runs them under libFuzzer.)
#![allow(clippy::unwrap_used)]

mod common;

use proptest::prelude::*;
use storage_encryption::fuzz_entry;

fn corpus_values() -> Vec<Vec<u8>> {
    common::load_vectors()
        .items
        .into_iter()
        .flat_map(|i| [i.stored, i.plaintext, i.etcd_key.into_bytes()])
        .collect()
}

fn corpus_configs() -> Vec<Vec<u8>> {
    [
        "config-secrets-all-providers.yaml",
        "config-wildcard-events-exempt.yaml",
    ]
    .iter()
    .map(|n| common::read_vector_file(n).into_bytes())
    .collect()
}

#[test]
fn classify_value_target_over_the_corpus_and_its_truncations() {
    for value in corpus_values() {
        for end in 0..=value.len() {
            fuzz_entry::classify_value(&value[..end]);
        }
        for i in 0..value.len() {
            let mut flipped = value.clone();
            flipped[i] ^= 0x80;
            fuzz_entry::classify_value(&flipped);
        }
    }
}

#[test]
fn parse_config_target_over_the_corpus_and_its_truncations() {
    for text in corpus_configs() {
        fuzz_entry::parse_config(&text);
        for end in 0..=text.len() {
            fuzz_entry::parse_config(&text[..end]);
        }
    }
}

proptest! {
    #[test]
    fn classify_value_target_on_random_bytes(
        prefix in prop::sample::select(vec!["", "k8s\0", "k8s:enc:", "k8s:enc:aescbc:v1:k:", "k8s:enc:aesgcm:v1:k:",
            "k8s:enc:secretbox:v1:k:", "k8s:enc:kms:v1:p:", "k8s:enc:kms:v2:p:", "/registry/"]),
        tail in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut v = prefix.as_bytes().to_vec();
        v.extend_from_slice(&tail);
        fuzz_entry::classify_value(&v);
    }

    #[test]
    fn parse_config_target_on_random_text(text in "[a-zA-Z0-9:{}\\[\\]\\-\\n ,'\"*./=]{0,200}") {
        fuzz_entry::parse_config(text.as_bytes());
        let mut doc = b"apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n".to_vec();
        doc.extend_from_slice(text.as_bytes());
        fuzz_entry::parse_config(&doc);
    }
}
