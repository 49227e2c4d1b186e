//! Storage backends: where a volume's data lives and how the node reaches it. The controller
//! and node logic are written once against [`Backend`]; each storage kind implements it.

pub mod btrfs;
pub mod dir;
pub mod directory;
pub mod image;

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::model::{CopyMethod, SizePolicy};
use crate::os::{FileId, FsUsage, HeldLoop, LoopDevice};

/// How the node reaches a volume's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// A block device (a loop device over the volume's image).
    Device(LoopDevice),
    /// A directory that holds the volume's files, bind-mounted where it is used.
    Directory(DataDir),
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attachment::Device(d) => write!(f, "attached as {}", d.path.display()),
            Attachment::Directory(d) => write!(f, "its directory {} is mounted", d.path.display()),
        }
    }
}

/// An attachment in use by the current operation. A device is held open and verified to
/// serve this volume's image, so it stays this volume's until `held` is dropped (after the
/// mount has taken over, or the operation failed).
pub struct Attached {
    pub attachment: Attachment,
    pub held: Option<HeldLoop>,
}

/// A volume's data directory and where the kernel's mount table finds it: the device of its
/// filesystem and its path inside that filesystem (the `root` field of mountinfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    pub path: PathBuf,
    pub device: (u32, u32),
    pub root: PathBuf,
}

/// What a backend can promise for a group snapshot: that its volumes' copies show one
/// instant, as if the node had lost power then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupConsistency {
    /// Each volume has its own filesystem, frozen from before the first copy until after the
    /// last one: any number of volumes at one instant.
    Freeze,
    /// Each copy is atomic, but copies of several volumes cannot be taken at one instant
    /// (nothing can hold their writers): groups of one volume only.
    OneVolume,
    /// Copies are not atomic even for one volume: no group snapshots.
    None,
}

