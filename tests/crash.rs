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
    // Startup thawed the filesystem: a write completes (on a frozen one it would block).
    let path = format!("{target}/after");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fs::File::create(&path).and_then(|mut f| {
            use std::io::Write;
            f.write_all(b"after")?;
            f.sync_all()
        });
        let _ = tx.send(r.is_ok());
    });
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(true),
        "filesystem still frozen"
    );
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
