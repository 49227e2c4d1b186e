//! A filesystem growing into its grown device, once: when a restore or an expansion made
//! the volume larger than its filesystem, at the next stage or NodeExpandVolume.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::filesystem::Filesystem;
use crate::os::Filesystems;
use crate::volumes::Volumes;

pub struct FsGrowth {
    volumes: Arc<Volumes>,
    filesystems: Arc<dyn Filesystems>,
}

impl FsGrowth {
    pub fn new(volumes: Arc<Volumes>, filesystems: Arc<dyn Filesystems>) -> Self {
        FsGrowth {
            volumes,
            filesystems,
        }
    }

    /// Grows the filesystem to its device if the volume grew since it was formatted (restored
    /// into a larger volume, or expanded), then clears the mark.
    pub(crate) fn grow_if_pending(
        &self,
        id: &str,
        device: &Path,
        mount_point: Option<&Path>,
        fs: Filesystem,
    ) -> Result<()> {
        let mut record = self.volumes.get(id)?;
        if !record.resize_pending {
            return Ok(());
        }
        self.filesystems
            .grow(device, mount_point, fs)
            .map_err(|e| fs.grow_error(e, mount_point.is_some()))?;
        record.resize_pending = false;
        self.volumes.store.update(record)?;
        tracing::info!(volume_id = %id, fs_type = fs.name(), online = mount_point.is_some(), "filesystem grown");
        Ok(())
    }
}
