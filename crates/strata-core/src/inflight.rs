//! Per-object in-flight guards. A second concurrent operation on the same volume (or the same
//! name, for CreateVolume) is refused with ABORTED instead of waiting, as the CSI spec allows;
//! operations on different objects never wait for each other. The lock protecting the set is
//! held only to insert or remove a key, never across slow work.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Default)]
pub struct InFlight {
    keys: Mutex<HashSet<String>>,
}

/// Releases its key when dropped, also on error paths and panics.
pub struct Guard {
    owner: Arc<InFlight>,
    key: String,
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Claims `key`, or fails with ABORTED if another operation holds it.
    pub fn acquire(self: &Arc<Self>, key: impl Into<String>) -> Result<Guard> {
        let key = key.into();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.clone()) {
            return Err(Error::Aborted(format!(
                "an operation on {} is already in progress; retry when it has finished",
                crate::validate::bounded(&key, 2 * crate::validate::MAX_ECHO_BYTES)
            )));
        }
        Ok(Guard {
            owner: self.clone(),
            key,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.owner
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_release() {
        let f = InFlight::new();
        let g = f.acquire("vol-a").unwrap();
        assert!(matches!(f.acquire("vol-a"), Err(Error::Aborted(_))));
        let _other = f.acquire("vol-b").unwrap();
        drop(g);
        assert!(f.acquire("vol-a").is_ok());
    }
}
