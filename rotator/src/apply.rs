//! Running a plan: the state machine of [`crate::state`], stage by stage, on
//! every host, saving the state file after every step so that a kill at any
//! point resumes safely.

use std::path::{Path, PathBuf};
use std::time::Duration;

use storage_encryption::{EncryptionConfiguration, config_file_hash, key_id_hash};

use crate::apiserver::{ApiError, Apiserver};
use crate::fsio::{self, Written};
use crate::gate::{self, GateError, GateReport};
use crate::keyring::{KeyringCli, KeyringError, KeyringInfo};
use crate::plan::{self, Action, Gate, KeyringStep, Operation, Plan, PlanError};
use crate::proof::{self, ProofSettings, ProofTimeout, Wanted};
use crate::rewrite::{self, RewriteError, RewriteSettings};
use crate::secret::SecretText;
use crate::state::{State, StateError, Step, now};
use crate::targets::Targets;

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
    /// Stop after this many stages (for operators who go one stage at a time).
    pub max_stages: Option<usize>,
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
    /// Reading a host file failed.
    #[error("cannot read {path} (host {host}): {source}")]
    Read {
        /// Host.
        host: String,
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
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
}

impl ApplyError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Plan(_) | Self::HostConfig { .. } => exit::USAGE,
            Self::GateRefused { .. } => exit::GATE_REFUSED,
            Self::Proof { .. } => exit::PROOF_TIMEOUT,
            Self::Drift { .. } | Self::StateConflict(_) | Self::Inconsistent(_) => exit::STATE,
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
    pub keyring: Option<KeyringInfo>,
}

