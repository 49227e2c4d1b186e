//! `strata bench`: load generator against any CSI endpoint. Reports throughput and latency
//! percentiles per RPC; nothing here asserts on time. One module per scenario; what they
//! share (timing, the report, bringing a volume up and down) is here.

mod aio;
mod churn;
mod compare;
mod fsgroup;
mod group;
mod io;
mod lifecycle;
mod scale;
mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto as csi;
use serde::Serialize;

use crate::client::output::Format;
use crate::client::shared::CapabilityArgs;
use crate::client::{ClientArgs, connect};
use crate::client::{Csi, status_error};
use crate::endpoint::Endpoint;
use crate::units::parse_size;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Full lifecycle per volume: create, stage, publish, write+fsync, unpublish, unstage, delete.
    Lifecycle {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 100)]
        volumes: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "64Mi", value_parser = parse_size)]
        size: u64,
        /// Bytes written and fsynced per volume.
        #[arg(long, default_value = "1Mi", value_parser = parse_size)]
        data: u64,
        /// Directory for staging and target paths.
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// A mixed workload (create, publish, write, snapshot, list, delete) for a fixed time.
    Churn {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "64Mi", value_parser = parse_size)]
        size: u64,
        /// Bytes written and fsynced per write.
        #[arg(long, default_value = "1Mi", value_parser = parse_size)]
        data: u64,
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Snapshot and restore volumes holding each data size, written and read back through
    /// the published volumes; verifies the restored data.
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        /// Data sizes, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64Mi,512Mi,2Gi")]
        sizes: Vec<u64>,
        /// Directory for staging and target paths.
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Group snapshots of volumes holding data while a writer runs: time per group, the
    /// longest write stall (the freeze window a workload sees), members restored and checked.
    Group {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: group::GroupArgs,
    },
    /// A pod's fsGroup on a volume holding many files: stage and publish with the group the
    /// first and the second time, against the kubelet's recursive walk.
    Fsgroup {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: fsgroup::FsGroupArgs,
    },
    /// The data path: fio-style jobs (4 KiB random read and write at queue depth 32, 1 MiB
    /// sequential read and write at depth 8, direct I/O) on a file in a published volume
    /// and, with --native-dir, on a file in a directory of the pool's own filesystem.
    Io {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: io::IoArgs,
    },
    /// The same scenario against two endpoints, interleaved round by round (so noise on the
    /// machine hits both alike): every figure side by side, with the ratio B/A. The
    /// scenario's own options follow `--`.
    Compare {
        /// lifecycle, churn, snapshot, group, fsgroup, io or scale.
        scenario: String,
        /// A, then B.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<Endpoint>,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// The scenario's options (after `--`), e.g. `-- --volumes 50`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Create N volumes, list them all, delete them (unless --keep).
    Scale {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 10_000)]
        volumes: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// ListVolumes page size (0: one page).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// Keep the volumes (to measure startup or RSS with a full pool).
        #[arg(long)]
        keep: bool,
        /// The driver's process id, to report its resident memory.
        #[arg(long)]
        pid: Option<u32>,
    },
}

impl BenchCommand {
    fn client(&self) -> Option<&ClientArgs> {
        match self {
            BenchCommand::Lifecycle { client, .. }
            | BenchCommand::Churn { client, .. }
            | BenchCommand::Snapshot { client, .. }
            | BenchCommand::Group { client, .. }
            | BenchCommand::Fsgroup { client, .. }
            | BenchCommand::Io { client, .. }
            | BenchCommand::Scale { client, .. } => Some(client),
            BenchCommand::Compare { .. } => None,
        }
    }

    pub async fn run(self) -> Result<(), String> {
        let Some(ClientArgs { endpoint, output }) = self.client().cloned() else {
            return match self {
                BenchCommand::Compare {
                    scenario,
                    endpoints,
                    rounds,
                    output,
                    args,
                } => compare::compare(&scenario, &endpoints, rounds, &args, output).await,
                _ => Ok(()),
            };
        };
        let outcome = self.measure(connect(&endpoint).await?, output).await?;
        outcome.print(output);
        outcome.result()
    }

    /// Runs the scenario against `csi`; `format` only says whether progress is shown. A run
    /// that fails part-way undoes what it made before it answers.
    pub(crate) async fn measure(self, csi: Csi, format: Format) -> Result<Outcome, String> {
        let run = Arc::new(Run::default());
        let mut undo = csi.clone();
        let result = self.scenario(csi, run.clone(), format).await;
        let Err(e) = result else {
            return result;
        };
        let left = run.undo(&mut undo).await;
        Err(match left.len() {
            0 => format!("{e} (what the run had made is undone)"),
            n => format!(
                "{e}; {n} of what the run made could not be undone, first: {}",
                left[0]
            ),
        })
    }

