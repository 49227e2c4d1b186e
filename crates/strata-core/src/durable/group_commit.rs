//! Group commit of a directory's entries: one fsync of the directory makes durable every
//! rename made in it before the fsync started, so concurrent creates and deletes share
//! their flushes instead of queueing one per call.
//!
//! Each caller takes a ticket after its rename. A caller whose ticket no finished fsync
//! covers starts one itself (if none is running) covering every ticket taken so far, or
//! waits for the running one and then for the next. The lock is never held across the fsync.

use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::sync_dir;
use crate::error::Result;

pub struct GroupCommit {
    dir: PathBuf,
    state: Mutex<State>,
    finished: Condvar,
}

struct State {
    /// Tickets handed out.
    taken: u64,
    /// Every ticket up to this one is covered by a finished fsync.
    covered: u64,
    running: bool,
    /// What the last fsync returned: a failure is reported to every caller it covered.
    last: Result<()>,
}

impl GroupCommit {
    pub fn new(dir: PathBuf) -> Self {
        GroupCommit {
            dir,
            state: Mutex::new(State::default()),
            finished: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once every entry changed in the directory before the call is durable.
    pub fn sync(&self) -> Result<()> {
        let mut state = self.lock();
        state.taken += 1;
        let ticket = state.taken;
        loop {
            if state.covered >= ticket {
                return state.last.clone();
            }
            if !state.running {
                state.running = true;
                let target = state.taken;
                drop(state);
                let result = sync_dir(&self.dir);
                state = self.lock();
                state.running = false;
                state.covered = target;
                state.last = result;
                self.finished.notify_all();
                continue;
            }
            state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State {
            taken: 0,
            covered: 0,
            running: false,
            last: Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_fsyncs_and_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Arc::new(GroupCommit::new(dir.path().to_owned()));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (commit, dir) = (commit.clone(), dir.path().to_owned());
                std::thread::spawn(move || {
                    std::fs::create_dir(dir.join(format!("e{i}"))).unwrap();
                    commit.sync()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let state = commit.lock();
        assert_eq!(state.covered, state.taken);
        assert_eq!(state.taken, 16);
    }

    #[test]
    fn a_failed_fsync_is_reported_to_the_callers_it_covered() {
        let commit = GroupCommit::new(PathBuf::from("/nonexistent/strata-group-commit"));
        assert!(matches!(commit.sync(), Err(Error::Internal(_))));
    }
}
