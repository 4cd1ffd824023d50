//! Feeds arbitrary bytes to the bolt reader as if they were an etcd snapshot
//! file: open (meta pages, SHA-256), the meta bucket, every revision, the
//! latest view and the free pages. Errors are expected; a panic is a bug.
//! Seed the corpus with a real `etcdctl snapshot save` file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    etcd_snapshot::fuzz_entry(data);
});
