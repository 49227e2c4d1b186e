//! `strata bench move`: the data path of moving a volume, measured from the target's side
//! over the peer service (the bench presents the peer certificates, as a node would). A
//! block volume on the source written with `--data`, pre-copied while it stays published,
//! `--changed-percent` of it rewritten at scattered offsets, unpublished; then the final
//! copy (the source seals the volume and sends only the ranges changed since the pre-copy),
//! which is what a drain waits for, per volume. The copy is then checked against the
//! source's data, and the move withdrawn: nothing is kept on either side.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use strata_core::peer::{Chunk, MoveStep, Peers, RemoteRead};

use super::snapshot::{data_path, write_pattern};
use super::{Outcome, Run, bring_up, delete_volume, offer, unmount};
use crate::client::Csi;
use crate::peer::client::{Directory, GrpcPeers};
use crate::peer::tls::PeerTls;
use crate::units::human_bytes;

/// The rewrites after the pre-copy are this large.
const REWRITE: u64 = 64 << 10;

#[derive(Debug, Clone, clap::Args)]
pub struct MoveArgs {
    /// The size of the volume.
    #[arg(long, default_value = "4Gi", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// The data written into it before the pre-copy.
    #[arg(long, default_value = "1Gi", value_parser = crate::units::parse_size)]
    pub data: u64,
    /// The part of the volume rewritten after the pre-copy, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub changed_percent: f64,
    /// Directory for staging and target paths, and the copy.
    #[arg(long, default_value = "/tmp/strata-bench")]
    pub workdir: PathBuf,
    /// The source's node id and peer service, NODE=HOST:PORT.
    #[arg(long)]
    pub peer: String,
    /// The peer certificates (ca.crt, tls.crt, tls.key).
    #[arg(long)]
    pub peer_tls_dir: PathBuf,
}

#[derive(Serialize)]
struct MoveReport {
    size_bytes: u64,
    precopy_bytes: u64,
    precopy_seconds: f64,
    changed_bytes: u64,
    final_bytes: u64,
    final_seconds: f64,
    verified: bool,
}

/// Runs the scenario against the source's CSI endpoint and peer service (the caller undoes
/// what the run made if it stops part-way).
pub async fn moves(mut csi: Csi, run: &Run, args: MoveArgs) -> Result<Outcome, String> {
    measure(&mut csi, run, &args).await
}

/// A step of the move asked of the source, off the async runtime.
async fn step(
    peers: &std::sync::Arc<GrpcPeers>,
    node: &str,
    step: MoveStep,
    volume_id: &str,
    move_id: &str,
) -> Result<Option<RemoteRead>, String> {
    let (peers, node, volume_id, move_id) = (
        peers.clone(),
        node.to_owned(),
        volume_id.to_owned(),
        move_id.to_owned(),
    );
    tokio::task::spawn_blocking(move || peers.move_out(&node, step, &volume_id, &move_id))
        .await
        .map_err(|e| e.to_string())?
        .map(|out| out.read)
        .map_err(|e| format!("{step:?}: {e}"))
}

