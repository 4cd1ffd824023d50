//! CPU time of another process, from `/proc/PID/stat` (utime + stime of all
//! its threads, in clock ticks).

use std::path::PathBuf;
use std::time::Duration;

/// Reads one process's accumulated CPU time.
#[derive(Debug, Clone)]
pub struct ProcessCpu {
    pid: u32,
    stat_path: PathBuf,
    ticks_per_sec: u64,
}

/// The CPU time could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot read {}: {source} (is process {pid} running?)", path.display())]
    Read {
        pid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: unexpected format (no utime/stime fields)", path.display())]
    Format { path: PathBuf },
    #[error("sysconf(_SC_CLK_TCK) failed: {0}")]
    ClockTicks(String),
}

impl ProcessCpu {
    /// Checks that the process exists and learns the clock tick rate.
    pub fn new(pid: u32) -> Result<Self, CpuError> {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .map_err(|e| CpuError::ClockTicks(e.to_string()))?
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| t > 0)
            .ok_or_else(|| CpuError::ClockTicks("no value".into()))?;
        let cpu = ProcessCpu {
            pid,
            stat_path: PathBuf::from(format!("/proc/{pid}/stat")),
            ticks_per_sec: ticks,
        };
        cpu.read()?;
        Ok(cpu)
    }

    /// The process id being measured.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Clock ticks per second: one reading is exact to 1/ticks s.
    pub fn ticks_per_sec(&self) -> u64 {
        self.ticks_per_sec
    }

    /// CPU time (user + system) the process has used so far.
    pub fn read(&self) -> Result<Duration, CpuError> {
        let stat = std::fs::read_to_string(&self.stat_path).map_err(|source| CpuError::Read {
            pid: self.pid,
            path: self.stat_path.clone(),
            source,
        })?;
        let ticks = stat_cpu_ticks(&stat).ok_or_else(|| CpuError::Format {
            path: self.stat_path.clone(),
        })?;
        // Whole seconds plus the remainder, so no tick count can overflow.
        let nanos_per_tick = 1_000_000_000 / self.ticks_per_sec;
        Ok(Duration::from_secs(ticks / self.ticks_per_sec)
            + Duration::from_nanos((ticks % self.ticks_per_sec) * nanos_per_tick))
    }
}

/// The plugin's and this load generator's CPU clocks, read together: the two
/// share the machine, so the client's cost per call explains the plugin's room.
#[derive(Debug, Clone)]
pub struct CpuMeters {
    plugin: ProcessCpu,
    loadgen: ProcessCpu,
}

/// CPU time used by each side (a reading, or the difference of two).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSpent {
    pub plugin: Duration,
    pub loadgen: Duration,
}

impl CpuMeters {
    /// Meters for the plugin process `plugin_pid` and for this process.
    pub fn new(plugin_pid: u32) -> Result<Self, CpuError> {
        Ok(CpuMeters {
            plugin: ProcessCpu::new(plugin_pid)?,
            loadgen: ProcessCpu::new(std::process::id())?,
        })
    }

    /// Both clocks now.
    pub fn read(&self) -> Result<CpuSpent, CpuError> {
        Ok(CpuSpent {
            plugin: self.plugin.read()?,
            loadgen: self.loadgen.read()?,
        })
    }

    /// Clock ticks per second (the same for every process).
    pub fn ticks_per_sec(&self) -> u64 {
        self.plugin.ticks_per_sec()
    }
}

impl CpuSpent {
    /// What was used between `earlier` and `self`.
    pub fn since(self, earlier: CpuSpent) -> CpuSpent {
        CpuSpent {
            plugin: self.plugin.saturating_sub(earlier.plugin),
            loadgen: self.loadgen.saturating_sub(earlier.loadgen),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command
/// name (field 2) is in parentheses and may itself contain spaces or `)`, so
/// fields are counted from the last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    // After the comm: state is field 3, so utime (14) is the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_plus_stime_even_with_odd_command_names() {
        let line = "4242 (kms plugin) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    731 269 0 0 20 0 6 0 123456 1000000 2000 18446744073709551615";
        assert_eq!(stat_cpu_ticks(line), Some(731 + 269));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parens"), None);
    }

    #[test]
    fn own_process_cpu_time_grows() {
        let cpu = ProcessCpu::new(std::process::id()).unwrap();
        assert!(cpu.ticks_per_sec() > 0);
        let before = cpu.read().unwrap();
        // Burn CPU until the kernel's accounting moves (a few ticks); the
        // bound only keeps a broken reader from spinning forever.
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while cpu.read().unwrap() == before && std::time::Instant::now() < give_up {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        assert!(
            cpu.read().unwrap() > before,
            "CPU time did not grow after busy work"
        );
    }

    #[test]
    fn spent_is_a_saturating_difference() {
        let ms = Duration::from_millis;
        let before = CpuSpent {
            plugin: ms(10),
            loadgen: ms(50),
        };
        let after = CpuSpent {
            plugin: ms(25),
            loadgen: ms(40),
        };
        assert_eq!(
            after.since(before),
            CpuSpent {
                plugin: ms(15),
                loadgen: Duration::ZERO
            }
        );
        let meters = CpuMeters::new(std::process::id()).unwrap();
        assert!(meters.ticks_per_sec() > 0);
        meters.read().unwrap();
    }

    #[test]
    fn missing_process_is_named() {
        // PIDs are at most 2^22 on Linux, so this one cannot exist.
        let err = ProcessCpu::new(u32::MAX).unwrap_err().to_string();
        assert!(err.contains(&format!("/proc/{}/stat", u32::MAX)), "{err}");
    }
}
