//! Node paths (staging and target paths from requests) opened without a time-of-check gap:
//! walked from a trusted prefix one component at a time with directory descriptors, never
//! following a symlink, creating missing directories with `mkdirat`. Mounts, unmounts and
//! removals then act on the descriptor, so they land exactly on the inode that was checked,
//! whatever a racing process does to the path meanwhile.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::host_error::{HostError, IoContext, Result};

/// What to make when the path's last component is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Nothing: a missing path is reported as `None`.
    Nothing,
    /// A directory (and any missing parents), as a mount point for a filesystem.
    Directory,
    /// An empty regular file (parents as directories), as a mount point for a device node.
    File,
}

/// A path opened without following symlinks. `handle` (Linux) pins the object that was
/// checked; operations go through `/proc/self/fd/N`, never through the path string again.
#[derive(Debug)]
pub struct NodePath {
    /// The path as asked for: absolute, lexically clean, and free of symlinks below its prefix.
    pub path: PathBuf,
    pub is_dir: bool,
    handle: Option<OwnedFd>,
    parent: Option<OwnedFd>,
}

impl NodePath {
    /// A path the driver itself controls (its pool, a device node): used by path. The fake
    /// host uses these too.
    pub fn trusted(path: &Path) -> Self {
        NodePath {
            path: path.to_owned(),
            is_dir: true,
            handle: None,
            parent: None,
        }
    }

    /// The path through which the kernel reaches exactly the opened object.
    pub fn kernel_path(&self) -> PathBuf {
        match &self.handle {
            Some(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            None => self.path.clone(),
        }
    }

    /// The path by which the kernel reaches the topmost mount at this path through the
    /// pinned parent directory, releasing the handle on the object itself (an open handle
    /// on a mount keeps it busy). The last component is not to be followed.
    pub(crate) fn release_for_unmount(&mut self) -> Result<PathBuf> {
        self.handle = None;
        match self.parent() {
            Some(parent) => {
                let name = self.path.file_name().unwrap_or_default();
                Ok(PathBuf::from(format!("/proc/self/fd/{parent}")).join(name))
            }
            None => Ok(self.path.clone()),
        }
    }

    pub(crate) fn handle(&self) -> Option<RawFd> {
        self.handle.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub(crate) fn parent(&self) -> Option<RawFd> {
        self.parent.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn name(&self) -> Result<CString> {
        let name = self.path.file_name().unwrap_or_default();
        CString::new(name.as_bytes()).map_err(|_| nul(&self.path))
    }
}

fn nul(path: &Path) -> HostError {
    HostError::Path(format!("path {} contains NUL", path.display()))
}

fn cstring(s: &std::ffi::OsStr, path: &Path) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| nul(path))
}

fn openat(dir: RawFd, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; the returned fd is owned by the OwnedFd.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, 0o640) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: fstat writes into the zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

const O_LOOKUP: libc::c_int = libc::O_PATH | libc::O_NOFOLLOW;

fn refused(path: &Path, what: &str) -> HostError {
    HostError::Path(format!(
        "{} {what}; Strata does not follow symlinks below the allowed directories",
        crate::validate::bounded_display(path)
    ))
}

/// Opens `path`, which lies below `prefix` (trusted: resolved when the server started),
/// walking each component with `O_PATH|O_NOFOLLOW`. A symlink anywhere below the prefix is
/// refused. Returns `None` when the path does not exist and `create` is `Nothing`.
pub fn open(prefix: &Path, path: &Path, create: Create) -> Result<Option<NodePath>> {
    let rel = path.strip_prefix(prefix).map_err(|_| {
        HostError::other(format!(
            "{} is not below {}",
            path.display(),
            prefix.display()
        ))
    })?;
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(p) => Ok(p),
            _ => Err(HostError::Path(format!(
                "{} must be a clean absolute path",
                crate::validate::bounded_display(path)
            ))),
        })
        .collect::<Result<_>>()?;
    let Some((last, dirs)) = parts.split_last() else {
        return Err(HostError::Path(format!(
            "{} is an allowed directory itself; use a path below it",
            prefix.display()
        )));
    };
    let io_err = |what: &str, e: io::Error| HostError::io(format!("{what} {}", path.display()), e);
    let prefix_c = cstring(prefix.as_os_str(), prefix)?;
    // The prefix itself may be reached through a symlink the administrator configured.
    let mut dir = openat(libc::AT_FDCWD, &prefix_c, libc::O_PATH | libc::O_DIRECTORY)
        .map_err(|e| io_err("open the allowed directory of", e))?;
    for part in dirs {
        let name = cstring(part, path)?;
        let next = match openat(dir.as_raw_fd(), &name, O_LOOKUP | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if create == Create::Nothing {
                    return Ok(None);
                }
                mkdirat(dir.as_raw_fd(), &name).map_err(|e| io_err("create a parent of", e))?;
                openat(dir.as_raw_fd(), &name, O_LOOKUP | libc::O_DIRECTORY)
                    .map_err(|e| lookup_error(path, e))?
            }
            Err(e) => return Err(lookup_error(path, e)),
        };
        dir = next;
    }
    let name = cstring(last, path)?;
    let handle = match openat(dir.as_raw_fd(), &name, O_LOOKUP) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            match create {
                Create::Nothing => return Ok(None),
                Create::Directory => {
                    mkdirat(dir.as_raw_fd(), &name).map_err(|e| io_err("create", e))?
                }
                Create::File => {
                    match openat(
                        dir.as_raw_fd(),
                        &name,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                    ) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(io_err("create", e)),
                    }
                }
            }
            openat(dir.as_raw_fd(), &name, O_LOOKUP).map_err(|e| lookup_error(path, e))?
        }
        Err(e) => return Err(lookup_error(path, e)),
    };
    let st = fstat(handle.as_raw_fd()).map_err(|e| io_err("stat", e))?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Err(refused(path, "is a symlink"));
    }
    Ok(Some(NodePath {
        path: path.to_owned(),
        is_dir: kind == libc::S_IFDIR,
        handle: Some(handle),
        parent: Some(dir),
    }))
}

