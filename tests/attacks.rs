//! Attacks by a hostile caller and a hostile workload, performed for real: foreign files at
//! unpublish, symlinks swapped in mid-request, a workload flipping a directory into a
//! symlink during snapshots, writes through a read-only block publish, dangerous or secret
//! mount flags, oversized values, and a snapshot deleted during a restore.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use csi::volume_capability::AccessType;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use tonic::Code;

fn with_flags(flags: &[&str]) -> csi::VolumeCapability {
    let mut cap = ext4();
    if let Some(AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = flags.iter().map(|s| s.to_string()).collect();
    }
    cap
}

fn has_mount(path: &str) -> bool {
    !kernel_state_under(Path::new(path)).0.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_removes_only_what_a_publish_creates() {
    let mut env = TestEnv::start_with_args(&["--pool-image", "1Gi"], None).await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    // A file with content under an allowed prefix: left in place, the call succeeds.
    let keep = env.path("kubelet-config");
    fs::write(&keep, b"precious").unwrap();
    env.unpublish(&id, &keep).await.unwrap();
    assert_eq!(fs::read(&keep).unwrap(), b"precious");
    // A directory with entries: left too.
    let full = env.path("full");
    fs::create_dir(&full).unwrap();
    fs::write(format!("{full}/x"), b"x").unwrap();
    env.unpublish(&id, &full).await.unwrap();
    assert!(Path::new(&full).join("x").exists());
    // The pool image: Strata never publishes in the --pool directory, so nothing is
    // published there to undo; the call succeeds and leaves it alone.
    let image = env.dir.path().join("pool/pool.img").display().to_string();
    env.unpublish(&id, &image).await.unwrap();
    env.unstage(&id, &image).await.unwrap();
    assert!(Path::new(&image).exists());
    // A stage there is refused outright.
    let inside = env.dir.path().join("pool/stage-here").display().to_string();
    assert_eq!(
        code(env.stage(&id, &inside, ext4()).await),
        Code::InvalidArgument
    );
    assert!(!Path::new(&inside).exists());
    // What a publish made is removed.
    let staging = env.path("stage");
    let target = env.path("pub");
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    env.unpublish(&id, &target).await.unwrap();
    assert!(!Path::new(&target).exists());
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swapped_in_during_stage_never_moves_the_mount_outside() {
    let mut env = TestEnv::start_with(Some("delay:stage:after-attach=800")).await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let outside = tempfile::tempdir_in("/var/tmp").unwrap();
    let outside_path = outside.path().display().to_string();
    let staging = env.path("allowed/st");
    fs::create_dir_all(&staging).unwrap();
    let mut c = env.csi.clone();
    let (i, st) = (id.clone(), staging.clone());
    let pending = tokio::spawn(async move {
        c.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: i,
                staging_target_path: st,
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    fs::remove_dir(&staging).unwrap();
    std::os::unix::fs::symlink(&outside_path, &staging).unwrap();
    let result = pending.await.unwrap();
    assert_eq!(code(result), Code::InvalidArgument);
    assert!(!has_mount(&outside_path), "mounted outside");
    fs::remove_file(&staging).unwrap();
    // Undone through CSI as usual.
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swapped_in_during_publish_never_moves_the_mount_outside() {
    let mut env = TestEnv::start_with(Some("delay:publish:before-bind=800")).await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let outside = tempfile::tempdir_in("/var/tmp").unwrap();
    let outside_path = outside.path().display().to_string();
    let staging = env.path("stage");
    let target = env.path("pub");
    env.stage(&id, &staging, ext4()).await.unwrap();
    let mut c = env.csi.clone();
    let (i, st, t) = (id.clone(), staging.clone(), target.clone());
    let pending = tokio::spawn(async move {
        c.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: i,
                staging_target_path: st,
                target_path: t,
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The attacker moves the created target away and puts a symlink in its place.
    fs::rename(&target, env.path("moved")).unwrap();
    std::os::unix::fs::symlink(&outside_path, &target).unwrap();
    let _ = pending.await.unwrap();
    assert!(!has_mount(&outside_path), "mounted outside");
    // The mount landed on the directory that was checked, wherever it was moved; the
    // symlink is refused, and the mount is undone through CSI at its real path.
    assert!(
        has_mount(&env.path("moved")),
        "mounted on the checked directory"
    );
    assert_eq!(
        code(env.unpublish(&id, &target).await),
        Code::InvalidArgument
    );
    env.unpublish(&id, &env.path("moved")).await.unwrap();
    assert!(!Path::new(&env.path("moved")).exists());
    fs::remove_file(&target).unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_flipping_a_symlink_never_gets_host_files_into_a_snapshot() {
    let mut env = TestEnv::start_pool(PoolKind::DirOnExt4).await;
    let cap = mount_cap("", Mode::SingleNodeWriter);
    let id = env.create("a", 16 * MIB, cap.clone()).await.volume_id;
    let staging = env.path("stage");
    let target = env.path("pub");
    env.stage(&id, &staging, cap.clone()).await.unwrap();
    env.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let host_secrets = tempfile::tempdir_in("/var/tmp").unwrap();
    fs::write(host_secrets.path().join("shadow"), b"HOST-SECRET").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, sub, secret) = (
            stop.clone(),
            Path::new(&target).join("sub"),
            host_secrets.path().to_owned(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::remove_dir_all(&sub).or_else(|_| fs::remove_file(&sub));
                let _ = fs::create_dir(&sub);
                let _ = fs::write(sub.join("mine"), b"workload");
                let _ = fs::remove_dir_all(&sub).or_else(|_| fs::remove_file(&sub));
                let _ = std::os::unix::fs::symlink(&secret, &sub);
            }
        })
    };
    let mut snapshots = vec![];
    for n in 0..50 {
        let snap = env.snapshot(&format!("flip-{n}"), &id).await.unwrap();
        snapshots.push(snap.snapshot_id);
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    fn no_secret(dir: &Path) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                no_secret(&e.path());
            } else if m.is_file() {
                assert_ne!(e.file_name(), "shadow", "{}", e.path().display());
                assert_ne!(fs::read(e.path()).unwrap(), b"HOST-SECRET");
            }
        }
    }
    for snap in &snapshots {
        no_secret(&env.pool().join("snapshots").join(snap));
    }
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_block_publish_refuses_writes() {
    let mut env = TestEnv::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = env.create("b", 16 * MIB, cap.clone()).await.volume_id;
    let staging = env.path("stage");
    let rw = env.path("rw");
    let ro = env.path("ro");
    env.stage(&id, &staging, cap.clone()).await.unwrap();
    let multi = block_cap(Mode::SingleNodeMultiWriter);
    env.publish(&id, &staging, &rw, multi.clone(), false)
        .await
        .unwrap();
    env.publish(&id, &staging, &ro, multi.clone(), true)
        .await
        .unwrap();
    // Idempotent.
    env.publish(&id, &staging, &ro, multi.clone(), true)
        .await
        .unwrap();
    use std::io::Write;
    let refused = fs::OpenOptions::new()
        .write(true)
        .open(&ro)
        .and_then(|mut f| f.write_all(&[0xAB; 4096]).and_then(|()| f.sync_all()));
    assert!(refused.is_err(), "a write through a read-only publish");
    let mut f = fs::OpenOptions::new().write(true).open(&rw).unwrap();
    f.write_all(&[0xCD; 4096]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(&fs::read(&rw).unwrap()[..4], &[0xCD; 4]);
    env.unpublish(&id, &ro).await.unwrap();
    env.unpublish(&id, &rw).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_flags_are_applied_checked_and_never_echoed() {
    let mut env = TestEnv::start().await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    let target = env.path("pub");
    for bad in [vec!["errors=panic"], vec!["password=hunter2-secret"]] {
        let s = env
            .stage(&id, &staging, with_flags(&bad))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}");
        assert!(!s.message().contains("hunter2"), "{}", s.message());
    }
    assert!(!env.server_log().contains("hunter2"));
    let big: Vec<String> = (0..600).map(|_| "noatime".to_string()).collect();
    let mut cap = ext4();
    if let Some(AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = big;
    }
    assert_eq!(
        code(env.stage(&id, &staging, cap).await),
        Code::InvalidArgument
    );

    env.stage(&id, &staging, ext4()).await.unwrap();
    let flags = with_flags(&["nosuid", "nodev", "noexec"]);
    env.publish(&id, &staging, &target, flags, false)
        .await
        .unwrap();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .unwrap();
    let options = line.split(' ').nth(5).unwrap();
    for f in ["nosuid", "nodev", "noexec"] {
        assert!(options.split(',').any(|o| o == f), "{f} missing: {line}");
    }
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_get_short_answers() {
    let mut env = TestEnv::start().await;
    let token = "x".repeat(100 * 1024);
    let s = env
        .csi
        .controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: token,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Aborted);
    assert!(s.message().len() < 512, "{} bytes", s.message().len());
    let long_path = format!("{}/{}", env.path("p"), "y".repeat(3000));
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let s = env
        .stage(&id, &format!("/etc/{long_path}"), ext4())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().len() < 1024, "{} bytes", s.message().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deleted_during_a_restore_is_not_found_never_internal() {
    let mut env = TestEnv::start().await;
    let id = env.create("src", 16 * MIB, ext4()).await.volume_id;
    for n in 0..40 {
        let snap = env
            .snapshot(&format!("s{n}"), &id)
            .await
            .unwrap()
            .snapshot_id;
        let mut restore_req = create_req(&format!("r{n}"), 16 * MIB, ext4());
        restore_req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.clone(),
                },
            )),
        });
        let mut c = env.csi.clone();
        let restore = tokio::spawn(async move { c.controller.create_volume(restore_req).await });
        let mut d = env.csi.clone();
        let delete = d
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap,
                ..Default::default()
            })
            .await;
        let restored = restore.await.unwrap();
        assert!(
            matches!(code(restored), Code::Ok | Code::NotFound | Code::Aborted),
            "restore"
        );
        assert!(matches!(code(delete), Code::Ok | Code::Aborted), "delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_flipping_the_target_never_gets_a_mount_outside() {
    let mut env = TestEnv::start().await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let outside = tempfile::tempdir_in("/var/tmp").unwrap();
    let outside_path = outside.path().display().to_string();
    let staging = env.path("stage");
    env.stage(&id, &staging, ext4()).await.unwrap();
    let multi = mount_cap("ext4", Mode::SingleNodeMultiWriter);
    let parent = env.path("flip");
    fs::create_dir(&parent).unwrap();
    let target = format!("{parent}/t");
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let (stop, target, outside) = (stop.clone(), target.clone(), outside_path.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::remove_dir(&target).or_else(|_| fs::remove_file(&target));
                let _ = std::os::unix::fs::symlink(&outside, &target);
                std::thread::yield_now();
                let _ = fs::remove_file(&target);
                let _ = fs::create_dir(&target);
            }
        })
    };
    for _ in 0..100 {
        let _ = env
            .publish(&id, &staging, &target, multi.clone(), false)
            .await;
        assert!(!has_mount(&outside_path), "a mount landed outside");
    }
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
    // Whatever landed, landed under the allowed directory: undo it through CSI.
    let _ = fs::remove_file(&target);
    for m in kernel_state_under(Path::new(&parent)).0 {
        env.unpublish(&id, &m.display().to_string()).await.unwrap();
    }
    assert!(!has_mount(&outside_path));
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

