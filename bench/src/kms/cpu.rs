//! CPU time of another process, from `/proc/PID/stat` (utime + stime of all
//! its threads, in clock ticks), and, for a plugin whose KEK is in a PKCS#11
//! token, the part of it spent inside the module: the plugin's own counter
//! [`MODULE_CPU`] from its `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt as _;

/// The plugin's count of its threads' CPU time inside the PKCS#11 module's
/// `C_EncryptInit`/`C_Encrypt`/`C_DecryptInit`/`C_Decrypt` calls.
pub const MODULE_CPU: &str = "atrest_kms_pkcs11_module_cpu_seconds_total";

/// How long one `/metrics` read may take (a loopback listener).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("GET http://{addr}/metrics (--plugin-metrics): {reason}")]
    Metrics { addr: SocketAddr, reason: String },
    #[error(
        "http://{addr}/metrics (--plugin-metrics) has no {MODULE_CPU}: the plugin serves no KEK from a PKCS#11 token"
    )]
    NoModuleCpu { addr: SocketAddr },
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

/// The plugin's module CPU counter, read from its metrics listener.
#[derive(Debug, Clone, Copy)]
pub struct ModuleCpu {
    addr: SocketAddr,
}

impl ModuleCpu {
    /// Reads the plugin's `/metrics` at `addr` (its `--metrics-addr`).
    pub fn new(addr: SocketAddr) -> Self {
        ModuleCpu { addr }
    }

    /// Where the counter is read.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The module CPU time the plugin has counted so far.
    pub async fn read(&self) -> Result<Duration, CpuError> {
        let text = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(self.addr))
            .await
            .map_err(|_| CpuError::Metrics {
                addr: self.addr,
                reason: format!("no answer within {SCRAPE_TIMEOUT:?}"),
            })?
            .map_err(|reason| CpuError::Metrics {
                addr: self.addr,
                reason,
            })?;
        module_cpu(&text).ok_or(CpuError::NoModuleCpu { addr: self.addr })
    }
}

/// The [`MODULE_CPU`] samples of a metrics page, summed (`None` when absent).
fn module_cpu(text: &str) -> Option<Duration> {
    let samples = rotator::metrics::parse(text);
    let mut seen = samples.iter().filter(|s| s.name == MODULE_CPU).peekable();
    seen.peek()?;
    Duration::try_from_secs_f64(seen.map(|s| s.value).sum()).ok()
}

