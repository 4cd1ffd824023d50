//! What reading etcd's history costs two ways (the numbers in
//! `etcd-inspect/src/history.rs` and the README):
//!
//! - the watch `--history` uses (whole key space from the compaction
//!   revision, [`etcd_inspect::history::HistoryScan`]);
//! - ranges at older revisions: the latest scan, then each key walked back
//!   with `Range key @ mod_revision - 1` until its first version.
//!
//! Usage: `cargo run -p etcd-inspect --example history_cost --
//! http://127.0.0.1:2379 [KEYS] [REVISIONS] [load]` against an empty,
//! disposable etcd (it writes KEYS × REVISIONS values of 1 KiB under
//! /registry/; with `load` it stops there).
//! Prints a table; asserts nothing about time.

use std::time::Instant;

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use etcd_inspect::history::HistoryScan;
use etcd_inspect::scan::{Scan, ScanOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let keys: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    // `load`: only write the data (for a memory run of `etcd-inspect --history`).
    let load_only = args.next().as_deref() == Some("load");
    let client = Client::connect([endpoint.clone()], None).await?;

    let t = Instant::now();
    let mut kv = client.kv_client();
    for round in 0..rounds {
        for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|i| {
                    let key = format!("/registry/secrets/ns{:02}/s{i:06}", i % 50);
                    TxnOp::put(key, vec![(round as u8) ^ (*i as u8); 1024], None)
                })
                .collect();
            kv.txn(Txn::new().and_then(ops)).await?;
        }
    }
    println!(
        "loaded {keys} keys x {rounds} revisions in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if load_only {
        return Ok(());
    }

    // The watch.
    let t = Instant::now();
    let mut h = HistoryScan::start(
        client.kv_client(),
        client
            .watch_client()
            .max_decoding_message_size(etcd_inspect::etcd::MAX_RESPONSE_BYTES),
        endpoint.clone(),
        b"/registry/".to_vec(),
        ScanOptions::default(),
    );
    let mut watch_records = 0u64;
    while let Some(page) = h.next_page().await {
        watch_records += page?.kvs.len() as u64;
    }
    let watch_s = t.elapsed().as_secs_f64();

    // Ranges at older revisions, key by key.
    let t = Instant::now();
    let mut scan = Scan::start(
        client.kv_client(),
        endpoint,
        b"/registry/".to_vec(),
        ScanOptions::default(),
    );
    let mut range_records = 0u64;
    let mut requests = 0u64;
    let mut walk = client.kv_client();
    while let Some(page) = scan.next_page().await {
        for kv in page?.kvs {
            range_records += 1;
            let (mut rev, mut version) = (kv.mod_revision, kv.version);
            while version > 1 {
                requests += 1;
                let r = walk
                    .get(
                        kv.key.clone(),
                        Some(GetOptions::new().with_revision(rev - 1)),
                    )
                    .await?;
                let Some(old) = r.kvs().first() else { break };
                range_records += 1;
                (rev, version) = (old.mod_revision(), old.version());
            }
        }
    }
    let range_s = t.elapsed().as_secs_f64();

    println!("| method | revisions read | extra requests | wall |");
    println!("|---|---:|---:|---:|");
    println!("| watch from the compaction revision | {watch_records} | 1 watch | {watch_s:.2} s |");
    println!(
        "| range at older revisions, per key | {range_records} | {requests} | {range_s:.2} s |"
    );
    Ok(())
}
