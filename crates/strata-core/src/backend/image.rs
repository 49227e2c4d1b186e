//! The image backend (the default): a sparse image file per volume, attached through a loop
//! device. Thin-provisioned: an image takes pool space only as data is written.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Attached, Attachment, Backend};
use crate::error::{Error, IoContext, Result};
use crate::model::{CopyMethod, GIB, MIB, SizePolicy};
use crate::os::{AttachOptions, FileId, FsUsage, HeldLoop, Host, LoopDevice};

pub const IMAGE_FILE: &str = "image";

pub struct ImageBackend {
    pool: PathBuf,
    host: Host,
    /// Set once the slow-copy warning has been logged.
    warned_sparse_copy: AtomicBool,
}

impl ImageBackend {
    /// `pool` must be canonical: the kernel reports loop backing files by canonical path.
    pub fn new(pool: PathBuf, host: Host) -> Self {
        ImageBackend {
            pool,
            host,
            warned_sparse_copy: AtomicBool::new(false),
        }
    }

    fn image(dir: &Path) -> PathBuf {
        dir.join(IMAGE_FILE)
    }

    /// Whether the pool shares extents, tried on two scratch files: decides whether snapshots
    /// cost O(1) or O(data).
    pub fn detect_copy_method(&self) -> Result<CopyMethod> {
        Ok(self.host.filesystems.copy_method_in(&self.pool)?)
    }

    /// Extends an image to `size` bytes (never shrinks it), durably.
    fn grow_image(&self, image: &Path, size: u64) -> Result<()> {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(image)
            .ctx(|| format!("open {}", image.display()))?;
        let len = file
            .metadata()
            .ctx(|| format!("stat {}", image.display()))?
            .len();
        if len < size {
            file.set_len(size)
                .and_then(|_| file.sync_all())
                .ctx(|| format!("grow {} to {size} bytes", image.display()))?;
        }
        Ok(())
    }
}

