//! NodeExpandVolume, and the filesystem growth a stage or an expansion finishes.

use crate::backend::Attachment;
use crate::error::{Error, Result};
use crate::filesystem::Filesystem;
use crate::model::CapacityRange;
use crate::mounts::is_device_node_mount;

use super::Node;

impl Node {
    /// NodeExpandVolume: grows the volume to `range` if it is larger (expansion happens on
    /// the node that holds the volume; see docs/architecture.md), lets the device see the new
    /// size, and grows the filesystem mounted at `volume_path` online. Returns the capacity.
    pub fn node_expand_volume(
        &self,
        volume_id: &str,
        volume_path: &str,
        range: CapacityRange,
    ) -> Result<u64> {
        crate::validate::required_str("volume_id", volume_id)?;
        super::required_volume_path(volume_path)?;
        let record = self.volumes.get(volume_id)?;
        let volume_path = self.volume_path(volume_id, volume_path)?;
        let _guard = self.volumes.guard(volume_id)?;
        let dir = self.volumes.store.dir(&record.id);
        let owners = self.mounts.owners(&dir)?;
        let (_, here, att) = self.visible_at(volume_id, &volume_path, &owners)?;
        let before = record.capacity_bytes;
        let record = self.volumes.grow(record, range)?;
        if record.capacity_bytes == before {
            // Nothing grew now, so nothing refreshed the device either: let it see the
            // image's size, which a call cut short after the growth may have left unseen.
            self.backend.expand(&dir, record.capacity_bytes)?;
        }
        self.crash.reach("node-expand:before-grow");
        match &att {
            // A raw block volume: the refreshed device is all there is to grow.
            Attachment::Device(dev) if !is_device_node_mount(&here, &att) => {
                let fs = Filesystem::parse(&here.fs_type).ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "volume {} is mounted as {}, which Strata cannot grow",
                        record.id, here.fs_type
                    ))
                })?;
                self.growth
                    .grow_if_pending(&record.id, &dev.path, Some(&here.mount_point), fs)?
            }
            _ => {}
        }
        Ok(record.capacity_bytes)
    }
}
