//! The real host: mount(2), loop device ioctls, statvfs(2), and the mkfs/blkid tools.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    AttachOptions, CopyMethod, Create, FileId, Filesystems, FsUsage, HeldLoop, LoopDevice,
    LoopDevices, MountEntry, MountOptions, MountedFs, Mounter, NodePath, Probe, mountinfo,
    nodepath,
};
use crate::error::{Error, IoContext, Result};
use crate::filesystem::Filesystem;

/// The host as the kernel sees it. Stateless: every query goes to the kernel.
pub struct LinuxHost;

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("path {} contains NUL", path.display())))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

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

fn mount_error(what: String, e: io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EUCLEAN) => {
            "; the filesystem may be damaged or of another type: check it with fsck"
        }
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => "; the mount point must be a directory",
        _ => "",
    };
    Error::Internal(format!("{what}: {e}{hint}"))
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
            return Err(Error::Internal(format!("{}: not opened", what())));
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
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(Error::FailedPrecondition(format!(
                        "{} is busy: stop the processes using it, then retry",
                        target.path.display()
                    )));
                }
                Err(e) => return Err(Error::io(format!("unmount {}", target.path.display()), e)),
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

// Loop device interface from <linux/loop.h>.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; LO_NAME_SIZE],
    crypt_name: [u8; LO_NAME_SIZE],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    // SAFETY: LoopInfo64 is plain old data; all-zero is its documented empty value.
    unsafe { std::mem::zeroed() }
}

/// How often attach retries when another process grabs the free device first.
const ATTACH_ATTEMPTS: usize = 16;

