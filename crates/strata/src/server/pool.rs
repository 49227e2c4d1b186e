//! The pool: one server per pool (its lock, waited for while a predecessor finishes),
//! opened, mounted (`--pool-image`) and reconciled into a driver; `strata pool release`.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::backend::Backend;
use strata_core::backend::btrfs::btrfs_backend;
use strata_core::backend::dir::dir_backend;
use strata_core::backend::image::ImageBackend;
use strata_core::driver::Startup;
use strata_core::fault::FaultPoints;
use strata_core::model::CopyMethod;
use strata_core::os::Host;
use strata_core::peer::Peers;
use strata_core::pool_image::{POOL_MOUNT_DIR, Released, mount_pool_image, release_pool_image};
use strata_core::{Config, Driver};

use super::options::{BackendKind, ServeOptions};

/// The pool directory, locked (`flock`) for the life of the process: one server per pool.
pub struct PoolLock {
    _dir: fs::File,
}

/// Tries the pool's lock once: `None` when another process holds it.
fn try_lock(dir: &Path) -> Result<Option<PoolLock>, String> {
    let file = fs::File::open(dir).map_err(|e| format!("open pool {}: {e}", dir.display()))?;
    // SAFETY: flock on a descriptor we own; LOCK_NB makes it fail instead of waiting.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(format!("lock pool {}: {e}", dir.display()))
        };
    }
    Ok(Some(PoolLock { _dir: file }))
}

/// Who holds the pool's lock, as the kernel's lock table (`/proc/locks`) tells it: the
/// process id, in this process's pid namespace, if it is visible there.
fn lock_holder(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let table = fs::read_to_string("/proc/locks").ok()?;
    table.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" before FLOCK.
        let fields: Vec<&str> = line.split_whitespace().take(6).collect();
        let [_, "FLOCK", _, _, pid, file] = fields.as_slice() else {
            return None;
        };
        let mut id = file.split(':');
        let ours = u32::from_str_radix(id.next()?, 16).ok()? == major
            && u32::from_str_radix(id.next()?, 16).ok()? == minor
            && id.next()?.parse::<u64>().ok()? == meta.ino();
        ours.then(|| pid.parse().ok()).flatten()
    })
}

fn pool_in_use(dir: &Path, holder: Option<u32>) -> String {
    format!(
        "pool {} is in use by another strata server{}; stop it first (one server per pool)",
        dir.display(),
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )
}

/// Takes the pool's lock, or fails at once when another server holds it.
pub fn lock_pool(dir: &Path) -> Result<PoolLock, String> {
    try_lock(dir)?.ok_or_else(|| pool_in_use(dir, lock_holder(dir)))
}

/// Takes the pool's lock, waiting up to `timeout` while another server holds it: a new
/// server started while the previous one finishes its in-flight calls serves as soon as
/// that one is gone, instead of exiting and leaving the node unserved.
pub fn lock_pool_waiting(dir: &Path, timeout: Duration) -> Result<PoolLock, String> {
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        if let Some(lock) = try_lock(dir)? {
            if logged {
                tracing::info!(pool = %dir.display(), "the other server is gone; pool locked");
            }
            return Ok(lock);
        }
        let holder = lock_holder(dir);
        if Instant::now() >= deadline {
            return Err(format!(
                "{}; waited {} s (--pool-lock-timeout)",
                pool_in_use(dir, holder),
                timeout.as_secs()
            ));
        }
        if !logged {
            tracing::warn!(pool = %dir.display(), holder_pid = holder, timeout_s = timeout.as_secs(),
                "another strata server holds the pool (finishing its calls?); waiting for it to exit");
            logged = true;
        }
        std::thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
}

/// `strata pool release`: with the pool locked (no server on it), unmounts its image's
/// filesystem and frees the loop device. Reports what it did on stderr.
pub fn release_pool(pool: &Path) -> Result<(), String> {
    let dir = fs::canonicalize(pool).map_err(|e| format!("pool {}: {e}", pool.display()))?;
    let _lock = lock_pool(&dir)?;
    match release_pool_image(&Host::linux(), &dir) {
        Ok(Released::Nothing) => {
            eprintln!(
                "pool {}: no pool image attached; nothing to release",
                dir.display()
            );
            Ok(())
        }
        Ok(Released::Released { device }) => {
            eprintln!(
                "pool {}: unmounted {} and freed {}",
                dir.display(),
                dir.join(POOL_MOUNT_DIR).display(),
                device.display()
            );
            Ok(())
        }
        Err(e) => Err(format!("release pool {}: {e}", dir.display())),
    }
}

