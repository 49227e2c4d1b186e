//! Encrypted volumes on the node: the volume's key added to its staged filesystem and the
//! data directory encrypted with it (stage), that directory handed to publishes, and the key
//! removed again (unstage). The filesystem's root cannot carry an fscrypt policy (ext4 keeps
//! `lost+found` there), so an encrypted volume's files live in [`DATA_DIR`] and publishes
//! bind that directory: the pod sees it as the volume's root.

use std::sync::Arc;

use crate::encryption::DataKey;
use crate::error::{Error, Result};
use crate::os::fscrypt::Fscrypt;
use crate::os::{Create, Mounter, NodePath};
use crate::paths::CheckedPath;
use crate::validate::bounded_display;

/// The encrypted directory in an encrypted volume's filesystem.
pub const DATA_DIR: &str = "volume";

pub(crate) struct VolumeKeys {
    fscrypt: Arc<dyn Fscrypt>,
    mounter: Arc<dyn Mounter>,
}

impl VolumeKeys {
    pub(crate) fn new(fscrypt: Arc<dyn Fscrypt>, mounter: Arc<dyn Mounter>) -> Self {
        VolumeKeys { fscrypt, mounter }
    }

    /// Adds `key` to the filesystem staged at `root` (its mount root, opened) and makes sure
    /// [`DATA_DIR`] is encrypted with it: set on the first stage, checked on the next ones.
    pub(crate) fn unlock(&self, volume_id: &str, root: &NodePath, key: &DataKey) -> Result<()> {
        let id = self.fscrypt.add_key(root, key.bytes()).map_err(|e| {
            Error::Internal(format!(
                "could not add volume {volume_id}'s key to its filesystem: {e}"
            ))
        })?;
        self.fscrypt
            .encrypt_dir(root, DATA_DIR, &id)
            .map_err(|e| match e.errno() {
                Some(libc::EEXIST) => Error::FailedPrecondition(format!(
                    "volume {volume_id}'s data directory is encrypted with another key than its record holds; it is left untouched"
                )),
                Some(libc::ENOTEMPTY) => Error::FailedPrecondition(format!(
                    "volume {volume_id}'s data directory holds unencrypted files; it is left untouched"
                )),
                _ => Error::Internal(format!(
                    "could not encrypt volume {volume_id}'s data directory: {e}"
                )),
            })?;
        tracing::info!(volume_id, "volume key added to its filesystem");
        Ok(())
    }

    /// The encrypted data directory of the filesystem staged at `staged` (its mount root,
    /// opened), for a publish to bind.
    pub(crate) fn data_dir(
        &self,
        volume_id: &str,
        staged: &NodePath,
        staging: &CheckedPath,
    ) -> Result<NodePath> {
        let prefix = staged.kernel_path();
        let mut dir = self
            .mounter
            .open_path(&prefix, &prefix.join(DATA_DIR), Create::Nothing)?
            .filter(|d| d.is_dir)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "volume {volume_id} is encrypted and {} has no data directory: call NodeStageVolume (with its secret) first",
                    bounded_display(&staging.path)
                ))
            })?;
        dir.path = staging.path.join(DATA_DIR);
        Ok(dir)
    }

    /// Removes the volume's key from the filesystem staged at `root` before it is
    /// unmounted (the unmount would drop it too: a failure is logged, not fatal).
    pub(crate) fn lock(&self, volume_id: &str, root: &NodePath) {
        let removed = self.fscrypt.policy(root, DATA_DIR).and_then(|id| match id {
            Some(id) => self.fscrypt.remove_key(root, &id),
            None => Ok(()),
        });
        match removed {
            Ok(()) => tracing::info!(volume_id, "volume key removed from its filesystem"),
            Err(e) => tracing::warn!(volume_id, error = %e,
                "could not remove the volume's key before unmounting; the unmount drops it"),
        }
    }
}
