//! The files under `deploy/` agree with each other: the plugin's socket is the
//! one the EncryptionConfiguration names and the one kube-apiserver can reach
//! through its mounts, probes dial that same socket, the keyring is mounted
//! read-only, the encryption config file is mounted into the apiserver, and the
//! provider name matches what the rollout notes say is stored in etcd.
//!
//! `check` returns every disagreement; the mutation test proves it notices each
//! kind of drift.
#![allow(clippy::unwrap_used)]

use std::path::{Component, Path, PathBuf};

use serde_json::{Value, json};

const PLUGIN_CONTAINER: &str = "kms-plugin";
const APISERVER_CONTAINER: &str = "kube-apiserver";
const PROVIDER_NAME: &str = "atrest";

/// The deploy files, parsed.
#[derive(Debug, Clone)]
struct Manifests {
    static_pod: Value,
    encryption_config: Value,
    apiserver_patch: Value,
    readme: String,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    serde_saphyr::from_str(&read(rel))
        .unwrap_or_else(|e| panic!("deploy/{rel} is not valid YAML: {e}"))
}

fn load() -> Manifests {
    Manifests {
        static_pod: yaml("kms-plugin/static-pod.yaml"),
        encryption_config: yaml("encryption-config/kms-v2.yaml"),
        apiserver_patch: yaml("kube-apiserver/kube-apiserver.patch.yaml"),
        readme: read("README.md"),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in an argv.
fn flag(argv: &[String], name: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            argv.get(i + 1).cloned()
        } else {
            arg.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }
    })
}

fn container<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod.pointer("/spec/containers")?
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// `unix:///a/b.sock` → `/a/b.sock` (abstract sockets do not cross mounts: refused).
fn socket_path(endpoint: &str) -> Result<String, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| format!("endpoint {endpoint:?} is not unix://"))?;
    if !path.starts_with('/') || path.starts_with("/@") {
        return Err(format!(
            "endpoint {endpoint:?} is not an absolute socket file path"
        ));
    }
    Ok(path.to_owned())
}

/// Where `path` (as the container sees it) lives on the host: the volumeMount
/// with the longest mountPath containing it, mapped through its hostPath volume.
/// Returns the host path and the mount.
fn host_path<'a>(
    pod: &'a Value,
    ctr: &'a Value,
    path: &str,
) -> Result<(PathBuf, &'a Value), String> {
    let path = Path::new(path);
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{} contains '..'", path.display()));
    }
    let mounts = ctr["volumeMounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mount = mounts
        .iter()
        .filter(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|mp| path.starts_with(mp))
        })
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        .ok_or_else(|| {
            format!(
                "{} is under no volumeMount of container {}",
                path.display(),
                ctr["name"]
            )
        })?;
    let mount_path = mount["mountPath"].as_str().unwrap_or_default();
    let volume_name = &mount["name"];
    let volume = pod["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| &v["name"] == volume_name))
        .ok_or_else(|| format!("volumeMount {volume_name} of {} has no volume", ctr["name"]))?;
    let host_dir = volume["hostPath"]["path"]
        .as_str()
        .ok_or_else(|| format!("volume {volume_name} is not a hostPath volume"))?;
    let rest = path.strip_prefix(mount_path).map_err(|e| e.to_string())?;
    Ok((Path::new(host_dir).join(rest), mount))
}

fn volume_of<'a>(pod: &'a Value, mount: &Value) -> &'a Value {
    pod["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
        .unwrap_or(&Value::Null)
}

