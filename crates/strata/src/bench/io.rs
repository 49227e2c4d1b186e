//! `strata bench io`: the data path. A fixed set of fio-style jobs (4 KiB random read and
//! write at queue depth 32, 1 MiB sequential read and write at depth 8, direct I/O) on a file
//! in a published volume and, in the same run, on a file in a directory of the pool's own
//! filesystem, with the ratio (each job in the order volume, native, native, volume, so that
//! drift weighs on both sides alike). fio runs the jobs where it is installed; otherwise the
//! built-in native-AIO engine does.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::aio::{self, Job};
use super::{Outcome, Run, bring_up, offer, tear_down};
use crate::client::Csi;
use crate::client::shared::CapabilityArgs;
use crate::units::parse_size;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// fio where it is installed, else the built-in engine.
    Auto,
    Fio,
    Builtin,
}

#[derive(clap::Args)]
pub struct IoArgs {
    /// Size of the file the jobs run on.
    #[arg(long, default_value = "1Gi", value_parser = parse_size)]
    pub size: u64,
    /// Seconds per run of a job (with --native-dir, each job runs twice on each side).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// A directory on the pool's filesystem, for the native figures (e.g. the pool).
    #[arg(long)]
    pub native_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Directory for staging and target paths.
    #[arg(long, default_value = "/tmp/strata-bench")]
    pub workdir: PathBuf,
    #[command(flatten)]
    pub capability: CapabilityArgs,
}

/// The jobs, by name.
const JOBS: [(&str, Job); 4] = [
    (
        "randread 4k qd32",
        Job {
            write: false,
            random: true,
            block_size: 4096,
            depth: 32,
            seconds: 0.0,
        },
    ),
    (
        "randwrite 4k qd32",
        Job {
            write: true,
            random: true,
            block_size: 4096,
            depth: 32,
            seconds: 0.0,
        },
    ),
    (
        "read 1m qd8",
        Job {
            write: false,
            random: false,
            block_size: 1 << 20,
            depth: 8,
            seconds: 0.0,
        },
    ),
    (
        "write 1m qd8",
        Job {
            write: true,
            random: false,
            block_size: 1 << 20,
            depth: 8,
            seconds: 0.0,
        },
    ),
];

#[derive(Serialize, Default, Clone, Copy)]
struct Figures {
    iops: f64,
    mib_per_second: f64,
    /// How busy the machine's CPUs were during the job (all of them, 100 = every one).
    cpu_busy_percent: f64,
    /// CPU time the machine spent per I/O (the job's process, the kernel, the loop worker).
    cpu_us_per_io: f64,
}

/// Adds the CPU figures of a job that ran `seconds` between the readings `before` and now.
fn with_cpu(mut f: Figures, before: Option<(u64, u64)>, seconds: f64) -> Figures {
    let ticks_per_second = super::cpu::ticks_per_second();
    if let (Some((busy0, all0)), Some((busy1, all1))) = (before, super::cpu::ticks()) {
        let (busy, all) = (busy1.saturating_sub(busy0), all1.saturating_sub(all0));
        f.cpu_busy_percent = 100.0 * busy as f64 / all.max(1) as f64;
        let ios = f.iops * seconds;
        if ios > 0.0 {
            f.cpu_us_per_io = busy as f64 / ticks_per_second / ios * 1e6;
        }
    }
    f
}

