//! The rotator's own config file: which control-plane hosts to change, where
//! their files are, how to reach their apiservers, and how to reach etcd for
//! the final audit. Strict YAML (unknown fields are errors); every error names
//! the field.
//!
//! ```yaml
//! hosts:
//!   - name: cp1
//!     encryptionConfig: /etc/kubernetes/enc/config.yaml
//!     keyring: /etc/kubernetes/kms/keyring      # only for rotate-kek
//!     apiserver:
//!       url: https://10.0.0.1:6443              # with tokenFile / token, or
//!       tokenFile: /etc/rotator/token
//!       # kubeconfig: /root/.kube/config        # instead of url
//!       # context: admin@cp1
//!     proof: auto          # auto | config-hash | reload | restart
//!   - name: cp2            # a remote host: its paths are paths on that machine
//!     encryptionConfig: /etc/kubernetes/enc/config.yaml
//!     ssh: {host: 10.0.0.2, port: 22, user: root, identityFile: /root/.ssh/id_ed25519,
//!           knownHostsFile: /root/.ssh/known_hosts, kmsPlugin: /usr/local/bin/kms-plugin}
//!     apiserver: { url: https://10.0.0.2:6443, tokenFile: /etc/rotator/token }
//! etcd:
//!   endpoints: [https://10.0.0.1:2379]
//!   cacert: /etc/kubernetes/pki/etcd/ca.crt
//!   cert: /etc/kubernetes/pki/apiserver-etcd-client.crt
//!   key: /etc/kubernetes/pki/apiserver-etcd-client.key
//!   prefix: /registry
//! kmsPlugin: /usr/local/bin/kms-plugin          # default: beside rotator, else PATH
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret::SecretText;

/// How the rotator proves an apiserver runs a new config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProofMode {
    /// Pick the best the apiserver offers (config hash metric, then reload
    /// metrics, then a restart).
    #[default]
    Auto,
    /// `apiserver_encryption_config_controller_last_config_info{hash}` (1.34+).
    ConfigHash,
    /// A successful automatic reload after the write (1.28+ metrics).
    Reload,
    /// The operator restarts the apiserver; proof is readiness after it.
    Restart,
}

impl ProofMode {
    /// The name used in the config file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::ConfigHash => "config-hash",
            Self::Reload => "reload",
            Self::Restart => "restart",
        }
    }
}

/// How to reach one apiserver.
#[derive(Clone, PartialEq, Eq)]
pub enum ApiserverAccess {
    /// A URL (http or https) with an optional bearer token.
    Url {
        /// Base URL, e.g. `https://10.0.0.1:6443`.
        url: String,
        /// Bearer token (from `token` or `tokenFile`).
        token: Option<SecretText>,
        /// PEM CA bundle to trust for https.
        ca_file: Option<PathBuf>,
    },
    /// A kubeconfig file and optional context.
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Context name (default: the file's current context).
        context: Option<String>,
    },
}

impl fmt::Debug for ApiserverAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url {
                url,
                token,
                ca_file,
            } => f
                .debug_struct("Url")
                .field("url", url)
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("ca_file", ca_file)
                .finish(),
            Self::Kubeconfig { path, context } => f
                .debug_struct("Kubeconfig")
                .field("path", path)
                .field("context", context)
                .finish(),
        }
    }
}

/// One control-plane host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Name used in messages and the state file.
    pub name: String,
    /// The file kube-apiserver reads with `--encryption-provider-config`.
    pub encryption_config: PathBuf,
    /// The kms-plugin keyring file (needed for `rotate-kek`).
    pub keyring: Option<PathBuf>,
    /// How to reach this host's apiserver.
    pub apiserver: ApiserverAccess,
    /// How to prove this apiserver runs a new config.
    pub proof: ProofMode,
    /// Set when the host's files are on another machine, reached over SSH
    /// ([`crate::hostfs`]); its `encryption_config` and `keyring` are paths
    /// on that machine.
    pub ssh: Option<SshTarget>,
}

