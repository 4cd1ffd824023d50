//! A `kms-plugin serve` child process in its own temporary directory.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atrest_proto::kms::v2::{StatusRequest, StatusResponse};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;

use super::cli::Keyring;
use super::client::{KmsClient, SocketEndpoint, connect};
use super::http::{HttpResponse, Metrics, http_get};
use super::{WAIT, bin_path, eventually};

/// Which kind of socket a plugin listens on when no endpoint is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// `<temp dir>/kms.sock`.
    #[default]
    File,
    /// A fresh abstract name (`unix:///@…`).
    Abstract,
}

/// How to start a plugin. Defaults: file socket in the temp dir, new keyring,
/// no metrics listener, `ATREST_LOG` unset (the plugin's default filter).
#[derive(Clone, Debug, Default)]
pub struct PluginOptions {
    transport: Transport,
    endpoint: Option<SocketEndpoint>,
    keyring: Option<PathBuf>,
    metrics: bool,
    log_filter: Option<String>,
    args: Vec<String>,
    wrapper: Vec<String>,
    reached_at: Option<SocketEndpoint>,
    envs: Vec<(String, String)>,
}

impl PluginOptions {
    /// Defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Listen on a file or an abstract socket chosen by the kit.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Listen exactly here (e.g. a path the test prepared).
    pub fn endpoint(mut self, endpoint: SocketEndpoint) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Serve this existing keyring instead of initialising a new one.
    pub fn keyring(mut self, path: impl Into<PathBuf>) -> Self {
        self.keyring = Some(path.into());
        self
    }

    /// Set an environment variable of the plugin process only (e.g.
    /// `SOFTHSM2_CONF`; tests never change their own environment).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.envs.push((key.to_owned(), value.into()));
        self
    }

    /// Start the metrics listener on a free loopback port.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Set `ATREST_LOG` for the plugin.
    pub fn log(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.to_owned());
        self
    }

    /// Append a raw `serve` argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Start `kms-plugin` through this command (e.g. `unshare …` or
    /// `nsenter …` for a host of its own): `WRAPPER… kms-plugin serve …`.
    /// The wrapper must exec the plugin, so that its pid is the plugin's.
    pub fn wrapped_in(mut self, wrapper: &[String]) -> Self {
        self.wrapper = wrapper.to_vec();
        self
    }

    /// Where the test reaches the socket when it differs from where the
    /// plugin listens (a plugin in another mount namespace).
    pub fn reached_at(mut self, endpoint: SocketEndpoint) -> Self {
        self.reached_at = Some(endpoint);
        self
    }
}

/// A running (or exited) `kms-plugin serve`. Killed on drop.
#[derive(Debug)]
pub struct PluginProcess {
    dir: TempDir,
    child: Child,
    exit: Option<ExitStatus>,
    endpoint: SocketEndpoint,
    /// Where this process dials it (`endpoint` unless another namespace).
    reach: SocketEndpoint,
    keyring: Keyring,
    log_path: PathBuf,
    metrics_addr: Option<SocketAddr>,
    channel: Option<Channel>,
}

