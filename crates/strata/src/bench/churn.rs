//! `strata bench churn`: a mixed workload for a fixed time.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi_proto as csi;

use crate::client::Csi;
use crate::client::output::Format;

use super::{
    Latencies, LifecycleArgs, Mounted, Outcome, Report, bring_up, offer, progress, tear_down,
    timed, write_data,
};

/// A mixed workload for `seconds`: each client creates, uses, snapshots and deletes its own
/// volumes at random; reports throughput and tail latency per RPC.
pub async fn churn(
    mut csi: Csi,
    args: LifecycleArgs,
    seconds: u64,
    format: Format,
) -> Result<Outcome, String> {
    fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let offer = Arc::new(offer(&mut csi).await?);
    let args = Arc::new(args);
    let lat = Arc::new(Latencies::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let bar = progress(seconds, "churn (s)", format);
    let ops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = vec![];
    for client in 0..args.concurrency.max(1) {
        let (mut csi, args, lat, offer, ops) = (
            csi.clone(),
            args.clone(),
            lat.clone(),
            offer.clone(),
            ops.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let cap = args.capability.to_csi();
            let mut mine: Vec<Mounted> = vec![];
            let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ client as u64;
            let mut n = 0;
            while Instant::now() < deadline {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                match rng % 4 {
                    // Grow the working set up to 4 volumes per client.
                    0 | 1 if mine.len() < 4 => {
                        n += 1;
                        let name = format!("churn-{}-{client}-{n}", std::process::id());
                        mine.push(
                            bring_up(&mut csi, &lat, &offer, &cap, name, args.size, &args.workdir)
                                .await?,
                        );
                    }
                    2 if !mine.is_empty() => {
                        let m = &mine[(rng as usize >> 3) % mine.len()];
                        write_data(&lat, &m.target, args.capability.block, args.data).await?;
                        if offer.snapshots {
                            let snap = timed(
                                &lat,
                                "CreateSnapshot",
                                csi.controller.create_snapshot(csi::CreateSnapshotRequest {
                                    source_volume_id: m.id.clone(),
                                    name: format!("churn-{}-{client}-{n}-snap", std::process::id()),
                                    ..Default::default()
                                }),
                            )
                            .await?;
                            n += 1;
                            if let Some(s) = snap.snapshot {
                                timed(
                                    &lat,
                                    "DeleteSnapshot",
                                    csi.controller.delete_snapshot(csi::DeleteSnapshotRequest {
                                        snapshot_id: s.snapshot_id,
                                        secrets: Default::default(),
                                    }),
                                )
                                .await?;
                            }
                        }
                    }
                    3 => {
                        timed(
                            &lat,
                            "ListVolumes",
                            csi.controller.list_volumes(csi::ListVolumesRequest {
                                max_entries: 100,
                                starting_token: String::new(),
                            }),
                        )
                        .await?;
                    }
                    _ if !mine.is_empty() => {
                        let m = mine.swap_remove((rng as usize >> 5) % mine.len());
                        tear_down(&mut csi, &lat, &offer, m).await?;
                    }
                    _ => continue,
                }
                ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            for m in mine {
                tear_down(&mut csi, &lat, &offer, m).await?;
            }
            Ok::<(), String>(())
        }));
    }
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.inc(1);
            }
        })
    };
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    ticker.abort();
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let done = ops.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Report {
        scenario: "churn",
        volumes: done,
        concurrency: args.concurrency,
        seconds: elapsed,
        volumes_per_second: done as f64 / elapsed,
        rpcs: lat.summary(),
        rss_kib: vec![],
    }
    .outcome())
}