/// The `ssh:` block of a host: how `ssh` reaches it. Only `host` is
/// required; the rest defaults to what the operator's ssh config says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SshTarget {
    /// Address or name (also a `Host` alias of `~/.ssh/config`).
    pub host: String,
    /// Port (default: ssh's, 22).
    #[serde(default)]
    pub port: Option<u16>,
    /// Login user (default: ssh's).
    #[serde(default)]
    pub user: Option<String>,
    /// Private key file on this machine (default: ssh's keys and agent).
    #[serde(default)]
    pub identity_file: Option<PathBuf>,
    /// known_hosts file on this machine (default: ssh's). Host keys are
    /// always checked strictly: an unknown or changed key is refused.
    #[serde(default)]
    pub known_hosts_file: Option<PathBuf>,
    /// The kms-plugin binary on that host (default: `kms-plugin` from its `PATH`).
    #[serde(default)]
    pub kms_plugin: Option<PathBuf>,
}

/// How to reach etcd for the final audit (read-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    /// Endpoints, like etcdctl's.
    pub endpoints: Vec<String>,
    /// CA bundle.
    pub cacert: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client key.
    pub key: Option<PathBuf>,
    /// kube-apiserver's `--etcd-prefix`.
    pub prefix: String,
}

/// The validated rotator config. It always lists at least one host
/// ([`Targets::first`] needs no check), each file named by one host only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Control-plane hosts, in the order stages visit them; never empty.
    hosts: Vec<Host>,
    /// etcd, for the audit gate.
    pub etcd: EtcdTarget,
    /// The kms-plugin binary, when the config names one.
    pub kms_plugin: Option<PathBuf>,
    /// Where `rotate-kek` puts the new KEK: `None` in the keyring file, or
    /// in a PKCS#11 token (the `kek.pkcs11` block).
    pub kek_pkcs11: Option<KekPkcs11>,
    /// `backups:` kept etcd snapshot files, or directories of them (local
    /// paths): the removal gate refuses while one still needs what a stage
    /// removes ([`crate::gate`]).
    pub backups: Vec<PathBuf>,
}

/// The `kek: {pkcs11: …}` block: the new KEK of `rotate-kek` is generated in
/// this token by `kms-plugin keyring add --pkcs11-…` (on the first host,
/// where the token is reachable). Holds paths and labels, never the PIN.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KekPkcs11 {
    /// The PKCS#11 module (client library) on the first host.
    pub module: PathBuf,
    /// The token label.
    pub token: String,
    /// The token serial, when several tokens share the label.
    #[serde(default)]
    pub serial: Option<String>,
    /// The new key object's label (default: the plugin's).
    #[serde(default)]
    pub key_label: Option<String>,
    /// A file holding the user PIN (else the plugin reads ATREST_PKCS11_PIN).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
}

impl KekPkcs11 {
    /// The `keyring add` flags that put the new KEK in the token.
    pub fn add_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--pkcs11-module".to_owned(),
            self.module.display().to_string(),
            "--pkcs11-token".to_owned(),
            self.token.clone(),
            "--generate".to_owned(),
        ];
        if let Some(s) = &self.serial {
            flags.extend(["--pkcs11-serial".to_owned(), s.clone()]);
        }
        if let Some(l) = &self.key_label {
            flags.extend(["--pkcs11-key-label".to_owned(), l.clone()]);
        }
        if let Some(p) = &self.pin_file {
            flags.extend(["--pkcs11-pin-file".to_owned(), p.display().to_string()]);
        }
        flags
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKek {
    #[serde(default)]
    pkcs11: Option<KekPkcs11>,
}

