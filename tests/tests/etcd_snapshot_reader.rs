//! The bolt reader (`etcd-snapshot`) against real etcd 3.4 files: an
//! `etcdctl snapshot save` file and a cleanly stopped member's
//! `member/snap/db`. Ground truth is `etcdctl get`. Corrupt inputs must be
//! clear errors naming the file.
#![allow(clippy::unwrap_used)]

mod snapshot_kit;

use std::collections::BTreeMap;
use std::path::Path;

use atrest_tests::etcd::EtcdServer;
use etcd_snapshot::{FreeKind, Integrity, LatestStats, Snapshot, SnapshotError, page};
use snapshot_kit::{GetKv, MemberEtcd, etcdctl_get_all, snapshot_save, write_history};

fn latest_of(s: &Snapshot<impl etcd_snapshot::Source>) -> (i64, Vec<GetKv>) {
    let (rev, kvs, stats) = latest_with_budget(s, etcd_snapshot::DEFAULT_INDEX_BYTES);
    assert_eq!(stats.passes, 1, "one read of the bucket");
    assert_eq!(
        stats.spilled_runs, 0,
        "a small file's index stays in memory"
    );
    (rev, kvs)
}

/// The latest view read with an index of at most `budget` bytes.
fn latest_with_budget(
    s: &Snapshot<impl etcd_snapshot::Source>,
    budget: usize,
) -> (i64, Vec<GetKv>, LatestStats) {
    let latest = s.latest_with_budget(b"", budget).unwrap();
    collect_latest(latest)
}

/// The latest view, spilling its index under `temp_parent`.
fn latest_in(
    s: &Snapshot<impl etcd_snapshot::Source>,
    budget: usize,
    temp_parent: &Path,
) -> (i64, Vec<GetKv>, LatestStats) {
    let opts = etcd_snapshot::LatestOptions {
        index_bytes: budget,
        temp_parent: Some(temp_parent.to_owned()),
    };
    collect_latest(s.latest_with_options(b"", &opts).unwrap())
}

fn collect_latest<S: etcd_snapshot::Source>(
    mut latest: etcd_snapshot::Latest<'_, S>,
) -> (i64, Vec<GetKv>, LatestStats) {
    let rev = latest.revision();
    let mut kvs = Vec::new();
    for kv in latest.by_ref() {
        let kv = kv.unwrap();
        kvs.push(GetKv {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        });
    }
    (rev, kvs, latest.stats())
}

fn assert_same(got: &[GetKv], want: &[GetKv]) {
    assert!(want.len() > 150, "the dataset is in etcd");
    assert_eq!(got.len(), want.len(), "number of live keys");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            g,
            w,
            "key {:?} differs from etcdctl get",
            String::from_utf8_lossy(&w.key)
        );
    }
}

