//! Node operations: stage, publish, and their reverses, and volume stats. What is staged or
//! published is read from the kernel (mount table, loop devices) on every call, so a retried
//! call after a crash or a reboot sees the truth and finishes the job.
//!
//! Node paths are opened without following symlinks and acted on through their handles
//! ([`NodePath`]); devices are held open from the check to the mount ([`Attached`]); each
//! operation claims its volume and its path, so two volumes never meet at one path.

use std::path::{Path, PathBuf};

use crate::backend::Attachment;
use crate::driver::{CheckedPath, Driver};
use crate::error::{Error, Result};
use crate::model::{AccessType, Capability, CapacityRange, FormatState, VolumeRecord, fs_type_of};
use crate::os::{Create, FrozenGuard, LoopDevice, MountEntry, MountOptions, NodePath, Probe};
use crate::validate::{absolute_path, bounded_display, echo};

#[derive(Debug, Clone)]
pub struct StageVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
}

#[derive(Debug, Clone)]
pub struct PublishVolume {
    pub volume_id: String,
    pub staging_path: Option<PathBuf>,
    pub target_path: PathBuf,
    pub capability: Capability,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    Filesystem(crate::os::FsUsage),
    Block { total_bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    /// `None` when the volume is abnormal and its usage cannot be read.
    pub usage: Option<Usage>,
    pub abnormal: Option<String>,
}

/// Whether a mount-table entry shows `att` mounted: its filesystem (same device numbers),
/// or its device node bound onto a file (a bind from devtmpfs whose root is `/loopN`).
fn shows(entry: &MountEntry, att: &Attachment) -> bool {
    match att {
        Attachment::Device(dev) => shows_device(entry, dev),
        Attachment::Directory(d) => entry.device() == d.device && entry.root == d.root,
    }
}

fn shows_device(entry: &MountEntry, dev: &LoopDevice) -> bool {
    entry.device() == (dev.major, dev.minor)
        || dev
            .path
            .file_name()
            .is_some_and(|n| entry.root == Path::new("/").join(n))
}

fn is_device_node_mount(entry: &MountEntry, att: &Attachment) -> bool {
    shows(entry, att) && is_node_bind(entry, att)
}

/// Whether `entry`, known to show one of the volume's devices, is a bind of a device node
/// (a raw block publish) rather than its filesystem.
fn is_node_bind(entry: &MountEntry, att: &Attachment) -> bool {
    match att {
        Attachment::Device(dev) => entry.device() != (dev.major, dev.minor),
        Attachment::Directory(_) => false,
    }
}

/// What of a volume can be mounted on this node: its attachment and any read-only devices
/// handed out for read-only block publishes.
struct Owners {
    attachment: Option<Attachment>,
    read_only: Vec<LoopDevice>,
}

impl Owners {
    fn show(&self, entry: &MountEntry) -> bool {
        self.attachment.as_ref().is_some_and(|a| shows(entry, a))
            || self.read_only.iter().any(|d| shows_device(entry, d))
    }
}

impl Driver {
    /// Every mount of this attachment, from the kernel.
    fn mounts_of(&self, att: &Attachment) -> Result<Vec<MountEntry>> {
        Ok(self
            .host
            .mounter
            .mounts()?
            .into_iter()
            .filter(|m| shows(m, att))
            .collect())
    }

    fn owners(&self, dir: &Path) -> Result<Owners> {
        Ok(Owners {
            attachment: self.backend.attachment(dir)?,
            read_only: self
                .backend
                .devices(dir)?
                .into_iter()
                .filter(|d| d.read_only)
                .collect(),
        })
    }

    /// Thaws every mounted volume filesystem: a crash while a snapshot had one frozen must not
    /// leave it frozen. Thawing a filesystem that is not frozen does nothing.
    pub fn thaw_all(&self) -> Result<usize> {
        let ours = self.volume_devices()?;
        let mut thawed = 0;
        for m in self.host.mounter.mounts()? {
            if ours.contains(&m.device()) && m.root == Path::new("/") {
                match self.host.filesystems.thaw(&m.mount_point) {
                    Ok(()) => thawed += 1,
                    Err(e) => {
                        tracing::warn!(mount_point = %m.mount_point.display(), error = %e, "could not thaw")
                    }
                }
            }
        }
        Ok(thawed)
    }

