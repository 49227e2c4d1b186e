//! `strata serve`'s options, checked all together before anything is made.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::endpoint::Endpoint;
use crate::peer::PeerOptions;
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
    /// Where the host's cgroup filesystems are (in a container: the host's
    /// /sys/fs/cgroup mounted there): volumes' I/O limits are written into the cgroups of
    /// the pods that publish them.
    #[arg(long, default_value = strata_core::os::DEFAULT_CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
    /// Keep a finalizer on this node's Node object and, while elected by the Lease
    /// `strata-node-loss` (in --peer-namespace), release what a deleted Node held: its
    /// volumes by their StorageClass's `onNodeLoss`, its snapshots' finalizers (docs/
    /// operations.md, "A node lost for good"). Needs the Kubernetes API (in a pod).
    #[arg(long)]
    pub node_loss: bool,
    /// Move volumes between nodes as their claims ask (`strata.csi.dev/move-to: NODE`):
    /// pre-copy while in use, final copy once unused, commit by the PV's node affinity
    /// (Kubernetes' MutablePVNodeAffinity gate; docs/operations.md, "Moving a volume").
    /// Needs the Kubernetes API; pulling volumes here needs the peer service too.
    #[arg(long)]
    pub moves: bool,
    #[command(flatten)]
    pub peer: PeerOptions,
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
        self.peer.validate(&self.node_id)?;
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