fn read_opt(host: &str, path: &Path) -> Result<Option<Vec<u8>>, ApplyError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ApplyError::Read {
            host: host.to_owned(),
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads every host's config (they must be identical) and, for `rotate-kek`,
/// checks every keyring copy is identical and lists the first.
pub fn gather(targets: &Targets, op: &Operation, cli: &KeyringCli) -> Result<Inputs, ApplyError> {
    let mut first: Option<(String, Option<zeroize::Zeroizing<Vec<u8>>>)> = None;
    for h in &targets.hosts {
        let bytes = read_opt(&h.name, &h.encryption_config)?.map(zeroize::Zeroizing::new);
        match &first {
            None => first = Some((h.name.clone(), bytes)),
            Some((name, b)) if *b != bytes => {
                return Err(ApplyError::Drift {
                    message: format!(
                        "hosts {name} and {} have different EncryptionConfiguration files ({}); make them identical first",
                        h.name,
                        h.encryption_config.display()
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let raw = first.and_then(|(_, b)| b);
    let (raw, config) = match raw {
        None => (None, None),
        Some(bytes) => {
            let h = &targets.hosts[0];
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
        let mut first: Option<(String, zeroize::Zeroizing<Vec<u8>>)> = None;
        for h in &targets.hosts {
            let Some(path) = &h.keyring else {
                return Err(ApplyError::Drift {
                    message: format!(
                        "rotate-kek: host {} has no keyring path in the rotator config",
                        h.name
                    ),
                });
            };
            let bytes = zeroize::Zeroizing::new(read_opt(&h.name, path)?.ok_or_else(|| {
                ApplyError::Drift {
                    message: format!(
                        "rotate-kek: keyring {} of host {} does not exist",
                        path.display(),
                        h.name
                    ),
                }
            })?);
            match &first {
                None => first = Some((h.name.clone(), bytes)),
                Some((name, b)) if *b != bytes => {
                    return Err(ApplyError::Drift {
                        message: format!(
                            "keyrings of hosts {name} and {} differ ({}); copy one to every host first",
                            h.name,
                            path.display()
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let path = targets.hosts[0].keyring.as_deref().unwrap_or(Path::new(""));
        Some(cli.list(path)?)
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
pub fn make_plan(targets: &Targets, op: &Operation, cli: &KeyringCli) -> Result<Plan, ApplyError> {
    let inputs = gather(targets, op, cli)?;
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
    let _lock = RunLock::acquire(&settings.state_path)?;
    let plan = make_plan(targets, op, &settings.keyring_cli)?;
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
    let mut state = State::new(plan, targets.hosts.iter().map(|h| h.name.clone()).collect());
    state.event(format!(
        "planned {} with {} stages",
        op.name(),
        state.plan.stages.len()
    ));
    state.save(&settings.state_path)?;
    say(&format!(
        "state file {} created (it holds the new keys: keep it secret)",
        settings.state_path.display()
    ));
    run(targets, &mut state, settings).await?;
    Ok(state)
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
    let names: Vec<String> = targets.hosts.iter().map(|h| h.name.clone()).collect();
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

/// `<state>.lock`: one run per state file at a time. A lock left by a killed
/// run (its pid is gone) is taken over.
#[derive(Debug)]
struct RunLock {
    path: PathBuf,
}

impl RunLock {
    fn acquire(state_path: &Path) -> Result<Self, ApplyError> {
        let path = PathBuf::from(format!("{}.lock", state_path.display()));
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim();
                    let alive = !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists();
                    if alive {
                        return Err(ApplyError::StateConflict(format!(
                            "another rotator (pid {pid}) is running with {}; wait for it (or remove {} if it is gone)",
                            state_path.display(),
                            path.display()
                        )));
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(source) => return Err(fsio::WriteError { path, source }.into()),
            }
        }
        Err(ApplyError::StateConflict(format!(
            "cannot take the lock {}",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
    for h in &targets.hosts {
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
                    if !report.passed() {
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
    Ok(())
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
            Ok(gate::config_removal(&targets.etcd, &before, &after).await?)
        }
        Gate::KekRetire => {
            if state.kek.old_key_ids.is_empty() {
                return Err(ApplyError::Inconsistent(
                    "the old KEK's key_ids were never recorded".into(),
                ));
            }
            Ok(gate::kek_retire(&targets.etcd, &state.kek.old_key_ids).await?)
        }
    }
}

/// A host's config must be what the previous stage wrote or what this one writes.
fn check_drift(
    targets: &Targets,
    state: &State,
    index: usize,
    new_hash: &str,
) -> Result<(), ApplyError> {
    let before = state
        .plan
        .config_before(index)
        .map(|t| config_file_hash(t.expose().as_bytes()));
    for h in &targets.hosts {
        let found = read_opt(&h.name, &h.encryption_config)?.map(|b| config_file_hash(&b));
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

fn keyring_path(targets: &Targets, i: usize) -> Result<&Path, ApplyError> {
    targets.hosts[i]
        .keyring
        .as_deref()
        .ok_or_else(|| ApplyError::Drift {
            message: format!("host {} has no keyring path", targets.hosts[i].name),
        })
}

/// Copies the first host's keyring file to every other host.
fn distribute_keyring(targets: &Targets, state: &mut State) -> Result<(), ApplyError> {
    let src = keyring_path(targets, 0)?;
    let bytes = zeroize::Zeroizing::new(std::fs::read(src).map_err(|source| ApplyError::Read {
        host: targets.hosts[0].name.clone(),
        path: src.to_owned(),
        source,
    })?);
    for i in 1..targets.hosts.len() {
        let dst = keyring_path(targets, i)?;
        if fsio::replace(dst, &bytes)? == Written::Replaced {
            state.event(format!(
                "copied the keyring to {} ({})",
                targets.hosts[i].name,
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
            check_drift(targets, state, index, hash)?;
            for h in &targets.hosts {
                match fsio::replace(&h.encryption_config, content.expose().as_bytes())? {
                    Written::Replaced => state.event(format!(
                        "wrote {hash} to {} ({})",
                        h.name,
                        h.encryption_config.display()
                    )),
                    Written::Unchanged => state.event(format!("{} already has {hash}", h.name)),
                }
            }
        }
        Action::Keyring { step } => {
            let cli = &settings.keyring_cli;
            let k0 = keyring_path(targets, 0)?.to_owned();
            match step {
                KeyringStep::AddKek => {
                    let info = cli.list(&k0)?;
                    if state.kek.keks_before_add.is_none() {
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
                            .cloned()
                            .ok_or_else(|| ApplyError::Inconsistent("no primary KEK".into()))?;
                        state.kek.keks_before_add = Some(info.keks.iter().map(|k| k.kek).collect());
                        state.kek.old_kek = Some(old.kek);
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
                        state.kek.old_key_ids = ids;
                        state.save(&settings.state_path)?;
                    }
                    let before = state.kek.keks_before_add.clone().unwrap_or_default();
                    // After a kill between `add` and the state write, the added KEK is already there.
                    let added = info
                        .keks
                        .iter()
                        .map(|k| k.kek)
                        .find(|k| !before.contains(k));
                    let new = match added {
                        Some(k) => k,
                        None => {
                            cli.add(&k0)?;
                            let info = cli.list(&k0)?;
                            info.keks
                                .iter()
                                .map(|k| k.kek)
                                .find(|k| !before.contains(k))
                                .ok_or_else(|| {
                                    ApplyError::Inconsistent(format!(
                                        "`keyring add` on {} added no KEK",
                                        k0.display()
                                    ))
                                })?
                        }
                    };
                    state.kek.new_kek = Some(new);
                    state.event(format!(
                        "KEK {new} added (decrypt-only) on {}",
                        targets.hosts[0].name
                    ));
                    state.save(&settings.state_path)?;
                    distribute_keyring(targets, state)?;
                }
                KeyringStep::PromoteNewKek => {
                    let new = state
                        .kek
                        .new_kek
                        .ok_or_else(|| ApplyError::Inconsistent("no new KEK recorded".into()))?;
                    let info = cli.list(&k0)?;
                    if info.primary != new {
                        cli.promote(&k0, new)?;
                    }
                    let info = cli.list(&k0)?;
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
                    distribute_keyring(targets, state)?;
                }
                KeyringStep::RetireOldKek => {
                    let old = state
                        .kek
                        .old_kek
                        .ok_or_else(|| ApplyError::Inconsistent("no old KEK recorded".into()))?;
                    if cli.list(&k0)?.kek(old).is_some() {
                        cli.retire(&k0, old)?;
                    }
                    state.event(format!("KEK {old} retired"));
                    distribute_keyring(targets, state)?;
                }
            }
        }
        Action::Rewrite { resources } => {
            let via = settings.rewrite_via.min(apis.len().saturating_sub(1));
            let api = &apis[via];
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
            let result =
                rewrite::run(api, &found, &mut checkpoint, settings.rewrite, &mut save).await;
            state.rewrite = checkpoint;
            let summary = result?;
            eprint!("{summary}");
            state.event(format!(
                "rewrite done: {} updated, {} gone",
                summary.updated, summary.skipped
            ));
        }
    }
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
    let modes = proof::wait_all(apis, &targets.hosts, &wanted, settings.proof, &mut notify)
        .await
        .map_err(|source| ApplyError::Proof {
            stage: index + 1,
            source,
        })?;
    let how: Vec<String> = modes.iter().map(|(h, m)| format!("{h} ({m})")).collect();
    state.event(format!("proven by {}", how.join(", ")));
    Ok(())
}
