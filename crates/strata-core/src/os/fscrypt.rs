//! The kernel's filesystem encryption (fscrypt, v2 policies): master keys added to and
//! removed from a mounted filesystem, and the policy of a directory. Every operation acts on
//! an opened mount root ([`NodePath`]) and on a child of it opened without following
//! symlinks; errors carry the kernel's errno for the core to judge.

use super::NodePath;
use crate::host_error::Result;

/// An fscrypt master key's identifier (what a v2 policy names).
pub type KeyId = [u8; 16];

pub trait Fscrypt: Send + Sync {
    /// Adds the master key `key` to the filesystem whose root `root` is (idempotent: the
    /// same key again is counted once per user); its identifier.
    fn add_key(&self, root: &NodePath, key: &[u8]) -> Result<KeyId>;
    /// Removes key `id` from the filesystem at `root`; files still open keep their key
    /// until closed (the kernel's rule).
    fn remove_key(&self, root: &NodePath, id: &KeyId) -> Result<()>;
    /// The key of the v2 policy on the directory `name` in `root`: `None` when the
    /// directory is missing or not encrypted.
    fn policy(&self, root: &NodePath, name: &str) -> Result<Option<KeyId>>;
    /// Creates the directory `name` in `root` when missing (mode 0755, never through a
    /// symlink) and gives it the v2 policy of key `id`; nothing when it has that policy
    /// already. EEXIST: it has another; ENOTEMPTY: it holds unencrypted files.
    fn encrypt_dir(&self, root: &NodePath, name: &str, id: &KeyId) -> Result<()>;
}
