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
}
impl SnapshotCommand {
    fn client(&self) -> &ClientArgs {
        match self {
            SnapshotCommand::Create { client, .. }
            | SnapshotCommand::Delete { client, .. }
            | SnapshotCommand::List { client, .. }
            | SnapshotCommand::Get { client, .. } => client,
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
        }
    }
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
