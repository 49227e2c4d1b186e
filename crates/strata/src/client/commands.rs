//! The client subcommands: each builds one CSI request, sends it, and prints the answer.

use std::collections::HashMap;

use csi::volume_capability::{AccessType, BlockVolume, MountVolume, access_mode::Mode};
use csi_proto as csi;

use super::output::{Cell, Format, Rows};
use super::{Csi, status_error};
use crate::units::human_bytes;

/// How a volume is to be used, from the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct CapabilityArgs {
    /// Use the volume as a raw block device instead of a filesystem.
    #[arg(long)]
    pub block: bool,
    /// Filesystem type for mount volumes (ext4, xfs...).
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
    /// Mount flags, repeatable.
    #[arg(long = "mount-flag")]
    pub mount_flags: Vec<String>,
    /// Access mode.
    #[arg(long, value_enum, default_value_t = ModeArg::SingleNodeMultiWriter)]
    pub mode: ModeArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
#[allow(clippy::enum_variant_names)] // named after the CSI access modes
pub enum ModeArg {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl CapabilityArgs {
    /// A plain ext4 mount capability with the given access mode.
    pub fn ext4(mode: ModeArg) -> Self {
        CapabilityArgs {
            block: false,
            fs_type: "ext4".into(),
            mount_flags: vec![],
            mode,
        }
    }

    pub fn to_csi(&self) -> csi::VolumeCapability {
        let mode = match self.mode {
            ModeArg::SingleNodeWriter => Mode::SingleNodeWriter,
            ModeArg::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            ModeArg::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            ModeArg::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        };
        csi::VolumeCapability {
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs_type.clone(),
                    mount_flags: self.mount_flags.clone(),
                    volume_mount_group: String::new(),
                })
            }),
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }
}

fn condition(c: Option<&csi::VolumeCondition>) -> String {
    match c {
        Some(c) if c.abnormal => format!("abnormal: {}", c.message),
        Some(_) => "ok".into(),
        None => "-".into(),
    }
}

fn volume_rows(volumes: &[(csi::Volume, Option<csi::VolumeCondition>)]) -> Rows {
    let mut rows = Rows::new(&["ID", "CAPACITY", "TOPOLOGY", "CONDITION"]);
    for (v, c) in volumes {
        let topology = v
            .accessible_topology
            .iter()
            .flat_map(|t| t.segments.iter().map(|(k, v)| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(",");
        rows.push(vec![
            v.volume_id.clone().into(),
            Cell::Bytes(v.capacity_bytes),
            topology.into(),
            condition(c.as_ref()).into(),
        ]);
    }
    rows
}

pub async fn info(mut csi: Csi, format: Format) -> Result<(), String> {
    let info = csi
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map_err(|s| status_error("GetPluginInfo", s))?
        .into_inner();
    let probe = csi.identity.probe(csi::ProbeRequest {}).await;
    let node = csi
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map(|r| r.into_inner());
    let mut rows = Rows::new(&["FIELD", "VALUE"]);
    rows.push(vec!["name".into(), info.name.into()]);
    rows.push(vec!["version".into(), info.vendor_version.into()]);
    match probe {
        Ok(p) => rows.push(vec![
            "ready".into(),
            Cell::Bool(p.into_inner().ready.unwrap_or(true)),
        ]),
        Err(s) => {
            rows.push(vec!["ready".into(), Cell::Bool(false)]);
            rows.push(vec!["not_ready_because".into(), s.message().into()]);
        }
    }
    if let Ok(n) = node {
        rows.push(vec!["node_id".into(), n.node_id.into()]);
        rows.push(vec![
            "max_volumes_per_node".into(),
            Cell::Number(n.max_volumes_per_node),
        ]);
    }
    rows.print(format);
    Ok(())
}

/// Where a new volume's data comes from, from the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    /// Restore this snapshot into the new volume.
    #[arg(long, conflicts_with = "from_volume")]
    pub from_snapshot: Option<String>,
    /// Clone this volume into the new volume.
    #[arg(long)]
    pub from_volume: Option<String>,
}

impl SourceArgs {
    fn to_csi(&self) -> Option<csi::VolumeContentSource> {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let source = match (&self.from_snapshot, &self.from_volume) {
            (Some(id), _) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            (None, Some(id)) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
            (None, None) => return None,
        };
        Some(csi::VolumeContentSource {
            r#type: Some(source),
        })
    }
}

pub async fn volume_create(
    mut csi: Csi,
    name: String,
    size: u64,
    cap: &CapabilityArgs,
    source: &SourceArgs,
    parameters: HashMap<String, String>,
    format: Format,
) -> Result<(), String> {
    let volume = csi
        .controller
        .create_volume(csi::CreateVolumeRequest {
            name,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.to_csi()],
            parameters,
            volume_content_source: source.to_csi(),
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("CreateVolume", s))?
        .into_inner()
        .volume
        .unwrap_or_default();
    created(
        "volume",
        &volume.volume_id,
        volume.capacity_bytes,
        format,
        || volume_rows(&[(volume.clone(), None)]),
    );
    Ok(())
}

/// A create's result: the new id alone on stdout (for `$(strata volume create …)`), a
/// confirmation on stderr; with `--output json`, the whole object on stdout.
fn created(kind: &str, id: &str, bytes: i64, format: Format, rows: impl FnOnce() -> Rows) {
    match format {
        Format::Table => {
            println!("{id}");
            eprintln!("created {kind} {id} ({})", human_bytes(bytes));
        }
        Format::Json => rows().print(format),
    }
}

pub async fn volume_delete(mut csi: Csi, volume_id: String) -> Result<(), String> {
    csi.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .map_err(|s| status_error("DeleteVolume", s))?;
    eprintln!("deleted {volume_id}");
    Ok(())
}

/// Follows `next_token` from the first page to the last.
async fn all_pages<T, Fut>(mut page: impl FnMut(String) -> Fut) -> Result<Vec<T>, String>
where
    Fut: std::future::Future<Output = Result<(Vec<T>, String), String>>,
{
    let mut all = vec![];
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

pub async fn volume_list(csi: Csi, page_size: i32, format: Format) -> Result<(), String> {
    let all = all_pages(|starting_token| {
        let mut controller = csi.controller.clone();
        async move {
            let page = controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: page_size,
                    starting_token,
                })
                .await
                .map_err(|s| status_error("ListVolumes", s))?
                .into_inner();
            let items = page
                .entries
                .into_iter()
                .map(|e| {
                    let c = e.status.and_then(|s| s.volume_condition);
                    (e.volume.unwrap_or_default(), c)
                })
                .collect();
            Ok((items, page.next_token))
        }
    })
    .await?;
    volume_rows(&all).print(format);
    Ok(())
}

