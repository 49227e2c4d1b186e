//! `strata bench`: load generator against any CSI endpoint. Reports throughput and latency
//! percentiles per RPC; nothing here asserts on time.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto as csi;
use serde::Serialize;

use crate::client::commands::{CapabilityArgs, ModeArg};
use crate::client::output::Format;
use crate::client::{Csi, status_error};

#[derive(Default)]
struct Latencies(Mutex<BTreeMap<&'static str, Vec<Duration>>>);

impl Latencies {
    fn record(&self, rpc: &'static str, d: Duration) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rpc)
            .or_default()
            .push(d);
    }

    fn summary(&self) -> Vec<RpcSummary> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(rpc, v)| {
                let mut v = v.clone();
                v.sort();
                let pct = |p: f64| {
                    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
                    v[i].as_secs_f64() * 1e3
                };
                RpcSummary {
                    rpc,
                    calls: v.len(),
                    p50_ms: pct(0.5),
                    p90_ms: pct(0.9),
                    p99_ms: pct(0.99),
                }
            })
            .collect()
    }
}

#[derive(Serialize)]
struct RpcSummary {
    rpc: &'static str,
    calls: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    volumes: usize,
    concurrency: usize,
    seconds: f64,
    volumes_per_second: f64,
    rpcs: Vec<RpcSummary>,
    /// The driver's resident memory at points of the run, when its pid was given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rss_kib: Vec<(&'static str, u64)>,
}

impl Report {
    fn print(&self, format: Format) {
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(self).unwrap_or_default()),
            Format::Table => {
                println!(
                    "{}: {} volumes, concurrency {}, {:.2} s, {:.1} volumes/s",
                    self.scenario,
                    self.volumes,
                    self.concurrency,
                    self.seconds,
                    self.volumes_per_second
                );
                println!(
                    "{:<24} {:>7} {:>9} {:>9} {:>9}",
                    "RPC", "CALLS", "P50 ms", "P90 ms", "P99 ms"
                );
                for r in &self.rpcs {
                    println!(
                        "{:<24} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                        r.rpc, r.calls, r.p50_ms, r.p90_ms, r.p99_ms
                    );
                }
                for (when, kib) in &self.rss_kib {
                    println!("driver RSS {when}: {:.1} MiB", *kib as f64 / 1024.0);
                }
            }
        }
    }
}

async fn timed<T>(
    lat: &Latencies,
    rpc: &'static str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let start = Instant::now();
    let r = fut.await.map_err(|s| status_error(rpc, s))?;
    lat.record(rpc, start.elapsed());
    Ok(r.into_inner())
}

pub struct LifecycleArgs {
    pub volumes: usize,
    pub concurrency: usize,
    pub size: u64,
    pub data: u64,
    pub workdir: PathBuf,
    pub capability: CapabilityArgs,
}

/// What the driver under test offers, so one benchmark serves any CSI driver.
#[derive(Clone, Debug)]
struct Offer {
    controller_publish: bool,
    stage: bool,
    snapshots: bool,
    node_id: String,
}

async fn offer(csi: &mut Csi) -> Result<Offer, String> {
    use csi::controller_service_capability::{Type as C, rpc::Type as CR};
    use csi::node_service_capability::{Type as N, rpc::Type as NR};
    let controller = csi
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .map_err(|s| status_error("ControllerGetCapabilities", s))?
        .into_inner();
    let has = |t: CR| {
        controller
            .capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(C::Rpc(r)) if r.r#type == t as i32))
    };
    let node = csi
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .map_err(|s| status_error("NodeGetCapabilities", s))?
        .into_inner();
    let stage = node
        .capabilities
        .iter()
        .any(|c| matches!(&c.r#type, Some(N::Rpc(r)) if r.r#type == NR::StageUnstageVolume as i32));
    let info = csi
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map_err(|s| status_error("NodeGetInfo", s))?
        .into_inner();
    Ok(Offer {
        controller_publish: has(CR::PublishUnpublishVolume),
        stage,
        snapshots: has(CR::CreateDeleteSnapshot),
        node_id: info.node_id,
    })
}

/// A volume made usable on this node, and how to undo it.
struct Mounted {
    id: String,
    staging: Option<String>,
    target: String,
}

async fn bring_up(
    csi: &mut Csi,
    lat: &Latencies,
    offer: &Offer,
    cap: &csi::VolumeCapability,
    name: String,
    size: u64,
    dir: &std::path::Path,
) -> Result<Mounted, String> {
    let vol = timed(
        lat,
        "CreateVolume",
        csi.controller.create_volume(csi::CreateVolumeRequest {
            name,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        }),
    )
    .await?
    .volume
    .unwrap_or_default();
    let id = vol.volume_id;
    let mut publish_context = Default::default();
    if offer.controller_publish {
        publish_context = timed(
            lat,
            "ControllerPublishVolume",
            csi.controller
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: offer.node_id.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                }),
        )
        .await?
        .publish_context;
    }
    let staging = offer
        .stage
        .then(|| dir.join(format!("stage-{id}")).display().to_string());
    if let Some(staging) = &staging {
        fs::create_dir_all(staging).map_err(|e| e.to_string())?;
        timed(
            lat,
            "NodeStageVolume",
            csi.node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                publish_context: publish_context.clone(),
                ..Default::default()
            }),
        )
        .await?;
    }
    let target = dir.join(format!("pub-{id}")).display().to_string();
    timed(
        lat,
        "NodePublishVolume",
        csi.node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone().unwrap_or_default(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            publish_context,
            ..Default::default()
        }),
    )
    .await?;
    Ok(Mounted {
        id,
        staging,
        target,
    })
}