    /// Freezes the volume's filesystem if it is mounted on this node, so a copy of its data is
    /// consistent; the guard thaws it. `None` when nothing is mounted (nothing can change).
    pub(crate) fn freeze_if_mounted(&self, id: &str, dir: &Path) -> Result<Option<Frozen<'_>>> {
        // Only a volume's own filesystem is frozen; a directory volume shares the pool's
        // filesystem, which is never frozen (its backends copy atomically or file by file).
        let Some(att @ Attachment::Device(_)) = self.backend.attachment(dir)? else {
            return Ok(None);
        };
        // Readers of one volume run together, but freeze it one at a time: a second
        // FIFREEZE fails, and a thaw must not come while another copy runs.
        let turn = self.guard_waiting(&format!("freeze {id}"))?;
        let Some(mount) = self
            .mounts_of(&att)?
            .into_iter()
            .find(|m| !is_device_node_mount(m, &att))
        else {
            return Ok(None);
        };
        let frozen = FrozenGuard::freeze(self.host.filesystems.as_ref(), &mount.mount_point)?;
        Ok(Some(Frozen {
            _frozen: frozen,
            _turn: turn,
        }))
    }

    /// Unmounts this volume's mounts stacked at `node`; never touches anybody else's. Returns
    /// the path reopened after the unmounts (`None` if it is gone).
    fn unmount_ours(&self, node: NodePath, owners: &Owners) -> Result<Option<NodePath>> {
        let mut node = Some(node);
        // Bounded: a mount point that keeps reappearing is reported, not looped on.
        for _ in 0..16 {
            let Some(current) = node.as_mut() else {
                return Ok(None);
            };
            let Some(top) = self.host.mounter.mount_at(current)? else {
                return Ok(node);
            };
            if !owners.show(&top) {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds a mount that is not this volume's ({} from {}); unmount it by hand",
                    bounded_display(&current.path),
                    top.fs_type,
                    bounded_display(Path::new(&top.source))
                )));
            }
            self.host.mounter.unmount(current)?;
            node = self.host.mounter.reopen(current)?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after 16 unmounts",
            bounded_display(&node.map(|n| n.path).unwrap_or_default())
        )))
    }

    /// Checks a capability at the node: what the volume cannot do is FAILED_PRECONDITION
    /// ("exceeds capabilities"), a malformed field INVALID_ARGUMENT.
    fn check_node_capability(&self, cap: &Capability) -> Result<()> {
        if cap.access_mode.is_multi_node() || (cap.is_block() && !self.backend.supports_block()) {
            return self
                .check_capability(cap)
                .map_err(|e| Error::FailedPrecondition(e.to_string()));
        }
        self.check_capability(cap)
    }

    /// The topmost mount at a checked path, with the opened path; `None` when the path does
    /// not exist.
    fn mount_at(&self, path: &CheckedPath) -> Result<Option<(NodePath, Option<MountEntry>)>> {
        let Some(node) = self.open_node(path, Create::Nothing)? else {
            return Ok(None);
        };
        let mount = self.host.mounter.mount_at(&node)?;
        Ok(Some((node, mount)))
    }

    pub fn stage_volume(&self, req: StageVolume) -> Result<()> {
        let staging = self.node_path("staging_target_path", &req.staging_path)?;
        let _guard = self.guard(&req.volume_id)?;
        let _path = self.path_guard(&staging)?;
        let record = self.volume(&req.volume_id)?;
        self.check_node_capability(&req.capability)?;
        let dir = self.store.dir(&record.id);
        let existing = self.mount_at(&staging)?.and_then(|(_, m)| m);

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
        let for_mount = !req.capability.is_block();
        // Held from here until the mount holds the device: nobody can detach it and hand it
        // to another volume while it is probed, formatted and mounted.
        let attached = self.backend.attach(&dir, for_mount)?;
        self.crash.reach("stage:after-attach");

        let AccessType::Mount {
            fs_type,
            mount_flags,
            ..
        } = &req.capability.access_type
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
        let fs_type = if self.backend.serves_directories() {
            fs_type.as_str()
        } else {
            fs_type_of(fs_type)?
        };
        let options = MountOptions::parse(mount_flags)?;
        let att = attached.attachment.clone();

        if let Some(m) = existing {
            // A bind-mounted directory has the pool's filesystem type, whatever was asked.
            let fs_differs = matches!(att, Attachment::Device(_)) && m.fs_type != fs_type;
            if fs_differs || m.read_only() != options.read_only() {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as {} ({}), incompatible with {fs_type} ({})",
                    record.id,
                    bounded_display(&staging.path),
                    m.fs_type,
                    if m.read_only() { "ro" } else { "rw" },
                    if options.read_only() { "ro" } else { "rw" },
                )));
            }
            // A retried stage whose online grow failed last time.
            if let Attachment::Device(dev) = &att {
                self.grow_if_pending(&record.id, &dev.path, Some(&m.mount_point), fs_type)?;
            }
            return Ok(());
        }

        let dev = match &att {
            Attachment::Device(dev) => dev.clone(),
            Attachment::Directory(src) => {
                let target = self.create_node(&staging, Create::Directory)?;
                return self.host.mounter.bind(
                    &NodePath::trusted(&src.path),
                    &target,
                    &options.per_mount(),
                );
            }
        };
        let id = record.id.clone();
        let staged = self
            .ensure_filesystem(record, &dev.path, fs_type)
            // ext2/3/4 grow before mounting (online growth may be refused by the kernel).
            .and_then(|()| match fs_type {
                "xfs" => Ok(()),
                _ => self.grow_if_pending(&id, &dev.path, None, fs_type),
            })
            .and_then(|()| self.create_node(&staging, Create::Directory))
            .and_then(|target| {
                self.host
                    .mounter
                    .mount_device(&dev.path, &target, fs_type, &options)?;
                Ok(target)
            });
        match staged {
            Ok(target) => {
                // From now on the kernel frees the loop device when the last mount goes.
                self.backend.release_on_unmount(&attached)?;
                drop(attached);
                // xfs grows only while mounted; xfs_growfs finds the filesystem by its mount
                // point as the mount table names it.
                let mount_point = match self.host.mounter.reopen(&target)? {
                    Some(node) => self.host.mounter.mount_at(&node)?.map(|m| m.mount_point),
                    None => None,
                };
                self.grow_if_pending(&id, &dev.path, mount_point.as_deref(), fs_type)
            }
            Err(e) => {
                drop(attached);
                if self.mounts_of(&att)?.is_empty() {
                    let _ = self.backend.detach(&dir);
                }
                Err(e)
            }
        }
    }

    /// Opens (creating) a checked node path of the given kind.
    fn create_node(&self, path: &CheckedPath, create: Create) -> Result<NodePath> {
        let node = self
            .open_node(path, create)?
            .ok_or_else(|| Error::Internal(format!("{} vanished", path.path.display())))?;
        let want_dir = create == Create::Directory;
        if node.is_dir != want_dir {
            return Err(Error::InvalidArgument(format!(
                "{} is {}; a {} volume needs {}",
                bounded_display(&path.path),
                if node.is_dir {
                    "a directory"
                } else {
                    "not a directory"
                },
                if want_dir { "filesystem" } else { "raw block" },
                if want_dir {
                    "a directory"
                } else {
                    "a file to bind the device onto"
                }
            )));
        }
        Ok(node)
    }

    /// Grows the filesystem to its device if the volume grew since it was formatted (restored
    /// into a larger volume, or expanded), then clears the mark.
    fn grow_if_pending(
        &self,
        id: &str,
        device: &Path,
        mount_point: Option<&Path>,
        fs_type: &str,
    ) -> Result<()> {
        let mut record = self.volume(id)?;
        if !record.resize_pending {
            return Ok(());
        }
        self.host.filesystems.grow(device, mount_point, fs_type)?;
        record.resize_pending = false;
        self.store.update(record)?;
        tracing::info!(volume_id = %id, fs_type, online = mount_point.is_some(), "filesystem grown");
        Ok(())
    }

    /// NodeExpandVolume: grows the volume to `range` if it is larger (expansion happens on
    /// the node that holds the volume; see docs/architecture.md), lets the device see the new
    /// size, and grows the filesystem mounted at `volume_path` online. Returns the capacity.
    pub fn node_expand_volume(
        &self,
        volume_id: &str,
        volume_path: &str,
        range: CapacityRange,
    ) -> Result<u64> {
        let record = self.volume(volume_id)?;
        let volume_path = self.volume_path(volume_id, volume_path)?;
        let _guard = self.guard(volume_id)?;
        let dir = self.store.dir(&record.id);
        let owners = self.owners(&dir)?;
        let (_, here, att) = self.visible_at(volume_id, &volume_path, &owners)?;
        let record = self.grow_volume(record, range)?;
        // Lets an attached device see the image's size (also after a restart between the
        // image's growth and this call).
        self.backend.expand(&dir, record.capacity_bytes)?;
        self.crash.reach("node-expand:before-grow");
        match &att {
            // A raw block volume: the refreshed device is all there is to grow.
            Attachment::Device(dev) if !is_device_node_mount(&here, &att) => self.grow_if_pending(
                &record.id,
                &dev.path,
                Some(&here.mount_point),
                &here.fs_type,
            )?,
            _ => {}
        }
        Ok(record.capacity_bytes)
    }

    /// Formats the device if it holds nothing yet; never formats over data.
    fn ensure_filesystem(
        &self,
        mut record: VolumeRecord,
        device: &Path,
        fs_type: &str,
    ) -> Result<()> {
        let interrupted = matches!(record.format, FormatState::Formatting(_));
        match self.host.filesystems.probe(device)? {
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
                if !interrupted && self.backend.has_data(&self.store.dir(&record.id))? =>
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
        self.store.update(record.clone())?;
        self.host.filesystems.format(device, fs_type)?;
        self.crash.reach("stage:after-format");
        record.format = FormatState::Formatted(fs_type.to_owned());
        self.store.update(record)?;
        tracing::info!(device = %device.display(), fs_type, "formatted a new volume");
        Ok(())
    }

    pub fn unstage_volume(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let Some(staging) = self.undo_path("staging_target_path", volume_id, staging_path)? else {
            return Ok(());
        };
        let _guard = self.guard(volume_id)?;
        let _path = self.path_guard(&staging)?;
        let record = self.volume(volume_id)?;
        let dir = self.store.dir(&record.id);
        let owners = self.owners(&dir)?;
        let Some(att) = &owners.attachment else {
            // Not attached, so nothing of this volume can be mounted: not staged.
            return Ok(());
        };
        let here = self
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
        self.unmount_ours(node, &owners)?;
        self.crash.reach("unstage:after-unmount");
        self.backend.detach(&dir)
    }

    pub fn publish_volume(&self, req: PublishVolume) -> Result<()> {
        let target = self.node_path("target_path", &req.target_path)?;
        let staging = req
            .staging_path
            .as_deref()
            .map(|p| self.node_path("staging_target_path", p))
            .transpose()?;
        let _guard = self.guard(&req.volume_id)?;
        let _path = self.path_guard(&target)?;
        let record = self.volume(&req.volume_id)?;
        self.check_node_capability(&req.capability)?;
        let Some(staging) = &staging else {
            return Err(Error::FailedPrecondition(
                "staging_target_path is required: call NodeStageVolume first".into(),
            ));
        };
        let requested = match &req.capability.access_type {
            AccessType::Mount { mount_flags, .. } => MountOptions::parse(mount_flags)?,
            AccessType::Block => MountOptions::default(),
        };
        let dir = self.store.dir(&record.id);
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {}: call NodeStageVolume first",
                record.id,
                bounded_display(&staging.path)
            ))
        };
        // Opened first: a target that passes through a symlink is refused before anything.
        let at_target = self.mount_at(&target)?.and_then(|(_, m)| m);
        let owners = self.owners(&dir)?;
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
            let (node, mount) = self.mount_at(staging)?.ok_or_else(not_staged)?;
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
            let target_node = self.create_node(&target, Create::File)?;
            self.crash.reach("publish:before-bind");
            let bound = self.host.mounter.bind(
                &NodePath::trusted(&device.device.path),
                &target_node,
                &flags,
            );
            if bound.is_err() && device.device.read_only {
                self.release_read_only_devices(&dir)?;
            }
            return bound;
        }
        let (staged_node, staged) = staged_mount.ok_or_else(not_staged)?;
        // The stage's own flags (noexec...) stay on every publish of it.
        let flags = flags.with(&MountOptions::from_names(&staged.options));
        let target_node = self.create_node(&target, Create::Directory)?;
        self.crash.reach("publish:before-bind");
        self.host.mounter.bind(&staged_node, &target_node, &flags)
    }

    /// Detaches read-only devices of the volume that no mount shows any more.
    fn release_read_only_devices(&self, dir: &Path) -> Result<()> {
        let owners = self.owners(dir)?;
        if owners.read_only.is_empty() {
            return Ok(());
        }
        let mounts = self.host.mounter.mounts()?;
        for dev in owners.read_only {
            if !mounts.iter().any(|m| shows_device(m, &dev)) {
                self.host.loops.detach(&dev)?;
            }
        }
        Ok(())
    }

    pub fn unpublish_volume(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let Some(target) = self.undo_path("target_path", volume_id, target_path)? else {
            return Ok(());
        };
        let _guard = self.guard(volume_id)?;
        let _path = self.path_guard(&target)?;
        let record = self.volume(volume_id)?;
        let dir = self.store.dir(&record.id);
        let owners = self.owners(&dir)?;
        let Some(node) = self.open_node(&target, Create::Nothing)? else {
            return Ok(());
        };
        let node = self.unmount_ours(node, &owners)?;
        self.crash.reach("unpublish:after-unmount");
        self.release_read_only_devices(&dir)?;
        // Only what a publish creates is removed: an empty directory or an empty file.
        if let Some(node) = node
            && !self.host.mounter.remove_if_created(&node)?
        {
            tracing::warn!(volume_id, target_path = %bounded_display(&node.path),
                "left the target path in place: it is not an empty directory or an empty file that a publish creates");
        }
        Ok(())
    }

    pub fn volume_stats(&self, volume_id: &str, volume_path: &str) -> Result<VolumeStats> {
        let record = self.volume(volume_id)?;
        let volume_path = self.volume_path(volume_id, volume_path)?;
        let dir = self.store.dir(&record.id);
        let abnormal_backend = self.backend.condition(&dir, record.capacity_bytes);
        let owners = self.owners(&dir)?;
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

impl Driver {
    /// The `volume_path` of NodeGetVolumeStats or NodeExpandVolume. Empty is invalid; a path
    /// Strata never mounts on (relative, outside the allowed directories, in the pool)
    /// cannot hold the volume: NOT_FOUND, as the spec's tables say for a volume that is not
    /// at the path.
    fn volume_path(&self, volume_id: &str, raw: &str) -> Result<CheckedPath> {
        if raw.is_empty() {
            return Err(Error::InvalidArgument("volume_path is required".into()));
        }
        absolute_path("volume_path", raw)
            .and_then(|p| self.node_path("volume_path", &p))
            .map_err(|_| not_at(volume_id, raw))
    }

    /// The volume's mount at `path` (its filesystem, a bind of it, or its device node), with
    /// the node opened there and the volume's attachment; NOT_FOUND when the path does not
    /// show the volume.
    fn visible_at(
        &self,
        volume_id: &str,
        path: &CheckedPath,
        owners: &Owners,
    ) -> Result<(NodePath, MountEntry, Attachment)> {
        let not_here = || not_at(volume_id, &path.path.to_string_lossy());
        let att = owners.attachment.clone().ok_or_else(not_here)?;
        match self.mount_at(path)? {
            Some((node, Some(entry))) if owners.show(&entry) => Ok((node, entry, att)),
            _ => Err(not_here()),
        }
    }

    /// For NodeUnstageVolume and NodeUnpublishVolume: a path Strata never mounts on holds
    /// nothing of a volume's, so there is nothing to undo there (the spec's answer for a
    /// volume not staged or published at a path is OK). `None` then, with a warning.
    fn undo_path(&self, field: &str, volume_id: &str, path: &Path) -> Result<Option<CheckedPath>> {
        match self.node_path(field, path) {
            Ok(checked) => Ok(Some(checked)),
            Err(e) => {
                self.volume(volume_id)?;
                tracing::warn!(volume_id, error = %e, "nothing to undo: Strata never mounts there");
                Ok(None)
            }
        }
    }
}

/// A volume's filesystem frozen for a copy, and its turn to be: thawed first, then the turn
/// released (fields drop in order).
pub(crate) struct Frozen<'a> {
    _frozen: FrozenGuard<'a>,
    _turn: crate::inflight::Guard,
}