/// Streams a read of the source, handing each chunk to `each`; returns the bytes streamed.
async fn stream(
    peers: &std::sync::Arc<GrpcPeers>,
    node: &str,
    read: RemoteRead,
    mut each: impl FnMut(Chunk<'_>) -> std::io::Result<()> + Send + 'static,
) -> Result<u64, String> {
    let (peers, node) = (peers.clone(), node.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut bytes = 0u64;
        let streamed = peers.read(&node, &read.read_id, 0, &mut |c| {
            bytes += c.bytes.len() as u64;
            each(c).map_err(|e| strata_core::Error::Internal(format!("write the copy: {e}")))
        });
        let _ = peers.release(&node, &read.read_id);
        streamed.map(|_| bytes).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn measure(csi: &mut Csi, run: &Run, args: &MoveArgs) -> Result<Outcome, String> {
    let offer = offer(csi).await?;
    let (node, address) = args
        .peer
        .split_once('=')
        .ok_or("--peer must be NODE=HOST:PORT")?;
    let tls = PeerTls::load(&args.peer_tls_dir)?;
    let peers = std::sync::Arc::new(GrpcPeers::new(
        "strata-bench",
        Directory::Static([(node.to_owned(), address.to_owned())].into()),
        tls,
        Duration::from_secs(60),
        tokio::runtime::Handle::current(),
    ));
    std::fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let cap = super::raw_block();
    let name = format!("move-{}", std::process::id());
    let src = bring_up(
        csi,
        run,
        &offer,
        &cap,
        name.clone(),
        args.size,
        &args.workdir,
    )
    .await?;
    let device = data_path(&src.target, true);
    {
        let (device, data) = (device.clone(), args.data);
        super::blocking("write", move || write_pattern(&device, data, 11)).await?;
    }
    let copy_path = args.workdir.join(format!("{name}.copy"));
    let copy = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&copy_path)
        .map_err(|e| format!("create the copy: {e}"))?;
    copy.set_len(args.size)
        .map_err(|e| format!("size the copy: {e}"))?;
    let writer = |file: &File| {
        let file = file.try_clone();
        move |c: Chunk<'_>| match &file {
            Ok(f) => f.write_all_at(c.bytes, c.offset),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    };
    let move_id = format!("bench-{}", std::process::id());

    // The pre-copy, the volume still published.
    let started = Instant::now();
    let read = step(&peers, node, MoveStep::Precopy, &src.id, &move_id)
        .await?
        .ok_or("the source opened no pre-copy")?;
    let precopy_bytes = stream(&peers, node, read, writer(&copy)).await?;
    let precopy_seconds = started.elapsed().as_secs_f64();

    // The application goes on writing: scattered rewrites over the whole volume.
    let changed = ((args.size as f64 * args.changed_percent / 100.0) as u64 / REWRITE).max(1);
    {
        let (device, size) = (device.clone(), args.size);
        super::blocking("rewrite", move || rewrite(&device, size, changed)).await?;
    }
    unmount(csi, run, &src).await?;

    // The final copy: sealed, only what changed.
    let started = Instant::now();
    let read = step(&peers, node, MoveStep::Final, &src.id, &move_id)
        .await?
        .ok_or("the source opened no final copy")?;
    let final_bytes = stream(&peers, node, read, writer(&copy)).await?;
    copy.sync_all()
        .map_err(|e| format!("flush the copy: {e}"))?;
    let final_seconds = started.elapsed().as_secs_f64();

    // Checked against a fresh full read of the (sealed) source.
    let check_id = format!("{move_id}-check");
    let read = step(&peers, node, MoveStep::Precopy, &src.id, &check_id)
        .await?
        .ok_or("the source opened no read to check against")?;
    let ours = copy.try_clone().map_err(|e| e.to_string())?;
    let mismatch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = mismatch.clone();
    stream(&peers, node, read, move |c| {
        let mut buf = vec![0u8; c.bytes.len()];
        ours.read_exact_at(&mut buf, c.offset)?;
        if buf != c.bytes {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    })
    .await?;
    step(&peers, node, MoveStep::Cancel, &src.id, &check_id).await?;
    let _ = std::fs::remove_file(&copy_path);
    delete_volume(csi, run, src.id.clone()).await?;

    let report = MoveReport {
        size_bytes: args.size,
        precopy_bytes,
        precopy_seconds,
        changed_bytes: changed * REWRITE,
        final_bytes,
        final_seconds,
        verified: !mismatch.load(std::sync::atomic::Ordering::SeqCst),
    };
    let table = format!(
        "move of a {} volume holding {}: pre-copy {} in {:.2} s (in use); {} rewritten; final copy {} in {:.3} s (unused, sealed); copy verified: {}\n",
        human_bytes(args.size as i64),
        human_bytes(args.data as i64),
        human_bytes(precopy_bytes as i64),
        precopy_seconds,
        human_bytes(report.changed_bytes as i64),
        human_bytes(final_bytes as i64),
        final_seconds,
        report.verified
    );
    let figures = vec![
        ("pre-copy s".to_owned(), precopy_seconds),
        ("final copy s".to_owned(), final_seconds),
        (
            "final copy MiB".to_owned(),
            final_bytes as f64 / (1 << 20) as f64,
        ),
    ];
    let failure = (!report.verified).then(|| "the copy differs from the source".to_owned());
    Ok(Outcome::measured(&report, table, figures).failed(failure))
}

/// `count` rewrites of [`REWRITE`] bytes spread evenly over the device.
fn rewrite(device: &std::path::Path, size: u64, count: u64) -> std::io::Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(device)?;
    let stride = (size / count / REWRITE).max(1) * REWRITE;
    let chunk = vec![0xa5u8; REWRITE as usize];
    let mut written = 0;
    for i in 0..count {
        let at = (i * stride + (i % 7) * 4096).min(size - REWRITE);
        f.write_all_at(&chunk, at)?;
        written += REWRITE;
    }
    f.sync_all()?;
    Ok(written)
}
