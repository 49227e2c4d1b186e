//! Crash tests: the server is killed with SIGKILL in the middle of an operation, restarted on
//! the same pool, and the retried call must succeed with nothing leaked.

mod common;

use std::fs;

use common::*;
use csi_proto as csi;

async fn assert_dead(
    env: &mut TestEnv,
    call: impl std::future::Future<Output = Result<(), tonic::Status>>,
) {
    let err = call.await.expect_err("the server dies at the crash point");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    let status = env.wait_for_exit();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "killed at the crash point"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_create_volume_then_retry() {
    let mut env = TestEnv::start_with(Some("create:after-data")).await;
    let mut c = env.csi.controller.clone();
    assert_dead(&mut env, async move {
        c.create_volume(create_req("crashy", 16 * MIB, ext4()))
            .await
            .map(drop)
    })
    .await;
    assert_eq!(
        env.pool_entries().len(),
        1,
        "a half-created volume is on disk: {:?}",
        env.pool_entries()
    );
    assert!(env.pool_entries()[0].starts_with(".creating-"));

    env.restart(None).await;
    assert!(
        env.pool_entries().is_empty(),
        "rolled back at startup: {:?}",
        env.pool_entries()
    );
    let vol = env.create("crashy", 16 * MIB, ext4()).await;
    let again = env.create("crashy", 16 * MIB, ext4()).await;
    assert_eq!(vol, again);
    env.delete(&vol.volume_id).await.unwrap();
    assert!(env.pool_entries().is_empty());
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_delete_volume_then_retry() {
    let mut env = TestEnv::start().await;
    let id = env.create("doomed", 16 * MIB, ext4()).await.volume_id;
    env.restart(Some("delete:after-retire")).await;
    let mut c = env.csi.controller.clone();
    let did = id.clone();
    assert_dead(&mut env, async move {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: did,
            secrets: Default::default(),
        })
        .await
        .map(drop)
    })
    .await;
    env.restart(None).await;
    assert!(
        env.pool_entries().is_empty(),
        "completed at startup: {:?}",
        env.pool_entries()
    );
    env.delete(&id).await.expect("retried delete succeeds");
    let err = env
        .csi
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    env.assert_clean();
}

