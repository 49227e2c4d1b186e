//! Storage backends: where a volume's data lives and how the node reaches it. The controller
//! and node logic are written once against [`Backend`]; each storage kind implements it.

pub mod image;

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::model::{CopyMethod, SizePolicy};
use crate::os::{FsUsage, LoopDevice};

/// How the node reaches a volume's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// A block device (a loop device over the volume's image).
    Device(LoopDevice),
    /// A directory that holds the volume's files.
    Directory(PathBuf),
}

/// One storage kind. Every method takes the volume's directory in the pool; the backend owns
/// what is inside it except the metadata record.
pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;
    fn size_policy(&self) -> SizePolicy;
    /// Whether volumes can be handed out as raw block devices.
    fn supports_block(&self) -> bool;
    /// Space of the pool the volumes are carved from.
    fn pool_usage(&self) -> Result<FsUsage>;
    /// Creates the data of a new volume of `size` bytes in the empty directory `dir`.
    fn create(&self, dir: &Path, size: u64) -> Result<()>;
    /// Brings a committed volume's data in line with its record after a crash (for example
    /// recreates an empty image whose creation was not yet durable). Never destroys data.
    /// Returns what it did, if anything.
    fn repair(&self, dir: &Path, capacity_bytes: u64, holds_data: bool) -> Result<Option<String>>;
    /// Fills the empty directory `dir` with a copy of the data in `source_dir` (a volume or a
    /// snapshot), `size` bytes large (at least the source's size). Shares extents where the
    /// pool allows, so the copy costs O(1); otherwise copies what is allocated.
    fn copy_from(&self, source_dir: &Path, dir: &Path, size: u64) -> Result<CopyMethod>;
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
    /// Attaches the volume, or returns the existing attachment. Idempotent.
    fn attach(&self, dir: &Path) -> Result<Attachment>;
    /// Lets the kernel release the attachment once the last mount of it goes.
    fn release_on_unmount(&self, attachment: &Attachment) -> Result<()>;
    /// Detaches the volume. Idempotent.
    fn detach(&self, dir: &Path) -> Result<()>;
}
