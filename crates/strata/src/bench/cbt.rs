//! `strata bench cbt`: changed block tracking as a backup tool uses it. A raw block volume is
//! filled sparsely and snapshotted, rewritten in scattered small writes and snapshotted again;
//! then the time to stream the whole answer of GetMetadataAllocated (the first, full backup)
//! and of GetMetadataDelta (each incremental one), with every write checked to be inside the
//! delta. Then, on a very large sparse volume, the driver's peak memory while it streams,
//! which must not grow with the volume.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use csi_proto as csi;
use serde::Serialize;

use super::{
    Outcome, Run, blocking, bring_up, create_snapshot, delete_snapshot, offer, peak_kib, tear_down,
};
use crate::client::snapshot::each_metadata_page;
use crate::client::{Csi, status_error};
use crate::units::{human_bytes, parse_size};

#[derive(Debug, Clone, clap::Args)]
pub struct CbtArgs {
    /// The block volume's size.
    #[arg(long, default_value = "10Gi", value_parser = parse_size)]
    pub size: u64,
    /// Data in the first snapshot, in 1 MiB writes scattered over the volume.
    #[arg(long, default_value = "1Gi", value_parser = parse_size)]
    pub data: u64,
    /// Share of the volume rewritten between the two snapshots, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub changed_percent: f64,
    /// Size of each scattered rewrite.
    #[arg(long, default_value = "64Ki", value_parser = parse_size)]
    pub write: u64,
    /// Size of the large sparse volume whose streams' memory is measured; 0 skips it (the
    /// pool needs that much free space: it is sparse, but the driver checks).
    #[arg(long, default_value = "1Ti", value_parser = parse_size)]
    pub flat_size: u64,
    /// Scattered 64 KiB writes before each of the large volume's two snapshots.
    #[arg(long, default_value_t = 16_384)]
    pub flat_writes: u64,
    /// The driver's process id, to report its peak memory while it streams.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Directory for staging and target paths.
    #[arg(long, default_value = "/tmp/strata-bench")]
    pub workdir: PathBuf,
}

/// One streamed answer.
#[derive(Serialize, Default)]
struct Stream {
    ms: f64,
    messages: u64,
    ranges: u64,
    bytes: u64,
    /// How much the driver's peak resident memory rose while it streamed (with --pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    driver_peak_growth_kib: Option<u64>,
}

#[derive(Serialize)]
struct CbtReport {
    volume_bytes: u64,
    data_bytes: u64,
    rewrites: u64,
    rewrite_bytes: u64,
    allocated: Stream,
    delta: Stream,
    /// Every rewritten range lies inside a range of the delta.
    delta_covers_every_write: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    flat: Option<Flat>,
}

#[derive(Serialize)]
struct Flat {
    volume_bytes: u64,
    writes_per_snapshot: u64,
    allocated: Stream,
    delta: Stream,
}

/// `count` distinct slots of `0..slots`, spread over all of it in a scrambled order: slot
/// `i * step mod slots` with `step` coprime to `slots`.
fn scattered(slots: u64, count: u64, skip: u64) -> impl Iterator<Item = u64> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut step = (slots as f64 * 0.618_034) as u64 | 1;
    while slots > 1 && gcd(step, slots) != 1 {
        step += 2;
    }
    (skip..skip + count.min(slots.saturating_sub(skip)))
        .map(move |i| (u128::from(i) * u128::from(step) % u128::from(slots.max(1))) as u64)
}

