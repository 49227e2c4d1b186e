//! NodePublishVolume and NodeUnpublishVolume: bind the staged volume (or its device) onto the target with the requested flags, and undo.

use crate::backend::Attachment;
use crate::error::{Error, Result};
use crate::model::{AccessType, VolumeRecord};
use crate::mounts::{is_device_node_mount, is_node_bind, shows};
use crate::os::{Create, MountEntry, MountOptions, NodePath};
use crate::paths::CheckedPath;
use crate::validate::bounded_display;

use super::Node;
use super::PublishVolume;
use super::ephemeral::EphemeralVolume;

impl Node {
    /// NodePublishVolume of an inline ephemeral volume (see
    /// [`InlineVolumes`](super::ephemeral::InlineVolumes)).
    pub fn publish_ephemeral(&self, req: EphemeralVolume) -> Result<()> {
        self.inline.publish(self, req)
    }

    /// NodePublishVolume: the request's own fields are checked first, then the volume is
    /// looked up; one guard covers the bind and the group walk.
    pub fn publish_volume(&self, req: PublishVolume) -> Result<()> {
        crate::validate::required_str("volume_id", &req.volume_id)?;
        let target = self.paths.check("target_path", &req.target_path)?;
        let staging = match req.staging_path.as_str() {
            "" => None,
            raw => Some(self.paths.check("staging_target_path", raw)?),
        };
        let group = super::fsgroup::requested(&req.capability)?;
        self.capabilities.check_node_capability(&req.capability)?;
        let requested = match &req.capability.access_type {
            AccessType::Mount { mount_flags, .. } => MountOptions::parse(mount_flags)?,
            AccessType::Block => MountOptions::default(),
        };
        let Some(staging) = &staging else {
            return Err(Error::FailedPrecondition(
                "staging_target_path is required: call NodeStageVolume first".into(),
            ));
        };
        let _guard = self.volumes.guard(&req.volume_id)?;
        let _path = self.paths.claim(&target)?;
        let record = self.volumes.get(&req.volume_id)?;
        self.bind_published(&req, record, &target, staging, requested, group)
    }

