//! The btrfs backend: a subvolume per volume, its size enforced by a qgroup limit; snapshots
//! are read-only subvolume snapshots and clones writable ones, both O(1) and atomic. Every
//! btrfs operation goes through [`crate::os::btrfs::Btrfs`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::directory::{self, DirectoryBackend, DirectoryKind};
use crate::error::{Error, Result};
use crate::model::{CopyMethod, MIB};
use crate::os::Host;
use crate::os::btrfs::Btrfs;

pub struct Subvolumes {
    btrfs: Arc<dyn Btrfs>,
}

pub type BtrfsBackend = DirectoryBackend<Subvolumes>;

/// Checks that the pool is on btrfs and turns quotas on (idempotent).
pub fn btrfs_backend(pool: PathBuf, host: Host) -> Result<BtrfsBackend> {
    let btrfs = host.btrfs.clone();
    if !btrfs.is_btrfs(&pool)? {
        return Err(Error::FailedPrecondition(format!(
            "{} is not on a btrfs filesystem; the btrfs backend needs one",
            pool.display()
        )));
    }
    btrfs.enable_quota(&pool)?;
    Ok(DirectoryBackend::new(pool, host, Subvolumes { btrfs }))
}

impl DirectoryKind for Subvolumes {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn minimum_size(&self) -> u64 {
        16 * MIB
    }

    fn create(&self, data: &Path, size: u64) -> Result<()> {
        self.btrfs.create_subvolume(data)?;
        self.resize(data, size)
    }

    /// A subvolume snapshot is atomic.
    fn atomic_copies(&self) -> bool {
        true
    }

    fn destroy(&self, data: &Path) -> Result<()> {
        self.btrfs
            .delete_subvolume(data)
            // Not a subvolume (a creation cut short before it was made): a plain directory.
            .or_else(|_| directory::remove(data))
    }

    fn copy(
        &self,
        _host: &Host,
        source: &Path,
        data: &Path,
        size: u64,
        snapshot: bool,
    ) -> Result<CopyMethod> {
        self.btrfs.snapshot(source, data, snapshot)?;
        if !snapshot {
            self.resize(data, size)?;
        }
        Ok(CopyMethod::Reflink)
    }

    fn resize(&self, data: &Path, size: u64) -> Result<()> {
        Ok(self.btrfs.set_limit(data, size)?)
    }

    fn used(&self, data: &Path) -> Result<(u64, Option<u64>)> {
        Ok(self.btrfs.usage(data)?)
    }
}