/// A buffer of `len` bytes of `byte` aligned for O_DIRECT, without unsafe code: a slice of a
/// larger vector, starting at its first 4 KiB boundary.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, byte: u8) -> Aligned {
        let storage = vec![byte; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Aligned {
            storage,
            start,
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

/// Writes `len` bytes at each of `offsets` on the device, bypassing the page cache, then
/// flushes it.
fn write_at(device: &Path, offsets: &[u64], len: u64, byte: u8) -> std::io::Result<()> {
    let file: File = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?;
    let buffer = Aligned::new(len as usize, byte);
    for at in offsets {
        file.write_all_at(buffer.bytes(), *at)?;
    }
    file.sync_all()
}

/// Resets the peak resident memory the kernel keeps for `pid` (so the next peak is this
/// stream's); its current value.
fn reset_peak(pid: u32) -> Option<u64> {
    // "5" resets VmHWM to the current RSS (proc(5), clear_refs); needs the right to write
    // the driver's /proc entries (root, as the driver runs).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").ok()?;
    peak_kib(pid)
}

/// Streams one SnapshotMetadata answer to its end, keeping only the ranges when `keep`.
async fn stream(
    csi: &mut Csi,
    base: Option<&str>,
    target: &str,
    pid: Option<u32>,
    keep: bool,
) -> Result<(Stream, Vec<(u64, u64)>), String> {
    let before = pid.and_then(reset_peak);
    let mut out = Stream::default();
    let mut kept = vec![];
    let start = Instant::now();
    let call = match base {
        None => "GetMetadataAllocated",
        Some(_) => "GetMetadataDelta",
    };
    each_metadata_page(csi, base, target, 0, 0, |page| {
        out.messages += 1;
        for r in page.block_metadata {
            out.ranges += 1;
            out.bytes += r.size_bytes.max(0) as u64;
            if keep {
                kept.push((r.byte_offset.max(0) as u64, r.size_bytes.max(0) as u64));
            }
        }
    })
    .await
    .map_err(|e| status_error(call, e))?;
    out.ms = start.elapsed().as_secs_f64() * 1e3;
    out.driver_peak_growth_kib = match (before, pid.and_then(peak_kib)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    Ok((out, kept))
}

/// Whether every `len`-byte write at `offsets` lies inside one of `ranges` (sorted, as the
/// service sends them).
fn covered(ranges: &[(u64, u64)], offsets: &[u64], len: u64) -> bool {
    offsets.iter().all(|&at| {
        let i = ranges.partition_point(|&(start, _)| start <= at);
        i > 0 && {
            let (start, size) = ranges[i - 1];
            at + len <= start + size
        }
    })
}

async fn offers_metadata(csi: &mut Csi) -> Result<bool, String> {
    use csi::plugin_capability::{Type, service::Type as S};
    let caps = csi
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .map_err(|s| status_error("GetPluginCapabilities", s))?
        .into_inner();
    Ok(caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == S::SnapshotMetadataService as i32)
    }))
}

fn check(args: &CbtArgs) -> Result<(), String> {
    const MIB: u64 = 1 << 20;
    if args.size < 4 * MIB || !args.size.is_multiple_of(MIB) {
        return Err("--size must be a whole number of MiB, at least 4Mi".into());
    }
    if args.data > args.size || !args.data.is_multiple_of(MIB) {
        return Err("--data must be whole MiB, at most --size".into());
    }
    if !(0.0..=100.0).contains(&args.changed_percent) {
        return Err("--changed-percent must be between 0 and 100".into());
    }
    if args.write < 4096
        || !args.write.is_multiple_of(4096)
        || args.write > MIB
        || !args.size.is_multiple_of(args.write)
    {
        return Err("--write must be a multiple of 4Ki up to 1Mi that divides --size".into());
    }
    if args.flat_size != 0 && (!args.flat_size.is_multiple_of(MIB) || args.flat_size < 4 * MIB) {
        return Err("--flat-size must be 0 or whole MiB, at least 4Mi".into());
    }
    Ok(())
}

