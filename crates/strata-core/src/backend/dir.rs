//! The dir backend: a plain directory per volume, like the reference hostpath driver. Sizes
//! are advertised, not enforced (a volume can fill the pool); snapshots and clones copy the
//! tree, sharing extents file by file where the pool's filesystem can.

use std::fs;
use std::path::{Path, PathBuf};

use super::tree::{self, data_dir};
use super::{Attachment, Backend};
use crate::error::{IoContext, Result};
use crate::model::{CopyMethod, GIB, MIB, SizePolicy};
use crate::os::{FsUsage, Host};

pub struct DirBackend {
    pool: PathBuf,
    host: Host,
}

impl DirBackend {
    pub fn new(pool: PathBuf, host: Host) -> Self {
        tracing::warn!(pool = %pool.display(),
            "dir backend: volume sizes are advertised but not enforced; a volume can fill the pool");
        DirBackend { pool, host }
    }
}

impl Backend for DirBackend {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn size_policy(&self) -> SizePolicy {
        SizePolicy {
            granularity: MIB,
            minimum: MIB,
            default: GIB,
            maximum: u64::MAX / 2,
        }
    }

    fn supports_block(&self) -> bool {
        false
    }

    fn serves_directories(&self) -> bool {
        true
    }

    fn pool_usage(&self) -> Result<FsUsage> {
        self.host.filesystems.usage(&self.pool)
    }

    fn create(&self, dir: &Path, _size: u64) -> Result<()> {
        let path = data_dir(dir);
        fs::create_dir(&path).ctx(|| format!("create {}", path.display()))
    }

    fn repair(&self, _dir: &Path, _capacity: u64, _holds_data: bool) -> Result<Option<String>> {
        Ok(None)
    }

    fn usage(&self, dir: &Path, capacity_bytes: u64) -> Result<Option<FsUsage>> {
        let pool = self.host.filesystems.usage(&self.pool)?;
        let used = tree::allocated_bytes(&data_dir(dir))?;
        Ok(Some(FsUsage {
            total_bytes: capacity_bytes,
            used_bytes: used,
            available_bytes: capacity_bytes
                .saturating_sub(used)
                .min(pool.available_bytes),
            ..pool
        }))
    }

    fn copy_from(
        &self,
        source_dir: &Path,
        dir: &Path,
        _size: u64,
        _snapshot: bool,
    ) -> Result<CopyMethod> {
        tree::copy_tree(
            self.host.filesystems.as_ref(),
            &data_dir(source_dir),
            &data_dir(dir),
        )
    }

    fn expand(&self, _dir: &Path, _size: u64) -> Result<()> {
        Ok(())
    }

    fn destroy(&self, dir: &Path) -> Result<()> {
        tree::remove(&data_dir(dir))
    }

    fn condition(&self, dir: &Path, _capacity_bytes: u64) -> Option<String> {
        tree::condition(dir)
    }

    fn has_data(&self, _dir: &Path) -> Result<bool> {
        Ok(true)
    }

    fn attachment(&self, dir: &Path) -> Result<Option<Attachment>> {
        tree::attachment(&self.host, dir)
    }

    fn attach(&self, dir: &Path) -> Result<Attachment> {
        Ok(Attachment::Directory(tree::locate(&self.host, dir)?))
    }

    fn release_on_unmount(&self, _attachment: &Attachment) -> Result<()> {
        Ok(())
    }

    fn detach(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}