#[derive(Serialize)]
struct Row {
    job: &'static str,
    volume: Figures,
    #[serde(skip_serializing_if = "Option::is_none")]
    native: Option<Figures>,
    /// Volume IOPS over native IOPS (the same as the throughput ratio for one job).
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct IoReport {
    engine: &'static str,
    file_bytes: u64,
    seconds_per_job: f64,
    block: bool,
    rows: Vec<Row>,
}

fn fio_installed() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs one job with fio on `path` (a file, or a block device) and reads its JSON output.
fn with_fio(path: &Path, size: u64, name: &str, job: Job, seconds: f64) -> Result<Figures, String> {
    let rw = match (job.write, job.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let out = Command::new("fio")
        .arg(format!("--name={}", name.replace(' ', "-")))
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--iodepth={}", job.depth))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={seconds}"))
        .args([
            "--ioengine=libaio",
            "--direct=1",
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio's output: {e}"))?;
    let side = &v["jobs"][0][if job.write { "write" } else { "read" }];
    Ok(Figures {
        iops: side["iops"].as_f64().unwrap_or_default(),
        mib_per_second: side["bw_bytes"].as_f64().unwrap_or_default() / (1 << 20) as f64,
        ..Figures::default()
    })
}

fn open_direct(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Fills the first `size` bytes of `path` with data (reads of holes measure nothing).
fn fill(path: &Path, size: u64, block: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = OpenOptions::new().write(true).create(!block).open(path)?;
    let chunk = vec![0x5Au8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

/// Runs one job on `path` (fio, or the built-in engine), with the CPU it cost.
fn run_job(
    path: &Path,
    size: u64,
    seconds: f64,
    fio: bool,
    index: usize,
) -> Result<Figures, String> {
    let (name, job) = JOBS[index];
    let (before, start) = (super::cpu::ticks(), std::time::Instant::now());
    let f = if fio {
        with_fio(path, size, name, job, seconds)?
    } else {
        let file = open_direct(path, false).map_err(|e| format!("open {}: {e}", path.display()))?;
        let done = aio::run(&file, size, Job { seconds, ..job })
            .map_err(|e| format!("{name} on {}: {e}", path.display()))?;
        Figures {
            iops: done.ios as f64 / done.seconds,
            mib_per_second: done.bytes as f64 / done.seconds / (1 << 20) as f64,
            ..Figures::default()
        }
    };
    Ok(with_cpu(f, before, start.elapsed().as_secs_f64()))
}

fn mean(runs: &[Figures]) -> Figures {
    let n = runs.len().max(1) as f64;
    let avg = |f: fn(&Figures) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Figures {
        iops: avg(|f| f.iops),
        mib_per_second: avg(|f| f.mib_per_second),
        cpu_busy_percent: avg(|f| f.cpu_busy_percent),
        cpu_us_per_io: avg(|f| f.cpu_us_per_io),
    }
}

/// Every job on the volume's file and, when there is one, on the native file. With both,
/// each job runs in the order volume, native, native, volume and each side is the mean of
/// its two runs: whatever drifts during a run (the host's caches, a virtual disk's burst
/// allowance) then weighs on both sides alike, which running all of one side first did not.
fn run_all(
    volume: &Path,
    native: Option<&Path>,
    size: u64,
    seconds: f64,
    fio: bool,
) -> Result<(Vec<Figures>, Option<Vec<Figures>>), String> {
    let (mut on_volume, mut on_native) = (vec![], vec![]);
    for i in 0..JOBS.len() {
        let Some(native) = native else {
            on_volume.push(run_job(volume, size, seconds, fio, i)?);
            continue;
        };
        let v1 = run_job(volume, size, seconds, fio, i)?;
        let n1 = run_job(native, size, seconds, fio, i)?;
        let n2 = run_job(native, size, seconds, fio, i)?;
        let v2 = run_job(volume, size, seconds, fio, i)?;
        on_volume.push(mean(&[v1, v2]));
        on_native.push(mean(&[n1, n2]));
    }
    Ok((on_volume, native.map(|_| on_native)))
}

pub async fn io(mut csi: Csi, run: &Run, args: IoArgs) -> Result<Outcome, String> {
    let fio = match args.engine {
        Engine::Fio => true,
        Engine::Builtin => false,
        Engine::Auto => fio_installed(),
    };
    let offer = offer(&mut csi).await?;
    fs::create_dir_all(&args.workdir)
        .map_err(|e| format!("create {}: {e}", args.workdir.display()))?;
    let block = args.capability.block;
    // Room for the file twice over (copy-on-write filesystems such as btrfs need new room for
    // every overwrite until the old extent is freed) plus filesystem overhead.
    let volume_size = (2 * args.size + (64 << 20)).next_multiple_of(1 << 20);
    let m = bring_up(
        &mut csi,
        run,
        &offer,
        &args.capability.to_csi(),
        format!("iobench-{}", std::process::id()),
        volume_size,
        &args.workdir,
    )
    .await?;
    let (size, seconds) = (args.size, args.seconds);
    let target = if block {
        PathBuf::from(&m.target)
    } else {
        Path::new(&m.target).join("iofile")
    };
    let native = args
        .native_dir
        .as_ref()
        .map(|d| d.join(format!(".strata-iobench-{}", std::process::id())));
    let measured = tokio::task::spawn_blocking({
        let (target, native) = (target.clone(), native.clone());
        move || -> Result<(Vec<Figures>, Option<Vec<Figures>>), String> {
            fill(&target, size, block).map_err(|e| format!("fill {}: {e}", target.display()))?;
            let filled = match &native {
                Some(path) => {
                    fill(path, size, false).map_err(|e| format!("fill {}: {e}", path.display()))
                }
                None => Ok(()),
            };
            let measured =
                filled.and_then(|()| run_all(&target, native.as_deref(), size, seconds, fio));
            if let Some(path) = &native {
                let _ = fs::remove_file(path);
            }
            measured
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    if !block {
        let _ = fs::remove_file(&target);
    }
    tear_down(&mut csi, run, &offer, m).await?;
    let (volume, native) = measured?;
    let rows: Vec<Row> = JOBS
        .iter()
        .enumerate()
        .map(|(i, (job, _))| {
            let n = native.as_ref().map(|n| n[i]);
            Row {
                job,
                volume: volume[i],
                native: n,
                ratio: n.filter(|n| n.iops > 0.0).map(|n| volume[i].iops / n.iops),
            }
        })
        .collect();
    let report = IoReport {
        engine: if fio {
            "fio (libaio)"
        } else {
            "built-in (native AIO)"
        },
        file_bytes: size,
        seconds_per_job: seconds,
        block,
        rows,
    };
    let mut table = format!(
        "{} bytes, {} s per job, {}, {}\n{:<20} {:>12} {:>10} {:>12} {:>10} {:>7} {:>17}\n",
        report.file_bytes,
        report.seconds_per_job,
        if block {
            "raw block volume"
        } else {
            "a file in a filesystem volume"
        },
        report.engine,
        "JOB",
        "VOLUME IOPS",
        "MiB/s",
        "NATIVE IOPS",
        "MiB/s",
        "RATIO",
        "CPU us/IO VOL/NAT"
    );
    let mut figures = vec![];
    for r in &report.rows {
        let (ni, nm, nc) = r.native.map_or(("-".into(), "-".into(), "-".into()), |n| {
            (
                format!("{:.0}", n.iops),
                format!("{:.1}", n.mib_per_second),
                format!("{:.1}", n.cpu_us_per_io),
            )
        });
        table.push_str(&format!(
            "{:<20} {:>12.0} {:>10.1} {:>12} {:>10} {:>7} {:>17}\n",
            r.job,
            r.volume.iops,
            r.volume.mib_per_second,
            ni,
            nm,
            r.ratio.map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
            format!("{:.1}/{nc}", r.volume.cpu_us_per_io)
        ));
        figures.push((format!("{} IOPS", r.job), r.volume.iops));
        figures.push((format!("{} MiB/s", r.job), r.volume.mib_per_second));
        figures.push((format!("{} CPU us/IO", r.job), r.volume.cpu_us_per_io));
    }
    Ok(Outcome::measured(&report, table, figures))
}
