//! The real host: mount(2), loop device ioctls, statvfs(2), and the mkfs/blkid tools.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{
    AttachedLoop, CopyMethod, Filesystems, FsUsage, LoopDevice, LoopDevices, MountEntry,
    MountOptions, Mounter, Probe, mountinfo,
};
use crate::error::{Error, IoContext, Result};

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

impl Mounter for LinuxHost {
    fn mounts(&self) -> Result<Vec<MountEntry>> {
        let text =
            fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
        Ok(mountinfo::parse(&text))
    }

    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &MountOptions,
    ) -> Result<()> {
        let mut data = options.data.clone();
        // Clones and snapshots share the filesystem UUID; xfs refuses duplicates without this.
        if fs_type == "xfs" && !data.iter().any(|d| d == "nouuid") {
            data.push("nouuid".into());
        }
        let data = data.join(",");
        sys_mount(
            Some(device),
            target,
            Some(fs_type),
            options.flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::EUCLEAN) => {
                    "; the filesystem may be damaged or of another type: check it with fsck"
                }
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => "; the mount point must be a directory",
                _ => "",
            };
            Error::Internal(format!(
                "mount {} ({fs_type}) at {}: {e}{hint}",
                device.display(),
                target.display()
            ))
        })
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        sys_mount(Some(source), target, None, libc::MS_BIND, None)
            .ctx(|| format!("bind mount {} at {}", source.display(), target.display()))?;
        if read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            if let Err(e) = sys_mount(None, target, None, flags, None) {
                // Never leave a writable mount where a read-only one was asked for.
                let _ = self.unmount(target);
                return Err(Error::io(
                    format!("remount {} read-only", target.display()),
                    e,
                ));
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        let c = cstr(target)?;
        // SAFETY: c is a valid NUL-terminated path.
        match check(unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) }) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                Err(Error::FailedPrecondition(format!(
                    "{} is busy: stop the processes using it, then retry",
                    target.display()
                )))
            }
            Err(e) => Err(Error::io(format!("unmount {}", target.display()), e)),
        }
    }
}

// Loop device interface from <linux/loop.h>.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
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

impl LinuxHost {
    fn read_loop(name: &str) -> Option<LoopDevice> {
        let base = Path::new("/sys/block").join(name);
        let backing = fs::read_to_string(base.join("loop/backing_file")).ok()?;
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        let dev = fs::read_to_string(base.join("dev")).ok()?;
        let (major, minor) = dev.trim().split_once(':')?;
        Some(LoopDevice {
            path: PathBuf::from("/dev").join(name),
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            backing_file: PathBuf::from(backing),
        })
    }

    fn configure(
        device: &File,
        backing: &File,
        path: &Path,
        direct_io: bool,
        auto_clear: bool,
    ) -> io::Result<()> {
        let mut info = zeroed_info();
        if direct_io {
            info.flags |= LO_FLAGS_DIRECT_IO;
        }
        if auto_clear {
            // Set here rather than with LOOP_SET_STATUS64 after the mount, which freezes the
            // device's queue and costs 10-20 ms.
            info.flags |= LO_FLAGS_AUTOCLEAR;
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
        Ok(dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("loop")
                    .then(|| Self::read_loop(&name))
                    .flatten()
            })
            .collect())
    }

    fn attach(&self, backing_file: &Path, auto_clear: bool) -> Result<AttachedLoop> {
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
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
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&device_path)
                .ctx(|| format!("open {}", device_path.display()))?;
            let mut result = Self::configure(&device, &backing, backing_file, true, auto_clear);
            if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
                // The pool's filesystem refuses direct I/O (tmpfs, odd alignment): buffered.
                result = Self::configure(&device, &backing, backing_file, false, auto_clear);
            }
            match result {
                Ok(()) => {
                    let device_info = Self::read_loop(&name).ok_or_else(|| {
                        Error::Internal(format!("{name} vanished right after it was attached"))
                    })?;
                    return Ok(AttachedLoop {
                        device: device_info,
                        hold: auto_clear.then_some(device),
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

    fn set_auto_clear(&self, device: &LoopDevice) -> Result<()> {
        let file = File::open(&device.path).ctx(|| format!("open {}", device.path.display()))?;
        let mut info = zeroed_info();
        // SAFETY: the ioctls read and write a struct loop_info64.
        check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64, &mut info) })
            .ctx(|| format!("read status of {}", device.path.display()))?;
        info.flags |= LO_FLAGS_AUTOCLEAR;
        check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_STATUS64, &info) })
            .ctx(|| format!("set autoclear on {}", device.path.display()))?;
        Ok(())
    }

    fn refresh_capacity(&self, device: &LoopDevice) -> Result<()> {
        let file = File::open(&device.path).ctx(|| format!("open {}", device.path.display()))?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_CAPACITY, 0) })
            .ctx(|| format!("refresh the capacity of {}", device.path.display()))
            .map(drop)
    }

    fn detach(&self, device: &LoopDevice) -> Result<()> {
        let name = device
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        // Never detach a device that meanwhile serves another file.
        match Self::read_loop(&name) {
            Some(now) if now.backing_file == device.backing_file => {}
            _ => return Ok(()),
        }
        let file = match File::open(&device.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("open {}", device.path.display()), e)),
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        match check(unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD, 0) }) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(Error::io(format!("detach {}", device.path.display()), e)),
        }
    }
}