/// A rotator config that cannot be used. Names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    /// The file could not be read.
    #[error("cannot read rotator config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not have the expected shape (unknown field, wrong type).
    #[error("rotator config {path}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field has a bad value.
    #[error("rotator config {path}: {field}: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field path, e.g. `hosts[1].apiserver.url`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTargets {
    hosts: Vec<RawHost>,
    etcd: RawEtcd,
    kms_plugin: Option<PathBuf>,
    #[serde(default)]
    kek: Option<RawKek>,
    /// Kept etcd backups the removal gate also reads.
    #[serde(default)]
    backups: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHost {
    name: String,
    encryption_config: PathBuf,
    keyring: Option<PathBuf>,
    apiserver: RawApiserver,
    #[serde(default)]
    proof: ProofMode,
    #[serde(default)]
    ssh: Option<SshTarget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawApiserver {
    url: Option<String>,
    token: Option<SecretText>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawEtcd {
    endpoints: Vec<String>,
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    prefix: Option<String>,
}

impl Targets {
    /// Every host, in the order stages visit them (at least one).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The first host: its keyring is the one the rotator edits, its
    /// apiserver rewrites unless told otherwise.
    pub fn first(&self) -> &Host {
        // `parse` refuses an empty host list and nothing else builds a `Targets`.
        &self.hosts[0]
    }

    /// Every host but the first.
    pub fn others(&self) -> &[Host] {
        &self.hosts[1..]
    }

    /// The host names, in order.
    pub fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// Reads and validates the rotator config at `path`. Relative paths inside
    /// it are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, TargetsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TargetsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parses config text; `path` is only used in messages, `base` resolves relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, TargetsError> {
        let options = serde_saphyr::options! { with_snippet: false };
        let raw: RawTargets =
            serde_saphyr::from_str_with_options(text, options).map_err(|e| TargetsError::Yaml {
                path: path.to_owned(),
                // The file holds tokens: positions only, never what was written.
                message: storage_encryption::redact_parser_message(
                    &e.without_snippet().to_string(),
                ),
            })?;
        let field = |field: String, message: &str| TargetsError::Field {
            path: path.to_owned(),
            field,
            message: message.to_owned(),
        };
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        if raw.hosts.is_empty() {
            return Err(field(
                "hosts".into(),
                "list at least one control-plane host",
            ));
        }
        let mut names = BTreeSet::new();
        let mut hosts = Vec::new();
        for (i, h) in raw.hosts.into_iter().enumerate() {
            let at = |f: &str| format!("hosts[{i}].{f}");
            if h.name.is_empty() || h.name.contains(char::is_whitespace) {
                return Err(field(at("name"), "must be a non-empty name without spaces"));
            }
            if !names.insert(h.name.clone()) {
                return Err(field(at("name"), "is used twice"));
            }
            let a = h.apiserver;
            let apiserver = match (a.url, a.kubeconfig) {
                (Some(_), Some(_)) => {
                    return Err(field(
                        at("apiserver"),
                        "give either url or kubeconfig, not both",
                    ));
                }
                (None, None) => {
                    return Err(field(
                        at("apiserver"),
                        "give url (with token or tokenFile) or kubeconfig",
                    ));
                }
                (Some(url), None) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(field(
                            at("apiserver.url"),
                            "must start with http:// or https://",
                        ));
                    }
                    if url.parse::<http::Uri>().is_err() {
                        return Err(field(at("apiserver.url"), "is not a valid URL"));
                    }
                    if a.context.is_some() {
                        return Err(field(at("apiserver.context"), "only goes with kubeconfig"));
                    }
                    let token = match (a.token, a.token_file) {
                        (Some(_), Some(_)) => {
                            return Err(field(
                                at("apiserver.token"),
                                "give token or tokenFile, not both",
                            ));
                        }
                        (Some(t), None) => Some(t),
                        (None, Some(f)) => {
                            let f = abs(f);
                            let text = std::fs::read_to_string(&f).map_err(|e| {
                                field(
                                    at("apiserver.tokenFile"),
                                    &format!("cannot read {}: {e}", f.display()),
                                )
                            })?;
                            Some(SecretText::new(text.trim().to_owned()))
                        }
                        (None, None) => None,
                    };
                    ApiserverAccess::Url {
                        url: url.trim_end_matches('/').to_owned(),
                        token,
                        ca_file: a.ca_file.map(abs),
                    }
                }
                (None, Some(kc)) => {
                    if a.token.is_some() || a.token_file.is_some() || a.ca_file.is_some() {
                        return Err(field(
                            at("apiserver"),
                            "token, tokenFile and caFile only go with url (a kubeconfig carries its own)",
                        ));
                    }
                    ApiserverAccess::Kubeconfig {
                        path: abs(kc),
                        context: a.context,
                    }
                }
            };
            let (encryption_config, keyring, ssh) = match h.ssh {
                None => (abs(h.encryption_config), h.keyring.map(abs), None),
                Some(mut s) => {
                    // Each of these becomes one ssh argument: no option lookalikes.
                    let bad = |t: &str| {
                        t.is_empty()
                            || t.starts_with('-')
                            || t.contains(|c: char| c.is_whitespace() || c.is_control())
                    };
                    if bad(&s.host) {
                        return Err(field(
                            at("ssh.host"),
                            "must be a host name or address (no spaces, not starting with -)",
                        ));
                    }
                    if s.user.as_deref().is_some_and(|u| bad(u) || u.contains('@')) {
                        return Err(field(
                            at("ssh.user"),
                            "must be a user name (no spaces or @, not starting with -)",
                        ));
                    }
                    if s.port == Some(0) {
                        return Err(field(at("ssh.port"), "must be 1-65535"));
                    }
                    if !h.encryption_config.is_absolute() {
                        return Err(field(
                            at("encryptionConfig"),
                            "must be an absolute path on the remote host (the host has ssh:)",
                        ));
                    }
                    if h.keyring.as_ref().is_some_and(|k| !k.is_absolute()) {
                        return Err(field(
                            at("keyring"),
                            "must be an absolute path on the remote host (the host has ssh:)",
                        ));
                    }
                    s.identity_file = s.identity_file.map(abs);
                    s.known_hosts_file = s.known_hosts_file.map(abs);
                    (h.encryption_config, h.keyring, Some(s))
                }
            };
            hosts.push(Host {
                name: h.name,
                encryption_config,
                keyring,
                apiserver,
                proof: h.proof,
                ssh,
            });
        }
        // Two hosts must not share a file, however its path is spelled
        // (a symlink, `..`, `.`).
        let configs = shared_file(&hosts, |h| Some(&h.encryption_config));
        let keyrings = shared_file(&hosts, |h| h.keyring.as_ref());
        for (name, found) in [("encryptionConfig", configs), ("keyring", keyrings)] {
            if let Some((first, i)) = found {
                return Err(field(
                    format!("hosts[{i}].{name}"),
                    &format!(
                        "is the same file as hosts[{first}].{name} (after resolving symlinks and ..); every host needs its own"
                    ),
                ));
            }
        }
        let e = raw.etcd;
        if e.endpoints.is_empty() {
            return Err(field("etcd.endpoints".into(), "list at least one endpoint"));
        }
        if e.cert.is_some() != e.key.is_some() {
            return Err(field("etcd.cert".into(), "cert and key go together"));
        }
        let prefix = e
            .prefix
            .unwrap_or_else(|| "/registry".into())
            .trim_end_matches('/')
            .to_owned();
        if !prefix.starts_with('/') {
            return Err(field("etcd.prefix".into(), "must start with /"));
        }
        let kek_pkcs11 = raw.kek.and_then(|k| k.pkcs11);
        if hosts[0].ssh.is_some()
            && let Some(p) = &kek_pkcs11
        {
            // They are paths on the first host, where `keyring add` runs.
            for (name, path) in [
                ("module", Some(&p.module)),
                ("pinFile", p.pin_file.as_ref()),
            ] {
                if path.is_some_and(|p| !p.is_absolute()) {
                    return Err(field(
                        format!("kek.pkcs11.{name}"),
                        "must be an absolute path on the first host (it has ssh:)",
                    ));
                }
            }
        }
        let first_is_local = hosts[0].ssh.is_none();
        Ok(Targets {
            hosts,
            etcd: EtcdTarget {
                endpoints: e.endpoints,
                cacert: e.cacert.map(abs),
                cert: e.cert.map(abs),
                key: e.key.map(abs),
                prefix,
            },
            kms_plugin: raw.kms_plugin.map(abs),
            backups: raw.backups.into_iter().map(abs).collect(),
            kek_pkcs11: kek_pkcs11.map(|mut p| {
                if first_is_local {
                    p.module = abs(p.module);
                    p.pin_file = p.pin_file.map(abs);
                }
                p
            }),
        })
    }
}

