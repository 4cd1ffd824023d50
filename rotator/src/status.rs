//! `rotator status`: where a run stands, from its state file (no secrets shown).

use std::fmt::Write;

use serde::Serialize;

use crate::plan::Action;
use crate::state::{State, Step};

/// A secret-free summary of a state file, for `--output json`.
#[derive(Debug, Serialize)]
pub struct StatusView<'a> {
    /// Operation name.
    pub operation: &'static str,
    /// Hosts.
    pub hosts: &'a [String],
    /// Current stage, 1-based (stages + 1 when finished).
    pub stage: usize,
    /// Number of stages.
    pub stages: usize,
    /// Stage titles.
    pub titles: Vec<&'a str>,
    /// `pending`, `applying`, `applied` or `finished`.
    pub step: &'static str,
    /// The run is complete.
    pub finished: bool,
    /// Rewrite progress: resource → (updated, gone, done).
    pub rewrite: Vec<(&'a str, u64, u64, bool)>,
    /// KEK numbers (rotate-kek).
    pub old_kek: Option<u32>,
    /// New KEK number.
    pub new_kek: Option<u32>,
    /// New key_id.
    pub new_key_id: Option<&'a str>,
    /// Kept backups let through by `--allow-unrestorable-backups`.
    pub unrestorable_backups: &'a [String],
    /// What `apply --force` overrode when the run started.
    pub forced: &'a [String],
}

fn step_name(state: &State) -> &'static str {
    if state.finished() {
        return "finished";
    }
    match state.step {
        Step::Pending => "pending",
        Step::Applying { .. } => "applying",
        Step::Applied { .. } => "applied",
    }
}

/// The JSON view.
pub fn view(state: &State) -> StatusView<'_> {
    StatusView {
        operation: state.plan.operation.name(),
        hosts: &state.hosts,
        stage: state.stage + 1,
        stages: state.plan.stages.len(),
        titles: state.plan.stages.iter().map(|s| s.title.as_str()).collect(),
        step: step_name(state),
        finished: state.finished(),
        rewrite: state
            .rewrite
            .resources
            .iter()
            .map(|(k, p)| (k.as_str(), p.updated, p.skipped, p.done))
            .collect(),
        old_kek: state.kek.old_kek,
        new_kek: state.kek.new_kek,
        new_key_id: state.kek.new_key_id.as_deref(),
        unrestorable_backups: &state.unrestorable_backups,
        forced: &state.forced,
    }
}

/// The text view.
pub fn render(state: &State) -> String {
    let mut s = String::new();
    let n = state.plan.stages.len();
    let _ = writeln!(
        s,
        "operation: {} on {}",
        state.plan.operation.name(),
        state.hosts.join(", ")
    );
    if state.finished() {
        let _ = writeln!(s, "finished: all {n} stages applied and proven");
    } else {
        let what = match state.step {
            Step::Pending => "not started (its gate, if any, runs first)",
            Step::Applying { .. } => "applying (interrupted? `rotator resume` redoes it safely)",
            Step::Applied { .. } => "applied, waiting for proof from every apiserver",
        };
        let _ = writeln!(s, "stage {}/{n}: {what}", state.stage + 1);
    }
    for (i, stage) in state.plan.stages.iter().enumerate() {
        let mark = if i < state.stage {
            "done"
        } else if i == state.stage {
            "now "
        } else {
            "    "
        };
        let extra = match &stage.action {
            Action::WriteConfig { hash, .. } => format!(" [{hash}]"),
            _ => String::new(),
        };
        let _ = writeln!(s, "  [{mark}] {}. {}{extra}", i + 1, stage.title);
    }
    if let Some(k) = state.kek.new_kek {
        let _ = writeln!(
            s,
            "KEK: old {} -> new {k} (key_id {})",
            state
                .kek
                .old_kek
                .map(|o| o.to_string())
                .unwrap_or_else(|| "?".into()),
            state
                .kek
                .new_key_id
                .as_deref()
                .unwrap_or("not promoted yet")
        );
    }
    if !state.unrestorable_backups.is_empty() {
        let _ = writeln!(
            s,
            "allowed to become unrestorable (--allow-unrestorable-backups):"
        );
        for b in &state.unrestorable_backups {
            let _ = writeln!(s, "  {b}");
        }
    }
    if !state.rewrite.resources.is_empty() {
        let _ = writeln!(s, "rewrite checkpoint:");
        for (k, p) in &state.rewrite.resources {
            let _ = writeln!(
                s,
                "  {k}: {} updated, {} gone, {}",
                p.updated,
                p.skipped,
                if p.done {
                    "done"
                } else if p.continue_token.is_some() {
                    "continues from a saved page"
                } else {
                    "from the start"
                }
            );
        }
    }
    if !state.forced.is_empty() {
        let _ = writeln!(s, "started with --force over:");
        for f in &state.forced {
            let _ = writeln!(s, "  {}", cli_kit::escape::escape_control(f));
        }
    }
    if let Some(e) = state.events.last() {
        let _ = writeln!(s, "last event: {}", e.what);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Operation, build};
    use crate::state::ResourceProgress;
    use storage_encryption::{EncryptionConfiguration, SecretBytes};

    #[test]
    fn shows_progress_without_secrets() {
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let cfg = EncryptionConfiguration::parse(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - name: key1\n        secret: {key}\n"
        ))
        .unwrap();
        let plan = build(&Operation::RotateKey, Some(&cfg), None, &mut || {
            Ok(SecretBytes::new(vec![9; 32]))
        })
        .unwrap();
        let mut state = State::new(plan, vec!["cp1".into(), "cp2".into()]);
        state.stage = 2;
        state.step = Step::Applying { started: 1.0 };
        state.rewrite.resources.insert(
            "/v1/secrets".into(),
            ResourceProgress {
                continue_token: Some("tok".into()),
                done: false,
                updated: 500,
                skipped: 2,
            },
        );
        let text = render(&state);
        assert!(text.contains("stage 3/4: applying"), "{text}");
        assert!(
            text.contains("[done] 1.") && text.contains("[now ] 3."),
            "{text}"
        );
        assert!(
            text.contains("/v1/secrets: 500 updated, 2 gone, continues from a saved page"),
            "{text}"
        );
        let json = serde_json::to_string(&view(&state)).unwrap();
        for shown in [&text, &json] {
            assert!(
                !shown.contains(key) && !shown.contains("CQkJCQkJ"),
                "secret shown: {shown}"
            );
        }
        assert!(json.contains("\"step\":\"applying\""), "{json}");
        state.stage = 4;
        assert!(render(&state).contains("finished: all 4 stages"));
    }
}