/// The device's status, read on an open handle; `None` when no file is bound to it.
fn loop_status(device: &File) -> io::Result<Option<LoopInfo64>> {
    let mut info = zeroed_info();
    // SAFETY: LOOP_GET_STATUS64 writes a struct loop_info64, which `info` is laid out as.
    match check(unsafe { libc::ioctl(device.as_raw_fd(), LOOP_GET_STATUS64, &mut info) }) {
        Ok(_) => Ok(Some(info)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The kernel encodes `lo_device` as `new_encode_dev` does.
fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev & 0xfff00) >> 8) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

fn open_loop(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl LinuxHost {
    /// The loop device `name`, opened, as its handle reports it; `None` when no file is
    /// bound to it (or it does not exist).
    fn read_loop(name: &str) -> io::Result<Option<(LoopDevice, File)>> {
        let path = PathBuf::from("/dev").join(name);
        let file = match open_loop(&path) {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENXIO)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        Ok(Self::describe(name, &file)?.map(|d| (d, file)))
    }

    /// What the open loop device `file` (named `name`) serves.
    fn describe(name: &str, file: &File) -> io::Result<Option<LoopDevice>> {
        use std::os::unix::fs::MetadataExt;
        let Some(info) = loop_status(file)? else {
            return Ok(None);
        };
        let rdev = file.metadata()?.rdev();
        // Informational only: relative to the namespace of whoever attached it.
        let backing_file = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .map(|s| PathBuf::from(s.trim_end_matches('\n')))
            .unwrap_or_default();
        Ok(Some(LoopDevice {
            path: PathBuf::from("/dev").join(name),
            major: libc::major(rdev),
            minor: libc::minor(rdev),
            backing: FileId {
                dev: decode_dev(info.device),
                ino: info.inode,
            },
            backing_file,
            read_only: info.flags & LO_FLAGS_READ_ONLY != 0,
            auto_clear: info.flags & LO_FLAGS_AUTOCLEAR != 0,
        }))
    }

    fn configure(
        device: &File,
        backing: &File,
        path: &Path,
        direct_io: bool,
        options: AttachOptions,
    ) -> io::Result<()> {
        let mut info = zeroed_info();
        if direct_io {
            info.flags |= LO_FLAGS_DIRECT_IO;
        }
        if options.auto_clear {
            // Set here rather than with LOOP_SET_STATUS64 after the mount, which freezes the
            // device's queue and costs 10-20 ms.
            info.flags |= LO_FLAGS_AUTOCLEAR;
        }
        if options.read_only {
            info.flags |= LO_FLAGS_READ_ONLY;
        }
        let name = path.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.file_name[..n].copy_from_slice(&name[..n]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            // Always 512-byte sectors: left to the kernel, a reflinked image on xfs gets the
            // filesystem's block size for direct I/O, and a 1 KiB-block ext4 then fails to
            // mount. Direct I/O stays on wherever the alignment allows.
            block_size: 512,
            info,
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which `config` is laid out as.
        check(unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) }).map(drop)
    }
}

impl LoopDevices for LinuxHost {
    fn list(&self) -> Result<Vec<LoopDevice>> {
        let dir = match fs::read_dir("/sys/block") {
            Ok(d) => d,
            Err(e) => return Err(Error::io("list /sys/block", e)),
        };
        let mut devices = vec![];
        for entry in dir.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only bound devices have a backing file; the others are not opened at all.
            if !name.starts_with("loop") || !entry.path().join("loop/backing_file").exists() {
                continue;
            }
            if let Some((device, _)) =
                Self::read_loop(&name).ctx(|| format!("read the status of /dev/{name}"))?
            {
                devices.push(device);
            }
        }
        Ok(devices)
    }

    fn attach(&self, backing_file: &Path, options: AttachOptions) -> Result<HeldLoop> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(backing_file)
            .ctx(|| format!("open {}", backing_file.display()))?;
        let control = File::open("/dev/loop-control").map_err(|e| {
            Error::Unavailable(format!(
                "open /dev/loop-control: {e}; load the loop module (modprobe loop) and run Strata privileged"
            ))
        })?;
        for _ in 0..ATTACH_ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let number = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })
                .ctx(|| "find a free loop device")?;
            let name = format!("loop{number}");
            let device_path = PathBuf::from("/dev").join(&name);
            let device = OpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&device_path)
                .ctx(|| format!("open {}", device_path.display()))?;
            let mut result = Self::configure(&device, &backing, backing_file, true, options);
            if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
                // The pool's filesystem refuses direct I/O (tmpfs, odd alignment): buffered.
                result = Self::configure(&device, &backing, backing_file, false, options);
            }
            match result {
                Ok(()) => {
                    // Read back on the handle we configured through: it is ours.
                    let described = Self::describe(&name, &device)
                        .ctx(|| format!("read status of {}", device_path.display()))?;
                    return described
                        .map(|d| HeldLoop {
                            device: d,
                            handle: Some(device),
                        })
                        .ok_or_else(|| {
                            Error::Internal(format!("{name} vanished right after it was attached"))
                        });
                }
                // Somebody else took this device between GET_FREE and CONFIGURE.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "attach {} to {}",
                            backing_file.display(),
                            device_path.display()
                        ),
                        e,
                    ));
                }
            }
        }
        Err(Error::Aborted(
            "every free loop device was taken by another process; retry".into(),
        ))
    }

    fn hold(&self, device: &LoopDevice) -> Result<Option<HeldLoop>> {
        let name = device
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let Some((now, file)) =
            Self::read_loop(&name).ctx(|| format!("open {}", device.path.display()))?
        else {
            return Ok(None);
        };
        let same = now.backing == device.backing
            && now.read_only == device.read_only
            && (now.major, now.minor) == (device.major, device.minor);
        Ok(same.then_some(HeldLoop {
            device: now,
            handle: Some(file),
        }))
    }

    fn set_auto_clear(&self, device: &HeldLoop) -> Result<()> {
        let Some(file) = &device.handle else {
            return Ok(());
        };
        let path = &device.device.path;
        let mut info = loop_status(file)
            .ctx(|| format!("read status of {}", path.display()))?
            .ok_or_else(|| Error::Internal(format!("{} was detached", path.display())))?;
        info.flags |= LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_SET_STATUS64 reads a struct loop_info64.
        check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_STATUS64, &info) })
            .ctx(|| format!("set autoclear on {}", path.display()))?;
        Ok(())
    }

    fn refresh_capacity(&self, device: &HeldLoop) -> Result<()> {
        let Some(file) = &device.handle else {
            return Ok(());
        };
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_CAPACITY, 0) })
            .ctx(|| format!("refresh the capacity of {}", device.device.path.display()))
            .map(drop)
    }

    fn detach(&self, device: &LoopDevice) -> Result<()> {
        // Verified and cleared through one handle: a device reused for another file in the
        // meantime is never touched.
        let Some(held) = self.hold(device)? else {
            return Ok(());
        };
        let Some(file) = &held.handle else {
            return Ok(());
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        match check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD, 0) }) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
            Err(e) => return Err(Error::io(format!("detach {}", device.path.display()), e)),
        }
        drop(held);
        wait_released(device);
        Ok(())
    }
}

