//! `strata serve`: opens the pool, binds the endpoint and serves the three CSI services until
//! SIGTERM or SIGINT, letting in-flight requests finish.

use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi_proto::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
};
use strata_core::backend::Backend;
use strata_core::backend::btrfs::btrfs_backend;
use strata_core::backend::dir::dir_backend;
use strata_core::backend::image::ImageBackend;
use strata_core::driver::Startup;
use strata_core::fault::FaultPoints;
use strata_core::model::CopyMethod;
use strata_core::os::{FileId, Host};
use strata_core::pool_image::{POOL_MOUNT_DIR, Released, mount_pool_image, release_pool_image};
use strata_core::{Config, Driver};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use crate::decode_errors::DecodeErrorLayer;
use crate::endpoint::Endpoint;
use crate::http;
use crate::metrics::{Metrics, MetricsLayer};
use crate::service::{
    ControllerService, GroupControllerService, IdentityService, NodeService, Services,
};
use crate::transport::Normalized;
use crate::units::parse_size;

/// The storage backends `--backend` chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Sparse image files attached through loop devices (filesystem or block volumes).
    Image,
    /// btrfs subvolumes with qgroup limits (filesystem volumes; the pool must be on btrfs).
    Btrfs,
    /// Plain directories; sizes are not enforced (filesystem volumes).
    Dir,
}

/// `strata serve`'s options: the command line (and its environment variables), checked
/// all together by [`ServeOptions::validate`] before anything is created or mounted.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// Where to listen: unix:///PATH (mode 0600) or tcp://127.0.0.1:PORT.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Endpoint,
    /// This node's id, as reported by NodeGetInfo and in volume topology.
    #[arg(long, env = "NODE_ID")]
    pub node_id: String,
    /// Pool directory holding the volumes (created if missing).
    #[arg(long)]
    pub pool: PathBuf,
    /// CSI driver name.
    #[arg(long, default_value = "strata.csi.dev")]
    pub driver_name: String,
    /// Maximum volumes per node reported to the orchestrator (0: no limit).
    #[arg(long = "max-volumes", default_value_t = 0)]
    pub max_volumes: i64,
    /// Topology key naming this node (default: <driver-name>/node).
    #[arg(long)]
    pub topology_key: Option<String>,
    /// Create (once) and mount an xfs filesystem with reflink on a sparse image of this
    /// size inside the pool directory, so snapshots are instant on any host filesystem.
    #[arg(long, value_parser = parse_size)]
    pub pool_image: Option<u64>,
    /// Storage backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Image)]
    pub backend: BackendKind,
    /// Directory staging and target paths must lie under; repeatable. Default: the
    /// kubelet directory (/var/lib/kubelet) and the system temp directory.
    #[arg(long = "allowed-path-prefix")]
    pub allowed_path_prefixes: Vec<PathBuf>,
    /// The longest a group snapshot may keep its volumes' filesystems frozen, in
    /// milliseconds; a group whose copies take longer is thawed and fails (ABORTED).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub freeze_limit_ms: u64,
    /// Serve Prometheus metrics at http://ADDRESS/metrics, e.g. 127.0.0.1:9808.
    #[arg(long)]
    pub metrics_address: Option<SocketAddr>,
    /// Serve a liveness check at http://ADDRESS/healthz (may equal --metrics-address).
    #[arg(long)]
    pub health_address: Option<SocketAddr>,
    /// How long a starting server waits, in seconds, for the pool's lock while another
    /// server holds it (the previous one finishing its in-flight calls after SIGTERM, as in
    /// a rolling update); past it the server exits with an error. 0: do not wait.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub pool_lock_timeout: u64,
    /// Test-only crash point (environment STRATA_CRASH_AT).
    #[arg(skip)]
    pub crash_at: Option<String>,
    /// Test-only delay point, `point=ms` (environment STRATA_DELAY_AT).
    #[arg(skip)]
    pub delay_at: Option<String>,
}

/// The CSI spec's limit on a node id (NodeGetInfoResponse.node_id) and on a driver name.
const MAX_NODE_ID_BYTES: usize = 256;
const MAX_DRIVER_NAME_BYTES: usize = 63;

impl ServeOptions {
    /// Fills in what the environment and the defaults decide: test hooks and the default
    /// allowed path prefixes.
    pub fn with_defaults(mut self) -> Self {
        self.crash_at = std::env::var("STRATA_CRASH_AT").ok();
        self.delay_at = std::env::var("STRATA_DELAY_AT").ok();
        if self.allowed_path_prefixes.is_empty() {
            self.allowed_path_prefixes = vec!["/var/lib/kubelet".into(), std::env::temp_dir()];
        }
        self
    }

