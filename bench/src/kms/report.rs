//! The results of a run and their Markdown rendering.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use super::cpu::CpuSpent;
use super::load::{CellResult, Outcome, ops_per_sec, per_call_micros};
use super::machine::Machine;
use super::targets::{self, CpuFigure, Verdict};

/// The restart burst's measurements.
#[derive(Debug)]
pub struct BurstResult {
    /// Calls the burst was to make (one per distinct ciphertext).
    pub wanted: u64,
    pub callers: usize,
    pub outcome: Outcome,
    pub cpu: CpuSpent,
}

impl BurstResult {
    /// The verdict for this burst.
    pub fn verdict(&self) -> Verdict {
        targets::judge_burst(self.outcome.wall, self.outcome.calls(), self.wanted)
    }
}

/// Everything a run measured, plus what is needed to read it.
#[derive(Debug)]
pub struct Report {
    pub machine: Machine,
    /// Path of the plugin binary (or of /proc/PID/exe when attached).
    pub plugin_bin: String,
    pub plugin_profile: String,
    /// "started by kms-loadgen" or "attached".
    pub plugin_origin: &'static str,
    pub plugin_pid: u32,
    pub endpoint: String,
    pub loadgen_profile: &'static str,
    pub plaintext_size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub cpu_ticks_per_sec: u64,
    /// The plugin's metrics listener the module CPU was read from: the
    /// table then splits plugin CPU into the module's and ours.
    pub module_metrics: Option<SocketAddr>,
    pub cells: Vec<CellResult>,
    pub burst: Option<BurstResult>,
}

impl Report {
    /// Failed calls over the whole run (warm-ups included).
    pub fn failed_calls(&self) -> u64 {
        self.cells.iter().map(|c| c.outcome.failures).sum::<u64>()
            + self.burst.as_ref().map_or(0, |b| {
                b.outcome.failures + b.wanted.saturating_sub(b.outcome.calls())
            })
    }

