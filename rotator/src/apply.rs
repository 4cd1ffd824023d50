//! Running a plan: the state machine of [`crate::state`], stage by stage, on
//! every host, saving the state file after every step so that a kill at any
//! point resumes safely. Every host file is read and written, and every
//! kms-plugin CLI call runs, through [`HostFs`] (local or over SSH; why a
//! stage that stops at an unreachable host leaves every host readable: see
//! [`crate::hostfs`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use storage_encryption::{EncryptionConfiguration, config_file_hash, key_id_hash};

use crate::apiserver::{ApiError, Apiserver};
use crate::fsio::{self, Written};
use crate::gate::{self, GateError, GateReport};
use crate::hostfs::{HostError, HostFs};
use crate::keyring::{KeyringCli, KeyringError};
use crate::plan::{self, Action, Gate, KeyringStep, Operation, Plan, PlanError};
use crate::proof::{self, ProofSettings, ProofTimeout, Wanted};
use crate::rewrite::{self, RewriteError, RewriteSettings};
use crate::secret::SecretText;
use crate::state::{State, StateError, Step, now};
use crate::targets::{Host, Targets};
use ::keyring::Listing;

/// Everything `apply` and `resume` need besides the targets.
#[derive(Debug, Clone)]
pub struct ApplySettings {
    /// The state file.
    pub state_path: PathBuf,
    /// Proof timing.
    pub proof: ProofSettings,
    /// Rewrite knobs.
    pub rewrite: RewriteSettings,
    /// How long the kms-plugins get to reload a copied keyring.
    pub plugin_settle: Duration,
    /// Index of the host whose apiserver serves the rewrite.
    pub rewrite_via: usize,
    /// The kms-plugin CLI.
    pub keyring_cli: KeyringCli,
    /// Files and commands on the hosts (one per run: holds the SSH masters).
    pub hosts: Arc<HostFs>,
    /// Stop after this many stages (for operators who go one stage at a time).
    pub max_stages: Option<usize>,
    /// `--allow-unrestorable-backups`: a kept backup that still needs what a
    /// stage removes does not stop the run (recorded in the state file).
    pub allow_unrestorable_backups: bool,
    /// Start a new run despite what the checks before it found (recorded).
    pub force: bool,
    /// Accept apiservers that do not report the config hash or key_id metrics.
    pub accept_unreported: bool,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The plan could not be made.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A host's config file is not valid.
    #[error("{path} (host {host}): {source}")]
    HostConfig {
        /// Host.
        host: String,
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: storage_encryption::ConfigError,
    },
    /// Hosts have different files, or a file changed outside the rotator.
    #[error("{message}")]
    Drift {
        /// What differs, naming host and file.
        message: String,
    },
    /// An unfinished run exists, or there is none to resume.
    #[error("{0}")]
    StateConflict(String),
    /// State file I/O.
    #[error(transparent)]
    State(#[from] StateError),
    /// A host file could not be written.
    #[error(transparent)]
    Write(#[from] fsio::WriteError),
    /// A host file or command failed, or the host could not be reached.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The apiserver client failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Proof did not come in time.
    #[error("stage {stage}: {source}")]
    Proof {
        /// Stage number (1-based).
        stage: usize,
        /// Which apiserver lags and what it shows.
        #[source]
        source: ProofTimeout,
    },
    /// The gate found values that still need what would be removed.
    #[error("stage {stage} refused: {report}")]
    GateRefused {
        /// Stage number (1-based).
        stage: usize,
        /// The findings.
        report: GateReport,
    },
    /// The gate could not run.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The keyring CLI failed.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The rewrite failed (the checkpoint keeps what was done).
    #[error("rewrite: {0}")]
    Rewrite(#[from] RewriteError),
    /// Something the state says cannot be (a bug or a hand-edited state file).
    #[error("state file inconsistent: {0}")]
    Inconsistent(String),
    /// The checks before a new run found drift, an unchecked host, or values
    /// the current config did not write; `--force` was not given.
    #[error("refusing to start a new run (--force overrides, and the state file records it):\n  {}", .findings.join("\n  "))]
    Refused {
        /// One line per finding.
        findings: Vec<String>,
        /// The documented exit code of the worst finding.
        code: u8,
    },
    /// A host could not be looked at (its apiserver or files).
    #[error("{0}")]
    Unreachable(String),
    /// A KMS provider about to become the writer failed its round trip.
    #[error("stage {stage} refused before any write: KMS provider {provider} must pass Status + Encrypt + Decrypt on every host first:\n  {}", .failures.join("\n  "))]
    KmsRoundTrip {
        /// Stage number (1-based).
        stage: usize,
        /// The provider.
        provider: String,
        /// `host: reason` per failing host.
        failures: Vec<String>,
    },
    /// A config changed while the rewrite ran.
    #[error("stage {stage}: {source}")]
    ConfigChanged {
        /// Stage number (1-based).
        stage: usize,
        /// What changed where.
        #[source]
        source: Box<crate::check::ConfigChanged>,
    },
    /// Blocking work run off the async workers (the kms-plugin CLI) panicked
    /// or was cancelled.
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Documented exit codes (see `rotator --help`).
pub mod exit {
    use crate::cli::Exit;

    /// Done (or nothing to do).
    pub const OK: u8 = Exit::Ok.code();
    /// Runtime failure: I/O, apiserver, etcd, kms-plugin CLI, rewrite.
    pub const FAILURE: u8 = Exit::Failure.code();
    /// Usage or config error: flags, rotator config, EncryptionConfiguration, no possible plan.
    pub const USAGE: u8 = Exit::Usage.code();
    /// The etcd audit gate refused a removal: values still need the old key.
    pub const GATE_REFUSED: u8 = Exit::GateRefused.code();
    /// An apiserver did not prove the stage in time.
    pub const PROOF_TIMEOUT: u8 = Exit::ProofTimeout.code();
    /// State conflict: an unfinished run exists, none to resume, or host files drifted.
    pub const STATE: u8 = Exit::State.code();
    /// A host could not be reached or checked.
    pub const UNREACHABLE: u8 = Exit::Unreachable.code();
    /// Drift between hosts, or between a file and its apiserver, or a config changed mid-rewrite.
    pub const DRIFT: u8 = Exit::Drift.code();
    /// A KMS plugin failed its round trip before becoming the writer.
    pub const KMS_ROUNDTRIP: u8 = Exit::KmsRoundTrip.code();
}

impl ApplyError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Plan(_) | Self::HostConfig { .. } => exit::USAGE,
            Self::GateRefused { .. } => exit::GATE_REFUSED,
            Self::Proof { .. } => exit::PROOF_TIMEOUT,
            Self::Refused { code, .. } => *code,
            Self::Unreachable(_) => exit::UNREACHABLE,
            Self::KmsRoundTrip { .. } => exit::KMS_ROUNDTRIP,
            Self::ConfigChanged { .. } => exit::DRIFT,
            Self::Drift { .. } | Self::StateConflict(_) | Self::Inconsistent(_) => exit::STATE,
            Self::State(e) if e.is_conflict() => exit::STATE,
            Self::Host(e) | Self::Keyring(KeyringError::Host(e)) if e.is_unreachable() => {
                exit::UNREACHABLE
            }
            _ => exit::FAILURE,
        }
    }
}

fn say(msg: &str) {
    eprintln!("rotator: {msg}");
}

/// What the hosts have now.
#[derive(Debug)]
pub struct Inputs {
    /// The common config file (raw text), `None` when no host has one.
    pub raw: Option<SecretText>,
    /// It parsed.
    pub config: Option<EncryptionConfiguration>,
    /// The keyring listing of the first host (rotate-kek).
    pub keyring: Option<Listing>,
}

/// The file `path_of` names on every host, which must be byte-identical
/// everywhere (`None` when no host has it). `what` names it in messages.
fn same_on_every_host(
    targets: &Targets,
    fs: &HostFs,
    what: &str,
    path_of: impl Fn(&Host) -> Result<&Path, ApplyError>,
) -> Result<Option<Zeroizing<Vec<u8>>>, ApplyError> {
    let first = targets.first();
    let first_path = path_of(first)?;
    let bytes = fs.read(first, first_path)?;
    for h in targets.others() {
        let path = path_of(h)?;
        if fs.read(h, path)? != bytes {
            return Err(ApplyError::Drift {
                message: format!(
                    "the {what} files of hosts {} ({}) and {} ({}) differ; make them identical first",
                    first.name,
                    first_path.display(),
                    h.name,
                    path.display()
                ),
            });
        }
    }
    Ok(bytes)
}

/// A host's keyring path (needed by `rotate-kek`).
fn keyring_of(h: &Host) -> Result<&Path, ApplyError> {
    h.keyring.as_deref().ok_or_else(|| ApplyError::Drift {
        message: format!(
            "rotate-kek: host {} has no keyring path in the rotator config",
            h.name
        ),
    })
}

/// The kms-plugin CLI on `host`, run off the async workers (it waits for a
/// child process).
async fn keyring_cli<T: Send + 'static>(
    settings: (&Arc<HostFs>, &KeyringCli),
    host: &Host,
    keyring: &Path,
    call: impl FnOnce(&KeyringCli, &HostFs, &Host, &Path) -> Result<T, KeyringError> + Send + 'static,
) -> Result<T, ApplyError> {
    let (fs, cli) = (settings.0.clone(), settings.1.clone());
    let (host, keyring) = (host.clone(), keyring.to_owned());
    Ok(tokio::task::spawn_blocking(move || call(&cli, &fs, &host, &keyring)).await??)
}

