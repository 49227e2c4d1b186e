//! `strata snapshot`: the controller's snapshot RPCs.

use std::collections::HashMap;

use csi_proto as csi;

use super::output::{Cell, Format, Rows};
use super::shared::{all_pages, created, node_of};
use super::{ClientArgs, Csi, connect, status_error};

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        source_volume_id: String,
    },
    /// Delete a snapshot.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        snapshot_id: String,
    },
    /// List snapshots, optionally of one volume.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        source_volume_id: Option<String>,
    },
    /// Show one snapshot.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        snapshot_id: String,
    },
    /// Snapshot several volumes at one instant (a group snapshot); prints the group's id.
    GroupCreate {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        #[arg(required = true)]
        source_volume_ids: Vec<String>,
    },
    /// Show a group snapshot's members.
    GroupGet {
        #[command(flatten)]
        client: ClientArgs,
        group_snapshot_id: String,
    },
    /// Delete a group snapshot with all its members.
    GroupDelete {
        #[command(flatten)]
        client: ClientArgs,
        group_snapshot_id: String,
    },
    /// The ranges of a snapshot that hold data (CSI GetMetadataAllocated).
    Allocated {
        #[command(flatten)]
        client: ClientArgs,
        snapshot_id: String,
        /// Start at this byte (to continue an interrupted listing).
        #[arg(long, default_value_t = 0)]
        starting_offset: i64,
    },
    /// The ranges that changed from BASE to TARGET, two snapshots of one volume (CSI
    /// GetMetadataDelta): what an incremental backup copies.
    Changed {
        #[command(flatten)]
        client: ClientArgs,
        base_snapshot_id: String,
        target_snapshot_id: String,
        /// Start at this byte (to continue an interrupted listing).
        #[arg(long, default_value_t = 0)]
        starting_offset: i64,
    },
}
impl SnapshotCommand {
    fn client(&self) -> &ClientArgs {
        match self {
            SnapshotCommand::Create { client, .. }
            | SnapshotCommand::Delete { client, .. }
            | SnapshotCommand::List { client, .. }
            | SnapshotCommand::Get { client, .. }
            | SnapshotCommand::GroupCreate { client, .. }
            | SnapshotCommand::GroupGet { client, .. }
            | SnapshotCommand::GroupDelete { client, .. }
            | SnapshotCommand::Allocated { client, .. }
            | SnapshotCommand::Changed { client, .. } => client,
        }
    }

    pub async fn run(self) -> Result<(), String> {
        let ClientArgs { endpoint, output } = self.client().clone();
        let csi = connect(&endpoint).await?;
        match self {
            SnapshotCommand::Create {
                name,
                source_volume_id,
                ..
            } => create(csi, name, source_volume_id, output).await,
            SnapshotCommand::Delete { snapshot_id, .. } => delete(csi, snapshot_id).await,
            SnapshotCommand::List {
                source_volume_id, ..
            } => list(csi, source_volume_id, output).await,
            SnapshotCommand::Get { snapshot_id, .. } => get(csi, snapshot_id, output).await,
            SnapshotCommand::GroupCreate {
                name,
                source_volume_ids,
                ..
            } => group_create(csi, name, source_volume_ids, output).await,
            SnapshotCommand::GroupGet {
                group_snapshot_id, ..
            } => group_get(csi, group_snapshot_id, output).await,
            SnapshotCommand::GroupDelete {
                group_snapshot_id, ..
            } => group_delete(csi, group_snapshot_id).await,
            SnapshotCommand::Allocated {
                snapshot_id,
                starting_offset,
                ..
            } => ranges(csi, None, &snapshot_id, starting_offset, output).await,
            SnapshotCommand::Changed {
                base_snapshot_id,
                target_snapshot_id,
                starting_offset,
                ..
            } => {
                ranges(
                    csi,
                    Some(&base_snapshot_id),
                    &target_snapshot_id,
                    starting_offset,
                    output,
                )
                .await
            }
        }
    }
}

fn snapshot_rows(snapshots: &[csi::Snapshot], node: &str) -> Rows {
    let mut rows = Rows::new(&["ID", "SOURCE", "SIZE", "CREATED", "READY", "GROUP", "NODE"]);
    for s in snapshots {
        rows.push(vec![
            s.snapshot_id.clone().into(),
            s.source_volume_id.clone().into(),
            Cell::Bytes(s.size_bytes),
            Cell::Time(s.creation_time.as_ref().map(|t| (t.seconds, t.nanos))),
            Cell::Bool(s.ready_to_use),
            s.group_snapshot_id.clone().into(),
            node.into(),
        ]);
    }
    rows
}

