//! Per-object in-flight guards. A second concurrent operation on the same volume (or the same
//! name, for CreateVolume) is refused with ABORTED instead of waiting, as the CSI spec allows;
//! operations on different objects never wait for each other. Operations that only read an
//! object (a snapshot or clone of a volume, a restore from a snapshot) share it: any number
//! run together, while an operation that changes it (delete, expand, stage...) is refused
//! until they are done, and refuses them while it runs. The lock protecting the table is held
//! only to look up or change an entry, never across slow work.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Exclusive,
    /// Held by this many readers.
    Shared(usize),
}

#[derive(Default)]
pub struct InFlight {
    keys: Mutex<HashMap<String, Hold>>,
}

/// Releases its hold when dropped, also on error paths and panics.
pub struct Guard {
    owner: Arc<InFlight>,
    key: String,
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Claims `key` for an operation that changes its object, or fails with ABORTED if any
    /// other operation holds it.
    pub fn acquire(self: &Arc<Self>, key: impl Into<String>) -> Result<Guard> {
        self.claim(key.into(), false)
    }

    /// Claims `key` for an operation that only reads its object: shared with other readers,
    /// ABORTED while an operation that changes it runs.
    pub fn acquire_shared(self: &Arc<Self>, key: impl Into<String>) -> Result<Guard> {
        self.claim(key.into(), true)
    }

    /// Claims `key` exclusively, waiting until `deadline` while others hold it: for the short
    /// sections readers of one object must take in turn, such as freezing its filesystem.
    pub fn acquire_waiting_until(
        self: &Arc<Self>,
        key: &str,
        deadline: std::time::Instant,
    ) -> Result<Guard> {
        loop {
            match self.acquire(key) {
                Err(Error::Aborted(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn claim(self: &Arc<Self>, key: String, shared: bool) -> Result<Guard> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let busy = match keys.entry(key.clone()) {
            Entry::Vacant(v) => {
                v.insert(if shared {
                    Hold::Shared(1)
                } else {
                    Hold::Exclusive
                });
                None
            }
            Entry::Occupied(mut o) => match (*o.get(), shared) {
                (Hold::Shared(n), true) => {
                    o.insert(Hold::Shared(n + 1));
                    None
                }
                (Hold::Shared(_), false) => Some("is being read (a snapshot or clone of it)"),
                (Hold::Exclusive, _) => Some("is already in progress"),
            },
        };
        if let Some(why) = busy {
            return Err(Error::Aborted(format!(
                "an operation on {} {why}; retry when it has finished",
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
        let mut keys = self.owner.keys.lock().unwrap_or_else(|p| p.into_inner());
        match keys.get(&self.key).copied() {
            Some(Hold::Shared(n)) if n > 1 => {
                keys.insert(self.key.clone(), Hold::Shared(n - 1));
            }
            _ => {
                keys.remove(&self.key);
            }
        }
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

    #[test]
    fn readers_share_and_writers_wait_for_all_of_them() {
        let f = InFlight::new();
        let r1 = f.acquire_shared("vol-a").unwrap();
        let r2 = f.acquire_shared("vol-a").unwrap();
        assert!(matches!(f.acquire("vol-a"), Err(Error::Aborted(_))));
        drop(r1);
        assert!(matches!(f.acquire("vol-a"), Err(Error::Aborted(_))));
        drop(r2);
        let w = f.acquire("vol-a").unwrap();
        assert!(matches!(f.acquire_shared("vol-a"), Err(Error::Aborted(_))));
        drop(w);
        assert!(f.acquire_shared("vol-a").is_ok());
    }
}
