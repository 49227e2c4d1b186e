//! `strata bench group`: group snapshots of volumes holding data while a writer runs, timed
//! from the client, with the longest write stall the freeze caused; the members of the first
//! group are restored and checked against the data written.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use csi_proto as csi;
use serde::Serialize;

use super::snapshot::{checksum, write_pattern};
use super::{
    Mounted, Outcome, Run, Step, bring_up, create_volume, offer, tear_down, timed, volume_request,
};
use crate::client::Csi;
use crate::client::shared::{CapabilityArgs, ModeArg};
use crate::units::parse_size;

/// What `strata bench group` runs.
#[derive(clap::Args)]
pub struct GroupArgs {
    #[arg(long, default_value_t = 8)]
    pub volumes: usize,
    /// Data written into each volume before the groups are taken.
    #[arg(long, default_value = "512Mi", value_parser = parse_size)]
    pub data: u64,
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Directory for staging and target paths.
    #[arg(long, default_value = "/tmp/strata-bench")]
    pub workdir: PathBuf,
}

#[derive(Serialize)]
struct GroupRow {
    round: usize,
    group_ms: f64,
    /// The longest a small write into a member waited while the group was taken: what the
    /// workload saw of the freeze window.
    max_write_stall_ms: f64,
}

#[derive(Serialize)]
struct GroupReport {
    volumes: usize,
    data_bytes_per_volume: u64,
    rounds: Vec<GroupRow>,
    restored_members_verified: bool,
}

