//! Copies of directory trees that a workload may be changing while they are copied (the dir
//! backend's snapshots and clones). Every entry is reached from its parent's descriptor with
//! `O_NOFOLLOW`, and its type is taken from the descriptor that was opened, so a directory
//! swapped for a symlink mid-copy is copied as what it is now (or skipped), never followed:
//! nothing outside the source tree is ever read.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::host_error::{HostError, Result};
use crate::model::CopyMethod;

/// Deeper trees are refused rather than risk the thread's stack.
const MAX_DEPTH: usize = 1024;

pub(crate) fn open_at(
    dir: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::c_uint,
) -> io::Result<File> {
    // SAFETY: name is NUL-terminated; the descriptor is owned by the File.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub(crate) fn fstat(file: &File) -> io::Result<libc::stat> {
    // SAFETY: fstat writes into the zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Mode and owner of `file` as `st` says.
fn keep_attributes(file: &File, st: &libc::stat) -> io::Result<()> {
    // SAFETY: plain syscalls on a descriptor we own.
    if unsafe { libc::fchown(file.as_raw_fd(), st.st_uid, st.st_gid) } < 0
        || unsafe { libc::fchmod(file.as_raw_fd(), st.st_mode & 0o7777) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whatever is named `name` in `dir` now, opened as itself (`O_PATH|O_NOFOLLOW`: a symlink
/// is the link, never its target) with its type and attributes read from that very
/// descriptor; `None` when it was removed since it was listed.
pub(crate) fn found_at(dir: &File, name: &CStr) -> io::Result<Option<(File, libc::stat)>> {
    match open_at(dir.as_raw_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
        Ok(found) => {
            let st = fstat(&found)?;
            Ok(Some((found, st)))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The names in the directory `dir` (without `.` and `..`).
pub(crate) fn entries(dir: &File) -> io::Result<Vec<CString>> {
    // SAFETY: fdopendir takes ownership of the duplicate, closedir releases it.
    let dup = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        unsafe { libc::close(dup) };
        return Err(e);
    }
    // The duplicate shares the descriptor's position: a directory listed before (by
    // another walk of the same descriptor) is listed again from its start.
    // SAFETY: stream is open.
    unsafe { libc::rewinddir(stream) };
    let mut names = vec![];
    loop {
        // SAFETY: readdir on an open stream; the entry is valid until the next call.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    unsafe { libc::closedir(stream) };
    Ok(names)
}

struct Copier {
    method: CopyMethod,
}

impl Copier {
    fn dir(&mut self, src: &File, dst: &File, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::Error::other(format!(
                "the tree is deeper than {MAX_DEPTH} directories"
            )));
        }
        for name in entries(src)? {
            self.entry(src, dst, &name, depth)?;
        }
        Ok(())
    }

    fn entry(&mut self, src: &File, dst: &File, name: &CStr, depth: usize) -> io::Result<()> {
        let Some((found, st)) = found_at(src, name)? else {
            return Ok(());
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let Some(from) = reopen(&found, libc::O_RDONLY | libc::O_DIRECTORY)? else {
                    return Ok(());
                };
                // SAFETY: name is NUL-terminated.
                if unsafe { libc::mkdirat(dst.as_raw_fd(), name.as_ptr(), 0o700) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                let to = open_at(
                    dst.as_raw_fd(),
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                self.dir(&from, &to, depth + 1)?;
                keep_attributes(&to, &fstat(&from)?)
            }
            libc::S_IFREG => {
                let Some(from) = reopen(&found, libc::O_RDONLY)? else {
                    return Ok(());
                };
                let st = fstat(&from)?;
                let to = open_at(
                    dst.as_raw_fd(),
                    name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )?;
                if super::clone::clone_or_copy(&from, &to, st.st_size as u64)?
                    == CopyMethod::SparseCopy
                {
                    self.method = CopyMethod::SparseCopy;
                }
                keep_attributes(&to, &st)
            }
            libc::S_IFLNK => {
                let mut buf = vec![0u8; libc::PATH_MAX as usize];
                let empty = c"";
                // SAFETY: readlinkat on the O_PATH descriptor of the link itself (empty
                // name) writes at most buf.len() bytes.
                let n = unsafe {
                    libc::readlinkat(
                        found.as_raw_fd(),
                        empty.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf.truncate(n as usize);
                let target = CString::new(buf).map_err(io::Error::other)?;
                // SAFETY: both strings are NUL-terminated.
                if unsafe { libc::symlinkat(target.as_ptr(), dst.as_raw_fd(), name.as_ptr()) } < 0
                    || unsafe {
                        libc::fchownat(
                            dst.as_raw_fd(),
                            name.as_ptr(),
                            st.st_uid,
                            st.st_gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    } < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            _ => {
                // Sockets, fifos and device nodes are not data; their users recreate them.
                tracing::warn!(name = %String::from_utf8_lossy(name.to_bytes()),
                    "skipping a special file in a copy");
                Ok(())
            }
        }
    }
}

/// Opens the object behind an `O_PATH` descriptor for reading, without following anything:
/// through `/proc/self/fd`, which reaches exactly that inode. `None` if it became something
/// that cannot be opened that way (a symlink swapped in is not what was found).
pub(crate) fn reopen(found: &File, flags: libc::c_int) -> io::Result<Option<File>> {
    let path =
        CString::new(format!("/proc/self/fd/{}", found.as_raw_fd())).map_err(io::Error::other)?;
    match open_at(libc::AT_FDCWD, &path, flags | libc::O_NONBLOCK, 0) {
        Ok(f) => Ok(Some(f)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| HostError::Path(format!("path {} contains NUL", path.display())))
}

/// See [`crate::os::Filesystems::copy_tree`].
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyMethod> {
    let fail =
        |e: io::Error| HostError::io(format!("copy {} to {}", src.display(), dst.display()), e);
    let from = open_at(
        libc::AT_FDCWD,
        &cstring(src)?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .map_err(fail)?;
    std::fs::create_dir(dst).map_err(fail)?;
    let to = open_at(
        libc::AT_FDCWD,
        &cstring(dst)?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .map_err(fail)?;
    let mut copier = Copier {
        method: CopyMethod::Reflink,
    };
    copier.dir(&from, &to, 0).map_err(fail)?;
    keep_attributes(&to, &fstat(&from).map_err(fail)?).map_err(fail)?;
    Ok(copier.method)
}

/// Group ownership as the kubelet's fsGroup handling gives it: every entry's group set to
/// `gid`; files gain owner and group read-write, directories also execute and setgid (so what
/// is created later inherits the group). Symlinks get the group but no mode, and are never
/// followed; nothing is opened for I/O (a device node or a FIFO is changed, not opened).
struct Grouper {
    gid: libc::gid_t,
    changed: u64,
}

impl Grouper {
    /// Applies to the object behind `found` (any descriptor, `O_PATH` included).
    fn apply(&mut self, found: &File, st: &libc::stat) -> io::Result<()> {
        let empty = c"";
        // SAFETY: fchownat with AT_EMPTY_PATH changes exactly the inode of the descriptor.
        if unsafe {
            libc::fchownat(
                found.as_raw_fd(),
                empty.as_ptr(),
                u32::MAX,
                self.gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFLNK {
            let add = if kind == libc::S_IFDIR {
                libc::S_ISGID | 0o770
            } else {
                0o660
            };
            // Through /proc/self/fd: chmod of the descriptor's inode, O_PATH included.
            let path = CString::new(format!("/proc/self/fd/{}", found.as_raw_fd()))
                .map_err(io::Error::other)?;
            // SAFETY: path is NUL-terminated.
            if unsafe { libc::chmod(path.as_ptr(), (st.st_mode & 0o7777) | add) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.changed += 1;
        Ok(())
    }

    fn dir(&mut self, dir: &File, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::Error::other(format!(
                "the tree is deeper than {MAX_DEPTH} directories"
            )));
        }
        for name in entries(dir)? {
            let Some((found, st)) = found_at(dir, &name)? else {
                continue;
            };
            self.apply(&found, &st)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR
                && let Some(sub) = reopen(&found, libc::O_RDONLY | libc::O_DIRECTORY)?
            {
                self.dir(&sub, depth + 1)?;
            }
        }
        Ok(())
    }
}

/// See [`crate::os::Filesystems::apply_group`]. `root` is the mounted volume's root (a
/// `/proc/self/fd` path to the checked mount point is fine: it is opened as it is).
pub fn apply_group(root: &Path, gid: u32) -> Result<u64> {
    let fail = |e: io::Error| HostError::io(format!("set group {gid} on {}", root.display()), e);
    let top = open_at(
        libc::AT_FDCWD,
        &cstring(root)?,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(fail)?;
    let mut grouper = Grouper { gid, changed: 0 };
    grouper
        .apply(&top, &fstat(&top).map_err(fail)?)
        .map_err(fail)?;
    grouper.dir(&top, 0).map_err(fail)?;
    Ok(grouper.changed)
}
