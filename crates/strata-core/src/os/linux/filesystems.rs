//! The real Filesystems: statvfs(2), FIFREEZE/FITHAW, blkid, mkfs and the growth tools.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use crate::filesystem::Filesystem;
use crate::host_error::{HostError, IoContext, Result};
use crate::os::{CopyMethod, Filesystems, FsUsage, MountedFs, Probe};

use super::tools::{failed, run};
use super::{LinuxHost, check, cstr};
use crate::os::clone::clone_or_copy;

// Filesystem freeze from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn freeze_ioctl(fs: &MountedFs, request: libc::c_ulong, what: &str) -> Result<()> {
    let Some(root) = &fs.root else {
        return Err(HostError::other(format!(
            "{} was not opened for a {what}",
            fs.mount_point.display()
        )));
    };
    // SAFETY: FIFREEZE/FITHAW take an unused int argument.
    match check(unsafe { libc::ioctl(root.as_raw_fd(), request, 0) }) {
        Ok(_) => Ok(()),
        // Thawing a filesystem that is not frozen is fine.
        Err(e) if request == FITHAW && e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(HostError::io(
            format!("{what} {}", fs.mount_point.display()),
            e,
        )),
    }
}

/// Parses `blkid -p -o export` output.
fn parse_blkid(text: &str) -> Probe {
    let mut fs_type = None;
    let mut usage = None;
    let mut pt_type = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) => fs_type = Some(v.to_owned()),
            Some(("USAGE", v)) => usage = Some(v.to_owned()),
            Some(("PTTYPE", v)) => pt_type = Some(v.to_owned()),
            _ => {}
        }
    }
    match (fs_type, usage.as_deref(), pt_type) {
        (Some(t), Some("filesystem") | None, _) => Probe::Filesystem(t),
        (Some(t), Some(u), _) => Probe::Other(format!("{t} ({u})")),
        (None, _, Some(pt)) => Probe::Other(format!("a {pt} partition table")),
        (None, _, None) => Probe::Empty,
    }
}

impl Filesystems for LinuxHost {
    fn probe(&self, device: &Path) -> Result<Probe> {
        let out = run(Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(device))?;
        match out.status.code() {
            Some(0) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
            // blkid's "nothing found".
            Some(2) => Ok(Probe::Empty),
            _ => Err(failed("blkid", device.display(), &out)),
        }
    }

    fn format(&self, device: &Path, fs: Filesystem, encrypt: bool) -> Result<()> {
        let (tool, args) = fs.mkfs(encrypt);
        let mut cmd = Command::new(&tool);
        cmd.args(args);
        let out = run(cmd.arg(device))?;
        if out.status.success() {
            return Ok(());
        }
        Err(failed(&tool, device.display(), &out))
    }

    fn usage(&self, path: &Path) -> Result<FsUsage> {
        let c = cstr(path)?;
        // SAFETY: statvfs writes into the zeroed struct; c is a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })
            .ctx(|| format!("statvfs {}", path.display()))?;
        let frsize = st.f_frsize;
        Ok(FsUsage {
            total_bytes: st.f_blocks * frsize,
            available_bytes: st.f_bavail * frsize,
            used_bytes: st.f_blocks.saturating_sub(st.f_bfree) * frsize,
            total_inodes: st.f_files,
            free_inodes: st.f_ffree,
            used_inodes: st.f_files.saturating_sub(st.f_ffree),
        })
    }

    fn clone_file(&self, src: &Path, dst: &Path) -> Result<CopyMethod> {
        let source = File::open(src).ctx(|| format!("open {}", src.display()))?;
        let len = source
            .metadata()
            .ctx(|| format!("stat {}", src.display()))?
            .len();
        let target = File::create_new(dst).ctx(|| format!("create {}", dst.display()))?;
        let method = clone_or_copy(&source, &target, len)
            .ctx(|| format!("clone {} to {}", src.display(), dst.display()))?;
        target
            .sync_all()
            .ctx(|| format!("sync {}", dst.display()))?;
        Ok(method)
    }

    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<CopyMethod> {
        crate::os::tree::copy_tree(src, dst)
    }

    fn open_mounted(&self, mount_point: &Path, device: (u32, u32)) -> Result<MountedFs> {
        // Opened without O_PATH (the freeze ioctls need a real descriptor), then checked: the
        // directory must live on the volume's device, whatever the path led to.
        let root = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(mount_point)
            .ctx(|| format!("open {}", mount_point.display()))?;
        let dev = root
            .metadata()
            .ctx(|| format!("stat {}", mount_point.display()))?
            .dev();
        if (libc::major(dev), libc::minor(dev)) != device {
            return Err(HostError::Mismatch(format!(
                "{} is no longer the volume's filesystem (it changed under the call); retry",
                mount_point.display()
            )));
        }
        Ok(MountedFs {
            mount_point: mount_point.to_owned(),
            root: Some(root),
        })
    }

