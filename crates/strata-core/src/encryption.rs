//! Encryption at rest for ext4 filesystem volumes (fscrypt, v2 policies).
//!
//! Each encrypted volume has a random 64-byte data key: the fscrypt master key its files are
//! encrypted with. The key is stored only wrapped, in the volume's record (and in the records
//! of its snapshots and of the volumes restored or cloned from it, which hold the same
//! encrypted data): sealed with ChaCha20-Poly1305 under a key derived (HKDF-SHA256, a random
//! salt per wrap) from the `encryptionKey` of a Kubernetes Secret, which the CSI calls carry
//! as secrets. NodeStageVolume unwraps it and adds it to the mounted filesystem; unstage
//! removes it. Key material lives in [`zeroize`]d buffers, has no `Debug` that shows it, and
//! never appears in an error message or a log.

use std::collections::BTreeMap;
use std::fmt;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The StorageClass parameter that asks for encryption (`"true"` or `"false"`).
pub const PARAMETER: &str = "encrypted";
/// The secret key whose value wraps the volume keys.
pub const SECRET_KEY: &str = "encryptionKey";
/// The secret key a rekey takes the new value from (ControllerModifyVolume).
pub const NEW_SECRET_KEY: &str = "newEncryptionKey";
/// The shortest `encryptionKey` accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// The longest, so a mistaken Secret (a whole file) is refused rather than hashed.
pub const MAX_SECRET_BYTES: usize = 4096;
/// An fscrypt master key: 64 bytes, as AES-256-XTS takes them.
pub const DATA_KEY_BYTES: usize = 64;

const SALT_BYTES: usize = 16;
const NONCE_BYTES: usize = 12;
const SEALED_BYTES: usize = DATA_KEY_BYTES + 16;
const WRAP_INFO: &[u8] = b"strata fscrypt volume key wrap v1";
const WRAP_AAD: &[u8] = b"strata volume key v1";
const WIRE_PREFIX: &str = "v1.";

/// The secrets of a CSI call. Values are zeroed when dropped and never printed: `Debug`
/// shows the keys only.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<String, Zeroizing<String>>);

impl Secrets {
    pub fn new(map: impl IntoIterator<Item = (String, String)>) -> Self {
        Secrets(
            map.into_iter()
                .map(|(k, v)| (k, Zeroizing::new(v)))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    /// The passphrase under `key`, checked for presence and length; the messages name the
    /// key, never the value.
    pub fn passphrase(&self, key: &str) -> Result<Passphrase> {
        let value = self.get(key).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the secret {key:?} is missing: an encrypted volume needs the Secret that holds it \
                 (StorageClass csi.storage.k8s.io/provisioner-secret-name and \
                 node-stage-secret-name, with their namespaces)"
            ))
        })?;
        if value.len() < MIN_SECRET_BYTES || value.len() > MAX_SECRET_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the secret {key:?} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes \
                 (for example `openssl rand -base64 48`)"
            )));
        }
        Ok(Passphrase(Zeroizing::new(value.as_bytes().to_vec())))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The value of a Secret's `encryptionKey`: what wraps volume keys.
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// A volume's fscrypt master key, in the clear.
pub struct DataKey(Zeroizing<[u8; DATA_KEY_BYTES]>);

