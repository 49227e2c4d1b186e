//! A reflink pool anywhere: an xfs filesystem (reflink on) on a sparse image inside the pool
//! directory, so snapshots and clones share extents even when the host's filesystem cannot.
//! Created once; mounted (or found mounted) at every start; grown when asked for more.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::os::{Host, MountOptions, Probe};

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
    // A fresh attachment auto-clears: held until mounted, freed when unmounted.
    let (device, hold) = match host.loops.find(&image)? {
        Some(dev) => (dev, None),
        None => {
            let attached = host.loops.attach(&image, true)?;
            (attached.device, attached.hold)
        }
    };
    if grow {
        host.loops.refresh_capacity(&device)?;
    }
    // Probed rather than trusted to `fresh`: a crash may have come between create and mkfs.
    match host.filesystems.probe(&device.path)? {
        Probe::Empty => host.filesystems.format(&device.path, "xfs")?,
        Probe::Filesystem(fs) if fs == "xfs" => {}
        other => {
            return Err(Error::FailedPrecondition(format!(
                "{} holds {other:?}, not the pool's xfs filesystem; move it away",
                image.display()
            )));
        }
    }
    let mounted = host
        .mounts_at(&mount_point)?
        .iter()
        .any(|m| m.device() == (device.major, device.minor));
    if !mounted {
        fs::create_dir_all(&mount_point).ctx(|| format!("create {}", mount_point.display()))?;
        host.mounter
            .mount_device(&device.path, &mount_point, "xfs", &MountOptions::default())?;
        if hold.is_none() {
            // Found attached from an earlier run: free it when the pool is unmounted.
            host.loops.set_auto_clear(&device)?;
        }
    }
    if grow {
        host.filesystems
            .grow(&device.path, Some(&mount_point), "xfs")?;
    }
    tracing::info!(image = %image.display(), mount_point = %mount_point.display(), size, fresh,
        "pool image mounted");
    Ok(mount_point)
}
