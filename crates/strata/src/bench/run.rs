//! One benchmark run: the RPC timings it records, and the register of everything it made,
//! undone newest first when the run stops part-way.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use csi_proto as csi;

use crate::client::{Csi, status_error};

use super::report::RpcSummary;

/// One run of a scenario: the latency of every RPC it made, and what it made on the driver
/// (volumes, mounts, snapshots, groups), so that a run stopped part-way by an error undoes
/// it rather than leave it on the node.
#[derive(Default)]
pub(crate) struct Run {
    latencies: Mutex<BTreeMap<&'static str, Vec<Duration>>>,
    made: Mutex<Made>,
    stopped: AtomicBool,
}

/// What a run made and has not undone yet, each with its order of making.
#[derive(Default)]
struct Made {
    next: u64,
    steps: HashMap<Step, u64>,
}

/// One thing a run made on the driver.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    Volume(String),
    ControllerPublished {
        volume_id: String,
        node_id: String,
    },
    Staged {
        volume_id: String,
        path: String,
    },
    Published {
        volume_id: String,
        path: String,
    },
    Snapshot(String),
    Group {
        id: String,
        snapshot_ids: Vec<String>,
    },
}

impl Run {
    pub(crate) fn record(&self, rpc: &'static str, d: Duration) {
        lock(&self.latencies).entry(rpc).or_default().push(d);
    }

    /// Remembers `step` until [`undone`](Self::undone).
    pub(crate) fn made(&self, step: Step) {
        let mut made = lock(&self.made);
        made.next += 1;
        let n = made.next;
        made.steps.insert(step, n);
    }

    pub(crate) fn undone(&self, step: &Step) {
        lock(&self.made).steps.remove(step);
    }

    /// Tells the run's other clients to stop taking work (one of them failed).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Waits for every client of the run; the first error, if any, once all have ended (so
    /// nothing is still making volumes while the run is undone).
    pub(crate) async fn join(
        &self,
        tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    ) -> Result<(), String> {
        let mut first = Ok(());
        for t in tasks {
            let r = t.await.map_err(|e| e.to_string()).and_then(|r| r);
            if let (Err(e), Ok(())) = (r, &first) {
                self.stop();
                first = Err(e);
            }
        }
        first
    }

    /// Undoes `step` as part of the measured run: timed under its RPC, then forgotten.
    pub(crate) async fn undo_timed(&self, csi: &mut Csi, step: Step) -> Result<(), String> {
        let start = Instant::now();
        undo_step(csi, &step).await?;
        self.record(step.undoing_rpc(), start.elapsed());
        self.undone(&step);
        Ok(())
    }

    /// Undoes, newest first, everything the run made and did not undo itself; returns what
    /// could not be undone.
    pub(crate) async fn undo(&self, csi: &mut Csi) -> Vec<String> {
        let mut steps: Vec<(Step, u64)> = lock(&self.made).steps.drain().collect();
        steps.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let mut failed = vec![];
        for (step, _) in steps {
            if let Err(e) = undo_step(csi, &step).await {
                failed.push(e);
            }
        }
        failed
    }

    pub(crate) fn summary(&self) -> Vec<RpcSummary> {
        let map = lock(&self.latencies);
        map.iter()
            .map(|(rpc, v)| {
                let mut v = v.clone();
                v.sort();
                let pct = |p: f64| {
                    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
                    v[i].as_secs_f64() * 1e3
                };
                RpcSummary {
                    rpc,
                    calls: v.len(),
                    p50_ms: pct(0.5),
                    p90_ms: pct(0.9),
                    p99_ms: pct(0.99),
                }
            })
            .collect()
    }
}

/// The next number of a xorshift64 sequence (seeded with anything but 0): cheap, repeatable
/// randomness for the workloads.
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Step {
    /// The RPC that undoes this step.
    fn undoing_rpc(&self) -> &'static str {
        match self {
            Step::Published { .. } => "NodeUnpublishVolume",
            Step::Staged { .. } => "NodeUnstageVolume",
            Step::ControllerPublished { .. } => "ControllerUnpublishVolume",
            Step::Volume(_) => "DeleteVolume",
            Step::Snapshot(_) => "DeleteSnapshot",
            Step::Group { .. } => "DeleteVolumeGroupSnapshot",
        }
    }
}

/// Calls the RPC that undoes `step` (and removes the staging directory an unstage leaves).
async fn undo_step(csi: &mut Csi, step: &Step) -> Result<(), String> {
    let r = match step.clone() {
        Step::Published { volume_id, path } => csi
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id,
                target_path: path,
            })
            .await
            .map(drop),
        Step::Staged { volume_id, path } => {
            let r = csi
                .node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id,
                    staging_target_path: path.clone(),
                })
                .await
                .map(drop);
            if r.is_ok() {
                let _ = fs::remove_dir(&path);
            }
            r
        }
        Step::ControllerPublished { volume_id, node_id } => csi
            .controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id,
                node_id,
                secrets: Default::default(),
            })
            .await
            .map(drop),
        Step::Volume(volume_id) => csi
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id,
                secrets: Default::default(),
            })
            .await
            .map(drop),
        Step::Snapshot(snapshot_id) => csi
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id,
                secrets: Default::default(),
            })
            .await
            .map(drop),
        Step::Group { id, snapshot_ids } => csi
            .groups
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: id,
                snapshot_ids,
                secrets: Default::default(),
            })
            .await
            .map(drop),
    };
    r.map_err(|s| status_error(step.undoing_rpc(), s))
}

pub(crate) async fn timed<T>(
    run: &Run,
    rpc: &'static str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let start = Instant::now();
    let r = fut.await.map_err(|s| status_error(rpc, s))?;
    run.record(rpc, start.elapsed());
    Ok(r.into_inner())
}