pub async fn volume_get(mut csi: Csi, volume_id: String, format: Format) -> Result<(), String> {
    let r = csi
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id })
        .await
        .map_err(|s| status_error("ControllerGetVolume", s))?
        .into_inner();
    let c = r.status.and_then(|s| s.volume_condition);
    volume_rows(&[(r.volume.unwrap_or_default(), c)]).print(format);
    Ok(())
}

pub async fn node_stage(
    mut csi: Csi,
    volume_id: String,
    staging_path: String,
    cap: &CapabilityArgs,
) -> Result<(), String> {
    csi.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging_path.clone(),
            volume_capability: Some(cap.to_csi()),
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("NodeStageVolume", s))?;
    eprintln!("staged {volume_id} at {staging_path}");
    Ok(())
}

pub async fn node_unstage(
    mut csi: Csi,
    volume_id: String,
    staging_path: String,
) -> Result<(), String> {
    csi.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging_path,
        })
        .await
        .map_err(|s| status_error("NodeUnstageVolume", s))?;
    eprintln!("unstaged {volume_id}");
    Ok(())
}

pub async fn node_publish(
    mut csi: Csi,
    volume_id: String,
    staging_path: String,
    target_path: String,
    readonly: bool,
    cap: &CapabilityArgs,
) -> Result<(), String> {
    csi.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging_path,
            target_path: target_path.clone(),
            volume_capability: Some(cap.to_csi()),
            readonly,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("NodePublishVolume", s))?;
    eprintln!("published {volume_id} at {target_path}");
    Ok(())
}

pub async fn node_unpublish(
    mut csi: Csi,
    volume_id: String,
    target_path: String,
) -> Result<(), String> {
    csi.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            target_path,
        })
        .await
        .map_err(|s| status_error("NodeUnpublishVolume", s))?;
    eprintln!("unpublished {volume_id}");
    Ok(())
}

