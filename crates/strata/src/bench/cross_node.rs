//! `strata bench cross-node`: a volume holding data on one node, snapshotted, restored on
//! another over the peer service, `copies` restores at once; the copy's throughput beside
//! a plain TCP stream of the same bytes over the same link (to a `strata bench tcp-sink`
//! on the restoring node's side), and each server's memory growth. The restored data is
//! read back and checked.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::cpu::Floor;
use super::snapshot::{checksum, data_path, write_pattern};
use super::{
    Outcome, Run, blocking, bring_up, create_snapshot, delete_snapshot, delete_volume,
    mount_existing, offer, peak_kib, rss_kib, tear_down, volume_request,
};
use crate::client::Csi;
use crate::units::human_bytes;

#[derive(Debug, Clone, clap::Args)]
pub struct CrossNodeArgs {
    /// The size of the source volume.
    #[arg(long, default_value = "4Gi", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// The data written into it (what travels).
    #[arg(long, default_value = "1Gi", value_parser = crate::units::parse_size)]
    pub data: u64,
    /// Restores run at once on the destination.
    #[arg(long, default_value_t = 1)]
    pub copies: usize,
    /// Directory for staging and target paths.
    #[arg(long, default_value = "/tmp/strata-bench")]
    pub workdir: PathBuf,
    /// A `strata bench tcp-sink` reached over the same link: the same bytes sent there over
    /// plain TCP, as the baseline.
    #[arg(long)]
    pub baseline: Option<SocketAddr>,
    /// A `strata bench tcp-sink --tls-dir` reached over the same link: the same bytes sent
    /// there over TLS with the peer certificates (needs --peer-tls-dir).
    #[arg(long, requires = "peer_tls_dir")]
    pub tls_baseline: Option<SocketAddr>,
    /// The peer certificates, for --tls-baseline.
    #[arg(long)]
    pub peer_tls_dir: Option<PathBuf>,
    /// Also write the same bytes into a file in the workdir and flush them (on the
    /// destination's disk when the workdir is), as the disk's baseline: a copy cannot
    /// outrun the disk it lands on.
    #[arg(long)]
    pub disk_baseline: bool,
    /// The source and destination servers' process ids, for their memory growth.
    #[arg(long)]
    pub from_pid: Option<u32>,
    #[arg(long)]
    pub to_pid: Option<u32>,
}

#[derive(Serialize)]
struct CrossNodeReport {
    data_bytes: u64,
    copies: usize,
    seconds: f64,
    mib_per_second: f64,
    baseline_mib_per_second: Option<f64>,
    tls_mib_per_second: Option<f64>,
    disk_mib_per_second: Option<f64>,
    verified: bool,
    source_rss_growth_kib: Option<u64>,
    destination_rss_growth_kib: Option<u64>,
    /// The machine's busy CPU seconds per GiB moved, in each measurement.
    cpu: CpuReport,
}

/// What moving one GiB cost the machine (all its cores, both servers and the link), and
/// what that leaves for TLS on these cores.
#[derive(Serialize)]
struct CpuReport {
    cores: usize,
    copy_core_seconds_per_gib: Option<f64>,
    tcp_core_seconds_per_gib: Option<f64>,
    tls_core_seconds_per_gib: Option<f64>,
    /// What no copy over TLS can skip, per GiB on one core.
    floor: Floor,
}

impl CpuReport {
    /// The lines of the report, and whether a copy over TLS could reach `share` of plain
    /// TCP's speed here at all (when the figures say): at that speed the machine has
    /// cores / speed core-seconds for each GiB, in which plain TCP's own cost and the
    /// floor must fit, even if the work spread perfectly over every core.
    fn lines(&self, tcp_mib_per_second: Option<f64>, share: f64) -> (String, Option<bool>) {
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let mut out = format!(
            "machine CPU per GiB moved ({} cores, shared by both servers, the link and the bench): copy {}, plain TCP {}, TLS {} core-s\n",
            self.cores,
            fmt(self.copy_core_seconds_per_gib),
            fmt(self.tcp_core_seconds_per_gib),
            fmt(self.tls_core_seconds_per_gib),
        );
        let f = &self.floor;
        out.push_str(&format!(
            "what no copy over TLS can skip, per GiB on one core: AES-256-GCM sealing and opening {:.2}, reading and writing the data {:.2}, CRC-32 on both sides {:.2}: {:.2} core-s\n",
            f.aead, f.copies, f.crc, f.total()
        ));
        let (Some(tcp), Some(tcp_cost)) = (tcp_mib_per_second, self.tcp_core_seconds_per_gib)
        else {
            return (out, None);
        };
        let budget = self.cores as f64 / (share * tcp / 1024.0);
        let least = tcp_cost + f.total();
        let reachable = least <= budget;
        out.push_str(&format!(
            "{:.0}% of plain TCP's speed leaves {budget:.2} core-s per GiB on these cores; plain TCP and that work need at least {least:.2}: {}\n",
            share * 100.0,
            if reachable {
                "a copy could reach it"
            } else {
                "no copy over TLS can reach it on this machine"
            }
        ));
        (out, Some(reachable))
    }
}

