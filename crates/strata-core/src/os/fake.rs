//! An in-memory host for unit tests: a mount table, loop devices and filesystems that behave
//! like the kernel's for the operations the driver uses, and count what was done. Any
//! operation can be made to fail ([`FakeHost::fail_next`]), so every rollback branch has a
//! test. Compiled only for tests (the `fake` feature, which the integration tests enable).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::cgroups::{CgroupRef, CgroupVersion, Cgroups};
use super::{
    AttachOptions, CopyMethod, Create, FileId, Filesystems, FsUsage, HeldLoop, Host, LoopDevice,
    LoopDevices, MountEntry, MountOptions, MountedFs, Mounter, NodePath, Probe,
};
use crate::filesystem::Filesystem;
use crate::host_error::{HostError, Result};
use crate::model::IoLimits;

const LOOP_MAJOR: u32 = 7;
const DEVTMPFS: (u32, u32) = (0, 5);

/// The host operations a test can make fail, one call at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Attach,
    Detach,
    Mount,
    Bind,
    Unmount,
    Probe,
    Format,
    Grow,
    RefreshCapacity,
    CloneFile,
    CopyTree,
    Freeze,
    Thaw,
    ApplyGroup,
    SetLimits,
    AddKey,
    EncryptDir,
}

#[derive(Default)]
pub struct FakeState {
    pub mounts: Vec<MountEntry>,
    pub loops: Vec<LoopDevice>,
    /// Filesystem signature per backing file.
    pub filesystems: HashMap<PathBuf, String>,
    pub formats: usize,
    /// Devices probed for signatures (blkid runs).
    pub probes: usize,
    /// Mount points frozen right now, and how many grows were done.
    pub frozen: Vec<PathBuf>,
    pub grows: usize,
    /// Paths the driver created (mount points).
    pub paths: std::collections::HashSet<PathBuf>,
    /// Those of them created as files (mount points for device nodes).
    pub files: std::collections::HashSet<PathBuf>,
    /// Every group applied to a tree, in order.
    pub groups: Vec<(PathBuf, u32)>,
    /// Pod cgroups by pod uid, as a test makes them (path relative to the hierarchy).
    pub pod_cgroups: HashMap<String, String>,
    /// The I/O limits written, by cgroup path and device; a rule of zeros is removed.
    pub io_rules: HashMap<(String, (u32, u32)), IoLimits>,
    /// Failures armed by [`FakeHost::fail_next`], each used by the next call of its op.
    failures: Vec<(Op, HostError)>,
    next_mount_id: u32,
    /// fscrypt keys added, by mount point.
    pub keys: HashMap<PathBuf, Vec<super::fscrypt::KeyId>>,
    /// Encrypted directories and their key.
    pub policies: HashMap<PathBuf, super::fscrypt::KeyId>,
}

#[derive(Default)]
pub struct FakeHost {
    pub state: Mutex<FakeState>,
}

impl FakeHost {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn host(self: &Arc<Self>) -> Host {
        Host {
            mounter: self.clone(),
            loops: self.clone(),
            filesystems: self.clone(),
            btrfs: self.clone(),
            cgroups: self.clone(),
            fscrypt: self.clone(),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next call of `op` fail with `error` (and do nothing); arming several
    /// failures of one op fails that many calls in turn.
    pub fn fail_next(&self, op: Op, error: HostError) {
        self.lock().failures.push((op, error));
    }

    /// Whether every armed failure was used.
    pub fn failures_left(&self) -> usize {
        self.lock().failures.len()
    }

    /// The failure armed for `op`, used up.
    fn injected(&self, op: Op) -> Result<()> {
        let mut s = self.lock();
        match s.failures.iter().position(|(o, _)| *o == op) {
            Some(i) => Err(s.failures.remove(i).1),
            None => Ok(()),
        }
    }

    /// Forgets every mount and loop device, as a reboot does.
    pub fn reboot(&self) {
        let mut s = self.lock();
        s.mounts.clear();
        s.loops.clear();
    }

    fn backing_of(s: &FakeState, device: &Path) -> Option<PathBuf> {
        s.loops
            .iter()
            .find(|l| l.path == device)
            .map(|l| l.backing_file.clone())
    }

    fn push_mount(s: &mut FakeState, mut entry: MountEntry) {
        s.next_mount_id += 1;
        entry.mount_id = s.next_mount_id;
        s.mounts.push(entry);
    }
}

impl Mounter for FakeHost {
    fn mounts(&self) -> Result<Vec<MountEntry>> {
        Ok(self.lock().mounts.clone())
    }