    /// Checks every option before any side effect: a bad flag never leaves a half-made pool,
    /// a mounted image or a bound socket behind.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id.is_empty() || self.node_id.len() > MAX_NODE_ID_BYTES {
            return Err(format!(
                "--node-id must be 1 to {MAX_NODE_ID_BYTES} bytes (the Kubernetes node name)"
            ));
        }
        let name_ok = !self.driver_name.is_empty()
            && self.driver_name.len() <= MAX_DRIVER_NAME_BYTES
            && self
                .driver_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            && self
                .driver_name
                .starts_with(|c: char| c.is_ascii_alphanumeric())
            && self
                .driver_name
                .ends_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok {
            return Err(format!(
                "--driver-name {:?} must be 1 to {MAX_DRIVER_NAME_BYTES} characters of letters, digits, '-', '.' and '_', starting and ending with a letter or digit (CSI rule)",
                self.driver_name
            ));
        }
        if let Endpoint::Unix(path) = &self.endpoint {
            check_socket_path(path)?;
        }
        if self.max_volumes < 0 {
            return Err("--max-volumes must be 0 (no limit) or more".into());
        }
        if let Some(key) = &self.topology_key
            && (key.is_empty() || key.len() > 317 || key.contains(char::is_whitespace))
        {
            return Err(format!(
                "--topology-key {key:?} is not a Kubernetes label key"
            ));
        }
        if self.pool_image.is_some() && self.backend == BackendKind::Btrfs {
            return Err(
                "--pool-image makes an xfs pool; the btrfs backend needs a btrfs pool".into(),
            );
        }
        if let Some(size) = self.pool_image
            && size < strata_core::pool_image::MIN_POOL_IMAGE
        {
            return Err(format!(
                "--pool-image must be at least {} MiB (the xfs minimum)",
                strata_core::pool_image::MIN_POOL_IMAGE >> 20
            ));
        }
        if let Some(p) = self.allowed_path_prefixes.iter().find(|p| !p.is_absolute()) {
            return Err(format!(
                "--allowed-path-prefix {} must be an absolute path",
                p.display()
            ));
        }
        if let Some(p) = self
            .allowed_path_prefixes
            .iter()
            .find(|p| p.as_path() == Path::new("/"))
        {
            return Err(format!(
                "--allowed-path-prefix {} would allow every path on the node; name the directories the orchestrator uses",
                p.display()
            ));
        }
        Ok(())
    }
}