/// The share of plain TCP's speed a copy is meant to reach.
const GOAL: f64 = 0.8;

/// A baseline's speed (MiB/s) and the machine's busy seconds while it ran.
async fn measured_baseline(
    what: &str,
    run: impl FnOnce() -> std::io::Result<f64> + Send + 'static,
) -> Result<(f64, Option<f64>), String> {
    blocking(what, move || {
        let (speed, busy) = super::cpu::measured(run);
        speed.map(|s| (s, busy))
    })
    .await
}

/// Sends `bytes` on `stream`, ends the sending with `end`, and waits for the sink's count:
/// MiB/s.
fn send_counted<S: Read + Write>(
    stream: &mut S,
    bytes: u64,
    end: impl FnOnce(&mut S) -> std::io::Result<()>,
) -> std::io::Result<f64> {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    end(stream)?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    let seconds = start.elapsed().as_secs_f64();
    if u64::from_le_bytes(count) != bytes {
        return Err(std::io::Error::other("the sink counted other bytes"));
    }
    Ok(bytes as f64 / (1 << 20) as f64 / seconds)
}

/// Sends `bytes` to a tcp-sink at `addr` and waits for its count: MiB/s.
fn tcp_baseline(addr: SocketAddr, bytes: u64) -> std::io::Result<f64> {
    let mut stream = TcpStream::connect(addr)?;
    send_counted(&mut stream, bytes, |s| {
        s.shutdown(std::net::Shutdown::Write)
    })
}

/// Sends `bytes` over TLS, as one node's peer certificate to another's, to a tcp-sink with
/// `--tls-dir` at `addr`: MiB/s. What the encryption alone leaves of the link.
fn tls_baseline(
    addr: SocketAddr,
    bytes: u64,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<f64> {
    let name = rustls::pki_types::ServerName::try_from(crate::peer::tls::SERVER_NAME)
        .map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, TcpStream::connect(addr)?);
    send_counted(&mut stream, bytes, |s| {
        s.conn.send_close_notify();
        s.flush()
    })
}

/// Writes `bytes` into a new file at `path`, flushes it, removes it: MiB/s.
fn disk_baseline(path: PathBuf, bytes: u64) -> std::io::Result<f64> {
    let start = Instant::now();
    let written = write_pattern(&path, bytes, 3).and_then(|_| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .sync_all()
    });
    let seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    written.map(|()| bytes as f64 / (1 << 20) as f64 / seconds)
}

/// Reads `stream` to its end and answers the count.
fn count<S: Read + Write>(stream: &mut S) -> Result<(), String> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => return Err(e.to_string()),
        }
    }
    stream
        .write_all(&total.to_le_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| e.to_string())
}

/// `strata bench tcp-sink`: counts what each connection sends and answers the count; over
/// TLS with the peer certificates when `tls` is given.
pub fn tcp_sink(
    listen: SocketAddr,
    connections: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("listen on {listen}: {e}"))?;
    eprintln!("tcp-sink listening on {listen}");
    for _ in 0..connections.max(1) {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        match &tls {
            None => count(&mut { stream })?,
            Some(config) => {
                let conn =
                    rustls::ServerConnection::new(config.clone()).map_err(|e| e.to_string())?;
                count(&mut rustls::StreamOwned::new(conn, stream))?
            }
        }
    }
    Ok(())
}

/// Runs the scenario; what it made on either node is undone if it stops part-way.
pub async fn cross_node(from: Csi, to: Csi, args: CrossNodeArgs) -> Result<Outcome, String> {
    let (run_a, run_b) = (Run::default(), Run::default());
    let (mut undo_a, mut undo_b) = (from.clone(), to.clone());
    let result = measure(from, to, &run_a, &run_b, &args).await;
    if let Err(e) = result {
        let mut left = run_b.undo(&mut undo_b).await;
        left.extend(run_a.undo(&mut undo_a).await);
        return Err(match left.first() {
            None => format!("{e} (what the run had made is undone)"),
            Some(first) => format!(
                "{e}; {} steps could not be undone, first: {first}",
                left.len()
            ),
        });
    }
    result
}