    /// NodePublishVolume's work; the caller holds the guards. The pod's fsGroup (the
    /// kubelet passes it here too) is applied on the staged filesystem before the bind, and
    /// a read-write bind is recorded as one through which the files may change.
    fn bind_published(
        &self,
        req: &PublishVolume,
        record: VolumeRecord,
        target: &CheckedPath,
        staging: &CheckedPath,
        requested: MountOptions,
        group: Option<u32>,
    ) -> Result<()> {
        let dir = self.volumes.store.dir(&record.id);
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {}: call NodeStageVolume first",
                record.id,
                bounded_display(&staging.path)
            ))
        };
        // Opened first: a target that passes through a symlink is refused before anything.
        let at_target = self.paths.mount_at(target)?.and_then(|(_, m)| m);
        let owners = self.mounts.owners(&dir)?;
        let att = owners.attachment.clone().ok_or_else(not_staged)?;
        // One read of the mount table: every mount of the volume, its read-only devices too.
        let mounts: Vec<MountEntry> = self
            .host
            .mounter
            .mounts()?
            .into_iter()
            .filter(|m| owners.show(m))
            .collect();
        let read_only = req.read_only || req.capability.access_mode.is_read_only();
        let block = req.capability.is_block();

        // What the target shows now: a retried publish of the same kind is done already.
        if let Some(m) = at_target {
            let same_kind = block == is_node_bind(&m, &att);
            if owners.show(&m) && same_kind && m.read_only() == read_only {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} already holds {}: unpublish it or choose another target path",
                bounded_display(&target.path),
                if owners.show(&m) {
                    format!(
                        "this volume published {}",
                        if m.read_only() {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )
                } else {
                    format!("another mount ({})", m.fs_type)
                }
            )));
        }

        let staged_mount = if block {
            None
        } else {
            let (node, mount) = self.paths.mount_at(staging)?.ok_or_else(not_staged)?;
            let mount = mount
                .filter(|m| shows(m, &att) && !is_device_node_mount(m, &att))
                .ok_or_else(not_staged)?;
            Some((node, mount))
        };
        if let Some(fs_mount) = mounts.iter().find(|m| !is_node_bind(m, &att))
            && block
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is mounted as a filesystem at {}; it cannot also be published as a raw block device",
                record.id,
                bounded_display(&fs_mount.mount_point)
            )));
        }
        let staged_id = staged_mount.as_ref().map(|(_, m)| m.mount_id);
        let elsewhere = mounts
            .iter()
            .find(|m| Some(m.mount_id) != staged_id)
            .cloned();
        if let (Some(m), false) = (
            elsewhere,
            req.capability.access_mode.allows_several_targets(),
        ) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is already published at {} and access mode {:?} allows one target: use SINGLE_NODE_MULTI_WRITER to share it",
                record.id,
                bounded_display(&m.mount_point),
                req.capability.access_mode
            )));
        }

        let mut flags = requested.per_mount();
        if read_only {
            flags.flags |= libc::MS_RDONLY;
        }
        if block {
            // A device node on a nodev mount cannot be opened.
            flags.flags &= !libc::MS_NODEV;
            // The kernel does not stop writes through a device node on a read-only mount:
            // a read-only publish gets a device that refuses writes.
            let device = if read_only {
                self.backend.read_only_device(&dir)?
            } else {
                let Attachment::Device(dev) = &att else {
                    return Err(not_staged());
                };
                self.host.loops.hold(dev)?.ok_or_else(not_staged)?
            };
            let limited = self.limits.publish(
                &record,
                &target.path.to_string_lossy(),
                &req.consumer,
                (device.device.major, device.device.minor),
            );
            let limited = match limited {
                Ok(limited) => limited,
                Err(e) => {
                    if device.device.read_only {
                        self.mounts.release_read_only_devices(&dir)?;
                    }
                    return Err(e);
                }
            };
            let target_node = match self.paths.create(target, Create::File) {
                Ok(node) => node,
                Err(e) => {
                    if let Some(entry) = &limited {
                        self.limits.undo(&record.id, entry);
                    }
                    if device.device.read_only {
                        self.mounts.release_read_only_devices(&dir)?;
                    }
                    return Err(e);
                }
            };
            self.crash.reach("publish:before-bind");
            let bound = self.host.mounter.bind(
                &NodePath::trusted(&device.device.path),
                &target_node,
                &flags,
            );
            if bound.is_err() {
                if let Some(entry) = &limited {
                    self.limits.undo(&record.id, entry);
                }
                if device.device.read_only {
                    self.mounts.release_read_only_devices(&dir)?;
                }
            }
            return Ok(bound?);
        }
        let (staged_node, staged) = staged_mount.ok_or_else(not_staged)?;
        // The stage's own flags (noexec...) stay on every publish of it.
        let flags = flags.with(&MountOptions::from_names(&staged.options));
        if let Some(gid) = group {
            self.fsgroups.apply(&record.id, staging, gid)?;
        }
        if !read_only {
            self.fsgroups.may_be_written(&record.id)?;
        }
        let limited = match &att {
            Attachment::Device(dev) => self.limits.publish(
                &self.volumes.get(&record.id)?,
                &target.path.to_string_lossy(),
                &req.consumer,
                (dev.major, dev.minor),
            )?,
            Attachment::Directory(_) => None,
        };
        let target_node = match self.paths.create(target, Create::Directory) {
            Ok(node) => node,
            Err(e) => {
                if let Some(entry) = &limited {
                    self.limits.undo(&record.id, entry);
                }
                return Err(e);
            }
        };
        // An encrypted volume's files are in its encrypted directory; the pod sees that.
        let source = match &record.encryption {
            Some(_) => match self.keys.data_dir(&record.id, &staged_node, staging) {
                Ok(dir) => dir,
                Err(e) => {
                    if let Some(entry) = &limited {
                        self.limits.undo(&record.id, entry);
                    }
                    return Err(e);
                }
            },
            None => staged_node,
        };
        self.crash.reach("publish:before-bind");
        let bound = self.host.mounter.bind(&source, &target_node, &flags);
        if let (Err(_), Some(entry)) = (&bound, &limited) {
            self.limits.undo(&record.id, entry);
        }
        Ok(bound?)
    }

    pub fn unpublish_volume(&self, volume_id: &str, target_path: &str) -> Result<()> {
        crate::validate::required_str("volume_id", volume_id)?;
        // An inline volume is named by the kubelet's handle, never a Strata id.
        if !crate::ids::is_volume_id(volume_id) {
            crate::validate::absolute_path("target_path", target_path)?;
            if !crate::validate::is_inline_handle(volume_id) {
                // Neither an id Strata issues nor a handle it accepts for an inline volume
                // (`..`, `a/b`, `/`...): no such volume can exist.
                return Err(Error::NotFound(format!(
                    "volume {} does not exist: it is neither a Strata volume id nor an inline volume handle",
                    crate::validate::echo(volume_id)
                )));
            }
            return match self.inline.record(volume_id) {
                Some(record) => self.inline.unpublish(self, &record, target_path),
                // No Strata volume has such an id, and no inline volume that handle: an
                // inline volume whose unpublish finished already (the kubelet retries).
                None => Ok(()),
            };
        }
        let Some(target) = self.undo_path("target_path", volume_id, target_path)? else {
            return Ok(());
        };
        let _guard = self.volumes.guard(volume_id)?;
        let _path = self.paths.claim(&target)?;
        let record = self.volumes.get(volume_id)?;
        let dir = self.volumes.store.dir(&record.id);
        let owners = self.mounts.owners(&dir)?;
        let Some(node) = self.paths.open(&target, Create::Nothing)? else {
            return Ok(());
        };
        let node = self.mounts.unmount_ours(node, &owners)?;
        self.crash.reach("unpublish:after-unmount");
        self.limits
            .unpublished(&record.id, &target.path.to_string_lossy())?;
        self.mounts.release_read_only_devices(&dir)?;
        // Only what a publish creates is removed: an empty directory or an empty file.
        if let Some(node) = node
            && !self.host.mounter.remove_if_created(&node)?
        {
            tracing::warn!(volume_id, target_path = %bounded_display(&node.path),
                "left the target path in place: it is not an empty directory or an empty file that a publish creates");
        }
        Ok(())
    }
}
