//! Any EncryptionConfiguration file: strict parse; what parses renders and parses back.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| storage_encryption::fuzz_entry::parse_config(data));
