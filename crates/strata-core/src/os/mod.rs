//! Access to the host: mounts, loop devices, filesystems. Traits so the node and backend
//! logic run against the real kernel ([`linux`]) or an in-memory fake ([`fake`]).

pub mod btrfs;
pub mod cgroups;
pub mod clone;
pub mod extents;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod fscrypt;
pub mod linux;
pub mod mountinfo;
pub mod nodepath;
pub mod tree;
pub mod tree_export;
pub mod tree_import;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::filesystem::Filesystem;
pub use crate::host_error::HostError;
use crate::host_error::Result;
use crate::model::CopyMethod;
pub use crate::validate::mount_options::MountOptions;
pub use mountinfo::MountEntry;
pub use nodepath::{Create, NodePath};

/// Mount table and mount syscalls. Node paths are opened first ([`Mounter::open_path`]) and
/// every operation then acts on what was opened, never on the path string again.
pub trait Mounter: Send + Sync {
    /// The current mount table, read from the kernel on every call.
    fn mounts(&self) -> Result<Vec<MountEntry>>;
    /// Opens `path`, below the trusted directory `prefix`, without following symlinks (see
    /// [`nodepath`]); `None` when it does not exist and `create` is `Nothing`.
    fn open_path(&self, prefix: &Path, path: &Path, create: Create) -> Result<Option<NodePath>>;
    /// The topmost mount at the opened path, if it is a mount point.
    fn mount_at(&self, path: &NodePath) -> Result<Option<MountEntry>>;
    /// Mounts the filesystem on `device` onto the opened directory `target`.
    fn mount_device(
        &self,
        device: &Path,
        target: &NodePath,
        fs: Filesystem,
        options: &MountOptions,
    ) -> Result<()>;
    /// Bind-mounts `source` (a mounted directory or a device node) onto `target`, with the
    /// per-mount flags of `options` (ro, nosuid, nodev, noexec, atime) set before the mount
    /// appears, so it is never visible without them.
    fn bind(&self, source: &NodePath, target: &NodePath, options: &MountOptions) -> Result<()>;
    /// Opens `path` again by its name in its parent: after a mount or an unmount there, this
    /// reaches what is on top now. `None` when it is gone.
    fn reopen(&self, path: &NodePath) -> Result<Option<NodePath>>;
    /// Unmounts the topmost mount at the opened `target`, whose handle is released first
    /// (a handle on a mount keeps it busy); `reopen` it to look again.
    fn unmount(&self, target: &mut NodePath) -> Result<()>;
    /// Removes what a stage or publish creates: an empty directory or empty regular file,
    /// nothing else. Returns whether it is gone.
    fn remove_if_created(&self, path: &NodePath) -> Result<bool>;
}

/// A file's identity: the device of its filesystem and its inode number. Unlike a path it
/// means the same thing in every mount namespace, so it is how loop devices are matched to
/// the images they serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: (u32, u32),
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (not following a final symlink).
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(FileId {
            dev: (libc::major(m.dev()), libc::minor(m.dev())),
            ino: m.ino(),
        })
    }

    /// The identity of `path`, or `None` when there is no file there.
    pub fn find(path: &Path) -> Result<Option<FileId>> {
        match FileId::of(path) {
            Ok(id) => Ok(Some(id)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::io(format!("stat {}", path.display()), e)),
        }
    }
}

/// A loop device as the kernel reports it (`LOOP_GET_STATUS64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The backing file's identity: what the device is matched by.
    pub backing: FileId,
    /// The backing file's path as the kernel wrote it: relative to the mount namespace of
    /// the process that attached it, so for logs only, never for matching.
    pub backing_file: PathBuf,
    /// Attached with `LO_FLAGS_READ_ONLY`: writes through the device fail.
    pub read_only: bool,
    /// Attached with `LO_FLAGS_AUTOCLEAR`: detached by the kernel at its last close.
    pub auto_clear: bool,
}

/// A loop device held open. While the handle lives, the kernel cannot detach the device or
/// give it to another file (a `LOOP_CLR_FD` by anyone is deferred to the last close), so what
/// was verified about it stays true until the handle is dropped.
#[derive(Debug)]
pub struct HeldLoop {
    pub device: LoopDevice,
    /// `None` only in the fake host.
    pub handle: Option<std::fs::File>,
}