impl Backend for ImageBackend {
    fn kind(&self) -> &'static str {
        "image"
    }

    fn size_policy(&self) -> SizePolicy {
        SizePolicy {
            granularity: MIB,
            minimum: 16 * MIB,
            default: GIB,
            // ext4's largest file with 4 KiB blocks.
            maximum: 16 * 1024 * GIB - 4096,
        }
    }

    fn supports_block(&self) -> bool {
        true
    }

    /// Each volume has its own loop device, whose I/O a cgroup throttles.
    fn limits_io(&self) -> bool {
        true
    }

    /// Every volume has its own filesystem on its own device, so each can be frozen.
    fn group_consistency(&self) -> super::GroupConsistency {
        super::GroupConsistency::Freeze
    }

    fn pool_usage(&self) -> Result<FsUsage> {
        Ok(self.host.filesystems.usage(&self.pool)?)
    }

    fn create(&self, dir: &Path, size: u64) -> Result<()> {
        // No fsync: an empty image is derived from the record, and `repair` recreates or
        // extends it at startup if a crash lost it. That saves a flush per CreateVolume.
        let path = Self::image(dir);
        let file = File::create_new(&path).ctx(|| format!("create {}", path.display()))?;
        file.set_len(size)
            .ctx(|| format!("size {} to {size} bytes", path.display()))
    }

    fn block_layout(&self) -> bool {
        true
    }

    fn open_data(&self, dir: &Path) -> Result<File> {
        let path = Self::image(dir);
        File::open(&path).ctx(|| format!("open {}", path.display()))
    }

    fn import(&self, dir: &Path, size: u64) -> Result<File> {
        let path = Self::image(dir);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("create {}", path.display()))?;
        file.set_len(size)
            .ctx(|| format!("size {} to {size} bytes", path.display()))?;
        Ok(file)
    }

    fn reopen_import(&self, dir: &Path, size: u64) -> Result<File> {
        let path = Self::image(dir);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        let len = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        if len < size {
            file.set_len(size)
                .ctx(|| format!("grow {} to {size} bytes", path.display()))?;
        }
        Ok(file)
    }

    fn repair(&self, dir: &Path, capacity_bytes: u64, holds_data: bool) -> Result<Option<String>> {
        let path = Self::image(dir);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !holds_data => {
                self.create(dir, capacity_bytes)?;
                return Ok(Some(format!(
                    "recreated the empty image {}",
                    path.display()
                )));
            }
            // A lost image with data cannot be repaired; the volume condition reports it.
            Err(_) => return Ok(None),
        };
        if len < capacity_bytes {
            self.grow_image(&path, capacity_bytes)?;
            return Ok(Some(format!(
                "extended {} from {len} to {capacity_bytes} bytes",
                path.display()
            )));
        }
        Ok(None)
    }

    fn copy_from(
        &self,
        source_dir: &Path,
        dir: &Path,
        size: u64,
        _snapshot: bool,
    ) -> Result<CopyMethod> {
        let image = Self::image(dir);
        let method = self
            .host
            .filesystems
            .clone_file(&Self::image(source_dir), &image)?;
        if method == CopyMethod::SparseCopy
            && !self.warned_sparse_copy.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(pool = %self.pool.display(),
                "the pool's filesystem cannot share extents: snapshots and clones copy the data (O(data)); put the pool on xfs with reflink or btrfs, or use --pool-image");
        }
        self.grow_image(&image, size)?;
        Ok(method)
    }

    fn expand(&self, dir: &Path, size: u64) -> Result<()> {
        self.grow_image(&Self::image(dir), size)?;
        for dev in self.devices(dir)? {
            if let Some(held) = self.host.loops.hold(&dev)? {
                self.host.loops.refresh_capacity(&held)?;
            }
        }
        Ok(())
    }

    fn destroy(&self, dir: &Path) -> Result<()> {
        // A loop device may still hold the image after a crash: let it go first.
        for dev in self.devices(dir)? {
            self.host.loops.detach(&dev)?;
        }
        let path = Self::image(dir);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }

    fn condition(&self, dir: &Path, capacity_bytes: u64) -> Option<String> {
        let path = Self::image(dir);
        match fs::metadata(&path) {
            Ok(m) if m.len() >= capacity_bytes => None,
            Ok(m) => Some(format!(
                "backing image {} is {} bytes, smaller than the volume's {capacity_bytes}",
                path.display(),
                m.len()
            )),
            Err(e) => Some(format!("backing image {} is unusable: {e}", path.display())),
        }
    }

    fn has_data(&self, dir: &Path) -> Result<bool> {
        Ok(self.host.filesystems.has_data(&Self::image(dir))?)
    }

    fn attachment(&self, dir: &Path) -> Result<Option<Attachment>> {
        Ok(self
            .devices(dir)?
            .into_iter()
            .find(|d| !d.read_only)
            .map(Attachment::Device))
    }

    fn attach(&self, dir: &Path, for_mount: bool) -> Result<Attached> {
        let image = Self::image(dir);
        let Some(id) = self.identity(dir)? else {
            return Err(Error::FailedPrecondition(format!(
                "backing image {} is missing; the volume's data is gone",
                image.display()
            )));
        };
        let held = match self.host.loops.find_held(id)? {
            Some(held) => held,
            None => self.host.loops.attach(
                &image,
                AttachOptions {
                    auto_clear: for_mount,
                    read_only: false,
                },
            )?,
        };
        // The image may have been replaced between the stat and the open: only a device
        // serving the file identified above is this volume's.
        if held.device.backing != id {
            return Err(Error::Aborted(format!(
                "backing image {} changed while it was attached; retry",
                image.display()
            )));
        }
        Ok(Attached {
            attachment: Attachment::Device(held.device.clone()),
            held: Some(held),
        })
    }

    fn release_on_unmount(&self, attached: &Attached) -> Result<()> {
        match &attached.held {
            Some(held) if !held.device.auto_clear => Ok(self.host.loops.set_auto_clear(held)?),
            _ => Ok(()),
        }
    }

    fn detach(&self, dir: &Path) -> Result<()> {
        if let Some(Attachment::Device(dev)) = self.attachment(dir)? {
            self.host.loops.detach(&dev)?;
        }
        Ok(())
    }

    fn identity(&self, dir: &Path) -> Result<Option<FileId>> {
        Ok(FileId::find(&Self::image(dir))?)
    }

    fn devices(&self, dir: &Path) -> Result<Vec<LoopDevice>> {
        let loops = self.host.loops.list()?;
        if let Some(id) = self.identity(dir)? {
            return Ok(loops.into_iter().filter(|d| d.backing == id).collect());
        }
        // The image was deleted behind the driver's back while attached: its inode has no
        // name left to stat. The kernel still names it, with " (deleted)", in the namespace
        // that attached it: good enough to report the volume's condition and to detach it.
        let mut gone = Self::image(dir).into_os_string();
        gone.push(" (deleted)");
        Ok(loops
            .into_iter()
            .filter(|d| d.backing_file.as_os_str() == gone)
            .collect())
    }

    fn read_only_device(&self, dir: &Path) -> Result<HeldLoop> {
        let image = Self::image(dir);
        let id = self.identity(dir)?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "backing image {} is missing; the volume's data is gone",
                image.display()
            ))
        })?;
        for dev in self.devices(dir)?.into_iter().filter(|d| d.read_only) {
            if let Some(held) = self.host.loops.hold(&dev)? {
                return Ok(held);
            }
        }
        // Not auto-clearing: a bind mount of a device node does not hold the device open.
        let held = self.host.loops.attach(
            &image,
            AttachOptions {
                auto_clear: false,
                read_only: true,
            },
        )?;
        if held.device.backing != id {
            // Let go first: the detach holds and checks it again, and waits for its release.
            let device = held.device.clone();
            drop(held);
            let _ = self.host.loops.detach(&device);
            return Err(Error::Aborted(format!(
                "backing image {} changed while it was attached; retry",
                image.display()
            )));
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MIB;
    use crate::os::fake::FakeHost;

    fn backend() -> (tempfile::TempDir, ImageBackend) {
        let pool = tempfile::tempdir().unwrap();
        let b = ImageBackend::new(pool.path().to_owned(), FakeHost::new().host());
        (pool, b)
    }

    #[test]
    fn an_image_is_sparse_grows_never_shrinks_and_holds_no_data_when_fresh() {
        let (pool, b) = backend();
        let dir = pool.path().join("v");
        fs::create_dir(&dir).unwrap();
        b.create(&dir, 16 * MIB).unwrap();
        let image = dir.join(IMAGE_FILE);
        assert_eq!(fs::metadata(&image).unwrap().len(), 16 * MIB);
        assert!(!b.has_data(&dir).unwrap(), "a fresh image holds nothing");
        b.expand(&dir, 32 * MIB).unwrap();
        b.expand(&dir, 8 * MIB).unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), 32 * MIB);
        assert_eq!(b.condition(&dir, 32 * MIB), None);
        assert!(
            b.condition(&dir, 64 * MIB).is_some(),
            "shorter than its record"
        );
    }

    #[test]
    fn a_device_is_found_by_the_images_identity_and_detached_with_it() {
        let (pool, b) = backend();
        let dir = pool.path().join("v");
        fs::create_dir(&dir).unwrap();
        b.create(&dir, 16 * MIB).unwrap();
        assert!(b.attachment(&dir).unwrap().is_none());
        let attached = b.attach(&dir, true).unwrap();
        let Attachment::Device(dev) = attached.attachment.clone() else {
            panic!("an image attaches as a device");
        };
        assert_eq!(b.devices(&dir).unwrap(), vec![dev.clone()]);
        // A second attach finds the same device, never a second one.
        let again = b.attach(&dir, true).unwrap();
        assert_eq!(again.attachment, Attachment::Device(dev));
        drop((attached, again));
        b.destroy(&dir).unwrap();
        assert!(b.devices(&dir).unwrap().is_empty());
        assert!(!dir.join(IMAGE_FILE).exists());
        // A missing image is a clear precondition, not an attach of nothing.
        assert!(matches!(
            b.attach(&dir, true),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