/// The first pair of hosts (earlier, later) whose `path_of` is the same
/// file: the same local file, or the same path on the same remote machine
/// (compared after removing `.` and `..`; a remote is not asked).
fn shared_file(
    hosts: &[Host],
    path_of: impl Fn(&Host) -> Option<&PathBuf>,
) -> Option<(usize, usize)> {
    // (remote machine, path) → the first host naming it.
    type Machine = Option<(String, Option<u16>)>;
    let mut seen: BTreeMap<(Machine, PathBuf), usize> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let Some(p) = path_of(h) else { continue };
        let key = match &h.ssh {
            None => (None, resolve(p)),
            Some(s) => (Some((s.host.clone(), s.port)), lexical(p)),
        };
        if let Some(first) = seen.insert(key, i) {
            return Some((first, i));
        }
    }
    None
}

/// `path` with its folder resolved (symlinks, `.`, `..`) and, when the file
/// is a symlink, the file it points to: what the kernel opens. A folder that
/// does not exist (yet) is normalised lexically.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name())
        && let Ok(dir) = std::fs::canonicalize(dir)
    {
        return dir.join(name);
    }
    lexical(path)
}

/// `path` without `.` and `..` components.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Targets, String> {
        Targets::parse(text, Path::new("r.yaml"), Path::new("/base")).map_err(|e| e.to_string())
    }

    const GOOD: &str = "
