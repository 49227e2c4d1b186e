//! Who owns what on the node: one server per pool and one owner per socket, one volume per
//! path, and loop devices never acted on once released or reused for another file.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::namespaces::*;
use common::*;
use csi_proto as csi;
use strata::client::connect;
use strata::endpoint::Endpoint;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{AttachOptions, FileId, LoopDevices};
use tonic::Code;

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