/// Reads every host's config (they must be identical) and, for `rotate-kek`,
/// checks every keyring copy is identical and lists the first.
pub async fn gather(
    targets: &Targets,
    op: &Operation,
    fs: &Arc<HostFs>,
    cli: &KeyringCli,
) -> Result<Inputs, ApplyError> {
    let raw = same_on_every_host(targets, fs, "EncryptionConfiguration", |h| {
        Ok(&h.encryption_config)
    })?;
    let (raw, config) = match raw {
        None => (None, None),
        Some(bytes) => {
            let h = targets.first();
            let config = EncryptionConfiguration::parse_bytes(&bytes).map_err(|source| {
                ApplyError::HostConfig {
                    host: h.name.clone(),
                    path: h.encryption_config.clone(),
                    source,
                }
            })?;
            (
                Some(SecretText::new(
                    String::from_utf8_lossy(&bytes).into_owned(),
                )),
                Some(config),
            )
        }
    };
    let keyring = if matches!(op, Operation::RotateKek) {
        if same_on_every_host(targets, fs, "keyring", keyring_of)?.is_none() {
            let h = targets.first();
            return Err(ApplyError::Drift {
                message: format!(
                    "rotate-kek: keyring {} of host {} does not exist",
                    keyring_of(h)?.display(),
                    h.name
                ),
            });
        }
        let first = targets.first();
        let path = keyring_of(first)?;
        Some(keyring_cli((fs, cli), first, path, |c, f, h, p| c.list(f, h, p)).await?)
    } else {
        None
    };
    Ok(Inputs {
        raw,
        config,
        keyring,
    })
}

