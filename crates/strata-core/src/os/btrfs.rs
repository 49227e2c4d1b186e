//! btrfs, through its tool: the one place that runs `btrfs`, parses its output and classifies
//! its errors (as TopoLVM's lvmd command package does for LVM). The btrfs backend asks for
//! subvolumes and qgroup limits here and never sees a command line.

use std::path::Path;
use std::process::Command;

use crate::host_error::{HostError, Result};

/// What the btrfs backend needs from btrfs.
pub trait Btrfs: Send + Sync {
    /// Whether `path` lies on a btrfs filesystem.
    fn is_btrfs(&self, path: &Path) -> Result<bool>;
    /// Turns quotas on for the filesystem of `pool` (idempotent).
    fn enable_quota(&self, pool: &Path) -> Result<()>;
    fn create_subvolume(&self, path: &Path) -> Result<()>;
    fn delete_subvolume(&self, path: &Path) -> Result<()>;
    /// Snapshots subvolume `source` as `target`, read-only for a snapshot, writable for a clone.
    fn snapshot(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Limits the subvolume's referenced bytes (its qgroup).
    fn set_limit(&self, path: &Path, bytes: u64) -> Result<()>;
    /// Referenced bytes of the subvolume and its limit, if any.
    fn usage(&self, path: &Path) -> Result<(u64, Option<u64>)>;
}

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

/// The real `btrfs` tool (and `statfs`).
pub struct BtrfsTool;

fn btrfs(args: &[&str], paths: &[&Path]) -> Result<String> {
    let out = super::linux::run(Command::new("btrfs").args(args).args(paths))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    Err(super::linux::tools::failed(
        &format!("btrfs {}", args.join(" ")),
        paths.join(" "),
        &out,
    ))
}

/// Referenced bytes and limit of the qgroup in `btrfs qgroup show -rf --raw` output.
fn parse_qgroup(text: &str) -> Option<(u64, Option<u64>)> {
    let line = text.lines().find(|l| l.trim_start().starts_with("0/"))?;
    let cols: Vec<&str> = line.split_whitespace().collect();
    let referenced = cols.get(1)?.parse().ok()?;
    let limit = cols.get(3).and_then(|c| c.parse().ok());
    Some((referenced, limit))
}

impl Btrfs for BtrfsTool {
    fn is_btrfs(&self, path: &Path) -> Result<bool> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| HostError::Path("path contains NUL".into()))?;
        // SAFETY: statfs writes into the zeroed struct; c is a valid path.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(HostError::io(
                format!("statfs {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(st.f_type as i64 == BTRFS_SUPER_MAGIC)
    }

    fn enable_quota(&self, pool: &Path) -> Result<()> {
        btrfs(&["quota", "enable"], &[pool]).map(drop)
    }

    fn create_subvolume(&self, path: &Path) -> Result<()> {
        btrfs(&["subvolume", "create"], &[path]).map(drop)
    }

    fn delete_subvolume(&self, path: &Path) -> Result<()> {
        btrfs(&["subvolume", "delete"], &[path]).map(drop)
    }

    fn snapshot(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        let args: &[&str] = if read_only {
            &["subvolume", "snapshot", "-r"]
        } else {
            &["subvolume", "snapshot"]
        };
        btrfs(args, &[source, target]).map(drop)
    }

    fn set_limit(&self, path: &Path, bytes: u64) -> Result<()> {
        btrfs(&["qgroup", "limit", &bytes.to_string()], &[path]).map(drop)
    }

    fn usage(&self, path: &Path) -> Result<(u64, Option<u64>)> {
        let text = btrfs(&["qgroup", "show", "-rf", "--raw"], &[path])?;
        parse_qgroup(&text).ok_or_else(|| {
            HostError::other(format!(
                "unexpected btrfs qgroup output: {}",
                crate::validate::bounded(&text, 200)
            ))
        })
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