async fn crash_during_stage(point: &str) {
    let mut env = TestEnv::start().await;
    let id = env.create("staged", 64 * MIB, ext4()).await.volume_id;
    let (staging, target) = (env.path("staging"), env.path("target"));
    env.restart(Some(point)).await;
    let mut n = env.csi.node.clone();
    let (sid, sp) = (id.clone(), staging.clone());
    assert_dead(&mut env, async move {
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: sid,
            staging_target_path: sp,
            volume_capability: Some(ext4()),
            ..Default::default()
        })
        .await
        .map(drop)
    })
    .await;
    // The device was attached auto-clearing and held by the dead process: the kernel freed it.
    assert!(
        kernel_state_under(env.dir.path()).1.is_empty(),
        "{point}: loop device left"
    );

    env.restart(None).await;
    env.stage(&id, &staging, ext4())
        .await
        .expect("retried stage succeeds");
    env.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    fs::write(format!("{target}/file"), b"data").unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
    // The filesystem made after the crash is the one that stays.
    env.stage(&id, &staging, ext4()).await.unwrap();
    assert_eq!(fs::read(format!("{staging}/file")).unwrap(), b"data");
    env.unstage(&id, &staging).await.unwrap();
    env.delete(&id).await.unwrap();
    env.assert_clean();
    assert!(env.pool_entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_stage_after_loop_attach_then_retry() {
    crash_during_stage("stage:after-attach").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_stage_after_mkfs_then_retry() {
    crash_during_stage("stage:after-format").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_a_snapshot_holds_the_filesystem_frozen_then_retry() {
    let mut env = TestEnv::start().await;
    let id = env.create("frozen", 64 * MIB, ext4()).await.volume_id;
    let (staging, target) = (env.path("staging"), env.path("target"));
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    fs::write(format!("{target}/before"), b"before").unwrap();
    env.restart(Some("snapshot:frozen")).await;
    let mut c = env.csi.controller.clone();
    let sid = id.clone();
    assert_dead(&mut env, async move {
        c.create_snapshot(snapshot_req(&sid)).await.map(drop)
    })
    .await;
    env.restart(None).await;
    // Startup thawed the filesystem.
    assert_not_frozen(&target);
    fs::write(format!("{target}/after"), b"after").unwrap();
    let snap = env
        .csi
        .controller
        .create_snapshot(snapshot_req(&id))
        .await
        .expect("retried snapshot succeeds")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

fn snapshot_req(source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: "snap".into(),
        ..Default::default()
    }
}

fn expand_req(id: &str) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 64 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_snapshot_and_expansion_then_retry() {
    let mut env = TestEnv::start().await;
    let id = env.create("grown", 32 * MIB, ext4()).await.volume_id;
    env.restart(Some("snapshot:after-copy")).await;
    let mut c = env.csi.controller.clone();
    let sid = id.clone();
    assert_dead(&mut env, async move {
        c.create_snapshot(snapshot_req(&sid)).await.map(drop)
    })
    .await;
    env.restart(Some("expand:after-grow")).await;
    let mut c = env.csi.controller.clone();
    let eid = id.clone();
    assert_dead(&mut env, async move {
        c.controller_expand_volume(expand_req(&eid)).await.map(drop)
    })
    .await;
    env.restart(None).await;
    let snapshots_dir = env.pool().join("snapshots");
    assert_eq!(
        fs::read_dir(&snapshots_dir).unwrap().count(),
        0,
        "half-made snapshot rolled back"
    );
    let r = env
        .csi
        .controller
        .controller_expand_volume(expand_req(&id))
        .await
        .expect("retried expansion succeeds")
        .into_inner();
    assert_eq!(r.capacity_bytes, 64 * MIB);
    let image = env.pool().join("volumes").join(&id).join("image");
    assert_eq!(fs::metadata(image).unwrap().len(), 64 << 20);
    let snap = env
        .csi
        .controller
        .create_snapshot(snapshot_req(&id))
        .await
        .expect("retried snapshot succeeds")
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.size_bytes, 64 * MIB);
    assert_eq!(fs::read_dir(&snapshots_dir).unwrap().count(), 1);
    env.assert_clean();
}

/// Every crash point, reached by the call that owns it on a volume that holds fsynced data:
/// after SIGKILL and a restart, the retried call succeeds, the data is intact, and tearing
/// everything down leaves no mount, loop device or pool entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_recovers_with_data_intact() {
    const POINTS: &[&str] = &[
        "create:after-data",
        "delete:after-retire",
        "stage:after-attach",
        "stage:after-format",
        "publish:before-bind",
        "unpublish:after-unmount",
        "unstage:after-unmount",
        "snapshot:frozen",
        "snapshot:after-copy",
        "expand:after-grow",
        "node-expand:before-grow",
    ];
    let mut survived = 0;
    for point in POINTS {
        let mut env = TestEnv::start().await;
        let cap = mount_cap(
            "xfs",
            csi::volume_capability::access_mode::Mode::SingleNodeMultiWriter,
        );
        let id = env.create("v", 320 * MIB, cap.clone()).await.volume_id;
        let (staging, target) = (env.path("stage"), env.path("target"));
        let staged_first = !point.starts_with("stage:") && !point.starts_with("create:");
        if staged_first {
            env.stage(&id, &staging, cap.clone()).await.unwrap();
            env.publish(&id, &staging, &target, cap.clone(), false)
                .await
                .unwrap();
            fs::write(format!("{target}/data"), b"fsynced before the crash").unwrap();
            fs::File::open(format!("{target}/data"))
                .unwrap()
                .sync_all()
                .unwrap();
            if point.starts_with("unstage:") || point.starts_with("delete:") {
                env.unpublish(&id, &target).await.unwrap();
            }
            if point.starts_with("delete:") {
                env.unstage(&id, &staging).await.unwrap();
            }
        }
        env.restart(Some(point)).await;
        let call = call_for(point, &id, &staging, &target, &cap);
        let mut c = env.csi.clone();
        let first = call.clone();
        assert_dead(&mut env, async move { first.send(&mut c).await }).await;
        env.restart(None).await;
        let mut c = env.csi.clone();
        call.send(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{point}: retry failed: {e:?}"));
        if staged_first && !point.starts_with("delete:") && !point.starts_with("unstage:") {
            if point.starts_with("unpublish:") {
                env.publish(&id, &staging, &target, cap.clone(), false)
                    .await
                    .unwrap();
            }
            assert_eq!(
                fs::read(format!("{target}/data")).unwrap(),
                b"fsynced before the crash",
                "{point}"
            );
        }
        // Tear down through the API and check nothing is left.
        let _ = env.unpublish(&id, &target).await;
        let _ = env.unpublish(&id, &format!("{target}-2")).await;
        let _ = env.unstage(&id, &staging).await;
        let snaps = env
            .csi
            .controller
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        for s in snaps.entries {
            env.csi
                .controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: s.snapshot.unwrap().snapshot_id,
                    secrets: Default::default(),
                })
                .await
                .unwrap();
        }
        let vols = env
            .csi
            .controller
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        for v in vols.entries {
            let vid = v.volume.unwrap().volume_id;
            env.delete(&vid)
                .await
                .unwrap_or_else(|e| panic!("{point}: delete: {e:?}"));
        }
        env.assert_clean();
        assert!(
            env.pool_entries().is_empty(),
            "{point}: {:?}",
            env.pool_entries()
        );
        assert_eq!(
            fs::read_dir(env.pool().join("snapshots")).unwrap().count(),
            0,
            "{point}"
        );
        survived += 1;
    }
    eprintln!("{survived} crash points recovered");
}