/// Makes the plan for `op` from what the hosts have, with fresh random keys.
pub async fn make_plan(
    targets: &Targets,
    op: &Operation,
    fs: &Arc<HostFs>,
    cli: &KeyringCli,
) -> Result<Plan, ApplyError> {
    let inputs = gather(targets, op, fs, cli).await?;
    let mut plan = plan::build(
        op,
        inputs.config.as_ref(),
        inputs.keyring.as_ref(),
        &mut crate::keygen::random_key,
    )?;
    // The hosts' file as it is (not as re-rendered): its hash is what the
    // apiservers report, and what the first write must find.
    plan.original_hash = inputs
        .raw
        .as_ref()
        .map(|t| config_file_hash(t.expose().as_bytes()));
    plan.original = inputs.raw;
    Ok(plan)
}

/// Starts a new run of `op` (refusing if an unfinished one exists) and runs it.
pub async fn apply(
    targets: &Targets,
    op: &Operation,
    settings: &ApplySettings,
) -> Result<State, ApplyError> {
    // The lock comes first: two runs must never both see "no unfinished run".
    let _lock = RunLock::acquire(&settings.state_path)?;
    if let Some(old) = State::load(&settings.state_path)?
        && !old.finished()
    {
        return Err(ApplyError::StateConflict(format!(
            "{} holds an unfinished {} run (stage {}/{}): run `rotator resume`, or `rotator status` to see it",
            settings.state_path.display(),
            old.plan.operation.name(),
            old.stage + 1,
            old.plan.stages.len()
        )));
    }
    let forced = preflight(targets, settings).await?;
    let plan = make_plan(targets, op, &settings.hosts, &settings.keyring_cli).await?;
    if settings.state_path.exists() {
        // Keep the finished run's file (it holds the keys it generated) beside the new one.
        let kept = PathBuf::from(format!(
            "{}.finished-{}",
            settings.state_path.display(),
            (now() * 1000.0) as u64
        ));
        std::fs::rename(&settings.state_path, &kept).map_err(|source| fsio::WriteError {
            path: kept.clone(),
            source,
        })?;
        say(&format!(
            "the finished run's state file is kept as {}",
            kept.display()
        ));
    }
    let mut state = State::new(plan, targets.names());
    state.event(format!(
        "planned {} with {} stages",
        op.name(),
        state.plan.stages.len()
    ));
    if !forced.is_empty() {
        state.event(format!("started with --force over: {}", forced.join("; ")));
        state.forced = forced;
    }
    state.save(&settings.state_path)?;
    say(&format!(
        "state file {} created (it holds the new keys: keep it secret)",
        settings.state_path.display()
    ));
    run(targets, &mut state, settings).await?;
    Ok(state)
}