fn mkdirat(dir: RawFd, name: &CString) -> io::Result<()> {
    // SAFETY: name is NUL-terminated.
    if unsafe { libc::mkdirat(dir, name.as_ptr(), 0o750) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

fn lookup_error(path: &Path, e: io::Error) -> HostError {
    match e.raw_os_error() {
        // O_NOFOLLOW|O_DIRECTORY on a symlink, or a file where a directory was expected.
        Some(libc::ENOTDIR) | Some(libc::ELOOP) => {
            refused(path, "passes through a symlink or a file")
        }
        _ => HostError::io(format!("open {}", path.display()), e),
    }
}

/// The mount id of the opened object and whether it is the root of that mount (a mount
/// point with something mounted on it), from `statx`.
pub fn mount_of(node: &NodePath) -> Result<Option<(u32, bool)>> {
    let Some(fd) = node.handle() else {
        return Ok(None);
    };
    // SAFETY: statx writes into the zeroed struct; the empty path with AT_EMPTY_PATH
    // means the descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r < 0 {
        return Err(HostError::io(
            format!("statx {}", node.path.display()),
            io::Error::last_os_error(),
        ));
    }
    let root = stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0;
    Ok(Some((stx.stx_mnt_id as u32, root)))
}

/// Reopens `node` by its name in its (pinned) parent directory: after a mount there, this
/// reaches the new mount's root.
pub fn reopen(node: &NodePath) -> Result<Option<NodePath>> {
    let Some(parent) = node.parent() else {
        return Ok(Some(NodePath::trusted(&node.path)));
    };
    let name = node.name()?;
    let handle = match openat(parent, &name, O_LOOKUP) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(lookup_error(&node.path, e)),
    };
    let st = fstat(handle.as_raw_fd()).ctx(|| format!("stat {}", node.path.display()))?;
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(refused(&node.path, "is a symlink"));
    }
    // SAFETY: dup of a valid descriptor we own.
    let parent_copy = unsafe { libc::fcntl(parent, libc::F_DUPFD_CLOEXEC, 0) };
    if parent_copy < 0 {
        return Err(HostError::io("dup", io::Error::last_os_error()));
    }
    Ok(Some(NodePath {
        path: node.path.clone(),
        is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        handle: Some(handle),
        // SAFETY: parent_copy is a fresh descriptor nobody else owns.
        parent: Some(unsafe { OwnedFd::from_raw_fd(parent_copy) }),
    }))
}

/// Removes what a publish or a stage creates at `node`: an empty directory or an empty
/// regular file, by name in its pinned parent. Anything else (a file with content, a
/// device node, a mount point, a directory with entries) is left in place; returns whether
/// the path was removed.
pub fn remove_if_created(node: &NodePath) -> Result<bool> {
    let Some(parent) = node.parent() else {
        return Ok(false);
    };
    let name = node.name()?;
    // SAFETY: fstatat writes into the zeroed struct; name is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(parent, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(true),
            _ => Err(HostError::io(format!("stat {}", node.path.display()), e)),
        };
    }
    let flags = match st.st_mode & libc::S_IFMT {
        // rmdir refuses a directory with entries (ENOTEMPTY) or a mount point (EBUSY).
        libc::S_IFDIR => libc::AT_REMOVEDIR,
        libc::S_IFREG if st.st_size == 0 => 0,
        _ => return Ok(false),
    };
    // SAFETY: name is NUL-terminated.
    if unsafe { libc::unlinkat(parent, name.as_ptr(), flags) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(true),
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) | Some(libc::EBUSY) => Ok(false),
            _ => Err(HostError::io(format!("remove {}", node.path.display()), e)),
        };
    }
    Ok(true)
}

/// Opens a trusted path (a device node) as an `O_PATH` handle for [`NodePath`] operations.
pub fn open_trusted(path: &Path) -> Result<NodePath> {
    let c = cstring(path.as_os_str(), path)?;
    let handle = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_NOFOLLOW)
        .ctx(|| format!("open {}", path.display()))?;
    let st = fstat(handle.as_raw_fd()).ctx(|| format!("stat {}", path.display()))?;
    Ok(NodePath {
        path: path.to_owned(),
        is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        handle: Some(handle),
        parent: None,
    })
}