pub async fn node_stats(
    mut csi: Csi,
    volume_id: String,
    path: String,
    format: Format,
) -> Result<(), String> {
    let r = csi
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id,
            volume_path: path,
            staging_target_path: String::new(),
        })
        .await
        .map_err(|s| status_error("NodeGetVolumeStats", s))?
        .into_inner();
    let mut rows = Rows::new(&["UNIT", "TOTAL", "USED", "AVAILABLE", "CONDITION"]);
    let cond = condition(r.volume_condition.as_ref());
    for u in r.usage {
        let unit = csi::volume_usage::Unit::try_from(u.unit)
            .map(|u| u.as_str_name().to_lowercase())
            .unwrap_or_else(|_| u.unit.to_string());
        let amount = |n: i64| {
            if unit == "bytes" {
                Cell::Bytes(n)
            } else {
                Cell::Number(n)
            }
        };
        rows.push(vec![
            unit.clone().into(),
            amount(u.total),
            amount(u.used),
            amount(u.available),
            cond.clone().into(),
        ]);
    }
    rows.print(format);
    Ok(())
}

pub async fn volume_expand(
    mut csi: Csi,
    volume_id: String,
    size: u64,
    format: Format,
) -> Result<(), String> {
    let r = csi
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("ControllerExpandVolume", s))?
        .into_inner();
    let mut rows = Rows::new(&["ID", "CAPACITY", "NODE_EXPANSION_REQUIRED"]);
    rows.push(vec![
        volume_id.into(),
        Cell::Bytes(r.capacity_bytes),
        Cell::Bool(r.node_expansion_required),
    ]);
    rows.print(format);
    Ok(())
}

pub async fn node_expand(
    mut csi: Csi,
    volume_id: String,
    path: String,
    format: Format,
) -> Result<(), String> {
    let r = csi
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: volume_id.clone(),
            volume_path: path,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("NodeExpandVolume", s))?
        .into_inner();
    let mut rows = Rows::new(&["ID", "CAPACITY"]);
    rows.push(vec![volume_id.into(), Cell::Bytes(r.capacity_bytes)]);
    rows.print(format);
    Ok(())
}

/// The node a driver serves (NodeGetInfo), for the NODE column: snapshots and volumes live
/// on the node of the endpoint that lists them. Empty when the driver does not say.
async fn node_of(csi: &mut Csi) -> String {
    csi.node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
        .unwrap_or_default()
}

fn snapshot_rows(snapshots: &[csi::Snapshot], node: &str) -> Rows {
    let mut rows = Rows::new(&["ID", "SOURCE", "SIZE", "CREATED", "READY", "NODE"]);
    for s in snapshots {
        rows.push(vec![
            s.snapshot_id.clone().into(),
            s.source_volume_id.clone().into(),
            Cell::Bytes(s.size_bytes),
            Cell::Time(s.creation_time.as_ref().map(|t| (t.seconds, t.nanos))),
            Cell::Bool(s.ready_to_use),
            node.into(),
        ]);
    }
    rows
}

pub async fn snapshot_create(
    mut csi: Csi,
    name: String,
    source: String,
    format: Format,
) -> Result<(), String> {
    let s = csi
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source,
            name,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("CreateSnapshot", s))?
        .into_inner()
        .snapshot
        .unwrap_or_default();
    let node = node_of(&mut csi).await;
    created("snapshot", &s.snapshot_id, s.size_bytes, format, || {
        snapshot_rows(std::slice::from_ref(&s), &node)
    });
    Ok(())
}

pub async fn snapshot_delete(mut csi: Csi, snapshot_id: String) -> Result<(), String> {
    csi.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .map_err(|s| status_error("DeleteSnapshot", s))?;
    eprintln!("deleted {snapshot_id}");
    Ok(())
}

pub async fn snapshot_list(csi: Csi, source: Option<String>, format: Format) -> Result<(), String> {
    let all = all_pages(|starting_token| {
        let mut controller = csi.controller.clone();
        let source_volume_id = source.clone().unwrap_or_default();
        async move {
            let page = controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    max_entries: 500,
                    starting_token,
                    source_volume_id,
                    ..Default::default()
                })
                .await
                .map_err(|s| status_error("ListSnapshots", s))?
                .into_inner();
            let items = page
                .entries
                .into_iter()
                .filter_map(|e| e.snapshot)
                .collect();
            Ok((items, page.next_token))
        }
    })
    .await?;
    let node = node_of(&mut csi.clone()).await;
    snapshot_rows(&all, &node).print(format);
    Ok(())
}

pub async fn snapshot_get(mut csi: Csi, snapshot_id: String, format: Format) -> Result<(), String> {
    let s = csi
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id,
            secrets: HashMap::new(),
        })
        .await
        .map_err(|s| status_error("GetSnapshot", s))?
        .into_inner()
        .snapshot
        .unwrap_or_default();
    let node = node_of(&mut csi).await;
    snapshot_rows(&[s], &node).print(format);
    Ok(())
}