impl DataKey {
    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A data key sealed under a passphrase: safe to store and to send to another node.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WrappedKey {
    salt: [u8; SALT_BYTES],
    nonce: [u8; NONCE_BYTES],
    sealed: [u8; SEALED_BYTES],
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappedKey(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    // Lowercase digits only, so every key has one written form (what `hex` writes).
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let mut out = [0u8; N];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

impl WrappedKey {
    /// The stored and wire form: `v1.SALT.NONCE.SEALED`, in hex.
    pub fn to_wire(&self) -> String {
        format!(
            "{WIRE_PREFIX}{}.{}.{}",
            hex(&self.salt),
            hex(&self.nonce),
            hex(&self.sealed)
        )
    }

    /// Parses [`Self::to_wire`]'s form (from a record or a peer: bounded, exact lengths).
    pub fn from_wire(text: &str) -> Result<WrappedKey> {
        let bad = || Error::Internal("a wrapped volume key is malformed".into());
        if text.len() > 512 {
            return Err(bad());
        }
        let rest = text.strip_prefix(WIRE_PREFIX).ok_or_else(bad)?;
        let mut parts = rest.split('.');
        let (Some(salt), Some(nonce), Some(sealed), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(WrappedKey {
            salt: unhex(salt).ok_or_else(bad)?,
            nonce: unhex(nonce).ok_or_else(bad)?,
            sealed: unhex(sealed).ok_or_else(bad)?,
        })
    }
}

impl TryFrom<String> for WrappedKey {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        WrappedKey::from_wire(&text).map_err(|e| e.to_string())
    }
}

impl From<WrappedKey> for String {
    fn from(key: WrappedKey) -> String {
        key.to_wire()
    }
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::Internal("the system's random source failed".into()))?;
    Ok(out)
}

/// The sealing key for `salt` under `pass`.
fn kek(pass: &Passphrase, salt: &[u8; SALT_BYTES]) -> Result<LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&pass.0);
    let okm = prk
        .expand(&[WRAP_INFO], &aead::CHACHA20_POLY1305)
        .map_err(|_| Error::Internal("key derivation failed".into()))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Seals `key` under `pass` with a fresh salt and nonce.
fn wrap(pass: &Passphrase, key: &DataKey) -> Result<WrappedKey> {
    let salt = random::<SALT_BYTES>()?;
    let nonce = random::<NONCE_BYTES>()?;
    let mut in_out = Zeroizing::new(key.bytes().to_vec());
    kek(pass, &salt)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(WRAP_AAD),
            &mut *in_out,
        )
        .map_err(|_| Error::Internal("sealing a volume key failed".into()))?;
    let mut sealed = [0u8; SEALED_BYTES];
    sealed.copy_from_slice(&in_out);
    Ok(WrappedKey {
        salt,
        nonce,
        sealed,
    })
}

/// A new random data key and its wrapped form.
pub fn new_key(pass: &Passphrase) -> Result<(DataKey, WrappedKey)> {
    let key = DataKey(Zeroizing::new(random::<DATA_KEY_BYTES>()?));
    let wrapped = wrap(pass, &key)?;
    Ok((key, wrapped))
}

/// Opens `wrapped` with `pass`. A passphrase that does not open it is the caller's mistake:
/// INVALID_ARGUMENT naming `what`, never the secret.
pub fn unwrap(pass: &Passphrase, wrapped: &WrappedKey, what: &str) -> Result<DataKey> {
    let mut in_out = Zeroizing::new(wrapped.sealed.to_vec());
    let opened = kek(pass, &wrapped.salt)?
        .open_in_place(
            Nonce::assume_unique_for_key(wrapped.nonce),
            Aad::from(WRAP_AAD),
            &mut in_out,
        )
        .map_err(|_| {
            Error::InvalidArgument(format!(
                "the secret's {SECRET_KEY} does not open the key of {what}: give the Secret it was \
                 created with (or the one it was last rekeyed to)"
            ))
        })?;
    let mut key = Zeroizing::new([0u8; DATA_KEY_BYTES]);
    key.copy_from_slice(opened);
    Ok(DataKey(key))
}

/// `wrapped` opened with `old` and sealed again under `new`: the data key, and so the
/// data, stay the same.
pub fn rewrap(
    old: &Passphrase,
    new: &Passphrase,
    wrapped: &WrappedKey,
    what: &str,
) -> Result<WrappedKey> {
    let key = unwrap(old, wrapped, what)?;
    wrap(new, &key)
}