/// The large sparse volume: two snapshots of `flat_writes` scattered writes each, and the
/// driver's peak memory while it streams the allocated list and the delta.
async fn flat(
    csi: &mut Csi,
    run: &Run,
    offer: &super::Offer,
    cap: &csi::VolumeCapability,
    args: &CbtArgs,
    name: &str,
) -> Result<Flat, String> {
    const WRITE: u64 = 64 << 10;
    let m = bring_up(
        csi,
        run,
        offer,
        cap,
        format!("{name}-flat"),
        args.flat_size,
        &args.workdir,
    )
    .await?;
    let device = PathBuf::from(&m.target);
    let slots = args.flat_size / WRITE;
    let first: Vec<u64> = scattered(slots, args.flat_writes, 0)
        .map(|s| s * WRITE)
        .collect();
    let second: Vec<u64> = scattered(slots, args.flat_writes, args.flat_writes)
        .map(|s| s * WRITE)
        .collect();
    {
        let device = device.clone();
        blocking("write", move || write_at(&device, &first, WRITE, 1)).await?;
    }
    let f1 = create_snapshot(csi, run, m.id.clone(), format!("{name}-flat-1")).await?;
    {
        let device = device.clone();
        blocking("write", move || write_at(&device, &second, WRITE, 2)).await?;
    }
    let f2 = create_snapshot(csi, run, m.id.clone(), format!("{name}-flat-2")).await?;
    let (allocated, _) = stream(csi, None, &f2.snapshot_id, args.pid, false).await?;
    let (delta, _) = stream(csi, Some(&f1.snapshot_id), &f2.snapshot_id, args.pid, false).await?;
    delete_snapshot(csi, run, f2.snapshot_id).await?;
    delete_snapshot(csi, run, f1.snapshot_id).await?;
    tear_down(csi, run, offer, m).await?;
    Ok(Flat {
        volume_bytes: args.flat_size,
        writes_per_snapshot: args.flat_writes,
        allocated,
        delta,
    })
}

pub async fn cbt(mut csi: Csi, run: &Run, args: CbtArgs) -> Result<Outcome, String> {
    check(&args)?;
    if !offers_metadata(&mut csi).await? {
        return Ok(Outcome::Skipped(
            "the driver does not offer the SnapshotMetadata service".into(),
        ));
    }
    let offer = offer(&mut csi).await?;
    if !offer.snapshots {
        return Ok(Outcome::Skipped(
            "the driver does not offer CREATE_DELETE_SNAPSHOT".into(),
        ));
    }
    std::fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let cap = super::raw_block();
    let name = format!("cbtbench-{}", std::process::id());
    const MIB: u64 = 1 << 20;

    let m = bring_up(
        &mut csi,
        run,
        &offer,
        &cap,
        name.clone(),
        args.size,
        &args.workdir,
    )
    .await?;
    let device = PathBuf::from(&m.target);
    let data: Vec<u64> = scattered(args.size / MIB, args.data / MIB, 0)
        .map(|s| s * MIB)
        .collect();
    {
        let device = device.clone();
        blocking("write", move || write_at(&device, &data, MIB, 1)).await?;
    }
    let s1 = create_snapshot(&mut csi, run, m.id.clone(), format!("{name}-1")).await?;
    let rewrites = ((args.size as f64 * args.changed_percent / 100.0) / args.write as f64) as u64;
    let mut changed: Vec<u64> = scattered(args.size / args.write, rewrites, 0)
        .map(|s| s * args.write)
        .collect();
    {
        let (device, changed, len) = (device.clone(), changed.clone(), args.write);
        blocking("rewrite", move || write_at(&device, &changed, len, 2)).await?;
    }
    let s2 = create_snapshot(&mut csi, run, m.id.clone(), format!("{name}-2")).await?;

    let (allocated, _) = stream(&mut csi, None, &s1.snapshot_id, args.pid, false).await?;
    let (delta, ranges) = stream(
        &mut csi,
        Some(&s1.snapshot_id),
        &s2.snapshot_id,
        args.pid,
        true,
    )
    .await?;
    changed.sort_unstable();
    let delta_covers_every_write = covered(&ranges, &changed, args.write);
    delete_snapshot(&mut csi, run, s2.snapshot_id).await?;
    delete_snapshot(&mut csi, run, s1.snapshot_id).await?;
    tear_down(&mut csi, run, &offer, m).await?;

    let flat = if args.flat_size == 0 {
        None
    } else {
        Some(flat(&mut csi, run, &offer, &cap, &args, &name).await?)
    };
    let report = CbtReport {
        volume_bytes: args.size,
        data_bytes: args.data,
        rewrites,
        rewrite_bytes: rewrites * args.write,
        allocated,
        delta,
        delta_covers_every_write,
        flat,
    };
    let failure = (!report.delta_covers_every_write)
        .then(|| "the delta left out a range that was rewritten".to_owned());
    let (table, figures) = table(&report);
    Ok(Outcome::measured(&report, table, figures).failed(failure))
}

