//! `strata bench churn`: a mixed workload for a fixed time.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi_proto as csi;

use crate::client::Csi;
use crate::client::output::Format;

use super::{
    LifecycleArgs, Mounted, Outcome, Report, Run, bring_up, create_snapshot, delete_snapshot,
    offer, progress, tear_down, timed, write_data, xorshift,
};

/// A mixed workload for `seconds`: each client creates, uses, snapshots and deletes its own
/// volumes at random; reports throughput and tail latency per RPC.
pub async fn churn(
    mut csi: Csi,
    run: Arc<Run>,
    args: LifecycleArgs,
    seconds: u64,
    format: Format,
) -> Result<Outcome, String> {
    fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let offer = Arc::new(offer(&mut csi).await?);
    let args = Arc::new(args);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let bar = progress(seconds, "churn (s)", format);
    let ops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = vec![];
    for client in 0..args.concurrency.max(1) {
        let (mut csi, args, run, offer, ops) = (
            csi.clone(),
            args.clone(),
            run.clone(),
            offer.clone(),
            ops.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let cap = args.capability.to_csi();
            let mut mine: Vec<Mounted> = vec![];
            let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ client as u64;
            let mut n = 0;
            let result = async {
                while Instant::now() < deadline && !run.stopped() {
                    match xorshift(&mut rng) % 4 {
                        // Grow the working set up to 4 volumes per client.
                        0 | 1 if mine.len() < 4 => {
                            n += 1;
                            let name = format!("churn-{}-{client}-{n}", std::process::id());
                            mine.push(
                                bring_up(
                                    &mut csi,
                                    &run,
                                    &offer,
                                    &cap,
                                    name,
                                    args.size,
                                    &args.workdir,
                                )
                                .await?,
                            );
                        }
                        2 if !mine.is_empty() => {
                            let m = &mine[(rng as usize >> 3) % mine.len()];
                            write_data(&run, &m.target, args.capability.block, args.data).await?;
                            if offer.snapshots {
                                let name =
                                    format!("churn-{}-{client}-{n}-snap", std::process::id());
                                let snap =
                                    create_snapshot(&mut csi, &run, m.id.clone(), name).await?;
                                n += 1;
                                delete_snapshot(&mut csi, &run, snap.snapshot_id).await?;
                            }
                        }
                        3 => {
                            timed(
                                &run,
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
                            tear_down(&mut csi, &run, &offer, m).await?;
                        }
                        _ => continue,
                    }
                    ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                for m in mine.drain(..) {
                    tear_down(&mut csi, &run, &offer, m).await?;
                }
                Ok::<(), String>(())
            }
            .await;
            if result.is_err() {
                run.stop();
            }
            result
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
    let joined = run.join(tasks).await;
    ticker.abort();
    joined?;
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let done = ops.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Report {
        scenario: "churn",
        volumes: done,
        concurrency: args.concurrency,
        seconds: elapsed,
        volumes_per_second: done as f64 / elapsed,
        rpcs: run.summary(),
        rss_kib: vec![],
    }
    .outcome())
}