/// The longest unix socket path: `sun_path` holds 108 bytes, the last one its NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Checks, before anything is made, that a unix socket can be bound at `path`: short
/// enough for `sun_path`, in a directory that exists and that this process may write.
fn check_socket_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(format!(
            "--endpoint: the socket path is {len} bytes; a unix socket path may be at most {MAX_SOCKET_PATH_BYTES} bytes (sun_path): choose a shorter one"
        ));
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| "--endpoint: the socket path names no directory".to_owned())?;
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(format!("--endpoint: {} is not a directory", dir.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "--endpoint: the socket's directory {} does not exist; create it first",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("--endpoint: {}: {e}", dir.display())),
    }
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "--endpoint: the socket path contains NUL".to_owned())?;
    // SAFETY: access(2) on a NUL-terminated path we own.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!(
            "--endpoint: the socket's directory {} is not writable: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

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
        std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
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
pub fn open_driver(opts: &ServeOptions) -> Result<(Driver, Startup, PoolLock), String> {
    opts.validate()?;
    fs::create_dir_all(&opts.pool)
        .map_err(|e| format!("create pool {}: {e}", opts.pool.display()))?;
    let dir = fs::canonicalize(&opts.pool)
        .map_err(|e| format!("resolve pool {}: {e}", opts.pool.display()))?;
    let lock = lock_pool_waiting(&dir, Duration::from_secs(opts.pool_lock_timeout))?;
    let host = Host::linux();
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

/// Starts the metrics and health endpoints (one listener when they share an address).
async fn serve_http(
    opts: &ServeOptions,
    driver: &Arc<Driver>,
    metrics: &Arc<Metrics>,
) -> Result<(), String> {
    let mut addresses: Vec<(SocketAddr, bool, bool)> = vec![];
    if let Some(a) = opts.metrics_address {
        addresses.push((a, true, false));
    }
    if let Some(a) = opts.health_address {
        match addresses.iter_mut().find(|(addr, _, _)| *addr == a) {
            Some(entry) => entry.2 = true,
            None => addresses.push((a, false, true)),
        }
    }
    for (addr, serves_metrics, health) in addresses {
        let listener = http::bind(addr).await?;
        tracing::info!(%addr, metrics = serves_metrics, health, "serving HTTP");
        tokio::spawn(http::serve(
            listener,
            http::Endpoints {
                driver: driver.clone(),
                metrics: serves_metrics.then(|| metrics.clone()),
                health,
            },
        ));
    }
    Ok(())
}

/// The unix socket this process bound, identified by device and inode: removed at exit only
/// if it is still this one (a newer server may have replaced it).
struct OwnedSocket {
    path: PathBuf,
    id: FileId,
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        if FileId::of(&self.path).ok() == Some(self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the CSI socket: refuses a path where a live server answers, replaces a stale
/// socket, and never lets the socket exist with a mode wider than 0600 (bound in a private
/// directory, then renamed into place).
fn bind_socket(path: &Path) -> Result<(std::os::unix::net::UnixListener, OwnedSocket), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "another server answers on {}; stop it first or choose another --endpoint",
                    path.display()
                ));
            }
            // Stale: replaced by the rename below.
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to overwrite it",
                path.display()
            ));
        }
        Err(_) => {}
    }
    let parent = path
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", path.display()))?;
    // A name no other process uses: only what this process made is removed below.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let private = parent.join(format!(".strata-{}-{nanos:08x}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| format!("create {}: {e}", private.display()))?;
    let bound = (|| {
        let tmp = private.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .map_err(|e| format!("bind {}: {e}", path.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        fs::rename(&tmp, path)
            .map_err(|e| format!("move the socket to {}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("socket {}: {e}", path.display()))?;
        let id = FileId::of(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
        Ok((
            listener,
            OwnedSocket {
                path: path.to_owned(),
                id,
            },
        ))
    })();
    let _ = fs::remove_dir_all(&private);
    bound
}

/// How long in-flight requests may run after SIGTERM before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
}

/// The gRPC router: the three CSI services over `driver`, behind the metrics and
/// decode-error layers.
pub type CsiRouter = Router<Stack<DecodeErrorLayer, Stack<MetricsLayer, Identity>>>;

pub fn csi_router(driver: Arc<Driver>, metrics: Arc<Metrics>) -> CsiRouter {
    let services = Services {
        driver,
        version: env!("CARGO_PKG_VERSION"),
    };
    // Outermost: metrics record the status the caller finally sees.
    Server::builder()
        .layer(MetricsLayer(metrics))
        .layer(DecodeErrorLayer)
        .add_service(IdentityServer::new(IdentityService(services.clone())))
        .add_service(ControllerServer::new(ControllerService(services.clone())))
        .add_service(GroupControllerServer::new(GroupControllerService(
            services.clone(),
        )))
        .add_service(NodeServer::new(NodeService(services)))
}

pub async fn serve(opts: ServeOptions) -> Result<(), String> {
    opts.validate()?;
    // A TCP address that cannot be bound fails now, before the pool is touched.
    let tcp = match &opts.endpoint {
        Endpoint::Tcp(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("--endpoint: cannot listen on tcp://{addr}: {e}"))?,
        ),
        Endpoint::Unix(_) => None,
    };
    let (driver, startup, _pool_lock) = open_driver(&opts)?;
    let driver = Arc::new(driver);
    let metrics = Metrics::new(&opts.driver_name);
    metrics.record_startup(&startup);
    serve_http(&opts, &driver, &metrics).await?;
    let router = csi_router(driver.clone(), metrics);
    tracing::info!(endpoint = ?opts.endpoint, node_id = %opts.node_id, driver = %opts.driver_name,
        backend = driver.backend_kind(), "serving CSI");
    let result = match &opts.endpoint {
        Endpoint::Unix(path) => {
            let (listener, socket) = bind_socket(path)?;
            let listener = UnixListener::from_std(listener)
                .map_err(|e| format!("listen on {}: {e}", path.display()))?;
            // Clients put anything in `:authority` on a unix socket; see `transport`.
            let incoming = UnixListenerStream::new(listener).map(|c| c.map(Normalized::new));
            let result = serve_until_stopped(router, incoming).await;
            drop(socket);
            result
        }
        Endpoint::Tcp(addr) => {
            let listener = tcp
                .map(TcpListener::from_std)
                .transpose()
                .map_err(|e| format!("listen on {addr}: {e}"))?
                .ok_or_else(|| format!("no listener for {addr}"))?;
            serve_until_stopped(router, TcpListenerStream::new(listener)).await
        }
    };
    // Let queued removals of deleted volumes finish before exiting.
    driver.shut_down();
    tracing::info!("stopped");
    result
}

/// Serves until a shutdown signal, then lets in-flight requests finish, for at most
/// [`SHUTDOWN_GRACE`] so a client that never closes its connection cannot hold the exit.
async fn serve_until_stopped<S, IO, IE>(router: CsiRouter, incoming: S) -> Result<(), String>
where
    S: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown_signal().await;
        let _ = stopping_tx.send(());
    });
    tokio::select! {
        result = server => result.map_err(|e| format!("serve: {e}")),
        _ = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("shutdown grace period over; exiting with connections still open");
            Ok(())
        }
    }
}
