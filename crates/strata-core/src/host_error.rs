//! What went wrong on the host, as the host layer (`os/`) reports it. The host layer never picks a CSI
//! code: it says what happened (a system call's errno, a tool's exit code and first line, a
//! path it will not act on), and the core decides what that means for the caller: by default
//! through `From<HostError>` for the core's error, and where a failure means something
//! particular (mkfs refusing a small device, an online resize refused for want of a
//! capability, a mount point kept busy) by classifying it at the call site.

use std::fmt;
use std::io;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// A system call failed with `errno` while doing `what`.
    Sys { what: String, errno: i32 },
    /// An I/O failure without an errno (`what` says what was done and what failed).
    Io { what: String },
    /// A tool ran and failed: its exit code (`None`: killed by a signal), the first line it
    /// said (bounded, never its usage text: for messages), and what it wrote (bounded: for
    /// classifying, never shown).
    Tool {
        tool: String,
        target: String,
        code: Option<i32>,
        said: String,
        output: String,
    },
    /// A tool is not installed.
    Missing { tool: String },
    /// A path the host will not act on: a NUL in it, not clean, or a symlink below an allowed
    /// directory.
    Path(String),
    /// What is there is not what the caller checked (another filesystem at a mount point, a
    /// mount that is not the volume's).
    Mismatch(String),
    /// What the caller acts on kept changing under it; a retry may succeed.
    Changing(String),
    /// The host lacks something the driver needs (the loop driver).
    Unsupported(String),
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;

impl HostError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl fmt::Display, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => HostError::Sys {
                what: what.to_string(),
                errno,
            },
            None => HostError::Io {
                what: format!("{what}: {err}"),
            },
        }
    }

    /// Any other failure, said in words.
    pub fn other(what: impl Into<String>) -> Self {
        HostError::Io { what: what.into() }
    }

    /// The failed system call's errno.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::Sys { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether a tool failed and wrote something containing `needle` (any case).
    pub fn tool_said(&self, needle: &str) -> bool {
        matches!(self, HostError::Tool { output, .. }
            if output.to_lowercase().contains(&needle.to_lowercase()))
    }

    /// The filesystem or quota had no room: ENOSPC, EDQUOT, or a tool saying so.
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOSPC | libc::EDQUOT))
            || self.tool_said("No space left")
            || self.tool_said("Disk quota exceeded")
    }

    /// The kernel refused for want of a privilege: EPERM, EACCES, or a tool saying so.
    pub fn is_permission(&self) -> bool {
        matches!(self.errno(), Some(libc::EPERM | libc::EACCES))
            || self.tool_said("Operation not permitted")
            || self.tool_said("Permission denied")
    }

    /// Something still uses what was to be released: EBUSY.
    pub fn is_busy(&self) -> bool {
        self.errno() == Some(libc::EBUSY)
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Sys { what, errno } => {
                write!(f, "{what}: {}", io::Error::from_raw_os_error(*errno))
            }
            HostError::Io { what } => f.write_str(what),
            HostError::Tool {
                tool,
                target,
                code,
                said,
                ..
            } => {
                let exit = code.map_or("was killed".to_owned(), |c| format!("exited {c}"));
                write!(f, "{tool} {target} {exit}: {said}")
            }
            HostError::Missing { tool } => write!(
                f,
                "{tool} is not installed: install e2fsprogs, xfsprogs, btrfs-progs and util-linux"
            ),
            HostError::Path(m)
            | HostError::Mismatch(m)
            | HostError::Changing(m)
            | HostError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for HostError {}

/// Adds what was being done to an I/O result: `file.sync_all().ctx(|| "sync x")?`.
pub trait IoContext<T> {
    fn ctx<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| HostError::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_happened() {
        let e = HostError::io("write meta", io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(e.is_no_space() && e.errno() == Some(libc::ENOSPC));
        assert!(e.to_string().starts_with("write meta: "));
        let t = HostError::Tool {
            tool: "resize2fs".into(),
            target: "/dev/loop0".into(),
            code: Some(1),
            said: "resize2fs 1.47.0 (5-Feb-2023)".into(),
            output: "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: Operation not permitted While trying to add group #1".into(),
        };
        assert!(t.is_permission() && !t.is_no_space());
        assert_eq!(
            t.to_string(),
            "resize2fs /dev/loop0 exited 1: resize2fs 1.47.0 (5-Feb-2023)"
        );
    }
}
