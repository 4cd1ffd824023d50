//! The `kms-plugin keyring …` commands as an operator runs them: what they
//! print, the files they write, how they refuse, and their exit codes.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

use anyhow::Result;
use atrest_tests::plugin::{Keyring, cli};

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
async fn init_refuses_to_overwrite_an_existing_keyring() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let before = std::fs::read(keyring.path())?;
    let out = keyring.run("init", &[]).await?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout.is_empty(),
        "a refused init printed a key_id: {out:?}"
    );
    assert!(
        out.stderr.contains(&keyring.path().display().to_string()),
        "the refusal does not name the file: {out:?}"
    );
    assert_eq!(
        std::fs::read(keyring.path())?,
        before,
        "init changed an existing keyring"
    );

    // Any existing file, not only a keyring, is left alone.
    let other = dir.path().join("precious.json");
    std::fs::write(&other, b"{\"mine\": true}")?;
    let out = Keyring::at(&other).run("init", &[]).await?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(std::fs::read(&other)?, b"{\"mine\": true}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn keyring_files_are_private() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    assert_eq!(mode_of(keyring.path()), 0o600, "after init");
    keyring.rotate().await?;
    assert_eq!(mode_of(keyring.path()), 0o600, "after rotate");
    // Whatever else the commands leave beside it (backup, lock) is private too.
    for entry in std::fs::read_dir(dir.path())? {
        let path = entry?.path();
        assert_eq!(
            mode_of(&path) & 0o077,
            0,
            "{} is readable by others",
            path.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn edits_print_the_key_id_that_list_then_reports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, first) = Keyring::init(dir.path().join("keyring.json")).await?;
    let list = keyring.list().await?;
    assert_eq!(list.generation, 1);
    assert_eq!(
        list.primary_kek().unwrap().key_id.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(list.keks.len(), 1);
    assert_eq!(list.keks[0].key_ids, vec![first.clone()]);
    assert!(
        list.keks[0].created.contains('T') && list.keks[0].created.ends_with('Z'),
        "created is not RFC 3339 UTC: {}",
        list.keks[0].created
    );

    let second = keyring.rotate().await?;
    let list = keyring.list().await?;
    assert_eq!(list.generation, 2);
    assert_eq!(list.primary, 2);
    assert_eq!(
        list.primary_kek().unwrap().key_id.as_deref(),
        Some(second.as_str())
    );

    let third = keyring.promote(1).await?;
    let list = keyring.list().await?;
    assert_eq!(list.generation, 3);
    assert_eq!(list.primary, 1);
    assert_eq!(list.keks[0].key_ids, vec![first.clone(), third.clone()]);
    let all: HashSet<String> = list.all_key_ids().into_iter().collect();
    assert_eq!(all.len(), 3, "key_ids are not all distinct: {all:?}");

    let text = keyring.run("list", &[]).await?.success()?;
    for key_id in [&first, &second, &third] {
        assert!(
            text.contains(key_id.as_str()),
            "text listing lacks {key_id}:\n{text}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_rotations_lose_no_kek() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, first) = Keyring::init(dir.path().join("keyring.json")).await?;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let keyring = keyring.clone();
        tasks.push(tokio::spawn(async move { keyring.rotate().await }));
    }
    let mut printed = HashSet::from([first]);
    for task in tasks {
        printed.insert(task.await??);
    }
    assert_eq!(printed.len(), 9, "rotations printed a key_id twice");
    let list = keyring.list().await?;
    assert_eq!(list.keks.len(), 9, "a concurrent rotation was lost");
    assert_eq!(list.generation, 9);
    let listed: HashSet<String> = list.all_key_ids().into_iter().collect();
    assert_eq!(listed, printed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn edits_of_a_missing_or_broken_keyring_fail_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = Keyring::at(dir.path().join("missing.json"));
    let broken_path = dir.path().join("broken.json");
    std::fs::write(&broken_path, b"{\"format\": 1")?;
    let broken = Keyring::at(&broken_path);
    for keyring in [&missing, &broken] {
        for (sub, extra) in [
            ("rotate", &[][..]),
            ("add", &[]),
            ("promote", &["--kek", "1"]),
            ("list", &[]),
        ] {
            let out = keyring.run(sub, extra).await?;
            assert_eq!(
                out.code(),
                Some(1),
                "{sub} on {}: {out:?}",
                keyring.path().display()
            );
            assert!(
                out.stderr.contains(&keyring.path().display().to_string()),
                "{sub}: the error does not name the file: {out:?}"
            );
        }
    }
    assert!(
        !missing.path().exists(),
        "an edit created the missing keyring"
    );
    assert_eq!(
        std::fs::read(&broken_path)?,
        b"{\"format\": 1",
        "an edit changed a broken keyring"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn promote_and_retire_refuse_unknown_keks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let before = std::fs::read(keyring.path())?;
    for (sub, kek) in [("promote", "7"), ("retire", "7"), ("retire", "1")] {
        let out = keyring.run(sub, &["--kek", kek]).await?;
        assert_eq!(out.code(), Some(1), "{sub} --kek {kek}: {out:?}");
        assert!(
            !out.stderr.trim().is_empty(),
            "{sub} --kek {kek}: no reason"
        );
    }
    assert_eq!(
        std::fs::read(keyring.path())?,
        before,
        "a refused edit changed the keyring"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2_naming_the_flag() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let path = keyring.path().display().to_string();
    for (args, flag) in [
        (vec!["keyring", "promote", "--keyring", &path], "--kek"),
        (
            vec!["keyring", "promote", "--keyring", &path, "--kek", "one"],
            "--kek",
        ),
        (
            vec!["keyring", "list", "--keyring", &path, "--output", "yaml"],
            "--output",
        ),
        (
            vec!["serve", "--keyring", &path, "--listen", "tcp://127.0.0.1:1"],
            "--listen",
        ),
        (
            vec!["serve", "--keyring", &path, "--socket-mode", "0999"],
            "--socket-mode",
        ),
        (
            vec!["serve", "--keyring", &path, "--grace-period", "0s"],
            "--grace-period",
        ),
        (
            vec!["serve", "--keyring", &path, "--reload-interval", "soon"],
            "--reload-interval",
        ),
        (
            vec!["serve", "--keyring", &path, "--metrics-addr", "nope"],
            "--metrics-addr",
        ),
        (vec!["no-such-command"], "no-such-command"),
    ] {
        let out = cli(&args).await?;
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(flag),
            "{args:?}: the message does not name {flag}: {out:?}"
        );
    }
    Ok(())
}
