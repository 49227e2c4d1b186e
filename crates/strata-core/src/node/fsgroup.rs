//! The pod's fsGroup (VOLUME_MOUNT_GROUP): the group a stage or publish asks for, given to
//! the volume's files by a walk that never follows a symlink, and skipped only when no pod
//! can have changed the files since the last walk (see docs/architecture.md).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{AccessType, Capability};
use crate::os::Host;
use crate::paths::{CheckedPath, NodePaths};
use crate::validate::bounded_display;
use crate::volumes::Volumes;

/// The group a capability asks the volume's files to be given (`volume_mount_group`, the
/// pod's fsGroup): a numeric group id, or nothing.
pub(crate) fn requested(cap: &Capability) -> Result<Option<u32>> {
    match &cap.access_type {
        AccessType::Mount {
            volume_mount_group, ..
        } if !volume_mount_group.is_empty() => {
            volume_mount_group.parse::<u32>().map(Some).map_err(|_| {
                Error::InvalidArgument(format!(
                    "volume_mount_group {} is not a numeric group id",
                    crate::validate::echo(volume_mount_group)
                ))
            })
        }
        _ => Ok(None),
    }
}

pub struct FsGroups {
    volumes: Arc<Volumes>,
    paths: Arc<NodePaths>,
    host: Host,
}

impl FsGroups {
    pub fn new(volumes: Arc<Volumes>, paths: Arc<NodePaths>, host: Host) -> Self {
        FsGroups {
            volumes,
            paths,
            host,
        }
    }

    /// Gives the volume's files to `gid` where it is mounted at `path`. The caller holds the
    /// volume's guard. Kubernetes' default fsGroupChangePolicy is `Always` and the kubelet
    /// does not say which policy a pod has, so the walk is skipped only when the record
    /// shows it is provably unneeded: the same group was applied last, and no read-write
    /// publish has let a pod change the files since (see [`FsGroups::may_be_written`]).
    pub(crate) fn apply(&self, volume_id: &str, path: &CheckedPath, gid: u32) -> Result<()> {
        let mut record = self.volumes.get(volume_id)?;
        if record.mount_group == Some(gid) && record.mount_group_current {
            return Ok(());
        }
        let Some((node, Some(mount))) = self.paths.mount_at(path)? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is not mounted at {}: stage it again",
                bounded_display(&path.path)
            )));
        };
        if mount.read_only() {
            // A read-only filesystem keeps the groups it has.
            return Ok(());
        }
        let root = self.host.mounter.reopen(&node)?.unwrap_or(node);
        let changed = self
            .host
            .filesystems
            .apply_group(&root.kernel_path(), gid)?;
        record.mount_group = Some(gid);
        record.mount_group_current = true;
        self.volumes.store.update(record)?;
        tracing::info!(volume_id, gid, changed, "volume mount group applied");
        Ok(())
    }

    /// Records, before a read-write publish hands the volume to a pod, that its files may
    /// change from now on: the next stage or publish with a group walks them again.
    pub(crate) fn may_be_written(&self, volume_id: &str) -> Result<()> {
        let mut record = self.volumes.get(volume_id)?;
        if record.mount_group_current {
            record.mount_group_current = false;
            self.volumes.store.update(record)?;
        }
        Ok(())
    }
}
