//! A tiny Prometheus text-format parser and the pure checks that turn an
//! apiserver's `/metrics` into "runs this stage" or "still shows X".

use std::collections::BTreeMap;

use crate::targets::ProofMode;

/// `apiserver_encryption_config_controller_last_config_info{hash}` (1.34+).
pub const CONFIG_INFO: &str = "apiserver_encryption_config_controller_last_config_info";
/// Last automatic reload time per `status` (1.28+).
pub const RELOAD_TIMESTAMP: &str =
    "apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds";
/// Automatic reloads per `status` (1.30+).
pub const RELOADS_TOTAL: &str = "apiserver_encryption_config_controller_automatic_reloads_total";
/// When the apiserver last saw each KMS key_id hash.
pub const KEY_ID_STATUS: &str =
    "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds";
/// Standard process metric: start time (unix seconds).
pub const PROCESS_START: &str = "process_start_time_seconds";

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total` etc. as written).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// A label's value, `""` when absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key, value);
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses the text format; comment and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) if line[..open].find(char::is_whitespace).is_none() => {
                // The closing brace is the last one: label values may hold '}'.
                let Some(close) = line.rfind('}').filter(|c| *c > open) else {
                    continue;
                };
                let Some(labels) = parse_labels(&line[open + 1..close]) else {
                    continue;
                };
                (&line[..open], labels, &line[close + 1..])
            }
            _ => match line.split_once(char::is_whitespace) {
                Some((n, rest)) => (n, BTreeMap::new(), rest),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next().and_then(parse_value) else {
            continue;
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

/// What one apiserver's metrics say about a wanted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// It runs what we wait for.
    Proven,
    /// Not yet; what it shows instead.
    Waiting(String),
}

/// The best proof mode this apiserver's metrics allow.
pub fn detect_mode(samples: &[Sample]) -> ProofMode {
    if samples.iter().any(|s| s.name == CONFIG_INFO) {
        ProofMode::ConfigHash
    } else if samples
        .iter()
        .any(|s| s.name == RELOAD_TIMESTAMP || s.name == RELOADS_TOTAL)
    {
        ProofMode::Reload
    } else {
        ProofMode::Restart
    }
}

/// Does the apiserver export automatic-reload metrics (reload is on)?
pub fn has_reload_metrics(samples: &[Sample]) -> bool {
    samples
        .iter()
        .any(|s| s.name == RELOAD_TIMESTAMP || s.name == RELOADS_TOTAL)
}

/// Does `last_config_info` show `hash`?
pub fn config_hash(samples: &[Sample], hash: &str) -> Observation {
    let shown: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == CONFIG_INFO && s.value > 0.0)
        .map(|s| s.label("hash"))
        .collect();
    if shown.contains(&hash) {
        Observation::Proven
    } else if shown.is_empty() {
        Observation::Waiting(format!("no {CONFIG_INFO} sample"))
    } else {
        Observation::Waiting(format!("runs config {}", shown.join(", ")))
    }
}

/// Did an automatic reload succeed at or after `since` (unix seconds)?
pub fn reload_after(samples: &[Sample], since: f64) -> Observation {
    let last = |status: &str| {
        samples
            .iter()
            .filter(|s| s.name == RELOAD_TIMESTAMP && s.label("status") == status)
            .map(|s| s.value)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    match (last("success"), last("failure")) {
        (Some(ok), _) if ok >= since => Observation::Proven,
        (_, Some(bad)) if bad >= since => Observation::Waiting(format!(
            "its last automatic reload FAILED (at unix time {bad:.0}); see its log (a KMS plugin health check?)"
        )),
        (Some(ok), _) => Observation::Waiting(format!(
            "last successful reload at unix time {ok:.0}, before the write"
        )),
        (None, _) => Observation::Waiting("no successful automatic reload yet".into()),
    }
}

/// Has this apiserver seen KMS `key_id` hash `want` (`sha256:<hex>`)?
pub fn key_id_seen(samples: &[Sample], want: &str) -> Observation {
    let shown: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == KEY_ID_STATUS)
        .map(|s| s.label("key_id_hash"))
        .collect();
    if shown.contains(&want) {
        Observation::Proven
    } else if shown.is_empty() {
        Observation::Waiting(format!("no {KEY_ID_STATUS} sample"))
    } else {
        Observation::Waiting(format!("key_id hashes {}", shown.join(", ")))
    }
}

/// `process_start_time_seconds`, when exported.
pub fn process_start(samples: &[Sample]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == PROCESS_START)
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apiserver_encryption_config_controller_last_config_info [ALPHA] info
# TYPE apiserver_encryption_config_controller_last_config_info gauge
apiserver_encryption_config_controller_last_config_info{apiserver_id_hash="sha256:aa",hash="sha256:1234"} 1
apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds{apiserver_id_hash="sha256:aa",status="success"} 1.7e+09
apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds{apiserver_id_hash="sha256:aa",status="failure"} 1.6e+09
apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash="sha256:aa",key_id_hash="sha256:k1",provider_name="p"} 1.7e+09
odd{x="a \"quoted\" } brace"} 2 1700000000
process_start_time_seconds 1.69e+09
garbage line without value{
"#;

    #[test]
    fn parses_samples() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].label("hash"), "sha256:1234");
        assert_eq!(s[4].label("x"), "a \"quoted\" } brace");
        assert_eq!(s[4].value, 2.0);
        assert_eq!(process_start(&s), Some(1.69e9));
    }

    #[test]
    fn checks() {
        let s = parse(TEXT);
        assert_eq!(detect_mode(&s), ProofMode::ConfigHash);
        assert_eq!(config_hash(&s, "sha256:1234"), Observation::Proven);
        assert_eq!(
            config_hash(&s, "sha256:99"),
            Observation::Waiting("runs config sha256:1234".into())
        );
        assert_eq!(reload_after(&s, 1.65e9), Observation::Proven);
        assert!(
            matches!(reload_after(&s, 1.8e9), Observation::Waiting(w) if w.contains("before the write"))
        );
        assert_eq!(key_id_seen(&s, "sha256:k1"), Observation::Proven);
        assert!(
            matches!(key_id_seen(&s, "sha256:k2"), Observation::Waiting(w) if w.contains("sha256:k1"))
        );
        let reload_only: Vec<Sample> = s
            .iter()
            .filter(|x| x.name == RELOAD_TIMESTAMP)
            .cloned()
            .collect();
        assert_eq!(detect_mode(&reload_only), ProofMode::Reload);
        assert!(has_reload_metrics(&s));
        let hash_only: Vec<Sample> = s
            .iter()
            .filter(|x| x.name == CONFIG_INFO)
            .cloned()
            .collect();
        assert!(!has_reload_metrics(&hash_only));
        assert_eq!(detect_mode(&[]), ProofMode::Restart);
        let failed = parse(&format!(
            "{RELOAD_TIMESTAMP}{{status=\"failure\"}} 200\n{RELOAD_TIMESTAMP}{{status=\"success\"}} 50\n"
        ));
        assert!(
            matches!(reload_after(&failed, 100.0), Observation::Waiting(w) if w.contains("FAILED"))
        );
    }

    proptest::proptest! {
        /// `/metrics` comes from the network: any text parses without a panic.
        #[test]
        fn any_text_parses(text in "\\PC*") {
            let _ = parse(&text);
        }

        /// Label values survive escaping.
        #[test]
        fn label_values_round_trip(v in "[ -~]{0,40}") {
            let escaped = v.replace('\\', "\\\\").replace('"', "\\\"");
            let samples = parse(&format!("m{{a=\"{escaped}\",b=\"x\"}} 3\n"));
            proptest::prop_assert_eq!(samples.len(), 1);
            proptest::prop_assert_eq!(samples[0].label("a"), v.as_str());
            proptest::prop_assert_eq!(samples[0].label("b"), "x");
        }
    }
}
