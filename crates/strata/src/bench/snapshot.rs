//! `strata bench snapshot`: snapshot and restore of volumes holding each data size, verified.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use csi_proto as csi;
use serde::Serialize;

use crate::client::output::Format;
use crate::client::shared::{CapabilityArgs, ModeArg};
use crate::client::{Csi, status_error};

/// One row of the snapshot scenario.
#[derive(Serialize)]
pub(crate) struct SnapshotRow {
    data_bytes: u64,
    snapshot_ms: f64,
    restore_ms: f64,
    verified: bool,
}

/// Writes `bytes` of a deterministic pattern into `path` in 4 MiB chunks, fsyncs, and
/// returns a checksum of what was written.
pub(crate) fn write_pattern(path: &std::path::Path, bytes: u64, seed: u64) -> std::io::Result<u64> {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut f = fs::File::create(path)?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut written = 0u64;
    let mut n = 0u64;
    while written < bytes {
        for (i, word) in chunk.chunks_mut(8).enumerate() {
            word.copy_from_slice(
                &(seed ^ n ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes(),
            );
        }
        let len = (bytes - written).min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..len])?;
        hasher.write(&chunk[..len]);
        written += len as u64;
        n += 1;
    }
    f.sync_all()?;
    Ok(hasher.finish())
}

pub(crate) fn checksum(path: &std::path::Path) -> std::io::Result<u64> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut f = fs::File::open(path)?;
    let mut chunk = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.write(&chunk[..n]);
    }
}

/// For each data size: write the data into a fresh volume, snapshot it, overwrite it, restore
/// the snapshot into a new volume and check the restored data is the snapshot's.
pub async fn snapshot(
    mut csi: Csi,
    sizes: Vec<u64>,
    workdir: PathBuf,
    format: Format,
) -> Result<(), String> {
    fs::create_dir_all(&workdir).map_err(|e| format!("create {}: {e}", workdir.display()))?;
    let cap = CapabilityArgs::ext4(ModeArg::SingleNodeWriter).to_csi();
    let pid = std::process::id();
    let mut rows = vec![];
    for (i, data) in sizes.iter().copied().enumerate() {
        // Room for the data plus filesystem overhead.
        let size = (data + data / 8 + (64 << 20)).next_multiple_of(1 << 20);
        let create =
            |name: String, source: Option<csi::VolumeContentSource>| csi::CreateVolumeRequest {
                name,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: size as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                volume_content_source: source,
                ..Default::default()
            };
        let err = |what: &'static str| move |s: tonic::Status| status_error(what, s);
        let vol = csi
            .controller
            .create_volume(create(format!("snapbench-{pid}-{i}"), None))
            .await
            .map_err(err("CreateVolume"))?
            .into_inner()
            .volume
            .unwrap_or_default();
        let stage = |id: &str, dir: &PathBuf| csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: dir.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        let src_dir = workdir.join(format!("src-{i}"));
        csi.node
            .node_stage_volume(stage(&vol.volume_id, &src_dir))
            .await
            .map_err(err("NodeStageVolume"))?;
        let file = src_dir.join("data");
        let sum = {
            let file = file.clone();
            tokio::task::spawn_blocking(move || write_pattern(&file, data, 1))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("write: {e}"))?
        };
        let start = Instant::now();
        let snap = csi
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: vol.volume_id.clone(),
                name: format!("snapbench-{pid}-{i}"),
                ..Default::default()
            })
            .await
            .map_err(err("CreateSnapshot"))?
            .into_inner()
            .snapshot
            .unwrap_or_default();
        let snapshot_ms = start.elapsed().as_secs_f64() * 1e3;
        // Overwrite the source: the restore must still see the old data.
        {
            let file = file.clone();
            tokio::task::spawn_blocking(move || write_pattern(&file, data.min(64 << 20), 2))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("overwrite: {e}"))?;
        }
        let start = Instant::now();
        let source = csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        };
        let restored = csi
            .controller
            .create_volume(create(
                format!("snapbench-{pid}-{i}-restored"),
                Some(source),
            ))
            .await
            .map_err(err("CreateVolume from snapshot"))?
            .into_inner()
            .volume
            .unwrap_or_default();
        let restore_ms = start.elapsed().as_secs_f64() * 1e3;
        let dst_dir = workdir.join(format!("dst-{i}"));
        csi.node
            .node_stage_volume(stage(&restored.volume_id, &dst_dir))
            .await
            .map_err(err("NodeStageVolume"))?;
        let restored_sum = {
            let file = dst_dir.join("data");
            tokio::task::spawn_blocking(move || checksum(&file))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("read back: {e}"))?
        };
        for (id, dir) in [(&vol.volume_id, &src_dir), (&restored.volume_id, &dst_dir)] {
            csi.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: dir.display().to_string(),
                })
                .await
                .map_err(err("NodeUnstageVolume"))?;
            let _ = fs::remove_dir(dir);
            csi.controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: Default::default(),
                })
                .await
                .map_err(err("DeleteVolume"))?;
        }
        csi.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                secrets: Default::default(),
            })
            .await
            .map_err(err("DeleteSnapshot"))?;
        rows.push(SnapshotRow {
            data_bytes: data,
            snapshot_ms,
            restore_ms,
            verified: restored_sum == sum,
        });
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        ),
        Format::Table => {
            println!(
                "{:>12} {:>12} {:>12} {:>9}",
                "DATA", "SNAPSHOT ms", "RESTORE ms", "VERIFIED"
            );
            for r in &rows {
                println!(
                    "{:>12} {:>12.2} {:>12.2} {:>9}",
                    r.data_bytes, r.snapshot_ms, r.restore_ms, r.verified
                );
            }
        }
    }
    if rows.iter().all(|r| r.verified) {
        Ok(())
    } else {
        Err("a restored volume did not hold the snapshot's data".into())
    }
}
