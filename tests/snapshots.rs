//! Snapshots, restores, clones and expansion on the image backend, with real data.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use tonic::Code;

fn fs_total(path: &str) -> u64 {
    strata_core::os::Filesystems::usage(
        &strata_core::os::linux::LinuxHost,
        std::path::Path::new(path),
    )
    .unwrap()
    .total_bytes
}

fn volume_source(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

async fn filesystem_snapshot_restore_and_clone(mut env: TestEnv, method: &str) {
    let cap = ext4();
    let src = env.create("source", 64 * MIB, cap.clone()).await.volume_id;
    let mnt = env.mount(&src, "src", cap.clone()).await;
    let old = payload(1, 3 << 20);
    fs::write(format!("{mnt}/data"), &old).unwrap();

    // Taken while mounted and in use: the filesystem is frozen for the copy, then thawed.
    let snap = env.snapshot("snap-1", &src).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, src);
    assert_eq!(snap.size_bytes, 64 * MIB);
    let record = fs::read_to_string(
        env.pool()
            .join("snapshots")
            .join(&snap.snapshot_id)
            .join("snapshot.json"),
    )
    .unwrap();
    assert!(
        record.contains(&format!("\"method\": \"{method}\"")),
        "{record}"
    );
    fs::write(format!("{mnt}/data"), payload(2, 3 << 20)).unwrap();
    fs::write(
        format!("{mnt}/after"),
        b"written after the snapshot, so it is writable",
    )
    .unwrap();

    // A clone of the live volume holds the new data.
    let clone = env
        .restore("clone", 64 * MIB, cap.clone(), volume_source(&src))
        .await
        .unwrap();
    assert!(clone.content_source.is_some());

    env.unmount(&src, "src").await;
    env.delete(&src).await.unwrap();

    let restored = env
        .restore(
            "restored",
            128 * MIB,
            cap.clone(),
            snapshot_source(&snap.snapshot_id),
        )
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 128 * MIB);
    let again = env
        .restore(
            "restored",
            128 * MIB,
            cap.clone(),
            snapshot_source(&snap.snapshot_id),
        )
        .await
        .unwrap();
    assert_eq!(restored, again, "idempotent");
    let mnt = env
        .mount(&restored.volume_id, "restored", cap.clone())
        .await;
    assert_eq!(
        fs::read(format!("{mnt}/data")).unwrap(),
        old,
        "the snapshot's data, byte for byte"
    );
    assert!(!std::path::Path::new(&format!("{mnt}/after")).exists());
    assert!(
        fs_total(&mnt) > 100 << 20,
        "the filesystem grew to the larger volume at stage"
    );
    env.unmount(&restored.volume_id, "restored").await;

    let mnt = env.mount(&clone.volume_id, "clone", cap.clone()).await;
    assert_eq!(
        fs::read(format!("{mnt}/data")).unwrap(),
        payload(2, 3 << 20)
    );
    env.unmount(&clone.volume_id, "clone").await;

    for id in [&restored.volume_id, &clone.volume_id] {
        env.delete(id).await.unwrap();
    }
    env.csi
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
    env.assert_clean();
    assert!(env.pool_entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_by_sparse_copy_on_an_ext4_pool() {
    filesystem_snapshot_restore_and_clone(TestEnv::start().await, "sparse_copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_by_reflink_on_a_pool_image() {
    let env = TestEnv::start_with_args(&["--pool-image", "1Gi"], None).await;
    filesystem_snapshot_restore_and_clone(env, "reflink").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_snapshot_restores_old_bytes() {
    let mut env = TestEnv::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let src = env.create("source", 32 * MIB, cap.clone()).await.volume_id;
    let dev = env.mount(&src, "dev", cap.clone()).await;
    let write = |seed: u8| {
        let mut f = fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&payload(seed, 1 << 20)).unwrap();
        f.sync_all().unwrap();
    };
    write(7);
    let snap = env.snapshot("block-snap", &src).await.unwrap();
    write(8);
    let restored = env
        .restore(
            "restored",
            32 * MIB,
            cap.clone(),
            snapshot_source(&snap.snapshot_id),
        )
        .await
        .unwrap();
    let rdev = env.mount(&restored.volume_id, "rdev", cap.clone()).await;
    let mut back = vec![0; 1 << 20];
    let mut f = fs::File::open(&rdev).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.read_exact(&mut back).unwrap();
    drop(f);
    assert_eq!(back, payload(7, 1 << 20));
    env.unmount(&restored.volume_id, "rdev").await;
    env.unmount(&src, "dev").await;
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_grows_online() {
    let mut env = TestEnv::start().await;
    let cap = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = env.create("grow", 320 * MIB, cap.clone()).await.volume_id;
    let mnt = env.mount(&id, "xfs", cap.clone()).await;
    fs::write(format!("{mnt}/kept"), b"kept").unwrap();
    let before = fs_total(&mnt);

    let r = env.expand(&id, 640 * MIB).await.unwrap();
    assert_eq!(r.capacity_bytes, 640 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(
        env.expand(&id, 640 * MIB).await.unwrap().capacity_bytes,
        640 * MIB,
        "idempotent"
    );
    assert_eq!(
        env.node_expand(&id, &mnt, 640 * MIB).await.unwrap(),
        640 * MIB
    );
    assert_eq!(
        env.node_expand(&id, &mnt, 640 * MIB).await.unwrap(),
        640 * MIB,
        "idempotent"
    );
    let after = fs_total(&mnt);
    assert!(after > before + (250 << 20), "{before} -> {after}");
    assert_eq!(fs::read(format!("{mnt}/kept")).unwrap(), b"kept");
    assert!(
        !env.expand(&id, 640 * MIB)
            .await
            .unwrap()
            .node_expansion_required
    );

    assert_eq!(
        code(env.expand(&id, 100 * MIB).await),
        Code::Ok,
        "already larger: OK"
    );
    env.unmount(&id, "xfs").await;
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_grows_at_stage_when_the_kernel_refuses_online_growth() {
    let mut env = TestEnv::start().await;
    let cap = ext4();
    let id = env.create("grow", 64 * MIB, cap.clone()).await.volume_id;
    let mnt = env.mount(&id, "ext4", cap.clone()).await;
    fs::write(format!("{mnt}/kept"), b"kept").unwrap();
    let before = fs_total(&mnt);
    assert!(
        env.expand(&id, 128 * MIB)
            .await
            .unwrap()
            .node_expansion_required
    );
    match env.node_expand(&id, &mnt, 128 * MIB).await {
        Ok(bytes) => assert_eq!(bytes, 128 * MIB),
        Err(s) => {
            // This kernel refuses online ext4 growth: a clear error, and growth at stage.
            assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
            assert!(
                s.message().contains("EPERM") && s.message().contains("stage"),
                "{s:?}"
            );
            env.unmount(&id, "ext4").await;
            env.mount(&id, "ext4", cap.clone()).await;
        }
    }
    let after = fs_total(&mnt);
    assert!(after > before + (50 << 20), "{before} -> {after}");
    assert_eq!(fs::read(format!("{mnt}/kept")).unwrap(), b"kept");
    env.unmount(&id, "ext4").await;
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rpcs_follow_the_spec() {
    let mut env = TestEnv::start().await;
    let a = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let b = env.create("b", 16 * MIB, ext4()).await.volume_id;
    assert_eq!(code(env.snapshot("", &a).await), Code::InvalidArgument);
    assert_eq!(code(env.snapshot("s", "").await), Code::InvalidArgument);
    assert_eq!(
        code(env.snapshot("s", "vol-0123456789abcdef01234567").await),
        Code::NotFound
    );
    let s1 = env.snapshot("s1", &a).await.unwrap();
    assert_eq!(env.snapshot("s1", &a).await.unwrap(), s1, "idempotent");
    assert_eq!(code(env.snapshot("s1", &b).await), Code::AlreadyExists);
    let s2 = env.snapshot("s2", &a).await.unwrap();
    let s3 = env.snapshot("s3", &b).await.unwrap();

    let list = |max: i32, token: &str, snap: &str, source: &str| csi::ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        snapshot_id: snap.into(),
        source_volume_id: source.into(),
        secrets: Default::default(),
    };
    let c = &mut env.csi.controller;
    let ids = |r: &csi::ListSnapshotsResponse| -> Vec<String> {
        r.entries
            .iter()
            .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
            .collect()
    };
    let all = c
        .list_snapshots(list(0, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 3);
    let p1 = c
        .list_snapshots(list(2, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    let p2 = c
        .list_snapshots(list(2, &p1.next_token, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let mut seen = ids(&p1);
    seen.extend(ids(&p2));
    seen.sort();
    let mut want = vec![
        s1.snapshot_id.clone(),
        s2.snapshot_id.clone(),
        s3.snapshot_id.clone(),
    ];
    want.sort();
    assert_eq!(seen, want);
    let of_a = c
        .list_snapshots(list(1, "", "", &a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_a.entries.len(), 1);
    let of_a2 = c
        .list_snapshots(list(1, &of_a.next_token, "", &a))
        .await
        .unwrap()
        .into_inner();
    let mut got = ids(&of_a);
    got.extend(ids(&of_a2));
    got.sort();
    let mut want_a = vec![s1.snapshot_id.clone(), s2.snapshot_id.clone()];
    want_a.sort();
    assert_eq!(got, want_a);
    let one = c
        .list_snapshots(list(0, "", &s3.snapshot_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&one), vec![s3.snapshot_id.clone()]);
    let none = c
        .list_snapshots(list(0, "", "snap-0123456789abcdef01234567", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    assert_eq!(
        code(c.list_snapshots(list(0, "bogus", "", "")).await),
        Code::Aborted
    );

    let get = |id: &str| csi::GetSnapshotRequest {
        snapshot_id: id.into(),
        secrets: Default::default(),
    };
    assert_eq!(
        c.get_snapshot(get(&s2.snapshot_id))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap(),
        s2
    );
    assert_eq!(
        code(c.get_snapshot(get("snap-0123456789abcdef01234567")).await),
        Code::NotFound
    );
    assert_eq!(code(c.get_snapshot(get("")).await), Code::InvalidArgument);

    let del = |id: &str| csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(c.delete_snapshot(del("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.delete_snapshot(del("snap-0123456789abcdef01234567"))
                .await
        ),
        Code::Ok
    );
    for s in [&s1, &s2, &s3] {
        c.delete_snapshot(del(&s.snapshot_id)).await.unwrap();
        c.delete_snapshot(del(&s.snapshot_id)).await.unwrap();
    }
    assert!(
        c.list_snapshots(list(0, "", "", ""))
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );

    // A restore must fit the snapshot.
    let s4 = env.snapshot("s4", &a).await.unwrap();
    let mut small = create_req("small", 0, ext4());
    small.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 8 * MIB,
    });
    small.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&s4.snapshot_id)),
    });
    assert_eq!(
        code(env.csi.controller.create_volume(small).await),
        Code::OutOfRange
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_rpcs_follow_the_spec() {
    let mut env = TestEnv::start().await;
    let id = env.create("a", 32 * MIB, ext4()).await.volume_id;
    assert_eq!(
        code(env.expand("vol-0123456789abcdef01234567", 64 * MIB).await),
        Code::NotFound
    );
    assert_eq!(code(env.expand("", 64 * MIB).await), Code::InvalidArgument);
    let no_range = env
        .csi
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(no_range), Code::InvalidArgument);
    let shrink = env
        .csi
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 16 * MIB,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(shrink), Code::OutOfRange);
    // Not formatted yet: nothing for the node to grow; the first stage formats the full size.
    let r = env.expand(&id, 64 * MIB).await.unwrap();
    assert!(!r.node_expansion_required);
    assert_eq!(
        code(env.node_expand(&id, &env.path("x"), 64 * MIB).await),
        Code::NotFound,
        "not staged or published there"
    );
    assert_eq!(
        code(
            env.node_expand("vol-0123456789abcdef01234567", &env.path("x"), 0)
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(env.node_expand(&id, "", 0).await),
        Code::InvalidArgument
    );
    // Staged: NodeExpandVolume grows the volume itself (the node-only expansion the
    // Kubernetes install uses) and its filesystem (xfs: this sandbox cannot grow a mounted
    // ext4, lacking CAP_SYS_RESOURCE).
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = env.create("x", 320 * MIB, xfs.clone()).await.volume_id;
    let staging = env.path("stage");
    env.stage(&id, &staging, xfs).await.unwrap();
    assert_eq!(
        code(env.node_expand(&id, "some/path", 128 * MIB).await),
        Code::NotFound
    );
    let before = fs_size(&staging);
    assert_eq!(
        env.node_expand(&id, &staging, 400 * MIB).await.unwrap(),
        400 * MIB
    );
    let after = fs_size(&staging);
    assert!(
        after >= before + 70 * MIB as u64,
        "the filesystem grew from {before} to {after} bytes"
    );
    let shrink = env
        .csi
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: staging.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 16 * MIB,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(shrink), Code::OutOfRange);
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_clones_and_snapshots_of_one_source_all_succeed_while_its_delete_waits() {
    // Every create holds its source for an extra second, so the clones overlap.
    let mut env = TestEnv::start_with(Some("delay:create:after-data=1000")).await;
    let source = env.create("source", 32 * MIB, ext4()).await.volume_id;
    // Staged and mounted: the snapshots freeze it, one at a time.
    let staging = env.path("staging");
    env.stage(&source, &staging, ext4()).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..4 {
        let mut c = env.csi.clone();
        let mut req = create_req(&format!("clone-{n}"), 32 * MIB, ext4());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(volume_source(&source)),
        });
        calls.spawn(async move { c.controller.create_volume(req).await.map(drop) });
    }
    for n in 0..3 {
        let mut c = env.csi.clone();
        let req = csi::CreateSnapshotRequest {
            source_volume_id: source.clone(),
            name: format!("snap-{n}"),
            ..Default::default()
        };
        calls.spawn(async move { c.controller.create_snapshot(req).await.map(drop) });
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    // A change to the source is refused while it is read; retried later, it goes through.
    assert_eq!(code(env.unstage(&source, &staging).await), Code::Aborted);
    while let Some(done) = calls.join_next().await {
        done.unwrap().unwrap();
    }
    env.unstage(&source, &staging).await.unwrap();
    let listed = env
        .csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 5);
    let snaps = env
        .csi
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 3);
    // The restore of a snapshot shares it the same way: a delete of the snapshot waits.
    let snap = snaps.entries[0].snapshot.clone().unwrap().snapshot_id;
    let mut restores = tokio::task::JoinSet::new();
    for n in 0..3 {
        let mut c = env.csi.clone();
        let mut req = create_req(&format!("restore-{n}"), 32 * MIB, ext4());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(snapshot_source(&snap)),
        });
        restores.spawn(async move { c.controller.create_volume(req).await.map(drop) });
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let delete = csi::DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(env.csi.controller.delete_snapshot(delete.clone()).await),
        Code::Aborted
    );
    while let Some(done) = restores.join_next().await {
        done.unwrap().unwrap();
    }
    env.csi.controller.delete_snapshot(delete).await.unwrap();
    env.assert_clean();
}

/// A pre-provisioned (imported) snapshot, as Kubernetes uses one: a VolumeSnapshotContent
/// names the snapshot by id; csi-snapshotter on its node asks for its status with
/// ListSnapshots(snapshot_id) and the restore is a CreateVolume from it. Here the snapshot was
/// taken by an earlier server on the pool, so nothing but its id and the pool carry over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_snapshot_is_found_by_id_and_restores() {
    let mut env = TestEnv::start().await;
    let id = env.create("source", 32 * MIB, ext4()).await.volume_id;
    let (staging, target) = (env.path("staging"), env.path("target"));
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    fs::write(format!("{target}/kept"), b"imported data").unwrap();
    let snap = env.snapshot("taken-elsewhere", &id).await.unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.restart(None).await;

    let listed = env
        .csi
        .controller
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let found = listed.entries[0].snapshot.clone().unwrap();
    assert_eq!(found, snap);
    assert!(found.ready_to_use && found.size_bytes == 32 * MIB);
    let got = env
        .csi
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap(), snap);

    let mut req = create_req("restored", 32 * MIB, ext4());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&snap.snapshot_id)),
    });
    let restored = env
        .csi
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    env.stage(&restored.volume_id, &staging, ext4())
        .await
        .unwrap();
    env.publish(&restored.volume_id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    assert_eq!(
        fs::read(format!("{target}/kept")).unwrap(),
        b"imported data"
    );
    env.unpublish(&restored.volume_id, &target).await.unwrap();
    env.unstage(&restored.volume_id, &staging).await.unwrap();
    env.assert_clean();
}
