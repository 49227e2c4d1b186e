//! What of a volume is attached or mounted on this node, as the kernel reports it (mount
//! table, loop devices), and the operations on that state the node calls share: finding a
//! volume's mounts, unmounting only its own, letting go of read-only devices.

use std::path::Path;
use std::sync::Arc;

use crate::backend::{Attachment, Backend};
use crate::error::{Error, Result};
use crate::os::{Host, LoopDevice, MountEntry, NodePath};
use crate::validate::bounded_display;

/// Whether a mount-table entry shows `att` mounted: its filesystem (same device numbers),
/// or its device node bound onto a file (a bind from devtmpfs whose root is `/loopN`).
pub(crate) fn shows(entry: &MountEntry, att: &Attachment) -> bool {
    match att {
        Attachment::Device(dev) => shows_device(entry, dev),
        Attachment::Directory(d) => entry.device() == d.device && entry.root == d.root,
    }
}

pub(crate) fn shows_device(entry: &MountEntry, dev: &LoopDevice) -> bool {
    entry.device() == (dev.major, dev.minor)
        || dev
            .path
            .file_name()
            .is_some_and(|n| entry.root == Path::new("/").join(n))
}

pub(crate) fn is_device_node_mount(entry: &MountEntry, att: &Attachment) -> bool {
    shows(entry, att) && is_node_bind(entry, att)
}

/// Whether `entry`, known to show one of the volume's devices, is a bind of a device node
/// (a raw block publish) rather than its filesystem.
pub(crate) fn is_node_bind(entry: &MountEntry, att: &Attachment) -> bool {
    match att {
        Attachment::Device(dev) => entry.device() != (dev.major, dev.minor),
        Attachment::Directory(_) => false,
    }
}

/// What of a volume can be mounted on this node: its attachment and any read-only devices
/// handed out for read-only block publishes.
pub(crate) struct Owners {
    pub(crate) attachment: Option<Attachment>,
    pub(crate) read_only: Vec<LoopDevice>,
}

impl Owners {
    pub(crate) fn show(&self, entry: &MountEntry) -> bool {
        self.attachment.as_ref().is_some_and(|a| shows(entry, a))
            || self.read_only.iter().any(|d| shows_device(entry, d))
    }
}

/// The volume mounts of this node, read from the kernel on every call.
pub struct Mounts {
    host: Host,
    backend: Arc<dyn Backend>,
}

impl Mounts {
    pub fn new(host: Host, backend: Arc<dyn Backend>) -> Self {
        Mounts { host, backend }
    }

    /// Every mount of this attachment, from the kernel.
    pub(crate) fn mounts_of(&self, att: &Attachment) -> Result<Vec<MountEntry>> {
        Ok(self
            .host
            .mounter
            .mounts()?
            .into_iter()
            .filter(|m| shows(m, att))
            .collect())
    }

    pub(crate) fn owners(&self, dir: &Path) -> Result<Owners> {
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

    /// Unmounts this volume's mounts stacked at `node`; never touches anybody else's. Returns
    /// the path reopened after the unmounts (`None` if it is gone).
    pub(crate) fn unmount_ours(&self, node: NodePath, owners: &Owners) -> Result<Option<NodePath>> {
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
            self.host.mounter.unmount(current).map_err(|e| {
                if e.is_busy() {
                    Error::FailedPrecondition(format!(
                        "{} is busy: stop the processes using it, then retry",
                        bounded_display(&current.path)
                    ))
                } else {
                    e.into()
                }
            })?;
            node = self.host.mounter.reopen(current)?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after 16 unmounts",
            bounded_display(&node.map(|n| n.path).unwrap_or_default())
        )))
    }

    /// Detaches read-only devices of the volume that no mount shows any more.
    pub(crate) fn release_read_only_devices(&self, dir: &Path) -> Result<()> {
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
}