impl PluginProcess {
    /// Starts the plugin and waits until it answers Status on its socket.
    pub async fn start(options: PluginOptions) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let mut plugin = Self::spawn(options.clone()).await?;
            match plugin.wait_ready().await {
                Ok(()) => return Ok(plugin),
                // The free port found for metrics can be taken by another test
                // before the plugin binds it: pick another one.
                Err(_)
                    if options.metrics
                        && attempt < 3
                        && plugin.log().contains("cannot listen for metrics") =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the plugin without waiting for it (for tests where it must refuse to start).
    pub async fn spawn(options: PluginOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("atrest-kms-")
            .tempdir()
            .context("creating the plugin's temp dir")?;
        let keyring = match &options.keyring {
            Some(path) => Keyring::at(path),
            None => Keyring::init(dir.path().join("keyring.json")).await?.0,
        };
        let endpoint = match (&options.endpoint, options.transport) {
            (Some(endpoint), _) => endpoint.clone(),
            (None, Transport::File) => SocketEndpoint::File(dir.path().join("kms.sock")),
            (None, Transport::Abstract) => SocketEndpoint::unique_abstract(),
        };
        let metrics_addr = if options.metrics {
            Some(free_loopback_addr()?)
        } else {
            None
        };

        let log_path = dir.path().join("plugin.log");
        let stderr = File::create(&log_path).context("creating the plugin log file")?;
        let stdout = File::create(dir.path().join("plugin.stdout"))
            .context("creating the plugin stdout file")?;

        let mut command = match options.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin_path("kms-plugin"));
                c
            }
            None => Command::new(bin_path("kms-plugin")),
        };
        command
            .arg("serve")
            .arg("--listen")
            .arg(endpoint.listen_arg())
            .arg("--keyring")
            .arg(keyring.path());
        if let Some(addr) = metrics_addr {
            command.arg("--metrics-addr").arg(addr.to_string());
        }
        command.args(&options.args);
        command.envs(options.envs.iter().map(|(k, v)| (k, v)));
        match &options.log_filter {
            Some(filter) => command.env("ATREST_LOG", filter),
            None => command.env_remove("ATREST_LOG"),
        };
        // Plain text in the log file, so substring assertions see what a reader sees.
        command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = command.spawn().context("spawning kms-plugin serve")?;

        Ok(Self {
            dir,
            child,
            exit: None,
            reach: options
                .reached_at
                .clone()
                .unwrap_or_else(|| endpoint.clone()),
            endpoint,
            keyring,
            log_path,
            metrics_addr,
            channel: None,
        })
    }

    /// Waits until the plugin answers a Status call, then keeps that channel.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "kms-plugin exited with {status} before answering Status on {}; its log:\n{}",
                    self.endpoint,
                    self.log()
                );
            }
            let last_error =
                match tokio::time::timeout(Duration::from_secs(3), self.try_status()).await {
                    Ok(Ok((channel, _))) => {
                        self.channel = Some(channel);
                        return Ok(());
                    }
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => "a connect + Status attempt took over 3 s".to_owned(),
                };
            if Instant::now() >= deadline {
                bail!(
                    "kms-plugin did not answer Status on {} within {WAIT:?} (last error: {last_error}); its log:\n{}",
                    self.endpoint,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_status(&self) -> Result<(Channel, StatusResponse)> {
        let channel = connect(&self.reach).await?;
        let status = KmsClient::new(channel.clone())
            .status(StatusRequest {})
            .await
            .context("Status call")?
            .into_inner();
        Ok((channel, status))
    }

    /// The shared channel opened by [`wait_ready`](Self::wait_ready).
    pub fn channel(&self) -> Channel {
        self.channel
            .clone()
            .expect("the plugin was spawned without waiting until it was ready")
    }

    /// A client on the shared channel.
    pub fn client(&self) -> KmsClient {
        KmsClient::new(self.channel())
    }

    /// One Status call on the shared channel.
    pub async fn status(&self) -> Result<StatusResponse> {
        Ok(self
            .client()
            .status(StatusRequest {})
            .await
            .with_context(|| format!("Status on {}", self.endpoint))?
            .into_inner())
    }

    /// Polls Status until its key_id differs from `old`; returns the new one.
    pub async fn wait_for_key_id_change(&self, old: &str) -> Result<String> {
        eventually(
            WAIT,
            &format!("Status to report a key_id other than {old}"),
            || async {
                let status = self.status().await?;
                Ok((status.key_id != old).then_some(status.key_id))
            },
        )
        .await
    }

    /// Where the plugin listens.
    pub fn endpoint(&self) -> &SocketEndpoint {
        &self.endpoint
    }

    /// The keyring the plugin serves.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The plugin's temp dir (keyring, log, socket file live here by default).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file capturing the plugin's stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the plugin logged so far (lossy UTF-8).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log_bytes()).into_owned()
    }

    /// Everything the plugin logged so far, raw.
    pub fn log_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) -> Result<()> {
        eventually(
            WAIT,
            &format!("the plugin log to contain {needle:?}"),
            || async { Ok(self.log().contains(needle).then_some(())) },
        )
        .await
        .with_context(|| format!("plugin log:\n{}", self.log()))
    }

    /// The metrics listener's address (when started with metrics).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("the plugin was started without PluginOptions::metrics()")
    }

    /// GET `path` on the metrics listener, retrying until it accepts connections.
    pub async fn http(&self, path: &str) -> Result<HttpResponse> {
        let addr = self.metrics_addr();
        eventually(WAIT, &format!("GET {path} on {addr}"), || async {
            Ok(Some(http_get(addr, path).await?))
        })
        .await
    }

    /// The current `/metrics`, parsed.
    pub async fn metrics(&self) -> Result<Metrics> {
        let response = self.http("/metrics").await?;
        if response.status != 200 {
            bail!(
                "GET /metrics answered {}: {}",
                response.status,
                response.body
            );
        }
        Metrics::parse(&response.body)
    }

    /// The child's process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit in i32"))
    }

    /// Sends a signal to the plugin.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(self.pid(), signal).with_context(|| format!("sending {signal} to the plugin"))
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// The exit status, if the plugin has exited.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .context("polling the plugin process")?;
        }
        Ok(self.exit)
    }

    /// Waits (bounded by [`WAIT`]) for the plugin to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "kms-plugin did not exit within {WAIT:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    listener.local_addr().context("reading the free port")
}