async fn create(mut csi: Csi, name: String, source: String, format: Format) -> Result<(), String> {
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

async fn delete(mut csi: Csi, snapshot_id: String) -> Result<(), String> {
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

async fn list(csi: Csi, source: Option<String>, format: Format) -> Result<(), String> {
    let all = all_snapshots(&csi, source).await?;
    let node = node_of(&mut csi.clone()).await;
    snapshot_rows(&all, &node).print(format);
    Ok(())
}

/// Every snapshot the driver lists, of one volume or of all.
async fn all_snapshots(csi: &Csi, source: Option<String>) -> Result<Vec<csi::Snapshot>, String> {
    all_pages(|starting_token| {
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
    .await
}

async fn get(mut csi: Csi, snapshot_id: String, format: Format) -> Result<(), String> {
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

async fn group_create(
    mut csi: Csi,
    name: String,
    source_volume_ids: Vec<String>,
    format: Format,
) -> Result<(), String> {
    let g = csi
        .groups
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name,
            source_volume_ids,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("CreateVolumeGroupSnapshot", s))?
        .into_inner()
        .group_snapshot
        .unwrap_or_default();
    let node = node_of(&mut csi).await;
    let bytes = g.snapshots.iter().map(|s| s.size_bytes).sum();
    created(
        "group snapshot",
        &g.group_snapshot_id,
        bytes,
        format,
        || snapshot_rows(&g.snapshots, &node),
    );
    Ok(())
}

/// The ids of a group's members, as the driver lists them: the group RPCs take them.
async fn member_ids(csi: &Csi, group_snapshot_id: &str) -> Result<Vec<String>, String> {
    Ok(all_snapshots(csi, None)
        .await?
        .into_iter()
        .filter(|s| s.group_snapshot_id == group_snapshot_id)
        .map(|s| s.snapshot_id)
        .collect())
}

async fn group_get(mut csi: Csi, group_snapshot_id: String, format: Format) -> Result<(), String> {
    let snapshot_ids = member_ids(&csi, &group_snapshot_id).await?;
    let g = csi
        .groups
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id,
            snapshot_ids,
            secrets: HashMap::new(),
        })
        .await
        .map_err(|s| status_error("GetVolumeGroupSnapshot", s))?
        .into_inner()
        .group_snapshot
        .unwrap_or_default();
    let node = node_of(&mut csi).await;
    snapshot_rows(&g.snapshots, &node).print(format);
    Ok(())
}

async fn group_delete(mut csi: Csi, group_snapshot_id: String) -> Result<(), String> {
    let snapshot_ids = member_ids(&csi, &group_snapshot_id).await?;
    csi.groups
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group_snapshot_id.clone(),
            snapshot_ids,
            secrets: HashMap::new(),
        })
        .await
        .map_err(|s| status_error("DeleteVolumeGroupSnapshot", s))?;
    eprintln!("deleted {group_snapshot_id} and its snapshots");
    Ok(())
}

/// Ranges as a table (offset, length, end: exact byte counts) with a summary on stderr.
fn print_ranges(what: &str, capacity: i64, ranges: &[csi::BlockMetadata], format: Format) {
    let mut rows = Rows::new(&["OFFSET", "LENGTH", "END"]);
    let mut bytes = 0i64;
    for r in ranges {
        bytes = bytes.saturating_add(r.size_bytes);
        rows.push(vec![
            Cell::Number(r.byte_offset),
            Cell::Number(r.size_bytes),
            Cell::Number(r.byte_offset.saturating_add(r.size_bytes)),
        ]);
    }
    rows.print(format);
    eprintln!(
        "{} range(s), {bytes} bytes {what}, of a {capacity}-byte volume",
        ranges.len()
    );
}

/// One message of a SnapshotMetadata answer, whichever of the two calls sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct MetadataPage {
    pub block_metadata_type: i32,
    pub volume_capacity_bytes: i64,
    pub block_metadata: Vec<csi::BlockMetadata>,
}

/// Every message of a SnapshotMetadata answer, in order: the allocated ranges of `target`
/// (GetMetadataAllocated), or with `base` the ranges that differ (GetMetadataDelta).
pub async fn metadata_pages(
    csi: &mut Csi,
    base: Option<&str>,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<MetadataPage>, tonic::Status> {
    let mut pages = vec![];
    each_metadata_page(csi, base, target, starting_offset, max_results, |p| {
        pages.push(p)
    })
    .await?;
    Ok(pages)
}

/// [`metadata_pages`] handed to `on_page` one message at a time as it arrives, so a large
/// answer is never held whole (and a caller sees where a broken stream stopped).
pub async fn each_metadata_page(
    csi: &mut Csi,
    base: Option<&str>,
    target: &str,
    starting_offset: i64,
    max_results: i32,
    mut on_page: impl FnMut(MetadataPage),
) -> Result<(), tonic::Status> {
    match base {
        None => {
            let request = csi::GetMetadataAllocatedRequest {
                snapshot_id: target.into(),
                starting_offset,
                max_results,
                ..Default::default()
            };
            let mut stream = csi
                .metadata
                .get_metadata_allocated(request)
                .await?
                .into_inner();
            while let Some(m) = stream.message().await? {
                on_page(MetadataPage {
                    block_metadata_type: m.block_metadata_type,
                    volume_capacity_bytes: m.volume_capacity_bytes,
                    block_metadata: m.block_metadata,
                });
            }
        }
        Some(base) => {
            let request = csi::GetMetadataDeltaRequest {
                base_snapshot_id: base.into(),
                target_snapshot_id: target.into(),
                starting_offset,
                max_results,
                ..Default::default()
            };
            let mut stream = csi.metadata.get_metadata_delta(request).await?.into_inner();
            while let Some(m) = stream.message().await? {
                on_page(MetadataPage {
                    block_metadata_type: m.block_metadata_type,
                    volume_capacity_bytes: m.volume_capacity_bytes,
                    block_metadata: m.block_metadata,
                });
            }
        }
    }
    Ok(())
}

/// `snapshot allocated` (no base) and `snapshot changed`.
async fn ranges(
    mut csi: Csi,
    base: Option<&str>,
    target: &str,
    starting_offset: i64,
    format: Format,
) -> Result<(), String> {
    let (what, call) = match base {
        None => ("allocated", "GetMetadataAllocated"),
        Some(_) => ("changed", "GetMetadataDelta"),
    };
    let pages = metadata_pages(&mut csi, base, target, starting_offset, 0)
        .await
        .map_err(|s| status_error(call, s))?;
    let capacity = pages.last().map_or(0, |p| p.volume_capacity_bytes);
    let ranges: Vec<_> = pages.into_iter().flat_map(|p| p.block_metadata).collect();
    print_ranges(what, capacity, &ranges, format);
    Ok(())
}
