//! Test harness: runs the real `strata` binary on a fresh pool and socket in a temp directory,
//! and on drop stops it and removes every mount and loop device it left under that directory,
//! even when the test failed.

#![allow(dead_code)]

pub mod namespaces;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi::volume_capability::{AccessType, BlockVolume, MountVolume, access_mode::Mode};
use csi_proto as csi;
use strata::client::{Csi, connect};
use strata::endpoint::Endpoint;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{AttachOptions, LoopDevices, Mounter, NodePath};
use tempfile::TempDir;

pub const MIB: i64 = 1 << 20;

/// The pools the backend tests run on, each made by the test itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Image backend on the host's filesystem (ext4 here: snapshots by sparse copy).
    ImageOnHost,
    /// Image backend on an xfs pool image (snapshots by reflink).
    ImageOnXfs,
    /// Dir backend on a loop-mounted ext4 filesystem.
    DirOnExt4,
    /// btrfs backend on a loop-mounted btrfs filesystem.
    BtrfsOnBtrfs,
}

impl PoolKind {
    pub fn supports_block(self) -> bool {
        matches!(self, PoolKind::ImageOnHost | PoolKind::ImageOnXfs)
    }
}

pub struct TestEnv {
    pub dir: TempDir,
    child: Option<Child>,
    pub csi: Csi,
    /// Extra `strata serve` arguments, kept for restarts.
    args: Vec<String>,
    /// The network namespace the server runs in, kept for restarts.
    netns: Option<String>,
    /// Extra environment of the server, kept for restarts.
    envs: Vec<(String, String)>,
}

/// Mounts and loop devices under `dir`, as the kernel reports them.
pub fn kernel_state_under(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mounts = LinuxHost
        .mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    let loops = LinuxHost
        .list()
        .unwrap()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(dir))
        .map(|l| l.path)
        .collect();
    (mounts, loops)
}

/// A folder in the test directory whose tools come first on the server's `PATH` (tests put
/// slowed-down copies of mkfs or resize2fs there).
pub const TOOLS_DIR: &str = "slow-bin";

pub fn spawn(dir: &Path, args: &[String], crash_at: Option<&str>) -> Child {
    spawn_in(None, &[], dir, args, crash_at)
}

