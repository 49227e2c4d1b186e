//! Reliability: the socket, a full pool, many overlapping clients, and independence of
//! operations on different volumes.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use csi_proto as csi;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_never_replaces_a_file() {
    let env = TestEnv::start().await;
    let meta = fs::metadata(env.path("csi.sock")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });

    let file = env.path("not-a-socket");
    fs::write(&file, b"precious").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--node-id", "n", "--pool"])
        .arg(env.path("pool2"))
        .arg("--endpoint")
        .arg(format!("unix://{file}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(fs::read(&file).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_fails_cleanly_and_existing_volumes_keep_working() {
    let mut env = TestEnv::start_on_fs_sized("ext4", 160 << 20, &[]).await;
    let id = env.create("kept", 32 * MIB, ext4()).await.volume_id;
    let (staging, target) = (env.path("s"), env.path("t"));
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    fs::write(format!("{target}/data"), vec![5u8; 8 << 20]).unwrap();
    fs::File::open(format!("{target}/data"))
        .unwrap()
        .sync_all()
        .unwrap();

    // Fill the pool's filesystem to the last block.
    let filler = env.pool().join("filler");
    let mut size = 256u64 << 20;
    let f = fs::File::create(&filler).unwrap();
    while size >= 4096 {
        // SAFETY: fallocate on an open fd.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, size as i64) };
        if r == 0 {
            break;
        }
        size /= 2;
    }
    let mut extra = 0u64;
    loop {
        // SAFETY: fallocate on an open fd.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                (size + extra) as i64,
                4096,
            )
        };
        if r != 0 {
            break;
        }
        extra += 4096;
    }

    let full = env
        .csi
        .controller
        .create_volume(create_req("late", 16 * MIB, ext4()))
        .await;
    assert_eq!(full.unwrap_err().code(), Code::ResourceExhausted);
    let snap = csi::CreateSnapshotRequest {
        source_volume_id: id.clone(),
        name: "snap".into(),
        ..Default::default()
    };
    let err = env
        .csi
        .controller
        .create_snapshot(snap.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let group = csi::CreateVolumeGroupSnapshotRequest {
        name: "group".into(),
        source_volume_ids: vec![id.clone()],
        ..Default::default()
    };
    let err = env
        .csi
        .groups
        .create_volume_group_snapshot(group.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(env.pool_entries(), vec![id.clone()], "no partial volume");
    for dir in ["snapshots", "groups"] {
        assert_eq!(
            fs::read_dir(env.pool().join(dir)).unwrap().count(),
            0,
            "no partial snapshot or group in {dir}"
        );
    }

    // The existing volume still reads its data; once space is freed everything works again.
    assert_eq!(
        fs::read(format!("{target}/data")).unwrap(),
        vec![5u8; 8 << 20]
    );
    drop(f);
    fs::remove_file(&filler).unwrap();
    env.csi.controller.create_snapshot(snap).await.unwrap();
    env.csi
        .groups
        .create_volume_group_snapshot(group)
        .await
        .unwrap();
    env.create("late", 16 * MIB, ext4()).await;
    fs::write(format!("{target}/more"), b"writable").unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_work_on_one_volume_never_holds_up_another() {
    // Every stage sleeps 3 s after attaching, holding its volume in flight.
    let mut env = TestEnv::start_with_args(&[], Some("delay:stage:after-attach=3000")).await;
    let slow = env.create("slow", 16 * MIB, ext4()).await.volume_id;
    let mut node = env.csi.node.clone();
    let (sid, spath) = (slow.clone(), env.path("slow"));
    let pending = tokio::spawn(async move {
        node.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: sid,
            staging_target_path: spath,
            volume_capability: Some(ext4()),
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The same volume: ABORTED at once. Others: served while the slow stage still runs.
    let again = env.stage(&slow, &env.path("slow"), ext4()).await;
    assert_eq!(again.unwrap_err().code(), Code::Aborted);
    let other = env.create("other", 16 * MIB, ext4()).await.volume_id;
    env.csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap();
    env.delete(&other).await.unwrap();
    assert!(
        !pending.is_finished(),
        "other volumes were served while the slow stage ran"
    );
    pending.await.unwrap().unwrap();
    env.unstage(&slow, &env.path("slow")).await.unwrap();
    env.assert_clean();
}

const NAMES: usize = 6;
const CLIENTS: usize = 8;
const OPS_PER_CLIENT: usize = 40;

/// Codes a spec-abiding driver may answer to these overlapping calls.
fn acceptable(code: Code) -> bool {
    matches!(
        code,
        Code::Ok | Code::Aborted | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_clients_get_spec_answers_and_leave_a_consistent_pool() {
    let env = TestEnv::start().await;
    let root = env.path("");
    let mut tasks = vec![];
    for client in 0..CLIENTS {
        let mut csi = env.csi.clone();
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes: BTreeMap<String, usize> = BTreeMap::new();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (client as u64 * 0x1234_5678);
            for _ in 0..OPS_PER_CLIENT {
                let n = (xorshift(&mut rng) % NAMES as u64) as usize;
                let name = format!("shared-{n}");
                // Resolve the name to its current id, if any (another client may delete it).
                let id = csi
                    .controller
                    .list_volumes(csi::ListVolumesRequest::default())
                    .await
                    .ok()
                    .and_then(|r| {
                        let entries = r.into_inner().entries;
                        // Names are not listed; the id ordering is stable, so pick by index.
                        entries
                            .get(n)
                            .and_then(|e| e.volume.clone())
                            .map(|v| v.volume_id)
                    })
                    .unwrap_or_else(|| "vol-0123456789abcdef01234567".into());
                let staging = format!("{root}/stage-{id}");
                let target = format!("{root}/pub-{id}-{client}");
                let r: Result<(), tonic::Status> = match (rng >> 8) % 7 {
                    0 => csi
                        .controller
                        .create_volume(create_req(&name, 16 * MIB, ext4()))
                        .await
                        .map(drop),
                    1 => csi
                        .controller
                        .delete_volume(csi::DeleteVolumeRequest {
                            volume_id: id,
                            secrets: Default::default(),
                        })
                        .await
                        .map(drop),
                    2 => csi
                        .controller
                        .create_snapshot(csi::CreateSnapshotRequest {
                            source_volume_id: id,
                            name: format!("snap-{n}-{client}"),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    3 => csi
                        .node
                        .node_stage_volume(csi::NodeStageVolumeRequest {
                            volume_id: id,
                            staging_target_path: staging,
                            volume_capability: Some(ext4()),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    4 => csi
                        .node
                        .node_publish_volume(csi::NodePublishVolumeRequest {
                            volume_id: id,
                            staging_target_path: staging,
                            target_path: target,
                            volume_capability: Some(mount_cap(
                                "ext4",
                                csi::volume_capability::access_mode::Mode::SingleNodeMultiWriter,
                            )),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    5 => csi
                        .node
                        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                            volume_id: id,
                            target_path: target,
                        })
                        .await
                        .map(drop),
                    _ => csi
                        .node
                        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                            volume_id: id,
                            staging_target_path: staging,
                        })
                        .await
                        .map(drop),
                };
                let code = r.map(|_| Code::Ok).unwrap_or_else(|s| s.code());
                assert!(acceptable(code), "unexpected {code:?}");
                *codes.entry(format!("{code:?}")).or_default() += 1;
            }
            codes
        }));
    }
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    eprintln!("{} operations: {total:?}", CLIENTS * OPS_PER_CLIENT);

    // Tear everything down through the API: the kernel and the pool must agree afterwards.
    let mut env = env;
    let mut mounts: Vec<std::path::PathBuf> = kernel_state_under(env.dir.path()).0;
    mounts.sort_by_key(|p| std::cmp::Reverse(p.display().to_string().contains("/pub-")));
    let volumes = env
        .csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: HashSet<String> = volumes
        .entries
        .iter()
        .map(|e| e.volume.clone().unwrap().volume_id)
        .collect();
    for m in &mounts {
        let p = m.display().to_string();
        let id = ids
            .iter()
            .find(|id| p.contains(id.as_str()))
            .expect("every mount belongs to a volume");
        if p.contains("/pub-") {
            env.unpublish(id, &p).await.unwrap();
        }
    }
    for id in &ids {
        env.unstage(id, &format!("{root}/stage-{id}"))
            .await
            .unwrap();
        env.delete(id).await.unwrap();
    }
    env.assert_clean();
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_quarantines_what_it_cannot_account_for_and_frees_its_loop_device() {
    let mut env = TestEnv::start().await;
    let block = block_cap(csi::volume_capability::access_mode::Mode::SingleNodeWriter);
    let id = env
        .create("orphan", 16 * MIB, block.clone())
        .await
        .volume_id;
    env.stage(&id, &env.path("stage"), block).await.unwrap();
    assert_eq!(kernel_state_under(env.dir.path()).1.len(), 1, "attached");
    env.stop();
    // Somebody removes the record by hand: the volume can no longer be accounted for.
    fs::remove_file(env.pool().join("volumes").join(&id).join("volume.json")).unwrap();
    env.restart(None).await;
    assert!(env.pool_entries().is_empty());
    let lost: Vec<_> = fs::read_dir(env.pool().join("lost+found"))
        .unwrap()
        .collect();
    assert_eq!(lost.len(), 1, "moved aside, not deleted");
    assert!(
        kernel_state_under(env.dir.path()).1.is_empty(),
        "its loop device was detached"
    );
    assert!(env.server_log().contains("lost+found"));
    env.assert_clean();
}

/// Probes overlap (the livenessprobe's, the kubelet's, an operator's): every one answers
/// ready, and none leaves a scratch file in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_probes_all_answer_ready() {
    let env = TestEnv::start().await;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let mut csi = env.csi.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    let r = csi.identity.probe(csi::ProbeRequest {}).await;
                    let ready = r.map(|r| r.into_inner().ready);
                    assert!(matches!(ready, Ok(Some(true))), "{ready:?}");
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let scratch: Vec<_> = fs::read_dir(env.pool())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("probe"))
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");
}