    /// One line per row that had failures, naming the row and the first failure.
    pub fn failure_summary(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .cells
            .iter()
            .filter(|c| c.outcome.failures > 0)
            .map(|c| {
                format!(
                    "{} with {} callers: {} failed calls; first: {}",
                    c.method.name(),
                    c.callers,
                    c.outcome.failures,
                    c.outcome.first_failure.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if let Some(b) = &self.burst {
            let unmade = b.wanted.saturating_sub(b.outcome.calls());
            if b.outcome.failures > 0 || unmade > 0 {
                lines.push(format!(
                    "burst: {} failed calls, {unmade} not made in time; first: {}",
                    b.outcome.failures,
                    b.outcome.first_failure.as_deref().unwrap_or("none")
                ));
            }
        }
        lines
    }

    /// CPU µs per call with its reading error: each /proc reading is
    /// truncated to a clock tick, so a delta is off by up to 2 ticks.
    fn fmt_cpu(&self, us: Option<f64>, calls: u64) -> String {
        match (us, per_call_micros(Duration::from_secs(2), calls)) {
            (Some(us), Some(two_ticks)) if self.cpu_ticks_per_sec > 0 => {
                format!("{us:.1} ±{:.1}", two_ticks / self.cpu_ticks_per_sec as f64)
            }
            _ => "n/a".into(),
        }
    }

    /// Module CPU µs per call (the plugin's own count: no tick rounding).
    fn fmt_module(&self, module: Option<Duration>, calls: u64) -> String {
        match module.and_then(|m| per_call_micros(m, calls)) {
            Some(us) => format!("{us:.1}"),
            None => "n/a".into(),
        }
    }

    /// The report as Markdown: header facts, the table, the burst line.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(out, "## kms-plugin load (kms-loadgen)\n");
        let _ = writeln!(
            out,
            "- machine: nproc {}, {}, load average {} at start — load generator and plugin share these CPUs",
            self.machine.nproc, self.machine.cpu_model, self.machine.load_average
        );
        let _ = writeln!(
            out,
            "- plugin: `{}` (build profile **{}**), {}, pid {}, on `{}`",
            self.plugin_bin,
            self.plugin_profile,
            self.plugin_origin,
            self.plugin_pid,
            self.endpoint
        );
        let _ = writeln!(
            out,
            "- load: one gRPC channel (one HTTP/2 connection, as kube-apiserver), {}-byte plaintexts, \
             each cell {} measured after {} warm-up; kms-loadgen build profile {}",
            self.plaintext_size,
            fmt_secs(self.duration),
            fmt_secs(self.warmup),
            self.loadgen_profile
        );
        let _ = writeln!(
            out,
            "- CPU: utime+stime from /proc/{}/stat (plugin) and /proc/self/stat (kms-loadgen) \
             over the measured part ({} ticks/s; ± is the tick rounding)",
            self.plugin_pid, self.cpu_ticks_per_sec
        );
        if let Some(addr) = self.module_metrics {
            let _ = writeln!(
                out,
                "- module CPU: the plugin's `{}` from http://{addr}/metrics, read before and \
                 after each row (its threads' CPU inside the PKCS#11 module's encrypt and decrypt \
                 calls, one call in 16 timed and scaled); **ours** = plugin CPU − module CPU",
                super::cpu::MODULE_CPU
            );
        }
        let _ = writeln!(
            out,
            "- targets: Decrypt p99 < {} at {} callers; plugin CPU {}< {} µs per Decrypt; \
             {}-call restart burst < {}\n",
            fmt_latency(targets::DECRYPT_P99),
            targets::DECRYPT_P99_CALLERS,
            if self.module_metrics.is_some() {
                "beyond the module (ours) "
            } else {
                ""
            },
            targets::DECRYPT_CPU_MICROS,
            self.burst.as_ref().map_or(10_000, |b| b.wanted),
            fmt_secs(targets::BURST_WALL)
        );
        let split = self.module_metrics.is_some();
        let (split_head, split_rule) = if split {
            (" module CPU µs/call | **ours** µs/call |", "---:|---:|")
        } else {
            ("", "")
        };
        let _ = writeln!(
            out,
            "| method | callers | calls | errors | ops/s | p50 | p99 | p999 | plugin CPU µs/call \
             |{split_head} loadgen CPU µs/call | target met |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|{split_rule}---:|---|"
        );
        for c in &self.cells {
            let h = &c.outcome.histogram;
            let p99 = quantile(h, 0.99);
            let calls = c.outcome.calls();
            let ours = c.cpu.ours().and_then(|d| per_call_micros(d, calls));
            let verdict = if split {
                targets::judge_cell(c.method, c.callers, p99, CpuFigure::Ours, ours)
            } else {
                targets::judge_cell(
                    c.method,
                    c.callers,
                    p99,
                    CpuFigure::Plugin,
                    c.cpu_micros_per_call(),
                )
            };
            let split_cells = if split {
                format!(
                    " {} | {} |",
                    self.fmt_module(c.cpu.module, calls),
                    self.fmt_cpu(ours, calls)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |{split_cells} {} | {} |",
                c.method.name(),
                c.callers,
                calls,
                c.outcome.failures,
                c.ops_per_sec(),
                fmt_latency(quantile(h, 0.5)),
                fmt_latency(p99),
                fmt_latency(quantile(h, 0.999)),
                self.fmt_cpu(c.cpu_micros_per_call(), calls),
                self.fmt_cpu(per_call_micros(c.cpu.loadgen, calls), calls),
                verdict
            );
        }
        if let Some(b) = &self.burst {
            let h = &b.outcome.histogram;
            let _ = writeln!(
                out,
                "\nburst (apiserver restart): {} Decrypt calls of distinct ciphertexts from {} callers \
                 on a fresh connection: wall {:.3} s ({:.0} ops/s), p50 {}, p99 {}, max {}, \
                 plugin CPU {} µs/call{}, loadgen CPU {} µs/call, errors {} — target met: {}",
                b.outcome.calls(),
                b.callers,
                b.outcome.wall.as_secs_f64(),
                ops_per_sec(b.outcome.calls(), b.outcome.wall),
                fmt_latency(quantile(h, 0.5)),
                fmt_latency(quantile(h, 0.99)),
                fmt_latency(Duration::from_nanos(h.max())),
                self.fmt_cpu(
                    per_call_micros(b.cpu.plugin, b.outcome.calls()),
                    b.outcome.calls()
                ),
                match b.cpu.module {
                    Some(module) => format!(
                        " (module {} µs/call, **ours** {} µs/call)",
                        self.fmt_module(Some(module), b.outcome.calls()),
                        self.fmt_cpu(
                            b.cpu
                                .ours()
                                .and_then(|d| per_call_micros(d, b.outcome.calls())),
                            b.outcome.calls()
                        )
                    ),
                    None => String::new(),
                },
                self.fmt_cpu(
                    per_call_micros(b.cpu.loadgen, b.outcome.calls()),
                    b.outcome.calls()
                ),
                b.outcome.failures,
                b.verdict()
            );
        }
        out
    }
}

fn quantile(h: &hdrhistogram::Histogram<u64>, q: f64) -> Duration {
    Duration::from_nanos(h.value_at_quantile(q))
}

/// `87 µs`, `8.7 µs`, `1.23 ms`, `2.50 s`.
pub fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.1} µs")
    } else if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::load::Method;

