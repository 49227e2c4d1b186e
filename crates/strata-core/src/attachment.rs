//! What of a volume is attached or mounted on this node, as the kernel reports it (mount
//! table, loop devices), and the operations on that state that every node call shares:
//! finding a volume's mounts, unmounting only its own, freezing and thawing its filesystem.

use std::path::Path;

use crate::backend::Attachment;
use crate::driver::{CheckedPath, Driver};
use crate::error::{Error, Result};
use crate::os::{Create, FrozenGuard, LoopDevice, MountEntry, MountedFs, NodePath};
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

impl Driver {
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

    /// Thaws every mounted volume filesystem: a crash while a snapshot had one frozen must not
    /// leave it frozen. Thawing a filesystem that is not frozen does nothing.
    pub fn thaw_all(&self) -> Result<usize> {
        let ours = self.volume_devices()?;
        let mut thawed = 0;
        for m in self.host.mounter.mounts()? {
            if ours.contains(&m.device()) && m.root == Path::new("/") {
                let thawed_now = self
                    .host
                    .filesystems
                    .open_mounted(&m.mount_point, m.device())
                    .and_then(|fs| self.host.filesystems.thaw(&fs));
                match thawed_now {
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        match self.freeze_turn(id, dir, deadline)? {
            Some(turn) => turn.freeze(self).map(Some),
            None => Ok(None),
        }
    }

    /// The volume's turn to be frozen, taken no later than `deadline` (ABORTED after), and
    /// where its filesystem is mounted on this node; `None` when nothing is mounted.
    pub(crate) fn freeze_turn(
        &self,
        id: &str,
        dir: &Path,
        deadline: std::time::Instant,
    ) -> Result<Option<FreezeTurn>> {
        // Only a volume's own filesystem is frozen; a directory volume shares the pool's
        // filesystem, which is never frozen (its backends copy atomically or file by file).
        let Some(att @ Attachment::Device(_)) = self.backend.attachment(dir)? else {
            return Ok(None);
        };
        // Readers of one volume run together, but freeze it one at a time: a second
        // FIFREEZE fails, and a thaw must not come while another copy runs.
        let turn = self.guard_waiting_until(&format!("freeze {id}"), deadline)?;
        let Some(mount) = self
            .mounts_of(&att)?
            .into_iter()
            .find(|m| !is_device_node_mount(m, &att))
        else {
            return Ok(None);
        };
        // Opened and checked now, held until the thaw: the freeze and the thaw act on the
        // volume's filesystem whatever happens to the path in between.
        let fs = self
            .host
            .filesystems
            .open_mounted(&mount.mount_point, mount.device())?;
        Ok(Some(FreezeTurn { fs, turn }))
    }

    /// Freezes every filesystem of `turns` at once (each FIFREEZE flushes its filesystem, so
    /// together they take as long as the slowest, not the sum). All or none: if one fails,
    /// those already frozen are thawed.
    pub(crate) fn freeze_all(&self, turns: Vec<FreezeTurn>) -> Result<Vec<Frozen<'_>>> {
        let results: Vec<Result<Frozen<'_>>> = if turns.len() < 2 {
            turns.into_iter().map(|t| t.freeze(self)).collect()
        } else {
            std::thread::scope(|scope| {
                let running: Vec<_> = turns
                    .into_iter()
                    .map(|t| scope.spawn(move || t.freeze(self)))
                    .collect();
                running
                    .into_iter()
                    .map(|r| {
                        r.join().unwrap_or_else(|_| {
                            Err(Error::Internal(
                                "a filesystem freeze did not complete".into(),
                            ))
                        })
                    })
                    .collect()
            })
        };
        let mut frozen = Vec::with_capacity(results.len());
        let mut failed = None;
        for r in results {
            match r {
                Ok(f) => frozen.push(f),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(frozen),
        }
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
            self.host.mounter.unmount(current)?;
            node = self.host.mounter.reopen(current)?;
        }
        Err(Error::Internal(format!(
            "{} is still mounted after 16 unmounts",
            bounded_display(&node.map(|n| n.path).unwrap_or_default())
        )))
    }

    /// The topmost mount at a checked path, with the opened path; `None` when the path does
    /// not exist.
    pub(crate) fn mount_at(
        &self,
        path: &CheckedPath,
    ) -> Result<Option<(NodePath, Option<MountEntry>)>> {
        let Some(node) = self.open_node(path, Create::Nothing)? else {
            return Ok(None);
        };
        let mount = self.host.mounter.mount_at(&node)?;
        Ok(Some((node, mount)))
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

/// A volume's turn to freeze its filesystem, and that filesystem, opened and checked.
pub(crate) struct FreezeTurn {
    fs: MountedFs,
    turn: crate::inflight::Guard,
}

impl FreezeTurn {
    fn freeze(self, driver: &Driver) -> Result<Frozen<'_>> {
        let frozen = FrozenGuard::freeze(driver.host.filesystems.as_ref(), self.fs)?;
        Ok(Frozen {
            frozen,
            _turn: self.turn,
        })
    }
}

/// A volume's filesystem frozen for a copy, and its turn to be: thawed first, then the turn
/// released (fields drop in order).
pub(crate) struct Frozen<'a> {
    frozen: FrozenGuard<'a>,
    _turn: crate::inflight::Guard,
}

impl Frozen<'_> {
    pub(crate) fn fs(&self) -> &MountedFs {
        self.frozen.fs()
    }

    pub(crate) fn mark_thawed(&mut self) {
        self.frozen.mark_thawed();
    }
}

/// Thaws every filesystem of `frozen` at once, then releases their turns.
pub(crate) fn thaw_together(mut frozen: Vec<Frozen<'_>>) {
    if frozen.len() > 1 {
        std::thread::scope(|scope| {
            for f in frozen.iter_mut() {
                scope.spawn(move || f.frozen.thaw());
            }
        });
    }
    drop(frozen);
}
