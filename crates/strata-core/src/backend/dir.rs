//! The dir backend: a plain directory per volume, like the reference hostpath driver. Sizes
//! are advertised, not enforced (a volume can fill the pool); snapshots and clones copy the
//! tree, sharing extents file by file where the pool's filesystem can.

use std::fs;
use std::path::{Path, PathBuf};

use super::directory::{self, DirectoryBackend, DirectoryKind};
use crate::error::{IoContext, Result};
use crate::model::{CopyMethod, MIB};
use crate::os::Host;

pub struct PlainDirectories;

pub type DirBackend = DirectoryBackend<PlainDirectories>;

pub fn dir_backend(pool: PathBuf, host: Host) -> DirBackend {
    tracing::warn!(pool = %pool.display(),
        "dir backend: volume sizes are advertised but not enforced; a volume can fill the pool");
    DirectoryBackend::new(pool, host, PlainDirectories)
}

impl DirectoryKind for PlainDirectories {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn minimum_size(&self) -> u64 {
        MIB
    }

    fn create(&self, data: &Path, _size: u64) -> Result<()> {
        fs::create_dir(data).ctx(|| format!("create {}", data.display()))
    }

    /// Files are copied one by one while the workload may write.
    fn atomic_copies(&self) -> bool {
        false
    }

    fn destroy(&self, data: &Path) -> Result<()> {
        directory::remove(data)
    }

    fn copy(
        &self,
        host: &Host,
        source: &Path,
        data: &Path,
        _size: u64,
        _snapshot: bool,
    ) -> Result<CopyMethod> {
        Ok(host.filesystems.copy_tree(source, data)?)
    }

    fn resize(&self, _data: &Path, _size: u64) -> Result<()> {
        Ok(())
    }

    fn used(&self, data: &Path) -> Result<(u64, Option<u64>)> {
        Ok((directory::allocated_bytes(data)?, None))
    }
}
