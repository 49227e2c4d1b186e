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
    /// Set when no worker thread could be started: removals then happen in the caller.
    inline: Option<Arc<dyn Backend>>,
}

fn reap(doomed: &std::path::Path, backend: &dyn Backend) {
    if let Err(e) = remove_object_dir(doomed, backend) {
        tracing::error!(dir = %doomed.display(), error = %e,
            "could not remove a deleted volume's data; the next startup retries");
    }
}

impl Reaper {
    pub fn start(backend: Arc<dyn Backend>) -> Self {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let worker_backend = backend.clone();
        let spawned = std::thread::Builder::new()
            .name("strata-reaper".into())
            .spawn(move || {
                for doomed in rx {
                    reap(&doomed, worker_backend.as_ref());
                }
            });
        match spawned {
            Ok(worker) => Reaper {
                queue: Mutex::new(Some(tx)),
                worker: Mutex::new(Some(worker)),
                inline: None,
            },
            Err(e) => {
                tracing::warn!(error = %e,
                    "could not start the background remover; deleted volumes are removed before DeleteVolume returns");
                Reaper {
                    queue: Mutex::new(None),
                    worker: Mutex::new(None),
                    inline: Some(backend),
                }
            }
        }
    }

    /// Queues a retired volume directory for removal (or removes it now, without a worker).
    pub fn remove(&self, doomed: PathBuf) {
        if let Some(backend) = &self.inline {
            return reap(&doomed, backend.as_ref());
        }
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
