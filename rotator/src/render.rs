//! `rotator plan` output: every stage, its gate and proof, and the exact file
//! each host gets, with every `secret:` value replaced by `<redacted>`.

use std::fmt::Write;

use crate::plan::{Action, Gate, KeyringStep, Plan};
use crate::targets::Targets;

/// Replaces the value of every `secret:` line of a rendered config.
pub fn redact_config(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(rest) = trimmed.strip_prefix("secret:")
            && !rest.trim().is_empty()
        {
            let cut = line.len() - rest.len();
            out.push_str(&line[..cut]);
            out.push_str(" <redacted>");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// What proves a stage, in words.
pub fn proof_words(action: &Action) -> String {
    match action {
        Action::WriteConfig { hash, .. } => format!(
            "every apiserver runs config {hash} (config hash metric; else a successful automatic reload; else readiness after a restart)"
        ),
        Action::Keyring { step: KeyringStep::PromoteNewKek } => {
            "every apiserver reports the new key_id's hash (apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds)".into()
        }
        Action::Keyring { .. } => "every host has the same keyring file; the plugins reload it".into(),
        Action::Rewrite { .. } => "every object listed was updated (or is gone)".into(),
    }
}

fn gate_words(gate: &Gate) -> String {
    match gate {
        Gate::ConfigRemoval { removes } => format!(
            "etcd audit: no stored value still needs {} (every value the current config reads must be readable by the new one)",
            removes.join(", ")
        ),
        Gate::KekRetire => {
            "etcd audit: no KMS v2 value still carries a key_id of the old KEK".into()
        }
    }
}

/// The whole plan as `rotator plan` prints it.
pub fn render_plan(plan: &Plan, targets: &Targets) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "operation: {}", plan.operation.name());
    let hosts: Vec<&str> = targets.hosts().iter().map(|h| h.name.as_str()).collect();
    let _ = writeln!(s, "hosts: {}", hosts.join(", "));
    match &plan.original_hash {
        Some(h) => {
            let _ = writeln!(s, "current config: {h}");
        }
        None => {
            let _ = writeln!(s, "current config: none (no file on the hosts yet)");
        }
    }
    if let Some(info) = &plan.keyring
        && let Some(p) = info.primary_kek()
    {
        let _ = writeln!(
            s,
            "keyring: generation {}, primary KEK {} (key_id {})",
            info.generation,
            p.kek,
            p.key_id.as_deref().unwrap_or("?")
        );
    }
    let n = plan.stages.len();
    for (i, stage) in plan.stages.iter().enumerate() {
        let _ = writeln!(s, "\nstage {}/{n}: {}", i + 1, stage.title);
        if let Some(g) = &stage.gate {
            let _ = writeln!(s, "  gate: {}", gate_words(g));
        }
        match &stage.action {
            Action::WriteConfig { content, hash } => {
                let _ = writeln!(s, "  writes: {hash} to");
                for h in targets.hosts() {
                    let _ = writeln!(s, "    {}: {}", h.name, h.encryption_config.display());
                }
                let _ = writeln!(s, "  content:");
                for line in redact_config(content.expose()).lines() {
                    let _ = writeln!(s, "    | {line}");
                }
            }
            Action::Keyring { step } => {
                let (cmd, what) = match step {
                    KeyringStep::AddKek => ("keyring add", "a new decrypt-only KEK"),
                    KeyringStep::PromoteNewKek => {
                        ("keyring promote --kek <new>", "the new KEK becomes primary")
                    }
                    KeyringStep::RetireOldKek => {
                        ("keyring retire --kek <old>", "the old KEK is removed")
                    }
                };
                let first = targets.first().name.as_str();
                let _ = writeln!(
                    s,
                    "  runs: kms-plugin {cmd} on {first} ({what}), then copies the file to:"
                );
                for h in targets.hosts() {
                    let path = h
                        .keyring
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "(no keyring path!)".into());
                    let _ = writeln!(s, "    {}: {path}", h.name);
                }
            }
            Action::Rewrite { resources } => {
                let _ = writeln!(
                    s,
                    "  rewrites: {} (wildcards expanded by discovery)",
                    resources.join(", ")
                );
            }
        }
        let _ = writeln!(s, "  proof: {}", proof_words(&stage.action));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_secret_line() {
        let text = "keys:\n- name: key1\n  secret: c2VjcmV0\n    - secret: YWJj\nname: secret\n";
        let out = redact_config(text);
        assert!(!out.contains("c2VjcmV0") && !out.contains("YWJj"), "{out}");
        assert_eq!(out.matches("<redacted>").count(), 2);
        assert!(out.contains("name: secret"));
    }
}