/// How a new loop device is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// Detached by the kernel at the last close: a crash before the mount leaves nothing.
    pub auto_clear: bool,
    /// Writes through the device fail (EROFS/EPERM).
    pub read_only: bool,
}

/// Loop device control.
pub trait LoopDevices: Send + Sync {
    /// Every attached loop device with its backing file's identity.
    fn list(&self) -> Result<Vec<LoopDevice>>;
    /// Attaches `backing_file` to a free loop device, with direct I/O when the backing
    /// filesystem allows it, and returns it held.
    fn attach(&self, backing_file: &Path, options: AttachOptions) -> Result<HeldLoop>;
    /// Opens `device` and checks, on the open handle, that it still serves the same file with
    /// the same flags. `None` when it no longer does (detached, or reused for another file).
    fn hold(&self, device: &LoopDevice) -> Result<Option<HeldLoop>>;
    /// Lets the kernel detach the held device once its last user (a mount) goes away.
    fn set_auto_clear(&self, device: &HeldLoop) -> Result<()>;
    /// Detaches the device if it still serves the file it served when listed; succeeds when
    /// it is already gone. Never detaches a device that was reused for another file. Returns
    /// once the kernel has released it, or after a bounded wait while someone else still
    /// has it open (the kernel then clears it at that last close).
    fn detach(&self, device: &LoopDevice) -> Result<()>;
    /// Makes the held device pick up a new size of its backing file.
    fn refresh_capacity(&self, device: &HeldLoop) -> Result<()>;

    /// The read-write loop device serving the file `backing`, if one is attached.
    fn find(&self, backing: FileId) -> Result<Option<LoopDevice>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|d| d.backing == backing && !d.read_only))
    }

    /// The read-write loop device serving `backing`, held; `None` if there is none. Retries
    /// when the device found goes away before it could be held.
    fn find_held(&self, backing: FileId) -> Result<Option<HeldLoop>> {
        for _ in 0..8 {
            let Some(dev) = self.find(backing)? else {
                return Ok(None);
            };
            if let Some(held) = self.hold(&dev)? {
                return Ok(Some(held));
            }
        }
        Err(HostError::Changing(
            "the loop device of this volume keeps changing; retry".into(),
        ))
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
    /// Makes filesystem `fs` on `device`; with `encrypt`, one that takes fscrypt policies
    /// (ext4's `encrypt` feature).
    fn format(&self, device: &Path, fs: Filesystem, encrypt: bool) -> Result<()>;
    fn usage(&self, path: &Path) -> Result<FsUsage>;
    /// Size in bytes of a block device.
    fn device_size(&self, device: &Path) -> Result<u64>;
    /// Creates `dst` as a copy of `src`: shared extents where the filesystem can (reflink),
    /// else a copy of the allocated ranges only. `dst` is synced.
    fn clone_file(&self, src: &Path, dst: &Path) -> Result<CopyMethod>;
    /// Creates the directory `dst` as a copy of the tree at `src` (modes, owners, symlinks as
    /// symlinks), sharing extents where the filesystem can. Nothing outside `src` is ever
    /// read, whatever runs in the tree meanwhile. `Reflink` only if every file was shared.
    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<CopyMethod>;
    /// Opens the filesystem mounted at `mount_point` and checks that it is the one on
    /// `device` (major, minor): a path changed under the caller is refused, so nothing but
    /// the volume's own filesystem is ever frozen or thawed.
    fn open_mounted(&self, mount_point: &Path, device: (u32, u32)) -> Result<MountedFs>;
    /// Suspends writes to the opened filesystem, flushing it to disk.
    fn freeze(&self, fs: &MountedFs) -> Result<()>;
    /// Lets writes resume; thawing a filesystem that is not frozen does nothing.
    fn thaw(&self, fs: &MountedFs) -> Result<()>;
    /// Grows the filesystem on `device` to fill it: offline when `mount_point` is `None`
    /// (ext2/3/4 only), online at `mount_point` otherwise.
    fn grow(&self, device: &Path, mount_point: Option<&Path>, fs: Filesystem) -> Result<()>;
    /// Whether the file holds any data (an allocated range), so a fresh image is told from
    /// one that holds something. Filesystems that cannot say answer `true`: nothing is ever
    /// formatted over data on a guess.
    fn has_data(&self, file: &Path) -> Result<bool>;
    /// How copies made in directory `dir` go: shared extents or copied data, tried on two
    /// scratch files that are removed again.
    fn copy_method_in(&self, dir: &Path) -> Result<CopyMethod>;
    /// Writes and removes a scratch file in `dir`: whether the directory takes writes now.
    fn check_writable(&self, dir: &Path) -> Result<()>;
    /// Gives the tree at `root` to group `gid` as the kubelet's fsGroup does (group owner,
    /// group read-write, setgid directories), following no symlink; the entries changed.
    fn apply_group(&self, root: &Path, gid: u32) -> Result<u64>;
}