/// `GET /metrics` over HTTP/1.1 on one fresh connection.
async fn scrape(addr: SocketAddr) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let request = http::Request::get("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    connection.abort();
    if status != http::StatusCode::OK {
        return Err(format!("HTTP {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| "the page is not UTF-8".into())
}

/// The plugin's and this load generator's CPU clocks, read together: the two
/// share the machine, so the client's cost per call explains the plugin's room.
/// With [`ModuleCpu`], also the plugin's time inside its PKCS#11 module.
#[derive(Debug, Clone)]
pub struct CpuMeters {
    plugin: ProcessCpu,
    loadgen: ProcessCpu,
    module: Option<ModuleCpu>,
}

/// CPU time used by each side (a reading, or the difference of two).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSpent {
    pub plugin: Duration,
    pub loadgen: Duration,
    /// Of `plugin`, the time inside the PKCS#11 module (when metered).
    pub module: Option<Duration>,
}

impl CpuMeters {
    /// Meters for the plugin process `plugin_pid` and for this process, and
    /// for the plugin's module time when `module` is given.
    pub fn new(plugin_pid: u32, module: Option<ModuleCpu>) -> Result<Self, CpuError> {
        Ok(CpuMeters {
            plugin: ProcessCpu::new(plugin_pid)?,
            loadgen: ProcessCpu::new(std::process::id())?,
            module,
        })
    }

    /// Every clock now.
    pub async fn read(&self) -> Result<CpuSpent, CpuError> {
        let module = match &self.module {
            Some(m) => Some(m.read().await?),
            None => None,
        };
        Ok(CpuSpent {
            plugin: self.plugin.read()?,
            loadgen: self.loadgen.read()?,
            module,
        })
    }

    /// Where the module time is read, when it is.
    pub fn module(&self) -> Option<ModuleCpu> {
        self.module
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
            module: match (self.module, earlier.module) {
                (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                _ => None,
            },
        }
    }

    /// The plugin's CPU time outside the module (when the module is metered).
    pub fn ours(&self) -> Option<Duration> {
        self.module.map(|m| self.plugin.saturating_sub(m))
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
            module: Some(ms(4)),
        };
        let after = CpuSpent {
            plugin: ms(25),
            loadgen: ms(40),
            module: Some(ms(10)),
        };
        let spent = after.since(before);
        assert_eq!(
            spent,
            CpuSpent {
                plugin: ms(15),
                loadgen: Duration::ZERO,
                module: Some(ms(6)),
            }
        );
        assert_eq!(spent.ours(), Some(ms(9)));
        // Without a module reading on both sides there is no split.
        let unmetered = CpuSpent {
            module: None,
            ..after
        };
        assert_eq!(unmetered.since(before).module, None);
        assert_eq!(unmetered.since(before).ours(), None);
    }

    #[tokio::test]
    async fn meters_read_this_process() {
        let meters = CpuMeters::new(std::process::id(), None).unwrap();
        assert!(meters.ticks_per_sec() > 0);
        assert_eq!(meters.read().await.unwrap().module, None);
    }

    #[test]
    fn module_cpu_is_the_sum_of_its_samples_and_absent_without_them() {
        let page = "# TYPE atrest_kms_pkcs11_module_cpu_seconds counter\n\
                    atrest_kms_pkcs11_module_cpu_seconds_total 0.25\n\
                    atrest_kms_pkcs11_module_calls_total 10\n";
        assert_eq!(module_cpu(page), Some(Duration::from_millis(250)));
        let two = format!("{page}atrest_kms_pkcs11_module_cpu_seconds_total{{token=\"b\"}} 0.5\n");
        assert_eq!(module_cpu(&two), Some(Duration::from_millis(750)));
        assert_eq!(module_cpu("atrest_kms_healthy 1\n"), None);
        assert_eq!(module_cpu(""), None);
    }

    /// A one-shot HTTP server on loopback answering `answer` to one request.
    async fn answering(answer: &'static str) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                request.extend_from_slice(&buf[..n]);
            }
            assert!(request.starts_with(b"GET /metrics HTTP/1.1\r\n"));
            conn.write_all(answer.as_bytes()).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn module_cpu_is_read_over_http_and_its_absence_is_an_error() {
        let body = "atrest_kms_pkcs11_module_cpu_seconds_total 1.5\n";
        let ok: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let addr = answering(ok).await;
        assert_eq!(
            ModuleCpu::new(addr).read().await.unwrap(),
            Duration::from_millis(1500)
        );

        let addr = answering("HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\natrest_up 1\n\n").await;
        let err = ModuleCpu::new(addr).read().await.unwrap_err().to_string();
        assert!(err.contains(MODULE_CPU) && err.contains("PKCS#11"), "{err}");

        let addr = answering("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        let err = ModuleCpu::new(addr).read().await.unwrap_err().to_string();
        assert!(
            err.contains("HTTP 404") && err.contains(&addr.to_string()),
            "{err}"
        );

        // Nobody listening: named, not a panic.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let err = ModuleCpu::new(addr).read().await.unwrap_err().to_string();
        assert!(err.contains("connecting"), "{err}");
    }

    #[test]
    fn missing_process_is_named() {
        // PIDs are at most 2^22 on Linux, so this one cannot exist.
        let err = ProcessCpu::new(u32::MAX).unwrap_err().to_string();
        assert!(err.contains(&format!("/proc/{}/stat", u32::MAX)), "{err}");
    }
}
