//! NodeStageVolume and NodeUnstageVolume: attach, format once, mount at the staging path, and undo.

use std::path::Path;

use crate::backend::Attachment;
use crate::encryption::{self, DataKey};
use crate::error::{Error, Result};
use crate::filesystem::Filesystem;
use crate::model::{AccessType, Capability, FormatState, VolumeRecord};
use crate::mounts::{is_device_node_mount, shows};
use crate::os::{Create, MountEntry, MountOptions, NodePath, Probe};
use crate::paths::CheckedPath;
use crate::validate::bounded_display;

use super::{Node, StageVolume, fsgroup, still_published};

impl Node {
    /// NodeStageVolume: the request's own fields are checked first, then the volume is
    /// looked up; one guard covers the whole stage, the group walk included, so a racing
    /// unstage waits (ABORTED) instead of pulling the mount from under the walk.
    pub fn stage_volume(&self, req: StageVolume) -> Result<()> {
        crate::validate::required_str("volume_id", &req.volume_id)?;
        let staging = self.paths.check("staging_target_path", &req.staging_path)?;
        let group = fsgroup::requested(&req.capability)?;
        self.capabilities.check_node_capability(&req.capability)?;
        let _guard = self.volumes.guard(&req.volume_id)?;
        let _path = self.paths.claim(&staging)?;
        let record = self.volumes.get(&req.volume_id)?;
        if let Some(target) = self.departures.sealed(&record.id) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is moving to node {target} and its final copy has begun: it is served there once the move commits (seconds); withdraw the move (the claim's strata.csi.dev/move-to) to keep it here",
                record.id
            )));
        }
        // An encrypted volume's key is opened before anything is attached: a missing or
        // wrong secret leaves nothing behind.
        let key = match &record.encryption {
            Some(wrapped) => {
                if req.capability.is_block() {
                    return Err(Error::InvalidArgument(format!(
                        "volume {} is an encrypted filesystem volume; it cannot be staged as a raw block device",
                        record.id
                    )));
                }
                let pass = req.secrets.passphrase(encryption::SECRET_KEY)?;
                Some(encryption::unwrap(
                    &pass,
                    wrapped,
                    &format!("volume {}", record.id),
                )?)
            }
            None => None,
        };
        self.stage_filesystem(record, &req.capability, &staging, key.as_ref())?;
        self.crash.reach("stage:before-group");
        match group {
            Some(gid) => self.fsgroups.apply(&req.volume_id, &staging, gid),
            None => Ok(()),
        }
    }

    /// NodeStageVolume's work, before any group is applied; the caller holds the guards.
    fn stage_filesystem(
        &self,
        record: VolumeRecord,
        capability: &Capability,
        staging: &CheckedPath,
        key: Option<&DataKey>,
    ) -> Result<()> {
        let dir = self.volumes.store.dir(&record.id);
        let existing = self.paths.mount_at(staging)?.and_then(|(_, m)| m);

        // Checked before attaching, so a refused stage leaves no loop device behind.
        let current = self.backend.attachment(&dir)?;
        if let Some(other) = existing
            .as_ref()
            .filter(|m| !current.as_ref().is_some_and(|a| shows(m, a)))
        {
            return Err(Error::AlreadyExists(format!(
                "{} already holds another mount ({} from {}): choose another staging path",
                bounded_display(&staging.path),
                other.fs_type,
                bounded_display(Path::new(&other.source))
            )));
        }
        let for_mount = !capability.is_block();
        // Held from here until the mount holds the device: nobody can detach it and hand it
        // to another volume while it is probed, formatted and mounted.
        let attached = self.backend.attach(&dir, for_mount)?;
        self.crash.reach("stage:after-attach");

        let AccessType::Mount {
            fs_type,
            mount_flags,
            ..
        } = &capability.access_type
        else {
            // Raw block: staged means attached; publish binds the device node.
            if let Some(m) = &existing {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as a {} filesystem, not as a block device",
                    record.id,
                    bounded_display(&staging.path),
                    m.fs_type
                )));
            }
            return Ok(());
        };
        let options = MountOptions::parse(mount_flags)?;
        let att = attached.attachment.clone();
        // A directory volume has the pool's filesystem, whatever was asked; a device is
        // formatted with the requested one.
        let fs = match &att {
            Attachment::Device(_) => Some(Filesystem::requested(fs_type)?),
            Attachment::Directory(_) => None,
        };
        if let Some(m) = existing {
            let fs_differs = fs.is_some_and(|fs| m.fs_type != fs.name());
            if fs_differs || m.read_only() != options.read_only() {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as {} ({}), incompatible with {} ({})",
                    record.id,
                    bounded_display(&staging.path),
                    m.fs_type,
                    if m.read_only() { "ro" } else { "rw" },
                    fs.map_or(fs_type.as_str(), |fs| fs.name()),
                    if options.read_only() { "ro" } else { "rw" },
                )));
            }
            // A retried stage whose online grow failed last time.
            if let (Attachment::Device(dev), Some(fs)) = (&att, fs) {
                self.growth
                    .grow_if_pending(&record.id, &dev.path, Some(&m.mount_point), fs)?;
            }
            // A retried stage, or one after a restart: the key again (the kernel counts it
            // once), the data directory checked.
            if let Some(key) = key {
                let root = self.paths.open(staging, Create::Nothing)?.ok_or_else(|| {
                    Error::Internal(format!("{} vanished", bounded_display(&staging.path)))
                })?;
                self.keys.unlock(&record.id, &root, key)?;
            }
            return Ok(());
        }

        let (dev, fs) = match (&att, fs) {
            (Attachment::Device(dev), Some(fs)) => (dev.clone(), fs),
            (Attachment::Directory(src), _) => {
                let target = self.paths.create(staging, Create::Directory)?;
                return Ok(self.host.mounter.bind(
                    &NodePath::trusted(&src.path),
                    &target,
                    &options.per_mount(),
                )?);
            }
            (Attachment::Device(_), None) => unreachable!("a device always has a filesystem"),
        };
        let id = record.id.clone();
        let staged = self
            .ensure_filesystem(record, &dev.path, fs)
            // What can grow offline grows before mounting (online growth may be refused).
            .and_then(|()| match fs.growth().offline {
                true => self.growth.grow_if_pending(&id, &dev.path, None, fs),
                false => Ok(()),
            })
            // Opened again right before the mount, not reused from the first look: a
            // symlink swapped in meanwhile is refused here (tests/attacks.rs).
            .and_then(|()| self.paths.create(staging, Create::Directory))
            .and_then(|target| {
                self.host
                    .mounter
                    .mount_device(&dev.path, &target, fs, &options)?;
                Ok(target)
            })
            // An encrypted volume is staged with its key in: otherwise it is not staged.
            .and_then(|mut target| match key {
                None => Ok(target),
                Some(key) => {
                    // A crash here leaves it mounted without its key: the retried stage
                    // (the kubelet's) finds the mount and adds the key then.
                    self.crash.reach("stage:before-unlock");
                    let unlocked = self.paths.open(staging, Create::Nothing).and_then(|root| {
                        let root = root.ok_or_else(|| {
                            Error::Internal(format!("{} vanished", bounded_display(&staging.path)))
                        })?;
                        self.keys.unlock(&id, &root, key)
                    });
                    match unlocked {
                        Ok(()) => Ok(target),
                        Err(e) => {
                            if let Err(u) = self.host.mounter.unmount(&mut target) {
                                tracing::error!(volume_id = %id, error = %u,
                                    "could not unmount a stage whose key was refused");
                            }
                            Err(e)
                        }
                    }
                }
            });
        match staged {
            Ok(target) => {
                // From now on the kernel frees the loop device when the last mount goes.
                self.backend.release_on_unmount(&attached)?;
                drop(attached);
                // What grows only while mounted (xfs) grows now; xfs_growfs finds the
                // filesystem by its mount point as the mount table names it.
                let mount_point = match self.host.mounter.reopen(&target)? {
                    Some(node) => self.host.mounter.mount_at(&node)?.map(|m| m.mount_point),
                    None => None,
                };
                self.growth
                    .grow_if_pending(&id, &dev.path, mount_point.as_deref(), fs)
            }
            Err(e) => {
                drop(attached);
                if self.mounts.mounts_of(&att)?.is_empty() {
                    let _ = self.backend.detach(&dir);
                }
                Err(e)
            }
        }
    }

    /// Formats the device if it holds nothing yet; never formats over data.
    pub(crate) fn ensure_filesystem(
        &self,
        mut record: VolumeRecord,
        device: &Path,
        fs: Filesystem,
    ) -> Result<()> {
        let fs_type = fs.name();
        let interrupted = matches!(record.format, FormatState::Formatting(_));
        let dir = self.volumes.store.dir(&record.id);
        // Whether the image holds data, asked once: up front for a volume never formatted.
        let holds_data = match record.format {
            FormatState::Unformatted => Some(self.backend.has_data(&dir)?),
            _ => None,
        };
        // A volume never formatted whose image holds no data at all reads as zeros
        // everywhere: no filesystem, partition table or other signature can be on it, so it
        // needs no probe (a process start saved on every first stage).
        let fresh = holds_data == Some(false);
        let probe = if fresh {
            Probe::Empty
        } else {
            self.host.filesystems.probe(device)?
        };
        match probe {
            Probe::Filesystem(found) if !interrupted => {
                return if found == fs_type {
                    Ok(())
                } else {
                    Err(Error::FailedPrecondition(format!(
                        "volume {} holds a {found} filesystem, not {fs_type}: request fs_type {found}",
                        record.id
                    )))
                };
            }
            Probe::Other(what) if !interrupted => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} holds {what}, not a filesystem; it is left untouched",
                    record.id
                )));
            }
            Probe::Empty
                if !interrupted
                    && match holds_data {
                        Some(known) => known,
                        None => self.backend.has_data(&dir)?,
                    } =>
            {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} holds data but no filesystem (was it written as a raw block device?); it is left untouched",
                    record.id
                )));
            }
            // Empty, or only what an mkfs cut short by a crash left behind.
            _ => {}
        }
        record.format = FormatState::Formatting(fs_type.to_owned());
        self.volumes.store.update(record.clone())?;
        self.host
            .filesystems
            .format(device, fs, record.encryption.is_some())
            .map_err(|e| fs.format_error(e))?;
        self.crash.reach("stage:after-format");
        record.format = FormatState::Formatted(fs_type.to_owned());
        self.volumes.store.update(record)?;
        tracing::info!(device = %device.display(), fs_type, "formatted a new volume");
        Ok(())
    }

    pub fn unstage_volume(&self, volume_id: &str, staging_path: &str) -> Result<()> {
        crate::validate::required_str("volume_id", volume_id)?;
        let Some(staging) = self.undo_path("staging_target_path", volume_id, staging_path)? else {
            return Ok(());
        };
        let _guard = self.volumes.guard(volume_id)?;
        let _path = self.paths.claim(&staging)?;
        let record = self.volumes.get(volume_id)?;
        let dir = self.volumes.store.dir(&record.id);
        let owners = self.mounts.owners(&dir)?;
        let Some(att) = &owners.attachment else {
            // Not attached, so nothing of this volume can be mounted: not staged.
            return Ok(());
        };
        let here = self
            .paths
            .mount_at(&staging)?
            .and_then(|(node, m)| m.filter(|m| shows(m, att)).map(|m| (node, m)));
        let others: Vec<MountEntry> = self
            .host
            .mounter
            .mounts()?
            .into_iter()
            .filter(|m| {
                owners.show(m) && here.as_ref().is_none_or(|(_, h)| h.mount_id != m.mount_id)
            })
            .collect();
        let Some((node, _)) = here else {
            // Not staged at this path. Staged at another one: nothing to do here (the spec's
            // rule). A block volume (staged = attached) with no publish left is detached.
            if others.iter().any(|m| !is_device_node_mount(m, att)) {
                return Ok(());
            }
            if let Some(m) = others.first() {
                return Err(still_published(volume_id, m));
            }
            return self.backend.detach(&dir);
        };
        if let Some(m) = others.first() {
            return Err(still_published(volume_id, m));
        }
        if record.encryption.is_some() {
            self.keys.lock(&record.id, &node);
        }
        self.mounts.unmount_ours(node, &owners)?;
        self.crash.reach("unstage:after-unmount");
        self.backend.detach(&dir)
    }
}
