//! `strata node`: the node RPCs, as the kubelet calls them.

use csi_proto as csi;

use super::output::{Cell, Format, Rows};
use super::shared::{CapabilityArgs, SecretArgs, condition};
use super::{ClientArgs, Csi, connect, status_error};

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Stage a volume at a staging path (format and mount, or attach a block device).
    Stage {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[command(flatten)]
        capability: CapabilityArgs,
        /// The node-stage secrets (encryptionKey=FILE for an encrypted volume).
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// Unstage a volume.
    Unstage {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        staging_path: String,
    },
    /// Publish a staged volume at a target path.
    Publish {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[arg(long)]
        target_path: String,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        capability: CapabilityArgs,
    },
    /// Unpublish a volume from a target path.
    Unpublish {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        target_path: String,
    },
    /// Grow the filesystem of a staged volume after a volume expand.
    Expand {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        /// Where the volume is staged or published.
        #[arg(long)]
        path: String,
    },
    /// Usage and condition of a staged or published volume.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        #[arg(long)]
        path: String,
    },
}
impl NodeCommand {
    fn client(&self) -> &ClientArgs {
        match self {
            NodeCommand::Stage { client, .. }
            | NodeCommand::Unstage { client, .. }
            | NodeCommand::Publish { client, .. }
            | NodeCommand::Unpublish { client, .. }
            | NodeCommand::Expand { client, .. }
            | NodeCommand::Stats { client, .. } => client,
        }
    }

    pub async fn run(self) -> Result<(), String> {
        let ClientArgs { endpoint, output } = self.client().clone();
        let csi = connect(&endpoint).await?;
        match self {
            NodeCommand::Stage {
                volume_id,
                staging_path,
                capability,
                secrets,
                ..
            } => stage(csi, volume_id, staging_path, &capability, &secrets).await,
            NodeCommand::Unstage {
                volume_id,
                staging_path,
                ..
            } => unstage(csi, volume_id, staging_path).await,
            NodeCommand::Publish {
                volume_id,
                staging_path,
                target_path,
                readonly,
                capability,
                ..
            } => {
                publish(
                    csi,
                    volume_id,
                    staging_path,
                    target_path,
                    readonly,
                    &capability,
                )
                .await
            }
            NodeCommand::Unpublish {
                volume_id,
                target_path,
                ..
            } => unpublish(csi, volume_id, target_path).await,
            NodeCommand::Expand {
                volume_id, path, ..
            } => expand(csi, volume_id, path, output).await,
            NodeCommand::Stats {
                volume_id, path, ..
            } => stats(csi, volume_id, path, output).await,
        }
    }
}

async fn stage(
    mut csi: Csi,
    volume_id: String,
    staging_path: String,
    cap: &CapabilityArgs,
    secrets: &SecretArgs,
) -> Result<(), String> {
    csi.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging_path.clone(),
            volume_capability: Some(cap.to_csi()),
            secrets: secrets.read()?,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("NodeStageVolume", s))?;
    eprintln!("staged {volume_id} at {staging_path}");
    Ok(())
}

async fn unstage(mut csi: Csi, volume_id: String, staging_path: String) -> Result<(), String> {
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

async fn publish(
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

async fn unpublish(mut csi: Csi, volume_id: String, target_path: String) -> Result<(), String> {
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

async fn stats(
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

async fn expand(
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
