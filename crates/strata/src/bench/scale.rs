//! `strata bench scale`: many volumes created, listed and deleted; the driver's memory.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use csi_proto as csi;

use crate::client::Csi;
use crate::client::shared::{CapabilityArgs, ModeArg};

use super::{Outcome, Report, Run, create_volume, delete_volume, rss_kib, timed};

/// Creates `volumes` volumes, lists them all page by page, and deletes them unless `keep`.
pub async fn scale(
    csi: Csi,
    run: Arc<Run>,
    volumes: usize,
    concurrency: usize,
    page: i32,
    keep: bool,
    pid: Option<u32>,
) -> Result<Outcome, String> {
    let mut rss = vec![];
    let mut sample = |when: &'static str| {
        if let Some(kib) = pid.and_then(rss_kib) {
            rss.push((when, kib));
        }
    };
    sample("before");
    let cap = CapabilityArgs::ext4(ModeArg::SingleNodeMultiWriter).to_csi();
    let start = Instant::now();
    let ids = Arc::new(Mutex::new(vec![]));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for _ in 0..concurrency.max(1) {
        let (mut csi, run, next, ids, cap) = (
            csi.clone(),
            run.clone(),
            next.clone(),
            ids.clone(),
            cap.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= volumes || run.stopped() {
                    return Ok::<(), String>(());
                }
                let request = csi::CreateVolumeRequest {
                    name: format!("scale-{}-{n}", std::process::id()),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 64 << 20,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                };
                let v = create_volume(&mut csi, &run, "CreateVolume", request)
                    .await
                    .inspect_err(|_| run.stop())?;
                ids.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(v.volume_id);
            }
        }));
    }
    run.join(tasks).await?;
    sample("after creates");
    let mut csi_list = csi.clone();
    let list_start = Instant::now();
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let r = timed(
            &run,
            "ListVolumes (page)",
            csi_list.controller.list_volumes(csi::ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            }),
        )
        .await?;
        seen += r.entries.len();
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    run.record("ListVolumes (all pages)", list_start.elapsed());
    sample("after listing");
    eprintln!("listed {seen} volumes");
    let mut ids: Vec<String> = std::mem::take(&mut *ids.lock().unwrap_or_else(|p| p.into_inner()));
    if keep {
        ids.clear();
    }
    let chunks: Vec<Vec<String>> = ids
        .chunks(ids.len().div_ceil(concurrency.max(1)).max(1))
        .map(|c| c.to_vec())
        .collect();
    let mut tasks = vec![];
    for chunk in chunks {
        let (mut csi, run) = (csi.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                if run.stopped() {
                    break;
                }
                delete_volume(&mut csi, &run, id)
                    .await
                    .inspect_err(|_| run.stop())?;
            }
            Ok::<(), String>(())
        }));
    }
    run.join(tasks).await?;
    let seconds = start.elapsed().as_secs_f64();
    sample("at the end");
    Ok(Report {
        scenario: "scale",
        volumes,
        concurrency,
        seconds,
        volumes_per_second: volumes as f64 / seconds,
        rpcs: run.summary(),
        rss_kib: rss,
    }
    .outcome())
}