    async fn scenario(self, csi: Csi, run: Arc<Run>, format: Format) -> Result<Outcome, String> {
        match self {
            BenchCommand::Lifecycle {
                volumes,
                concurrency,
                size,
                data,
                workdir,
                capability,
                ..
            } => {
                let args = LifecycleArgs {
                    volumes,
                    concurrency,
                    size,
                    data,
                    workdir,
                    capability,
                };
                lifecycle::lifecycle(csi, run, args, format).await
            }
            BenchCommand::Churn {
                seconds,
                concurrency,
                size,
                data,
                workdir,
                capability,
                ..
            } => {
                let args = LifecycleArgs {
                    volumes: 0,
                    concurrency,
                    size,
                    data,
                    workdir,
                    capability,
                };
                churn::churn(csi, run, args, seconds, format).await
            }
            BenchCommand::Snapshot {
                sizes,
                workdir,
                capability,
                ..
            } => snapshot::snapshot(csi, &run, sizes, workdir, capability).await,
            BenchCommand::Group { args, .. } => group::group(csi, &run, args).await,
            BenchCommand::Fsgroup { args, .. } => fsgroup::fsgroup(csi, &run, args).await,
            BenchCommand::Io { args, .. } => io::io(csi, &run, args).await,
            BenchCommand::Scale {
                volumes,
                concurrency,
                page_size,
                keep,
                pid,
                ..
            } => scale::scale(csi, run, volumes, concurrency, page_size, keep, pid).await,
            BenchCommand::Compare { .. } => {
                Err("compare runs scenarios; it is not one itself".into())
            }
        }
    }
}

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

#[derive(Serialize)]
pub(crate) struct RpcSummary {
    rpc: &'static str,
    calls: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

#[derive(Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    volumes: usize,
    concurrency: usize,
    seconds: f64,
    volumes_per_second: f64,
    rpcs: Vec<RpcSummary>,
    /// The driver's resident memory at points of the run, when its pid was given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rss_kib: Vec<(&'static str, u64)>,
}

impl Report {
    pub(crate) fn outcome(self) -> Outcome {
        use std::fmt::Write as _;
        let mut table = format!(
            "{}: {} volumes, concurrency {}, {:.2} s, {:.1} volumes/s\n",
            self.scenario, self.volumes, self.concurrency, self.seconds, self.volumes_per_second
        );
        let _ = writeln!(
            table,
            "{:<24} {:>7} {:>9} {:>9} {:>9}",
            "RPC", "CALLS", "P50 ms", "P90 ms", "P99 ms"
        );
        let mut figures = vec![("volumes/s".to_owned(), self.volumes_per_second)];
        for r in &self.rpcs {
            let _ = writeln!(
                table,
                "{:<24} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                r.rpc, r.calls, r.p50_ms, r.p90_ms, r.p99_ms
            );
            figures.push((format!("{} p50 ms", r.rpc), r.p50_ms));
            figures.push((format!("{} p99 ms", r.rpc), r.p99_ms));
        }
        for (when, kib) in &self.rss_kib {
            let _ = writeln!(table, "driver RSS {when}: {:.1} MiB", *kib as f64 / 1024.0);
            figures.push((format!("driver RSS {when} MiB"), *kib as f64 / 1024.0));
        }
        Outcome::measured(&self, table, figures)
    }
}

/// What a scenario found: a report to print for one endpoint, and named figures that
/// `compare` sets side by side; or why it did not run against this driver.
pub(crate) enum Outcome {
    Measured {
        json: serde_json::Value,
        table: String,
        figures: Vec<(String, f64)>,
        /// Set when data read back was not what was written: the run failed.
        failure: Option<String>,
    },
    Skipped(String),
}

impl Outcome {
    pub(crate) fn measured(
        report: &impl Serialize,
        table: String,
        figures: Vec<(String, f64)>,
    ) -> Outcome {
        Outcome::Measured {
            json: serde_json::to_value(report).unwrap_or_default(),
            table,
            figures,
            failure: None,
        }
    }

    /// The run failed because `why` (the report is still printed).
    pub(crate) fn failed(mut self, why: Option<String>) -> Outcome {
        if let Outcome::Measured { failure, .. } = &mut self {
            *failure = why;
        }
        self
    }

