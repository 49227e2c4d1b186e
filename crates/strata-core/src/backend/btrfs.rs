//! The btrfs backend: a subvolume per volume, its size enforced by a qgroup limit; snapshots
//! are read-only subvolume snapshots and clones writable ones, both O(1) and atomic.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::directory::{self, DirectoryBackend, DirectoryKind};
use crate::error::{Error, Result};
use crate::model::{CopyMethod, MIB};
use crate::os::Host;

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

pub struct Subvolumes;

pub type BtrfsBackend = DirectoryBackend<Subvolumes>;

/// Checks that the pool is on btrfs and turns quotas on (idempotent).
pub fn btrfs_backend(pool: PathBuf, host: Host) -> Result<BtrfsBackend> {
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
    btrfs(&["quota", "enable"], &[&pool])?;
    Ok(DirectoryBackend::new(pool, host, Subvolumes))
}

fn btrfs(args: &[&str], paths: &[&Path]) -> Result<String> {
    let out = crate::os::linux::run(Command::new("btrfs").args(args).args(paths))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let msg = format!(
        "btrfs {} {}: {}",
        args.join(" "),
        paths.join(" "),
        crate::os::linux::tool_says(&out)
    );
    if stderr.contains("No space left") || stderr.contains("Disk quota exceeded") {
        Err(Error::ResourceExhausted(msg))
    } else {
        Err(Error::Internal(msg))
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

impl DirectoryKind for Subvolumes {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn minimum_size(&self) -> u64 {
        16 * MIB
    }

    fn create(&self, data: &Path, size: u64) -> Result<()> {
        btrfs(&["subvolume", "create"], &[data])?;
        self.resize(data, size)
    }

    fn destroy(&self, data: &Path) -> Result<()> {
        btrfs(&["subvolume", "delete"], &[data])
            .map(drop)
            // Not a subvolume (a creation cut short before it was made): a plain directory.
            .or_else(|_| directory::remove(data))
    }

    fn copy(
        &self,
        _host: &Host,
        source: &Path,
        data: &Path,
        size: u64,
        snapshot: bool,
    ) -> Result<CopyMethod> {
        if snapshot {
            btrfs(&["subvolume", "snapshot", "-r"], &[source, data])?;
        } else {
            btrfs(&["subvolume", "snapshot"], &[source, data])?;
            self.resize(data, size)?;
        }
        Ok(CopyMethod::Reflink)
    }

    fn resize(&self, data: &Path, size: u64) -> Result<()> {
        btrfs(&["qgroup", "limit", &size.to_string()], &[data]).map(drop)
    }

    fn used(&self, data: &Path) -> Result<(u64, Option<u64>)> {
        let text = btrfs(&["qgroup", "show", "-rf", "--raw"], &[data])?;
        parse_qgroup(&text)
            .ok_or_else(|| Error::Internal(format!("unexpected btrfs qgroup output: {text}")))
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
