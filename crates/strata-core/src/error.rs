//! The one error type of the core. Each variant names the CSI outcome it stands for; the
//! gRPC layer maps it to a status code in exactly one place.

use std::fmt;
use std::io;

/// What went wrong, in terms a CSI caller can act on. The message says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A field is missing or malformed; the caller must fix the request.
    InvalidArgument(String),
    /// The volume (or other object) named in the request does not exist.
    NotFound(String),
    /// An object with this name or at this path exists but is incompatible with the request.
    AlreadyExists(String),
    /// The request is valid but the current state does not allow it.
    FailedPrecondition(String),
    /// The requested size cannot be provided.
    OutOfRange(String),
    /// The pool (or the node) has no room left.
    ResourceExhausted(String),
    /// Another operation on the same object is in flight; retry later.
    Aborted(String),
    /// The driver cannot serve right now (pool unusable, shutting down).
    Unavailable(String),
    /// The operation is not provided by this driver or backend.
    Unimplemented(String),
    /// A failure of the host (syscall, tool) that the caller cannot fix by changing the request.
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::OutOfRange(m)
            | Error::ResourceExhausted(m)
            | Error::Aborted(m)
            | Error::Unavailable(m)
            | Error::Unimplemented(m)
            | Error::Internal(m) => m,
        }
    }

    /// Wraps an I/O error with what was being done. ENOSPC and EDQUOT become
    /// `ResourceExhausted` so a full pool is reported as such, not as an internal fault.
    pub fn io(context: impl fmt::Display, err: io::Error) -> Self {
        crate::host_error::HostError::io(context, err).into()
    }
}

/// What a host failure means for the caller when the call site gives it no particular
/// meaning: a full pool is RESOURCE_EXHAUSTED, a path the host will not act on
/// INVALID_ARGUMENT, a changed object FAILED_PRECONDITION, a moving one ABORTED, a missing
/// tool or driver UNAVAILABLE, and anything else INTERNAL, with what the host said.
impl From<crate::host_error::HostError> for Error {
    fn from(e: crate::host_error::HostError) -> Self {
        use crate::host_error::HostError as H;
        let msg = e.to_string();
        if e.is_no_space() {
            return Error::ResourceExhausted(format!(
                "{msg}; the pool is full: free space or delete volumes, then retry"
            ));
        }
        match e {
            H::Path(_) => Error::InvalidArgument(msg),
            H::Mismatch(_) => Error::FailedPrecondition(msg),
            H::Changing(_) => Error::Aborted(msg),
            H::Missing { .. } | H::Unsupported(_) => Error::Unavailable(msg),
            H::Sys { .. } | H::Io { .. } | H::Tool { .. } => Error::Internal(msg),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

/// Adds context to I/O results: `file.sync_all().ctx(|| format!("sync {path}"))?`.
pub trait IoContext<T> {
    fn ctx<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_resource_exhausted() {
        let e = Error::io("write meta", io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        let e = Error::io("write meta", io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, Error::Internal(_)));
    }
}
