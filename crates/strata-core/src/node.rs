//! Node operations: stage, publish, and their reverses, and volume stats. What is staged or
//! published is read from the kernel (mount table, loop devices) on every call, so a retried
//! call after a crash or a reboot sees the truth and finishes the job.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::backend::{Attached, Attachment};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::model::{AccessType, Capability, FormatState, VolumeRecord, fs_type_of};
use crate::os::{FrozenGuard, MountEntry, MountOptions, Probe};

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
        Attachment::Device(dev) => {
            entry.device() == (dev.major, dev.minor)
                || dev
                    .path
                    .file_name()
                    .is_some_and(|n| entry.root == Path::new("/").join(n))
        }
        Attachment::Directory(d) => entry.device() == d.device && entry.root == d.root,
    }
}

fn is_device_node_mount(entry: &MountEntry, att: &Attachment) -> bool {
    match att {
        Attachment::Device(dev) => entry.device() != (dev.major, dev.minor) && shows(entry, att),
        Attachment::Directory(_) => false,
    }
}

fn remove_mount_point(path: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
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

    /// Thaws every mounted volume filesystem: a crash while a snapshot had one frozen must not
    /// leave it frozen. Thawing a filesystem that is not frozen does nothing.
    pub fn thaw_all(&self) -> Result<usize> {
        let loops = self.host.loops.list()?;
        let mut thawed = 0;
        for m in self.host.mounter.mounts()? {
            let ours = loops.iter().any(|l| {
                (l.major, l.minor) == m.device() && l.backing_file.starts_with(&self.config.pool)
            });
            if ours && m.root == Path::new("/") {
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
    pub(crate) fn freeze_if_mounted(&self, dir: &Path) -> Result<Option<FrozenGuard<'_>>> {
        // Only a volume's own filesystem is frozen; a directory volume shares the pool's
        // filesystem, which is never frozen (its backends copy atomically or file by file).
        let Some(att @ Attachment::Device(_)) = self.backend.attachment(dir)? else {
            return Ok(None);
        };
        let Some(mount) = self
            .mounts_of(&att)?
            .into_iter()
            .find(|m| !is_device_node_mount(m, &att))
        else {
            return Ok(None);
        };
        FrozenGuard::freeze(self.host.filesystems.as_ref(), &mount.mount_point).map(Some)
    }

    /// Unmounts this volume's mounts stacked at `path`; never touches anybody else's.
    fn unmount_volume_at(&self, path: &Path, att: Option<&Attachment>) -> Result<()> {
        // Bounded: a mount point that keeps reappearing is reported, not looped on.
        for _ in 0..16 {
            let Some(top) = self.host.mounts_at(path)?.pop() else {
                return Ok(());
            };
            if !att.is_some_and(|a| shows(&top, a)) {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds a mount that is not this volume's ({} from {}); unmount it by hand",
                    path.display(),
                    top.fs_type,
                    top.source
                )));
            }
            self.host.mounter.unmount(path)?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after 16 unmounts",
            path.display()
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

    pub fn stage_volume(&self, mut req: StageVolume) -> Result<()> {
        req.staging_path = self.node_path("staging_target_path", &req.staging_path)?;
        let _guard = self.guard(&req.volume_id)?;
        let record = self.volume(&req.volume_id)?;
        self.check_node_capability(&req.capability)?;
        let dir = self.store.dir(&record.id);
        let existing: Vec<MountEntry> = self.host.mounts_at(&req.staging_path)?;

        // Checked before attaching, so a refused stage leaves no loop device behind.
        let current = self.backend.attachment(&dir)?;
        if let Some(other) = existing
            .iter()
            .find(|m| !current.as_ref().is_some_and(|a| shows(m, a)))
        {
            return Err(Error::AlreadyExists(format!(
                "{} already holds another mount ({} from {}): choose another staging path",
                req.staging_path.display(),
                other.fs_type,
                other.source
            )));
        }
        let for_mount = !req.capability.is_block();
        let attached = match current {
            Some(att) => Attached {
                attachment: att,
                hold: None,
                auto_clear: false,
            },
            None => self.backend.attach(&dir, for_mount)?,
        };
        let att = attached.attachment.clone();
        self.crash.reach("stage:after-attach");

        let AccessType::Mount {
            fs_type,
            mount_flags,
            ..
        } = &req.capability.access_type
        else {
            // Raw block: staged means attached; publish binds the device node.
            if let Some(m) = existing.first() {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as a {} filesystem, not as a block device",
                    record.id,
                    req.staging_path.display(),
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

        if let Some(m) = existing.first() {
            // A bind-mounted directory has the pool's filesystem type, whatever was asked.
            let fs_differs = matches!(att, Attachment::Device(_)) && m.fs_type != fs_type;
            if fs_differs || m.read_only() != options.read_only() {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as {} ({}), incompatible with {fs_type} ({})",
                    record.id,
                    req.staging_path.display(),
                    m.fs_type,
                    if m.read_only() { "ro" } else { "rw" },
                    if options.read_only() { "ro" } else { "rw" },
                )));
            }
            // A retried stage whose online grow failed last time.
            if let Attachment::Device(dev) = &att {
                self.grow_if_pending(&record.id, &dev.path, Some(&req.staging_path), fs_type)?;
            }
            return Ok(());
        }

        let dev = match &att {
            Attachment::Device(dev) => dev,
            Attachment::Directory(src) => {
                Self::ensure_dir(&req.staging_path)?;
                return self
                    .host
                    .mounter
                    .bind(&src.path, &req.staging_path, options.read_only());
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
            .and_then(|()| Self::ensure_dir(&req.staging_path))
            .and_then(|()| {
                self.host
                    .mounter
                    .mount_device(&dev.path, &req.staging_path, fs_type, &options)
            });
        match staged {
            Ok(()) => {
                // From now on the kernel frees the loop device when the last mount goes.
                if !attached.auto_clear {
                    self.backend.release_on_unmount(&att)?;
                }
                drop(attached.hold);
                // xfs grows only while mounted.
                self.grow_if_pending(&id, &dev.path, Some(&req.staging_path), fs_type)
            }
            Err(e) => {
                drop(attached.hold);
                if self.mounts_of(&att)?.is_empty() {
                    let _ = self.backend.detach(&dir);
                }
                Err(e)
            }
        }
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

    /// NodeExpandVolume: lets the device see the volume's new size and grows the mounted
    /// filesystem online. Returns the volume's capacity.
    pub fn node_expand_volume(
        &self,
        volume_id: &str,
        volume_path: &Path,
        required: u64,
    ) -> Result<u64> {
        let volume_path = &self.node_path("volume_path", volume_path)?;
        let _guard = self.guard(volume_id)?;
        let record = self.volume(volume_id)?;
        if required > record.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {volume_id} is {} bytes, less than the {required} requested: call ControllerExpandVolume first",
                record.capacity_bytes
            )));
        }
        let dir = self.store.dir(&record.id);
        let Some(att) = self.backend.attachment(&dir)? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is not staged on this node; it grows when it is staged"
            )));
        };
        self.backend.expand(&dir, record.capacity_bytes)?;
        self.crash.reach("node-expand:before-grow");
        let Attachment::Device(dev) = &att else {
            return Ok(record.capacity_bytes);
        };
        let mounts = self.mounts_of(&att)?;
        let Some(fs_mount) = mounts
            .iter()
            .filter(|m| !is_device_node_mount(m, &att))
            .min_by_key(|m| m.mount_point != *volume_path)
        else {
            // A raw block volume: the refreshed device is all there is to grow.
            return Ok(record.capacity_bytes);
        };
        let fs_type = fs_mount.fs_type.clone();
        self.grow_if_pending(&record.id, &dev.path, Some(&fs_mount.mount_point), &fs_type)?;
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
        let staging_path = &self.node_path("staging_target_path", staging_path)?;
        let _guard = self.guard(volume_id)?;
        let record = self.volume(volume_id)?;
        let dir = self.store.dir(&record.id);
        let Some(att) = self.backend.attachment(&dir)? else {
            // Not attached, so nothing of this volume can be mounted: not staged.
            return Ok(());
        };
        let published: Vec<PathBuf> = self
            .mounts_of(&att)?
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p != staging_path)
            .collect();
        if let Some(p) = published.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is still published at {}: unpublish it first",
                p.display()
            )));
        }
        self.unmount_volume_at(staging_path, Some(&att))?;
        self.crash.reach("unstage:after-unmount");
        self.backend.detach(&dir)
    }

    pub fn publish_volume(&self, mut req: PublishVolume) -> Result<()> {
        req.target_path = self.node_path("target_path", &req.target_path)?;
        if let Some(staging) = &req.staging_path {
            req.staging_path = Some(self.node_path("staging_target_path", staging)?);
        }
        let _guard = self.guard(&req.volume_id)?;
        let record = self.volume(&req.volume_id)?;
        self.check_node_capability(&req.capability)?;
        let Some(staging) = &req.staging_path else {
            return Err(Error::FailedPrecondition(
                "staging_target_path is required: call NodeStageVolume first".into(),
            ));
        };
        let dir = self.store.dir(&record.id);
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {}: call NodeStageVolume first",
                record.id,
                staging.display()
            ))
        };
        let att = self.backend.attachment(&dir)?.ok_or_else(not_staged)?;
        // One read of the mount table serves both questions below.
        let table = self.host.mounter.mounts()?;
        let mounts: Vec<MountEntry> = table.iter().filter(|m| shows(m, &att)).cloned().collect();
        let read_only = req.read_only || req.capability.access_mode.is_read_only();
        let block = req.capability.is_block();

        let source = if block {
            if let Some(fs_mount) = mounts.iter().find(|m| !is_device_node_mount(m, &att)) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is mounted as a filesystem at {}; it cannot also be published as a raw block device",
                    record.id,
                    fs_mount.mount_point.display()
                )));
            }
            match &att {
                Attachment::Device(dev) => dev.path.clone(),
                Attachment::Directory(_) => return Err(not_staged()),
            }
        } else {
            mounts
                .iter()
                .find(|m| m.mount_point == *staging && !is_device_node_mount(m, &att))
                .ok_or_else(not_staged)?;
            staging.clone()
        };

        let at_target: Vec<MountEntry> = table
            .into_iter()
            .filter(|m| m.mount_point == req.target_path)
            .collect();
        if let Some(m) = at_target.last() {
            let same_kind = block == is_device_node_mount(m, &att);
            if shows(m, &att) && same_kind && m.read_only() == read_only {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} already holds {}: unpublish it or choose another target path",
                req.target_path.display(),
                if shows(m, &att) {
                    format!(
                        "this volume published {}",
                        if m.read_only() {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )
                } else {
                    format!("another mount ({} from {})", m.fs_type, m.source)
                }
            )));
        }
        let elsewhere = mounts
            .iter()
            .find(|m| m.mount_point != *staging && m.mount_point != req.target_path);
        if let (Some(m), false) = (
            elsewhere,
            req.capability.access_mode.allows_several_targets(),
        ) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is already published at {} and access mode {:?} allows one target: use SINGLE_NODE_MULTI_WRITER to share it",
                record.id,
                m.mount_point.display(),
                req.capability.access_mode
            )));
        }

        if block {
            if let Some(parent) = req.target_path.parent() {
                Self::ensure_dir(parent)?;
            }
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&req.target_path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("create {}", req.target_path.display()),
                        e,
                    ));
                }
            }
        } else {
            Self::ensure_dir(&req.target_path)?;
        }
        self.crash.reach("publish:before-bind");
        self.host.mounter.bind(&source, &req.target_path, read_only)
    }

    pub fn unpublish_volume(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let target_path = &self.node_path("target_path", target_path)?;
        let _guard = self.guard(volume_id)?;
        let record = self.volume(volume_id)?;
        let att = self.backend.attachment(&self.store.dir(&record.id))?;
        self.unmount_volume_at(target_path, att.as_ref())?;
        self.crash.reach("unpublish:after-unmount");
        remove_mount_point(target_path)
    }

    pub fn volume_stats(&self, volume_id: &str, volume_path: &Path) -> Result<VolumeStats> {
        let volume_path = &self.node_path("volume_path", volume_path)?;
        let record = self.volume(volume_id)?;
        let dir = self.store.dir(&record.id);
        fs::symlink_metadata(volume_path).map_err(|e| {
            Error::NotFound(format!(
                "volume_path {} is not there ({e})",
                volume_path.display()
            ))
        })?;
        let abnormal_backend = self.backend.condition(&dir, record.capacity_bytes);
        let Some(att) = self.backend.attachment(&dir)? else {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not staged or published on this node"
            )));
        };
        let Some(entry) = self
            .host
            .mounts_at(volume_path)?
            .into_iter()
            .rev()
            .find(|m| shows(m, &att))
        else {
            // In use on this node, but its mount at this path is gone.
            return Ok(VolumeStats {
                usage: None,
                abnormal: Some(format!(
                    "volume {volume_id} is not mounted at {} any more: the mount is gone; unpublish and publish it again",
                    volume_path.display()
                )),
            });
        };
        let abnormal_backend = abnormal_backend.or_else(|| {
            entry.failed_read_only().then(|| {
                "the filesystem went read-only after errors: unstage the volume and check it with fsck".to_owned()
            })
        });
        if is_device_node_mount(&entry, &att) {
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
        match self.host.filesystems.usage(volume_path) {
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
        let gone = f.driver.volume_stats(&id, Path::new("/proc")).unwrap();
        assert!(
            gone.abnormal.unwrap().contains("gone"),
            "staged, but not mounted at /proc"
        );
        f.fake.lock().mounts[0].mount_point = std::env::temp_dir();
        let s = f.driver.volume_stats(&id, &std::env::temp_dir()).unwrap();
        assert!(matches!(s.usage, Some(Usage::Filesystem(_))));
        assert_eq!(s.abnormal, None);
        // The filesystem remounted itself read-only after errors.
        f.fake.lock().mounts[0].super_options = vec!["ro".into()];
        let s = f.driver.volume_stats(&id, &std::env::temp_dir()).unwrap();
        assert!(s.abnormal.unwrap().contains("read-only after errors"));
    }
}
