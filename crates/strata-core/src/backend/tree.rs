//! What the directory backends (dir, btrfs) share: the data directory inside a volume's
//! folder, its attachment as the mount table sees it, and a tree copy that shares extents
//! file by file where the filesystem can.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use super::{Attachment, DataDir};
use crate::error::{Error, IoContext, Result};
use crate::model::CopyMethod;
use crate::os::{Filesystems, Host};

/// The folder inside a volume's directory that holds its files.
pub const DATA_DIR: &str = "data";

pub fn data_dir(dir: &Path) -> PathBuf {
    dir.join(DATA_DIR)
}

/// The data directory as a bind source, located in the mount table.
pub fn locate(host: &Host, dir: &Path) -> Result<DataDir> {
    let path = data_dir(dir);
    let (device, root) = host.locate(&path)?;
    Ok(DataDir { path, device, root })
}

/// The attachment if any mount of the data directory exists (it is staged or published).
pub fn attachment(host: &Host, dir: &Path) -> Result<Option<Attachment>> {
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

pub fn condition(dir: &Path) -> Option<String> {
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

/// Copies the tree at `src` to the new directory `dst` (which must not exist), keeping
/// modes, owners and symlinks. Regular files share extents where the filesystem allows.
/// Returns `Reflink` only if every file was shared.
pub fn copy_tree(fs_ops: &dyn Filesystems, src: &Path, dst: &Path) -> Result<CopyMethod> {
    let mut method = CopyMethod::Reflink;
    copy_entry(fs_ops, src, dst, &mut method)?;
    Ok(method)
}

fn copy_entry(
    fs_ops: &dyn Filesystems,
    src: &Path,
    dst: &Path,
    method: &mut CopyMethod,
) -> Result<()> {
    let meta = fs::symlink_metadata(src).ctx(|| format!("stat {}", src.display()))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        fs::create_dir(dst).ctx(|| format!("create {}", dst.display()))?;
        for entry in fs::read_dir(src).ctx(|| format!("list {}", src.display()))? {
            let entry = entry.ctx(|| format!("list {}", src.display()))?;
            copy_entry(fs_ops, &entry.path(), &dst.join(entry.file_name()), method)?;
        }
    } else if kind.is_file() {
        if fs_ops.clone_file(src, dst)? == CopyMethod::SparseCopy {
            *method = CopyMethod::SparseCopy;
        }
    } else if kind.is_symlink() {
        let target = fs::read_link(src).ctx(|| format!("read link {}", src.display()))?;
        symlink(&target, dst).ctx(|| format!("create link {}", dst.display()))?;
        return chown(dst, &meta, true);
    } else {
        // Sockets, fifos and device nodes are not data; they are recreated by their users.
        tracing::warn!(path = %src.display(), "skipping a special file in a copy");
        return Ok(());
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .ctx(|| format!("chmod {}", dst.display()))?;
    chown(dst, &meta, false)
}

fn chown(path: &Path, meta: &fs::Metadata, link: bool) -> Result<()> {
    let r = if link {
        std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))
    } else {
        std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()))
    };
    r.ctx(|| format!("chown {}", path.display()))
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
    use crate::os::linux::LinuxHost;

    #[test]
    fn trees_are_copied_with_links_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/file"), b"payload").unwrap();
        fs::set_permissions(src.join("a/b/file"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("b/file", src.join("a/link")).unwrap();
        let dst = tmp.path().join("dst");
        copy_tree(&LinuxHost, &src, &dst).unwrap();
        assert_eq!(fs::read(dst.join("a/b/file")).unwrap(), b"payload");
        assert_eq!(fs::read(dst.join("a/link")).unwrap(), b"payload");
        let mode = fs::metadata(dst.join("a/b/file")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(allocated_bytes(&dst).unwrap() > 0);
    }
}