    pub(crate) fn print(&self, format: Format) {
        match (self, format) {
            (Outcome::Measured { json, .. }, Format::Json) => {
                println!("{}", serde_json::to_string_pretty(json).unwrap_or_default())
            }
            (Outcome::Measured { table, .. }, Format::Table) => print!("{table}"),
            (Outcome::Skipped(why), Format::Json) => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "skipped": why }))
                    .unwrap_or_default()
            ),
            (Outcome::Skipped(why), Format::Table) => println!("skipped: {why}"),
        }
    }

    fn result(&self) -> Result<(), String> {
        match self {
            Outcome::Measured {
                failure: Some(why), ..
            } => Err(why.clone()),
            _ => Ok(()),
        }
    }

    fn figures(&self) -> &[(String, f64)] {
        match self {
            Outcome::Measured { figures, .. } => figures,
            Outcome::Skipped(_) => &[],
        }
    }
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

pub struct LifecycleArgs {
    pub volumes: usize,
    pub concurrency: usize,
    pub size: u64,
    pub data: u64,
    pub workdir: PathBuf,
    pub capability: CapabilityArgs,
}

/// What the driver under test offers, so one benchmark serves any CSI driver.
#[derive(Clone, Debug)]
pub(crate) struct Offer {
    controller_publish: bool,
    stage: bool,
    snapshots: bool,
    mount_group: bool,
    groups: bool,
    node_id: String,
}

pub(crate) async fn offer(csi: &mut Csi) -> Result<Offer, String> {
    use csi::controller_service_capability::{Type as C, rpc::Type as CR};
    use csi::node_service_capability::{Type as N, rpc::Type as NR};
    let controller = csi
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .map_err(|s| status_error("ControllerGetCapabilities", s))?
        .into_inner();
    let has = |t: CR| {
        controller
            .capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(C::Rpc(r)) if r.r#type == t as i32))
    };
    let node = csi
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .map_err(|s| status_error("NodeGetCapabilities", s))?
        .into_inner();
    let node_has = |t: NR| {
        node.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(N::Rpc(r)) if r.r#type == t as i32))
    };
    let info = csi
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map_err(|s| status_error("NodeGetInfo", s))?
        .into_inner();
    Ok(Offer {
        controller_publish: has(CR::PublishUnpublishVolume),
        stage: node_has(NR::StageUnstageVolume),
        snapshots: has(CR::CreateDeleteSnapshot),
        mount_group: node_has(NR::VolumeMountGroup),
        groups: groups(csi).await,
        node_id: info.node_id,
    })
}

/// Whether the driver offers group snapshots (a driver without the GroupController
/// service answers UNIMPLEMENTED).
async fn groups(csi: &mut Csi) -> bool {
    use csi::group_controller_service_capability::{Type as G, rpc::Type as GR};
    csi.groups
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await
        .is_ok_and(|r| {
            r.into_inner().capabilities.iter().any(|c| {
                matches!(&c.r#type, Some(G::Rpc(r)) if r.r#type == GR::CreateDeleteGetVolumeGroupSnapshot as i32)
            })
        })
}

/// A volume made usable on this node, and how to undo it.
pub(crate) struct Mounted {
    id: String,
    staging: Option<String>,
    target: String,
}

pub(crate) async fn bring_up(
    csi: &mut Csi,
    run: &Run,
    offer: &Offer,
    cap: &csi::VolumeCapability,
    name: String,
    size: u64,
    dir: &std::path::Path,
) -> Result<Mounted, String> {
    let vol = create_volume(
        csi,
        run,
        "CreateVolume",
        volume_request(name, size, cap, None),
    )
    .await?;
    mount_existing(csi, run, offer, cap, vol.volume_id, dir).await
}

/// CreateVolume, timed under `rpc`; the run deletes the volume if it stops part-way.
pub(crate) async fn create_volume(
    csi: &mut Csi,
    run: &Run,
    rpc: &'static str,
    request: csi::CreateVolumeRequest,
) -> Result<csi::Volume, String> {
    let vol = timed(run, rpc, csi.controller.create_volume(request))
        .await?
        .volume
        .unwrap_or_default();
    run.made(Step::Volume(vol.volume_id.clone()));
    Ok(vol)
}

pub(crate) async fn delete_volume(csi: &mut Csi, run: &Run, id: String) -> Result<(), String> {
    run.undo_timed(csi, Step::Volume(id)).await
}

/// CreateVolume of `size` bytes for `cap`, restored from `snapshot_id` when given.
pub(crate) fn volume_request(
    name: String,
    size: u64,
    cap: &csi::VolumeCapability,
    snapshot_id: Option<&str>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name,
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap.clone()],
        volume_content_source: snapshot_id.map(|id| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: id.to_owned(),
                },
            )),
        }),
        ..Default::default()
    }
}