/// Every disagreement between the deploy files (empty when they agree).
fn check(m: &Manifests) -> Vec<String> {
    let mut errors = Vec::new();
    let mut fail = |msg: String| errors.push(msg);

    // --- the plugin's static pod
    let pod = &m.static_pod;
    if pod["spec"]["priorityClassName"] != "system-node-critical" {
        fail(format!(
            "static pod priorityClassName is {}, want system-node-critical",
            pod["spec"]["priorityClassName"]
        ));
    }
    if pod["spec"]["hostNetwork"] != true {
        fail("static pod: hostNetwork must be true (metrics listen on the host's loopback)".into());
    }
    let Some(plugin) = container(pod, PLUGIN_CONTAINER) else {
        fail(format!("static pod has no container {PLUGIN_CONTAINER}"));
        return errors;
    };
    let want_image = format!("atrest/kms-plugin:{}", env!("CARGO_PKG_VERSION"));
    if plugin["image"] != want_image.as_str() {
        fail(format!(
            "static pod image is {}, want {want_image}",
            plugin["image"]
        ));
    }
    let argv = strings(plugin.get("command"));
    if argv.get(..2) != Some(&["kms-plugin".to_owned(), "serve".to_owned()][..]) {
        fail(format!(
            "static pod command {argv:?} does not start with `kms-plugin serve`"
        ));
    }
    let listen = flag(&argv, "--listen").unwrap_or_default();
    let plugin_socket_host = match socket_path(&listen).and_then(|p| host_path(pod, plugin, &p)) {
        Ok((host, mount)) => {
            if volume_of(pod, mount)["hostPath"]["type"] != "DirectoryOrCreate" {
                fail(
                    "static pod: the socket's hostPath volume must be type DirectoryOrCreate"
                        .into(),
                );
            }
            Some(host)
        }
        Err(e) => {
            fail(format!("static pod --listen: {e}"));
            None
        }
    };
    for probe in ["livenessProbe", "readinessProbe"] {
        let probe_argv = strings(plugin[probe]["exec"].get("command"));
        if probe_argv.get(..2) != Some(&["kms-plugin".to_owned(), "probe".to_owned()][..]) {
            fail(format!(
                "static pod {probe} is not an exec of `kms-plugin probe`: {probe_argv:?}"
            ));
        }
        let probe_listen = flag(&probe_argv, "--listen");
        if probe_listen.as_deref() != Some(listen.as_str()) {
            fail(format!(
                "static pod {probe} --listen {probe_listen:?} differs from serve --listen {listen:?}"
            ));
        }
    }
    match flag(&argv, "--keyring") {
        Some(keyring) => match host_path(pod, plugin, &keyring) {
            Ok((_, mount)) if mount["readOnly"] == true => {}
            Ok((_, mount)) => fail(format!(
                "static pod: keyring mount {} is not readOnly",
                mount["mountPath"]
            )),
            Err(e) => fail(format!("static pod --keyring: {e}")),
        },
        None => fail("static pod command has no --keyring".into()),
    }
    let metrics = flag(&argv, "--metrics-addr").unwrap_or_default();
    if !metrics.starts_with("127.0.0.1:") {
        fail(format!(
            "static pod --metrics-addr {metrics:?} must be on 127.0.0.1 (hostNetwork)"
        ));
    }
    let sc = &plugin["securityContext"];
    if sc["readOnlyRootFilesystem"] != true || sc["allowPrivilegeEscalation"] != false {
        fail("static pod securityContext: want readOnlyRootFilesystem true, allowPrivilegeEscalation false".into());
    }
    if sc["privileged"] == true
        || !strings(sc["capabilities"].get("drop")).contains(&"ALL".to_owned())
    {
        fail(
            "static pod securityContext: must not be privileged and must drop ALL capabilities"
                .into(),
        );
    }
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            if plugin["resources"][kind][res].is_null() {
                fail(format!("static pod resources.{kind}.{res} is missing"));
            }
        }
    }

    // --- the EncryptionConfiguration
    let enc = &m.encryption_config;
    if enc["apiVersion"] != "apiserver.config.k8s.io/v1" || enc["kind"] != "EncryptionConfiguration"
    {
        fail("encryption config: not apiserver.config.k8s.io/v1 EncryptionConfiguration".into());
    }
    let entries = enc["resources"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let resources = strings(entry.get("resources"));
        let providers = entry["providers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let kms = providers.first().map(|p| &p["kms"]).unwrap_or(&Value::Null);
        if kms.is_null() {
            fail(format!(
                "encryption config resources[{i}] {resources:?}: first provider is not kms"
            ));
            continue;
        }
        if providers.last().map(|p| &p["identity"]) != Some(&json!({})) || providers.len() < 2 {
            fail(format!(
                "encryption config resources[{i}]: identity must be the last provider"
            ));
        }
        if kms["apiVersion"] != "v2" {
            fail(format!(
                "encryption config resources[{i}]: kms apiVersion {} is not v2",
                kms["apiVersion"]
            ));
        }
        if kms["name"] != PROVIDER_NAME {
            fail(format!(
                "encryption config resources[{i}]: kms name {} is not {PROVIDER_NAME}",
                kms["name"]
            ));
        }
        if kms["timeout"] != "3s" {
            fail(format!(
                "encryption config resources[{i}]: kms timeout {} is not 3s",
                kms["timeout"]
            ));
        }
        endpoints.push(kms["endpoint"].as_str().unwrap_or_default().to_owned());
    }
    for required in ["secrets", "configmaps"] {
        if !entries
            .first()
            .is_some_and(|e| strings(e.get("resources")).contains(&required.to_owned()))
        {
            fail(format!(
                "encryption config: {required} are not in the first (kms) entry"
            ));
        }
    }
    let stored_prefix = format!("k8s:enc:kms:v2:{PROVIDER_NAME}:");
    if !m.readme.contains(&stored_prefix) {
        fail(format!(
            "deploy/README.md does not name the stored prefix {stored_prefix} (provider name drift)"
        ));
    }

    // --- kube-apiserver's changes
    let patch = &m.apiserver_patch;
    let Some(apiserver) = container(patch, APISERVER_CONTAINER) else {
        fail(format!(
            "apiserver patch has no container {APISERVER_CONTAINER}"
        ));
        return errors;
    };
    let apiserver_argv = strings(apiserver.get("command"));
    if flag(
        &apiserver_argv,
        "--encryption-provider-config-automatic-reload",
    )
    .as_deref()
        != Some("true")
    {
        fail(
            "apiserver patch: --encryption-provider-config-automatic-reload=true is missing".into(),
        );
    }
    match flag(&apiserver_argv, "--encryption-provider-config") {
        Some(file) => match host_path(patch, apiserver, &file) {
            Ok((host, mount)) => {
                if mount["readOnly"] != true {
                    fail(format!(
                        "apiserver patch: mount {} of the encryption config is not readOnly",
                        mount["mountPath"]
                    ));
                }
                let host = host.display().to_string();
                if !m.readme.contains(&host) {
                    fail(format!(
                        "deploy/README.md does not say to install the config at {host}"
                    ));
                }
            }
            Err(e) => fail(format!("apiserver patch --encryption-provider-config: {e}")),
        },
        None => fail("apiserver patch: --encryption-provider-config is missing".into()),
    }
    for endpoint in endpoints {
        match socket_path(&endpoint).and_then(|p| host_path(patch, apiserver, &p)) {
            Ok((host, _)) if Some(&host) == plugin_socket_host.as_ref() => {}
            Ok((host, _)) => fail(format!(
                "socket mismatch: the apiserver reaches endpoint {endpoint} at host path {}, the plugin listens at {:?}",
                host.display(),
                plugin_socket_host
            )),
            Err(e) => fail(format!(
                "encryption config endpoint as seen by the apiserver: {e}"
            )),
        }
    }
    errors
}

