//! NodeGetVolumeStats: usage and condition of the volume where it is staged or published.

use crate::backend::Attachment;
use crate::error::Result;
use crate::mounts::is_node_bind;

use super::Node;
use super::VolumeStats;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    Filesystem(crate::os::FsUsage),
    Block { total_bytes: u64 },
}

impl Node {
    pub fn volume_stats(&self, volume_id: &str, volume_path: &str) -> Result<VolumeStats> {
        crate::validate::required_str("volume_id", volume_id)?;
        super::required_volume_path(volume_path)?;
        let record = self.volumes.get(volume_id)?;
        let volume_path = self.volume_path(volume_id, volume_path)?;
        let dir = self.volumes.store.dir(&record.id);
        let abnormal_backend = self.backend.condition(&dir, record.capacity_bytes);
        let owners = self.mounts.owners(&dir)?;
        let (node, entry, att) = self.visible_at(volume_id, &volume_path, &owners)?;
        let abnormal_backend = abnormal_backend.or_else(|| {
            entry.failed_read_only().then(|| {
                "the filesystem went read-only after errors: unstage the volume and check it with fsck".to_owned()
            })
        });
        if is_node_bind(&entry, &att) {
            let total_bytes = match &att {
                Attachment::Device(dev) => self.host.filesystems.device_size(&dev.path)?,
                Attachment::Directory(_) => record.capacity_bytes,
            };
            return Ok(VolumeStats {
                usage: Some(Usage::Block { total_bytes }),
                abnormal: abnormal_backend,
            });
        }
        if let Some(u) = self.backend.usage(&dir, record.capacity_bytes)? {
            return Ok(VolumeStats {
                usage: Some(Usage::Filesystem(u)),
                abnormal: abnormal_backend,
            });
        }
        let mounted = self.host.mounter.reopen(&node)?.unwrap_or(node);
        match self.host.filesystems.usage(&mounted.kernel_path()) {
            Ok(u) => Ok(VolumeStats {
                usage: Some(Usage::Filesystem(u)),
                abnormal: abnormal_backend,
            }),
            Err(e) => Ok(VolumeStats {
                usage: None,
                abnormal: Some(format!("the filesystem does not answer: {e}")),
            }),
        }
    }
}