#[derive(Clone)]
enum Call {
    Create,
    Delete(String),
    Stage(String, String, csi::VolumeCapability),
    Publish(String, String, String, csi::VolumeCapability),
    Unpublish(String, String),
    Unstage(String, String),
    Snapshot(String),
    Expand(String),
    NodeExpand(String, String),
}

fn call_for(
    point: &str,
    id: &str,
    staging: &str,
    target: &str,
    cap: &csi::VolumeCapability,
) -> Call {
    let (id, staging, target) = (id.to_string(), staging.to_string(), target.to_string());
    match point.split(':').next().unwrap() {
        "create" => Call::Create,
        "delete" => Call::Delete(id),
        "stage" => Call::Stage(id, staging, cap.clone()),
        "publish" => Call::Publish(id, staging, target, cap.clone()),
        "unpublish" => Call::Unpublish(id, target),
        "unstage" => Call::Unstage(id, staging),
        "snapshot" => Call::Snapshot(id),
        "expand" => Call::Expand(id),
        _ => Call::NodeExpand(id, target),
    }
}

impl Call {
    async fn send(&self, c: &mut strata::client::Csi) -> Result<(), tonic::Status> {
        match self.clone() {
            Call::Create => c
                .controller
                .create_volume(create_req("other", 16 * MIB, ext4()))
                .await
                .map(drop),
            Call::Delete(id) => c
                .controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id,
                    secrets: Default::default(),
                })
                .await
                .map(drop),
            Call::Stage(id, staging, cap) => c
                .node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::Publish(id, staging, target, cap) => c
                .node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                    target_path: format!("{target}-2"),
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await
                .map(drop)
                .and(Ok(())),
            Call::Unpublish(id, target) => c
                .node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: id,
                    target_path: target,
                })
                .await
                .map(drop),
            Call::Unstage(id, staging) => c
                .node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                })
                .await
                .map(drop),
            Call::Snapshot(id) => c
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: id,
                    name: "snap".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::Expand(id) => c
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id,
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 400 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::NodeExpand(id, target) => {
                c.controller
                    .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                        volume_id: id.clone(),
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: 400 * MIB,
                            limit_bytes: 0,
                        }),
                        ..Default::default()
                    })
                    .await?;
                c.node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: id,
                        volume_path: target,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
        }
    }
}