    fn open_path(&self, _prefix: &Path, path: &Path, create: Create) -> Result<Option<NodePath>> {
        let s = self.lock();
        let known = s.paths.contains(path)
            || s.mounts.iter().any(|m| m.mount_point == path)
            || path.exists();
        drop(s);
        if create == Create::Nothing && !known {
            return Ok(None);
        }
        let mut s = self.lock();
        if create != Create::Nothing && s.paths.insert(path.to_owned()) && create == Create::File {
            s.files.insert(path.to_owned());
        }
        let mut node = NodePath::trusted(path);
        node.is_dir = !s.files.contains(path);
        Ok(Some(node))
    }

    fn mount_at(&self, path: &NodePath) -> Result<Option<MountEntry>> {
        Ok(self
            .lock()
            .mounts
            .iter()
            .rfind(|m| m.mount_point == path.path)
            .cloned())
    }

    fn reopen(&self, path: &NodePath) -> Result<Option<NodePath>> {
        Ok(Some(NodePath::trusted(&path.path)))
    }

    fn remove_if_created(&self, path: &NodePath) -> Result<bool> {
        let mut s = self.lock();
        if s.mounts.iter().any(|m| m.mount_point == path.path) {
            return Ok(false);
        }
        s.paths.remove(&path.path);
        s.files.remove(&path.path);
        Ok(true)
    }

    fn mount_device(
        &self,
        device: &Path,
        target: &NodePath,
        fs: Filesystem,
        options: &MountOptions,
    ) -> Result<()> {
        let fs_type = fs.name();
        self.injected(Op::Mount)?;
        let target = &target.path;
        let mut s = self.lock();
        let dev = s
            .loops
            .iter()
            .find(|l| l.path == device)
            .cloned()
            .ok_or_else(|| HostError::other(format!("no device {}", device.display())))?;
        if s.filesystems.get(&dev.backing_file).map(String::as_str) != Some(fs_type) {
            return Err(HostError::other(format!("wrong fs type {fs_type}")));
        }
        let entry = MountEntry {
            mount_id: 0,
            major: dev.major,
            minor: dev.minor,
            root: "/".into(),
            mount_point: target.to_owned(),
            options: options.names(),
            fs_type: fs_type.into(),
            source: device.display().to_string(),
            super_options: vec!["rw".into()],
        };
        Self::push_mount(&mut s, entry);
        Ok(())
    }

    fn bind(&self, source: &NodePath, target: &NodePath, options: &MountOptions) -> Result<()> {
        self.injected(Op::Bind)?;
        let (source, target) = (&source.path, &target.path);
        let mut s = self.lock();
        let options = options.names();
        let entry = if let Some(m) = s.mounts.iter().rev().find(|m| m.mount_point == *source) {
            MountEntry {
                mount_point: target.to_owned(),
                options,
                ..m.clone()
            }
        } else if Self::backing_of(&s, source).is_some() {
            MountEntry {
                mount_id: 0,
                major: DEVTMPFS.0,
                minor: DEVTMPFS.1,
                root: Path::new("/").join(source.file_name().unwrap_or_default()),
                mount_point: target.to_owned(),
                options,
                fs_type: "devtmpfs".into(),
                source: "udev".into(),
                super_options: vec!["rw".into()],
            }
        } else if let Some((m, rel)) = s
            .mounts
            .iter()
            .rev()
            .find_map(|m| Some((m, source.strip_prefix(&m.mount_point).ok()?)))
            .filter(|_| s.paths.contains(source))
        {
            // A directory inside a mounted filesystem (an encrypted volume's data).
            MountEntry {
                mount_point: target.to_owned(),
                root: m.root.join(rel),
                options,
                ..m.clone()
            }
        } else {
            return Err(HostError::other(format!(
                "bind source {} unknown",
                source.display()
            )));
        };
        Self::push_mount(&mut s, entry);
        Ok(())
    }