    fn outcome(latencies_us: &[u64], failures: u64, wall: Duration) -> Outcome {
        let mut histogram =
            hdrhistogram::Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
        for us in latencies_us {
            histogram.record(us * 1_000).unwrap();
        }
        Outcome {
            histogram,
            failures,
            first_failure: (failures > 0).then(|| "boom".into()),
            wall,
        }
    }

    fn report(cells: Vec<CellResult>, burst: Option<BurstResult>) -> Report {
        Report {
            machine: Machine {
                nproc: 2,
                cpu_model: "Test CPU".into(),
                load_average: "0.10 0.20 0.30".into(),
            },
            plugin_bin: "/t/target/release/kms-plugin".into(),
            plugin_profile: "release".into(),
            plugin_origin: "started by kms-loadgen",
            plugin_pid: 42,
            endpoint: "unix:///tmp/x/kms.sock".into(),
            loadgen_profile: "release",
            plaintext_size: 32,
            duration: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            cpu_ticks_per_sec: 100,
            module_metrics: None,
            cells,
            burst,
        }
    }

    #[test]
    fn latencies_format_by_magnitude() {
        assert_eq!(fmt_latency(Duration::from_nanos(8_700)), "8.7 µs");
        assert_eq!(fmt_latency(Duration::from_micros(87)), "87 µs");
        assert_eq!(fmt_latency(Duration::from_micros(1_234)), "1.23 ms");
        assert_eq!(fmt_latency(Duration::from_millis(2_500)), "2.50 s");
    }

