//! Key rotation of an encrypted volume: its data key wrapped again under a new Secret value,
//! in its record and in the records of its snapshots on this node (they hold the same
//! encrypted data). Nothing is re-encrypted; the old Secret value no longer opens any of
//! them. Asked for with ControllerModifyVolume (`strata volume rekey`): the mutable
//! parameter `rekey: "true"` and the secrets `encryptionKey` (current) and
//! `newEncryptionKey`.
//!
//! Each record is rewritten atomically on its own. A rekey cut short (a crash) leaves some
//! records under the new value and some under the old; asked again with the same two, it
//! skips those the new one opens already and finishes the rest.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::encryption::{self, NEW_SECRET_KEY, Passphrase, SECRET_KEY, Secrets, WrappedKey};
use crate::error::{Error, Result};
use crate::ids::{NodeHint, is_volume_id};
use crate::io_limits::PV_NAME_KEY;
use crate::snapshot::Snapshots;
use crate::volumes::Volumes;

/// The mutable parameter that asks for a rekey.
pub const PARAMETER: &str = "rekey";

/// Whether a ControllerModifyVolume's parameters ask for a rekey (then nothing else: the
/// PV name the resizer adds aside).
pub fn requested(parameters: &BTreeMap<String, String>) -> Result<bool> {
    let Some(value) = parameters.get(PARAMETER) else {
        return Ok(false);
    };
    if value != "true" {
        return Err(Error::InvalidArgument(format!(
            "mutable parameter {PARAMETER:?} must be \"true\""
        )));
    }
    if let Some(other) = parameters
        .keys()
        .find(|k| *k != PARAMETER && *k != PV_NAME_KEY)
    {
        return Err(Error::InvalidArgument(format!(
            "a rekey is asked for alone; {} was given with it",
            crate::validate::echo(other)
        )));
    }
    Ok(true)
}

pub struct Rekey {
    volumes: Arc<Volumes>,
    snapshots: Arc<Snapshots>,
    node: NodeHint,
}

/// `wrapped` sealed under `new`: itself when `new` opens it already (a rekey finished
/// before), else opened with `old` and sealed again.
fn rewrapped(
    old: &Passphrase,
    new: &Passphrase,
    wrapped: &WrappedKey,
    what: &str,
) -> Result<Option<WrappedKey>> {
    if encryption::unwrap(new, wrapped, what).is_ok() {
        return Ok(None);
    }
    encryption::rewrap(old, new, wrapped, what).map(Some)
}

impl Rekey {
    pub fn new(volumes: Arc<Volumes>, snapshots: Arc<Snapshots>, node: NodeHint) -> Self {
        Rekey {
            volumes,
            snapshots,
            node,
        }
    }

