//! Access to the host: mounts, loop devices, filesystems. Traits so the node and backend
//! logic run against the real kernel ([`linux`]) or an in-memory fake ([`fake`]).

pub mod fake;
pub mod linux;
pub mod mountinfo;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::CopyMethod;
pub use mountinfo::MountEntry;

/// Mount table and mount syscalls.
pub trait Mounter: Send + Sync {
    /// The current mount table, read from the kernel on every call.
    fn mounts(&self) -> Result<Vec<MountEntry>>;
    /// Mounts the filesystem on `device` at `target`.
    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &MountOptions,
    ) -> Result<()>;
    /// Bind-mounts `source` (a directory or a device node) onto `target`.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Unmounts `target`; succeeds when nothing is mounted there.
    fn unmount(&self, target: &Path) -> Result<()>;
}

/// A loop device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub backing_file: PathBuf,
}

/// A freshly attached loop device and, with auto-clear, the open handle that keeps it.
#[derive(Debug)]
pub struct AttachedLoop {
    pub device: LoopDevice,
    pub hold: Option<std::fs::File>,
}

/// Loop device control.
pub trait LoopDevices: Send + Sync {
    /// Every attached loop device with its backing file, from `/sys/block`.
    fn list(&self) -> Result<Vec<LoopDevice>>;
    /// Attaches `backing_file` to a free loop device, with direct I/O when the backing
    /// filesystem allows it. With `auto_clear` the kernel detaches the device once its last
    /// user closes it: the returned hold keeps it until a mount takes over, and a crash
    /// before that leaves nothing behind.
    fn attach(&self, backing_file: &Path, auto_clear: bool) -> Result<AttachedLoop>;
    /// Lets the kernel detach the device once its last user (a mount) goes away.
    fn set_auto_clear(&self, device: &LoopDevice) -> Result<()>;
    /// Detaches the device; succeeds when it is already gone.
    fn detach(&self, device: &LoopDevice) -> Result<()>;
    /// Makes the device pick up a new size of its backing file.
    fn refresh_capacity(&self, device: &LoopDevice) -> Result<()>;

    /// The loop device backed by `backing_file`, if one is attached.
    fn find(&self, backing_file: &Path) -> Result<Option<LoopDevice>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|d| d.backing_file == backing_file))
    }
}

/// What a block device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all.
    Empty,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else with a signature (a partition table, LVM, RAID...).
    Other(String),
}

/// Space and inode counts of a mounted filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

/// Filesystem tools and queries.
pub trait Filesystems: Send + Sync {
    fn probe(&self, device: &Path) -> Result<Probe>;
    fn format(&self, device: &Path, fs_type: &str) -> Result<()>;
    fn usage(&self, path: &Path) -> Result<FsUsage>;
    /// Size in bytes of a block device.
    fn device_size(&self, device: &Path) -> Result<u64>;
    /// Creates `dst` as a copy of `src`: shared extents where the filesystem can (reflink),
    /// else a copy of the allocated ranges only. `dst` is synced.
    fn clone_file(&self, src: &Path, dst: &Path) -> Result<CopyMethod>;
    /// Suspends writes to the filesystem mounted at `mount_point`, flushing it to disk.
    fn freeze(&self, mount_point: &Path) -> Result<()>;
    fn thaw(&self, mount_point: &Path) -> Result<()>;
    /// Grows the filesystem on `device` to fill it: offline when `mount_point` is `None`
    /// (ext2/3/4 only), online at `mount_point` otherwise.
    fn grow(&self, device: &Path, mount_point: Option<&Path>, fs_type: &str) -> Result<()>;
}

/// Thaws a frozen filesystem when dropped, so no error path leaves it frozen.
pub struct FrozenGuard<'a> {
    filesystems: &'a dyn Filesystems,
    mount_point: PathBuf,
}

impl<'a> FrozenGuard<'a> {
    pub fn freeze(filesystems: &'a dyn Filesystems, mount_point: &Path) -> Result<Self> {
        filesystems.freeze(mount_point)?;
        Ok(FrozenGuard {
            filesystems,
            mount_point: mount_point.to_owned(),
        })
    }
}

impl Drop for FrozenGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.filesystems.thaw(&self.mount_point) {
            tracing::error!(mount_point = %self.mount_point.display(), error = %e,
                "could not thaw a frozen filesystem; run fsfreeze --unfreeze on it");
        }
    }
}

