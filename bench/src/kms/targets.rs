//! The performance targets (2-core machine, client and plugin
//! together) and the verdicts printed in the table's last column. Informative
//! only: missing a target never changes the exit code.

use std::fmt;
use std::time::Duration;

use super::load::Method;
use super::report::fmt_latency;

/// Decrypt p99 must stay under this at [`DECRYPT_P99_CALLERS`] callers.
pub const DECRYPT_P99: Duration = Duration::from_millis(2);
/// The concurrency the p99 target is stated for.
pub const DECRYPT_P99_CALLERS: usize = 64;
/// Plugin CPU time per Decrypt, any concurrency.
pub const DECRYPT_CPU_MICROS: f64 = 20.0;
/// The restart burst (10,000 Decrypts from 100 callers) must finish within this.
pub const BURST_WALL: Duration = Duration::from_secs(1);

/// Whether a row met its targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The issue sets no target for this row.
    NoTarget,
    /// Met; the text lists the targets checked.
    Met(String),
    /// Missed; the text says which and by how much.
    Missed(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NoTarget => f.write_str("—"),
            Verdict::Met(what) => write!(f, "yes ({what})"),
            Verdict::Missed(what) => write!(f, "no: {what}"),
        }
    }
}

/// Which CPU figure the per-Decrypt target is judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuFigure {
    /// The plugin's whole CPU per call (a local KEK).
    Plugin,
    /// The plugin's CPU beyond what its PKCS#11 module spends (a token KEK:
    /// "our own overhead").
    Ours,
}

impl fmt::Display for CpuFigure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuFigure::Plugin => "CPU",
            CpuFigure::Ours => "ours",
        })
    }
}

/// Judges one (method, callers) row; `cpu_micros` is the `figure` per call.
pub fn judge_cell(
    method: Method,
    callers: usize,
    p99: Duration,
    figure: CpuFigure,
    cpu_micros: Option<f64>,
) -> Verdict {
    if method != Method::Decrypt {
        return Verdict::NoTarget;
    }
    let mut met = Vec::new();
    let mut missed = Vec::new();
    if callers == DECRYPT_P99_CALLERS {
        let want = fmt_latency(DECRYPT_P99);
        if p99 < DECRYPT_P99 {
            met.push(format!("p99 < {want}"));
        } else {
            missed.push(format!("p99 {} ≥ {want}", fmt_latency(p99)));
        }
    }
    match cpu_micros {
        Some(us) if us < DECRYPT_CPU_MICROS => {
            met.push(format!("{figure} < {DECRYPT_CPU_MICROS} µs"));
        }
        Some(us) => missed.push(format!("{figure} {us:.1} µs ≥ {DECRYPT_CPU_MICROS} µs")),
        None => missed.push("no calls completed".into()),
    }
    if missed.is_empty() {
        Verdict::Met(met.join(", "))
    } else {
        Verdict::Missed(missed.join(", "))
    }
}

/// Judges the restart burst: every call made and done within [`BURST_WALL`].
pub fn judge_burst(wall: Duration, made: u64, wanted: u64) -> Verdict {
    let want = format!("{:.0} s", BURST_WALL.as_secs_f64());
    if made < wanted {
        Verdict::Missed(format!("only {made} of {wanted} calls made"))
    } else if wall < BURST_WALL {
        Verdict::Met(format!("< {want}"))
    } else {
        Verdict::Missed(format!("{:.2} s ≥ {want}", wall.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn decrypt_at_64_checks_p99_and_cpu() {
        assert_eq!(
            judge_cell(Method::Decrypt, 64, MS, CpuFigure::Plugin, Some(10.0)).to_string(),
            "yes (p99 < 2.00 ms, CPU < 20 µs)"
        );
        let v = judge_cell(Method::Decrypt, 64, 3 * MS, CpuFigure::Plugin, Some(25.0));
        assert_eq!(
            v.to_string(),
            "no: p99 3.00 ms ≥ 2.00 ms, CPU 25.0 µs ≥ 20 µs"
        );
        assert!(matches!(
            judge_cell(Method::Decrypt, 64, 3 * MS, CpuFigure::Plugin, Some(1.0)),
            Verdict::Missed(_)
        ));
    }

    #[test]
    fn with_a_token_kek_the_cpu_target_is_ours_beyond_the_module() {
        assert_eq!(
            judge_cell(Method::Decrypt, 16, MS, CpuFigure::Ours, Some(12.5)).to_string(),
            "yes (ours < 20 µs)"
        );
        assert_eq!(
            judge_cell(Method::Decrypt, 16, MS, CpuFigure::Ours, Some(21.0)).to_string(),
            "no: ours 21.0 µs ≥ 20 µs"
        );
    }

    #[test]
    fn other_concurrencies_check_cpu_only_and_other_methods_nothing() {
        assert!(matches!(
            judge_cell(Method::Decrypt, 1, 50 * MS, CpuFigure::Plugin, Some(5.0)),
            Verdict::Met(_)
        ));
        assert!(matches!(
            judge_cell(Method::Decrypt, 16, MS, CpuFigure::Plugin, Some(20.0)),
            Verdict::Missed(_)
        ));
        assert!(matches!(
            judge_cell(Method::Decrypt, 16, MS, CpuFigure::Plugin, None),
            Verdict::Missed(_)
        ));
        assert_eq!(
            judge_cell(Method::Encrypt, 64, 50 * MS, CpuFigure::Plugin, Some(500.0)),
            Verdict::NoTarget
        );
        assert_eq!(
            judge_cell(Method::Status, 64, 50 * MS, CpuFigure::Plugin, None).to_string(),
            "—"
        );
    }

    #[test]
    fn burst_needs_all_calls_within_a_second() {
        assert!(matches!(
            judge_burst(900 * MS, 10_000, 10_000),
            Verdict::Met(_)
        ));
        assert_eq!(
            judge_burst(1500 * MS, 10_000, 10_000).to_string(),
            "no: 1.50 s ≥ 1 s"
        );
        assert!(matches!(
            judge_burst(100 * MS, 9_000, 10_000),
            Verdict::Missed(_)
        ));
    }
}