#[test]
fn snapshot_save_file_reads_like_etcdctl_get() {
    let etcd = EtcdServer::start();
    let compacted_at = write_history(&etcd);
    let (want_rev, want) = etcdctl_get_all(&etcd.etcdctl_args());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    snapshot_save(&etcd.etcdctl_args(), &file);

    let s = Snapshot::open(&file).unwrap();
    assert_eq!(s.integrity(), Integrity::Sha256Verified);
    let (rev, got) = latest_of(&s);
    assert_eq!(rev, want_rev, "the file's revision is etcd's");
    assert_same(&got, &want);
    // Values larger than a page came through overflow pages.
    assert!(got.iter().any(|kv| kv.value.len() > 4 * 4096));

    // Flat memory: with an index budget of ~4 KiB (about 60 entries) the
    // same view comes from ONE read of the bucket, its index spilled in
    // sorted runs to a private temp dir, never holding more than the budget
    // in memory; the dir is gone once the view is dropped.
    let budget = 4096;
    let tmp = tempfile::tempdir().unwrap();
    let (rev, small, stats) = latest_in(&s, budget, tmp.path());
    assert_eq!(rev, want_rev);
    assert_same(&small, &want);
    eprintln!("budget {budget}: {stats:?}");
    assert_eq!(stats.passes, 1, "one read of the bucket");
    assert!(
        stats.spilled_runs >= 3,
        "{} keys in {} runs",
        want.len(),
        stats.spilled_runs
    );
    let longest = want.iter().map(|kv| kv.key.len()).max().unwrap();
    assert!(
        stats.max_index_bytes as usize <= budget.max(longest + etcd_snapshot::INDEX_ENTRY_BYTES),
        "{stats:?}"
    );
    assert!(
        stats.max_keys_held as usize <= budget / etcd_snapshot::INDEX_ENTRY_BYTES,
        "{stats:?}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temp dir removed"
    );
    // More runs than are merged at once: merged in two levels.
    let (rev, tiny, stats) = latest_in(&s, 512, tmp.path());
    assert_eq!(rev, want_rev);
    assert_same(&tiny, &want);
    eprintln!("budget 512: {stats:?}");
    assert!(
        stats.spilled_runs > 2 * etcd_snapshot::FANIN as u64,
        "{stats:?}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temp dir removed"
    );
    // Stopped after one key: the temp dir is removed too, and while the
    // view is open it is private (0700).
    {
        let opts = etcd_snapshot::LatestOptions {
            index_bytes: budget,
            temp_parent: Some(tmp.path().to_owned()),
        };
        let mut latest = s.latest_with_options(b"", &opts).unwrap();
        latest.next().unwrap().unwrap();
        let dirs: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|d| d.unwrap().path())
            .collect();
        assert_eq!(dirs.len(), 1, "one private dir while the view is open");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dirs[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temp dir removed"
    );

    let meta = s.mvcc_meta().unwrap();
    assert_eq!(meta.finished_compact_rev, Some(compacted_at));
    assert_eq!(meta.scheduled_compact_rev, Some(compacted_at));
    assert!(meta.consistent_index.unwrap() > 0);

    // History: every revision since the compaction, tombstones included.
    let revs: Vec<_> = s.revisions().unwrap().map(Result::unwrap).collect();
    let mut sorted = revs.iter().map(|r| (r.main, r.sub)).collect::<Vec<_>>();
    sorted.sort();
    assert_eq!(
        sorted,
        revs.iter().map(|r| (r.main, r.sub)).collect::<Vec<_>>(),
        "revision order"
    );
    let tombstones: Vec<_> = revs.iter().filter(|r| r.tombstone).collect();
    assert_eq!(tombstones.len(), 10, "the deletes after the compaction");
    assert!(tombstones.iter().all(|r| r.main > compacted_at));
    // Before the compaction only each key's last revision remains.
    let mut per_key: BTreeMap<&[u8], usize> = BTreeMap::new();
    for r in revs.iter().filter(|r| r.main <= compacted_at) {
        *per_key.entry(&r.kv.key).or_default() += 1;
    }
    assert!(per_key.values().all(|n| *n == 1), "compacted history");
    // Overwritten after the compaction: two revisions of the same key.
    let k0 = b"/registry/secrets/ns0/s000".as_slice();
    assert_eq!(revs.iter().filter(|r| r.kv.key == k0).count(), 2);

    // Free pages: every page is either reached or free, nothing out of range.
    let free = s.free_pages().unwrap();
    eprintln!(
        "meta {:?}, {} pages held, free ranges {free:?}",
        s.meta(),
        s.pages_held()
    );
    for r in &free {
        assert!(r.start >= 2 && r.start + r.len <= s.pages_held());
    }
    assert!(
        free.iter()
            .all(|r| r.kind == FreeKind::Freed || r.start >= s.meta().pgid)
    );
}

#[test]
fn stopped_member_db_reads_like_etcdctl_get() {
    let mut m = MemberEtcd::start();
    for i in 0..200 {
        m.put(
            &format!("/registry/configmaps/ns/c{i:03}"),
            &format!("v{i}"),
        );
    }
    m.put("/registry/configmaps/ns/c000", "overwritten");
    m.del("/registry/configmaps/ns/c001");
    let (want_rev, want) = etcdctl_get_all(&m.endpoint_args);
    let db = m.stop();

    let s = Snapshot::open(&db).unwrap();
    assert_eq!(
        s.integrity(),
        Integrity::NoSha256,
        "a member db has no SHA-256"
    );
    let (rev, got) = latest_of(&s);
    assert_eq!(rev, want_rev);
    assert_same(&got, &want);
    let tombstones = s
        .revisions()
        .unwrap()
        .filter(|r| r.as_ref().unwrap().tombstone);
    assert_eq!(tombstones.count(), 1);
    s.free_pages().unwrap();
}

