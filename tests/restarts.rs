//! A restart in a new mount namespace (a new container) with the old one's mounts still
//! live is a non-event, with and without a pool image; a group frozen by a killed server is
//! thawed by its successor in a new namespace.

mod common;

use std::fs;
use std::process::Command;

use common::namespaces::*;
use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{Mounter, NodePath};
use tonic::Code;

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