/// [`spawn`] in the network namespace `netns` (`nsenter --net`, which execs the server, so
/// the child is the server itself; unlike `ip netns exec` it keeps the mount namespace, so
/// the server's mounts are the test's).
pub fn spawn_in(
    netns: Option<&str>,
    envs: &[(String, String)],
    dir: &Path,
    args: &[String],
    crash_at: Option<&str>,
) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .args(["--", env!("CARGO_BIN_EXE_strata")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_strata")),
    };
    cmd.args(["serve", "--max-volumes", "100"]);
    if !args.iter().any(|a| a == "--node-id") {
        cmd.args(["--node-id", "test-node"]);
    }
    cmd.arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .arg("--pool")
        .arg(dir.join("pool"))
        .args(args)
        .env("STRATA_LOG", "debug")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .env(
            "PATH",
            format!(
                "{}:{}",
                dir.join(TOOLS_DIR).display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    match crash_at {
        // `delay:POINT=MS` arms a delay point instead of a crash point.
        Some(p) if p.starts_with("delay:") => cmd.env("STRATA_DELAY_AT", &p["delay:".len()..]),
        Some(p) => cmd.env("STRATA_CRASH_AT", p),
        None => cmd.env_remove("STRATA_CRASH_AT"),
    };
    cmd.spawn().expect("start strata")
}

/// Waits until the server `child` answers on `socket`.
pub async fn wait_for(socket: &Path, child: &mut Child) -> Csi {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if socket.exists()
            && let Ok(csi) = connect(&Endpoint::Unix(socket.to_path_buf())).await
        {
            return csi;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("strata exited early: {status}");
        }
        assert!(Instant::now() < deadline, "strata did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    pub async fn start_with(crash_at: Option<&str>) -> Self {
        Self::start_with_args(&[], crash_at).await
    }

    /// Starts the server on a pool of the given kind (see [`PoolKind`]).
    pub async fn start_pool(kind: PoolKind) -> Self {
        match kind {
            PoolKind::ImageOnHost => Self::start().await,
            PoolKind::ImageOnXfs => Self::start_with_args(&["--pool-image", "1Gi"], None).await,
            PoolKind::DirOnExt4 => Self::start_on_fs("ext4", &["--backend", "dir"]).await,
            PoolKind::BtrfsOnBtrfs => Self::start_on_fs("btrfs", &["--backend", "btrfs"]).await,
        }
    }

    /// Makes a filesystem of `fs_type` on a sparse image in the test directory, mounts it as
    /// the pool, and starts the server there.
    async fn start_on_fs(fs_type: &str, args: &[&str]) -> Self {
        Self::start_on_fs_sized(fs_type, 2 << 30, args).await
    }

    /// Like [`start_pool`](Self::start_pool) on a fresh `fs_type` filesystem of `bytes`.
    pub async fn start_on_fs_sized(fs_type: &str, bytes: u64, args: &[&str]) -> Self {
        Self::start_on_fs_in(None, fs_type, bytes, args).await
    }

    /// [`start_on_fs_sized`](Self::start_on_fs_sized), the server in the network namespace
    /// `netns`.
    pub async fn start_on_fs_in(
        netns: Option<&str>,
        fs_type: &str,
        bytes: u64,
        args: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("strata-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let image = dir.path().join("pool-fs.img");
        fs::File::create(&image).unwrap().set_len(bytes).unwrap();
        let out = Command::new(format!("mkfs.{fs_type}"))
            .arg(if fs_type == "btrfs" { "-q" } else { "-qF" })
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfs.{fs_type}: {out:?}");
        let pool = dir.path().join("pool");
        fs::create_dir(&pool).unwrap();
        let attached = LinuxHost
            .attach(
                &image,
                AttachOptions {
                    auto_clear: true,
                    read_only: false,
                },
            )
            .unwrap();
        // The pool's own filesystem (btrfs too, which Strata never formats a volume with).
        let mounted = Command::new("mount")
            .args(["-t", fs_type])
            .arg(&attached.device.path)
            .arg(&pool)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount the {fs_type} pool");
        // Auto-clearing: the device goes with the pool's unmount.
        drop(attached);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut child = spawn_in(netns, &[], dir.path(), &args, None);
        let csi = wait_for(&dir.path().join("csi.sock"), &mut child).await;
        TestEnv {
            dir,
            child: Some(child),
            csi,
            args,
            netns: netns.map(str::to_owned),
            envs: vec![],
        }
    }

    /// Starts the server with extra `serve` arguments (kept for restarts).
    pub async fn start_with_args(args: &[&str], crash_at: Option<&str>) -> Self {
        Self::start_in(None, args, crash_at).await
    }

    /// Starts the server in the network namespace `netns` with extra `serve` arguments.
    pub async fn start_in(netns: Option<&str>, args: &[&str], crash_at: Option<&str>) -> Self {
        Self::start_with_env(netns, &[], args, crash_at).await
    }

    /// [`TestEnv::start_in`] with extra environment variables for the server.
    pub async fn start_with_env(
        netns: Option<&str>,
        envs: &[(&str, &str)],
        args: &[&str],
        crash_at: Option<&str>,
    ) -> Self {
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("strata-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut child = spawn_in(netns, &envs, dir.path(), &args, crash_at);
        let csi = wait_for(&dir.path().join("csi.sock"), &mut child).await;
        TestEnv {
            dir,
            child: Some(child),
            csi,
            args,
            netns: netns.map(str::to_owned),
            envs,
        }
    }

    /// Restarts the server on the same pool (after a crash or a stop).
    pub async fn restart(&mut self, crash_at: Option<&str>) {
        self.stop();
        let mut child = spawn_in(
            self.netns.as_deref(),
            &self.envs,
            self.dir.path(),
            &self.args,
            crash_at,
        );
        self.csi = wait_for(&self.dir.path().join("csi.sock"), &mut child).await;
        self.child = Some(child);
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a second server on the same socket and pool, with the same arguments, while
    /// the first may still run (as a rolling update does); see [`TestEnv::adopt`].
    pub fn spawn_successor(&self, extra: &[&str]) -> Child {
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|a| a.to_string()));
        spawn_in(
            self.netns.as_deref(),
            &self.envs,
            self.dir.path(),
            &args,
            None,
        )
    }

    /// Makes `child` the server this environment stops and cleans up after, once the
    /// previous one has exited.
    pub async fn adopt(&mut self, mut child: Child) {
        self.csi = wait_for(&self.dir.path().join("csi.sock"), &mut child).await;
        if let Some(mut old) = self.child.replace(child) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    /// Kills the server with SIGKILL, as a crash does.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for the server to die on its own (a crash point reached in a
    /// background task); whether it did.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Waits for the server to die on its own (after reaching a crash point).
    pub fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        child.wait().unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Where the pool's volumes and snapshots live (inside the pool image when there is one).
    pub fn pool(&self) -> PathBuf {
        let dir = self.dir.path().join("pool");
        if self.args.iter().any(|a| a == "--pool-image") {
            dir.join("data")
        } else {
            dir
        }
    }

    pub fn server_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Asserts that no mount or loop device is left under the test directory.
    pub fn assert_clean(&self) {
        // The pool's own filesystem (a pool image, or one a test made) stays while it runs.
        let pool_dir = self.dir.path().join("pool");
        let pool_images = [
            pool_dir.join("pool.img"),
            self.dir.path().join("pool-fs.img"),
        ];
        // A detached device stays bound until its last opener closes it, and a concurrent
        // test listing devices opens each one for a moment: give the kernel that moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mounts, loops) = loop {
            let (mut mounts, mut loops) = kernel_state_under(self.dir.path());
            mounts.retain(|m| *m != pool_dir.join("data") && *m != pool_dir);
            loops.retain(|l| {
                LinuxHost
                    .list()
                    .unwrap()
                    .iter()
                    .all(|d| d.path != *l || !pool_images.contains(&d.backing_file))
            });
            if loops.is_empty() || Instant::now() >= deadline {
                break (mounts, loops);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        assert!(loops.is_empty(), "loop devices left behind: {loops:?}");
    }

    /// Volume directories in the pool (committed or not), once the background removal of
    /// deleted volumes has settled (it gets 10 seconds).
    pub fn pool_entries(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut v: Vec<String> = fs::read_dir(self.pool().join("volumes"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            if !v.iter().any(|e| e.starts_with(".deleting-")) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.server_log());
        }
        // Deepest mount points first; loop devices of volume images block the pool's own
        // unmount, so detach between passes and repeat.
        for _ in 0..8 {
            let (mut mounts, loops) = kernel_state_under(self.dir.path());
            if mounts.is_empty() && loops.is_empty() {
                break;
            }
            mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for m in mounts {
                let _ = LinuxHost.unmount(&mut NodePath::trusted(&m));
            }
            for dev in LinuxHost.list().unwrap_or_default() {
                if dev.backing_file.starts_with(self.dir.path()) {
                    let _ = LinuxHost.detach(&dev);
                }
            }
        }
    }
}

pub fn mount_cap(fs_type: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

pub fn create_req(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

impl TestEnv {
    pub async fn create(
        &mut self,
        name: &str,
        bytes: i64,
        cap: csi::VolumeCapability,
    ) -> csi::Volume {
        self.csi
            .controller
            .create_volume(create_req(name, bytes, cap))
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
    }

    pub async fn stage(
        &mut self,
        id: &str,
        staging: &str,
        cap: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        node_stage(&mut self.csi, id, staging, cap).await
    }

    pub async fn snapshot(
        &mut self,
        name: &str,
        source: &str,
    ) -> Result<csi::Snapshot, tonic::Status> {
        self.csi
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    pub async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.csi
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&mut self, id: &str, staging: &str) -> Result<(), tonic::Status> {
        node_unstage(&mut self.csi, id, staging).await
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &str,
        target: &str,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        node_publish(&mut self.csi, id, staging, target, cap, readonly).await
    }

    pub async fn unpublish(&mut self, id: &str, target: &str) -> Result<(), tonic::Status> {
        node_unpublish(&mut self.csi, id, target).await
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.csi
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: Default::default(),
            })
            .await
            .map(drop)
    }
}

/// NodeStageVolume as the kubelet sends it, on any client (a server of the test's own).
pub async fn node_stage(
    csi: &mut Csi,
    id: &str,
    staging: &str,
    cap: csi::VolumeCapability,
) -> Result<(), tonic::Status> {
    csi.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .map(drop)
}

pub async fn node_unstage(csi: &mut Csi, id: &str, staging: &str) -> Result<(), tonic::Status> {
    csi.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
        })
        .await
        .map(drop)
}

pub async fn node_publish(
    csi: &mut Csi,
    id: &str,
    staging: &str,
    target: &str,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> Result<(), tonic::Status> {
    csi.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        })
        .await
        .map(drop)
}

pub async fn node_unpublish(csi: &mut Csi, id: &str, target: &str) -> Result<(), tonic::Status> {
    csi.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.into(),
        })
        .await
        .map(drop)
}