    fn freeze(&self, fs: &MountedFs) -> Result<()> {
        freeze_ioctl(fs, FIFREEZE, "freeze")
    }

    fn thaw(&self, fs: &MountedFs) -> Result<()> {
        freeze_ioctl(fs, FITHAW, "thaw")
    }

    fn has_data(&self, file: &Path) -> Result<bool> {
        let f = File::open(file).ctx(|| format!("open {}", file.display()))?;
        // SAFETY: lseek on an open fd has no memory effects.
        let pos = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        if pos >= 0 {
            return Ok(true);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Ok(false),
            // A filesystem without SEEK_DATA: assume data, so nothing is formatted over.
            _ => Ok(true),
        }
    }

    fn copy_method_in(&self, dir: &Path) -> Result<CopyMethod> {
        let (a, b) = (dir.join(".reflink-probe-a"), dir.join(".reflink-probe-b"));
        let _ = fs::remove_file(&a);
        let _ = fs::remove_file(&b);
        fs::write(&a, [0u8; 4096]).ctx(|| format!("write {}", a.display()))?;
        let method = self.clone_file(&a, &b);
        let _ = fs::remove_file(&a);
        let _ = fs::remove_file(&b);
        method
    }

    fn apply_group(&self, root: &Path, gid: u32) -> Result<u64> {
        crate::os::tree::apply_group(root, gid)
    }

    fn check_writable(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        // An unnamed file: concurrent probes (the livenessprobe's, an operator's) never meet
        // at one name, and a crash leaves nothing behind.
        let unnamed = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(dir);
        match unnamed {
            Ok(mut f) => f
                .write_all(b"ok")
                .ctx(|| format!("write a scratch file in {}", dir.display())),
            // A filesystem without unnamed files: a name no concurrent probe shares.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let probe = dir.join(format!(
                    ".probe-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                fs::write(&probe, b"ok")
                    .and_then(|_| fs::remove_file(&probe))
                    .ctx(|| format!("write {}", probe.display()))
            }
            Err(e) => Err(HostError::io(
                format!("create a scratch file in {}", dir.display()),
                e,
            )),
        }
    }

    fn grow(&self, device: &Path, mount_point: Option<&Path>, fs: Filesystem) -> Result<()> {
        let fs_type = fs.name();
        let growth = fs.growth();
        let target = match mount_point {
            Some(mp) if growth.by_mount_point => mp,
            Some(_) => device,
            None if !growth.offline => {
                return Err(HostError::other(format!(
                    "{fs_type} grows only while mounted"
                )));
            }
            None => {
                if let Some((check, args, sound)) = growth.check_first {
                    let out = run(Command::new(check).args(args).arg(device))?;
                    if !out.status.code().is_some_and(|c| sound.contains(&c)) {
                        return Err(failed(check, device.display(), &out));
                    }
                }
                device
            }
        };
        let out = run(Command::new(growth.tool).arg(target))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(failed(growth.tool, target.display(), &out))
        }
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        let mut f = File::open(device).ctx(|| format!("open {}", device.display()))?;
        f.seek(SeekFrom::End(0))
            .ctx(|| format!("size of {}", device.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_expected_filesystem_is_opened_for_a_freeze() {
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let fs = LinuxHost.open_mounted(dir.path(), (major, minor)).unwrap();
        assert!(fs.root.is_some());
        // Another device: refused, never frozen.
        assert!(matches!(
            LinuxHost.open_mounted(dir.path(), (major, minor + 1000)),
            Err(HostError::Mismatch(_))
        ));
        // A symlink where the mount point was: refused, not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/", &link).unwrap();
        assert!(LinuxHost.open_mounted(&link, (major, minor)).is_err());
    }

    #[test]
    fn blkid_output_is_classified() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Probe::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid("PTUUID=1\nPTTYPE=gpt\n"),
            Probe::Other("a gpt partition table".into())
        );
        assert_eq!(
            parse_blkid("TYPE=LVM2_member\nUSAGE=raid\n"),
            Probe::Other("LVM2_member (raid)".into())
        );
        assert_eq!(parse_blkid(""), Probe::Empty);
    }
}
