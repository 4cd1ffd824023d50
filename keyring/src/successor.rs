//! May a keyring replace the one in service?
//!
//! A newer `generation` is not enough: a copied keyring of another cluster,
//! or this keyring with one KEK's material edited, can have a higher one, and
//! loading it makes every earlier ciphertext undecryptable. A candidate is a
//! successor of the keyring in service when
//!
//! - it has the same lineage (a file without one is accepted while the one in
//!   service has none either, or gains one: that is how pre-lineage keyrings
//!   are upgraded; losing a lineage is refused);
//! - every KEK present in both has the same material (compared through the
//!   public [fingerprint](crate::derive::fingerprint), never the key bytes)
//!   and kept every key_id it had (its epochs only grow);
//! - the KEK primary in service is still there: ciphertexts written a moment
//!   ago use it, so it may only go after another KEK was primary long enough
//!   for every plugin to load that (`promote`, then later `retire`).
//!
//! Dropping decrypt-only KEKs (`keyring retire`) is allowed; [`Dropped`] names
//! the key_ids that no longer decrypt, for the caller to log.

use thiserror::Error;

use crate::listing::Listing;

/// The decrypt-only KEKs a successor no longer has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Their numbers.
    pub keks: Vec<u32>,
    /// Every key_id they answered to: ciphertexts under these no longer decrypt.
    pub key_ids: Vec<String>,
}

impl Dropped {
    /// True when nothing was dropped.
    pub fn is_empty(&self) -> bool {
        self.keks.is_empty()
    }
}

/// Why a candidate is not a successor. Shows only public values (lineages,
/// KEK numbers).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Refusal {
    /// Another keyring: another cluster's, or a new `keyring init`.
    #[error(
        "its lineage {candidate} is not the lineage {in_service} in service: it is another keyring (another cluster's, or a new `keyring init`)"
    )]
    LineageChanged {
        /// Lineage in service.
        in_service: String,
        /// Lineage of the candidate.
        candidate: String,
    },
    /// The candidate has no lineage while the keyring in service has one.
    #[error(
        "it has no lineage but the keyring in service has {in_service}: an older or foreign file"
    )]
    LineageRemoved {
        /// Lineage in service.
        in_service: String,
    },
    /// A KEK number now names other key material.
    #[error(
        "KEK {kek} has other key material than KEK {kek} in service (edited, or another keyring)"
    )]
    MaterialChanged {
        /// The KEK number.
        kek: u32,
    },
    /// A KEK lost epochs, so key_ids it answered to.
    #[error("KEK {kek} lost key_ids it has in service (its promotions were edited)")]
    KeyIdsLost {
        /// The KEK number.
        kek: u32,
    },
    /// The primary in service is gone.
    #[error(
        "KEK {kek}, the primary in service, is gone: promote another KEK and let every plugin load that before retiring it"
    )]
    PrimaryGone {
        /// The KEK number.
        kek: u32,
    },
}

