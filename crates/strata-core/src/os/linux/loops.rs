//! The real LoopDevices: the loop driver's ioctls, on handles held from check to use.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::host_error::{HostError, IoContext, Result};
use crate::os::{AttachOptions, FileId, HeldLoop, LoopDevice, LoopDevices};

use super::{LinuxHost, check};

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
            Err(e) => return Err(HostError::io("list /sys/block", e)),
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
            HostError::Unsupported(format!(
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
                            HostError::other(format!("{name} vanished right after it was attached"))
                        });
                }
                // Somebody else took this device between GET_FREE and CONFIGURE.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(e) => {
                    return Err(HostError::io(
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
        Err(HostError::Changing(
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
            .ok_or_else(|| HostError::other(format!("{} was detached", path.display())))?;
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
            Err(e) => {
                return Err(HostError::io(
                    format!("detach {}", device.path.display()),
                    e,
                ));
            }
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