hosts:
  - name: cp1
    encryptionConfig: /etc/enc.yaml
    keyring: kr
    apiserver: { url: 'http://127.0.0.1:6443/', token: sekrit-token-value }
    proof: config-hash
  - name: cp2
    encryptionConfig: enc2.yaml
    apiserver: { kubeconfig: kc, context: admin }
etcd:
  endpoints: [http://127.0.0.1:2379]
";

    #[test]
    fn parses_a_good_config() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.hosts.len(), 2);
        assert_eq!(t.hosts[0].keyring.as_deref(), Some(Path::new("/base/kr")));
        assert_eq!(t.hosts[1].encryption_config, Path::new("/base/enc2.yaml"));
        assert_eq!(t.hosts[0].proof, ProofMode::ConfigHash);
        assert_eq!(t.hosts[1].proof, ProofMode::Auto);
        assert_eq!(t.etcd.prefix, "/registry");
        match &t.hosts[0].apiserver {
            ApiserverAccess::Url { url, token, .. } => {
                assert_eq!(url, "http://127.0.0.1:6443");
                assert_eq!(token.as_ref().unwrap().expose(), "sekrit-token-value");
            }
            other => panic!("{other:?}"),
        }
        // The token never shows in Debug output.
        assert!(!format!("{t:?}").contains("sekrit"));
    }

    #[test]
    fn backups_are_optional_and_resolved_against_the_config_dir() {
        assert!(parse(GOOD).unwrap().backups.is_empty());
        let t = parse(&format!(
            "{GOOD}\nbackups: [snaps/a.db, /var/backups/etcd]\n"
        ))
        .unwrap();
        assert_eq!(
            t.backups,
            [
                Path::new("/base/snaps/a.db"),
                Path::new("/var/backups/etcd")
            ]
        );
    }

    #[test]
    fn a_kek_pkcs11_block_becomes_keyring_add_flags() {
        assert_eq!(parse(GOOD).unwrap().kek_pkcs11, None);
        let t = parse(&format!(
            "{GOOD}kek:\n  pkcs11:\n    module: lib/softhsm2.so\n    token: atrest\n    pinFile: pin\n"
        ))
        .unwrap();
        let flags = t.kek_pkcs11.unwrap().add_flags();
        assert_eq!(
            flags,
            [
                "--pkcs11-module",
                "/base/lib/softhsm2.so",
                "--pkcs11-token",
                "atrest",
                "--generate",
                "--pkcs11-pin-file",
                "/base/pin"
            ]
        );
        let e = parse(&format!(
            "{GOOD}kek:\n  pkcs11:\n    module: m\n    token: t\n    pin: '1234'\n"
        ))
        .unwrap_err();
        assert!(e.contains("pin"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(&GOOD.replace("proof: config-hash", "proof: maybe")).unwrap_err();
        assert!(
            e.contains("expected one of auto") && !e.contains("maybe"),
            "{e}"
        );
        let e = parse(&GOOD.replace("keyring: kr", "keyrng: kr")).unwrap_err();
        assert!(e.contains("unknown field") && e.contains("line "), "{e}");
        let e = parse(&GOOD.replace("name: cp2", "name: cp1")).unwrap_err();
        assert!(e.contains("hosts[1].name"), "{e}");
        let e = parse(&GOOD.replace("'http://127.0.0.1:6443/'", "ftp://x")).unwrap_err();
        assert!(e.contains("hosts[0].apiserver.url"), "{e}");
        let e = parse(&GOOD.replace(
            "{ kubeconfig: kc, context: admin }",
            "{ kubeconfig: kc, token: t }",
        ))
        .unwrap_err();
        assert!(e.contains("hosts[1].apiserver"), "{e}");
        let e = parse(&GOOD.replace("[http://127.0.0.1:2379]", "[]")).unwrap_err();
        assert!(e.contains("etcd.endpoints"), "{e}");
        let e = parse("hosts: []\netcd: {endpoints: [x]}\n").unwrap_err();
        assert!(e.contains("hosts"), "{e}");
    }

    #[test]
    fn two_hosts_cannot_share_a_file_through_a_symlink_or_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("enc.yaml"), "x").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(real.join("enc.yaml"), real.join("alias.yaml")).unwrap();
        let two = |a: &str, b: &str| {
            let text = format!(
                "hosts:\n  - name: cp1\n    encryptionConfig: {a}\n    keyring: k1\n    apiserver: {{ url: 'http://127.0.0.1:1' }}\n  - name: cp2\n    encryptionConfig: {b}\n    keyring: k2\n    apiserver: {{ url: 'http://127.0.0.1:2' }}\netcd: {{ endpoints: [http://127.0.0.1:2379] }}\n"
            );
            Targets::parse(&text, Path::new("r.yaml"), dir.path()).map_err(|e| e.to_string())
        };
        for same in [
            "link/enc.yaml",
            "real/../real/enc.yaml",
            "./real/enc.yaml",
            "real/alias.yaml",
        ] {
            let e = two("real/enc.yaml", same).unwrap_err();
            assert!(
                e.contains("hosts[1].encryptionConfig") && e.contains("hosts[0].encryptionConfig"),
                "{same}: {e}"
            );
        }
        // A folder that does not exist yet is compared after removing `..`.
        let e = two("new/enc.yaml", "new/sub/../enc.yaml").unwrap_err();
        assert!(e.contains("hosts[1].encryptionConfig"), "{e}");
        // Different files are fine, and the paths are kept as written.
        let t = two("real/enc.yaml", "link/other.yaml").unwrap();
        assert_eq!(
            t.hosts()[1].encryption_config,
            dir.path().join("link/other.yaml")
        );
        // Keyrings too.
        let e = parse(&GOOD.replace(
            "apiserver: { kubeconfig",
            "keyring: ./kr\n    apiserver: { kubeconfig",
        ))
        .unwrap_err();
        assert!(e.contains("hosts[1].keyring"), "{e}");
    }

    #[test]
    fn errors_never_echo_a_token_or_what_was_written() {
        for text in [
            // `token:TOK` without a space is a field named after the token.
            GOOD.replace("token: sekrit-token-value", "token:sekrit-token-value"),
            GOOD.replace("token: sekrit-token-value", "sekrit-token-value: 1"),
            GOOD.replace("token: sekrit-token-value", "token: [sekrit-token-value]"),
            GOOD.replace("proof: config-hash", "proof: sekrit-token-value"),
            GOOD.replace("name: cp2", "name: \"sekrit-token-value\"")
                .replace("name: cp1", "name: \"sekrit-token-value\""),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(!e.contains("sekrit"), "{e}");
            assert!(e.contains("line ") || e.contains("hosts["), "{e}");
        }
    }

    #[test]
    fn an_ssh_block_makes_a_host_remote() {
        let remote = GOOD.replace(
            "encryptionConfig: enc2.yaml",
            "encryptionConfig: /etc/kubernetes/enc/enc.yaml\n    keyring: /etc/kubernetes/kms/kr\n    ssh: {host: 10.0.0.2, port: 2222, user: root, identityFile: id, knownHostsFile: kh, kmsPlugin: /usr/local/bin/kms-plugin}",
        );
        let t = parse(&remote).unwrap();
        assert_eq!(t.hosts[0].ssh, None);
        let s = t.hosts[1].ssh.as_ref().unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.user.as_deref()),
            ("10.0.0.2", Some(2222), Some("root"))
        );
        // Local files resolve against the config's folder; remote paths stay as written.
        assert_eq!(s.identity_file.as_deref(), Some(Path::new("/base/id")));
        assert_eq!(s.known_hosts_file.as_deref(), Some(Path::new("/base/kh")));
        assert_eq!(
            s.kms_plugin.as_deref(),
            Some(Path::new("/usr/local/bin/kms-plugin"))
        );
        assert_eq!(
            t.hosts[1].encryption_config,
            Path::new("/etc/kubernetes/enc/enc.yaml")
        );
        // Two machines may use the same path; one machine may not use it twice.
        let two = format!(
            "hosts:\n{}{}etcd: {{ endpoints: [http://127.0.0.1:2379] }}\n",
            "  - name: a\n    encryptionConfig: /etc/e.yaml\n    ssh: {host: h1}\n    apiserver: { url: 'http://127.0.0.1:1' }\n",
            "  - name: b\n    encryptionConfig: /etc/e.yaml\n    ssh: {host: h2}\n    apiserver: { url: 'http://127.0.0.1:2' }\n",
        );
        assert!(parse(&two).is_ok());
        let e = parse(&two.replace("h2", "h1")).unwrap_err();
        assert!(e.contains("hosts[1].encryptionConfig"), "{e}");
        for (from, to, field) in [
            (
                "host: 10.0.0.2",
                "host: -oProxyCommand=x",
                "hosts[1].ssh.host",
            ),
            ("user: root", "user: 'a b'", "hosts[1].ssh.user"),
            ("port: 2222", "port: 0", "hosts[1].ssh.port"),
            (
                "encryptionConfig: /etc/kubernetes/enc/enc.yaml",
                "encryptionConfig: enc.yaml",
                "hosts[1].encryptionConfig",
            ),
            (
                "keyring: /etc/kubernetes/kms/kr",
                "keyring: kr2",
                "hosts[1].keyring",
            ),
        ] {
            let e = parse(&remote.replace(from, to)).unwrap_err();
            assert!(e.contains(field), "{to}: {e}");
        }
        // A remote first host's PKCS#11 paths are paths there.
        let first_remote = remote
            .replace("name: cp1\n", "name: cp0\n")
            .replace("name: cp2\n", "name: cp1\n");
        let first_remote = {
            // cp1 (remote) first.
            let (head, rest) = first_remote.split_once("  - name: cp0").unwrap();
            let (cp0, tail) = rest.split_once("  - name: cp1").unwrap();
            let (cp1, etcd) = tail.split_once("etcd:").unwrap();
            format!("{head}  - name: cp1{cp1}  - name: cp0{cp0}etcd:{etcd}")
        };
        let t = parse(&format!(
            "{first_remote}kek:\n  pkcs11:\n    module: /usr/lib/softhsm/libsofthsm2.so\n    token: t\n"
        ))
        .unwrap();
        assert!(t.first().ssh.is_some());
        assert_eq!(
            t.kek_pkcs11.unwrap().module,
            Path::new("/usr/lib/softhsm/libsofthsm2.so")
        );
        let e = parse(&format!(
            "{first_remote}kek:\n  pkcs11:\n    module: lib.so\n    token: t\n"
        ))
        .unwrap_err();
        assert!(e.contains("kek.pkcs11.module"), "{e}");
        let e = parse(&remote.replace("port: 2222", "password: hunter2")).unwrap_err();
        assert!(e.contains("unknown field") && !e.contains("hunter2"), "{e}");
        let e = parse(&remote.replace("port: 2222", "port: 99999")).unwrap_err();
        assert!(e.contains("line "), "{e}");
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "abc\n").unwrap();
        let text = GOOD.replace("token: sekrit-token-value", "tokenFile: tok");
        let t = Targets::parse(&text, Path::new("r.yaml"), dir.path()).unwrap();
        match &t.hosts[0].apiserver {
            ApiserverAccess::Url { token, .. } => {
                assert_eq!(token.as_ref().unwrap().expose(), "abc")
            }
            other => panic!("{other:?}"),
        }
        let missing = GOOD.replace("token: sekrit-token-value", "tokenFile: nope");
        let e = Targets::parse(&missing, Path::new("r.yaml"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("hosts[0].apiserver.tokenFile"), "{e}");
    }
}