/// Writes 4 KiB at the start of a file in each volume, round robin, and records the longest
/// single write, until stopped.
struct StallProbe {
    stop: Arc<AtomicBool>,
    max_micros: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StallProbe {
    fn start(targets: &[String]) -> Result<StallProbe, String> {
        let files = targets
            .iter()
            .map(|t| {
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(Path::new(t).join("probe"))
                    .map_err(|e| format!("open a probe file in {t}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let max_micros = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max_micros.clone());
        let thread = std::thread::spawn(move || {
            let block = [0x5Au8; 4096];
            while !s.load(Ordering::Relaxed) {
                for f in &files {
                    let start = Instant::now();
                    let _ = f.write_all_at(&block, 0);
                    m.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        Ok(StallProbe {
            stop,
            max_micros,
            thread: Some(thread),
        })
    }

    /// The longest write since the last call.
    fn take(&self) -> Duration {
        Duration::from_micros(self.max_micros.swap(0, Ordering::Relaxed))
    }
}

impl Drop for StallProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub async fn group(mut csi: Csi, run: &Run, args: GroupArgs) -> Result<Outcome, String> {
    let offer = offer(&mut csi).await?;
    if !offer.groups {
        return Ok(Outcome::Skipped(
            "the driver does not offer CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT".into(),
        ));
    }
    let workdir = &args.workdir;
    fs::create_dir_all(workdir).map_err(|e| format!("create {}: {e}", workdir.display()))?;
    let cap = CapabilityArgs::ext4(ModeArg::SingleNodeWriter).to_csi();
    let pid = std::process::id();
    // Room for the data plus filesystem overhead.
    let size = (args.data + args.data / 8 + (64 << 20)).next_multiple_of(1 << 20);
    let mut mounted: Vec<Mounted> = vec![];
    let mut sums = vec![];
    for i in 0..args.volumes {
        let m = bring_up(
            &mut csi,
            run,
            &offer,
            &cap,
            format!("groupbench-{pid}-{i}"),
            size,
            workdir,
        )
        .await?;
        let file = Path::new(&m.target).join("data");
        let data = args.data;
        let sum = tokio::task::spawn_blocking(move || write_pattern(&file, data, i as u64))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("write: {e}"))?;
        sums.push(sum);
        mounted.push(m);
    }
    let ids: Vec<String> = mounted.iter().map(|m| m.id.clone()).collect();
    let targets: Vec<String> = mounted.iter().map(|m| m.target.clone()).collect();
    let probe = StallProbe::start(&targets)?;
    let mut rows = vec![];
    let mut groups = vec![];
    for round in 0..args.rounds {
        tokio::time::sleep(Duration::from_millis(100)).await;
        probe.take();
        let start = Instant::now();
        let g = timed(
            run,
            "CreateVolumeGroupSnapshot",
            csi.groups
                .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                    name: format!("groupbench-{pid}-{round}"),
                    source_volume_ids: ids.clone(),
                    ..Default::default()
                }),
        )
        .await?
        .group_snapshot
        .unwrap_or_default();
        run.made(group_step(&g));
        let group_ms = start.elapsed().as_secs_f64() * 1e3;
        // Let a write that was blocked by the freeze finish and be counted.
        tokio::time::sleep(Duration::from_millis(20)).await;
        rows.push(GroupRow {
            round,
            group_ms,
            max_write_stall_ms: probe.take().as_secs_f64() * 1e3,
        });
        groups.push(g);
    }
    drop(probe);
    let verified = match groups.first() {
        Some(g) => {
            verify_members(&mut csi, run, &offer, &cap, g, &ids, &sums, size, workdir).await?
        }
        None => true,
    };
    for g in &groups {
        run.undo_timed(&mut csi, group_step(g)).await?;
    }
    for m in mounted {
        tear_down(&mut csi, run, &offer, m).await?;
    }
    let report = GroupReport {
        volumes: args.volumes,
        data_bytes_per_volume: args.data,
        rounds: rows,
        restored_members_verified: verified,
    };
    let (table, figures) = table(&report);
    let failure =
        (!verified).then(|| "a restored member did not hold the data its volume held".to_owned());
    Ok(Outcome::measured(&report, table, figures).failed(failure))
}

/// Restores every member of `group` and compares its data with what its volume was given.
#[allow(clippy::too_many_arguments)]
async fn verify_members(
    csi: &mut Csi,
    run: &Run,
    offer: &super::Offer,
    cap: &csi::VolumeCapability,
    group: &csi::VolumeGroupSnapshot,
    ids: &[String],
    sums: &[u64],
    size: u64,
    workdir: &Path,
) -> Result<bool, String> {
    let mut all = true;
    for (id, sum) in ids.iter().zip(sums) {
        let member = group
            .snapshots
            .iter()
            .find(|s| &s.source_volume_id == id)
            .ok_or_else(|| format!("the group has no member for volume {id}"))?;
        let restored = create_volume(
            csi,
            run,
            "CreateVolume from a member",
            volume_request(
                format!("{}-restored", member.snapshot_id),
                size,
                cap,
                Some(&member.snapshot_id),
            ),
        )
        .await?;
        let m = super::mount_existing(csi, run, offer, cap, restored.volume_id, workdir).await?;
        let file = Path::new(&m.target).join("data");
        let len = fs::metadata(&file)
            .map_err(|e| format!("stat {}: {e}", file.display()))?
            .len();
        let found = tokio::task::spawn_blocking(move || checksum(&file, len))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("read back: {e}"))?;
        all &= found == *sum;
        tear_down(csi, run, offer, m).await?;
    }
    Ok(all)
}

/// How the run deletes the group if it stops part-way.
fn group_step(g: &csi::VolumeGroupSnapshot) -> Step {
    Step::Group {
        id: g.group_snapshot_id.clone(),
        snapshot_ids: g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
    }
}

fn table(report: &GroupReport) -> (String, Vec<(String, f64)>) {
    let mut table = format!(
        "group of {} volumes, {} bytes of data each; restored members verified: {}\n{:>6} {:>10} {:>18}\n",
        report.volumes,
        report.data_bytes_per_volume,
        report.restored_members_verified,
        "ROUND",
        "GROUP ms",
        "MAX WRITE STALL ms"
    );
    for r in &report.rounds {
        table.push_str(&format!(
            "{:>6} {:>10.2} {:>18.2}\n",
            r.round, r.group_ms, r.max_write_stall_ms
        ));
    }
    let median = |f: fn(&GroupRow) -> f64| {
        let mut v: Vec<f64> = report.rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let figures = vec![
        (
            "group snapshot median ms".to_owned(),
            median(|r| r.group_ms),
        ),
        (
            "longest write stall median ms".to_owned(),
            median(|r| r.max_write_stall_ms),
        ),
    ];
    (table, figures)
}