/// Waits, a bounded time, until the kernel has released a detached device. It clears a
/// device at its last close, so anyone with it open for a moment (a device scan, this
/// driver's own among them) defers the clear, and a DeleteVolume right after the unstage
/// would still find it attached. Reads sysfs only: opening the device would defer it again.
/// The name the kernel shows is compared only to stop waiting; nothing is acted on.
fn wait_released(device: &LoopDevice) {
    const LIMIT: Duration = Duration::from_secs(2);
    let Some(name) = device.path.file_name() else {
        return;
    };
    let shown = Path::new("/sys/block").join(name).join("loop/backing_file");
    let start = Instant::now();
    while !device.backing_file.as_os_str().is_empty()
        && fs::read_to_string(&shown)
            .is_ok_and(|s| Path::new(s.trim_end_matches('\n')) == device.backing_file)
    {
        if start.elapsed() >= LIMIT {
            tracing::warn!(device = %device.path.display(),
                "a detached loop device is still open elsewhere; the kernel clears it at that last close");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

// Filesystem freeze from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn freeze_ioctl(fs: &MountedFs, request: libc::c_ulong, what: &str) -> Result<()> {
    let Some(root) = &fs.root else {
        return Err(Error::Internal(format!(
            "{} was not opened for a {what}",
            fs.mount_point.display()
        )));
    };
    // SAFETY: FIFREEZE/FITHAW take an unused int argument.
    match check(unsafe { libc::ioctl(root.as_raw_fd(), request, 0) }) {
        Ok(_) => Ok(()),
        // Thawing a filesystem that is not frozen is fine.
        Err(e) if request == FITHAW && e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(Error::io(format!("{what} {}", fs.mount_point.display()), e)),
    }
}

/// Makes `target` (empty) a copy of `source`: shared extents where the filesystem can
/// (FICLONE), else a copy of the allocated ranges only.
pub(crate) fn clone_or_copy(source: &File, target: &File, len: u64) -> io::Result<CopyMethod> {
    // SAFETY: FICLONE takes the source fd.
    if unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0 {
        return Ok(CopyMethod::Reflink);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // The filesystem cannot share extents: copy what is allocated.
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
            sparse_copy(source, target, len)?;
            Ok(CopyMethod::SparseCopy)
        }
        _ => Err(e),
    }
}

/// Copies the allocated ranges of `src` into `dst` (holes stay holes).
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on valid fds.
        let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: offsets are valid pointers to i64 owned here.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, left, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            left -= n as usize;
        }
        pos = hole;
    }
    dst.set_len(len)
}

/// What a failed tool said, for a status message: its first non-empty line (stderr first,
/// else stdout), bounded; never its whole usage text.
pub fn tool_says(out: &std::process::Output) -> String {
    let first = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    };
    let line = first(&out.stderr)
        .or_else(|| first(&out.stdout))
        .unwrap_or_else(|| format!("exited with {}", out.status));
    crate::validate::bounded(&line, 200)
}

/// Runs a tool to completion. The tool dies with the server (`PR_SET_PDEATHSIG`), so a
/// killed server never leaves an mkfs or a resize2fs behind holding a device.
pub fn run(cmd: &mut Command) -> Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let program = cmd.get_program().to_string_lossy().into_owned();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The server died before the signal was armed: do not start at all.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    cmd.stdin(std::process::Stdio::null());
    cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Unavailable(format!(
                "{program} is not installed: install e2fsprogs, xfsprogs, btrfs-progs and util-linux"
            ))
        } else {
            Error::io(format!("run {program}"), e)
        }
    })
}

/// Parses `blkid -p -o export` output.
fn parse_blkid(text: &str) -> Probe {
    let mut fs_type = None;
    let mut usage = None;
    let mut pt_type = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) => fs_type = Some(v.to_owned()),
            Some(("USAGE", v)) => usage = Some(v.to_owned()),
            Some(("PTTYPE", v)) => pt_type = Some(v.to_owned()),
            _ => {}
        }
    }
    match (fs_type, usage.as_deref(), pt_type) {
        (Some(t), Some("filesystem") | None, _) => Probe::Filesystem(t),
        (Some(t), Some(u), _) => Probe::Other(format!("{t} ({u})")),
        (None, _, Some(pt)) => Probe::Other(format!("a {pt} partition table")),
        (None, _, None) => Probe::Empty,
    }
}

