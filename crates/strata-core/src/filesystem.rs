//! The filesystems Strata formats volumes with, and everything that differs between them: the
//! name a request uses, the smallest device, the mkfs command, the mount options each needs,
//! and how each grows. Adding a filesystem touches this file only.

use crate::error::{Error, Result};
use crate::host_error::HostError;
use crate::model::MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filesystem {
    Ext4,
    Xfs,
    Ext3,
    Ext2,
}

/// How a filesystem grows into its grown device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    /// It can grow while not mounted: a stage grows it before mounting, since growing it
    /// online may be refused (ext4 needs CAP_SYS_RESOURCE for that).
    pub offline: bool,
    /// The tool that grows it.
    pub tool: &'static str,
    /// The tool takes the mount point (else the device).
    pub by_mount_point: bool,
    /// A check to run before growing it offline, and the exit codes that mean it is sound.
    pub check_first: Option<(&'static str, &'static [&'static str], &'static [i32])>,
}

impl Filesystem {
    /// What a request may ask for, in the order messages list them.
    pub const ALL: [Filesystem; 4] = [
        Filesystem::Ext4,
        Filesystem::Xfs,
        Filesystem::Ext3,
        Filesystem::Ext2,
    ];
    /// What a mount capability without an `fs_type` gets.
    pub const DEFAULT: Filesystem = Filesystem::Ext4;

    /// The name requests, records, mkfs and the mount table use.
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
            Filesystem::Ext3 => "ext3",
            Filesystem::Ext2 => "ext2",
        }
    }

    /// The filesystem named `name`, if Strata formats it.
    pub fn parse(name: &str) -> Option<Filesystem> {
        Self::ALL.into_iter().find(|fs| fs.name() == name)
    }

    /// The filesystem a mount capability's `fs_type` asks for: empty means the default;
    /// anything Strata does not format is INVALID_ARGUMENT.
    pub fn requested(fs_type: &str) -> Result<Filesystem> {
        if fs_type.is_empty() {
            return Ok(Self::DEFAULT);
        }
        Self::parse(fs_type).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|fs| fs.name()).collect();
            Error::InvalidArgument(format!(
                "fs_type {} is not supported; use one of {}",
                crate::validate::echo(fs_type),
                names.join(", ")
            ))
        })
    }

    /// The smallest device its mkfs accepts (mkfs.xfs: "must be larger than 300MB"); the
    /// ext family formats anything the volume size policy allows.
    pub fn min_bytes(self) -> u64 {
        match self {
            Filesystem::Xfs => 300 * MIB,
            Filesystem::Ext4 | Filesystem::Ext3 | Filesystem::Ext2 => 0,
        }
    }

    /// The mkfs program and its options (the device follows them).
    pub fn mkfs(self, encrypt: bool) -> (String, Vec<&'static str>) {
        let args = match self {
            // Skip discard (the image is sparse already) and lazy-init for a fast mkfs; no
            // resize inode (its reserved descriptor blocks are half of mkfs's writes):
            // growth works without it, offline (resize2fs) and online (the kernel moves to
            // meta_bg). `encrypt` lets fscrypt policies be set (encrypted volumes).
            Filesystem::Ext4 | Filesystem::Ext3 | Filesystem::Ext2 => vec![
                "-q",
                "-F",
                "-O",
                if encrypt {
                    "^resize_inode,encrypt"
                } else {
                    "^resize_inode"
                },
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ],
            // -f: the caller has established that nothing but an interrupted mkfs is there.
            Filesystem::Xfs => vec!["-q", "-K", "-f"],
        };
        (format!("mkfs.{}", self.name()), args)
    }

    /// Mount options it always needs: clones and snapshots share the filesystem UUID, which
    /// xfs refuses to mount twice without `nouuid`.
    pub fn mount_data(self) -> &'static [&'static str] {
        match self {
            Filesystem::Xfs => &["nouuid"],
            Filesystem::Ext4 | Filesystem::Ext3 | Filesystem::Ext2 => &[],
        }
    }

    /// How it grows.
    pub fn growth(self) -> Growth {
        match self {
            Filesystem::Ext4 | Filesystem::Ext3 | Filesystem::Ext2 => Growth {
                offline: true,
                tool: "resize2fs",
                by_mount_point: false,
                // resize2fs wants a freshly checked filesystem when it is not mounted;
                // e2fsck's 0 is clean, 1 errors corrected.
                check_first: Some(("e2fsck", &["-f", "-p"], &[0, 1])),
            },
            Filesystem::Xfs => Growth {
                offline: false,
                tool: "xfs_growfs",
                by_mount_point: true,
                check_first: None,
            },
        }
    }
}

