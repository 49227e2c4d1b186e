//! Directory backends (dir, btrfs): a volume is a directory of the pool's filesystem,
//! bind-mounted where it is used. [`DirectoryBackend`] implements [`Backend`] once; a
//! [`DirectoryKind`] says how the directory is made, copied, limited and measured.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Attached, Attachment, Backend, DataDir};
use crate::error::{Error, IoContext, Result};
use crate::model::{CopyMethod, GIB, MIB, SizePolicy};
use crate::os::{FsUsage, Host};

/// What differs between directory backends. Every path is the volume's data directory.
pub trait DirectoryKind: Send + Sync {
    fn kind(&self) -> &'static str;
    fn minimum_size(&self) -> u64;
    fn create(&self, data: &Path, size: u64) -> Result<()>;
    fn destroy(&self, data: &Path) -> Result<()>;
    /// Whether one copy of a volume is atomic (a point in time of that volume).
    fn atomic_copies(&self) -> bool;
    /// Copies `source` into the new `data`; `snapshot` keeps it read-only where possible.
    fn copy(
        &self,
        host: &Host,
        source: &Path,
        data: &Path,
        size: u64,
        snapshot: bool,
    ) -> Result<CopyMethod>;
    /// Applies a new size; a no-op where sizes are not enforced.
    fn resize(&self, data: &Path, size: u64) -> Result<()>;
    /// Bytes used and the enforced limit, if any.
    fn used(&self, data: &Path) -> Result<(u64, Option<u64>)>;
}

pub struct DirectoryBackend<K> {
    pool: PathBuf,
    host: Host,
    kind: K,
}

impl<K: DirectoryKind> DirectoryBackend<K> {
    pub fn new(pool: PathBuf, host: Host, kind: K) -> Self {
        DirectoryBackend { pool, host, kind }
    }
}

impl<K: DirectoryKind> Backend for DirectoryBackend<K> {
    fn kind(&self) -> &'static str {
        self.kind.kind()
    }

    fn size_policy(&self) -> SizePolicy {
        SizePolicy {
            granularity: MIB,
            minimum: self.kind.minimum_size(),
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

    /// The pool's filesystem is shared with everything else on it and cannot be frozen, so
    /// at best one volume's atomic copy.
    fn group_consistency(&self) -> super::GroupConsistency {
        if self.kind.atomic_copies() {
            super::GroupConsistency::OneVolume
        } else {
            super::GroupConsistency::None
        }
    }

    fn pool_usage(&self) -> Result<FsUsage> {
        Ok(self.host.filesystems.usage(&self.pool)?)
    }

    fn create(&self, dir: &Path, size: u64) -> Result<()> {
        self.kind.create(&data_dir(dir), size)
    }

    /// A lost data directory cannot be told apart from one that held data: not repaired,
    /// reported by the volume condition instead.
    fn repair(&self, _dir: &Path, _capacity: u64, _holds_data: bool) -> Result<Option<String>> {
        Ok(None)
    }

    fn usage(&self, dir: &Path, capacity_bytes: u64) -> Result<Option<FsUsage>> {
        let pool = self.host.filesystems.usage(&self.pool)?;
        let (used, limit) = self.kind.used(&data_dir(dir))?;
        let total = limit.unwrap_or(capacity_bytes);
        Ok(Some(FsUsage {
            total_bytes: total,
            used_bytes: used,
            available_bytes: total.saturating_sub(used).min(pool.available_bytes),
            ..pool
        }))
    }

    fn copy_from(
        &self,
        source_dir: &Path,
        dir: &Path,
        size: u64,
        snapshot: bool,
    ) -> Result<CopyMethod> {
        self.kind.copy(
            &self.host,
            &data_dir(source_dir),
            &data_dir(dir),
            size,
            snapshot,
        )
    }

    fn expand(&self, dir: &Path, size: u64) -> Result<()> {
        self.kind.resize(&data_dir(dir), size)
    }

    fn open_tree(&self, dir: &Path) -> Result<std::fs::File> {
        open_data_dir(&data_dir(dir))
    }

    fn import_tree(&self, dir: &Path, size: u64) -> Result<std::fs::File> {
        let data = data_dir(dir);
        self.kind.create(&data, size)?;
        open_data_dir(&data)
    }

    fn destroy(&self, dir: &Path) -> Result<()> {
        let data = data_dir(dir);
        if !data.exists() {
            return Ok(());
        }
        self.kind.destroy(&data)
    }

    fn condition(&self, dir: &Path, _capacity_bytes: u64) -> Option<String> {
        condition(dir)
    }

    fn has_data(&self, _dir: &Path) -> Result<bool> {
        Ok(true)
    }

    fn attachment(&self, dir: &Path) -> Result<Option<Attachment>> {
        attachment(&self.host, dir)
    }

    fn attach(&self, dir: &Path, _for_mount: bool) -> Result<Attached> {
        Ok(Attached {
            attachment: Attachment::Directory(locate(&self.host, dir)?),
            held: None,
        })
    }

    fn release_on_unmount(&self, _attached: &Attached) -> Result<()> {
        Ok(())
    }

    fn detach(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The folder inside a volume's directory that holds its files.
pub const DATA_DIR: &str = "data";

fn data_dir(dir: &Path) -> PathBuf {
    dir.join(DATA_DIR)
}

/// The data directory as a bind source, located in the mount table.
fn locate(host: &Host, dir: &Path) -> Result<DataDir> {
    let path = data_dir(dir);
    let (device, root) = host.locate(&path)?;
    Ok(DataDir { path, device, root })
}

/// The attachment if any mount of the data directory exists (it is staged or published).
fn attachment(host: &Host, dir: &Path) -> Result<Option<Attachment>> {
    if !data_dir(dir).exists() {
        return Ok(None);
    }
    let d = locate(host, dir)?;
    let mounted = host
        .mounter
        .mounts()?
        .iter()
        .any(|m| m.device() == d.device && m.root == d.root);
    Ok(mounted.then_some(Attachment::Directory(d)))
}

fn condition(dir: &Path) -> Option<String> {
    let path = data_dir(dir);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!("{} is not a directory", path.display())),
        Err(e) => Some(format!(
            "data directory {} is unusable: {e}",
            path.display()
        )),
    }
}

/// A data directory opened as itself (a symlink in its place is refused, not followed).
fn open_data_dir(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("open {}", path.display()))
}

/// Bytes allocated under `path` (like `du`).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    let meta = fs::symlink_metadata(path).ctx(|| format!("stat {}", path.display()))?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).ctx(|| format!("list {}", path.display()))? {
            let entry = entry.ctx(|| format!("list {}", path.display()))?;
            total += allocated_bytes(&entry.path())?;
        }
    }
    Ok(total)
}

/// Removes a data directory tree. Idempotent.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::Filesystems;
    use crate::os::linux::LinuxHost;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn trees_are_copied_with_links_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/file"), b"payload").unwrap();
        fs::set_permissions(src.join("a/b/file"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("b/file", src.join("a/link")).unwrap();
        let dst = tmp.path().join("dst");
        LinuxHost.copy_tree(&src, &dst).unwrap();
        assert_eq!(fs::read(dst.join("a/b/file")).unwrap(), b"payload");
        assert_eq!(fs::read(dst.join("a/link")).unwrap(), b"payload");
        let mode = fs::metadata(dst.join("a/b/file")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(allocated_bytes(&dst).unwrap() > 0);
    }
}
