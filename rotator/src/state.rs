//! The state file of a run: the plan (with the generated keys — **the file is
//! secret**, written atomically with mode 0600), the stage reached, the step
//! within it, what the KEK rotation learned, and the rewrite checkpoint.
//!
//! The state machine of one stage, each arrow a state-file write:
//!
//! ```text
//! Pending --(gate passes; start time recorded)--> Applying
//! Applying --(action done on every host)--> Applied
//! Applied --(every apiserver proved it)--> next stage, Pending
//! ```
//!
//! A kill anywhere resumes safely: `Pending` and `Applying` re-run the gate
//! (a gate is never skipped) and redo the action, which is idempotent
//! (identical file content is not rewritten; keyring steps check the keyring
//! first); `Applied` re-waits for the proof; a rewrite continues from its
//! checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "step")]
pub enum Step {
    /// Nothing done yet (or the gate must run again).
    Pending,
    /// The gate passed and the action started at `started` (unix seconds);
    /// some hosts may have the new file.
    Applying {
        /// When the first write began; proof of a reload or restart must come after it.
        started: f64,
    },
    /// The action is done on every host; waiting for proof.
    Applied {
        /// When the action began.
        started: f64,
    },
}

/// What a KEK rotation learned while running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekProgress {
    /// KEK numbers present before `keyring add` (to find the added one after a kill).
    pub keks_before_add: Option<Vec<u32>>,
    /// The KEK this run added.
    pub new_kek: Option<u32>,
    /// Its key_id once promoted.
    pub new_key_id: Option<String>,
    /// The KEK that was primary when the run started.
    pub old_kek: Option<u32>,
    /// Every key_id the old KEK ever had (the gate looks for these).
    pub old_key_ids: Vec<String>,
}

/// Rewrite progress of one resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceProgress {
    /// `continue` token of the next page to process (`None`: from the start).
    pub continue_token: Option<String>,
    /// Every page is done.
    pub done: bool,
    /// Objects updated so far.
    pub updated: u64,
    /// Objects gone before their update (404).
    pub skipped: u64,
}

/// The rewrite checkpoint: per resource (`group/version/resource`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Progress per resource.
    pub resources: BTreeMap<String, ResourceProgress>,
}

/// One line of the run's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix seconds.
    pub at: f64,
    /// Stage index (0-based).
    pub stage: usize,
    /// What happened.
    pub what: String,
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Host names the plan was made for (a resume refuses another host list).
    pub hosts: Vec<String>,
    /// The plan, with its keys.
    pub plan: Plan,
    /// Index of the current stage (`plan.stages.len()` when finished).
    pub stage: usize,
    /// Step within it.
    pub step: Step,
    /// KEK rotation facts.
    #[serde(default)]
    pub kek: KekProgress,
    /// Rewrite checkpoint of the current rewrite stage.
    #[serde(default)]
    pub rewrite: Checkpoint,
    /// History.
    #[serde(default)]
    pub events: Vec<Event>,
    /// Kept backups a removal gate let through because the run was given
    /// `--allow-unrestorable-backups`: each names the file and the keys it
    /// needs, which are now gone (it cannot be restored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unrestorable_backups: Vec<String>,
    /// What `apply --force` overrode when the run started (drift, unchecked
    /// hosts, values the config in force did not write); empty when nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced: Vec<String>,
}

/// The state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading failed.
    #[error("cannot read state file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a state file of this version.
    #[error("state file {path} is not a rotator state file (version {STATE_VERSION}): {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (never contains values: serde_json names positions).
        message: String,
    },
    /// It parses but cannot be a state the rotator wrote (e.g. a stage
    /// index past the end of its plan).
    #[error("state file {path} is inconsistent: {message}; restore it or start over")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What does not fit (never a value from the file other than numbers).
        message: String,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] crate::fsio::WriteError),
    /// JSON encoding failed.
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

impl StateError {
    /// A state file that is there but unusable is a state conflict (exit 5),
    /// like an unfinished run: no command may guess what it meant. I/O
    /// failures are runtime failures (exit 1).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Parse { .. } | Self::Inconsistent { .. })
    }

    /// The documented exit code for this error.
    pub fn exit_code(&self) -> u8 {
        if self.is_conflict() {
            crate::apply::exit::STATE
        } else {
            crate::apply::exit::FAILURE
        }
    }
}