impl Filesystem {
    /// What a failed mkfs means: a device too small for this filesystem is the request's to
    /// fix (FAILED_PRECONDITION, naming the minimum); anything else is the host's.
    pub fn format_error(self, e: HostError) -> Error {
        if e.tool_said("too small") || e.tool_said("must be larger") {
            Error::FailedPrecondition(format!(
                "{e}; create a larger volume ({self} needs at least {} MiB)",
                self.min_bytes().max(MIB) >> 20
            ))
        } else {
            e.into()
        }
    }

    /// What a failed growth means: a check that found errors it could not fix, or an online
    /// growth the kernel refused for want of a privilege (ext4 needs CAP_SYS_RESOURCE), are
    /// FAILED_PRECONDITION with what to do; anything else is the host's.
    pub fn grow_error(self, e: HostError, online: bool) -> Error {
        let growth = self.growth();
        let checked = matches!((&e, growth.check_first), (HostError::Tool { tool, .. }, Some((check, _, _))) if tool == check);
        if checked {
            Error::FailedPrecondition(format!(
                "{e}: the check found errors it could not fix; repair the filesystem by hand"
            ))
        } else if online && e.is_permission() {
            Error::FailedPrecondition(format!(
                "{e}: growing the mounted {self} filesystem was refused (EPERM): it needs CAP_SYS_RESOURCE (run strata privileged) and a kernel that grows {self} online; or unstage and stage the volume again to grow it offline"
            ))
        } else {
            e.into()
        }
    }
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_default_and_check() {
        assert_eq!(Filesystem::requested("").unwrap(), Filesystem::Ext4);
        assert_eq!(Filesystem::requested("xfs").unwrap(), Filesystem::Xfs);
        assert!(matches!(
            Filesystem::requested("ntfs"),
            Err(Error::InvalidArgument(m)) if m.contains("ext4, xfs, ext3, ext2")
        ));
        for fs in Filesystem::ALL {
            assert_eq!(Filesystem::parse(fs.name()), Some(fs));
        }
    }

    fn tool(tool: &str, code: i32, output: &str) -> HostError {
        HostError::Tool {
            tool: tool.into(),
            target: "/dev/loop3".into(),
            code: Some(code),
            said: output.lines().next().unwrap_or_default().into(),
            output: output.into(),
        }
    }

    #[test]
    fn the_core_decides_what_a_failed_tool_means() {
        // mkfs.xfs on a small device: the request's to fix.
        let small = tool(
            "mkfs.xfs",
            1,
            "Filesystem must be larger than 300MB.\nUsage: ...",
        );
        assert!(matches!(
            Filesystem::Xfs.format_error(small),
            Error::FailedPrecondition(m) if m.contains("at least 300 MiB")
        ));
        assert!(matches!(
            Filesystem::Ext4.format_error(tool("mkfs.ext4", 1, "Input/output error")),
            Error::Internal(_)
        ));
        // resize2fs refused online (its first line is a version banner): a privilege.
        let refused = tool(
            "resize2fs",
            1,
            "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: Operation not permitted While trying to add group #1",
        );
        assert!(matches!(
            Filesystem::Ext4.grow_error(refused.clone(), true),
            Error::FailedPrecondition(m) if m.contains("CAP_SYS_RESOURCE")
        ));
        assert!(matches!(
            Filesystem::Ext4.grow_error(refused, false),
            Error::Internal(_)
        ));
        // e2fsck before an offline growth found what it could not fix.
        assert!(matches!(
            Filesystem::Ext4.grow_error(tool("e2fsck", 4, "UNEXPECTED INCONSISTENCY"), false),
            Error::FailedPrecondition(m) if m.contains("repair the filesystem by hand")
        ));
        // By default: a full pool, a path, a moving object, a missing tool.
        let full = HostError::io("write", std::io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(matches!(Error::from(full), Error::ResourceExhausted(_)));
        assert!(matches!(
            Error::from(HostError::Path("a symlink".into())),
            Error::InvalidArgument(_)
        ));
        assert!(matches!(
            Error::from(HostError::Changing("moved".into())),
            Error::Aborted(_)
        ));
        assert!(matches!(
            Error::from(HostError::Missing {
                tool: "mkfs.xfs".into()
            }),
            Error::Unavailable(m) if m.contains("install")
        ));
    }
}