/// The interlock before a new run: `rotator check` and the etcd audit for
/// values the current config did not write. Refuses unless `--force`; then
/// returns what was overridden (empty when nothing was).
async fn preflight(targets: &Targets, settings: &ApplySettings) -> Result<Vec<String>, ApplyError> {
    say("checking every host and auditing etcd before a new run");
    let found =
        crate::check::preflight(&settings.hosts, targets, settings.accept_unreported).await?;
    if found.passed() {
        return Ok(Vec::new());
    }
    let findings = found.findings();
    if settings.force {
        for f in &findings {
            say(&format!("--force: overriding {f}"));
        }
        return Ok(findings);
    }
    let code = match &found.check {
        Some(c) if !c.passed() => c.exit_code(),
        _ => exit::GATE_REFUSED,
    };
    Err(ApplyError::Refused { findings, code })
}

/// Resumes the run in the state file.
pub async fn resume(targets: &Targets, settings: &ApplySettings) -> Result<State, ApplyError> {
    let _lock = RunLock::acquire(&settings.state_path)?;
    let Some(mut state) = State::load(&settings.state_path)? else {
        return Err(ApplyError::StateConflict(format!(
            "no state file at {}: nothing to resume",
            settings.state_path.display()
        )));
    };
    let names = targets.names();
    if names != state.hosts {
        return Err(ApplyError::StateConflict(format!(
            "the run was planned for hosts {:?} but the rotator config lists {:?}",
            state.hosts, names
        )));
    }
    if state.finished() {
        say("the run in the state file is already finished");
        return Ok(state);
    }
    run(targets, &mut state, settings).await?;
    Ok(state)
}

/// `<state>.lock`, held with `flock(2)`: one run per state file at a time.
/// The kernel drops the lock when the holder exits, however it exits, so a
/// killed run leaves nothing stale to judge, and no pid is trusted. The file
/// itself stays (removing it would let a third run lock a new file while a
/// second still waits on the old one); it holds the holder's pid for people.
#[derive(Debug)]
struct RunLock {
    _held: Flock<std::fs::File>,
}

impl RunLock {
    fn acquire(state_path: &Path) -> Result<Self, ApplyError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = PathBuf::from(format!("{}.lock", state_path.display()));
        let io_err = |source| fsio::WriteError {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => held,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid: String = pid.trim().chars().filter(char::is_ascii_digit).collect();
                let who = if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                };
                return Err(ApplyError::StateConflict(format!(
                    "another rotator{who} is running with {} (it holds {}); wait for it to end",
                    state_path.display(),
                    path.display()
                )));
            }
            Err((_, errno)) => return Err(io_err(std::io::Error::from(errno)).into()),
        };
        // For people only: the lock is the flock, not this number.
        held.set_len(0)
            .and_then(|()| held.rewind())
            .and_then(|()| writeln!(*held, "{}", std::process::id()))
            .map_err(io_err)?;
        Ok(RunLock { _held: held })
    }
}

fn parse_config(text: &SecretText, what: &str) -> Result<EncryptionConfiguration, ApplyError> {
    EncryptionConfiguration::parse(text.expose())
        .map_err(|e| ApplyError::Inconsistent(format!("{what}: {e}")))
}

async fn run(
    targets: &Targets,
    state: &mut State,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let mut apis = Vec::new();
    for h in targets.hosts() {
        apis.push(Apiserver::connect(h).await?);
    }
    let mut done_now = 0;
    while !state.finished() {
        if settings.max_stages.is_some_and(|m| done_now >= m) {
            say(&format!(
                "stopping after {done_now} stage(s) as asked; `rotator resume` continues"
            ));
            return Ok(());
        }
        let index = state.stage;
        let stage = state.plan.stages[index].clone();
        let n = state.plan.stages.len();
        match state.step {
            Step::Pending | Step::Applying { .. } => {
                say(&format!("stage {}/{n}: {}", index + 1, stage.title));
                if let Some(g) = &stage.gate {
                    // Re-run on every resume: a gate is never skipped.
                    let report = run_gate(targets, state, index, g).await?;
                    if !report.passed()
                        && settings.allow_unrestorable_backups
                        && report.passed_allowing_backups()
                    {
                        allow_unrestorable_backups(state, &report);
                    } else if !report.passed() {
                        state.event(format!(
                            "gate refused: {} values still need it",
                            report.blocking_count()
                        ));
                        state.step = Step::Pending;
                        state.save(&settings.state_path)?;
                        return Err(ApplyError::GateRefused {
                            stage: index + 1,
                            report,
                        });
                    }
                    state.event(format!("gate passed: {report}"));
                }
                kms_roundtrip_before_writer(targets, state, index, settings).await?;
                let started = match state.step {
                    Step::Applying { started } => started,
                    _ => now(),
                };
                state.step = Step::Applying { started };
                state.save(&settings.state_path)?;
                do_action(targets, &apis, state, index, &stage.action, settings).await?;
                state.step = Step::Applied { started };
                state.save(&settings.state_path)?;
            }
            Step::Applied { started } => {
                prove(
                    targets,
                    &apis,
                    state,
                    index,
                    &stage.action,
                    started,
                    settings,
                )
                .await?;
                state.stage += 1;
                state.step = Step::Pending;
                state.save(&settings.state_path)?;
                done_now += 1;
            }
        }
    }
    state.event("run finished");
    state.save(&settings.state_path)?;
    say("done: every stage is applied and proven");
    if !state.unrestorable_backups.is_empty() {
        say(&format!(
            "{} kept backups can no longer be restored (--allow-unrestorable-backups):",
            state.unrestorable_backups.len()
        ));
        for b in &state.unrestorable_backups {
            say(&format!("  {b}"));
        }
    }
    if !state.forced.is_empty() {
        say(&format!(
            "this run was started with --force over: {}",
            state.forced.join("; ")
        ));
    }
    Ok(())
}

