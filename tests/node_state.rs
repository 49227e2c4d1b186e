//! Node state across restarts, races and second servers: the server restarted in a new mount
//! namespace (a new container) with the old one's mounts still live, a second server on the
//! same pool or socket, tools orphaned by a killed server, two volumes racing for one path,
//! and loop devices reused behind the driver's back.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata::client::{Csi, connect};
use strata::endpoint::Endpoint;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{AttachOptions, FileId, LoopDevices, Mounter, NodePath};
use tonic::Code;

/// A "host" for servers in their own mount namespaces: `host/` is a shared mount (as the
/// DaemonSet's Bidirectional hostPath volumes are) holding the pool and a kubelet-like
/// directory, seen at the same path by every namespace; each server sees the pool at a path
/// of its own (as a container sees `/pool`), so the kernel's backing-file paths differ
/// between generations.
struct Host {
    dir: tempfile::TempDir,
    server: Option<Child>,
    pool_image: bool,
    generation: usize,
}

impl Host {
    fn new(pool_image: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("strata-ns-")
            .tempdir_in("/tmp")
            .unwrap();
        let host = dir.path().join("host");
        fs::create_dir_all(host.join("pool")).unwrap();
        fs::create_dir_all(host.join("kubelet")).unwrap();
        run("mount", &["--bind", &s(&host), &s(&host)]);
        run("mount", &["--make-shared", &s(&host)]);
        Host {
            dir,
            server: None,
            pool_image,
            generation: 0,
        }
    }

