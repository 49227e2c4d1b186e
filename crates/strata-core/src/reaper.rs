//! Removes the data of deleted volumes in the background. DeleteVolume returns once the
//! deletion is durable (the volume's directory renamed out of sight and synced); freeing the
//! image's blocks, which takes longer the more data it holds, happens here. A crash before
//! that is completed by the startup reconciliation.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

use crate::backend::Backend;
use crate::store::remove_object_dir;

pub struct Reaper {
    queue: Mutex<Option<Sender<PathBuf>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    pub fn start(backend: Arc<dyn Backend>) -> Self {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let worker = std::thread::Builder::new()
            .name("strata-reaper".into())
            .spawn(move || {
                for doomed in rx {
                    if let Err(e) = remove_object_dir(&doomed, backend.as_ref()) {
                        tracing::error!(dir = %doomed.display(), error = %e,
                            "could not remove a deleted volume's data; the next startup retries");
                    }
                }
            })
            .ok();
        Reaper {
            queue: Mutex::new(Some(tx)),
            worker: Mutex::new(worker),
        }
    }

    /// Queues a retired volume directory for removal.
    pub fn remove(&self, doomed: PathBuf) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = queue.as_ref() {
            let _ = tx.send(doomed);
        }
    }

    /// Finishes the queued removals; later requests are dropped (startup completes them).
    pub fn shut_down(&self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(worker) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.shut_down();
    }
}