#[test]
fn deploy_files_agree() {
    let errors = check(&load());
    assert!(
        errors.is_empty(),
        "deploy/ files disagree:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn the_shared_socket_and_config_paths_are_the_documented_ones() {
    let m = load();
    let plugin = container(&m.static_pod, PLUGIN_CONTAINER).unwrap();
    let listen = flag(&strings(plugin.get("command")), "--listen").unwrap();
    assert_eq!(listen, "unix:///var/run/kmsplugin/socket.sock");
    assert_eq!(
        m.encryption_config["resources"][0]["providers"][0]["kms"]["endpoint"],
        listen.as_str()
    );
    let apiserver = container(&m.apiserver_patch, APISERVER_CONTAINER).unwrap();
    assert_eq!(
        flag(
            &strings(apiserver.get("command")),
            "--encryption-provider-config"
        )
        .as_deref(),
        Some("/etc/kubernetes/enc/encryption-config.yaml")
    );
}

fn set(m: &mut Value, pointer: &str, value: Value) {
    *m.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in the manifest (layout changed?)")) = value;
}

/// Index of `needle` in the plugin container's command (so mutations follow the file).
fn arg_index(pod: &Value, pointer: &str, needle: &str) -> usize {
    strings(pod.pointer(pointer))
        .iter()
        .position(|a| a == needle)
        .unwrap_or_else(|| panic!("{needle} not in {pointer}"))
}

#[test]
fn check_reports_each_kind_of_drift() {
    let base = load();
    assert!(
        check(&base).is_empty(),
        "baseline must agree: {:?}",
        check(&base)
    );
    let cmd = "/spec/containers/0/command";
    let listen_at = arg_index(&base.static_pod, cmd, "--listen") + 1;
    let keyring_at = arg_index(&base.static_pod, cmd, "--keyring") + 1;
    let live = "/spec/containers/0/livenessProbe/exec/command";
    let live_listen_at = arg_index(&base.static_pod, live, "--listen") + 1;
    let volume_index = |pod: &Value, name: &str| {
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .position(|v| v["name"] == name)
            .unwrap()
    };
    let mount_index = |pod: &Value, path: &str| {
        pod["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .position(|v| v["mountPath"] == path)
            .unwrap()
    };
    let plugin_sock_vol = volume_index(&base.static_pod, "kmsplugin-socket");
    let apiserver_sock_vol = volume_index(&base.apiserver_patch, "kmsplugin-socket");
    let keyring_mount = mount_index(&base.static_pod, "/etc/atrest");
    let enc_mount = mount_index(&base.apiserver_patch, "/etc/kubernetes/enc");
    let flag_at = arg_index(
        &base.apiserver_patch,
        cmd,
        "--encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml",
    );

    type Mutation = Box<dyn Fn(&mut Manifests)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "encryption config endpoint moved",
            Box::new(|m| {
                set(
                    &mut m.encryption_config,
                    "/resources/0/providers/0/kms/endpoint",
                    json!("unix:///var/run/other/socket.sock"),
                )
            }),
            "endpoint",
        ),
        (
            "serve --listen moved",
            Box::new(move |m| {
                set(
                    &mut m.static_pod,
                    &format!("{cmd}/{listen_at}"),
                    json!("unix:///var/run/kmsplugin/other.sock"),
                )
            }),
            "socket mismatch",
        ),
        (
            "liveness probe dials another socket",
            Box::new(move |m| {
                set(
                    &mut m.static_pod,
                    &format!("{live}/{live_listen_at}"),
                    json!("unix:///tmp/x.sock"),
                )
            }),
            "livenessProbe --listen",
        ),
        (
            "plugin socket hostPath moved",
            Box::new(move |m| {
                set(
                    &mut m.static_pod,
                    &format!("/spec/volumes/{plugin_sock_vol}/hostPath/path"),
                    json!("/run/elsewhere"),
                )
            }),
            "socket mismatch",
        ),
        (
            "apiserver socket hostPath moved",
            Box::new(move |m| {
                set(
                    &mut m.apiserver_patch,
                    &format!("/spec/volumes/{apiserver_sock_vol}/hostPath/path"),
                    json!("/run/elsewhere"),
                )
            }),
            "socket mismatch",
        ),
        (
            "keyring mount writable",
            Box::new(move |m| {
                set(
                    &mut m.static_pod,
                    &format!("/spec/containers/0/volumeMounts/{keyring_mount}/readOnly"),
                    json!(false),
                )
            }),
            "not readOnly",
        ),
        (
            "keyring outside its mount",
            Box::new(move |m| {
                set(
                    &mut m.static_pod,
                    &format!("{cmd}/{keyring_at}"),
                    json!("/etc/other/keyring.json"),
                )
            }),
            "--keyring",
        ),
        (
            "encryption config outside any mount",
            Box::new(move |m| {
                set(
                    &mut m.apiserver_patch,
                    &format!("{cmd}/{flag_at}"),
                    json!("--encryption-provider-config=/etc/enc/config.yaml"),
                )
            }),
            "--encryption-provider-config",
        ),
        (
            "encryption config mount writable",
            Box::new(move |m| {
                set(
                    &mut m.apiserver_patch,
                    &format!("/spec/containers/0/volumeMounts/{enc_mount}/readOnly"),
                    json!(false),
                )
            }),
            "not readOnly",
        ),
        (
            "provider renamed",
            Box::new(|m| {
                set(
                    &mut m.encryption_config,
                    "/resources/0/providers/0/kms/name",
                    json!("other"),
                )
            }),
            "kms name",
        ),
        (
            "docs name another prefix",
            Box::new(|m| {
                m.readme = m
                    .readme
                    .replace("k8s:enc:kms:v2:atrest:", "k8s:enc:kms:v2:other:")
            }),
            "stored prefix",
        ),
        (
            "identity first",
            Box::new(|m| {
                let providers = m
                    .encryption_config
                    .pointer_mut("/resources/0/providers")
                    .unwrap();
                providers.as_array_mut().unwrap().reverse();
            }),
            "first provider is not kms",
        ),
        (
            "priority lowered",
            Box::new(|m| {
                set(
                    &mut m.static_pod,
                    "/spec/priorityClassName",
                    json!("system-cluster-critical"),
                )
            }),
            "priorityClassName",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut m = base.clone();
        mutate(&mut m);
        let errors = check(&m);
        assert!(
            errors.iter().any(|e| e.contains(expect)),
            "{what}: expected an error containing {expect:?}, got {errors:?}"
        );
    }
}

#[test]
fn flags_are_found_in_both_spellings() {
    let argv: Vec<String> = ["x", "--listen", "/a", "--keyring=/k"]
        .map(String::from)
        .to_vec();
    assert_eq!(flag(&argv, "--listen").as_deref(), Some("/a"));
    assert_eq!(flag(&argv, "--keyring").as_deref(), Some("/k"));
    assert_eq!(flag(&argv, "--key"), None);
    assert!(socket_path("unix:///@abstract").is_err());
    assert!(socket_path("/no/scheme").is_err());
}

#[test]
fn encryption_config_loads_under_kube_apiserver_rules() {
    // storage-encryption's parser is strict and applies kube-apiserver's load-time rules.
    let text = read("encryption-config/kms-v2.yaml");
    let config = storage_encryption::EncryptionConfiguration::parse(&text)
        .unwrap_or_else(|e| panic!("deploy/encryption-config/kms-v2.yaml: {e}"));
    let providers: Vec<String> = config
        .all_providers()
        .map(|(_, _, p)| p.describe())
        .collect();
    assert_eq!(
        providers,
        [format!("kms v2 {PROVIDER_NAME}"), "identity".to_owned()]
    );
}