    #[test]
    fn markdown_has_rows_verdicts_and_the_burst_line() {
        let cells = vec![
            CellResult {
                method: Method::Decrypt,
                callers: 64,
                outcome: outcome(&[100; 1000], 0, Duration::from_secs(1)),
                cpu: CpuSpent {
                    plugin: Duration::from_millis(10),
                    loadgen: Duration::from_millis(30),
                    module: None,
                },
            },
            CellResult {
                method: Method::Status,
                callers: 1,
                outcome: outcome(&[50, 60], 0, Duration::from_secs(1)),
                cpu: CpuSpent::default(),
            },
        ];
        let burst = BurstResult {
            wanted: 3,
            callers: 2,
            outcome: outcome(&[10, 20, 30], 0, Duration::from_millis(5)),
            cpu: CpuSpent {
                plugin: Duration::from_micros(30),
                loadgen: Duration::from_micros(60),
                module: None,
            },
        };
        let r = report(cells, Some(burst));
        let md = r.to_markdown();
        assert!(!md.contains("module CPU"), "{md}");
        assert!(md.contains("nproc 2, Test CPU"), "{md}");
        assert!(md.contains("build profile **release**"), "{md}");
        assert!(
            md.contains("| Decrypt | 64 | 1000 | 0 | 1000 | 100 µs | 100 µs | 100 µs | 10.0 ±20.0 | 30.0 ±20.0 | yes (p99 < 2.00 ms, CPU < 20 µs) |"),
            "{md}"
        );
        assert!(md.contains("| Status | 1 | 2 | 0 | 2 |"), "{md}");
        assert!(md.contains("| — |"), "{md}");
        assert!(
            md.contains("burst (apiserver restart): 3 Decrypt calls"),
            "{md}"
        );
        assert!(
            md.contains("plugin CPU 10.0 ±6666.7 µs/call, loadgen CPU 20.0 ±6666.7 µs/call, errors 0 — target met: yes (< 1 s)"),
            "{md}"
        );
        assert_eq!(r.failed_calls(), 0);
        assert!(r.failure_summary().is_empty());
    }

    #[test]
    fn with_module_cpu_rows_split_plugin_cpu_and_judge_ours() {
        let ms = Duration::from_millis;
        let cells = vec![CellResult {
            method: Method::Decrypt,
            callers: 16,
            outcome: outcome(&[100; 1000], 0, Duration::from_secs(1)),
            cpu: CpuSpent {
                plugin: ms(45),
                loadgen: ms(30),
                module: Some(ms(30)),
            },
        }];
        let burst = BurstResult {
            wanted: 1000,
            callers: 100,
            outcome: outcome(&[10; 1000], 0, ms(400)),
            cpu: CpuSpent {
                plugin: ms(50),
                loadgen: ms(20),
                module: Some(ms(28)),
            },
        };
        let mut r = report(cells, Some(burst));
        r.module_metrics = Some("127.0.0.1:9464".parse().unwrap());
        let md = r.to_markdown();
        assert!(md.contains("http://127.0.0.1:9464/metrics"), "{md}");
        assert!(
            md.contains("plugin CPU beyond the module (ours) < 20 µs"),
            "{md}"
        );
        assert!(
            md.contains("| plugin CPU µs/call | module CPU µs/call | **ours** µs/call | loadgen CPU µs/call | target met |"),
            "{md}"
        );
        assert!(
            md.contains("| 45.0 ±20.0 | 30.0 | 15.0 ±20.0 | 30.0 ±20.0 | yes (ours < 20 µs) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "plugin CPU 50.0 ±20.0 µs/call (module 28.0 µs/call, **ours** 22.0 ±20.0 µs/call)"
            ),
            "{md}"
        );
    }

    #[test]
    fn failures_and_unmade_burst_calls_count() {
        let cells = vec![CellResult {
            method: Method::Encrypt,
            callers: 16,
            outcome: outcome(&[100, 100], 2, Duration::from_secs(1)),
            cpu: CpuSpent::default(),
        }];
        let burst = BurstResult {
            wanted: 10,
            callers: 2,
            outcome: outcome(&[10; 4], 0, Duration::from_secs(30)),
            cpu: CpuSpent::default(),
        };
        let r = report(cells, Some(burst));
        assert_eq!(r.failed_calls(), 2 + 6);
        let summary = r.failure_summary();
        assert_eq!(summary.len(), 2, "{summary:?}");
        assert!(summary[0].starts_with("Encrypt with 16 callers: 2 failed calls; first: boom"));
        assert!(summary[1].contains("6 not made in time"));
        assert!(
            r.to_markdown()
                .contains("target met: no: only 4 of 10 calls made")
        );
    }
}
