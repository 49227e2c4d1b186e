//! Node operations: stage, publish, and their reverses, and volume stats. What is staged or
//! published is read from the kernel (mount table, loop devices) on every call, so a retried
//! call after a crash or a reboot sees the truth and finishes the job.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::backend::Attachment;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::model::{AccessType, Capability, FormatState, VolumeRecord, fs_type_of};
use crate::os::{MountEntry, MountOptions, Probe};

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
        Attachment::Directory(dir) => entry.root == *dir,
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

    /// Unmounts everything stacked at `path`.
    fn unmount_all(&self, path: &Path) -> Result<()> {
        // Bounded: a mount point that keeps reappearing is reported, not looped on.
        for _ in 0..16 {
            if self.host.mounts_at(path)?.is_empty() {
                return Ok(());
            }
            self.host.mounter.unmount(path)?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after 16 unmounts",
            path.display()
        )))
    }

    pub fn stage_volume(&self, req: StageVolume) -> Result<()> {
        let _guard = self.guard(&req.volume_id)?;
        let record = self.volume(&req.volume_id)?;
        self.check_capability(&req.capability)
            .map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let dir = self.store.dir(&record.id);
        let existing: Vec<MountEntry> = self.host.mounts_at(&req.staging_path)?;

        let att = self.backend.attach(&dir)?;
        self.crash.reach("stage:after-attach");
        if let Some(other) = existing.iter().find(|m| !shows(m, &att)) {
            return Err(Error::AlreadyExists(format!(
                "{} already holds another mount ({} from {}): choose another staging path",
                req.staging_path.display(),
                other.fs_type,
                other.source
            )));
        }

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
        let fs_type = fs_type_of(fs_type)?;
        let options = MountOptions::parse(mount_flags)?;

        if let Some(m) = existing.first() {
            if m.fs_type != fs_type || m.read_only() != options.read_only() {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as {} ({}), incompatible with {fs_type} ({})",
                    record.id,
                    req.staging_path.display(),
                    m.fs_type,
                    if m.read_only() { "ro" } else { "rw" },
                    if options.read_only() { "ro" } else { "rw" },
                )));
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
                    .bind(src, &req.staging_path, options.read_only());
            }
        };
        let staged = self
            .ensure_filesystem(record, &dev.path, fs_type)
            .and_then(|()| Self::ensure_dir(&req.staging_path))
            .and_then(|()| {
                self.host
                    .mounter
                    .mount_device(&dev.path, &req.staging_path, fs_type, &options)
            });
        match staged {
            // From now on the kernel frees the loop device when the last mount goes.
            Ok(()) => self.backend.release_on_unmount(&att),
            Err(e) => {
                if self.mounts_of(&att)?.is_empty() {
                    let _ = self.backend.detach(&dir);
                }
                Err(e)
            }
        }
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
        let _guard = self.guard(volume_id)?;
        let record = self.volume(volume_id)?;
        let dir = self.store.dir(&record.id);
        let Some(att) = self.backend.attachment(&dir)? else {
            // Not attached: at most a stale mount point is left.
            self.unmount_all(staging_path)?;
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
        self.unmount_all(staging_path)?;
        self.backend.detach(&dir)
    }

    pub fn publish_volume(&self, req: PublishVolume) -> Result<()> {
        let _guard = self.guard(&req.volume_id)?;
        let record = self.volume(&req.volume_id)?;
        self.check_capability(&req.capability)
            .map_err(|e| Error::FailedPrecondition(e.to_string()))?;
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
        let mounts = self.mounts_of(&att)?;
        let read_only = req.read_only || req.capability.access_mode.is_read_only();
        let block = req.capability.is_block();

        let source = if block {
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

        let at_target: Vec<MountEntry> = self.host.mounts_at(&req.target_path)?;
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
        self.host.mounter.bind(&source, &req.target_path, read_only)
    }

    pub fn unpublish_volume(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let _guard = self.guard(volume_id)?;
        self.volume(volume_id)?;
        self.unmount_all(target_path)?;
        remove_mount_point(target_path)
    }

    pub fn volume_stats(&self, volume_id: &str, volume_path: &Path) -> Result<VolumeStats> {
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
        let entry = self
            .host
            .mounts_at(volume_path)?
            .into_iter()
            .rev()
            .find(|m| shows(m, &att))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "volume {volume_id} is not mounted at {}",
                    volume_path.display()
                ))
            })?;
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