    /// Wraps volume `id`'s key (and its snapshots') under `newEncryptionKey`.
    pub fn rekey(&self, id: &str, secrets: &Secrets) -> Result<()> {
        crate::validate::required_str("volume_id", id)?;
        let old = secrets.passphrase(SECRET_KEY)?;
        let new = secrets.passphrase(NEW_SECRET_KEY)?;
        if self.volumes.store.get(id).is_none() {
            let hint = is_volume_id(id).then(|| NodeHint::in_id(id)).flatten();
            if let Some(hint) = hint.filter(|h| *h != self.node) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is held by another node (hint {hint:?}); a rekey carries secrets, which are not forwarded: run it against that node's Strata"
                )));
            }
        }
        let _guard = self.volumes.guard(id)?;
        let mut record = self.volumes.get(id)?;
        let Some(wrapped) = record.encryption.clone() else {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is not encrypted: there is no key to rotate"
            )));
        };
        // The volume's key is checked first: a wrong current value changes nothing.
        let volume_key = rewrapped(&old, &new, &wrapped, &format!("volume {id}"))?;
        let mut done = 0;
        for snap in self.snapshots.store.filter(|s| s.source_volume_id == id) {
            let Some(key) = &snap.encryption else {
                continue;
            };
            // Pinned while it is rewritten: a DeleteSnapshot waits.
            let (mut snap, _pin) = self.snapshots.pin(&snap.id)?;
            let what = format!("snapshot {}", snap.id);
            if let Some(key) = rewrapped(&old, &new, key, &what)? {
                snap.encryption = Some(key);
                self.snapshots.store.update(snap)?;
                done += 1;
            }
        }
        if let Some(key) = volume_key {
            record.encryption = Some(key);
            self.volumes.store.update(record)?;
        }
        tracing::info!(volume_id = %id, snapshots = done, "volume key wrapped under the new secret");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{create_volume, fixture, secrets};

    #[test]
    fn a_rekey_rewraps_the_volume_and_its_snapshots_and_can_be_finished() {
        let f = fixture();
        let d = &f.driver;
        let id = create_volume(
            d,
            "enc",
            &[("encrypted", "true")],
            secrets(&[(SECRET_KEY, "a")]),
        )
        .unwrap();
        let snap = d.snapshots.create_snapshot("s", &id).unwrap();
        let pass = |v: &str| secrets(&[(SECRET_KEY, v)]).passphrase(SECRET_KEY).unwrap();
        let opens = |v: &str| {
            let vol = d.volumes.store.get(&id).unwrap().encryption.unwrap();
            let s = d.snapshots.store.get(&snap.id).unwrap().encryption.unwrap();
            (
                encryption::unwrap(&pass(v), &vol, "v").is_ok(),
                encryption::unwrap(&pass(v), &s, "s").is_ok(),
            )
        };
        assert_eq!(opens("a"), (true, true));

        // A wrong current value, or no new one: nothing changes.
        for bad in [
            secrets(&[(SECRET_KEY, "x"), (NEW_SECRET_KEY, "b")]),
            secrets(&[(SECRET_KEY, "a")]),
        ] {
            let e = d.rekey.rekey(&id, &bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            assert_eq!(opens("a"), (true, true));
        }
        let both = secrets(&[(SECRET_KEY, "a"), (NEW_SECRET_KEY, "b")]);
        d.rekey.rekey(&id, &both).unwrap();
        assert_eq!(opens("b"), (true, true));
        assert_eq!(opens("a"), (false, false));
        // Asked again (a retry after a crash): done already, still fine.
        d.rekey.rekey(&id, &both).unwrap();
        assert_eq!(opens("b"), (true, true));
        // Cut short by a crash after the snapshots and before the volume (each record is
        // rewritten on its own): the snapshot opens with the new value, the volume with the
        // old; asked again with the same two, it finishes.
        let back_to_c = secrets(&[(SECRET_KEY, "b"), (NEW_SECRET_KEY, "c")]);
        let mut s = d.snapshots.store.get(&snap.id).unwrap();
        s.encryption = Some(
            encryption::rewrap(&pass("b"), &pass("c"), s.encryption.as_ref().unwrap(), "s")
                .unwrap(),
        );
        d.snapshots.store.update(s).unwrap();
        assert_eq!(opens("c"), (false, true));
        d.rekey.rekey(&id, &back_to_c).unwrap();
        assert_eq!(opens("c"), (true, true));

        // Not encrypted, unknown, or another node's: the right codes.
        let plain = create_volume(d, "plain", &[], Secrets::default()).unwrap();
        let e = d.rekey.rekey(&plain, &both).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        let e = d
            .rekey
            .rekey("vol-0123456789abcdef01234567", &both)
            .unwrap_err();
        assert!(
            matches!(e, Error::NotFound(_) | Error::FailedPrecondition(_)),
            "{e:?}"
        );
    }

    #[test]
    fn a_rekey_is_asked_for_alone() {
        let p = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(!requested(&p(&[("maxReadIOPS", "5")])).unwrap());
        assert!(requested(&p(&[(PARAMETER, "true")])).unwrap());
        assert!(requested(&p(&[(PARAMETER, "true"), (PV_NAME_KEY, "pv-1")])).unwrap());
        assert!(requested(&p(&[(PARAMETER, "yes")])).is_err());
        assert!(requested(&p(&[(PARAMETER, "true"), ("maxReadIOPS", "5")])).is_err());
    }
}
