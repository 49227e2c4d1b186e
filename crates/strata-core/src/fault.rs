//! Fault points for the crash-consistency and concurrency tests. A server started with a
//! crash point kills itself with SIGKILL when it reaches that point, leaving the pool and the
//! kernel exactly as a real crash would; a delay point makes the operation sleep there, so a
//! test can hold it in flight. Both unset in production.

use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct FaultPoints {
    armed: Option<String>,
    delay: Option<(String, Duration)>,
}

impl FaultPoints {
    pub fn new(armed: Option<String>) -> Self {
        FaultPoints {
            armed: armed.filter(|s| !s.is_empty()),
            delay: None,
        }
    }

    /// Adds a delay point, given as `point=milliseconds`.
    pub fn with_delay(mut self, spec: Option<String>) -> Self {
        self.delay = spec.and_then(|s| {
            let (point, ms) = s.split_once('=')?;
            Some((point.to_owned(), Duration::from_millis(ms.parse().ok()?)))
        });
        self
    }

    /// Dies (or waits) here if this point is armed.
    pub fn reach(&self, point: &str) {
        if let Some((p, d)) = &self.delay
            && p == point
        {
            tracing::warn!(point, millis = d.as_millis() as u64, "delay point reached");
            std::thread::sleep(*d);
        }
        if self.armed.as_deref() == Some(point) {
            tracing::warn!(point, "crash point reached: killing the process");
            // SAFETY: plain syscalls; SIGKILL cannot be caught, so nothing runs after it.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