async fn measure(
    mut from: Csi,
    mut to: Csi,
    run_a: &Run,
    run_b: &Run,
    args: &CrossNodeArgs,
) -> Result<Outcome, String> {
    let offer_a = offer(&mut from).await?;
    let offer_b = offer(&mut to).await?;
    if !offer_a.snapshots {
        return Ok(Outcome::Skipped(
            "the source does not offer snapshots".into(),
        ));
    }
    std::fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let cap = super::raw_block();
    let name = format!("crossnode-{}", std::process::id());
    let src = bring_up(
        &mut from,
        run_a,
        &offer_a,
        &cap,
        name.clone(),
        args.size,
        &args.workdir,
    )
    .await?;
    let sum = {
        let (file, data) = (data_path(&src.target, true), args.data);
        blocking("write", move || write_pattern(&file, data, 7)).await?
    };
    let snap = create_snapshot(&mut from, run_a, src.id.clone(), name.clone()).await?;
    tear_down(&mut from, run_a, &offer_a, src).await?;

    let before = (
        args.from_pid.and_then(rss_kib),
        args.to_pid.and_then(rss_kib),
    );
    let clock = super::cpu::BusyClock::start();
    let start = Instant::now();
    let mut tasks = vec![];
    for i in 0..args.copies.max(1) {
        let mut to = to.clone();
        let request = volume_request(
            format!("{name}-copy-{i}"),
            args.size,
            &cap,
            Some(&snap.snapshot_id),
        );
        tasks.push(async move { to.controller.create_volume(request).await });
    }
    let mut restored = vec![];
    let mut failed = None;
    for answer in futures_join(tasks).await {
        match answer {
            Ok(r) => {
                let vol = r.into_inner().volume.unwrap_or_default();
                run_b.made(super::Step::Volume(vol.volume_id.clone()));
                restored.push(vol.volume_id);
            }
            Err(s) => failed = Some(format!("a restore failed: {:?}: {}", s.code(), s.message())),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let copy_busy = clock.spent();
    if let Some(e) = failed {
        return Err(e);
    }
    let growth = |pid: Option<u32>, before: Option<u64>| {
        pid.and_then(peak_kib)
            .zip(before)
            .map(|(peak, b)| peak.saturating_sub(b))
    };
    let (source_growth, destination_growth) = (
        growth(args.from_pid, before.0),
        growth(args.to_pid, before.1),
    );
    let data = args.data;
    let (baseline, tcp_busy) = match args.baseline {
        Some(addr) => {
            let (speed, busy) =
                measured_baseline("tcp baseline", move || tcp_baseline(addr, data)).await?;
            (Some(speed), busy)
        }
        None => (None, None),
    };
    let (tls, tls_busy) = match (args.tls_baseline, &args.peer_tls_dir) {
        (Some(addr), Some(dir)) => {
            let config = crate::peer::tls::PeerTls::load(dir)?.rustls_client(&[])?;
            let (speed, busy) =
                measured_baseline("tls baseline", move || tls_baseline(addr, data, config)).await?;
            (Some(speed), busy)
        }
        _ => (None, None),
    };
    let per_gib = |busy: Option<f64>, bytes| busy.map(|b| super::cpu::per_gib(b, bytes));
    let floor = blocking("floor", || Ok(Floor::measure(256 << 20))).await?;
    let cpu = CpuReport {
        cores: super::cpu::cores(),
        copy_core_seconds_per_gib: per_gib(copy_busy, total_bytes(args)),
        tcp_core_seconds_per_gib: per_gib(tcp_busy, args.data),
        tls_core_seconds_per_gib: per_gib(tls_busy, args.data),
        floor,
    };
    let disk = match args.disk_baseline {
        true => Some({
            let (path, data) = (args.workdir.join(format!("{name}.disk")), args.data);
            blocking("disk baseline", move || disk_baseline(path, data)).await?
        }),
        false => None,
    };
    // The first copy holds the data.
    let first = restored.first().cloned().ok_or("no restore ran")?;
    let dst = mount_existing(&mut to, run_b, &offer_b, &cap, first, &args.workdir).await?;
    let copied = {
        let (file, data) = (data_path(&dst.target, true), args.data);
        blocking("read back", move || checksum(&file, data)).await?
    };
    tear_down(&mut to, run_b, &offer_b, dst).await?;
    for id in restored.into_iter().skip(1) {
        delete_volume(&mut to, run_b, id).await?;
    }
    delete_snapshot(&mut from, run_a, snap.snapshot_id).await?;

    let total = total_bytes(args);
    let report = CrossNodeReport {
        data_bytes: args.data,
        copies: args.copies.max(1),
        seconds,
        mib_per_second: total as f64 / (1 << 20) as f64 / seconds,
        baseline_mib_per_second: baseline,
        tls_mib_per_second: tls,
        disk_mib_per_second: disk,
        verified: copied == sum,
        source_rss_growth_kib: source_growth,
        destination_rss_growth_kib: destination_growth,
        cpu,
    };
    let mut table = format!(
        "cross-node restore: {} of data in a {} volume, {} at once: {:.2} s, {:.1} MiB/s\n",
        human_bytes(args.data as i64),
        human_bytes(args.size as i64),
        report.copies,
        seconds,
        report.mib_per_second
    );
    let mut figures = vec![("restore MiB/s".to_owned(), report.mib_per_second)];
    if let Some(b) = baseline {
        table.push_str(&format!(
            "plain TCP over the same link: {b:.1} MiB/s; the copy reaches {:.0}% of it\n",
            100.0 * report.mib_per_second / b
        ));
        figures.push(("plain TCP MiB/s".to_owned(), b));
    }
    if let Some(t) = tls {
        table.push_str(&format!(
            "TLS with the peer certificates over the same link: {t:.1} MiB/s; the copy reaches {:.0}% of it{}\n",
            100.0 * report.mib_per_second / t,
            baseline.map_or(String::new(), |b| format!(" (TLS alone: {:.0}% of plain TCP)", 100.0 * t / b))
        ));
        figures.push(("TLS MiB/s".to_owned(), t));
    }
    if let Some(d) = disk {
        table.push_str(&format!(
            "the same bytes written and flushed to the workdir's disk: {d:.1} MiB/s; the copy reaches {:.0}% of the slower of the link and the disk\n",
            100.0 * report.mib_per_second / baseline.map_or(d, |b| b.min(d))
        ));
        figures.push(("disk write+flush MiB/s".to_owned(), d));
    }
    for (who, g) in [
        ("source", source_growth),
        ("destination", destination_growth),
    ] {
        if let Some(kib) = g {
            table.push_str(&format!(
                "{who} server memory grew by {:.1} MiB (peak)\n",
                kib as f64 / 1024.0
            ));
            figures.push((format!("{who} RSS growth MiB"), kib as f64 / 1024.0));
        }
    }
    let (cpu_lines, _) = report.cpu.lines(baseline, GOAL);
    table.push_str(&cpu_lines);
    for (what, v) in [
        ("copy core-s/GiB", report.cpu.copy_core_seconds_per_gib),
        ("plain TCP core-s/GiB", report.cpu.tcp_core_seconds_per_gib),
        ("TLS core-s/GiB", report.cpu.tls_core_seconds_per_gib),
        ("floor core-s/GiB", Some(report.cpu.floor.total())),
    ] {
        if let Some(v) = v {
            figures.push((what.to_owned(), v));
        }
    }
    table.push_str(&format!("restored data verified: {}\n", report.verified));
    let failure =
        (!report.verified).then(|| "the restored volume did not hold the data".to_owned());
    Ok(Outcome::measured(&report, table, figures).failed(failure))
}

/// The bytes all copies move.
fn total_bytes(args: &CrossNodeArgs) -> u64 {
    args.data * args.copies.max(1) as u64
}

/// Runs the futures at once and returns their answers in order.
async fn futures_join<F: std::future::Future + Send + 'static>(tasks: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    let mut out = vec![];
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_lines_say_whether_tls_can_reach_the_goal() {
        let mut cpu = CpuReport {
            cores: 2,
            copy_core_seconds_per_gib: Some(2.0),
            tcp_core_seconds_per_gib: Some(0.7),
            tls_core_seconds_per_gib: Some(1.4),
            floor: Floor {
                aead: 0.25,
                copies: 0.2,
                crc: 0.1,
            },
        };
        // 2200 MiB/s: 80% leaves 2 / 1.72 = 1.16 core-s per GiB; 0.7 + 0.55 does not fit.
        let (text, reachable) = cpu.lines(Some(2200.0), GOAL);
        assert_eq!(reachable, Some(false), "{text}");
        assert!(text.contains("1.16") && text.contains("1.25"), "{text}");
        assert!(text.contains(": 0.55 core-s"), "{text}");
        // On a slower link the same costs fit.
        assert_eq!(cpu.lines(Some(1000.0), GOAL).1, Some(true));
        // Without a baseline or its cost nothing is concluded.
        assert_eq!(cpu.lines(None, GOAL).1, None);
        cpu.tcp_core_seconds_per_gib = None;
        let (text, reachable) = cpu.lines(Some(2200.0), GOAL);
        assert_eq!(reachable, None);
        assert!(text.contains("plain TCP -"), "{text}");
    }
}
