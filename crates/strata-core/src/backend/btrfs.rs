//! The btrfs backend: a subvolume per volume, its size enforced by a qgroup limit; snapshots
//! are read-only subvolume snapshots and clones writable ones, both O(1).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::tree::{self, data_dir};
use super::{Attachment, Backend};
use crate::error::{Error, Result};
use crate::model::{CopyMethod, GIB, MIB, SizePolicy};
use crate::os::{FsUsage, Host};

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

pub struct BtrfsBackend {
    pool: PathBuf,
    host: Host,
}

fn btrfs(args: &[&str], path: &Path) -> Result<String> {
    let out = Command::new("btrfs")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Unavailable("btrfs is not installed: install btrfs-progs".into())
            } else {
                Error::io("run btrfs", e)
            }
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = format!(
            "btrfs {} {}: {}",
            args.join(" "),
            path.display(),
            stderr.trim()
        );
        if stderr.contains("No space left") || stderr.contains("Disk quota exceeded") {
            Err(Error::ResourceExhausted(msg))
        } else {
            Err(Error::Internal(msg))
        }
    }
}

/// Referenced bytes and limit of the qgroup in `btrfs qgroup show -rf --raw` output.
fn parse_qgroup(text: &str) -> Option<(u64, Option<u64>)> {
    let line = text.lines().find(|l| l.trim_start().starts_with("0/"))?;
    let cols: Vec<&str> = line.split_whitespace().collect();
    let referenced = cols.get(1)?.parse().ok()?;
    let limit = cols.get(3).and_then(|c| c.parse().ok());
    Some((referenced, limit))
}

impl BtrfsBackend {
    /// Checks that the pool is on btrfs and turns quotas on (idempotent).
    pub fn new(pool: PathBuf, host: Host) -> Result<Self> {
        let c = std::ffi::CString::new(pool.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::InvalidArgument("pool path contains NUL".into()))?;
        // SAFETY: statfs writes into the zeroed struct; c is a valid path.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(Error::io(
                format!("statfs {}", pool.display()),
                std::io::Error::last_os_error(),
            ));
        }
        if st.f_type as i64 != BTRFS_SUPER_MAGIC {
            return Err(Error::FailedPrecondition(format!(
                "{} is not on a btrfs filesystem; the btrfs backend needs one",
                pool.display()
            )));
        }
        btrfs(&["quota", "enable"], &pool)?;
        Ok(BtrfsBackend { pool, host })
    }

    fn limit(&self, dir: &Path, size: u64) -> Result<()> {
        btrfs(&["qgroup", "limit", &size.to_string()], &data_dir(dir)).map(drop)
    }
}

impl Backend for BtrfsBackend {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn size_policy(&self) -> SizePolicy {
        SizePolicy {
            granularity: MIB,
            minimum: 16 * MIB,
            default: GIB,
            maximum: u64::MAX / 2,
        }
    }

    fn supports_block(&self) -> bool {
        false
    }

    fn serves_directories(&self) -> bool {
        true
    }

    fn pool_usage(&self) -> Result<FsUsage> {
        self.host.filesystems.usage(&self.pool)
    }

    fn create(&self, dir: &Path, size: u64) -> Result<()> {
        btrfs(&["subvolume", "create"], &data_dir(dir))?;
        self.limit(dir, size)
    }

    fn repair(&self, _dir: &Path, _capacity: u64, _holds_data: bool) -> Result<Option<String>> {
        Ok(None)
    }

    fn usage(&self, dir: &Path, capacity_bytes: u64) -> Result<Option<FsUsage>> {
        let pool = self.host.filesystems.usage(&self.pool)?;
        let text = btrfs(&["qgroup", "show", "-rf", "--raw"], &data_dir(dir))?;
        let (used, limit) = parse_qgroup(&text)
            .ok_or_else(|| Error::Internal(format!("unexpected btrfs qgroup output: {text}")))?;
        let total = limit.unwrap_or(capacity_bytes);
        Ok(Some(FsUsage {
            total_bytes: total,
            used_bytes: used,
            available_bytes: total.saturating_sub(used).min(pool.available_bytes),
            ..pool
        }))
    }

    fn copy_from(
        &self,
        source_dir: &Path,
        dir: &Path,
        size: u64,
        snapshot: bool,
    ) -> Result<CopyMethod> {
        let args: &[&str] = if snapshot {
            &["subvolume", "snapshot", "-r"]
        } else {
            &["subvolume", "snapshot"]
        };
        let out = Command::new("btrfs")
            .args(args)
            .arg(data_dir(source_dir))
            .arg(data_dir(dir))
            .output()
            .map_err(|e| Error::io("run btrfs", e))?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "btrfs subvolume snapshot: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if !snapshot {
            self.limit(dir, size)?;
        }
        Ok(CopyMethod::Reflink)
    }

    fn expand(&self, dir: &Path, size: u64) -> Result<()> {
        self.limit(dir, size)
    }

    fn destroy(&self, dir: &Path) -> Result<()> {
        let data = data_dir(dir);
        if !data.exists() {
            return Ok(());
        }
        btrfs(&["subvolume", "delete"], &data)
            .map(drop)
            // Not a subvolume (a creation cut short before it was made): a plain directory.
            .or_else(|_| tree::remove(&data))
    }

    fn condition(&self, dir: &Path, _capacity_bytes: u64) -> Option<String> {
        tree::condition(dir)
    }

    fn has_data(&self, _dir: &Path) -> Result<bool> {
        Ok(true)
    }

    fn attachment(&self, dir: &Path) -> Result<Option<Attachment>> {
        tree::attachment(&self.host, dir)
    }

    fn attach(&self, dir: &Path) -> Result<Attachment> {
        Ok(Attachment::Directory(tree::locate(&self.host, dir)?))
    }

    fn release_on_unmount(&self, _attachment: &Attachment) -> Result<()> {
        Ok(())
    }

    fn detach(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qgroup_output_is_parsed() {
        let text = "Qgroupid    Referenced    Exclusive  Max referenced   Path \n--------    ----------    ---------  --------------   ---- \n0/256          3162112      3162112        67108864   v\n";
        assert_eq!(parse_qgroup(text), Some((3162112, Some(67108864))));
        let none = "0/257 16384 16384 none data\n";
        assert_eq!(parse_qgroup(none), Some((16384, None)));
        assert_eq!(parse_qgroup("garbage"), None);
    }
}