fn not_at(volume_id: &str, path: &str) -> Error {
    Error::NotFound(format!(
        "volume {volume_id} is not staged or published at {}",
        echo(path)
    ))
}

fn still_published(volume_id: &str, m: &MountEntry) -> Error {
    Error::FailedPrecondition(format!(
        "volume {volume_id} is still published at {}: unpublish it first",
        bounded_display(&m.mount_point)
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::image::ImageBackend;
    use crate::controller::CreateVolume;
    use crate::driver::Config;
    use crate::fault::FaultPoints;
    use crate::model::{AccessMode, MIB};
    use crate::os::fake::FakeHost;

    struct Fixture {
        _pool: tempfile::TempDir,
        fake: Arc<FakeHost>,
        driver: Driver,
    }

    fn fixture() -> Fixture {
        let pool = tempfile::tempdir().unwrap();
        let fake = FakeHost::new();
        let host = fake.host();
        let config = Config {
            driver_name: "strata.csi.dev".into(),
            node_id: "n1".into(),
            pool: pool.path().to_owned(),
            max_volumes_per_node: 0,
            topology_key: "strata.csi.dev/node".into(),
            allowed_path_prefixes: vec!["/".into()],
            forbidden_paths: vec![],
        };
        let backend = Arc::new(ImageBackend::new(pool.path().to_owned(), host.clone()));
        let (driver, _) = Driver::open(config, host, backend, FaultPoints::default()).unwrap();
        Fixture {
            _pool: pool,
            fake,
            driver,
        }
    }

    fn mount(mode: AccessMode) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
            access_mode: mode,
        }
    }

    fn create(d: &Driver) -> String {
        d.create_volume(CreateVolume {
            name: "v".into(),
            capabilities: vec![mount(AccessMode::SingleNodeWriter)],
            capacity: crate::model::CapacityRange {
                required: 16 * MIB,
                limit: 0,
            },
            ..Default::default()
        })
        .unwrap()
        .id
    }

    fn stage(d: &Driver, id: &str) -> Result<()> {
        d.stage_volume(StageVolume {
            volume_id: id.into(),
            staging_path: "/stage".into(),
            capability: mount(AccessMode::SingleNodeWriter),
        })
    }

    fn publish(
        d: &Driver,
        id: &str,
        target: &str,
        read_only: bool,
        mode: AccessMode,
    ) -> Result<()> {
        d.publish_volume(PublishVolume {
            volume_id: id.into(),
            staging_path: Some("/stage".into()),
            target_path: PathBuf::from(target),
            capability: mount(mode),
            read_only,
        })
    }

    #[test]
    fn staging_formats_once_and_survives_a_reboot() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        stage(&f.driver, &id).unwrap();
        assert_eq!(f.fake.lock().formats, 1);
        assert_eq!(f.fake.lock().mounts.len(), 1);
        assert_eq!(
            f.driver.store.get(&id).unwrap().format,
            FormatState::Formatted("ext4".into())
        );
        f.fake.reboot();
        stage(&f.driver, &id).unwrap();
        assert_eq!(
            f.fake.lock().formats,
            1,
            "an existing filesystem is mounted, not reformatted"
        );
        f.driver.unstage_volume(&id, Path::new("/stage")).unwrap();
        assert!(f.fake.lock().mounts.is_empty());
        assert!(f.fake.lock().loops.is_empty());
    }

    #[test]
    fn an_mkfs_cut_short_by_a_crash_is_redone() {
        let f = fixture();
        let id = create(&f.driver);
        let mut rec = f.driver.store.get(&id).unwrap();
        rec.format = FormatState::Formatting("ext4".into());
        f.driver.store.update(rec).unwrap();
        // The partial mkfs left a signature behind.
        let image = f.driver.store.dir(&id).join("image");
        f.fake.lock().filesystems.insert(image, "ext4".into());
        stage(&f.driver, &id).unwrap();
        assert_eq!(f.fake.lock().formats, 1);
    }

    #[test]
    fn publish_and_unstage_conflicts_get_the_spec_codes() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        publish(&f.driver, &id, "/t1", false, AccessMode::SingleNodeWriter).unwrap();
        publish(&f.driver, &id, "/t1", false, AccessMode::SingleNodeWriter).unwrap();
        assert!(matches!(
            publish(&f.driver, &id, "/t1", true, AccessMode::SingleNodeWriter),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            publish(&f.driver, &id, "/t2", false, AccessMode::SingleNodeWriter),
            Err(Error::FailedPrecondition(_))
        ));
        publish(
            &f.driver,
            &id,
            "/t2",
            true,
            AccessMode::SingleNodeMultiWriter,
        )
        .unwrap();
        assert!(matches!(
            f.driver.unstage_volume(&id, Path::new("/stage")),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            f.driver.delete_volume(&id),
            Err(Error::FailedPrecondition(_))
        ));
        f.driver.unpublish_volume(&id, Path::new("/t1")).unwrap();
        f.driver.unpublish_volume(&id, Path::new("/t2")).unwrap();
        f.driver.unstage_volume(&id, Path::new("/stage")).unwrap();
        f.driver.delete_volume(&id).unwrap();
    }

    #[test]
    fn unstage_where_the_volume_is_not_staged_answers_ok_and_touches_nothing() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        // Staged at /stage; an unstage at another path is a no-op (the spec's rule).
        f.driver
            .unstage_volume(&id, Path::new("/elsewhere"))
            .unwrap();
        assert_eq!(f.fake.lock().mounts.len(), 1);
        assert_eq!(f.fake.lock().loops.len(), 1);
        f.driver.unstage_volume(&id, Path::new("/stage")).unwrap();
        assert!(f.fake.lock().mounts.is_empty());
    }

    #[test]
    fn a_concurrent_operation_on_the_same_volume_is_aborted() {
        let f = fixture();
        let id = create(&f.driver);
        let _busy = f.driver.guard(&id).unwrap();
        assert!(matches!(stage(&f.driver, &id), Err(Error::Aborted(_))));
        assert!(matches!(
            f.driver.delete_volume(&id),
            Err(Error::Aborted(_))
        ));
    }

    #[test]
    fn stats_report_usage_of_the_mounted_filesystem() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        // Staged, but not at these paths: NOT_FOUND, however the path is spelled.
        for elsewhere in ["/proc", "/var/lib/kubelet/other", "some/path", "/etc/x"] {
            assert!(
                matches!(
                    f.driver.volume_stats(&id, elsewhere),
                    Err(Error::NotFound(_))
                ),
                "{elsewhere}"
            );
        }
        assert!(matches!(
            f.driver.volume_stats(&id, ""),
            Err(Error::InvalidArgument(_))
        ));
        let here = "/var/lib/kubelet/stage";
        f.fake.lock().mounts[0].mount_point = here.into();
        let s = f.driver.volume_stats(&id, here).unwrap();
        assert!(matches!(s.usage, Some(Usage::Filesystem(_))));
        assert_eq!(s.abnormal, None);
        // The filesystem remounted itself read-only after errors.
        f.fake.lock().mounts[0].super_options = vec!["ro".into()];
        let s = f.driver.volume_stats(&id, here).unwrap();
        assert!(s.abnormal.unwrap().contains("read-only after errors"));
    }
}
