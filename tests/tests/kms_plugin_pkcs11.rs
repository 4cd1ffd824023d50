//! KEKs kept in a PKCS#11 token, against a real SoftHSM2 token of each
//! test's own: `kms-plugin keyring add --pkcs11-…` as an operator runs it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Result, ensure};
use atrest_tests::plugin::{
    Keyring, PluginOptions, PluginProcess, WAIT, cli_env, decrypt, encrypt, eventually, seed,
};
use atrest_tests::softhsm::{MODULE, SoftHsm, USER_PIN, hsm_keyring, plugin_options};
use tonic::Code;

async fn add(
    hsm: &SoftHsm,
    keyring: &Keyring,
    extra: &[&str],
) -> Result<atrest_tests::plugin::CliOutput> {
    let mut args: Vec<String> = vec![
        "keyring".into(),
        "add".into(),
        "--keyring".into(),
        keyring.path().display().to_string(),
    ];
    args.extend(hsm.flags());
    args.extend(extra.iter().map(|s| s.to_string()));
    let (k, v) = hsm.env();
    cli_env(args, &[(k, &v)]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn add_generates_a_protected_token_key_and_the_keyring_holds_only_its_reference() -> Result<()>
{
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let (keyring, first) = Keyring::init(dir.path().join("keyring.json")).await?;
    let out = add(&hsm, &keyring, &["--pkcs11-token", "atrest", "--generate"]).await?;
    assert!(!out.stderr.contains(USER_PIN) && !out.stdout.contains(USER_PIN));
    let n: u32 = out.success()?.trim().parse()?;
    assert_eq!(n, 2);

    let list = keyring.list().await?;
    assert_eq!(list.key_id, first, "an added KEK is decrypt-only");
    let kek = list.kek(2).unwrap();
    assert_eq!(kek.kind, "pkcs11");
    let reference = kek.pkcs11.as_ref().unwrap();
    assert_eq!(reference.token, "atrest");
    assert_eq!(reference.check_value.len(), 32);
    assert_eq!(list.kek(1).unwrap().kind, "local");
    let text = std::fs::read_to_string(keyring.path())?;
    let file: serde_json::Value = serde_json::from_str(&text)?;
    assert!(file["keks"][1].get("material").is_none(), "{text}");

    // The token object as the token itself describes it.
    let objects = hsm.pkcs11_tool(&["--login", "--pin", USER_PIN, "--list-objects"])?;
    assert!(objects.contains(&reference.key_label), "{objects}");
    assert!(objects.contains(&reference.id), "{objects}");
    let usage = objects
        .lines()
        .find(|l| l.contains("Usage:"))
        .unwrap_or_default();
    assert!(
        usage.contains("encrypt") && usage.contains("decrypt") && !usage.contains("wrap"),
        "{objects}"
    );
    assert!(
        objects.contains("sensitive") && objects.contains("never extractable"),
        "{objects}"
    );

    // Promote and list work for it like for a local KEK; the key_id depends on
    // the file only.
    let key_id = keyring.promote(2).await?;
    assert!(key_id.starts_with("atrest-v1-k2-e2-"), "{key_id}");
    assert_eq!(keyring.list().await?.key_id, key_id);
    let text = keyring.run("list", &[]).await?.success()?;
    assert!(text.contains("PKCS#11 token \"atrest\""), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn adopt_finds_an_existing_key_and_refuses_an_extractable_one() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let pin = ["--login", "--pin", USER_PIN];
    let mut keygen = pin.to_vec();
    keygen.extend_from_slice(&[
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "made-elsewhere",
        "--id",
        "c0ffee",
        "--sensitive",
    ]);
    hsm.pkcs11_tool(&keygen)?;
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let out = add(
        &hsm,
        &keyring,
        &[
            "--pkcs11-token",
            "atrest",
            "--adopt",
            "--pkcs11-key-label",
            "made-elsewhere",
        ],
    )
    .await?;
    out.success()?;
    let listed = keyring.list().await?;
    assert_eq!(listed.kek(2).unwrap().pkcs11.as_ref().unwrap().id, "c0ffee");

    // A key that may leave the token is refused.
    let mut keygen = pin.to_vec();
    keygen.extend_from_slice(&[
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "leaky",
        "--sensitive",
        "--extractable",
    ]);
    hsm.pkcs11_tool(&keygen)?;
    let out = add(
        &hsm,
        &keyring,
        &[
            "--pkcs11-token",
            "atrest",
            "--adopt",
            "--pkcs11-key-label",
            "leaky",
        ],
    )
    .await?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("is extractable"), "{out:?}");
    assert!(keyring.list().await?.kek(3).is_none());
    // A label that names nothing.
    let out = add(
        &hsm,
        &keyring,
        &[
            "--pkcs11-token",
            "atrest",
            "--adopt",
            "--pkcs11-key-label",
            "nothing-here",
        ],
    )
    .await?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("no AES key labelled"), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn token_trouble_at_add_exits_3_and_never_retries_a_wrong_pin() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let before = std::fs::read(keyring.path())?;
    assert!(!hsm.token_flags()?.contains("count low"), "fresh token");

    let wrong = hsm.wrong_pin_file()?;
    let (k, v) = hsm.env();
    let args = [
        "keyring",
        "add",
        "--keyring",
        &keyring.path().display().to_string(),
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        "atrest",
        "--pkcs11-pin-file",
        &wrong.display().to_string(),
    ]
    .map(str::to_owned);
    let out = cli_env(&args, &[(k, &v)]).await?;
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(
        out.stderr.contains("CKR_PIN_INCORRECT") && out.stderr.contains("not retrying"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("0000-not-the-pin"), "{out:?}");
    // The token saw a failed login (SoftHSM2 raises CKF_USER_PIN_COUNT_LOW;
    // it never locks, so that flag is all it shows), and the right PIN
    // still works.
    assert!(hsm.token_flags()?.contains("count low"));
    assert_eq!(std::fs::read(keyring.path())?, before, "keyring changed");
    add(&hsm, &keyring, &["--pkcs11-token", "atrest"])
        .await?
        .success()?;

    // No such token: exit 3, named.
    let out = add(&hsm, &keyring, &["--pkcs11-token", "elsewhere"]).await?;
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(
        out.stderr
            .contains("no PKCS#11 token labelled \"elsewhere\""),
        "{out:?}"
    );

    // No module: a usage error.
    let out = cli_env(
        [
            "keyring",
            "add",
            "--keyring",
            &keyring.path().display().to_string(),
            "--pkcs11-token",
            "atrest",
        ],
        &[(k, &v)],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out:?}");
    Ok(())
}

/// Replaces the token key of `kek` by another key with the same label and
/// CKA_ID, as a wrong restore or a swapped token would.
fn replace_token_key(
    hsm: &SoftHsm,
    keyring_list: &atrest_tests::plugin::KeyringList,
    kek: u32,
) -> Result<()> {
    let reference = keyring_list.kek(kek).unwrap().pkcs11.clone().unwrap();
    hsm.pkcs11_tool(&[
        "--login",
        "--pin",
        USER_PIN,
        "--delete-object",
        "--type",
        "secrkey",
        "--id",
        &reference.id,
    ])?;
    hsm.pkcs11_tool(&[
        "--login",
        "--pin",
        USER_PIN,
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        &reference.key_label,
        "--id",
        &reference.id,
        "--sensitive",
    ])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_token_key_is_refused_at_reload_and_at_start() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let plugin = PluginProcess::start(plugin_options(&hsm, keyring.path())).await?;
    let served = plugin.status().await?.key_id;
    assert!(served.starts_with("atrest-v1-k2-"), "{served}");

    replace_token_key(&hsm, &keyring.list().await?, 2)?;
    // Any edit makes the plugin reload; the reload finds the token key again
    // and refuses it.
    keyring.rotate().await?;
    plugin.wait_for_log("does not give the check value").await?;
    assert_eq!(
        plugin.status().await?.key_id,
        served,
        "the refused keyring was served"
    );

    let mut second = PluginProcess::spawn(plugin_options(&hsm, keyring.path())).await?;
    let status = second.wait().await?;
    assert_eq!(status.code(), Some(1), "{}", second.log());
    assert!(
        second.log().contains("does not give the check value"),
        "{}",
        second.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_pin_stops_the_start_with_exit_3_and_the_pin_never_leaks() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let wrong = hsm.wrong_pin_file()?;
    let (k, v) = hsm.env();
    let options = PluginOptions::new()
        .keyring(keyring.path())
        .env(k, v.clone())
        .arg("--pkcs11-module")
        .arg(MODULE)
        .arg("--pkcs11-pin-file")
        .arg(&wrong.display().to_string());
    let mut refused = PluginProcess::spawn(options).await?;
    let status = refused.wait().await?;
    assert_eq!(status.code(), Some(3), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("CKR_PIN_INCORRECT") && log.contains("not retrying"),
        "{log}"
    );
    assert!(!log.contains("0000-not-the-pin"), "{log}");
    // One failed login happened (SoftHSM2 raises CKF_USER_PIN_COUNT_LOW; it
    // never locks), and the process is gone: nothing retries.
    assert!(hsm.token_flags()?.contains("count low"));

    // The PIN from the environment: not in argv, logs or metrics.
    let plugin = PluginProcess::start(
        PluginOptions::new()
            .keyring(keyring.path())
            .env(k, v)
            .env("ATREST_PKCS11_PIN", USER_PIN)
            .arg("--pkcs11-module")
            .arg(MODULE)
            .metrics()
            .log("debug"),
    )
    .await?;
    let client = plugin.client();
    let made = encrypt(&client, &seed(1)).await?;
    assert_eq!(
        decrypt(&client, &made.ciphertext, &made.key_id).await?,
        seed(1)
    );
    let _ = decrypt(
        &client,
        b"ATR\x02garbage-garbage-garbage-garbage",
        &made.key_id,
    )
    .await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", plugin.pid()))?;
    assert!(!String::from_utf8_lossy(&cmdline).contains(USER_PIN));
    let metrics = plugin.http("/metrics").await?;
    assert!(!format!("{metrics:?}").contains(USER_PIN));
    let healthz = plugin.http("/healthz").await?;
    assert!(!format!("{healthz:?}").contains(USER_PIN));
    assert!(!plugin.log().contains(USER_PIN), "{}", plugin.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_plugins_sharing_one_token_report_the_same_key_id_and_read_each_other() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let copy = dir.path().join("copy.json");
    std::fs::copy(keyring.path(), &copy)?;
    let a = PluginProcess::start(plugin_options(&hsm, keyring.path())).await?;
    let b = PluginProcess::start(plugin_options(&hsm, &copy)).await?;
    let (ka, kb) = (a.status().await?.key_id, b.status().await?.key_id);
    assert_eq!(ka, kb);
    let made = encrypt(&a.client(), &seed(5)).await?;
    assert_eq!(made.key_id, ka);
    assert_eq!(
        decrypt(&b.client(), &made.ciphertext, &made.key_id).await?,
        seed(5)
    );
    // At its end, a plugin says what the token calls cost inside the module.
    let mut a = a;
    a.sigterm()?;
    a.wait().await?;
    let log = a.log();
    assert!(
        log.contains("PKCS#11 usage")
            && log.contains("module_cpu_us_per_call")
            && log.contains("peak_sessions"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_keyring_moves_from_a_local_kek_to_a_token_kek_without_losing_data() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let (keyring, local_key_id) = Keyring::init(dir.path().join("keyring.json")).await?;
    // A plugin configured for the token while its keyring is still all local.
    let plugin = PluginProcess::start(plugin_options(&hsm, keyring.path())).await?;
    let client = plugin.client();
    let old = encrypt(&client, &seed(1)).await?;
    assert_eq!(old.key_id, local_key_id);
    assert_eq!(old.ciphertext[3], 1, "a local KEK writes format version 1");

    let n = hsm.add_key(&keyring, &["--pkcs11-token", "atrest"]).await?;
    let hsm_key_id = keyring.promote(n).await?;
    assert_eq!(
        plugin.wait_for_key_id_change(&local_key_id).await?,
        hsm_key_id
    );
    let new = encrypt(&client, &seed(2)).await?;
    assert_eq!(new.key_id, hsm_key_id);
    assert_eq!(new.ciphertext[3], 2, "a token KEK writes format version 2");
    assert_eq!(
        decrypt(&client, &old.ciphertext, &old.key_id).await?,
        seed(1)
    );
    assert_eq!(
        decrypt(&client, &new.ciphertext, &new.key_id).await?,
        seed(2)
    );
    // A version-1 header under the token KEK's key_id is refused, not tried.
    let mut relabelled = new.ciphertext.clone();
    relabelled[3] = 1;
    let refused = decrypt(&client, &relabelled, &new.key_id)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // Every local value re-encrypted (the rotator's job); the local KEK goes.
    keyring.retire(1).await?;
    eventually(WAIT, "the plugin to drop the local KEK", || {
        let client = client.clone();
        let old = old.clone();
        async move {
            match decrypt(&client, &old.ciphertext, &old.key_id).await {
                Err(s) if s.code() == Code::FailedPrecondition => Ok(Some(())),
                _ => Ok(None),
            }
        }
    })
    .await?;
    assert_eq!(
        decrypt(&client, &new.ciphertext, &new.key_id).await?,
        seed(2)
    );
    assert_eq!(plugin.status().await?.healthz, "ok");
    Ok(())
}

/// Without `--pkcs11-max-sessions`, the bound follows the slot's kind:
/// SoftHSM2's slots are software (no CKF_HW_SLOT), so one session (and one
/// call thread) per CPU; the flag still wins.
#[tokio::test(flavor = "multi_thread")]
async fn a_software_token_gets_one_session_per_cpu_unless_the_flag_says_otherwise() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let cpus = std::thread::available_parallelism()?.get().min(16);
    let plugin = PluginProcess::start(plugin_options(&hsm, keyring.path()).metrics()).await?;
    let made = encrypt(&plugin.client(), &seed(4)).await?;
    ensure!(decrypt(&plugin.client(), &made.ciphertext, &made.key_id).await? == seed(4));
    let metrics = plugin.metrics().await?;
    let max = metrics.get("atrest_kms_pkcs11_sessions", &[("state", "max")]);
    ensure!(
        max == Some(cpus as f64),
        "sessions max {max:?}, {cpus} CPUs"
    );
    let log = plugin.log();
    ensure!(log.contains("one per CPU: a software token"), "{log}");
    ensure!(
        log.contains(&format!(
            "PKCS#11 token call threads started threads={cpus}"
        )),
        "{log}"
    );
    drop(plugin);

    let plugin = PluginProcess::start(
        plugin_options(&hsm, keyring.path())
            .metrics()
            .arg("--pkcs11-max-sessions")
            .arg("5"),
    )
    .await?;
    let metrics = plugin.metrics().await?;
    let max = metrics.get("atrest_kms_pkcs11_sessions", &[("state", "max")]);
    ensure!(max == Some(5.0), "sessions max {max:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn more_callers_than_sessions_all_finish_answered_or_refused_as_exhausted() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let plugin = PluginProcess::start(
        plugin_options(&hsm, keyring.path())
            .metrics()
            .arg("--pkcs11-max-sessions")
            .arg("2")
            .arg("--pkcs11-session-wait")
            .arg("200ms")
            .arg("--worker-threads")
            .arg("4"),
    )
    .await?;
    let client = plugin.client();
    let made = encrypt(&client, &seed(3)).await?;
    let mut calls = Vec::new();
    for _ in 0..64 {
        let (client, made) = (client.clone(), made.clone());
        calls.push(tokio::spawn(async move {
            // A bound far above any wait the plugin may impose: a deadlock
            // fails here instead of hanging the suite.
            tokio::time::timeout(
                Duration::from_secs(60),
                decrypt(&client, &made.ciphertext, &made.key_id),
            )
            .await
        }));
    }
    let (mut answered, mut busy) = (0, 0);
    for call in calls {
        match call.await? {
            Err(_) => anyhow::bail!("a Decrypt never finished: deadlock"),
            Ok(Ok(plaintext)) => {
                ensure!(plaintext == seed(3));
                answered += 1;
            }
            Ok(Err(status)) => {
                ensure_exhausted(&status)?;
                busy += 1;
            }
        }
    }
    println!(
        "64 concurrent Decrypts over 2 sessions: {answered} answered, {busy} refused (pool exhausted)"
    );
    ensure!(answered > 0);
    let metrics = plugin.metrics().await?;
    let max = metrics.get("atrest_kms_pkcs11_sessions", &[("state", "max")]);
    ensure!(max == Some(2.0), "sessions max {max:?}\n{}", metrics.text);
    let peak = metrics.get("atrest_kms_pkcs11_sessions_peak", &[]);
    ensure!(
        peak.is_some_and(|p| (1.0..=2.0).contains(&p)),
        "peak {peak:?}"
    );
    let exhausted = metrics.get("atrest_kms_pkcs11_pool_exhausted_total", &[]);
    ensure!(
        exhausted.is_some_and(|n| n >= f64::from(busy)),
        "pool_exhausted_total {exhausted:?} < {busy} refusals"
    );
    Ok(())
}

/// A refusal for a busy pool: RESOURCE_EXHAUSTED, naming the pool and the
/// flags that size it.
fn ensure_exhausted(status: &tonic::Status) -> Result<()> {
    ensure!(
        status.code() == Code::ResourceExhausted
            && status
                .message()
                .contains("session pool of token \"atrest\" exhausted")
            && status.message().contains("--pkcs11-max-sessions"),
        "unexpected refusal {status:?}"
    );
    Ok(())
}

/// Exclusive fcntl locks on a SoftHSM2 token's key object files. SoftHSM2
/// takes a shared lock on a key's object file (blocking, `F_SETLKW`) each
/// time a call uses the key, so while these are held every call that uses
/// a key stays inside the module with its session: a token that stalls,
/// as a network HSM does when its link hangs. Dropping releases them.
#[derive(Debug)]
struct StalledToken {
    /// Held only to keep the locks (closing a file releases them).
    _locks: Vec<std::fs::File>,
}

impl StalledToken {
    fn stall(tokens: &std::path::Path) -> Result<StalledToken> {
        use nix::fcntl::{FcntlArg, fcntl};
        let mut held = Vec::new();
        for token in std::fs::read_dir(tokens)? {
            for entry in std::fs::read_dir(token?.path())? {
                let path = entry?.path();
                let is_key = path.extension().is_some_and(|e| e == "object")
                    && path.file_stem().is_some_and(|s| s != "token");
                if !is_key {
                    continue;
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)?;
                // The whole file (start 0, length 0 = to the end).
                let lock = nix::libc::flock {
                    l_type: nix::libc::F_WRLCK as i16,
                    l_whence: nix::libc::SEEK_SET as i16,
                    l_start: 0,
                    l_len: 0,
                    l_pid: 0,
                };
                fcntl(&file, FcntlArg::F_SETLK(&lock))?;
                held.push(file);
            }
        }
        ensure!(
            !held.is_empty(),
            "no key object files under {}",
            tokens.display()
        );
        Ok(StalledToken { _locks: held })
    }
}

/// The self-test calls the token in the background. With the default one
/// async worker, a self-test stuck in a stalled token must not take Status
/// (which kube-apiserver polls) down with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_self_test_stuck_in_a_stalled_token_leaves_status_answering() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let plugin = PluginProcess::start(
        plugin_options(&hsm, keyring.path())
            .arg("--self-test-interval")
            .arg("100ms")
            .arg("--worker-threads")
            .arg("1"),
    )
    .await?;
    let before = plugin.status().await?;
    let stalled = StalledToken::stall(hsm.tokens())?;
    // Several self-test periods while the token holds every call: Status
    // answers each time (a bound far above any answer: a stalled worker
    // fails here instead of hanging the suite).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = tokio::time::timeout(Duration::from_secs(10), plugin.status())
            .await
            .map_err(|_| anyhow::anyhow!("Status did not answer while the token stalled"))??;
        ensure!(status.key_id == before.key_id);
    }
    drop(stalled);
    let made = encrypt(&plugin.client(), &seed(5)).await?;
    ensure!(decrypt(&plugin.client(), &made.ciphertext, &made.key_id).await? == seed(5));
    assert!(!plugin.log().contains("panicked"), "{}", plugin.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_session_busy_makes_calls_wait_the_bounded_time_then_fail_resource_exhausted()
-> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let keyring = hsm_keyring(&hsm, dir.path()).await?;
    let plugin = PluginProcess::start(
        plugin_options(&hsm, keyring.path())
            .metrics()
            .arg("--pkcs11-max-sessions")
            .arg("1")
            .arg("--pkcs11-session-wait")
            .arg("300ms")
            .arg("--worker-threads")
            .arg("2"),
    )
    .await?;
    let client = plugin.client();
    let made = encrypt(&client, &seed(7)).await?;
    let before = plugin.metrics().await?;
    ensure!(
        before.get("atrest_kms_pkcs11_sessions", &[("state", "max")]) == Some(1.0),
        "{}",
        before.text
    );
    ensure!(before.get("atrest_kms_pkcs11_module_calls_total", &[]) >= Some(2.0));

    // The one session goes into a call that the stalled token holds.
    let stalled = StalledToken::stall(hsm.tokens())?;
    let holder = {
        let (client, made) = (client.clone(), made.clone());
        tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                decrypt(&client, &made.ciphertext, &made.key_id),
            )
            .await
        })
    };
    eventually(WAIT, "the one PKCS#11 session to be busy", || {
        let plugin = &plugin;
        async move {
            let m = plugin.metrics().await?;
            Ok(
                (m.get("atrest_kms_pkcs11_sessions", &[("state", "busy")]) == Some(1.0))
                    .then_some(()),
            )
        }
    })
    .await?;

    // Every other call waits --pkcs11-session-wait, then is refused.
    let mut calls = Vec::new();
    for n in 0..8u64 {
        let (client, made) = (client.clone(), made.clone());
        calls.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                if n % 2 == 0 {
                    decrypt(&client, &made.ciphertext, &made.key_id)
                        .await
                        .map(drop)
                } else {
                    encrypt(&client, &seed(n)).await.map(drop)
                }
            })
            .await
        }));
    }
    for call in calls {
        match call.await? {
            Err(_) => anyhow::bail!("a call never finished while the pool was busy: deadlock"),
            Ok(Ok(())) => anyhow::bail!("a call was answered while the only session was held"),
            Ok(Err(status)) => ensure_exhausted(&status)?,
        }
    }
    let during = plugin.metrics().await?;
    let exhausted = during
        .get("atrest_kms_pkcs11_pool_exhausted_total", &[])
        .unwrap_or(0.0);
    ensure!(
        exhausted >= 8.0,
        "pool_exhausted_total {exhausted}\n{}",
        during.text
    );
    ensure!(
        during
            .get("atrest_kms_pkcs11_session_waits_total", &[])
            .is_some_and(|n| n >= 8.0),
        "{}",
        during.text
    );
    ensure!(
        during
            .get("atrest_kms_pkcs11_session_wait_seconds_total", &[])
            .is_some_and(|s| s > 0.0),
        "{}",
        during.text
    );

    // The token answers again: the held call completes (or, if the
    // background self-test held the session, it was refused like the rest),
    // and the pool serves again.
    drop(stalled);
    match holder.await? {
        Err(_) => anyhow::bail!("the call holding the session never finished"),
        Ok(Ok(plaintext)) => ensure!(plaintext == seed(7)),
        Ok(Err(status)) => ensure_exhausted(&status)?,
    }
    let again = encrypt(&client, &seed(8)).await?;
    assert_eq!(
        decrypt(&client, &again.ciphertext, &again.key_id).await?,
        seed(8)
    );
    let after = plugin.metrics().await?;
    ensure!(
        after.get("atrest_kms_pkcs11_sessions", &[("state", "busy")]) == Some(0.0),
        "{}",
        after.text
    );
    ensure!(
        after.get("atrest_kms_pkcs11_sessions", &[("state", "open")]) == Some(1.0),
        "{}",
        after.text
    );
    ensure!(
        after
            .get("atrest_kms_pkcs11_module_seconds_total", &[])
            .is_some_and(|s| s > 0.0),
        "{}",
        after.text
    );
    assert!(!after.text.contains(USER_PIN));
    assert!(!plugin.log().contains("panicked"), "{}", plugin.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_goes_away_gives_unavailable_and_serves_again_when_back() -> Result<()> {
    let hsm = SoftHsm::new("atrest")?;
    let dir = tempfile::tempdir()?;
    let (keyring, local_key_id) = Keyring::init(dir.path().join("keyring.json")).await?;
    let plugin = PluginProcess::start(
        plugin_options(&hsm, keyring.path())
            .arg("--self-test-interval")
            .arg("200ms"),
    )
    .await?;
    let client = plugin.client();
    let local = encrypt(&client, &seed(1)).await?;
    let n = hsm.add_key(&keyring, &["--pkcs11-token", "atrest"]).await?;
    keyring.promote(n).await?;
    plugin.wait_for_key_id_change(&local_key_id).await?;
    let token = encrypt(&client, &seed(2)).await?;

    // SoftHSM2 keeps its tokens as files: moving the directory away is the
    // closest it has to pulling the token. Its objects vanish at once (their
    // handles become invalid) and it sees them again only after the module is
    // re-initialised, which the plugin's reconnect does.
    let away = hsm.tokens().with_extension("away");
    std::fs::rename(hsm.tokens(), &away)?;
    let status = eventually(
        WAIT,
        "Decrypt under the token KEK to fail UNAVAILABLE",
        || {
            let (client, token) = (client.clone(), token.clone());
            async move {
                match decrypt(&client, &token.ciphertext, &token.key_id).await {
                    Err(s) if s.code() == Code::Unavailable => Ok(Some(s)),
                    _ => Ok(None),
                }
            }
        },
    )
    .await?;
    assert!(status.message().contains("atrest"), "{status:?}");
    let refused = encrypt(&client, &seed(3)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let healthz = eventually(WAIT, "healthz to name the token", || {
        let plugin = &plugin;
        async move {
            let h = plugin.status().await?.healthz;
            Ok((h != "ok").then_some(h))
        }
    })
    .await?;
    assert!(healthz.contains("token \"atrest\""), "{healthz}");
    // The local KEK of the mixed keyring keeps working meanwhile.
    assert_eq!(
        decrypt(&client, &local.ciphertext, &local.key_id).await?,
        seed(1)
    );

    std::fs::rename(&away, hsm.tokens())?;
    eventually(WAIT, "the token KEK to serve again", || {
        let (client, token) = (client.clone(), token.clone());
        async move {
            Ok(decrypt(&client, &token.ciphertext, &token.key_id)
                .await
                .ok()
                .filter(|p| *p == seed(2)))
        }
    })
    .await?;
    eventually(WAIT, "healthz ok again", || {
        let plugin = &plugin;
        async move { Ok((plugin.status().await?.healthz == "ok").then_some(())) }
    })
    .await?;
    let again = encrypt(&client, &seed(4)).await?;
    assert_eq!(
        decrypt(&client, &again.ciphertext, &again.key_id).await?,
        seed(4)
    );
    assert!(!plugin.log().contains("panicked"), "{}", plugin.log());
    Ok(())
}