/// A mounted filesystem, opened and checked by [`Filesystems::open_mounted`]: freeze and
/// thaw act on the descriptor held here, whatever happens to the path meanwhile.
#[derive(Debug)]
pub struct MountedFs {
    pub mount_point: PathBuf,
    /// The filesystem's directory, held open (the real host; the fake has none).
    pub root: Option<std::fs::File>,
}

/// Thaws a frozen filesystem when dropped, so no error path leaves it frozen.
pub struct FrozenGuard<'a> {
    filesystems: &'a dyn Filesystems,
    fs: MountedFs,
    thawed: bool,
}

impl<'a> FrozenGuard<'a> {
    pub fn freeze(filesystems: &'a dyn Filesystems, fs: MountedFs) -> Result<Self> {
        filesystems.freeze(&fs)?;
        Ok(FrozenGuard {
            filesystems,
            fs,
            thawed: false,
        })
    }

    /// The frozen filesystem, for a watchdog that may have to thaw it.
    pub fn fs(&self) -> &MountedFs {
        &self.fs
    }

    /// Records that something else (a watchdog) thawed the filesystem already.
    pub fn mark_thawed(&mut self) {
        self.thawed = true;
    }

    /// Thaws the filesystem now (once; an error is logged, as the drop would).
    pub fn thaw(&mut self) {
        if std::mem::replace(&mut self.thawed, true) {
            return;
        }
        if let Err(e) = self.filesystems.thaw(&self.fs) {
            tracing::error!(mount_point = %self.fs.mount_point.display(), error = %e,
                "could not thaw a frozen filesystem; run fsfreeze --unfreeze on it");
        }
    }
}

impl Drop for FrozenGuard<'_> {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Where the kernel's cgroup filesystems are normally mounted.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Everything on the host the driver touches, injected into the services.
#[derive(Clone)]
pub struct Host {
    pub mounter: Arc<dyn Mounter>,
    pub loops: Arc<dyn LoopDevices>,
    pub filesystems: Arc<dyn Filesystems>,
    pub btrfs: Arc<dyn btrfs::Btrfs>,
    pub cgroups: Arc<dyn cgroups::Cgroups>,
    pub fscrypt: Arc<dyn fscrypt::Fscrypt>,
}

impl Host {
    /// The real kernel and tools.
    pub fn linux() -> Self {
        let os = Arc::new(linux::LinuxHost);
        Host {
            mounter: os.clone(),
            loops: os.clone(),
            filesystems: os.clone(),
            fscrypt: os,
            btrfs: Arc::new(btrfs::BtrfsTool),
            cgroups: Arc::new(linux::LinuxCgroups::new(DEFAULT_CGROUP_ROOT.into())),
        }
    }

    /// This host with the cgroup filesystems under `root` (the host's, where the driver
    /// runs in a container).
    pub fn with_cgroup_root(mut self, root: PathBuf) -> Self {
        self.cgroups = Arc::new(linux::LinuxCgroups::new(root));
        self
    }

    /// The device and in-filesystem path of `path` as the mount table names them, from the
    /// mount with the longest mount point containing it.
    pub fn locate(&self, path: &Path) -> Result<((u32, u32), PathBuf)> {
        let mounts = self.mounter.mounts()?;
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.as_os_str().len())
            .ok_or_else(|| HostError::other(format!("no mount contains {}", path.display())))?;
        let rel = path.strip_prefix(&m.mount_point).unwrap_or(Path::new(""));
        let root = if rel.as_os_str().is_empty() {
            m.root.clone()
        } else {
            m.root.join(rel)
        };
        Ok((m.device(), root))
    }
}