impl Filesystems for LinuxHost {
    fn probe(&self, device: &Path) -> Result<Probe> {
        let out = run(Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(device))?;
        match out.status.code() {
            Some(0) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
            // blkid's "nothing found".
            Some(2) => Ok(Probe::Empty),
            _ => Err(Error::Internal(format!(
                "blkid {}: {}",
                device.display(),
                tool_says(&out)
            ))),
        }
    }

    fn format(&self, device: &Path, fs: Filesystem) -> Result<()> {
        let fs_type = fs.name();
        let (tool, args) = fs.mkfs();
        let mut cmd = Command::new(tool);
        cmd.args(args);
        let out = run(cmd.arg(device))?;
        if out.status.success() {
            return Ok(());
        }
        let said = tool_says(&out);
        let lower = said.to_lowercase();
        if lower.contains("too small") || lower.contains("must be larger") {
            Err(Error::FailedPrecondition(format!(
                "mkfs.{fs_type} refused {}: {said}; create a larger volume ({fs_type} needs at least {} MiB)",
                device.display(),
                fs.min_bytes().max(crate::model::MIB) >> 20
            )))
        } else {
            Err(Error::Internal(format!(
                "mkfs.{fs_type} {}: {said}",
                device.display()
            )))
        }
    }

    fn usage(&self, path: &Path) -> Result<FsUsage> {
        let c = cstr(path)?;
        // SAFETY: statvfs writes into the zeroed struct; c is a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })
            .ctx(|| format!("statvfs {}", path.display()))?;
        let frsize = st.f_frsize;
        Ok(FsUsage {
            total_bytes: st.f_blocks * frsize,
            available_bytes: st.f_bavail * frsize,
            used_bytes: st.f_blocks.saturating_sub(st.f_bfree) * frsize,
            total_inodes: st.f_files,
            free_inodes: st.f_ffree,
            used_inodes: st.f_files.saturating_sub(st.f_ffree),
        })
    }

    fn clone_file(&self, src: &Path, dst: &Path) -> Result<CopyMethod> {
        let source = File::open(src).ctx(|| format!("open {}", src.display()))?;
        let len = source
            .metadata()
            .ctx(|| format!("stat {}", src.display()))?
            .len();
        let target = File::create_new(dst).ctx(|| format!("create {}", dst.display()))?;
        let method = clone_or_copy(&source, &target, len)
            .ctx(|| format!("clone {} to {}", src.display(), dst.display()))?;
        target
            .sync_all()
            .ctx(|| format!("sync {}", dst.display()))?;
        Ok(method)
    }

    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<CopyMethod> {
        super::tree::copy_tree(src, dst)
    }

    fn open_mounted(&self, mount_point: &Path, device: (u32, u32)) -> Result<MountedFs> {
        // Opened without O_PATH (the freeze ioctls need a real descriptor), then checked: the
        // directory must live on the volume's device, whatever the path led to.
        let root = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(mount_point)
            .ctx(|| format!("open {}", mount_point.display()))?;
        let dev = root
            .metadata()
            .ctx(|| format!("stat {}", mount_point.display()))?
            .dev();
        if (libc::major(dev), libc::minor(dev)) != device {
            return Err(Error::FailedPrecondition(format!(
                "{} is no longer the volume's filesystem (it changed under the call); retry",
                mount_point.display()
            )));
        }
        Ok(MountedFs {
            mount_point: mount_point.to_owned(),
            root: Some(root),
        })
    }

    fn freeze(&self, fs: &MountedFs) -> Result<()> {
        freeze_ioctl(fs, FIFREEZE, "freeze")
    }

    fn thaw(&self, fs: &MountedFs) -> Result<()> {
        freeze_ioctl(fs, FITHAW, "thaw")
    }

    fn has_data(&self, file: &Path) -> Result<bool> {
        let f = File::open(file).ctx(|| format!("open {}", file.display()))?;
        // SAFETY: lseek on an open fd has no memory effects.
        let pos = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        if pos >= 0 {
            return Ok(true);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Ok(false),
            // A filesystem without SEEK_DATA: assume data, so nothing is formatted over.
            _ => Ok(true),
        }
    }

    fn copy_method_in(&self, dir: &Path) -> Result<CopyMethod> {
        let (a, b) = (dir.join(".reflink-probe-a"), dir.join(".reflink-probe-b"));
        let _ = fs::remove_file(&a);
        let _ = fs::remove_file(&b);
        fs::write(&a, [0u8; 4096]).ctx(|| format!("write {}", a.display()))?;
        let method = self.clone_file(&a, &b);
        let _ = fs::remove_file(&a);
        let _ = fs::remove_file(&b);
        method
    }