fn table(r: &CbtReport) -> (String, Vec<(String, f64)>) {
    use std::fmt::Write as _;
    let size = human_bytes(r.volume_bytes as i64);
    let mut table = format!(
        "{:<44} {:>9} {:>9} {:>10} {:>12} {:>14}\n",
        "ANSWER", "ms", "MESSAGES", "RANGES", "BYTES", "PEAK RSS +KiB"
    );
    let mut figures = vec![];
    let mut row = |what: String, s: &Stream| {
        let _ = writeln!(
            table,
            "{:<44} {:>9.2} {:>9} {:>10} {:>12} {:>14}",
            what,
            s.ms,
            s.messages,
            s.ranges,
            s.bytes,
            s.driver_peak_growth_kib
                .map_or("-".to_owned(), |k| k.to_string())
        );
        figures.push((format!("{what} ms"), s.ms));
        if let Some(k) = s.driver_peak_growth_kib {
            figures.push((format!("{what} peak RSS growth KiB"), k as f64));
        }
    };
    row(
        format!(
            "allocated, {size} holding {}",
            human_bytes(r.data_bytes as i64)
        ),
        &r.allocated,
    );
    row(
        format!(
            "delta, {size} with {} x {} rewritten",
            r.rewrites,
            human_bytes((r.rewrite_bytes / r.rewrites.max(1)) as i64)
        ),
        &r.delta,
    );
    if let Some(f) = &r.flat {
        let size = human_bytes(f.volume_bytes as i64);
        row(
            format!(
                "allocated, {size} sparse ({} ranges)",
                2 * f.writes_per_snapshot
            ),
            &f.allocated,
        );
        row(format!("delta, {size} sparse"), &f.delta);
    }
    let _ = writeln!(
        table,
        "every rewritten range inside the delta: {}",
        r.delta_covers_every_write
    );
    (table, figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_slots_are_distinct_and_spread() {
        for slots in [1u64, 2, 10, 163_840, 1 << 24] {
            let count = slots.min(5000);
            let mut seen: Vec<u64> = scattered(slots, count, 0).collect();
            assert_eq!(seen.len() as u64, count);
            assert!(seen.iter().all(|s| *s < slots));
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, count, "distinct for {slots}");
        }
        // The second batch continues the first: no slot twice.
        let a: Vec<u64> = scattered(1000, 300, 0).collect();
        let b: Vec<u64> = scattered(1000, 300, 300).collect();
        assert!(a.iter().all(|s| !b.contains(s)));
        // More than there are: all of them, once.
        assert_eq!(scattered(10, 50, 0).count(), 10);
        assert_eq!(scattered(10, 5, 8).count(), 2);
    }

    #[test]
    fn coverage_is_checked_range_by_range() {
        let ranges = [(0, 4096), (65536, 131_072)];
        assert!(covered(&ranges, &[0, 65536, 131_072], 4096));
        assert!(!covered(&ranges, &[4096], 4096));
        assert!(
            !covered(&ranges, &[196_608 - 2048], 4096),
            "runs past the end"
        );
        assert!(!covered(&[], &[0], 1));
        assert!(covered(&[], &[], 1));
    }

    #[test]
    fn the_buffer_is_aligned() {
        let b = Aligned::new(65536, 7);
        assert_eq!(b.bytes().as_ptr() as usize % 4096, 0);
        assert_eq!(b.bytes().len(), 65536);
        assert!(b.bytes().iter().all(|x| *x == 7));
    }
}
