//! The CSI steps scenarios share: what the driver offers, bringing a volume up (create,
//! stage, publish) and down, snapshots, writing data, progress bars.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use csi_proto as csi;

use crate::client::output::Format;
use crate::client::shared::CapabilityArgs;
use crate::client::{Csi, status_error};

use super::run::{Run, Step, timed};

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
    pub(super) controller_publish: bool,
    pub(super) stage: bool,
    pub(super) snapshots: bool,
    pub(super) mount_group: bool,
    pub(super) groups: bool,
    pub(super) node_id: String,
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
    pub(super) id: String,
    pub(super) staging: Option<String>,
    pub(super) target: String,
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

/// Runs blocking I/O off the runtime; an error names `what` was being done.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{what}: {e}"))
}

/// A memory figure of process `pid` from `/proc/PID/status`, in KiB (`field`: `VmRSS`,
/// `VmHWM`...).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory of process `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// The peak resident memory of process `pid` in KiB (since start, or since it was reset).
pub(crate) fn peak_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// A raw block, single-node-writer capability: what the scenarios that move bytes between
/// nodes or compare extents use (no filesystem between them and the data).
pub(crate) fn raw_block() -> csi::VolumeCapability {
    crate::client::shared::CapabilityArgs {
        block: true,
        ..crate::client::shared::CapabilityArgs::ext4(
            crate::client::shared::ModeArg::SingleNodeWriter,
        )
    }
    .to_csi()
}