/// Unix seconds now.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl State {
    /// A new run of `plan` at stage 0.
    pub fn new(plan: Plan, hosts: Vec<String>) -> Self {
        State {
            version: STATE_VERSION,
            hosts,
            plan,
            stage: 0,
            step: Step::Pending,
            kek: KekProgress::default(),
            rewrite: Checkpoint::default(),
            events: Vec::new(),
            unrestorable_backups: Vec::new(),
            forced: Vec::new(),
        }
    }

    /// Every stage is done.
    pub fn finished(&self) -> bool {
        self.stage >= self.plan.stages.len()
    }

    /// Adds a history line.
    pub fn event(&mut self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(stage = self.stage + 1, "{what}");
        self.events.push(Event {
            at: now(),
            stage: self.stage,
            what,
        });
    }

    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => zeroize::Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| StateError::Parse {
            path: path.to_owned(),
            message: format!(
                "line {} column {}: {:?}",
                e.line(),
                e.column(),
                e.classify()
            ),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Parse {
                path: path.to_owned(),
                message: format!("version {}", state.version),
            });
        }
        // `stage == stages` is a finished run; past that is no run at all
        // (it would read as finished and `status` would claim every stage done).
        if state.stage > state.plan.stages.len() {
            return Err(StateError::Inconsistent {
                path: path.to_owned(),
                message: format!(
                    "stage index {} is past the end of its {}-stage plan",
                    state.stage,
                    state.plan.stages.len()
                ),
            });
        }
        Ok(Some(state))
    }

    /// Writes `path` atomically, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let bytes = zeroize::Zeroizing::new(
            serde_json::to_vec_pretty(self).map_err(|e| StateError::Encode(e.to_string()))?,
        );
        crate::fsio::write_atomic(path, &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::plan::{Operation, build};
    use storage_encryption::{EncryptionConfiguration, SecretBytes};

    #[test]
    fn round_trips_with_mode_0600() {
        let cfg = EncryptionConfiguration::parse(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - name: key1\n        secret: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n  - identity: {}\n",
        )
        .unwrap();
        let plan = build(&Operation::RotateKey, Some(&cfg), None, &mut || {
            Ok(SecretBytes::new(vec![7; 32]))
        })
        .unwrap();
        let mut state = State::new(plan, vec!["cp1".into()]);
        state.step = Step::Applied { started: 12.5 };
        state.rewrite.resources.insert(
            "/v1/secrets".into(),
            ResourceProgress {
                continue_token: Some("t".into()),
                ..Default::default()
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        state.save(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(State::load(&p).unwrap().unwrap(), state);
        assert!(State::load(&dir.path().join("none")).unwrap().is_none());
        // Debug of the state never shows key material.
        let dbg = format!("{state:?}");
        assert!(
            !dbg.contains("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"),
            "key in Debug"
        );
        std::fs::write(&p, b"{\"version\": 1, \"stage\": \"x\"}").unwrap();
        let e = State::load(&p).unwrap_err();
        assert!(e.is_conflict(), "{e}");
        assert!(e.to_string().contains("state.json"), "{e}");
    }

    #[test]
    fn a_stage_past_the_end_is_refused_not_finished() {
        let cfg = EncryptionConfiguration::parse(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - identity: {}\n",
        )
        .unwrap();
        let plan = build(
            &Operation::Enable {
                provider: crate::plan::NewProvider::Aescbc,
                resources: vec!["secrets".into()],
            },
            Some(&cfg),
            None,
            &mut || Ok(SecretBytes::new(vec![7; 32])),
        )
        .unwrap();
        let n = plan.stages.len();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mut state = State::new(plan, vec!["cp1".into()]);
        state.stage = n;
        state.save(&p).unwrap();
        assert!(State::load(&p).unwrap().unwrap().finished());
        state.stage = n + 1;
        state.save(&p).unwrap();
        let e = State::load(&p).unwrap_err();
        assert!(e.is_conflict(), "{e}");
        assert_eq!(e.exit_code(), crate::apply::exit::STATE);
        assert!(e.to_string().contains("past the end"), "{e}");
    }
}