// Filesystem freeze from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn freeze_ioctl(mount_point: &Path, request: libc::c_ulong, what: &str) -> Result<()> {
    let dir = File::open(mount_point).ctx(|| format!("open {}", mount_point.display()))?;
    // SAFETY: FIFREEZE/FITHAW take an unused int argument.
    match check(unsafe { libc::ioctl(dir.as_raw_fd(), request, 0) }) {
        Ok(_) => Ok(()),
        // Thawing a filesystem that is not frozen is fine.
        Err(e) if request == FITHAW && e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(Error::io(format!("{what} {}", mount_point.display()), e)),
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

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Unavailable(format!(
                "{program} is not installed: install e2fsprogs, xfsprogs and util-linux"
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
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    fn format(&self, device: &Path, fs_type: &str) -> Result<()> {
        let mut cmd = Command::new(format!("mkfs.{fs_type}"));
        match fs_type {
            // Skip discard (the image is sparse already) and lazy-init for a fast mkfs.
            "ext4" | "ext3" | "ext2" => cmd.args([
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ]),
            // -f: the caller has already established that nothing but an interrupted mkfs is there.
            "xfs" => cmd.args(["-q", "-K", "-f"]),
            other => {
                return Err(Error::InvalidArgument(format!("cannot format {other}")));
            }
        };
        let out = run(cmd.arg(device))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let lower = stderr.to_lowercase();
        if lower.contains("too small") || lower.contains("must be larger") {
            Err(Error::FailedPrecondition(format!(
                "mkfs.{fs_type} refused {}: {stderr}; create a larger volume (xfs needs at least 300 MiB)",
                device.display()
            )))
        } else {
            Err(Error::Internal(format!(
                "mkfs.{fs_type} {}: {stderr}",
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
        // SAFETY: FICLONE takes the source fd.
        let cloned = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
        let method = if cloned == 0 {
            CopyMethod::Reflink
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The filesystem cannot share extents: copy what is allocated.
                Some(libc::EOPNOTSUPP)
                | Some(libc::EXDEV)
                | Some(libc::EINVAL)
                | Some(libc::ENOTTY) => {
                    sparse_copy(&source, &target, len)
                        .ctx(|| format!("copy {} to {}", src.display(), dst.display()))?;
                    CopyMethod::SparseCopy
                }
                _ => {
                    return Err(Error::io(
                        format!("clone {} to {}", src.display(), dst.display()),
                        e,
                    ));
                }
            }
        };
        target
            .sync_all()
            .ctx(|| format!("sync {}", dst.display()))?;
        Ok(method)
    }

    fn freeze(&self, mount_point: &Path) -> Result<()> {
        freeze_ioctl(mount_point, FIFREEZE, "freeze")
    }

    fn thaw(&self, mount_point: &Path) -> Result<()> {
        freeze_ioctl(mount_point, FITHAW, "thaw")
    }

    fn grow(&self, device: &Path, mount_point: Option<&Path>, fs_type: &str) -> Result<()> {
        let failed = |tool: &str, out: &std::process::Output| {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let text = format!("{} {}", stderr.trim(), stdout.trim());
            if text.contains("Operation not permitted") || text.contains("Permission denied") {
                Error::FailedPrecondition(format!(
                    "{tool} {}: this kernel refuses to grow a mounted {fs_type} filesystem (EPERM); unstage and stage the volume again to grow it offline",
                    device.display()
                ))
            } else {
                Error::Internal(format!("{tool} {}: {}", device.display(), text.trim()))
            }
        };
        match (fs_type, mount_point) {
            ("ext4" | "ext3" | "ext2", mount_point) => {
                if mount_point.is_none() {
                    // resize2fs wants a freshly checked filesystem when it is not mounted.
                    let out = run(Command::new("e2fsck").args(["-f", "-p"]).arg(device))?;
                    // 0: clean, 1: errors corrected.
                    if !matches!(out.status.code(), Some(0) | Some(1)) {
                        return Err(Error::FailedPrecondition(format!(
                            "e2fsck {} found errors it could not fix: {}; repair the filesystem by hand",
                            device.display(),
                            String::from_utf8_lossy(&out.stdout).trim()
                        )));
                    }
                }
                let out = run(Command::new("resize2fs").arg(device))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(failed("resize2fs", &out))
                }
            }
            ("xfs", Some(mp)) => {
                let out = run(Command::new("xfs_growfs").arg(mp))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(failed("xfs_growfs", &out))
                }
            }
            ("xfs", None) => Err(Error::Internal("xfs grows only while mounted".into())),
            (other, _) => Err(Error::FailedPrecondition(format!(
                "cannot grow a {other} filesystem"
            ))),
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
