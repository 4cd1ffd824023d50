//! Any etcd value: classification, judging against every provider type, key mapping.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| storage_encryption::fuzz_entry::classify_value(data));