/// Everything on the host the driver touches, injected into the services.
#[derive(Clone)]
pub struct Host {
    pub mounter: Arc<dyn Mounter>,
    pub loops: Arc<dyn LoopDevices>,
    pub filesystems: Arc<dyn Filesystems>,
}

impl Host {
    /// The real kernel and tools.
    pub fn linux() -> Self {
        let os = Arc::new(linux::LinuxHost);
        Host {
            mounter: os.clone(),
            loops: os.clone(),
            filesystems: os,
        }
    }

    /// The device and in-filesystem path of `path` as the mount table names them, from the
    /// mount with the longest mount point containing it.
    pub fn locate(&self, path: &Path) -> Result<((u32, u32), PathBuf)> {
        let mounts = self.mounter.mounts()?;
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.as_os_str().len())
            .ok_or_else(|| Error::Internal(format!("no mount contains {}", path.display())))?;
        let rel = path.strip_prefix(&m.mount_point).unwrap_or(Path::new(""));
        let root = if rel.as_os_str().is_empty() {
            m.root.clone()
        } else {
            m.root.join(rel)
        };
        Ok((m.device(), root))
    }

    /// Mounts whose mount point is exactly `path`, most recent last.
    pub fn mounts_at(&self, path: &Path) -> Result<Vec<MountEntry>> {
        Ok(self
            .mounter
            .mounts()?
            .into_iter()
            .filter(|m| m.mount_point == path)
            .collect())
    }
}

/// Mount flags from a capability's `mount_flags`, checked against an allowlist: flags that
/// only restrict or tune the mount are accepted; anything that could weaken the host is not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: u64,
    /// Filesystem-specific `key=value` options passed as mount data.
    pub data: Vec<String>,
}

const FLAG_TABLE: &[(&str, u64)] = &[
    ("ro", libc::MS_RDONLY),
    ("noatime", libc::MS_NOATIME),
    ("nodiratime", libc::MS_NODIRATIME),
    ("relatime", libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME),
    ("lazytime", libc::MS_LAZYTIME),
    ("nodev", libc::MS_NODEV),
    ("nosuid", libc::MS_NOSUID),
    ("noexec", libc::MS_NOEXEC),
    ("sync", libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC),
    ("rw", 0),
    ("defaults", 0),
];

/// Filesystem options passed through as mount data.
const DATA_OPTIONS: &[&str] = &[
    "discard",
    "nodiscard",
    "barrier",
    "nobarrier",
    "user_xattr",
    "acl",
    "noacl",
    "errors",
    "commit",
    "data",
    "journal_checksum",
    "inode64",
    "logbufs",
    "logbsize",
    "allocsize",
    "largeio",
    "nouuid",
    "prjquota",
    "usrquota",
    "grpquota",
    "quota",
    "noquota",
    "init_itable",
    "noinit_itable",
    "delalloc",
    "nodelalloc",
    "dax",
];

impl MountOptions {
    pub fn parse(mount_flags: &[String]) -> Result<Self> {
        let mut opts = MountOptions::default();
        for entry in mount_flags {
            // Kubernetes passes one flag per entry, but accept "a,b" too.
            for flag in entry.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                if let Some((_, bits)) = FLAG_TABLE.iter().find(|(name, _)| *name == flag) {
                    opts.flags |= bits;
                    continue;
                }
                let key = flag.split_once('=').map_or(flag, |(k, _)| k);
                let value_ok = flag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-.:".contains(&b));
                if DATA_OPTIONS.contains(&key) && value_ok {
                    opts.data.push(flag.to_owned());
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "mount flag {flag:?} is not allowed; allowed flags: {}, and {}",
                        FLAG_TABLE
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", "),
                        DATA_OPTIONS.join(", ")
                    )));
                }
            }
        }
        Ok(opts)
    }

    pub fn read_only(&self) -> bool {
        self.flags & libc::MS_RDONLY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_flags_follow_the_allowlist() {
        let o = MountOptions::parse(&flags(&["noatime", "nodev,discard", "errors=remount-ro"]))
            .unwrap();
        assert_eq!(o.flags, libc::MS_NOATIME | libc::MS_NODEV);
        assert_eq!(o.data, vec!["discard", "errors=remount-ro"]);
        for bad in [
            "suid",
            "dev",
            "bind",
            "rbind",
            "x-mount.mkdir",
            "context=\"a,b\"",
        ] {
            assert!(
                matches!(
                    MountOptions::parse(&flags(&[bad])),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        assert!(MountOptions::parse(&flags(&["ro"])).unwrap().read_only());
    }
}