/// One storage kind. Every method takes the volume's directory in the pool; the backend owns
/// what is inside it except the metadata record.
pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;
    fn size_policy(&self) -> SizePolicy;
    /// Whether volumes can be handed out as raw block devices.
    fn supports_block(&self) -> bool;
    /// Whether each volume has a device of its own whose I/O can be limited per cgroup.
    fn limits_io(&self) -> bool {
        false
    }
    /// Whether volumes are directories of the pool's filesystem (so a requested fs_type has
    /// no meaning) rather than devices the node formats.
    fn serves_directories(&self) -> bool {
        false
    }
    /// What a group snapshot of this backend's volumes can promise.
    fn group_consistency(&self) -> GroupConsistency;
    /// Space of the pool the volumes are carved from.
    fn pool_usage(&self) -> Result<FsUsage>;
    /// Creates the data of a new volume of `size` bytes in the empty directory `dir`.
    fn create(&self, dir: &Path, size: u64) -> Result<()>;
    /// Brings a committed volume's data in line with its record after a crash (for example
    /// recreates an empty image whose creation was not yet durable). Never destroys data.
    /// Returns what it did, if anything.
    fn repair(&self, dir: &Path, capacity_bytes: u64, holds_data: bool) -> Result<Option<String>>;
    /// Usage of a volume mounted at `mount_point`, where statvfs of the mount does not tell
    /// it (directory backends). `None`: use statvfs.
    fn usage(&self, _dir: &Path, _capacity_bytes: u64) -> Result<Option<FsUsage>> {
        Ok(None)
    }
    /// Fills the empty directory `dir` with a copy of the data in `source_dir` (a volume or a
    /// snapshot), `size` bytes large (at least the source's size). Shares extents where the
    /// pool allows, so the copy costs O(1); otherwise copies what is allocated.
    /// `snapshot` says the copy is a snapshot (kept read-only where the backend can).
    fn copy_from(
        &self,
        source_dir: &Path,
        dir: &Path,
        size: u64,
        snapshot: bool,
    ) -> Result<CopyMethod>;
    /// Grows the volume's data to `size` bytes and lets a current attachment see the new size.
    fn expand(&self, dir: &Path, size: u64) -> Result<()>;
    /// Removes the volume's data, detaching whatever still uses it. Idempotent.
    fn destroy(&self, dir: &Path) -> Result<()>;
    /// Why the volume is unhealthy, or `None` when it is fine.
    fn condition(&self, dir: &Path, capacity_bytes: u64) -> Option<String>;
    /// Whether the volume holds any written data (so that it is never formatted over).
    fn has_data(&self, dir: &Path) -> Result<bool>;
    /// The current attachment as the kernel reports it.
    fn attachment(&self, dir: &Path) -> Result<Option<Attachment>>;
    /// Attaches the volume, or takes the current attachment, held and verified. `for_mount`:
    /// the attachment is about to be mounted, so it may go away by itself once unmounted
    /// (and if the process dies before the mount).
    fn attach(&self, dir: &Path, for_mount: bool) -> Result<Attached>;
    /// Lets the kernel release a held attachment that was not made auto-clearing once the
    /// last mount of it goes.
    fn release_on_unmount(&self, attached: &Attached) -> Result<()>;
    /// Detaches the volume's read-write attachment. Idempotent.
    fn detach(&self, dir: &Path) -> Result<()>;
    /// The identity of the file the volume's device serves (`None` for directory volumes).
    fn identity(&self, _dir: &Path) -> Result<Option<FileId>> {
        Ok(None)
    }
    /// Every device serving the volume, read-write and read-only.
    fn devices(&self, _dir: &Path) -> Result<Vec<LoopDevice>> {
        Ok(vec![])
    }
    /// Whether a volume's and a snapshot's data is one file laid out as the block device
    /// (what changed block tracking describes).
    fn block_layout(&self) -> bool {
        false
    }
    /// The volume's data opened for reading as one file, for a copy to another node (its
    /// allocated ranges are what travels).
    fn open_data(&self, _dir: &Path) -> Result<std::fs::File> {
        Err(self.no_node_copies())
    }
    /// Creates the data of a new volume of `size` bytes in the empty directory `dir` as one
    /// sparse file and returns it opened for writing: a copy from another node fills it.
    fn import(&self, _dir: &Path, _size: u64) -> Result<std::fs::File> {
        Err(self.no_node_copies())
    }
    /// Opens the data [`import`](Self::import) made in `dir` for writing again, grown to
    /// `size` bytes if it is smaller (a moved volume grown since its pre-copy).
    fn reopen_import(&self, _dir: &Path, _size: u64) -> Result<std::fs::File> {
        Err(self.no_node_copies())
    }
    /// The data of a volume or snapshot whose data is a directory tree (not
    /// [`block_layout`](Self::block_layout)), opened as a directory, for a copy to another
    /// node (the tree travels as a `tree_stream`).
    fn open_tree(&self, _dir: &Path) -> Result<std::fs::File> {
        Err(self.no_node_copies())
    }
    /// Creates the empty data directory of a new volume of `size` bytes in the empty
    /// directory `dir` and returns it opened: a tree from another node fills it.
    fn import_tree(&self, _dir: &Path, _size: u64) -> Result<std::fs::File> {
        Err(self.no_node_copies())
    }
    /// Why this backend's volumes cannot be copied between nodes.
    fn no_node_copies(&self) -> crate::error::Error {
        crate::error::Error::FailedPrecondition(format!(
            "the {} backend's data cannot be copied between nodes in this way: restore or clone on the node that holds the source",
            self.kind()
        ))
    }
    /// A read-only device of the volume for a read-only raw block publish, held: an existing
    /// one, or a new one attached read-only.
    fn read_only_device(&self, _dir: &Path) -> Result<HeldLoop> {
        Err(crate::error::Error::FailedPrecondition(format!(
            "the {} backend serves no raw block volumes",
            self.kind()
        )))
    }
}
