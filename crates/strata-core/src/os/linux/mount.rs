//! The real Mounter: mount(2), the new mount API for binds, unmounts through pinned handles.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::filesystem::Filesystem;
use crate::host_error::{HostError, IoContext, Result};
use crate::os::{Create, MountEntry, MountOptions, Mounter, NodePath, mountinfo, nodepath};

use super::{LinuxHost, check, cstr};

fn sys_mount(
    source: Option<&Path>,
    target: &Path,
    fs_type: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> io::Result<()> {
    let to_c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let source = source.map(to_c).transpose()?;
    let target = to_c(target)?;
    let fs_type = fs_type
        .map(CString::new)
        .transpose()
        .map_err(io::Error::other)?;
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(io::Error::other)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: all pointers are NUL-terminated strings that outlive the call, or null.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fs_type),
            flags as libc::c_ulong,
            ptr(&data).cast(),
        )
    })
    .map(drop)
}

// The new mount API (<linux/mount.h>), used for binds so their flags are set before the
// mount is attached, onto exactly the opened target.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Per-mount attributes for a bind from mount flags (superblock options do not apply).
fn mount_attr(options: &MountOptions) -> MountAttr {
    let f = options.flags;
    let mut attr = MountAttr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    for (flag, bit) in [
        (libc::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (libc::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (libc::MS_NODEV, MOUNT_ATTR_NODEV),
        (libc::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        (libc::MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    ] {
        if f & flag != 0 {
            attr.attr_set |= bit;
        }
    }
    let atime = if f & libc::MS_NOATIME != 0 {
        Some(MOUNT_ATTR_NOATIME)
    } else if f & libc::MS_STRICTATIME != 0 {
        Some(MOUNT_ATTR_STRICTATIME)
    } else if f & libc::MS_RELATIME != 0 {
        Some(0)
    } else {
        None
    };
    if let Some(a) = atime {
        attr.attr_clr |= MOUNT_ATTR_ATIME_MASK;
        attr.attr_set |= a;
    }
    attr
}

fn owned_fd(ret: libc::c_long) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

fn mount_error(what: String, e: io::Error) -> HostError {
    let hint = match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EUCLEAN) => {
            "; the filesystem may be damaged or of another type: check it with fsck"
        }
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => "; the mount point must be a directory",
        _ => "",
    };
    HostError::other(format!("{what}: {e}{hint}"))
}

impl Mounter for LinuxHost {
    fn mounts(&self) -> Result<Vec<MountEntry>> {
        let text =
            fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
        Ok(mountinfo::parse(&text))
    }

    fn open_path(&self, prefix: &Path, path: &Path, create: Create) -> Result<Option<NodePath>> {
        nodepath::open(prefix, path, create)
    }

    fn mount_at(&self, path: &NodePath) -> Result<Option<MountEntry>> {
        match nodepath::mount_of(path)? {
            Some((_, false)) => Ok(None),
            Some((id, true)) => Ok(self.mounts()?.into_iter().find(|m| m.mount_id == id)),
            // A trusted path: the most recent mount there.
            None => Ok(self
                .mounts()?
                .into_iter()
                .rfind(|m| m.mount_point == path.path)),
        }
    }

    fn mount_device(
        &self,
        device: &Path,
        target: &NodePath,
        fs: Filesystem,
        options: &MountOptions,
    ) -> Result<()> {
        let fs_type = fs.name();
        let mut data = options.data.clone();
        for needed in fs.mount_data() {
            if !data.iter().any(|d| d == needed) {
                data.push((*needed).to_owned());
            }
        }
        let data = data.join(",");
        sys_mount(
            Some(device),
            &target.kernel_path(),
            Some(fs_type),
            options.flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| {
            mount_error(
                format!(
                    "mount {} ({fs_type}) at {}",
                    device.display(),
                    target.path.display()
                ),
                e,
            )
        })
    }

    fn bind(&self, source: &NodePath, target: &NodePath, options: &MountOptions) -> Result<()> {
        let what = || {
            format!(
                "bind mount {} at {}",
                source.path.display(),
                target.path.display()
            )
        };
        // Trusted paths (a device node, the pool) are opened here.
        let (opened_source, opened_target);
        let source = match source.handle() {
            Some(_) => source,
            None => {
                opened_source = nodepath::open_trusted(&source.path)?;
                &opened_source
            }
        };
        let target = match target.handle() {
            Some(_) => target,
            None => {
                opened_target = nodepath::open_trusted(&target.path)?;
                &opened_target
            }
        };
        let (Some(src), Some(dst)) = (source.handle(), target.handle()) else {
            return Err(HostError::other(format!("{}: not opened", what())));
        };
        let empty = c"";
        // SAFETY: open_tree, mount_setattr and move_mount take descriptors we own, the empty
        // path (the descriptor itself), and a struct mount_attr of the size passed.
        let tree = owned_fd(unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                src,
                empty.as_ptr(),
                OPEN_TREE_CLONE
                    | libc::O_CLOEXEC as libc::c_uint
                    | libc::AT_EMPTY_PATH as libc::c_uint,
            )
        })
        .map_err(|e| mount_error(what(), e))?;
        let attr = mount_attr(options);
        if attr.attr_set != 0 || attr.attr_clr != 0 {
            check(unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    tree.as_raw_fd(),
                    empty.as_ptr(),
                    libc::AT_EMPTY_PATH as libc::c_uint,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                ) as libc::c_int
            })
            .map_err(|e| mount_error(format!("{}: set mount flags", what()), e))?;
        }
        // The detached tree is attached onto exactly the target that was checked; if this
        // fails, closing `tree` discards it.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                dst,
                empty.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            ) as libc::c_int
        })
        .map_err(|e| mount_error(what(), e))
        .map(drop)
    }

    fn unmount(&self, target: &mut NodePath) -> Result<()> {
        // Through the pinned parent directory: no symlink on the way is followed, and the
        // last component is not followed either.
        let path = target.release_for_unmount()?;
        let flags = libc::UMOUNT_NOFOLLOW;
        let c = cstr(&path)?;
        // A tool forked by a concurrent request holds copies of this process's descriptors
        // until it execs, which can make the mount look busy for a moment: retry briefly.
        let mut delay = Duration::from_millis(5);
        loop {
            // SAFETY: c is a valid NUL-terminated path.
            match check(unsafe { libc::umount2(c.as_ptr(), flags) }) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && delay < UNMOUNT_PATIENCE => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => {
                    return Err(HostError::io(
                        format!("unmount {}", target.path.display()),
                        e,
                    ));
                }
            }
        }
    }

    fn remove_if_created(&self, path: &NodePath) -> Result<bool> {
        nodepath::remove_if_created(path)
    }

    fn reopen(&self, path: &NodePath) -> Result<Option<NodePath>> {
        nodepath::reopen(path)
    }
}

/// How long an unmount retries a mount that looks busy.
const UNMOUNT_PATIENCE: Duration = Duration::from_millis(400);
