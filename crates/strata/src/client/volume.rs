//! `strata volume`: the controller's volume RPCs.

use std::collections::HashMap;

use csi_proto as csi;

use super::output::{Cell, Format, Rows};
use super::shared::{
    CapabilityArgs, SecretArgs, SourceArgs, all_pages, condition, created, parse_key_value,
    read_secret,
};
use super::{ClientArgs, Csi, connect, status_error};
use crate::units::parse_size;

#[derive(clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// Size, e.g. 64Mi, 10Gi.
        #[arg(long, default_value = "1Gi", value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        capability: CapabilityArgs,
        #[command(flatten)]
        source: SourceArgs,
        /// StorageClass-style parameter KEY=VALUE, repeatable.
        #[arg(long = "parameter", value_parser = parse_key_value)]
        parameters: Vec<(String, String)>,
        /// Mutable parameter KEY=VALUE (I/O limits such as maxWriteIOPS=500), repeatable.
        #[arg(long = "param", value_parser = parse_key_value)]
        mutable_parameters: Vec<(String, String)>,
        /// The provisioner's secrets (encryptionKey=FILE for `--parameter encrypted=true`).
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// Delete a volume.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
    },
    /// List all volumes.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Entries per ListVolumes page.
        #[arg(long, default_value_t = 500)]
        page_size: i32,
    },
    /// Show one volume and its condition.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
    },
    /// Grow a volume (ControllerExpandVolume).
    Expand {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        /// New size, e.g. 2Gi.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Change a volume's mutable parameters, its I/O limits (ControllerModifyVolume):
    /// maxReadIOPS, maxWriteIOPS, maxReadBytesPerSecond, maxWriteBytesPerSecond (0:
    /// unlimited). Keys not given stay as they are.
    Modify {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        /// KEY=VALUE, repeatable, e.g. --param maxWriteIOPS=500 --param maxReadBytesPerSecond=20Mi.
        #[arg(long = "param", value_parser = parse_key_value, required = true)]
        parameters: Vec<(String, String)>,
    },
    /// Wrap an encrypted volume's key (and its snapshots') under a new Secret value: run
    /// against the volume's node. Nothing is re-encrypted; the old value opens nothing after.
    Rekey {
        #[command(flatten)]
        client: ClientArgs,
        volume_id: String,
        /// A file holding the current encryptionKey.
        #[arg(long)]
        key_file: String,
        /// A file holding the new one.
        #[arg(long)]
        new_key_file: String,
    },
    /// Move a claim's volume, with its data, to another node (with your kubeconfig): sets
    /// the claim's strata.csi.dev/move-to, which the target's Strata acts on. Progress and
    /// the outcome are in the claim's strata.csi.dev/move-status and its events.
    Move {
        /// The PersistentVolumeClaim.
        claim: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The node to move to.
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// Withdraw the move instead (before its commit, everything stays as it was).
        #[arg(long, conflicts_with = "to")]
        cancel: bool,
    },
}
impl VolumeCommand {
    /// The CSI endpoint the command talks to; `None` for a move, asked of Kubernetes.
    fn client(&self) -> Option<&ClientArgs> {
        match self {
            VolumeCommand::Create { client, .. }
            | VolumeCommand::Delete { client, .. }
            | VolumeCommand::List { client, .. }
            | VolumeCommand::Get { client, .. }
            | VolumeCommand::Expand { client, .. }
            | VolumeCommand::Modify { client, .. }
            | VolumeCommand::Rekey { client, .. } => Some(client),
            VolumeCommand::Move { .. } => None,
        }
    }

    pub async fn run(self) -> Result<(), String> {
        let Some(ClientArgs { endpoint, output }) = self.client().cloned() else {
            return match &self {
                VolumeCommand::Move {
                    claim,
                    namespace,
                    to,
                    ..
                } => ask_move(namespace, claim, to.as_deref()).await,
                _ => Err("this command needs --endpoint".into()),
            };
        };
        let csi = connect(&endpoint).await?;
        match self {
            VolumeCommand::Create {
                name,
                size,
                capability,
                source,
                parameters,
                mutable_parameters,
                secrets,
                ..
            } => {
                let parameters = [
                    parameters.into_iter().collect(),
                    mutable_parameters.into_iter().collect(),
                    secrets.read()?,
                ];
                create(csi, name, size, &capability, &source, parameters, output).await
            }
            VolumeCommand::Delete { volume_id, .. } => delete(csi, volume_id).await,
            VolumeCommand::List { page_size, .. } => list(csi, page_size, output).await,
            VolumeCommand::Get { volume_id, .. } => get(csi, volume_id, output).await,
            VolumeCommand::Expand {
                volume_id, size, ..
            } => expand(csi, volume_id, size, output).await,
            VolumeCommand::Modify {
                volume_id,
                parameters,
                ..
            } => modify(csi, volume_id, parameters.into_iter().collect()).await,
            VolumeCommand::Move { .. } => Err("a move is asked of Kubernetes".into()),
            VolumeCommand::Rekey {
                volume_id,
                key_file,
                new_key_file,
                ..
            } => rekey(csi, volume_id, &key_file, &new_key_file).await,
        }
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

async fn create(
    mut csi: Csi,
    name: String,
    size: u64,
    cap: &CapabilityArgs,
    source: &SourceArgs,
    [parameters, mutable_parameters, secrets]: [HashMap<String, String>; 3],
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
            mutable_parameters,
            secrets,
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

async fn delete(mut csi: Csi, volume_id: String) -> Result<(), String> {
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

async fn list(csi: Csi, page_size: i32, format: Format) -> Result<(), String> {
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

async fn get(mut csi: Csi, volume_id: String, format: Format) -> Result<(), String> {
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

async fn expand(mut csi: Csi, volume_id: String, size: u64, format: Format) -> Result<(), String> {
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

async fn modify(
    mut csi: Csi,
    volume_id: String,
    mutable_parameters: HashMap<String, String>,
) -> Result<(), String> {
    csi.controller
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: volume_id.clone(),
            mutable_parameters,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("ControllerModifyVolume", s))?;
    println!("volume {volume_id} modified");
    Ok(())
}

async fn rekey(
    mut csi: Csi,
    volume_id: String,
    key_file: &str,
    new_key_file: &str,
) -> Result<(), String> {
    let secrets = HashMap::from([
        ("encryptionKey".to_owned(), read_secret(key_file)?),
        ("newEncryptionKey".to_owned(), read_secret(new_key_file)?),
    ]);
    csi.controller
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: volume_id.clone(),
            secrets,
            mutable_parameters: HashMap::from([("rekey".to_owned(), "true".to_owned())]),
        })
        .await
        .map_err(|s| status_error("ControllerModifyVolume", s))?;
    println!("volume {volume_id}: its key is wrapped under the new secret");
    Ok(())
}

#[cfg(feature = "kubernetes")]
async fn ask_move(namespace: &str, claim: &str, to: Option<&str>) -> Result<(), String> {
    crate::kube_moves::ask_move(namespace, claim, to).await?;
    match to {
        Some(node) => println!(
            "claim {namespace}/{claim}: asked to move to node {node}; follow its strata.csi.dev/move-status"
        ),
        None => println!("claim {namespace}/{claim}: move withdrawn"),
    }
    Ok(())
}

#[cfg(not(feature = "kubernetes"))]
async fn ask_move(_: &str, _: &str, _: Option<&str>) -> Result<(), String> {
    Err("`strata volume move` needs the cargo feature `kubernetes`".into())
}