    fn unmount(&self, target: &mut NodePath) -> Result<()> {
        self.injected(Op::Unmount)?;
        let target = &target.path;
        let mut s = self.lock();
        if let Some(i) = s.mounts.iter().rposition(|m| m.mount_point == *target) {
            let gone = s.mounts.remove(i);
            // Loop devices with autoclear go with their last mount; the fake keeps it simple
            // and models autoclear as always set once mounted.
            let still_used = s.mounts.iter().any(|m| m.device() == gone.device());
            if gone.major == LOOP_MAJOR && !still_used {
                s.loops.retain(|l| (l.major, l.minor) != gone.device());
            }
        }
        Ok(())
    }
}

impl LoopDevices for FakeHost {
    fn list(&self) -> Result<Vec<LoopDevice>> {
        Ok(self.lock().loops.clone())
    }

    fn attach(&self, backing_file: &Path, options: AttachOptions) -> Result<HeldLoop> {
        self.injected(Op::Attach)?;
        let backing = FileId::of(backing_file)
            .map_err(|e| HostError::io(format!("open {}", backing_file.display()), e))?;
        let mut s = self.lock();
        let minor = (0..)
            .find(|n| !s.loops.iter().any(|l| l.minor == *n))
            .unwrap_or(0);
        let dev = LoopDevice {
            path: PathBuf::from(format!("/dev/loop{minor}")),
            major: LOOP_MAJOR,
            minor,
            backing,
            backing_file: backing_file.to_owned(),
            read_only: options.read_only,
            auto_clear: options.auto_clear,
        };
        s.loops.push(dev.clone());
        Ok(HeldLoop {
            device: dev,
            handle: None,
        })
    }

    fn hold(&self, device: &LoopDevice) -> Result<Option<HeldLoop>> {
        Ok(self
            .lock()
            .loops
            .iter()
            .find(|l| l.path == device.path && l.backing == device.backing)
            .map(|l| HeldLoop {
                device: l.clone(),
                handle: None,
            }))
    }

    fn set_auto_clear(&self, _: &HeldLoop) -> Result<()> {
        Ok(())
    }

    fn refresh_capacity(&self, _: &HeldLoop) -> Result<()> {
        self.injected(Op::RefreshCapacity)?;
        Ok(())
    }

    fn detach(&self, device: &LoopDevice) -> Result<()> {
        self.injected(Op::Detach)?;
        self.lock()
            .loops
            .retain(|l| l.path != device.path || l.backing != device.backing);
        Ok(())
    }
}

impl Filesystems for FakeHost {
    fn probe(&self, device: &Path) -> Result<Probe> {
        self.injected(Op::Probe)?;
        let mut s = self.lock();
        s.probes += 1;
        let backing = Self::backing_of(&s, device)
            .ok_or_else(|| HostError::other(format!("no device {}", device.display())))?;
        Ok(match s.filesystems.get(&backing) {
            Some(fs) => Probe::Filesystem(fs.clone()),
            None => Probe::Empty,
        })
    }

    fn format(&self, device: &Path, fs: Filesystem, _encrypt: bool) -> Result<()> {
        let fs_type = fs.name();
        self.injected(Op::Format)?;
        let mut s = self.lock();
        let backing = Self::backing_of(&s, device)
            .ok_or_else(|| HostError::other(format!("no device {}", device.display())))?;
        s.filesystems.insert(backing, fs_type.into());
        s.formats += 1;
        Ok(())
    }

    fn usage(&self, _: &Path) -> Result<FsUsage> {
        Ok(FsUsage {
            total_bytes: 1 << 40,
            available_bytes: 1 << 39,
            used_bytes: 1 << 39,
            total_inodes: 1000,
            free_inodes: 900,
            used_inodes: 100,
        })
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        let s = self.lock();
        let backing = Self::backing_of(&s, device)
            .ok_or_else(|| HostError::other(format!("no device {}", device.display())))?;
        std::fs::metadata(&backing)
            .map(|m| m.len())
            .map_err(|e| HostError::io("stat", e))
    }