    fn host(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    fn kubelet(&self, name: &str) -> String {
        s(&self.host().join("kubelet").join(name))
    }

    fn socket(&self) -> PathBuf {
        self.host().join("csi.sock")
    }

    /// Starts a server in a new mount namespace, seeing the pool at `view-N/pool`.
    async fn start(&mut self) -> Csi {
        self.start_crashing_at(None).await
    }

    /// [`start`](Self::start), with the server killing itself at crash point `crash_at`.
    async fn start_crashing_at(&mut self, crash_at: Option<&str>) -> Csi {
        let mut child = self.spawn(crash_at);
        let csi = wait_for(&self.socket(), &mut child).await;
        self.server = Some(child);
        csi
    }

    /// Starts a server in a new mount namespace without waiting for it to serve.
    fn spawn(&mut self, crash_at: Option<&str>) -> Child {
        self.generation += 1;
        let view = self.dir.path().join(format!("view-{}", self.generation));
        fs::create_dir_all(&view).unwrap();
        let mut serve = format!(
            "mount --make-private / && mount --bind {host}/pool {view} && exec {bin} serve --node-id ns-node --endpoint unix://{sock} --pool {view} --allowed-path-prefix {host}/kubelet",
            host = s(&self.host()),
            view = s(&view),
            bin = env!("CARGO_BIN_EXE_strata"),
            sock = s(&self.socket()),
        );
        if self.pool_image {
            serve.push_str(" --pool-image 1Gi");
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut command = Command::new("unshare");
        if let Some(point) = crash_at {
            command.env("STRATA_CRASH_AT", point);
        }
        command
            .args(["-m", "--propagation", "unchanged", "sh", "-c", &serve])
            .env("STRATA_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// SIGKILL: the namespace dies with the process; propagated mounts stay on the host.
    fn kill(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Where the pool's volumes are, as this (the host's) namespace sees them.
    fn pool(&self) -> PathBuf {
        if self.pool_image {
            self.host().join("pool/data")
        } else {
            self.host().join("pool")
        }
    }

    /// Loop devices serving a file, by identity.
    fn devices_of(&self, file: &Path) -> usize {
        let id = FileId::of(file).unwrap();
        LinuxHost
            .list()
            .unwrap()
            .iter()
            .filter(|d| d.backing == id)
            .count()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
        unmount_all_under(self.dir.path());
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    out
}

/// Unmounts everything under `dir` (deepest first) and detaches loop devices serving files
/// under it, by identity.
fn unmount_all_under(dir: &Path) {
    for _ in 0..8 {
        let mut ids = vec![];
        collect_ids(dir, &mut ids);
        let (mut mounts, _) = kernel_state_under(dir);
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &mounts {
            let _ = LinuxHost.unmount(&mut NodePath::trusted(m));
        }
        let loops: Vec<_> = LinuxHost
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| ids.contains(&d.backing) || d.backing_file.starts_with(dir))
            .collect();
        for d in &loops {
            let _ = LinuxHost.detach(d);
        }
        if mounts.is_empty() && loops.is_empty() {
            return;
        }
    }
}

fn collect_ids(dir: &Path, ids: &mut Vec<FileId>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => collect_ids(&p, ids),
            Ok(m) if m.is_file() => ids.extend(FileId::of(&p).ok()),
            _ => {}
        }
    }
}

async fn create(csi: &mut Csi, name: &str, cap: csi::VolumeCapability) -> String {
    csi.controller
        .create_volume(create_req(name, 64 * MIB, cap))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// NodeStageVolume's status code.
async fn node_stage_code(csi: &mut Csi, id: &str, path: &str, cap: csi::VolumeCapability) -> Code {
    code(node_stage(csi, id, path, cap).await)
}

fn write_block(path: &str, offset: u64, data: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_block(path: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

async fn restart_in_a_new_namespace(pool_image: bool) {
    let mut host = Host::new(pool_image);
    let mut csi = host.start().await;
    let fs_cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let blk_cap = block_cap(Mode::SingleNodeWriter);
    let fs_id = create(&mut csi, "fs", fs_cap.clone()).await;
    let blk_id = create(&mut csi, "blk", blk_cap.clone()).await;
    let (fs_stage, fs_pub) = (host.kubelet("stage-fs"), host.kubelet("pub-fs"));
    let (blk_stage, blk_pub) = (host.kubelet("stage-blk"), host.kubelet("pub-blk"));
    assert_eq!(
        node_stage_code(&mut csi, &fs_id, &fs_stage, fs_cap.clone()).await,
        Code::Ok
    );
    node_publish(&mut csi, &fs_id, &fs_stage, &fs_pub, fs_cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        node_stage_code(&mut csi, &blk_id, &blk_stage, blk_cap.clone()).await,
        Code::Ok
    );
    node_publish(
        &mut csi,
        &blk_id,
        &blk_stage,
        &blk_pub,
        blk_cap.clone(),
        false,
    )
    .await
    .unwrap();
    fs::write(format!("{fs_pub}/before"), b"written before the restart").unwrap();
    write_block(&blk_pub, 4096, b"block before");

    // A new container: the old namespace is gone, its mounts live on through propagation.
    host.kill();
    let mut csi = host.start().await;
    if pool_image {
        assert_eq!(
            host.devices_of(&host.host().join("pool/pool.img")),
            1,
            "the pool image is attached once"
        );
    }
    let image = |id: &str| host.pool().join("volumes").join(id).join("image");
    assert_eq!(host.devices_of(&image(&fs_id)), 1);
    assert_eq!(host.devices_of(&image(&blk_id)), 1);
    // Retried calls of the kubelet are no-ops; I/O goes on.
    assert_eq!(
        node_stage_code(&mut csi, &fs_id, &fs_stage, fs_cap.clone()).await,
        Code::Ok
    );
    node_publish(&mut csi, &fs_id, &fs_stage, &fs_pub, fs_cap.clone(), false)
        .await
        .unwrap();
    fs::write(format!("{fs_pub}/after"), b"written after the restart").unwrap();
    assert_eq!(
        fs::read(format!("{fs_pub}/before")).unwrap(),
        b"written before the restart"
    );
    write_block(&blk_pub, 8192, b"block after");
    assert_eq!(read_block(&blk_pub, 4096, 12), b"block before");
    // Snapshot of the live volume, through the new server.
    csi.controller
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "after-restart".into(),
            source_volume_id: fs_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    node_unpublish(&mut csi, &fs_id, &fs_pub).await.unwrap();
    node_unstage(&mut csi, &fs_id, &fs_stage).await.unwrap();
    node_unpublish(&mut csi, &blk_id, &blk_pub).await.unwrap();
    node_unstage(&mut csi, &blk_id, &blk_stage).await.unwrap();
    assert_eq!(host.devices_of(&image(&fs_id)), 0, "detached at unstage");
    assert_eq!(host.devices_of(&image(&blk_id)), 0, "detached at unstage");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image(&fs_id))
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {fsck:?}");
    for id in [&fs_id, &blk_id] {
        csi.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    host.kill();
    if pool_image {
        let data = host.host().join("pool/data");
        for _ in 0..4 {
            let _ = LinuxHost.unmount(&mut NodePath::trusted(&data));
        }
        unmount_all_under(host.dir.path());
        let repair = Command::new("xfs_repair")
            .arg("-n")
            .arg(host.host().join("pool/pool.img"))
            .output()
            .unwrap();
        assert!(repair.status.success(), "xfs_repair -n: {repair:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_a_new_mount_namespace_is_a_non_event() {
    restart_in_a_new_namespace(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_a_new_mount_namespace_is_a_non_event_on_a_pool_image() {
    restart_in_a_new_namespace(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_per_pool_and_one_owner_per_socket() {
    let mut env = TestEnv::start().await;
    let bin = env!("CARGO_BIN_EXE_strata");
    // A second server on the same pool (another socket) told not to wait for it is refused
    // at once (a successor's wait is in server_lifecycle.rs).
    let other_sock = env.path("other.sock");
    let out = Command::new(bin)
        .args([
            "serve",
            "--pool-lock-timeout",
            "0",
            "--node-id",
            "n",
            "--endpoint",
        ])
        .arg(format!("unix://{other_sock}"))
        .arg("--pool")
        .arg(env.dir.path().join("pool"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another strata server"),
        "{out:?}"
    );
    assert!(!Path::new(&other_sock).exists());
    // A second server on the live socket (another pool) is refused; the first still answers.
    let sock = env.path("csi.sock");
    let out = Command::new(bin)
        .args(["serve", "--node-id", "n", "--endpoint"])
        .arg(format!("unix://{sock}"))
        .arg("--pool")
        .arg(env.path("pool2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another server answers"),
        "{out:?}"
    );
    env.create("still-served", 16 * MIB, ext4()).await;
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The first server's socket is replaced behind its back (a newer server took the path):
    // at exit it leaves the newer one in place.
    let moved = env.path("moved.sock");
    fs::rename(&sock, &moved).unwrap();
    let mut newer = Command::new(bin)
        .args(["serve", "--node-id", "n", "--endpoint"])
        .arg(format!("unix://{sock}"))
        .arg("--pool")
        .arg(env.path("pool2"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while connect(&Endpoint::Unix(PathBuf::from(&sock)))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "newer server did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.stop();
    assert!(
        Path::new(&sock).exists(),
        "the newer server's socket is left"
    );
    let mut c = connect(&Endpoint::Unix(PathBuf::from(&sock)))
        .await
        .unwrap();
    c.identity.probe(csi::ProbeRequest {}).await.unwrap();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(newer.id() as i32, libc::SIGTERM) };
    newer.wait().unwrap();
    assert!(!Path::new(&sock).exists(), "removed by its owner");
    // A stale socket (nobody answers) is replaced.
    std::os::unix::net::UnixListener::bind(&sock).unwrap();
    env.restart(None).await;
    env.create("after-stale", 16 * MIB, ext4()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_volumes_racing_for_one_path_never_stack() {
    let mut env = TestEnv::start_with(Some("delay:stage:after-attach=1500")).await;
    let a = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let b = env.create("b", 16 * MIB, ext4()).await.volume_id;
    let path = env.path("shared-stage");
    let mut second = env.csi.clone();
    let (pa, ca) = (path.clone(), ext4());
    let first = tokio::spawn({
        let mut c = env.csi.clone();
        let a = a.clone();
        async move { node_stage_code(&mut c, &a, &pa, ca).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b_code = node_stage_code(&mut second, &b, &path, ext4()).await;
    let a_code = first.await.unwrap();
    assert_eq!(a_code, Code::Ok);
    assert_eq!(
        b_code,
        Code::Aborted,
        "the path is claimed by the stage in flight"
    );
    // Once A holds the path, B is refused outright and A is untouched.
    assert_eq!(
        node_stage_code(&mut second, &b, &path, ext4()).await,
        Code::AlreadyExists
    );
    let (mounts, _) = kernel_state_under(Path::new(&path));
    assert_eq!(mounts.len(), 1, "one mount at the path: {mounts:?}");
    env.unstage(&a, &path).await.unwrap();
    env.assert_clean();
}

#[test]
fn a_loop_device_reused_for_another_file_is_never_acted_on() {
    let dir = tempfile::tempdir().unwrap();
    let (img_a, img_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for p in [&img_a, &img_b] {
        fs::File::create(p).unwrap().set_len(16 << 20).unwrap();
    }
    let opts = AttachOptions::default();
    let a = LinuxHost.attach(&img_a, opts).unwrap();
    let dev_a = a.device.clone();
    drop(a);
    LinuxHost.detach(&dev_a).unwrap();
    // The kernel hands the freed device to the next file: most likely the same number.
    let b = LinuxHost.attach(&img_b, opts).unwrap();
    let dev_b = b.device.clone();
    drop(b);
    if dev_b.path == dev_a.path {
        assert!(
            LinuxHost.hold(&dev_a).unwrap().is_none(),
            "not A's any more"
        );
    }
    // Detaching "A's" device leaves B's attachment alone, whatever number it got.
    LinuxHost.detach(&dev_a).unwrap();
    let b_now = LinuxHost.find(FileId::of(&img_b).unwrap()).unwrap();
    assert_eq!(
        b_now.as_ref().map(|d| &d.path),
        Some(&dev_b.path),
        "A was {dev_a:?}, B {dev_b:?}; devices now: {:?}",
        LinuxHost.list()
    );
    LinuxHost.detach(&dev_b).unwrap();
    // While anyone else has the device open (a concurrent test listing devices opens each
    // one for a moment), the kernel defers the clear to the last close: give it that moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while LinuxHost
        .find(FileId::of(&img_b).unwrap())
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "B's device was never released");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `mkfs.ext4` that records its pid and waits (as a bash builtin, so the pid is the tool
/// itself), then runs the real one.
fn slow_mkfs(dir: &Path) -> PathBuf {
    slow_tool(dir, "mkfs.ext4", "mkfs.pids")
}

/// `tool` slowed down the same way, recording its pid in `pids`.
fn slow_tool(dir: &Path, tool: &str, pids: &str) -> PathBuf {
    let bin = dir.join(TOOLS_DIR);
    fs::create_dir_all(&bin).unwrap();
    let real = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_owned();
    let script = format!(
        "#!/bin/bash\necho $$ >> {pids}\nread -t 5 <> <(:)\nexec {real} \"$@\"\n",
        pids = dir.join(pids).display()
    );
    let path = bin.join(tool);
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Waits until a slowed tool has started (its pid is recorded).
async fn wait_for_tool(pids: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never started",
            pids.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a stage of `id`, kills the server once the slowed tool it runs has started, and
/// checks that the tool died with it.
async fn kill_during_stage(env: &mut TestEnv, id: &str, staging: &str, pids: &Path) {
    let mut c = env.csi.clone();
    let (id2, st2) = (id.to_owned(), staging.to_owned());
    let pending = tokio::spawn(async move { node_stage_code(&mut c, &id2, &st2, ext4()).await });
    wait_for_tool(pids).await;
    env.kill();
    let _ = pending.await;
    assert_tool_died(pids);
}

/// Asserts that the slowed tool died with the server that started it.
fn assert_tool_died(pids: &Path) {
    let pid: i32 = fs::read_to_string(pids)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Dead is gone, or a zombie waiting for init to reap it (which a loaded machine delays).
    let alive = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() {
        assert!(Instant::now() < deadline, "tool {pid} outlived the server");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_die_with_a_killed_server_and_the_retry_succeeds() {
    let mut env = TestEnv::start().await;
    slow_mkfs(env.dir.path());
    env.restart(None).await;
    let id = env.create("v", 32 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    let pids = env.dir.path().join("mkfs.pids");
    kill_during_stage(&mut env, &id, &staging, &pids).await;
    env.restart(None).await;
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

/// The kernel clears a detached loop device at its last close, so another opener (a device
/// scan by a concurrent stage, a monitoring agent) defers the clear. The unstage answers
/// once the device is gone, so the provisioner's DeleteVolume right after it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_right_after_the_unstage_succeeds_while_a_scan_holds_the_device() {
    let mut env = TestEnv::start().await;
    let id = env.create("v", 32 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    env.stage(&id, &staging, ext4()).await.unwrap();
    let image = env.pool().join("volumes").join(&id).join("image");
    let dev = LinuxHost
        .find(FileId::of(&image).unwrap())
        .unwrap()
        .expect("attached");
    let scan = LinuxHost.hold(&dev).unwrap().expect("held");
    let scanner = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(scan);
    });
    env.unstage(&id, &staging).await.unwrap();
    let deleted = env.delete(&id).await;
    scanner.join().unwrap();
    deleted.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_stage_never_formats_a_device_reused_by_another_volume() {
    let mut env = TestEnv::start_with(Some("delay:stage:after-attach=3000")).await;
    let a = env.create("a", 32 * MIB, ext4()).await.volume_id;
    let b = env.create("b", 32 * MIB, ext4()).await.volume_id;
    // A's stage is held right after the attach, and dies there; something (udev, a killed
    // tool) still holds A's device open for a moment.
    let mut c = env.csi.clone();
    let (a2, sa) = (a.clone(), env.path("sa"));
    let pending = tokio::spawn(async move { node_stage_code(&mut c, &a2, &sa, ext4()).await });
    let image_a = env.pool().join("volumes").join(&a).join("image");
    let deadline = Instant::now() + Duration::from_secs(10);
    let dev_a = loop {
        if let Some(d) = LinuxHost.find(FileId::of(&image_a).unwrap()).unwrap() {
            break d;
        }
        assert!(Instant::now() < deadline, "A was never attached");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let holder = LinuxHost.hold(&dev_a).unwrap().expect("held");
    env.kill();
    let _ = pending.await;
    env.restart(None).await;
    // The holder lets go: the auto-clearing device is freed, and B's stage gets it.
    drop(holder);
    let (sb, pb) = (env.path("sb"), env.path("pb"));
    env.stage(&b, &sb, ext4()).await.unwrap();
    env.publish(&b, &sb, &pb, ext4(), false).await.unwrap();
    fs::write(format!("{pb}/b-data"), b"B's fsynced data").unwrap();
    fs::File::open(format!("{pb}/b-data"))
        .unwrap()
        .sync_all()
        .unwrap();
    // A's retry works on A's own image, whatever device number B got.
    env.stage(&a, &env.path("sa"), ext4()).await.unwrap();
    assert_eq!(
        fs::read(format!("{pb}/b-data")).unwrap(),
        b"B's fsynced data"
    );
    let image_b = env.pool().join("volumes").join(&b).join("image");
    let (da, db) = (
        LinuxHost
            .find(FileId::of(&image_a).unwrap())
            .unwrap()
            .unwrap(),
        LinuxHost
            .find(FileId::of(&image_b).unwrap())
            .unwrap()
            .unwrap(),
    );
    assert_ne!(da.path, db.path);
    env.unpublish(&b, &pb).await.unwrap();
    env.unstage(&b, &sb).await.unwrap();
    env.unstage(&a, &env.path("sa")).await.unwrap();
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image_b)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "B's filesystem: {fsck:?}");
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_growfs_dies_with_a_killed_server_and_the_retried_expansion_succeeds() {
    let mut env = TestEnv::start().await;
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = env.create("x", 320 * MIB, xfs.clone()).await.volume_id;
    let staging = env.path("stage");
    env.stage(&id, &staging, xfs.clone()).await.unwrap();
    env.expand(&id, 400 * MIB).await.unwrap();
    // Restarted with a slow xfs_growfs on its PATH.
    slow_tool(env.dir.path(), "xfs_growfs", "growfs.pids");
    env.restart(None).await;
    let expand = node_expand_req(&id, &staging, "", 400 * MIB);
    let mut c = env.csi.clone();
    let req = expand.clone();
    let pending = tokio::spawn(async move { c.node.node_expand_volume(req).await });
    let pids = env.dir.path().join("growfs.pids");
    wait_for_tool(&pids).await;
    env.kill();
    let _ = pending.await;
    assert_tool_died(&pids);
    fs::remove_file(&pids).unwrap();
    env.restart(None).await;
    env.csi.node.node_expand_volume(expand).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize2fs_dies_with_a_killed_server_and_the_retried_stage_grows_the_volume() {
    let mut env = TestEnv::start().await;
    let id = env.create("r", 64 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    // Formatted once, then expanded while not staged: the next stage grows it offline.
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.expand(&id, 128 * MIB).await.unwrap();
    slow_tool(env.dir.path(), "resize2fs", "resize2fs.pids");
    env.restart(None).await;
    let pids = env.dir.path().join("resize2fs.pids");
    kill_during_stage(&mut env, &id, &staging, &pids).await;
    fs::remove_file(&pids).unwrap();
    env.restart(None).await;
    env.stage(&id, &staging, ext4()).await.unwrap();
    let stat = fs_size(&staging);
    assert!(
        stat > 100 * MIB as u64,
        "the retried stage grew the filesystem: {stat} bytes"
    );
    env.unstage(&id, &staging).await.unwrap();
    let image = env.pool().join("volumes").join(&id).join("image");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "the grown filesystem: {fsck:?}");
    env.assert_clean();
}

/// A group snapshot's server killed with the group's filesystems frozen, in its own
/// namespace: its successor, in a new one, thaws them at startup (the frozen mounts live on
/// through propagation), shows no half group, and the retried call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_frozen_by_a_killed_server_is_thawed_by_its_successor_in_a_new_namespace() {
    let mut host = Host::new(false);
    let mut csi = host.start_crashing_at(Some("group:before-thaw")).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut volumes = vec![];
    for name in ["a", "b"] {
        let id = create(&mut csi, name, cap.clone()).await;
        let (stage, publish) = (host.kubelet(&format!("stage-{name}")), host.kubelet(name));
        assert_eq!(
            node_stage_code(&mut csi, &id, &stage, cap.clone()).await,
            Code::Ok
        );
        node_publish(&mut csi, &id, &stage, &publish, cap.clone(), false)
            .await
            .unwrap();
        volumes.push((id, stage, publish));
    }
    let ids: Vec<String> = volumes.iter().map(|v| v.0.clone()).collect();
    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: "g".into(),
        source_volume_ids: ids.clone(),
        ..Default::default()
    };
    let err = csi
        .groups
        .create_volume_group_snapshot(request.clone())
        .await
        .expect_err("the server dies with the filesystems frozen");
    assert_ne!(err.code(), Code::Ok);
    host.server.take().unwrap().wait().unwrap();

    let mut csi = host.start().await;
    for (_, _, publish) in &volumes {
        assert_not_frozen(publish);
        fs::write(format!("{publish}/after"), b"written after the restart").unwrap();
    }
    let listed = csi
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "a half group is visible");
    let group = csi
        .groups
        .create_volume_group_snapshot(request)
        .await
        .expect("the retried call succeeds")
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    csi.groups
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id,
            snapshot_ids: group.snapshots.into_iter().map(|s| s.snapshot_id).collect(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
    for (id, stage, publish) in &volumes {
        node_unpublish(&mut csi, id, publish).await.unwrap();
        node_unstage(&mut csi, id, stage).await.unwrap();
        csi.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Whether the kubelet or a sidecar would retry this answer: the server died under the call
/// (the client made the status itself, with no response headers), or it is one of the
/// codes the spec asks callers to retry.
fn retried(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Cancelled | Code::Aborted | Code::DeadlineExceeded
    ) || s.metadata().get("content-type").is_none()
}

/// Calls `call` until it answers OK, reconnecting after the server died under it, as the
/// kubelet and the sidecars do. Any other answer fails the test, and so does a call that
/// hangs.
async fn until_ok<T, F, Fut>(sock: &Path, csi: &mut Csi, what: &str, mut call: F) -> T
where
    F: FnMut(Csi) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match tokio::time::timeout(Duration::from_secs(60), call(csi.clone())).await {
            Ok(Ok(v)) => return v,
            Ok(Err(s)) if retried(&s) => {}
            Ok(Err(s)) => panic!("{what}: {s:?}"),
            Err(_) => panic!("{what} hung for 60 s"),
        }
        assert!(Instant::now() < deadline, "{what} never succeeded");
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(c) = connect(&Endpoint::Unix(sock.to_path_buf())).await {
            *csi = c;
        }
    }
}

/// A volume made usable as the kubelet does, every call retried until OK.
struct Usable {
    id: String,
    staging: String,
    target: String,
}

impl Usable {
    async fn new(sock: &Path, csi: &mut Csi, kubelet: &Path, name: &str, cap: &Cap) -> Self {
        let id = until_ok(sock, csi, "CreateVolume", |mut c| {
            let request = create_req(name, 32 * MIB, cap.clone());
            async move {
                let v = c.controller.create_volume(request).await?.into_inner();
                Ok(v.volume.unwrap_or_default().volume_id)
            }
        })
        .await;
        let staging = s(&kubelet.join(format!("stage-{name}")));
        let target = s(&kubelet.join(format!("pub-{name}")));
        until_ok(sock, csi, "NodeStageVolume", |mut c| {
            let (id, staging, cap) = (id.clone(), staging.clone(), cap.clone());
            async move { node_stage(&mut c, &id, &staging, cap).await }
        })
        .await;
        until_ok(sock, csi, "NodePublishVolume", |mut c| {
            let (id, staging, target) = (id.clone(), staging.clone(), target.clone());
            let cap = cap.clone();
            async move { node_publish(&mut c, &id, &staging, &target, cap, false).await }
        })
        .await;
        Usable {
            id,
            staging,
            target,
        }
    }

    /// Unpublishes, unstages and deletes the volume.
    async fn delete(self, sock: &Path, csi: &mut Csi) {
        until_ok(sock, csi, "NodeUnpublishVolume", |mut c| {
            let (id, target) = (self.id.clone(), self.target.clone());
            async move { node_unpublish(&mut c, &id, &target).await }
        })
        .await;
        until_ok(sock, csi, "NodeUnstageVolume", |mut c| {
            let (id, staging) = (self.id.clone(), self.staging.clone());
            async move { node_unstage(&mut c, &id, &staging).await }
        })
        .await;
        until_ok(sock, csi, "DeleteVolume", |mut c| {
            let request = csi::DeleteVolumeRequest {
                volume_id: self.id.clone(),
                ..Default::default()
            };
            async move { c.controller.delete_volume(request).await.map(drop) }
        })
        .await;
    }
}

type Cap = csi::VolumeCapability;

/// Writes and fsyncs `data` at the start of `path` (created unless it is a device); fails
/// the test if that does not finish, as on a filesystem left frozen.
async fn write_synced(path: String, data: Vec<u8>, device: bool) {
    let write = tokio::task::spawn_blocking(move || {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(!device)
            .open(&path)
            .unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    });
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("a write did not finish in 30 s: is the filesystem frozen?")
        .unwrap();
}

/// One kubelet-like client: whole lifecycles of its own volumes, every call retried until
/// OK; the data written and fsynced through the published path must still be there after
/// whatever kills happened meanwhile.
async fn lifecycles(sock: PathBuf, kubelet: PathBuf, client: u8, cycles: u8, mut rng: u64) {
    let mut csi = connect(&Endpoint::Unix(sock.clone())).await.unwrap();
    // One client's volumes are raw block devices.
    let block = client == 2;
    let cap = if block {
        block_cap(Mode::SingleNodeWriter)
    } else {
        ext4()
    };
    for n in 0..cycles {
        let name = format!("k{client}-{n}");
        let volume = Usable::new(&sock, &mut csi, &kubelet, &name, &cap).await;
        let data = payload(client.wrapping_mul(31).wrapping_add(n), 256 * 1024);
        let file = if block {
            volume.target.clone()
        } else {
            format!("{}/data", volume.target)
        };
        write_synced(file.clone(), data.clone(), block).await;
        // A snapshot of the live volume (its filesystem frozen meanwhile), deleted later.
        let snapshot_id = until_ok(&sock, &mut csi, "CreateSnapshot", |mut c| {
            let request = csi::CreateSnapshotRequest {
                name: format!("{name}-snap"),
                source_volume_id: volume.id.clone(),
                ..Default::default()
            };
            async move {
                let r = c.controller.create_snapshot(request).await?.into_inner();
                Ok(r.snapshot.unwrap_or_default().snapshot_id)
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(xorshift(&mut rng) % 100)).await;
        assert!(
            read_block(&file, 0, data.len()) == data,
            "{name}: the fsynced data changed"
        );
        until_ok(&sock, &mut csi, "DeleteSnapshot", |mut c| {
            let request = csi::DeleteSnapshotRequest {
                snapshot_id: snapshot_id.clone(),
                ..Default::default()
            };
            async move { c.controller.delete_snapshot(request).await.map(drop) }
        })
        .await;
        volume.delete(&sock, &mut csi).await;
    }
}

/// A client taking group snapshots of two published volumes, round after round: every
/// group is whole, and writes go on after each (nothing is left frozen by a kill).
async fn group_snapshots(sock: PathBuf, kubelet: PathBuf, rounds: u8) {
    let mut csi = connect(&Endpoint::Unix(sock.clone())).await.unwrap();
    let mut volumes = vec![];
    for name in ["group-a", "group-b"] {
        volumes.push(Usable::new(&sock, &mut csi, &kubelet, name, &ext4()).await);
    }
    let ids: Vec<String> = volumes.iter().map(|v| v.id.clone()).collect();
    for n in 0..rounds {
        let group = until_ok(&sock, &mut csi, "CreateVolumeGroupSnapshot", |mut c| {
            let request = csi::CreateVolumeGroupSnapshotRequest {
                name: format!("group-{n}"),
                source_volume_ids: ids.clone(),
                ..Default::default()
            };
            async move {
                let r = c.groups.create_volume_group_snapshot(request).await?;
                Ok(r.into_inner().group_snapshot.unwrap_or_default())
            }
        })
        .await;
        assert_eq!(group.snapshots.len(), 2, "{group:?}");
        for v in &volumes {
            let data = payload(n, 64 * 1024);
            write_synced(format!("{}/after-{n}", v.target), data, false).await;
        }
        until_ok(&sock, &mut csi, "DeleteVolumeGroupSnapshot", |mut c| {
            let request = csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: group.group_snapshot_id.clone(),
                snapshot_ids: group
                    .snapshots
                    .iter()
                    .map(|s| s.snapshot_id.clone())
                    .collect(),
                ..Default::default()
            };
            async move {
                c.groups
                    .delete_volume_group_snapshot(request)
                    .await
                    .map(drop)
            }
        })
        .await;
    }
    for v in volumes {
        v.delete(&sock, &mut csi).await;
    }
}

/// A kubelet-like client for inline ephemeral volumes: the publish makes the volume and the
/// unpublish deletes it, each retried until OK; data written in between stays while it is
/// published.
async fn ephemeral_volumes(sock: PathBuf, kubelet: PathBuf, cycles: u8) {
    let mut csi = connect(&Endpoint::Unix(sock.clone())).await.unwrap();
    for n in 0..cycles {
        // The kubelet's handle: "csi-" and a sha256 in hex.
        let handle = format!("csi-{:064x}", 0x5eed_0000 + u64::from(n));
        let target = s(&kubelet.join(format!("inline-{n}")));
        until_ok(&sock, &mut csi, "NodePublishVolume (inline)", |mut c| {
            let request = csi::NodePublishVolumeRequest {
                volume_id: handle.clone(),
                target_path: target.clone(),
                volume_capability: Some(mount_cap("", Mode::SingleNodeWriter)),
                volume_context: [
                    ("csi.storage.k8s.io/ephemeral", "true"),
                    ("csi.storage.k8s.io/pod.name", "inline-pod"),
                    ("size", "32Mi"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
                ..Default::default()
            };
            async move { c.node.node_publish_volume(request).await.map(drop) }
        })
        .await;
        let (file, data) = (format!("{target}/data"), payload(n, 64 * 1024));
        write_synced(file.clone(), data.clone(), false).await;
        assert!(read_block(&file, 0, data.len()) == data, "{handle}");
        until_ok(&sock, &mut csi, "NodeUnpublishVolume (inline)", |mut c| {
            let (handle, target) = (handle.clone(), target.clone());
            async move { node_unpublish(&mut c, &handle, &target).await }
        })
        .await;
    }
}

/// The server killed at random instants (SIGKILL, so mid-mkfs, mid-rename, mid-fsync
/// alike) and restarted each time in a new mount namespace while kubelet-like clients run
/// whole lifecycles and retry every call: every lifecycle completes, fsynced data survives
/// every kill, and in the end no volume, mount or loop device is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_lose_no_data_and_leave_nothing_behind() {
    random_kills(false).await;
}

/// The same on a pool image (xfs, reflink snapshots of frozen filesystems).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_on_a_pool_image_lose_no_data_and_leave_nothing_behind() {
    random_kills(true).await;
}

async fn random_kills(pool_image: bool) {
    let seed = std::env::var("STRATA_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("STRATA_KILL_SEED={seed}");
    let mut rng = seed;
    let mut host = Host::new(pool_image);
    host.start().await;
    let (sock, kubelet) = (host.socket(), host.host().join("kubelet"));
    let mut clients: Vec<_> = (0..3u8)
        .map(|client| {
            let (sock, kubelet) = (sock.clone(), kubelet.clone());
            tokio::spawn(lifecycles(sock, kubelet, client, 16, xorshift(&mut rng)))
        })
        .collect();
    clients.push(tokio::spawn(group_snapshots(
        sock.clone(),
        kubelet.clone(),
        8,
    )));
    clients.push(tokio::spawn(ephemeral_volumes(sock, kubelet, 12)));
    let mut kills = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20 + xorshift(&mut rng) % 250)).await;
        host.kill();
        kills += 1;
        if xorshift(&mut rng).is_multiple_of(4) {
            // Killed again while it starts: in its reconciliation, or before it serves.
            host.server = Some(host.spawn(None));
            tokio::time::sleep(Duration::from_millis(xorshift(&mut rng) % 40)).await;
            host.kill();
            kills += 1;
        }
        host.start().await;
    }
    for c in clients {
        c.await.unwrap();
    }
    eprintln!("{kills} kills");
    assert!(kills >= 3, "only {kills} kills: the clients ran too fast");
    // A last restart: its reconciliation finishes what the kills interrupted.
    host.kill();
    host.start().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = ["volumes", "snapshots", "groups"]
            .iter()
            .flat_map(|d| fs::read_dir(host.pool().join(d)).into_iter().flatten())
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "volumes or snapshots left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What stays is the shared host directory and, on a pool image, the pool's filesystem.
    let (mut mounts, _) = kernel_state_under(host.dir.path());
    mounts.retain(|m| *m != host.host() && *m != host.host().join("pool/data"));
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let pool_fs = pool_image.then(|| FileId::of(&host.host().join("pool/pool.img")).unwrap());
    let loops: Vec<_> = LinuxHost
        .list()
        .unwrap()
        .into_iter()
        .filter(|d| d.backing_file.starts_with(host.dir.path()) && Some(d.backing) != pool_fs)
        .collect();
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
}
