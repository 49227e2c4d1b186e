//! What the client commands share: how a volume is to be used and where its data comes
//! from (command-line arguments), and the rows every listing prints.

use csi::volume_capability::{AccessType, BlockVolume, MountVolume, access_mode::Mode};
use csi_proto as csi;

use super::Csi;
use super::output::{Format, Rows};
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
    pub fn to_csi(&self) -> Option<csi::VolumeContentSource> {
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

pub(crate) fn condition(c: Option<&csi::VolumeCondition>) -> String {
    match c {
        Some(c) if c.abnormal => format!("abnormal: {}", c.message),
        Some(_) => "ok".into(),
        None => "-".into(),
    }
}

/// A create's result: the new id alone on stdout (for `$(strata volume create …)`), a
/// confirmation on stderr; with `--output json`, the whole object on stdout.
pub(crate) fn created(
    kind: &str,
    id: &str,
    bytes: i64,
    format: Format,
    rows: impl FnOnce() -> Rows,
) {
    match format {
        Format::Table => {
            println!("{id}");
            eprintln!("created {kind} {id} ({})", human_bytes(bytes));
        }
        Format::Json => rows().print(format),
    }
}

/// Follows `next_token` from the first page to the last.
pub(crate) async fn all_pages<T, Fut>(mut page: impl FnMut(String) -> Fut) -> Result<Vec<T>, String>
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

/// The node a driver serves (NodeGetInfo), for the NODE column: snapshots and volumes live
/// on the node of the endpoint that lists them. Empty when the driver does not say.
pub(crate) async fn node_of(csi: &mut Csi) -> String {
    csi.node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
        .unwrap_or_default()
}

pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Secrets of a call, each read from a file (never from the command line, where `ps` would
/// show it): `--secret-file encryptionKey=./key`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretArgs {
    /// A secret KEY=PATH: the file's bytes exactly, as `kubectl create secret generic
    /// --from-file` stores them. Repeatable.
    #[arg(long = "secret-file", value_parser = parse_key_value)]
    pub secret_files: Vec<(String, String)>,
}

impl SecretArgs {
    pub fn read(&self) -> Result<std::collections::HashMap<String, String>, String> {
        self.secret_files
            .iter()
            .map(|(key, path)| Ok((key.clone(), read_secret(path)?)))
            .collect()
    }
}

/// The contents of a secret file (named in errors, never shown).
pub fn read_secret(path: &str) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("read the secret file {path}: {e}"))?;
    String::from_utf8(bytes).map_err(|_| format!("the secret file {path} is not UTF-8 text"))
}