    fn clone_file(&self, src: &Path, dst: &Path) -> Result<CopyMethod> {
        self.injected(Op::CloneFile)?;
        // Images are real files even here: copied as the real host copies them, holes kept.
        let copied = std::fs::File::open(src).and_then(|source| {
            let target = std::fs::File::create_new(dst)?;
            super::clone::clone_or_copy(&source, &target, source.metadata()?.len())
        });
        let method = copied.map_err(|e| HostError::io("copy", e))?;
        let mut s = self.lock();
        if let Some(fs) = s.filesystems.get(src).cloned() {
            s.filesystems.insert(dst.to_owned(), fs);
        }
        Ok(method)
    }

    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<CopyMethod> {
        self.injected(Op::CopyTree)?;
        super::tree::copy_tree(src, dst)
    }

    fn has_data(&self, file: &Path) -> Result<bool> {
        // Data is what the fake's mkfs or a test wrote: a filesystem, or bytes in the file.
        if self.lock().filesystems.contains_key(file) {
            return Ok(true);
        }
        // The fake's images are real sparse files: ask the real filesystem.
        super::linux::LinuxHost.has_data(file)
    }

    fn copy_method_in(&self, _dir: &Path) -> Result<CopyMethod> {
        Ok(CopyMethod::SparseCopy)
    }

    fn apply_group(&self, root: &Path, gid: u32) -> Result<u64> {
        self.injected(Op::ApplyGroup)?;
        self.lock().groups.push((root.to_owned(), gid));
        Ok(1)
    }

    fn check_writable(&self, dir: &Path) -> Result<()> {
        let probe = dir.join(format!(".probe-{:?}", std::thread::current().id()));
        std::fs::write(&probe, b"ok")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| HostError::io(format!("write {}", probe.display()), e))
    }

    fn open_mounted(&self, mount_point: &Path, device: (u32, u32)) -> Result<MountedFs> {
        let shown = self
            .lock()
            .mounts
            .iter()
            .any(|m| m.mount_point == mount_point && m.device() == device);
        if !shown {
            return Err(HostError::Mismatch(format!(
                "{} is not the volume's filesystem any more",
                mount_point.display()
            )));
        }
        Ok(MountedFs {
            mount_point: mount_point.to_owned(),
            root: None,
        })
    }

    fn freeze(&self, fs: &MountedFs) -> Result<()> {
        self.injected(Op::Freeze)?;
        self.lock().frozen.push(fs.mount_point.clone());
        Ok(())
    }

    fn thaw(&self, fs: &MountedFs) -> Result<()> {
        self.injected(Op::Thaw)?;
        self.lock().frozen.retain(|p| *p != fs.mount_point);
        Ok(())
    }

    fn grow(&self, _: &Path, _: Option<&Path>, _: Filesystem) -> Result<()> {
        self.injected(Op::Grow)?;
        self.lock().grows += 1;
        Ok(())
    }
}

/// The fake kernel has no btrfs: the btrfs backend is tested on a real one.
impl super::btrfs::Btrfs for FakeHost {
    fn is_btrfs(&self, _: &Path) -> Result<bool> {
        Ok(false)
    }
    fn enable_quota(&self, _: &Path) -> Result<()> {
        Err(no_btrfs())
    }
    fn create_subvolume(&self, _: &Path) -> Result<()> {
        Err(no_btrfs())
    }
    fn delete_subvolume(&self, _: &Path) -> Result<()> {
        Err(no_btrfs())
    }
    fn snapshot(&self, _: &Path, _: &Path, _: bool) -> Result<()> {
        Err(no_btrfs())
    }
    fn set_limit(&self, _: &Path, _: u64) -> Result<()> {
        Err(no_btrfs())
    }
    fn usage(&self, _: &Path) -> Result<(u64, Option<u64>)> {
        Err(no_btrfs())
    }
}

fn no_btrfs() -> HostError {
    HostError::Unsupported("the fake host has no btrfs".into())
}

impl FakeHost {
    /// Makes a pod's cgroup (kubelet cgroupfs layout, burstable) and returns its path.
    pub fn add_pod(&self, uid: &str) -> String {
        let path = format!("kubepods/burstable/pod{uid}");
        self.lock().pod_cgroups.insert(uid.to_owned(), path.clone());
        path
    }

