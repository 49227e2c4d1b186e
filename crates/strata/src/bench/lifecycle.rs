//! `strata bench lifecycle`: the full life of each volume, as a pod start and stop drive it.

use std::fs;
use std::sync::Arc;
use std::time::Instant;

use crate::client::Csi;
use crate::client::output::Format;

use super::{
    Latencies, LifecycleArgs, Outcome, Report, bring_up, offer, progress, tear_down, write_data,
};

pub async fn lifecycle(
    mut csi: Csi,
    args: LifecycleArgs,
    format: Format,
) -> Result<Outcome, String> {
    fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let offer = Arc::new(offer(&mut csi).await?);
    let args = Arc::new(args);
    let lat = Arc::new(Latencies::default());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bar = progress(args.volumes as u64, "lifecycle", format);
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..args.concurrency.max(1) {
        let (mut csi, args, lat, next, offer, bar) = (
            csi.clone(),
            args.clone(),
            lat.clone(),
            next.clone(),
            offer.clone(),
            bar.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let cap = args.capability.to_csi();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= args.volumes {
                    return Ok::<(), String>(());
                }
                let name = format!("bench-{}-{n}", std::process::id());
                let m =
                    bring_up(&mut csi, &lat, &offer, &cap, name, args.size, &args.workdir).await?;
                write_data(&lat, &m.target, args.capability.block, args.data).await?;
                tear_down(&mut csi, &lat, &offer, m).await?;
                bar.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    Ok(Report {
        scenario: "lifecycle",
        volumes: args.volumes,
        concurrency: args.concurrency,
        seconds,
        volumes_per_second: args.volumes as f64 / seconds,
        rpcs: lat.summary(),
        rss_kib: vec![],
    }
    .outcome())
}
