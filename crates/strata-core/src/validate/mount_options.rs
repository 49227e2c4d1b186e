//! The mount flags a request may ask for (a capability's `mount_flags`), checked against an
//! allowlist: flags that only restrict or tune the mount are accepted, anything that could
//! weaken the host is not. The host layer mounts what this produced, and no more.

use crate::error::{Error, Result};

/// Mount flags from a capability's `mount_flags`, checked against an allowlist: flags that
/// only restrict or tune the mount are accepted; anything that could weaken the host is not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: u64,
    /// Filesystem-specific `key=value` options passed as mount data.
    pub data: Vec<String>,
}

const FLAG_TABLE: &[(&str, u64)] = &[
    ("ro", libc::MS_RDONLY),
    ("noatime", libc::MS_NOATIME),
    ("nodiratime", libc::MS_NODIRATIME),
    ("relatime", libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME),
    ("lazytime", libc::MS_LAZYTIME),
    ("nodev", libc::MS_NODEV),
    ("nosuid", libc::MS_NOSUID),
    ("noexec", libc::MS_NOEXEC),
    ("sync", libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC),
    ("rw", 0),
    ("defaults", 0),
];

/// Filesystem options passed through as mount data.
const DATA_OPTIONS: &[&str] = &[
    "discard",
    "nodiscard",
    "barrier",
    "nobarrier",
    "user_xattr",
    "acl",
    "noacl",
    "errors",
    "commit",
    "data",
    "journal_checksum",
    "inode64",
    "logbufs",
    "logbsize",
    "allocsize",
    "largeio",
    "nouuid",
    "prjquota",
    "usrquota",
    "grpquota",
    "quota",
    "noquota",
    "init_itable",
    "noinit_itable",
    "delalloc",
    "nodelalloc",
    "dax",
];

/// Values a data option may take where some values are unsafe for the host: `errors=panic`
/// would let a damaged or crafted filesystem crash the node.
const DATA_VALUES: &[(&str, &[&str])] = &[
    ("errors", &["continue", "remount-ro"]),
    ("data", &["journal", "ordered", "writeback"]),
];

/// The spec's limit on the total size of `mount_flags`.
pub const MAX_MOUNT_FLAGS_BYTES: usize = 4096;

impl MountOptions {
    /// Parses and checks `mount_flags`. Messages name a refused flag by its key only: flag
    /// values may be secrets (the spec says so), so they are never echoed or logged.
    pub fn parse(mount_flags: &[String]) -> Result<Self> {
        let total: usize = mount_flags.iter().map(String::len).sum();
        if total > MAX_MOUNT_FLAGS_BYTES {
            return Err(Error::InvalidArgument(format!(
                "mount_flags hold {total} bytes; CSI allows at most {MAX_MOUNT_FLAGS_BYTES}"
            )));
        }
        let mut opts = MountOptions::default();
        for entry in mount_flags {
            // Kubernetes passes one flag per entry, but accept "a,b" too.
            for flag in entry.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                if let Some((_, bits)) = FLAG_TABLE.iter().find(|(name, _)| *name == flag) {
                    opts.flags |= bits;
                    continue;
                }
                let (key, value) = match flag.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (flag, None),
                };
                let value_ok = value.is_none_or(|v| {
                    v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
                        && DATA_VALUES
                            .iter()
                            .find(|(k, _)| *k == key)
                            .is_none_or(|(_, allowed)| allowed.contains(&v))
                });
                if DATA_OPTIONS.contains(&key) && value_ok {
                    opts.data.push(flag.to_owned());
                    continue;
                }
                let shown = crate::validate::bounded(key, 32);
                return Err(Error::InvalidArgument(if DATA_OPTIONS.contains(&key) {
                    format!(
                        "mount flag {shown:?} has a value that is not allowed (the value is not shown: mount flags may be secret); {}",
                        DATA_VALUES
                            .iter()
                            .map(|(k, v)| format!("{k} takes {}", v.join(" or ")))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                } else {
                    format!(
                        "mount flag {shown:?} is not allowed; allowed flags: {}, and {}",
                        FLAG_TABLE
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", "),
                        DATA_OPTIONS.join(", ")
                    )
                }));
            }
        }
        Ok(opts)
    }

    pub fn read_only(&self) -> bool {
        self.flags & libc::MS_RDONLY != 0
    }

    /// The per-mount flags among `names` (as mountinfo lists them: `ro`, `nosuid`...).
    pub fn from_names(names: &[String]) -> Self {
        let flags = names
            .iter()
            .filter_map(|n| FLAG_TABLE.iter().find(|(name, _)| name == n))
            .fold(0, |acc, (_, bits)| acc | bits);
        MountOptions {
            flags,
            data: vec![],
        }
    }

    /// The per-mount flags as mountinfo lists them.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![if self.read_only() { "ro" } else { "rw" }.to_owned()];
        names.extend(
            FLAG_TABLE
                .iter()
                .filter(|(n, bits)| *bits != 0 && *n != "ro" && self.flags & bits == *bits)
                .map(|(n, _)| (*n).to_owned()),
        );
        names
    }

    /// Only the per-mount flags (what a bind mount can carry), without filesystem options.
    pub fn per_mount(&self) -> Self {
        MountOptions {
            flags: self.flags,
            data: vec![],
        }
    }

    /// These flags with `other`'s added.
    pub fn with(mut self, other: &MountOptions) -> Self {
        self.flags |= other.flags;
        self.data.extend(other.data.iter().cloned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_flags_follow_the_allowlist() {
        let o = MountOptions::parse(&flags(&["noatime", "nodev,discard", "errors=remount-ro"]))
            .unwrap();
        assert_eq!(o.flags, libc::MS_NOATIME | libc::MS_NODEV);
        assert_eq!(o.data, vec!["discard", "errors=remount-ro"]);
        for bad in [
            "suid",
            "dev",
            "bind",
            "rbind",
            "x-mount.mkdir",
            "context=\"a,b\"",
        ] {
            assert!(
                matches!(
                    MountOptions::parse(&flags(&[bad])),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        assert!(MountOptions::parse(&flags(&["ro"])).unwrap().read_only());
        for bad in ["errors=panic", "data=evil"] {
            let e = MountOptions::parse(&flags(&[bad])).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}");
        }
        let secret = MountOptions::parse(&flags(&["password=hunter2"])).unwrap_err();
        assert!(!secret.message().contains("hunter2"), "{secret}");
        let huge = MountOptions::parse(&flags(&[&"noatime,".repeat(600)])).unwrap_err();
        assert!(huge.message().contains("at most 4096"), "{huge}");
        let o = MountOptions::parse(&flags(&["nosuid", "nodev", "noexec"])).unwrap();
        assert_eq!(MountOptions::from_names(&o.names()), o);
    }
}