/// Whether `parameters` ask for encryption.
pub fn requested(parameters: &BTreeMap<String, String>) -> Result<bool> {
    match parameters.get(PARAMETER).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(Error::InvalidArgument(format!(
            "parameter {PARAMETER:?} must be \"true\" or \"false\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(text: &str) -> Passphrase {
        Secrets::new([(SECRET_KEY.to_owned(), text.to_owned())])
            .passphrase(SECRET_KEY)
            .unwrap()
    }

    const A: &str = "a passphrase of at least thirty-two bytes";
    const B: &str = "another passphrase, also thirty-two bytes or more";

    #[test]
    fn a_wrapped_key_opens_only_with_its_passphrase() {
        let (key, wrapped) = new_key(&pass(A)).unwrap();
        assert_eq!(
            unwrap(&pass(A), &wrapped, "v").unwrap().bytes(),
            key.bytes()
        );
        let e = unwrap(&pass(B), &wrapped, "volume v").unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(!e.to_string().contains(B) && !e.to_string().contains(A));
        // Two wraps of one key differ (fresh salt and nonce).
        let again = wrap(&pass(A), &key).unwrap();
        assert_ne!(again, wrapped);
        // Rekeyed: the same data key, opened only with the new passphrase.
        let rekeyed = rewrap(&pass(A), &pass(B), &wrapped, "v").unwrap();
        assert_eq!(
            unwrap(&pass(B), &rekeyed, "v").unwrap().bytes(),
            key.bytes()
        );
        assert!(unwrap(&pass(A), &rekeyed, "v").is_err());
        assert!(rewrap(&pass(B), &pass(A), &wrapped, "v").is_err());
    }

    #[test]
    fn a_tampered_key_does_not_open() {
        let (_, wrapped) = new_key(&pass(A)).unwrap();
        let mut wire = wrapped.to_wire().into_bytes();
        let last = wire.len() - 1;
        wire[last] = if wire[last] == b'0' { b'1' } else { b'0' };
        let tampered = WrappedKey::from_wire(std::str::from_utf8(&wire).unwrap()).unwrap();
        assert!(unwrap(&pass(A), &tampered, "v").is_err());
    }

    #[test]
    fn the_wire_form_round_trips_and_refuses_anything_else() {
        let (_, wrapped) = new_key(&pass(A)).unwrap();
        let wire = wrapped.to_wire();
        assert_eq!(WrappedKey::from_wire(&wire).unwrap(), wrapped);
        let json = serde_json::to_string(&wrapped).unwrap();
        assert_eq!(json, format!("\"{wire}\""));
        assert_eq!(serde_json::from_str::<WrappedKey>(&json).unwrap(), wrapped);
        for bad in [
            "",
            "v1.",
            "v2.00.00.00",
            &wire[..wire.len() - 2],
            &format!("{wire}.00"),
            &wire.replace('.', ":"),
            &"v1.".repeat(400),
            &format!("{}zz", &wire[..wire.len() - 2]),
            &format!("{}AB", &wire[..wire.len() - 2]),
            &format!("{}+f", &wire[..wire.len() - 2]),
        ] {
            assert!(WrappedKey::from_wire(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format!("{wrapped:?}"), "WrappedKey(..)");
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        let s = Secrets::new([(SECRET_KEY.to_owned(), "short".to_owned())]);
        let e = s.passphrase(SECRET_KEY).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(!e.to_string().contains("short"));
        assert!(!format!("{s:?}").contains("short"));
        assert!(format!("{s:?}").contains(SECRET_KEY));
        let e = Secrets::default().passphrase(SECRET_KEY).unwrap_err();
        assert!(e.to_string().contains("node-stage-secret-name"), "{e}");
        let long = "x".repeat(MAX_SECRET_BYTES + 1);
        assert!(
            Secrets::new([(SECRET_KEY.to_owned(), long)])
                .passphrase(SECRET_KEY)
                .is_err()
        );
        assert_eq!(format!("{:?}", pass(A)), "Passphrase(..)");
    }

    #[test]
    fn the_parameter_is_true_or_false() {
        let p = |v: &str| BTreeMap::from([(PARAMETER.to_owned(), v.to_owned())]);
        assert!(!requested(&BTreeMap::new()).unwrap());
        assert!(!requested(&p("false")).unwrap());
        assert!(requested(&p("true")).unwrap());
        assert!(requested(&p("yes")).is_err());
    }
}