/// Before a stage makes a KMS provider the writer of some resource: a round
/// trip through it on every host. Refuses before anything of the stage is written.
async fn kms_roundtrip_before_writer(
    targets: &Targets,
    state: &mut State,
    index: usize,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let Action::WriteConfig { content, .. } = &state.plan.stages[index].action else {
        return Ok(());
    };
    let after = parse_config(content, "config of this stage")?;
    let before = match state.plan.config_before(index) {
        Some(t) => Some(parse_config(t, "config before this stage")?),
        None => None,
    };
    for kms in crate::check::new_kms_writers(before.as_ref(), &after) {
        say(&format!(
            "KMS provider {} becomes a writer: round trip (Status + Encrypt + Decrypt) through {} on every host",
            kms.name, kms.endpoint
        ));
        let failures = crate::check::roundtrips(&settings.hosts, targets, kms).await;
        if !failures.is_empty() {
            let lines: Vec<String> = failures
                .iter()
                .map(|f| format!("{}: {}", f.host, f.reason))
                .collect();
            state.event(format!(
                "refused: KMS provider {} failed its round trip on {}",
                kms.name,
                failures
                    .iter()
                    .map(|f| f.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            state.save(&settings.state_path)?;
            return Err(ApplyError::KmsRoundTrip {
                stage: index + 1,
                provider: kms.name.clone(),
                failures: lines,
            });
        }
        state.event(format!(
            "KMS provider {} passed its round trip on every host",
            kms.name
        ));
    }
    Ok(())
}

/// `--allow-unrestorable-backups` let a gate pass that only backups
/// blocked: each such backup is recorded in the state file (events and
/// [`State::unrestorable_backups`]) and said.
fn allow_unrestorable_backups(state: &mut State, report: &GateReport) {
    for b in &report.backups {
        let what = b.describe();
        say(&format!(
            "--allow-unrestorable-backups: {what}; it will not restore after this stage"
        ));
        state.event(format!("allowed unrestorable {what}"));
        if !state.unrestorable_backups.contains(&what) {
            state.unrestorable_backups.push(what);
        }
    }
    state.event(format!(
        "gate passed with --allow-unrestorable-backups: {report}"
    ));
}

async fn run_gate(
    targets: &Targets,
    state: &State,
    index: usize,
    gate: &Gate,
) -> Result<GateReport, ApplyError> {
    say("gate: auditing etcd before the removal");
    match gate {
        Gate::ConfigRemoval { .. } => {
            let before = state.plan.config_before(index).ok_or_else(|| {
                ApplyError::Inconsistent("a removal stage has no config before it".into())
            })?;
            let Action::WriteConfig { content, .. } = &state.plan.stages[index].action else {
                return Err(ApplyError::Inconsistent(
                    "a config gate on a non-config stage".into(),
                ));
            };
            let before = parse_config(before, "config before the removal")?;
            let after = parse_config(content, "config of the removal stage")?;
            Ok(gate::config_removal(&targets.etcd, &targets.backups, &before, &after).await?)
        }
        Gate::KekRetire => {
            if state.kek.old_key_ids.is_empty() {
                return Err(ApplyError::Inconsistent(
                    "the old KEK's key_ids were never recorded".into(),
                ));
            }
            Ok(gate::kek_retire(&targets.etcd, &targets.backups, &state.kek.old_key_ids).await?)
        }
    }
}

/// A host's config must be what the previous stage wrote or what this one writes.
fn check_drift(
    targets: &Targets,
    fs: &HostFs,
    state: &State,
    index: usize,
    new_hash: &str,
) -> Result<(), ApplyError> {
    let before = state
        .plan
        .config_before(index)
        .map(|t| config_file_hash(t.expose().as_bytes()));
    for h in targets.hosts() {
        let found = fs
            .read(h, &h.encryption_config)?
            .map(|b| config_file_hash(&b));
        if found.as_deref() == Some(new_hash) || found == before {
            continue;
        }
        return Err(ApplyError::Drift {
            message: format!(
                "{} on host {} changed outside the rotator: it is {} but stage {} expects {} (or {new_hash}); restore it from {} or start over",
                h.encryption_config.display(),
                h.name,
                found.as_deref().unwrap_or("missing"),
                index + 1,
                before.as_deref().unwrap_or("no file"),
                fsio::backup_path(&h.encryption_config).display()
            ),
        });
    }
    Ok(())
}

/// Copies the first host's keyring file to every other host.
fn distribute_keyring(targets: &Targets, fs: &HostFs, state: &mut State) -> Result<(), ApplyError> {
    let first = targets.first();
    let src = keyring_of(first)?;
    let bytes = fs.read(first, src)?.ok_or_else(|| ApplyError::Drift {
        message: format!(
            "keyring {} of host {} does not exist",
            src.display(),
            first.name
        ),
    })?;
    for h in targets.others() {
        let dst = keyring_of(h)?;
        if fs.replace(h, dst, &bytes)? != Written::Unchanged {
            state.event(format!(
                "copied the keyring to {} ({})",
                h.name,
                dst.display()
            ));
        }
    }
    Ok(())
}

async fn do_action(
    targets: &Targets,
    apis: &[Apiserver],
    state: &mut State,
    index: usize,
    action: &Action,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    match action {
        Action::WriteConfig { content, hash } => {
            write_config(targets, &settings.hosts, state, index, content, hash)
        }
        Action::Keyring { step } => {
            // Every host answers before the first host's keyring changes: a
            // host that is already away stops the stage with nothing changed
            // (a partly copied promote is not readable everywhere: see
            // `crate::hostfs`).
            for h in targets.hosts() {
                settings.hosts.read(h, keyring_of(h)?)?;
            }
            match step {
                KeyringStep::AddKek => add_kek(targets, state, settings).await?,
                KeyringStep::PromoteNewKek => promote_new_kek(targets, state, settings).await?,
                KeyringStep::RetireOldKek => retire_old_kek(targets, state, settings).await?,
            }
            distribute_keyring(targets, &settings.hosts, state)
        }
        Action::Rewrite { resources } => {
            rewrite_all(targets, apis, state, index, resources, settings).await
        }
    }
}

/// Writes the stage's EncryptionConfiguration to every host (a host that
/// already has it is left alone), after checking no host drifted.
fn write_config(
    targets: &Targets,
    fs: &HostFs,
    state: &mut State,
    index: usize,
    content: &SecretText,
    hash: &str,
) -> Result<(), ApplyError> {
    check_drift(targets, fs, state, index, hash)?;
    for h in targets.hosts() {
        match fs.replace(h, &h.encryption_config, content.expose().as_bytes())? {
            Written::Replaced | Written::Created => state.event(format!(
                "wrote {hash} to {} ({})",
                h.name,
                h.encryption_config.display()
            )),
            Written::Unchanged => state.event(format!("{} already has {hash}", h.name)),
        }
    }
    Ok(())
}

/// `keyring add` on the first host's keyring, once: after a kill between the
/// add and the state write, the added KEK is found instead of adding another.
async fn add_kek(
    targets: &Targets,
    state: &mut State,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let cli = (&settings.hosts, &settings.keyring_cli);
    let h0 = targets.first();
    let k0 = keyring_of(h0)?;
    let info = keyring_cli(cli, h0, k0, |c, f, h, p| c.list(f, h, p)).await?;
    if state.kek.keks_before_add.is_none() {
        record_old_kek(state, &info, k0)?;
        state.save(&settings.state_path)?;
    }
    let before = state.kek.keks_before_add.clone().unwrap_or_default();
    let added = |info: &Listing| {
        info.keks
            .iter()
            .map(|k| k.kek)
            .find(|k| !before.contains(k))
    };
    let new = match added(&info) {
        Some(k) => k,
        None => {
            keyring_cli(cli, h0, k0, |c, f, h, p| c.add(f, h, p)).await?;
            let info = keyring_cli(cli, h0, k0, |c, f, h, p| c.list(f, h, p)).await?;
            added(&info).ok_or_else(|| {
                ApplyError::Inconsistent(format!("`keyring add` on {} added no KEK", k0.display()))
            })?
        }
    };
    state.kek.new_kek = Some(new);
    state.event(format!(
        "KEK {new} added (decrypt-only) on {}",
        targets.first().name
    ));
    state.save(&settings.state_path)?;
    Ok(())
}

/// Records, before anything changes, which KEKs exist and every key_id of the
/// primary one (the retire gate looks for them); refuses a keyring whose
/// primary is not the one planned.
fn record_old_kek(state: &mut State, info: &Listing, k0: &Path) -> Result<(), ApplyError> {
    let planned = state.plan.keyring.as_ref().map(|k| k.primary);
    if planned != Some(info.primary) {
        return Err(ApplyError::Drift {
            message: format!(
                "keyring {} changed since the plan: primary KEK is {} (planned {:?})",
                k0.display(),
                info.primary,
                planned
            ),
        });
    }
    let old = info
        .primary_kek()
        .ok_or_else(|| ApplyError::Inconsistent("no primary KEK".into()))?;
    let mut ids = old.key_ids.clone();
    if let Some(id) = &old.key_id
        && !ids.contains(id)
    {
        ids.push(id.clone());
    }
    if ids.is_empty() {
        return Err(ApplyError::Inconsistent(format!(
            "the primary KEK {} has no key_id",
            old.kek
        )));
    }
    state.kek.keks_before_add = Some(info.keks.iter().map(|k| k.kek).collect());
    state.kek.old_kek = Some(old.kek);
    state.kek.old_key_ids = ids;
    Ok(())
}

/// `keyring promote` of the added KEK (unless it is primary already); records its key_id.
async fn promote_new_kek(
    targets: &Targets,
    state: &mut State,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let cli = (&settings.hosts, &settings.keyring_cli);
    let h0 = targets.first();
    let k0 = keyring_of(h0)?;
    let new = state
        .kek
        .new_kek
        .ok_or_else(|| ApplyError::Inconsistent("no new KEK recorded".into()))?;
    if keyring_cli(cli, h0, k0, |c, f, h, p| c.list(f, h, p))
        .await?
        .primary
        != new
    {
        keyring_cli(cli, h0, k0, move |c, f, h, p| c.promote(f, h, p, new)).await?;
    }
    let info = keyring_cli(cli, h0, k0, |c, f, h, p| c.list(f, h, p)).await?;
    let key_id = info
        .kek(new)
        .and_then(|k| k.key_id.clone())
        .filter(|_| info.primary == new)
        .ok_or_else(|| {
            ApplyError::Inconsistent(format!(
                "KEK {new} is not primary with a key_id after promote"
            ))
        })?;
    state.event(format!("KEK {new} is primary with key_id {key_id}"));
    state.kek.new_key_id = Some(key_id);
    state.save(&settings.state_path)?;
    Ok(())
}

/// `keyring retire` of the old KEK (unless it is gone already).
async fn retire_old_kek(
    targets: &Targets,
    state: &mut State,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let cli = (&settings.hosts, &settings.keyring_cli);
    let h0 = targets.first();
    let k0 = keyring_of(h0)?;
    let old = state
        .kek
        .old_kek
        .ok_or_else(|| ApplyError::Inconsistent("no old KEK recorded".into()))?;
    if keyring_cli(cli, h0, k0, |c, f, h, p| c.list(f, h, p))
        .await?
        .kek(old)
        .is_some()
    {
        keyring_cli(cli, h0, k0, move |c, f, h, p| c.retire(f, h, p, old)).await?;
    }
    state.event(format!("KEK {old} retired"));
    Ok(())
}

/// Rewrites every object of `resources` through one apiserver, saving the
/// checkpoint to the state file as pages complete.
///
/// Every host's config must stay the one the stage expects (the previous
/// config stage's): proven again before it starts or resumes, watched while
/// it runs; a change stops it ([`ApplyError::ConfigChanged`]).
async fn rewrite_all(
    targets: &Targets,
    apis: &[Apiserver],
    state: &mut State,
    index: usize,
    resources: &[String],
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let expected = state
        .plan
        .config_before(index)
        .map(|t| config_file_hash(t.expose().as_bytes()))
        .ok_or_else(|| {
            ApplyError::Inconsistent("a rewrite stage with no config before it".into())
        })?;
    crate::check::reprove_before_rewrite(
        &settings.hosts,
        targets,
        apis,
        &expected,
        settings.proof.timeout,
        settings.proof.poll,
    )
    .await
    .map_err(|source| ApplyError::ConfigChanged {
        stage: index + 1,
        source: Box::new(source),
    })?;
    let via = settings.rewrite_via.min(apis.len().saturating_sub(1));
    let api = apis
        .get(via)
        .ok_or_else(|| ApplyError::Inconsistent("no apiserver to rewrite through".into()))?;
    let found = rewrite::discover(api, resources).await?;
    say(&format!(
        "rewriting {} through {}",
        found
            .iter()
            .map(|t| t.key.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        api.host
    ));
    let mut checkpoint = std::mem::take(&mut state.rewrite);
    let mut snapshot = state.clone();
    let path = settings.state_path.clone();
    let mut save = |cp: &crate::state::Checkpoint| {
        snapshot.rewrite = cp.clone();
        snapshot.save(&path).map_err(|e| e.to_string())
    };
    // A person's edit is seen within a second or a poll interval, whichever is
    // longer: the watch must not compete with the rewrite for the apiservers.
    let watch_every = settings.proof.poll.max(Duration::from_secs(1));
    let watch =
        crate::check::watch_during_rewrite(&settings.hosts, targets, apis, &expected, watch_every);
    let result = tokio::select! {
        r = rewrite::run(api, &found, &mut checkpoint, settings.rewrite, &mut save) => Ok(r),
        changed = watch => Err(changed),
    };
    state.rewrite = checkpoint;
    let summary = match result {
        Ok(r) => r?,
        Err(source) => {
            state.event(format!("rewrite stopped: {source}"));
            state.save(&settings.state_path)?;
            return Err(ApplyError::ConfigChanged {
                stage: index + 1,
                source: Box::new(source),
            });
        }
    };
    eprint!("{summary}");
    state.event(format!(
        "rewrite done: {} updated, {} gone",
        summary.updated, summary.skipped
    ));
    Ok(())
}

async fn prove(
    targets: &Targets,
    apis: &[Apiserver],
    state: &mut State,
    index: usize,
    action: &Action,
    started: f64,
    settings: &ApplySettings,
) -> Result<(), ApplyError> {
    let wanted = match action {
        Action::WriteConfig { hash, .. } => Wanted::Config {
            hash: hash.clone(),
            since: started,
        },
        Action::Keyring {
            step: KeyringStep::PromoteNewKek,
        } => {
            let id = state
                .kek
                .new_key_id
                .as_deref()
                .ok_or_else(|| ApplyError::Inconsistent("no new key_id recorded".into()))?;
            Wanted::KeyId {
                key_id_hash: key_id_hash(id),
            }
        }
        Action::Keyring { .. } => {
            // The plugins poll the keyring file; no apiserver metric shows a
            // decrypt-only KEK, so give them time to load it.
            say(&format!(
                "waiting {:?} for every kms-plugin to load the keyring",
                settings.plugin_settle
            ));
            tokio::time::sleep(settings.plugin_settle).await;
            state.event("keyring settle time passed");
            return Ok(());
        }
        Action::Rewrite { .. } => {
            state.event("rewrite complete");
            return Ok(());
        }
    };
    say(&format!(
        "stage {}: waiting for every apiserver to prove it",
        index + 1
    ));
    let mut notify = |m: String| say(&m);
    let modes = proof::wait_all(apis, targets.hosts(), &wanted, settings.proof, &mut notify)
        .await
        .map_err(|source| ApplyError::Proof {
            stage: index + 1,
            source,
        })?;
    let how: Vec<String> = modes.iter().map(|(h, m)| format!("{h} ({m})")).collect();
    state.event(format!("proven by {}", how.join(", ")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_lock_is_held_by_one_taker_and_never_judged_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let lock = dir.path().join("state.json.lock");
        // Leftovers of a killed run (an empty file, a reused or garbage pid) do not matter.
        for leftover in ["", "1\n", "not a pid"] {
            std::fs::write(&lock, leftover).unwrap();
            let held = RunLock::acquire(&state).unwrap();
            assert_eq!(
                std::fs::read_to_string(&lock).unwrap().trim(),
                std::process::id().to_string()
            );
            let e = RunLock::acquire(&state).unwrap_err();
            assert!(matches!(e, ApplyError::StateConflict(_)), "{e}");
            assert_eq!(e.exit_code(), exit::STATE);
            assert!(e.to_string().contains("another rotator"), "{e}");
            drop(held);
            // Released with its holder; the file stays.
            assert!(lock.exists());
            drop(RunLock::acquire(&state).unwrap());
        }
    }

    #[test]
    fn many_simultaneous_takers_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (state, barrier, tx) = (state.clone(), barrier.clone(), tx.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let r = RunLock::acquire(&state);
                    let won = r.is_ok();
                    tx.send(won).unwrap();
                    // Hold until every taker has tried.
                    barrier.wait();
                    drop(r);
                })
            })
            .collect();
        drop(tx);
        let wins = rx.iter().filter(|w| *w).count();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(wins, 1);
    }
}
