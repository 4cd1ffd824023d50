//! One audit run: load the config, prepare the auditor (KMS Status, plugin
//! connections), scan etcd page by page, write the report, decide the exit
//! code.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use cli_kit::escape::escape_control;

use crate::audit::{Auditor, AuditorError};
use crate::cli::{Exit, OutputFormat, Settings, Source};
use crate::etcd::EtcdError;
use crate::history::HistoryScan;
use crate::progress::Progress;
use crate::report::{
    JsonReporter, JunitReporter, NeedsReporter, Reporter, ScanMeta, TableReporter,
};
use crate::scan::{Scan, ScanStats};
use crate::snapshot::{FileKv, FilePage, SnapshotScan, View};
use crate::summary::Summary;

/// Why a run could not judge anything (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config file could not be read.
    #[error("cannot read --config {path}: {source}")]
    ReadConfig {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not a valid EncryptionConfiguration.
    #[error("--config {path}: {source}")]
    Config {
        /// The path.
        path: PathBuf,
        /// What is wrong (names the field).
        #[source]
        source: storage_encryption::ConfigError,
    },
    /// Preparing the audit failed (KMS plugin unreachable, bad override...).
    #[error(transparent)]
    Auditor(#[from] AuditorError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A KMS plugin stopped answering during `--decrypt-check`: the values
    /// from `at` on were not judged (a refusal would be `decrypt-failed`).
    #[error(
        "{outage}; nothing judged past key {} (the plugin failed at key {})",
        last_judged.as_deref().map(escape_control).unwrap_or("(none: no key was judged)".into()),
        escape_control(at)
    )]
    PluginOutage {
        /// The last key with a verdict, if any.
        last_judged: Option<String>,
        /// The key whose check met the outage.
        at: String,
        /// Which plugin and why.
        outage: crate::decrypt::PluginOutage,
    },
    /// The snapshot file cannot be read (names the file and what is wrong).
    #[error("snapshot {0}")]
    Snapshot(#[from] etcd_snapshot::SnapshotError),
    /// Writing the report failed.
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// The result of a completed scan.
#[derive(Debug)]
pub struct Outcome {
    /// Scan facts.
    pub meta: ScanMeta,
    /// Counts.
    pub summary: Summary,
    /// What the scan cost etcd (zero for a snapshot file).
    pub scan: ScanStats,
    /// `--needs` ran: the list is the result, findings do not fail.
    pub needs_only: bool,
    /// `--free-pages` ran instead of an audit.
    pub free_pages: Option<crate::free_pages::FreePagesReport>,
}

impl Outcome {
    /// Keys with a finding in `--fail-on`.
    pub fn failing(&self) -> u64 {
        self.summary.failing(&self.meta.fail_on)
    }

    /// Why this scan proves nothing, when it does not (see
    /// [`crate::report::nothing_judged`]).
    pub fn nothing_judged(&self) -> Option<String> {
        if self.free_pages.is_some() {
            return None;
        }
        crate::report::nothing_judged(&self.meta, &self.summary)
    }

    /// [`Exit::Error`] when nothing was judged (fail closed), else
    /// [`Exit::Findings`] when something in `--fail-on` was found (or, with
    /// `--free-pages`, remnants were), else [`Exit::Clean`].
    pub fn exit(&self) -> Exit {
        if let Some(f) = &self.free_pages {
            if f.exit_code() == 0 {
                Exit::Clean
            } else {
                Exit::Findings
            }
        } else if self.nothing_judged().is_some() {
            Exit::Error
        } else if self.needs_only || self.failing() == 0 {
            Exit::Clean
        } else {
            Exit::Findings
        }
    }

    /// The process exit status of [`exit`](Self::exit).
    pub fn exit_code(&self) -> u8 {
        self.exit().code()
    }
}

/// Where pages come from: the live scan or a snapshot file. Both yield the
/// same pages (key order, one revision), judged by the same code.
enum Pages {
    Live(Scan),
    /// `--history`: every stored revision of a live etcd.
    History(HistoryScan),
    File(SnapshotScan),
}

impl Pages {
    async fn next_page(&mut self) -> Option<Result<FilePage, RunError>> {
        match self {
            Pages::Live(s) => s.next_page().await.map(|p| {
                p.map_err(RunError::from).map(|p| FilePage {
                    revision: p.revision,
                    kvs: p
                        .kvs
                        .into_iter()
                        .map(|kv| FileKv {
                            key: kv.key,
                            value: kv.value,
                            revision: None,
                        })
                        .collect(),
                })
            }),
            Pages::History(s) => s.next_page().await.map(|p| p.map_err(RunError::from)),
            Pages::File(s) => s.next_page().await.map(|p| p.map_err(RunError::from)),
        }
    }

    /// What the live scan cost etcd; nothing for a file.
    fn stats(&self) -> ScanStats {
        match self {
            Pages::Live(s) => s.stats(),
            Pages::History(_) | Pages::File(_) => ScanStats::default(),
        }
    }
}

/// Loads and validates `--config`.
pub fn load_config(
    path: &PathBuf,
) -> Result<storage_encryption::EncryptionConfiguration, RunError> {
    let bytes = std::fs::read(path).map_err(|source| RunError::ReadConfig {
        path: path.clone(),
        source,
    })?;
    let config =
        storage_encryption::EncryptionConfiguration::parse_bytes(&bytes).map_err(|source| {
            RunError::Config {
                path: path.clone(),
                source,
            }
        })?;
    config.validate().map_err(|source| RunError::Config {
        path: path.clone(),
        source,
    })?;
    Ok(config)
}

/// Runs the audit described by `settings`, writing the report to `out`.
pub async fn run(settings: &Settings, out: impl Write) -> Result<Outcome, RunError> {
    if let (true, Source::Snapshot(path)) = (settings.free_pages, &settings.source) {
        return free_pages_run(settings, path, out).await;
    }
    // Everything that can be checked offline is checked before etcd is contacted.
    let config = settings.config.as_ref().map(load_config).transpose()?;
    // Every report's needs list names the config's keys by fingerprint.
    let fingerprints = crate::report::needs::config_fingerprints(config.as_ref());
    let mut auditor = Auditor::prepare(config, settings).await?;

    let mut pages = match &settings.source {
        Source::Live if settings.all_revisions => {
            let (kv, watch) = settings.etcd.kv_and_watch_clients().await?;
            Pages::History(HistoryScan::start(
                kv,
                watch,
                settings.etcd.endpoints_display(),
                settings.prefix.as_bytes().to_vec(),
                settings.scan,
            ))
        }
        Source::Live => {
            let kv = settings.etcd.kv_client().await?;
            Pages::Live(Scan::start(
                kv,
                settings.etcd.endpoints_display(),
                settings.prefix.as_bytes().to_vec(),
                settings.scan,
            ))
        }
        Source::Snapshot(path) => Pages::File(SnapshotScan::start(
            path.clone(),
            settings.prefix.as_bytes().to_vec(),
            snapshot_page_keys(settings),
            if settings.all_revisions {
                View::AllRevisions
            } else {
                View::Latest
            },
        )),
    };

    let out = BufWriter::with_capacity(64 * 1024, out);
    let mut reporter: Box<dyn Reporter> = match settings.output {
        _ if settings.needs => Box::new(NeedsReporter::new(out, settings.output)),
        OutputFormat::Table => Box::new(TableReporter::new(out)),
        OutputFormat::Json => Box::new(JsonReporter::new(out)),
        OutputFormat::Junit => Box::new(JunitReporter::new(out)),
    };
    let progress = Progress::on_terminal(&settings.prefix);
    let mut summary = Summary::default();
    let mut meta: Option<ScanMeta> = None;
    let mut last_judged: Option<String> = None;

    while let Some(page) = pages.next_page().await {
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        if meta.is_none() {
            let m = ScanMeta {
                prefix: settings.prefix.clone(),
                snapshot: match &settings.source {
                    Source::Live => None,
                    Source::Snapshot(p) => Some(p.display().to_string()),
                },
                etcd_prefix: settings.etcd_prefix.clone(),
                revision: page.revision,
                config: settings.config.as_ref().map(|p| p.display().to_string()),
                fail_on: settings.fail_on.clone(),
                decrypt_check: settings.decrypt_check,
                all_revisions: settings.all_revisions,
                fingerprints: fingerprints.clone(),
            };
            reporter.begin(&m)?;
            meta = Some(m);
        }
        let n = page.kvs.len() as u64;
        for kv in page.kvs {
            let record = match kv.revision {
                None => auditor.audit(&kv.key, &kv.value).await,
                Some(rev) if rev.tombstone => auditor.tombstone(&kv.key, rev),
                Some(rev) => {
                    let mut r = auditor.audit(&kv.key, &kv.value).await;
                    r.revision = Some(rev);
                    r
                }
            };
            if let Some(outage) = auditor.plugin_outage() {
                progress.finish();
                // Fail closed: neither this record nor any later one is a verdict.
                return Err(RunError::PluginOutage {
                    last_judged,
                    at: String::from_utf8_lossy(&kv.key).into_owned(),
                    outage: outage.clone(),
                });
            }
            summary.add(&record);
            reporter.record(&record)?;
            last_judged = Some(record.key);
        }
        progress.inc(n);
    }
    progress.finish();
    // The scan always yields at least one page (possibly empty) unless it failed.
    let meta = meta.ok_or(RunError::Etcd(EtcdError::NoHeader))?;
    reporter.finish(&meta, &summary)?;
    if let Pages::History(h) = &pages {
        let h = h.stats();
        tracing::info!(
            compact_revision = h.compact_revision,
            kept_at_compaction = h.kept_at_compaction,
            watch_events = h.events,
            "etcd history read"
        );
    }
    let stats = pages.stats();
    tracing::info!(
        requests = stats.requests,
        keys = stats.keys,
        bytes = stats.bytes,
        range_keys = stats.range_keys,
        max_range_keys = stats.max_range_keys,
        max_page_keys = stats.max_page_keys,
        "etcd scan finished"
    );
    Ok(Outcome {
        meta,
        summary,
        scan: stats,
        needs_only: settings.needs,
        free_pages: None,
    })
}

/// Keys per page read from a snapshot file: `--page-size` when given, else
/// what a 1 MiB page budget holds of small objects. A file page costs no
/// round trip, so this only bounds memory.
fn snapshot_page_keys(settings: &Settings) -> usize {
    settings
        .scan
        .page_keys
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(1000)
}

/// `snapshot FILE --free-pages`: the free-page scan instead of an audit.
async fn free_pages_run(
    settings: &Settings,
    path: &std::path::Path,
    mut out: impl Write,
) -> Result<Outcome, RunError> {
    let owned = path.to_owned();
    let report = tokio::task::spawn_blocking(move || crate::free_pages::scan(&owned))
        .await
        .map_err(|e| RunError::Output(std::io::Error::other(e)))??;
    crate::free_pages::write(&report, settings.output, &mut out)?;
    Ok(Outcome {
        meta: ScanMeta {
            prefix: settings.prefix.clone(),
            snapshot: Some(path.display().to_string()),
            etcd_prefix: settings.etcd_prefix.clone(),
            revision: 0,
            config: None,
            fail_on: settings.fail_on.clone(),
            decrypt_check: false,
            all_revisions: false,
            fingerprints: Default::default(),
        },
        summary: Summary::default(),
        scan: ScanStats::default(),
        needs_only: false,
        free_pages: Some(report),
    })
}