/// Makes an existing volume usable on this node as a workload's would be: controller
/// publish, stage and publish, each where the driver offers it.
pub(crate) async fn mount_existing(
    csi: &mut Csi,
    run: &Run,
    offer: &Offer,
    cap: &csi::VolumeCapability,
    id: String,
    dir: &std::path::Path,
) -> Result<Mounted, String> {
    let mut publish_context = Default::default();
    if offer.controller_publish {
        publish_context = timed(
            run,
            "ControllerPublishVolume",
            csi.controller
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: offer.node_id.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                }),
        )
        .await?
        .publish_context;
        run.made(Step::ControllerPublished {
            volume_id: id.clone(),
            node_id: offer.node_id.clone(),
        });
    }
    let staging = offer
        .stage
        .then(|| dir.join(format!("stage-{id}")).display().to_string());
    if let Some(staging) = &staging {
        fs::create_dir_all(staging).map_err(|e| e.to_string())?;
        timed(
            run,
            "NodeStageVolume",
            csi.node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                publish_context: publish_context.clone(),
                ..Default::default()
            }),
        )
        .await?;
        run.made(Step::Staged {
            volume_id: id.clone(),
            path: staging.clone(),
        });
    }
    let target = dir.join(format!("pub-{id}")).display().to_string();
    timed(
        run,
        "NodePublishVolume",
        csi.node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone().unwrap_or_default(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            publish_context,
            ..Default::default()
        }),
    )
    .await?;
    run.made(Step::Published {
        volume_id: id.clone(),
        path: target.clone(),
    });
    Ok(Mounted {
        id,
        staging,
        target,
    })
}

pub(crate) async fn tear_down(
    csi: &mut Csi,
    run: &Run,
    offer: &Offer,
    m: Mounted,
) -> Result<(), String> {
    unmount(csi, run, &m).await?;
    if offer.controller_publish {
        let step = Step::ControllerPublished {
            volume_id: m.id.clone(),
            node_id: offer.node_id.clone(),
        };
        run.undo_timed(csi, step).await?;
    }
    delete_volume(csi, run, m.id).await
}

/// CreateSnapshot of `volume_id`; the run deletes the snapshot if it stops part-way.
pub(crate) async fn create_snapshot(
    csi: &mut Csi,
    run: &Run,
    volume_id: String,
    name: String,
) -> Result<csi::Snapshot, String> {
    let snap = timed(
        run,
        "CreateSnapshot",
        csi.controller.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: volume_id,
            name,
            ..Default::default()
        }),
    )
    .await?
    .snapshot
    .unwrap_or_default();
    run.made(Step::Snapshot(snap.snapshot_id.clone()));
    Ok(snap)
}

pub(crate) async fn delete_snapshot(csi: &mut Csi, run: &Run, id: String) -> Result<(), String> {
    run.undo_timed(csi, Step::Snapshot(id)).await
}

/// Unpublishes and unstages a volume made usable by [`mount_existing`]; the volume stays.
pub(crate) async fn unmount(csi: &mut Csi, run: &Run, m: &Mounted) -> Result<(), String> {
    let published = Step::Published {
        volume_id: m.id.clone(),
        path: m.target.clone(),
    };
    run.undo_timed(csi, published).await?;
    if let Some(staging) = &m.staging {
        let staged = Step::Staged {
            volume_id: m.id.clone(),
            path: staging.clone(),
        };
        run.undo_timed(csi, staged).await?;
    }
    Ok(())
}

/// Writes `bytes` into the published volume (a file in it, or the device), fsyncs, and reads
/// them back: the data must be where the workload put it.
pub(crate) async fn write_data(
    run: &Run,
    target: &str,
    block: bool,
    bytes: u64,
) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    let path = if block {
        PathBuf::from(target)
    } else {
        PathBuf::from(target).join("data")
    };
    let start = Instant::now();
    let (written, back) = (path.clone(), path);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(!block)
            .open(written)?;
        f.write_all(&vec![0xA5u8; bytes as usize])?;
        f.sync_all()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("write data: {e}"))?;
    run.record("write+fsync", start.elapsed());
    let found = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        use std::io::Read;
        let mut data = vec![0u8; bytes as usize];
        fs::File::open(back)?.read_exact(&mut data)?;
        Ok(data.iter().all(|b| *b == 0xA5))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("read data back: {e}"))?;
    if found {
        Ok(())
    } else {
        Err(format!("{target} did not hold the data just written to it"))
    }
}

pub(crate) fn progress(total: u64, what: &str, format: Format) -> indicatif::ProgressBar {
    if format == Format::Json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}