async fn tear_down(
    csi: &mut Csi,
    lat: &Latencies,
    offer: &Offer,
    m: Mounted,
) -> Result<(), String> {
    timed(
        lat,
        "NodeUnpublishVolume",
        csi.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: m.id.clone(),
                target_path: m.target,
            }),
    )
    .await?;
    if let Some(staging) = m.staging {
        timed(
            lat,
            "NodeUnstageVolume",
            csi.node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: m.id.clone(),
                staging_target_path: staging.clone(),
            }),
        )
        .await?;
        let _ = fs::remove_dir(&staging);
    }
    if offer.controller_publish {
        timed(
            lat,
            "ControllerUnpublishVolume",
            csi.controller
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: m.id.clone(),
                    node_id: offer.node_id.clone(),
                    secrets: Default::default(),
                }),
        )
        .await?;
    }
    timed(
        lat,
        "DeleteVolume",
        csi.controller.delete_volume(csi::DeleteVolumeRequest {
            volume_id: m.id,
            secrets: Default::default(),
        }),
    )
    .await?;
    Ok(())
}

/// Writes `bytes` into the published volume (a file in it, or the device) and fsyncs.
async fn write_data(lat: &Latencies, target: &str, block: bool, bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    let path = if block {
        PathBuf::from(target)
    } else {
        PathBuf::from(target).join("data")
    };
    let start = Instant::now();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(!block)
            .open(path)?;
        f.write_all(&vec![0xA5u8; bytes as usize])?;
        f.sync_all()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("write data: {e}"))?;
    lat.record("write+fsync", start.elapsed());
    Ok(())
}

fn progress(total: u64, what: &str, format: Format) -> indicatif::ProgressBar {
    if format == Format::Json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

pub async fn lifecycle(mut csi: Csi, args: LifecycleArgs, format: Format) -> Result<(), String> {
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
    Report {
        scenario: "lifecycle",
        volumes: args.volumes,
        concurrency: args.concurrency,
        seconds,
        volumes_per_second: args.volumes as f64 / seconds,
        rpcs: lat.summary(),
        rss_kib: vec![],
    }
    .print(format);
    Ok(())
}

/// A mixed workload for `seconds`: each client creates, uses, snapshots and deletes its own
/// volumes at random; reports throughput and tail latency per RPC.
pub async fn churn(
    mut csi: Csi,
    args: LifecycleArgs,
    seconds: u64,
    format: Format,
) -> Result<(), String> {
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
    Report {
        scenario: "churn",
        volumes: done,
        concurrency: args.concurrency,
        seconds: elapsed,
        volumes_per_second: done as f64 / elapsed,
        rpcs: lat.summary(),
        rss_kib: vec![],
    }
    .print(format);
    Ok(())
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Creates `volumes` volumes, lists them all page by page, and deletes them unless `keep`.
pub async fn scale(
    csi: Csi,
    volumes: usize,
    concurrency: usize,
    page: i32,
    keep: bool,
    pid: Option<u32>,
    format: Format,
) -> Result<(), String> {
    let mut rss = vec![];
    let mut sample = |when: &'static str| {
        if let Some(kib) = pid.and_then(rss_kib) {
            rss.push((when, kib));
        }
    };
    sample("before");
    let lat = Arc::new(Latencies::default());
    let cap = CapabilityArgs::ext4(ModeArg::SingleNodeMultiWriter).to_csi();
    let start = Instant::now();
    let ids = Arc::new(Mutex::new(vec![]));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for _ in 0..concurrency.max(1) {
        let (mut csi, lat, next, ids, cap) = (
            csi.clone(),
            lat.clone(),
            next.clone(),
            ids.clone(),
            cap.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= volumes {
                    return Ok::<(), String>(());
                }
                let v = timed(
                    &lat,
                    "CreateVolume",
                    csi.controller.create_volume(csi::CreateVolumeRequest {
                        name: format!("scale-{}-{n}", std::process::id()),
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: 64 << 20,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![cap.clone()],
                        ..Default::default()
                    }),
                )
                .await?;
                ids.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(v.volume.unwrap_or_default().volume_id);
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    sample("after creates");
    let mut csi_list = csi.clone();
    let list_start = Instant::now();
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let r = timed(
            &lat,
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
    lat.record("ListVolumes (all pages)", list_start.elapsed());
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
        let (mut csi, lat) = (csi.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                timed(
                    &lat,
                    "DeleteVolume",
                    csi.controller.delete_volume(csi::DeleteVolumeRequest {
                        volume_id: id,
                        secrets: Default::default(),
                    }),
                )
                .await?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let seconds = start.elapsed().as_secs_f64();
    sample("at the end");
    Report {
        scenario: "scale",
        volumes,
        concurrency,
        seconds,
        volumes_per_second: volumes as f64 / seconds,
        rpcs: lat.summary(),
        rss_kib: rss,
    }
    .print(format);
    Ok(())
}

/// One row of the snapshot scenario.
#[derive(Serialize)]
struct SnapshotRow {
    data_bytes: u64,
    snapshot_ms: f64,
    restore_ms: f64,
    verified: bool,
}

/// Writes `bytes` of a deterministic pattern into `path` in 4 MiB chunks, fsyncs, and
/// returns a checksum of what was written.
fn write_pattern(path: &std::path::Path, bytes: u64, seed: u64) -> std::io::Result<u64> {
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

fn checksum(path: &std::path::Path) -> std::io::Result<u64> {
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