/// Appends `p` unless it is there already (a short list of paths, kept in order).
fn add_once(mut all: Vec<PathBuf>, p: PathBuf) -> Vec<PathBuf> {
    if !all.contains(&p) {
        all.push(p);
    }
    all
}

/// Opens (creating if needed) the pool, locks it and reconciles it.
pub fn open_driver(
    opts: &ServeOptions,
    peers: Option<Arc<dyn Peers>>,
) -> Result<(Driver, Startup, PoolLock), String> {
    opts.validate()?;
    fs::create_dir_all(&opts.pool)
        .map_err(|e| format!("create pool {}: {e}", opts.pool.display()))?;
    let dir = fs::canonicalize(&opts.pool)
        .map_err(|e| format!("resolve pool {}: {e}", opts.pool.display()))?;
    let lock = lock_pool_waiting(&dir, Duration::from_secs(opts.pool_lock_timeout))?;
    let host = Host::linux().with_cgroup_root(opts.cgroup_root.clone());
    let pool = match opts.pool_image {
        Some(size) => mount_pool_image(&host, &dir, size)
            .map_err(|e| format!("pool image in {}: {e}", dir.display()))?,
        None => dir.clone(),
    };
    let config = Config {
        driver_name: opts.driver_name.clone(),
        node_id: opts.node_id.clone(),
        topology_key: opts
            .topology_key
            .clone()
            .unwrap_or_else(|| Config::default_topology_key(&opts.driver_name)),
        max_volumes_per_node: opts.max_volumes,
        // Each prefix as given and as resolved now: a request may name either.
        allowed_path_prefixes: opts
            .allowed_path_prefixes
            .iter()
            .flat_map(|p| [p.clone(), fs::canonicalize(p).unwrap_or_else(|_| p.clone())])
            .fold(vec![], add_once),
        forbidden_paths: [opts.pool.clone(), dir.clone()]
            .into_iter()
            .fold(vec![], add_once),
        pool: pool.clone(),
        freeze_limit: std::time::Duration::from_millis(opts.freeze_limit_ms),
        export_limits: strata_core::peer::ExportLimits {
            idle: opts.peer.read_idle(),
            ..Default::default()
        },
    };
    let backend: Arc<dyn Backend> = match opts.backend {
        BackendKind::Image => {
            let image = ImageBackend::new(pool.clone(), host.clone());
            match image.detect_copy_method() {
                Ok(CopyMethod::Reflink) => tracing::info!(pool = %pool.display(),
                    "the pool shares extents: snapshots and clones are instant"),
                Ok(CopyMethod::SparseCopy) => tracing::warn!(pool = %pool.display(),
                    "the pool cannot share extents: snapshots and clones copy the data (O(data)); use --pool-image or a pool on xfs/btrfs for instant ones"),
                Err(e) => return Err(format!("pool {} is not writable: {e}", pool.display())),
            }
            Arc::new(image)
        }
        BackendKind::Dir => Arc::new(dir_backend(pool.clone(), host.clone())),
        BackendKind::Btrfs => {
            Arc::new(btrfs_backend(pool.clone(), host.clone()).map_err(|e| e.to_string())?)
        }
    };
    let started = Instant::now();
    let (driver, report) = Driver::open(
        config,
        host,
        backend,
        FaultPoints::new(opts.crash_at.clone()).with_delay(opts.delay_at.clone()),
        peers,
    )
    .map_err(|e| format!("open pool {}: {e}", opts.pool.display()))?;
    let (v, s) = (&report.volumes, &report.snapshots);
    tracing::info!(
        volumes = v.records,
        snapshots = s.records,
        rolled_back_creates = v.rolled_back_creates.len() + s.rolled_back_creates.len(),
        completed_deletes = v.completed_deletes.len() + s.completed_deletes.len(),
        repaired = v.repaired.len(),
        quarantined = v.quarantined.len() + s.quarantined.len(),
        detached_orphan_loops = report.detached_orphan_loops.len(),
        micros = started.elapsed().as_micros() as u64,
        "pool reconciled"
    );
    Ok((driver, report, lock))
}
