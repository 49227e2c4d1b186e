//! A reflink pool anywhere: an xfs filesystem (reflink on) on a sparse image inside the pool
//! directory, so snapshots and clones share extents even when the host's filesystem cannot.
//! Created once; mounted (or found mounted) at every start; grown when asked for more.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::filesystem::Filesystem;
use crate::os::{AttachOptions, FileId, Host, MountOptions, NodePath, Probe};

pub const POOL_IMAGE_FILE: &str = "pool.img";
pub const POOL_MOUNT_DIR: &str = "data";
/// mkfs.xfs refuses smaller filesystems.
pub const MIN_POOL_IMAGE: u64 = 320 << 20;

/// Ensures `<dir>/pool.img` exists with an xfs filesystem of at least `size` bytes and is
/// mounted at `<dir>/data`; returns that mount point, the pool to use.
pub fn mount_pool_image(host: &Host, dir: &Path, size: u64) -> Result<PathBuf> {
    if size < MIN_POOL_IMAGE {
        return Err(Error::InvalidArgument(format!(
            "--pool-image must be at least {MIN_POOL_IMAGE} bytes (xfs minimum)"
        )));
    }
    let image = dir.join(POOL_IMAGE_FILE);
    let mount_point = dir.join(POOL_MOUNT_DIR);
    let fresh = !image.exists();
    if fresh {
        let file = File::create_new(&image).ctx(|| format!("create {}", image.display()))?;
        file.set_len(size)
            .and_then(|_| file.sync_all())
            .ctx(|| format!("size {}", image.display()))?;
    }
    let len = fs::metadata(&image)
        .ctx(|| format!("stat {}", image.display()))?
        .len();
    let grow = len < size;
    if grow {
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(size).and_then(|_| f.sync_all()))
            .ctx(|| format!("grow {}", image.display()))?;
    }
    // Attached once per boot: a device already serving this image (found by device and
    // inode, so also one attached from another mount namespace, as by a previous container)
    // is reused, so one filesystem instance ever writes the image. A fresh attachment
    // auto-clears: held until mounted, freed when unmounted.
    let id = FileId::of(&image).ctx(|| format!("stat {}", image.display()))?;
    let device = match host.loops.find_held(id)? {
        Some(held) => held,
        None => host.loops.attach(
            &image,
            AttachOptions {
                auto_clear: true,
                read_only: false,
            },
        )?,
    };
    let dev = &device.device;
    if grow {
        host.loops.refresh_capacity(&device)?;
    }
    // Probed rather than trusted to `fresh`: a crash may have come between create and mkfs.
    // A device whose filesystem is mounted somewhere is not probed: it is the pool.
    let mounts = host.mounter.mounts()?;
    let in_use = mounts.iter().any(|m| m.device() == (dev.major, dev.minor));
    if !in_use {
        match host.filesystems.probe(&dev.path)? {
            Probe::Empty => host.filesystems.format(&dev.path, Filesystem::Xfs, false)?,
            Probe::Filesystem(fs) if fs == Filesystem::Xfs.name() => {}
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds {other:?}, not the pool's xfs filesystem; move it away",
                    image.display()
                )));
            }
        }
    }
    let here: Vec<_> = mounts
        .iter()
        .filter(|m| m.mount_point == mount_point)
        .collect();
    if let Some(other) = here.last().filter(|m| m.device() != (dev.major, dev.minor)) {
        return Err(Error::FailedPrecondition(format!(
            "{} holds another mount ({} from {}); unmount it, then start again",
            mount_point.display(),
            other.fs_type,
            other.source
        )));
    }
    if here.is_empty() {
        fs::create_dir_all(&mount_point).ctx(|| format!("create {}", mount_point.display()))?;
        // Mounted elsewhere already (another namespace's view): the kernel hands out the
        // same superblock for the same device, never a second instance.
        host.mounter.mount_device(
            &dev.path,
            &NodePath::trusted(&mount_point),
            Filesystem::Xfs,
            &MountOptions::default(),
        )?;
        // Found attached from an earlier run: free it when the pool is unmounted. (A fresh
        // attachment auto-clears already; setting it again would stall the device's queue.)
        if !device.device.auto_clear {
            host.loops.set_auto_clear(&device)?;
        }
    }
    let dev_path = dev.path.clone();
    drop(device);
    if grow {
        host.filesystems
            .grow(&dev_path, Some(&mount_point), Filesystem::Xfs)?;
    }
    tracing::info!(image = %image.display(), mount_point = %mount_point.display(), size, fresh,
        "pool image mounted");
    Ok(mount_point)
}

/// What [`release_pool_image`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// No loop device serves `pool.img` (or there is none): nothing to release.
    Nothing,
    /// The pool's filesystem was unmounted and its loop device freed.
    Released { device: PathBuf },
}

/// Unmounts the pool image's filesystem from `<dir>/data` and frees its loop device, for an
/// uninstall (`strata pool release`). The caller holds the pool's lock, so no server serves
/// it. Refused while a volume of the pool is attached (staged or published on this node) or
/// the filesystem is mounted anywhere else; never deletes anything.
pub fn release_pool_image(host: &Host, dir: &Path) -> Result<Released> {
    let image = dir.join(POOL_IMAGE_FILE);
    let Some(id) = FileId::find(&image)? else {
        return Ok(Released::Nothing);
    };
    let Some(device) = host.loops.find_held(id)? else {
        return Ok(Released::Nothing);
    };
    let dev = device.device.clone();
    // A volume in use: a loop device whose backing file lives on the pool's filesystem.
    let volumes: Vec<String> = host
        .loops
        .list()?
        .into_iter()
        .filter(|l| l.backing.dev == (dev.major, dev.minor))
        .map(|l| format!("{} ({})", l.path.display(), l.backing_file.display()))
        .collect();
    if !volumes.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "volumes of this pool are still in use on this node: {}; delete their pods (or unpublish and unstage them) first",
            volumes.join(", ")
        )));
    }
    let mount_point = dir.join(POOL_MOUNT_DIR);
    let mounts: Vec<_> = host
        .mounter
        .mounts()?
        .into_iter()
        .filter(|m| m.device() == (dev.major, dev.minor))
        .collect();
    if let Some(other) = mounts.iter().find(|m| m.mount_point != mount_point) {
        return Err(Error::FailedPrecondition(format!(
            "the pool's filesystem is also mounted at {}; unmount it there first",
            other.mount_point.display()
        )));
    }
    if !mounts.is_empty() {
        host.mounter.unmount(&mut NodePath::trusted(&mount_point))?;
    }
    // Auto-clearing devices go with their last close (ours); the others are cleared after it
    // (the detach holds and checks the device again, and waits for its release).
    drop(device);
    if !dev.auto_clear {
        host.loops.detach(&dev)?;
    }
    tracing::info!(image = %image.display(), device = %dev.path.display(), "pool image released");
    Ok(Released::Released { device: dev.path })
}