fn saved_snapshot() -> (tempfile::TempDir, Vec<u8>) {
    let etcd = EtcdServer::start();
    for i in 0..50 {
        etcd.put(format!("/registry/secrets/ns/s{i}"), vec![b'x'; 300]);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    snapshot_save(&etcd.etcdctl_args(), &file);
    let bytes = std::fs::read(&file).unwrap();
    (dir, bytes)
}

/// Opens `bytes` written to a file and reads everything; the first error.
fn read_all(dir: &Path, name: &str, bytes: &[u8]) -> SnapshotError {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let r = Snapshot::open(&path).and_then(|s| {
        s.mvcc_meta()?;
        for kv in s.latest(b"")? {
            kv?;
        }
        s.free_pages()?;
        Ok(())
    });
    let e = r.expect_err(&format!("{name} was accepted"));
    assert!(
        e.to_string().starts_with(&path.display().to_string()),
        "the message names the file: {e}"
    );
    e
}

fn set_meta(bytes: &mut [u8], at: usize, page_size: u32) {
    let m = at + page::HEADER;
    bytes[m + 8..m + 12].copy_from_slice(&page_size.to_le_bytes());
    let sum = page::fnv64a(&bytes[m..m + 56]);
    bytes[m + 56..m + 64].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn corrupt_files_are_refused_with_clear_messages() {
    let (dir, good) = saved_snapshot();
    let dir = dir.path();
    let msg = |name: &str, bytes: &[u8]| read_all(dir, name, bytes).to_string();
    let db_len = good.len() - 32;

    let m = msg("empty.db", &[]);
    assert!(m.contains("empty file"), "{m}");

    let m = msg("text.db", &b"not a bolt file\n".repeat(2000));
    assert!(m.contains("bad magic"), "{m}");

    // Truncated: half the file, and a page-aligned cut without the SHA-256.
    let m = msg("half.db", &good[..good.len() / 2]);
    assert!(
        m.contains("truncated") || m.contains("multiple of the page size"),
        "{m}"
    );
    let m = msg("cut.db", &good[..3 * 4096]);
    assert!(m.contains("truncated"), "{m}");

    // Both meta checksums flipped: no valid meta page.
    let mut b = good.clone();
    b[page::HEADER + 56] ^= 1;
    b[4096 + page::HEADER + 56] ^= 1;
    let m = msg("meta.db", &b);
    assert!(m.contains("checksum mismatch"), "{m}");

    // One data byte changed: the appended SHA-256 catches it.
    let mut b = good.clone();
    b[db_len - 100] ^= 0xff;
    let m = msg("sha.db", &b);
    assert!(m.contains("SHA-256"), "{m}");
    // The same file opened with the hash on its own thread (what
    // `etcd-inspect snapshot` does): it opens, but the latest view yields
    // nothing, only the mismatch; so do the other reads. A page header
    // broken as well (the index pass fails too) is still reported as the
    // mismatch, the cause.
    for (name, broken_header) in [("sha-conc.db", false), ("sha-conc-hdr.db", true)] {
        let mut b = b.clone();
        if broken_header {
            b[2 * 4096..2 * 4096 + 8].fill(0xff);
        }
        let path = dir.join(name);
        std::fs::write(&path, &b).unwrap();
        let s = Snapshot::open_concurrent(&path).unwrap();
        let e = s.latest(b"").map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("SHA-256"), "{e}");
        let e = s.revisions().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("SHA-256"), "{e}");
        assert!(s.mvcc_meta().unwrap_err().to_string().contains("SHA-256"));
        assert!(s.free_pages().unwrap_err().to_string().contains("SHA-256"));
    }
    // And a good file reads the same either way.
    let path = dir.join("good.db");
    std::fs::write(&path, &good).unwrap();
    let conc = Snapshot::open_concurrent(&path).unwrap();
    let a: Vec<_> = conc.latest(b"").unwrap().map(Result::unwrap).collect();
    let b: Vec<_> = Snapshot::open(&path)
        .unwrap()
        .latest(b"")
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(a, b);
    assert_eq!(a.len(), 50);

    // Wrong page size in a (validly checksummed) meta page, no SHA-256 to
    // catch it: pages are then read at the wrong offsets. Which check
    // trips first depends on the snapshot's page count (an odd count is not
    // a multiple of 8192 bytes; an even one leaves too few 8 KiB pages for
    // the meta page's high-water mark); each names the page size.
    let mut b = good[..db_len].to_vec();
    set_meta(&mut b, 0, 8192);
    set_meta(&mut b, 4096, 8192);
    let m = msg("pagesize.db", &b);
    assert!(
        m.contains("page size") || m.contains("header says page"),
        "{m}"
    );
    // Both ways, whatever etcd's snapshot size was.
    for pages in [db_len / 4096 - 1, db_len / 4096] {
        let mut b = good[..pages * 4096].to_vec();
        set_meta(&mut b, 0, 8192);
        set_meta(&mut b, 4096, 8192);
        let m = msg(&format!("pagesize-{pages}.db"), &b);
        assert!(
            m.contains("page size 8192") || m.contains("wrong page size"),
            "{m}"
        );
    }

    // Only meta page 0 torn: bolt falls back to meta page 1 (the previous commit).
    let mut b = good.clone();
    b[page::HEADER + 56] ^= 1;
    b.truncate(db_len);
    let path = dir.join("meta0.db");
    std::fs::write(&path, &b).unwrap();
    let s = Snapshot::open(&path).unwrap();
    assert_eq!(s.meta().index, 1);
}