    /// Ends a pod: its cgroup and the rules in it go.
    pub fn remove_pod(&self, uid: &str) {
        let mut s = self.lock();
        if let Some(path) = s.pod_cgroups.remove(uid) {
            s.io_rules.retain(|(p, _), _| *p != path);
        }
    }

    fn cgroup_exists(s: &FakeState, path: &str) -> bool {
        s.pod_cgroups.values().any(|p| p == path)
    }
}

impl Cgroups for FakeHost {
    fn pod_cgroup(&self, pod_uid: &str) -> Result<Option<CgroupRef>> {
        Ok(self.lock().pod_cgroups.get(pod_uid).map(|path| CgroupRef {
            version: CgroupVersion::V1,
            path: path.clone(),
        }))
    }

    fn cgroup_at(&self, path: &str) -> Result<Option<CgroupRef>> {
        let s = self.lock();
        Ok(Self::cgroup_exists(&s, path).then(|| CgroupRef {
            version: CgroupVersion::V1,
            path: path.to_owned(),
        }))
    }

    fn set_limits(
        &self,
        cgroup: &CgroupRef,
        device: (u32, u32),
        limits: &IoLimits,
    ) -> Result<bool> {
        self.injected(Op::SetLimits)?;
        let mut s = self.lock();
        if !Self::cgroup_exists(&s, &cgroup.path) {
            return Ok(false);
        }
        let key = (cgroup.path.clone(), device);
        if limits.is_unlimited() {
            s.io_rules.remove(&key);
        } else {
            s.io_rules.insert(key, *limits);
        }
        Ok(true)
    }

    fn limits(&self, cgroup: &CgroupRef, device: (u32, u32)) -> Result<Option<IoLimits>> {
        let s = self.lock();
        if !Self::cgroup_exists(&s, &cgroup.path) {
            return Ok(None);
        }
        Ok(Some(
            s.io_rules
                .get(&(cgroup.path.clone(), device))
                .copied()
                .unwrap_or_default(),
        ))
    }
}

impl super::fscrypt::Fscrypt for FakeHost {
    fn add_key(&self, root: &NodePath, key: &[u8]) -> Result<super::fscrypt::KeyId> {
        self.injected(Op::AddKey)?;
        // The identifier the fake derives: the key's first bytes folded with its length.
        let mut id = [0u8; 16];
        for (i, b) in key.iter().enumerate() {
            id[i % 16] ^= b.wrapping_add(i as u8);
        }
        let mut s = self.lock();
        let keys = s.keys.entry(root.path.clone()).or_default();
        if !keys.contains(&id) {
            keys.push(id);
        }
        Ok(id)
    }

    fn remove_key(&self, root: &NodePath, id: &super::fscrypt::KeyId) -> Result<()> {
        let mut s = self.lock();
        if let Some(keys) = s.keys.get_mut(&root.path) {
            keys.retain(|k| k != id);
        }
        Ok(())
    }

    fn policy(&self, root: &NodePath, name: &str) -> Result<Option<super::fscrypt::KeyId>> {
        Ok(self.lock().policies.get(&root.path.join(name)).copied())
    }

    fn encrypt_dir(&self, root: &NodePath, name: &str, id: &super::fscrypt::KeyId) -> Result<()> {
        self.injected(Op::EncryptDir)?;
        let mut s = self.lock();
        match s.policies.get(&root.path.join(name)) {
            Some(existing) if existing != id => Err(HostError::Sys {
                what: format!("encrypt {}/{name}", root.path.display()),
                errno: libc::EEXIST,
            }),
            _ => {
                s.policies.insert(root.path.join(name), *id);
                s.paths.insert(root.path.join(name));
                Ok(())
            }
        }
    }
}
