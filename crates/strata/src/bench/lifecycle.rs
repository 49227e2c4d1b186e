//! `strata bench lifecycle`: the full life of each volume, as a pod start and stop drive it.

use std::fs;
use std::sync::Arc;
use std::time::Instant;

use crate::client::Csi;
use crate::client::output::Format;

use super::{
    LifecycleArgs, Outcome, Report, Run, bring_up, offer, progress, tear_down, write_data,
};

pub async fn lifecycle(
    mut csi: Csi,
    run: Arc<Run>,
    args: LifecycleArgs,
    format: Format,
) -> Result<Outcome, String> {
    fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let offer = Arc::new(offer(&mut csi).await?);
    let args = Arc::new(args);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bar = progress(args.volumes as u64, "lifecycle", format);
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..args.concurrency.max(1) {
        let (mut csi, args, run, next, offer, bar) = (
            csi.clone(),
            args.clone(),
            run.clone(),
            next.clone(),
            offer.clone(),
            bar.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let cap = args.capability.to_csi();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= args.volumes || run.stopped() {
                    return Ok::<(), String>(());
                }
                let name = format!("bench-{}-{n}", std::process::id());
                let one = async {
                    let m = bring_up(&mut csi, &run, &offer, &cap, name, args.size, &args.workdir)
                        .await?;
                    write_data(&run, &m.target, args.capability.block, args.data).await?;
                    tear_down(&mut csi, &run, &offer, m).await
                };
                if let Err(e) = one.await {
                    run.stop();
                    return Err(e);
                }
                bar.inc(1);
            }
        }));
    }
    run.join(tasks).await?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    Ok(Report {
        scenario: "lifecycle",
        volumes: args.volumes,
        concurrency: args.concurrency,
        seconds,
        volumes_per_second: args.volumes as f64 / seconds,
        rpcs: run.summary(),
        rss_kib: vec![],
    }
    .outcome())
}
