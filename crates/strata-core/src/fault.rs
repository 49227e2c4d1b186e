//! Crash points for the crash-consistency tests. A server started with a crash point kills
//! itself with SIGKILL when it reaches that point, leaving the pool and the kernel exactly as a
//! real crash would. Unset in production.

#[derive(Debug, Clone, Default)]
pub struct CrashPoints {
    armed: Option<String>,
}

impl CrashPoints {
    pub fn new(armed: Option<String>) -> Self {
        CrashPoints {
            armed: armed.filter(|s| !s.is_empty()),
        }
    }

    /// Dies here if this point is armed.
    pub fn reach(&self, point: &str) {
        if self.armed.as_deref() == Some(point) {
            tracing::warn!(point, "crash point reached: killing the process");
            // SAFETY: plain syscalls; SIGKILL cannot be caught, so nothing runs after it.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