/// Judges whether `candidate` may replace `in_service` (see the module docs).
/// Generations are not compared here: a rollback is the caller's separate
/// question.
pub fn check_successor(in_service: &Listing, candidate: &Listing) -> Result<Dropped, Refusal> {
    match (&in_service.lineage, &candidate.lineage) {
        (Some(a), Some(b)) if a != b => {
            return Err(Refusal::LineageChanged {
                in_service: a.clone(),
                candidate: b.clone(),
            });
        }
        (Some(a), None) => {
            return Err(Refusal::LineageRemoved {
                in_service: a.clone(),
            });
        }
        _ => {}
    }
    let mut dropped = Dropped::default();
    for old in &in_service.keks {
        match candidate.kek(old.kek) {
            Some(new) => {
                if new.fingerprint != old.fingerprint {
                    return Err(Refusal::MaterialChanged { kek: old.kek });
                }
                if !new.key_ids.starts_with(&old.key_ids) {
                    return Err(Refusal::KeyIdsLost { kek: old.kek });
                }
            }
            None if old.kek == in_service.primary => {
                return Err(Refusal::PrimaryGone { kek: old.kek });
            }
            None => {
                dropped.keks.push(old.kek);
                dropped.key_ids.extend(old.key_ids.iter().cloned());
            }
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::KeyringFile;
    use std::path::Path;

    fn listing(f: &KeyringFile) -> Listing {
        Listing::of(f)
    }

    #[test]
    fn edits_made_by_the_tool_are_successors() {
        let mut f = KeyringFile::new_with_primary().unwrap();
        let start = listing(&f);
        f.add(false).unwrap();
        let added = listing(&f);
        assert_eq!(check_successor(&start, &added), Ok(Dropped::default()));
        f.promote(2).unwrap();
        let promoted = listing(&f);
        assert!(check_successor(&added, &promoted).unwrap().is_empty());
        f.retire(1).unwrap();
        let retired = listing(&f);
        let dropped = check_successor(&promoted, &retired).unwrap();
        assert_eq!(dropped.keks, vec![1]);
        assert_eq!(dropped.key_ids, promoted.kek(1).unwrap().key_ids);
        // promote + retire of the primary seen in one step: refused.
        assert_eq!(
            check_successor(&added, &retired),
            Err(Refusal::PrimaryGone { kek: 1 })
        );
    }

    #[test]
    fn another_keyring_is_refused_even_with_a_higher_generation() {
        let ours = KeyringFile::new_with_primary().unwrap();
        let mut theirs = KeyringFile::new_with_primary().unwrap();
        for _ in 0..5 {
            theirs.add(true).unwrap();
        }
        let e = check_successor(&listing(&ours), &listing(&theirs)).unwrap_err();
        assert!(matches!(e, Refusal::LineageChanged { .. }), "{e}");
        assert!(e.to_string().contains(ours.lineage().unwrap()));
    }

    #[test]
    fn edited_material_or_epochs_are_refused() {
        let mut f = KeyringFile::new_with_primary().unwrap();
        f.add(false).unwrap();
        let before = listing(&f);
        let mut v: serde_json::Value = serde_json::from_slice(&f.to_bytes()).unwrap();
        v["generation"] = serde_json::json!(9);
        let mut edited = v.clone();
        edited["keks"][1]["material"] =
            serde_json::json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let edited = KeyringFile::parse(Path::new("k"), edited.to_string().as_bytes()).unwrap();
        assert_eq!(
            check_successor(&before, &listing(&edited)),
            Err(Refusal::MaterialChanged { kek: 2 })
        );
        let mut renumbered = v.clone();
        renumbered["keks"][0]["promotions"] = serde_json::json!([5]);
        let renumbered =
            KeyringFile::parse(Path::new("k"), renumbered.to_string().as_bytes()).unwrap();
        assert_eq!(
            check_successor(&before, &listing(&renumbered)),
            Err(Refusal::KeyIdsLost { kek: 1 })
        );
    }

    #[test]
    fn a_changed_token_reference_or_check_value_is_changed_material() {
        let mut f = KeyringFile::new_with_primary().unwrap();
        f.add_pkcs11(crate::Pkcs11Ref {
            token: "atrest".into(),
            serial: None,
            key_label: "kek".into(),
            id: vec![1],
            check_value: [7; 16],
        })
        .unwrap();
        let before = listing(&f);
        let v: serde_json::Value = serde_json::from_slice(&f.to_bytes()).unwrap();
        for (field, value) in [
            ("check_value", serde_json::json!("08".repeat(16))),
            ("id", serde_json::json!("02")),
            ("token", serde_json::json!("other")),
            ("key_label", serde_json::json!("other")),
        ] {
            let mut edited = v.clone();
            edited["keks"][1]["pkcs11"][field] = value;
            let edited = KeyringFile::parse(Path::new("k"), edited.to_string().as_bytes()).unwrap();
            assert_eq!(
                check_successor(&before, &listing(&edited)),
                Err(Refusal::MaterialChanged { kek: 2 }),
                "{field}"
            );
        }
    }

    #[test]
    fn lineage_may_be_gained_but_not_lost() {
        let mut with = KeyringFile::new_with_primary().unwrap();
        let mut without = KeyringFile::new_with_primary().unwrap();
        without.drop_lineage_for_test();
        let old = listing(&without);
        without.add(false).unwrap(); // gains a lineage
        assert!(check_successor(&old, &listing(&without)).is_ok());
        assert_eq!(
            check_successor(&listing(&without), &old),
            Err(Refusal::LineageRemoved {
                in_service: without.lineage().unwrap().to_owned()
            })
        );
        let l = listing(&with);
        with.add(false).unwrap();
        assert!(check_successor(&l, &listing(&with)).is_ok());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::file::KeyringFile;
    use std::path::Path;

    proptest::proptest! {
        /// Any sequence of edits round-trips through the file format and
        /// every step is a successor of the one before; only retire drops.
        #[test]
        fn every_edit_round_trips_and_is_a_successor(ops in proptest::collection::vec((0u8..4, 1u32..6), 1..12)) {
            let mut f = KeyringFile::new_with_primary().unwrap();
            for (op, n) in ops {
                let before = Listing::of(&f);
                let changed = match op {
                    0 => f.add(true).is_ok(),
                    1 => f.add(false).is_ok(),
                    2 => f.promote(n).is_ok(),
                    _ => f.retire(n).is_ok(),
                };
                let back = KeyringFile::parse(Path::new("k"), &f.to_bytes()).unwrap();
                let after = Listing::of(&back);
                proptest::prop_assert_eq!(&after, &Listing::of(&f));
                let dropped = check_successor(&before, &after).unwrap();
                proptest::prop_assert!(dropped.is_empty() || (op == 3 && changed));
                if changed {
                    proptest::prop_assert_eq!(after.generation, before.generation + 1);
                } else {
                    proptest::prop_assert_eq!(&after, &before);
                }
            }
        }

        /// Whatever bytes are on disk, parsing answers with an error or a
        /// keyring, never a panic.
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = KeyringFile::parse(Path::new("k"), &bytes);
        }
    }
}
