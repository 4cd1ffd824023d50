//! KEKs kept in a PKCS#11 token, against a real SoftHSM2 token of each
//! test's own: `kms-plugin keyring add --pkcs11-…` as an operator runs it.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use atrest_tests::plugin::{Keyring, cli_env};
use atrest_tests::softhsm::{MODULE, SoftHsm, USER_PIN};

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