    fn apply_group(&self, root: &Path, gid: u32) -> Result<u64> {
        super::tree::apply_group(root, gid)
    }

    fn check_writable(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        // An unnamed file: concurrent probes (the livenessprobe's, an operator's) never meet
        // at one name, and a crash leaves nothing behind.
        let unnamed = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(dir);
        match unnamed {
            Ok(mut f) => f
                .write_all(b"ok")
                .ctx(|| format!("write a scratch file in {}", dir.display())),
            // A filesystem without unnamed files: a name no concurrent probe shares.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let probe = dir.join(format!(
                    ".probe-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                fs::write(&probe, b"ok")
                    .and_then(|_| fs::remove_file(&probe))
                    .ctx(|| format!("write {}", probe.display()))
            }
            Err(e) => Err(Error::io(
                format!("create a scratch file in {}", dir.display()),
                e,
            )),
        }
    }

    fn grow(&self, device: &Path, mount_point: Option<&Path>, fs: Filesystem) -> Result<()> {
        let fs_type = fs.name();
        let failed = |tool: &str, out: &std::process::Output| {
            let text = format!(
                "{} {}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            if text.contains("Operation not permitted") || text.contains("Permission denied") {
                Error::FailedPrecondition(format!(
                    "{tool} {}: growing the mounted {fs_type} filesystem was refused (EPERM): it needs CAP_SYS_RESOURCE (run strata privileged) and a kernel that grows {fs_type} online; or unstage and stage the volume again to grow it offline",
                    device.display()
                ))
            } else {
                Error::Internal(format!("{tool} {}: {}", device.display(), tool_says(out)))
            }
        };
        let growth = fs.growth();
        let target = match mount_point {
            Some(mp) if growth.by_mount_point => mp,
            Some(_) => device,
            None if !growth.offline => {
                return Err(Error::Internal(format!(
                    "{fs_type} grows only while mounted"
                )));
            }
            None => {
                if let Some((check, args, sound)) = growth.check_first {
                    let out = run(Command::new(check).args(args).arg(device))?;
                    if !out.status.code().is_some_and(|c| sound.contains(&c)) {
                        return Err(Error::FailedPrecondition(format!(
                            "{check} {} found errors it could not fix: {}; repair the filesystem by hand",
                            device.display(),
                            tool_says(&out)
                        )));
                    }
                }
                device
            }
        };
        let out = run(Command::new(growth.tool).arg(target))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(failed(growth.tool, &out))
        }
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        let mut f = File::open(device).ctx(|| format!("open {}", device.display()))?;
        f.seek(SeekFrom::End(0))
            .ctx(|| format!("size of {}", device.display()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_expected_filesystem_is_opened_for_a_freeze() {
        use super::*;
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let fs = LinuxHost.open_mounted(dir.path(), (major, minor)).unwrap();
        assert!(fs.root.is_some());
        // Another device: refused, never frozen.
        assert!(matches!(
            LinuxHost.open_mounted(dir.path(), (major, minor + 1000)),
            Err(Error::FailedPrecondition(_))
        ));
        // A symlink where the mount point was: refused, not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/", &link).unwrap();
        assert!(LinuxHost.open_mounted(&link, (major, minor)).is_err());
    }

    #[test]
    fn a_tools_usage_text_never_reaches_a_message() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Output {
            status: std::process::ExitStatus::from_raw(1 << 8),
            stdout: b"".to_vec(),
            stderr: b"\nFilesystem must be larger than 300MB.\nUsage: mkfs.xfs\n/* blocksize */ [-b size=num]\n".to_vec(),
        };
        assert_eq!(
            super::tool_says(&out),
            "Filesystem must be larger than 300MB."
        );
        let silent = std::process::Output {
            status: std::process::ExitStatus::from_raw(2 << 8),
            stdout: vec![],
            stderr: vec![],
        };
        assert!(super::tool_says(&silent).contains("exit"));
    }

    use super::*;

    #[test]
    fn blkid_output_is_classified() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Probe::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid("PTUUID=1\nPTTYPE=gpt\n"),
            Probe::Other("a gpt partition table".into())
        );
        assert_eq!(
            parse_blkid("TYPE=LVM2_member\nUSAGE=raid\n"),
            Probe::Other("LVM2_member (raid)".into())
        );
        assert_eq!(parse_blkid(""), Probe::Empty);
    }
}
