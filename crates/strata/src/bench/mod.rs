//! `strata bench`: load generator against any CSI endpoint. Reports throughput and latency
//! percentiles per RPC; nothing here asserts on time. One module per scenario; what they
//! share (timing, the report, bringing a volume up and down) is here.

mod churn;
mod lifecycle;
mod scale;
mod snapshot;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use csi_proto as csi;
use serde::Serialize;

use crate::client::output::Format;
use crate::client::shared::CapabilityArgs;
use crate::client::{ClientArgs, connect};
use crate::client::{Csi, status_error};
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
    /// Snapshot and restore volumes holding each data size; verifies the restored data.
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        /// Data sizes, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64Mi,512Mi,2Gi")]
        sizes: Vec<u64>,
        /// Directory for staging paths.
        #[arg(long, default_value = "/tmp/strata-bench")]
        workdir: PathBuf,
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
    fn client(&self) -> &ClientArgs {
        match self {
            BenchCommand::Lifecycle { client, .. }
            | BenchCommand::Churn { client, .. }
            | BenchCommand::Snapshot { client, .. }
            | BenchCommand::Scale { client, .. } => client,
        }
    }

    pub async fn run(self) -> Result<(), String> {
        let ClientArgs { endpoint, output } = self.client().clone();
        let csi = connect(&endpoint).await?;
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
                lifecycle::lifecycle(csi, args, output).await
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
                churn::churn(csi, args, seconds, output).await
            }
            BenchCommand::Snapshot { sizes, workdir, .. } => {
                snapshot::snapshot(csi, sizes, workdir, output).await
            }
            BenchCommand::Scale {
                volumes,
                concurrency,
                page_size,
                keep,
                pid,
                ..
            } => scale::scale(csi, volumes, concurrency, page_size, keep, pid, output).await,
        }
    }
}

#[derive(Default)]
pub(crate) struct Latencies(Mutex<BTreeMap<&'static str, Vec<Duration>>>);

impl Latencies {
    pub(crate) fn record(&self, rpc: &'static str, d: Duration) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rpc)
            .or_default()
            .push(d);
    }

    pub(crate) fn summary(&self) -> Vec<RpcSummary> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
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
    pub(crate) fn print(&self, format: Format) {
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(self).unwrap_or_default()),
            Format::Table => {
                println!(
                    "{}: {} volumes, concurrency {}, {:.2} s, {:.1} volumes/s",
                    self.scenario,
                    self.volumes,
                    self.concurrency,
                    self.seconds,
                    self.volumes_per_second
                );
                println!(
                    "{:<24} {:>7} {:>9} {:>9} {:>9}",
                    "RPC", "CALLS", "P50 ms", "P90 ms", "P99 ms"
                );
                for r in &self.rpcs {
                    println!(
                        "{:<24} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                        r.rpc, r.calls, r.p50_ms, r.p90_ms, r.p99_ms
                    );
                }
                for (when, kib) in &self.rss_kib {
                    println!("driver RSS {when}: {:.1} MiB", *kib as f64 / 1024.0);
                }
            }
        }
    }
}

pub(crate) async fn timed<T>(
    lat: &Latencies,
    rpc: &'static str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let start = Instant::now();
    let r = fut.await.map_err(|s| status_error(rpc, s))?;
    lat.record(rpc, start.elapsed());
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
    let stage = node
        .capabilities
        .iter()
        .any(|c| matches!(&c.r#type, Some(N::Rpc(r)) if r.r#type == NR::StageUnstageVolume as i32));
    let info = csi
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map_err(|s| status_error("NodeGetInfo", s))?
        .into_inner();
    Ok(Offer {
        controller_publish: has(CR::PublishUnpublishVolume),
        stage,
        snapshots: has(CR::CreateDeleteSnapshot),
        node_id: info.node_id,
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
    lat: &Latencies,
    offer: &Offer,
    cap: &csi::VolumeCapability,
    name: String,
    size: u64,
    dir: &std::path::Path,
) -> Result<Mounted, String> {
    let vol = timed(
        lat,
        "CreateVolume",
        csi.controller.create_volume(csi::CreateVolumeRequest {
            name,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        }),
    )
    .await?
    .volume
    .unwrap_or_default();
    let id = vol.volume_id;
    let mut publish_context = Default::default();
    if offer.controller_publish {
        publish_context = timed(
            lat,
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
    }
    let staging = offer
        .stage
        .then(|| dir.join(format!("stage-{id}")).display().to_string());
    if let Some(staging) = &staging {
        fs::create_dir_all(staging).map_err(|e| e.to_string())?;
        timed(
            lat,
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
    }
    let target = dir.join(format!("pub-{id}")).display().to_string();
    timed(
        lat,
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
    Ok(Mounted {
        id,
        staging,
        target,
    })
}

pub(crate) async fn tear_down(
    csi: &mut Csi,
    lat: &Latencies,
    offer: &Offer,
    m: Mounted,
) -> Result<(), String> {
    timed(
        lat,
        "NodeUnpublishVolume",
        csi.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: m.id.clone(),
                target_path: m.target,
            }),
    )
    .await?;
    if let Some(staging) = m.staging {
        timed(
            lat,
            "NodeUnstageVolume",
            csi.node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: m.id.clone(),
                staging_target_path: staging.clone(),
            }),
        )
        .await?;
        let _ = fs::remove_dir(&staging);
    }
    if offer.controller_publish {
        timed(
            lat,
            "ControllerUnpublishVolume",
            csi.controller
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: m.id.clone(),
                    node_id: offer.node_id.clone(),
                    secrets: Default::default(),
                }),
        )
        .await?;
    }
    timed(
        lat,
        "DeleteVolume",
        csi.controller.delete_volume(csi::DeleteVolumeRequest {
            volume_id: m.id,
            secrets: Default::default(),
        }),
    )
    .await?;
    Ok(())
}

/// Writes `bytes` into the published volume (a file in it, or the device) and fsyncs.
pub(crate) async fn write_data(
    lat: &Latencies,
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
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(!block)
            .open(path)?;
        f.write_all(&vec![0xA5u8; bytes as usize])?;
        f.sync_all()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("write data: {e}"))?;
    lat.record("write+fsync", start.elapsed());
    Ok(())
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
