//! Durable writes: a file replaced atomically (temp file, fsync, rename, fsync of the
//! directory), a directory's entries made durable, and [`GroupCommit`], which lets
//! concurrent renames in one directory share that directory's fsync.

mod group_commit;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{IoContext, Result};

pub use group_commit::GroupCommit;

/// Writes `bytes` to `dir/name` so that after a crash the file holds either the old or the
/// new content, never a mix.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx(|| format!("create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .ctx(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, &target).ctx(|| format!("rename {} into place", tmp.display()))?;
    sync_dir(dir)
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("sync directory {}", dir.display()))
}