/// The header block of the HPACK amplification attack: a 4,000-byte literal entered into
/// the dynamic table, then a million one-byte references to it (about 1 MB on the wire,
/// 4 GB decoded), as HEADERS and CONTINUATION frames of the protocol's size, after the
/// client preface and an empty SETTINGS.
fn amplifying_connection() -> Vec<u8> {
    let mut block = vec![0x40, 0x01, b'x', 0x7f];
    // 4000 - 127 as an HPACK integer continuation (7-bit prefix all ones).
    let mut rest = 4000 - 127;
    while rest >= 0x80 {
        block.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    block.push(rest as u8);
    block.extend(std::iter::repeat_n(b'v', 4000));
    block.extend(std::iter::repeat_n(0xbe, 1_000_000));
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 };
        let flags = if i + 1 == chunks.len() { 0x4 } else { 0 };
        let len = chunk.len();
        wire.extend([(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        wire.extend(1u32.to_be_bytes());
        wire.extend_from_slice(chunk);
    }
    wire
}

/// The server's peak resident memory, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_that_expands_without_bound_ends_the_connection_not_the_server() {
    use std::io::{Read, Write};
    let mut env = TestEnv::start().await;
    let pid = env.pid().unwrap();
    let wire = amplifying_connection();
    for _ in 0..3 {
        let mut s = std::os::unix::net::UnixStream::connect(env.path("csi.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server may hang up before it has read everything: that is the point.
        let _ = s.write_all(&wire);
        let mut answer = Vec::new();
        let ended = s.read_to_end(&mut answer);
        assert!(
            ended.is_ok()
                || ended
                    .as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "the connection is closed, not left hanging: {ended:?}"
        );
    }
    let peak = peak_rss_kib(pid);
    assert!(peak < 50 * 1024, "peak RSS {peak} KiB");
    env.csi
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .expect("the server still serves");
    assert_eq!(env.pid(), Some(pid));
}
