//! `strata bench snapshot`: snapshot and restore of volumes holding each data size, written
//! and verified through the published volumes as a workload would.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::{
    Outcome, Run, blocking, bring_up, create_snapshot, create_volume, delete_snapshot,
    mount_existing, offer, tear_down, volume_request,
};
use crate::client::Csi;
use crate::client::shared::CapabilityArgs;
use crate::units::human_bytes;

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

/// A checksum of the first `len` bytes of `path` (a file, or a device larger than the data).
pub(crate) fn checksum(path: &std::path::Path, len: u64) -> std::io::Result<u64> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut f = fs::File::open(path)?.take(len);
    let mut chunk = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.write(&chunk[..n]);
    }
}

/// Where a workload's data lives in a published volume: a file in it, or the device.
pub(crate) fn data_path(target: &str, block: bool) -> PathBuf {
    if block {
        PathBuf::from(target)
    } else {
        PathBuf::from(target).join("data")
    }
}

/// For each data size: write the data into a fresh volume through its published path,
/// snapshot it, overwrite it, restore the snapshot into a new volume, publish that, and check
/// it holds the snapshot's data. Skipped where the driver offers no snapshots.
pub async fn snapshot(
    mut csi: Csi,
    run: &Run,
    sizes: Vec<u64>,
    workdir: PathBuf,
    capability: CapabilityArgs,
) -> Result<Outcome, String> {
    let offer = offer(&mut csi).await?;
    if !offer.snapshots {
        return Ok(Outcome::Skipped(
            "the driver does not offer CREATE_DELETE_SNAPSHOT".into(),
        ));
    }
    fs::create_dir_all(&workdir).map_err(|e| format!("create {}: {e}", workdir.display()))?;
    let (cap, block) = (capability.to_csi(), capability.block);
    let pid = std::process::id();
    let mut rows = vec![];
    for (i, data) in sizes.iter().copied().enumerate() {
        // Room for the data plus filesystem overhead.
        let size = (data + data / 8 + (64 << 20)).next_multiple_of(1 << 20);
        let name = format!("snapbench-{pid}-{i}");
        let src = bring_up(&mut csi, run, &offer, &cap, name.clone(), size, &workdir).await?;
        let file = data_path(&src.target, block);
        let sum = {
            let file = file.clone();
            blocking("write", move || write_pattern(&file, data, 1)).await?
        };
        let start = Instant::now();
        let snap = create_snapshot(&mut csi, run, src.id.clone(), name.clone()).await?;
        let snapshot_ms = start.elapsed().as_secs_f64() * 1e3;
        // Overwrite the source: the restore must still see the old data.
        blocking("overwrite", move || {
            write_pattern(&file, data.min(64 << 20), 2)
        })
        .await?;
        let start = Instant::now();
        let restored = create_volume(
            &mut csi,
            run,
            "CreateVolume from snapshot",
            volume_request(
                format!("{name}-restored"),
                size,
                &cap,
                Some(&snap.snapshot_id),
            ),
        )
        .await?;
        let restore_ms = start.elapsed().as_secs_f64() * 1e3;
        let dst = mount_existing(&mut csi, run, &offer, &cap, restored.volume_id, &workdir).await?;
        let restored_sum = {
            let file = data_path(&dst.target, block);
            blocking("read back", move || checksum(&file, data)).await?
        };
        tear_down(&mut csi, run, &offer, dst).await?;
        tear_down(&mut csi, run, &offer, src).await?;
        delete_snapshot(&mut csi, run, snap.snapshot_id).await?;
        rows.push(SnapshotRow {
            data_bytes: data,
            snapshot_ms,
            restore_ms,
            verified: restored_sum == sum,
        });
    }
    let mut table = format!(
        "{:>12} {:>12} {:>12} {:>9}\n",
        "DATA", "SNAPSHOT ms", "RESTORE ms", "VERIFIED"
    );
    let mut figures = vec![];
    for r in &rows {
        table.push_str(&format!(
            "{:>12} {:>12.2} {:>12.2} {:>9}\n",
            r.data_bytes, r.snapshot_ms, r.restore_ms, r.verified
        ));
        let size = human_bytes(r.data_bytes as i64);
        figures.push((format!("snapshot {size} ms"), r.snapshot_ms));
        figures.push((format!("restore {size} ms"), r.restore_ms));
    }
    let failure = (!rows.iter().all(|r| r.verified))
        .then(|| "a restored volume did not hold the snapshot's data".to_owned());
    Ok(Outcome::measured(&rows, table, figures).failed(failure))
}