/// The size in bytes of the filesystem mounted at `path`.
pub fn fs_size(path: &str) -> u64 {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: statvfs fills the zeroed struct from a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut st) },
        0,
        "statvfs {path}"
    );
    st.f_blocks * st.f_frsize
}

/// The gRPC code of a call's result (`Ok` for success); every error must carry a message.
pub fn code<T>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty(), "every error carries a message");
            s.code()
        }
    }
}

impl TestEnv {
    /// ControllerExpandVolume to `bytes`.
    pub async fn expand(
        &mut self,
        id: &str,
        bytes: i64,
    ) -> Result<csi::ControllerExpandVolumeResponse, tonic::Status> {
        self.csi
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// NodeExpandVolume at `path` to `bytes`; the capacity it answers.
    pub async fn node_expand(
        &mut self,
        id: &str,
        path: &str,
        bytes: i64,
    ) -> Result<i64, tonic::Status> {
        node_expand(&mut self.csi, id, path, "", bytes).await
    }
}

/// NodeExpandVolume as the kubelet sends it: the volume path, the staging path (may be
/// empty) and the new size.
pub async fn node_expand(
    csi: &mut Csi,
    id: &str,
    path: &str,
    staging: &str,
    bytes: i64,
) -> Result<i64, tonic::Status> {
    csi.node
        .node_expand_volume(node_expand_req(id, path, staging, bytes))
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

pub fn node_expand_req(
    id: &str,
    path: &str,
    staging: &str,
    bytes: i64,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: staging.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// Deterministic test data: `len` bytes that differ with `seed`.
/// The next number of a xorshift64 sequence (seeded with anything but 0): cheap, repeatable
/// randomness for tests.
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

pub fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Restores and mounts as a workload does.
impl TestEnv {
    pub async fn restore(
        &mut self,
        name: &str,
        bytes: i64,
        cap: csi::VolumeCapability,
        source: csi::volume_content_source::Type,
    ) -> Result<csi::Volume, tonic::Status> {
        let mut req = create_req(name, bytes, cap);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        self.csi
            .controller
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    /// Stages and publishes at `<name>-stage` and `<name>`, returning the published path.
    pub async fn mount(&mut self, id: &str, name: &str, cap: csi::VolumeCapability) -> String {
        let (staging, target) = (self.path(&format!("{name}-stage")), self.path(name));
        self.stage(id, &staging, cap.clone()).await.unwrap();
        self.publish(id, &staging, &target, cap, false)
            .await
            .unwrap();
        target
    }

    pub async fn unmount(&mut self, id: &str, name: &str) {
        let (staging, target) = (self.path(&format!("{name}-stage")), self.path(name));
        self.unpublish(id, &target).await.unwrap();
        self.unstage(id, &staging).await.unwrap();
    }
}

pub fn snapshot_source(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

/// Asserts that the filesystem holding `path` is not frozen. A freeze of our own is the probe:
/// it fails with EBUSY on a frozen filesystem, and is undone at once (so a failing test does
/// not leave a writer blocked behind it).
pub fn assert_not_frozen(path: &str) {
    use std::os::unix::fs::MetadataExt;
    use strata_core::os::Filesystems;
    let dev = fs::metadata(path).unwrap().dev();
    let fs = LinuxHost
        .open_mounted(Path::new(path), (libc::major(dev), libc::minor(dev)))
        .unwrap();
    match LinuxHost.freeze(&fs) {
        Ok(()) => LinuxHost.thaw(&fs).expect("thaw the probe's freeze"),
        Err(e) => {
            let _ = LinuxHost.thaw(&fs);
            panic!("{path} was left frozen: {e}");
        }
    }
}

/// The plugin services a driver advertises (GetPluginCapabilities), as CSI enum values.
pub async fn plugin_services(csi: &mut Csi) -> Vec<i32> {
    use csi::plugin_capability::Type;
    csi.identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect()
}

/// Fresh peer certificates (`strata peer-certs`) in a new folder under `dir`; its path.
pub fn peer_certs(dir: &Path) -> PathBuf {
    let out = dir.join(format!("tls-{}", fs::read_dir(dir).unwrap().count()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["peer-certs", "--out-dir"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    out
}
