//! The bolt reader's fuzz entry (`etcd_snapshot::fuzz_entry`, what
//! `etcd-snapshot/fuzz` runs under libFuzzer) on stable, over mutations of a
//! real snapshot made by real etcd: truncations, byte flips in every region,
//! flips with the meta checksum recomputed (so the damage reaches the tree),
//! and random bytes. An error is fine; a panic fails the test.
#![allow(clippy::unwrap_used)]

mod snapshot_kit;

use atrest_tests::etcd::EtcdServer;
use etcd_snapshot::{fuzz_entry, page};

/// A small deterministic generator (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn real_db() -> Vec<u8> {
    let etcd = EtcdServer::start();
    snapshot_kit::write_history(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &file);
    let mut bytes = std::fs::read(&file).unwrap();
    // Without the SHA-256 (as a member db): mutations reach the parser
    // instead of stopping at the digest.
    bytes.truncate(bytes.len() - 32);
    bytes
}

fn fix_meta_checksums(b: &mut [u8]) {
    for at in [0usize, 4096] {
        let m = at + page::HEADER;
        if b.len() >= m + 64 {
            let sum = page::fnv64a(&b[m..m + 56]);
            b[m + 56..m + 64].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

#[test]
fn mutated_snapshots_never_panic() {
    let db = real_db();
    // The unmutated file is fully readable (so mutations start from a real tree).
    let s = etcd_snapshot::open_bytes("real", db.clone()).unwrap();
    assert!(s.latest(b"").unwrap().count() > 250);
    fuzz_entry(&db);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Truncations at page boundaries and inside pages.
    for end in (0..db.len())
        .step_by(4096)
        .chain((0..64).map(|_| rng.below(db.len())))
    {
        fuzz_entry(&db[..end]);
    }
    // Byte flips anywhere, one to eight at a time.
    for _ in 0..200 {
        let mut b = db.clone();
        for _ in 0..1 + rng.below(8) {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        fuzz_entry(&b);
    }
    // Flips in the page headers, element tables and meta fields, with the
    // meta checksum made valid again so the damage is believed.
    for _ in 0..400 {
        let mut b = db.clone();
        for _ in 0..1 + rng.below(4) {
            let page_no = rng.below(b.len() / 4096);
            let off = page_no * 4096 + rng.below(96);
            let v = rng.next() as u8;
            b[off] = if rng.below(2) == 0 { v } else { b[off] ^ 0xff };
        }
        fix_meta_checksums(&mut b);
        fuzz_entry(&b);
    }
    // Random bytes behind a valid meta page pair.
    for _ in 0..30 {
        let mut b = db.clone();
        for x in b.iter_mut().skip(2 * 4096) {
            *x = rng.next() as u8;
        }
        fix_meta_checksums(&mut b);
        fuzz_entry(&b);
    }
}
