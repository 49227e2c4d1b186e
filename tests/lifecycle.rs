//! Full volume lifecycles against the real server with real mounts and loop devices.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{LoopDevices, Mounter};

async fn stats(env: &mut TestEnv, id: &str, path: &str) -> csi::NodeGetVolumeStatsResponse {
    env.csi
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            staging_target_path: String::new(),
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner()
}

async fn filesystem_lifecycle(fs_type: &str, size: i64) {
    let mut env = TestEnv::start().await;
    let cap = mount_cap(fs_type, Mode::SingleNodeMultiWriter);
    let vol = env.create("fs-volume", size, cap.clone()).await;
    assert_eq!(vol.capacity_bytes, size);
    let id = vol.volume_id;
    let (staging, rw, ro) = (env.path("staging"), env.path("rw"), env.path("ro"));
    fs::create_dir(&staging).unwrap();

    env.stage(&id, &staging, cap.clone()).await.unwrap();
    env.stage(&id, &staging, cap.clone())
        .await
        .expect("stage is idempotent");
    env.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .unwrap();
    env.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .expect("publish is idempotent");
    env.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();

    let staged = LinuxHost
        .mounts()
        .unwrap()
        .into_iter()
        .find(|m| m.mount_point.to_str() == Some(&staging))
        .unwrap();
    assert_eq!(staged.fs_type, fs_type);

    // Data written through one target is visible through the other; the read-only one refuses writes.
    let payload: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let mut f = fs::File::create(format!("{rw}/data")).unwrap();
    f.write_all(&payload).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(format!("{ro}/data")).unwrap(), payload);
    let err = fs::write(format!("{ro}/nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    let s = stats(&mut env, &id, &rw).await;
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert!(
        bytes.total > 0 && bytes.used >= 1 << 20 && bytes.available > 0,
        "{s:?}"
    );
    assert!(
        s.usage
            .iter()
            .any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32)
    );
    assert!(!s.volume_condition.unwrap().abnormal);

    // Staged and published volumes cannot be deleted or unstaged.
    let err = env.delete(&id).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = env.unstage(&id, &staging).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    for target in [&rw, &ro] {
        env.unpublish(&id, target).await.unwrap();
        env.unpublish(&id, target)
            .await
            .expect("unpublish is idempotent");
        assert!(
            !std::path::Path::new(target).exists(),
            "target path removed"
        );
    }
    env.unstage(&id, &staging).await.unwrap();
    env.unstage(&id, &staging)
        .await
        .expect("unstage is idempotent");
    env.assert_clean();

    // Staging again finds the filesystem and the data: no reformat.
    env.stage(&id, &staging, cap.clone()).await.unwrap();
    assert_eq!(fs::read(format!("{staging}/data")).unwrap(), payload);
    env.unstage(&id, &staging).await.unwrap();

    env.delete(&id).await.unwrap();
    env.delete(&id).await.expect("delete is idempotent");
    env.assert_clean();
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_volume_lifecycle() {
    filesystem_lifecycle("ext4", 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_lifecycle() {
    // mkfs.xfs refuses filesystems under 300 MiB.
    filesystem_lifecycle("xfs", 320 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_lifecycle() {
    let mut env = TestEnv::start().await;
    let cap = block_cap(Mode::SingleNodeMultiWriter);
    let id = env
        .create("block-volume", 32 * MIB, cap.clone())
        .await
        .volume_id;
    let (staging, target) = (env.path("staging"), env.path("pods/dev"));
    fs::create_dir(&staging).unwrap();
    fs::create_dir(env.path("pods")).unwrap();

    env.stage(&id, &staging, cap.clone()).await.unwrap();
    env.stage(&id, &staging, cap.clone()).await.unwrap();
    env.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    env.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();

    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    {
        let mut dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        assert_eq!(dev.seek(SeekFrom::End(0)).unwrap(), 32 << 20);
        dev.seek(SeekFrom::Start(1 << 20)).unwrap();
        dev.write_all(&pattern).unwrap();
        dev.sync_all().unwrap();
        let mut back = vec![0; pattern.len()];
        dev.seek(SeekFrom::Start(1 << 20)).unwrap();
        dev.read_exact(&mut back).unwrap();
        assert_eq!(back, pattern);
    }
    let s = stats(&mut env, &id, &target).await;
    assert_eq!(s.usage.len(), 1);
    assert_eq!(s.usage[0].total, 32 << 20);

    // A block volume holding data is never formatted by a filesystem stage.
    let err = env
        .stage(&id, &env.path("fs-staging"), ext4())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    env.unpublish(&id, &target).await.unwrap();
    assert!(!std::path::Path::new(&target).exists());
    env.unstage(&id, &staging).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
    env.delete(&id).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_stage_and_publish_restore_volumes_after_a_reboot() {
    let mut env = TestEnv::start().await;
    let cap = ext4();
    let id = env
        .create("survivor", 64 * MIB, cap.clone())
        .await
        .volume_id;
    let (staging, target) = (env.path("staging"), env.path("target"));
    env.stage(&id, &staging, cap.clone()).await.unwrap();
    env.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    fs::write(format!("{target}/kept"), b"still here").unwrap();
    LinuxHost.mounts().unwrap();
    // The node reboots: the driver stops, every mount and loop device is gone.
    env.stop();
    for _ in 0..4 {
        for p in [&target, &staging] {
            LinuxHost
                .unmount(&mut strata_core::os::NodePath::trusted(
                    std::path::Path::new(p),
                ))
                .unwrap();
        }
    }
    for dev in LinuxHost.list().unwrap() {
        if dev.backing_file.starts_with(env.dir.path()) {
            LinuxHost.detach(&dev).unwrap();
        }
    }
    env.assert_clean();
    env.restart(None).await;

    // The orchestrator repeats its calls.
    env.stage(&id, &staging, cap.clone()).await.unwrap();
    env.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(fs::read(format!("{target}/kept")).unwrap(), b"still here");
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.delete(&id).await.unwrap();
    env.assert_clean();
}

/// NodePublishVolume of an inline ephemeral volume, as the kubelet sends it: its own handle,
/// no staging path, the pod's volumeAttributes and `csi.storage.k8s.io/ephemeral`.
fn inline_publish(
    handle: &str,
    target: &str,
    attributes: &[(&str, &str)],
) -> csi::NodePublishVolumeRequest {
    let mut context: std::collections::HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    context.insert("csi.storage.k8s.io/pod.name".into(), "inline-pod".into());
    csi::NodePublishVolumeRequest {
        volume_id: handle.into(),
        target_path: target.into(),
        volume_capability: Some(mount_cap("", Mode::SingleNodeWriter)),
        volume_context: context,
        ..Default::default()
    }
}

async fn volume_names(env: &mut TestEnv) -> Vec<String> {
    env.csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_ephemeral_volume_lives_and_dies_with_its_publish() {
    let mut env = TestEnv::start().await;
    let target = env.path("pod/volumes/inline");
    let handle = "csi-6a7f2b0c9d1e4f55aa0123456789abcdef0123456789abcdef0123456789ab";
    let req = inline_publish(handle, &target, &[("size", "64Mi"), ("fsType", "xfs")]);
    env.csi.node.node_publish_volume(req.clone()).await.unwrap();
    // A retry (the kubelet's, after a timeout) is a no-op.
    env.csi.node.node_publish_volume(req).await.unwrap();
    fs::write(format!("{target}/data"), b"scratch").unwrap();
    // Counted like any volume; xfs got its minimum size.
    let ids = volume_names(&mut env).await;
    assert_eq!(ids.len(), 1);
    assert!(
        fs_size(&target) > 200 * MIB as u64,
        "an xfs of at least 300 MiB"
    );
    node_unpublish(&mut env.csi, handle, &target).await.unwrap();
    node_unpublish(&mut env.csi, handle, &target).await.unwrap();
    assert!(
        !std::path::Path::new(&target).exists(),
        "the target the publish made is gone"
    );
    assert!(
        volume_names(&mut env).await.is_empty(),
        "deleted with its publish"
    );
    env.assert_clean();
    assert!(env.pool_entries().is_empty());

    // Bad attributes are refused before anything is made.
    for attrs in [
        vec![("size", "lots")],
        vec![("color", "blue")],
        vec![("fsType", "ntfs")],
    ] {
        let err = env
            .csi
            .node
            .node_publish_volume(inline_publish("csi-bad", &target, &attrs))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{attrs:?}");
    }
    let mut ro = inline_publish("csi-ro", &target, &[]);
    ro.readonly = true;
    assert_eq!(
        code(env.csi.node.node_publish_volume(ro).await),
        tonic::Code::InvalidArgument
    );
    assert!(volume_names(&mut env).await.is_empty());
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_an_inline_volumes_publish_or_unpublish_leaves_nothing_behind() {
    let handle = "csi-00112233445566778899aabbccddeeff00112233445566778899aabbccddee";
    for point in [
        "ephemeral:after-create",
        "stage:after-format",
        "ephemeral:before-delete",
    ] {
        let unpublishing = point == "ephemeral:before-delete";
        let mut env = TestEnv::start_with(if unpublishing { None } else { Some(point) }).await;
        let target = env.path("pod/volumes/inline");
        let req = inline_publish(handle, &target, &[("size", "32Mi")]);
        if unpublishing {
            env.csi.node.node_publish_volume(req.clone()).await.unwrap();
            env.restart(Some(point)).await;
            let _ = node_unpublish(&mut env.csi, handle, &target).await;
        } else {
            let _ = env.csi.node.node_publish_volume(req.clone()).await;
        }
        env.wait_for_exit();
        env.restart(None).await;
        // The kubelet retries what it was doing: the publish, or the unpublish.
        if !unpublishing {
            env.csi.node.node_publish_volume(req).await.unwrap();
        }
        node_unpublish(&mut env.csi, handle, &target).await.unwrap();
        assert!(volume_names(&mut env).await.is_empty(), "{point}");
        assert!(env.pool_entries().is_empty(), "{point}");
        env.assert_clean();
    }
}

fn with_group(gid: &str) -> csi::VolumeCapability {
    let mut cap = ext4();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.volume_mount_group = gid.into();
    }
    cap
}

fn owner(path: &str) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(path).unwrap();
    (m.gid(), m.mode())
}

/// Kubernetes' default fsGroupChangePolicy is `Always`, and the kubelet hands the group to
/// Strata (VOLUME_MOUNT_GROUP) without saying which policy a pod has: the group is applied
/// at every stage and publish, except when no pod can have changed the files since it last
/// was (no read-write publish in between). Symlinks are never followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_fsgroup_is_applied_whenever_a_pod_may_have_changed_the_files() {
    let mut env = TestEnv::start().await;
    let id = env.create("grouped", 32 * MIB, ext4()).await.volume_id;
    let (staging, target) = (env.path("staging"), env.path("target"));
    assert_eq!(
        code(env.stage(&id, &staging, with_group("wheel")).await),
        tonic::Code::InvalidArgument
    );
    env.stage(&id, &staging, with_group("4321")).await.unwrap();
    env.publish(&id, &staging, &target, with_group("4321"), false)
        .await
        .unwrap();
    let (gid, mode) = owner(&target);
    assert_eq!(gid, 4321);
    assert_eq!(mode & 0o2070, 0o2070, "setgid and group rwx: {mode:o}");
    // The first pod: new files inherit the group (setgid); it gives one to another group
    // (the e2e suite's `chgrp 2000 file1`) and makes a symlink to a host file.
    fs::write(format!("{target}/file"), b"x").unwrap();
    assert_eq!(owner(&format!("{target}/file")).0, 4321);
    std::os::unix::fs::chown(format!("{target}/file"), None, Some(2000)).unwrap();
    let outside = env.path("outside");
    fs::write(&outside, b"host file").unwrap();
    std::os::unix::fs::symlink(&outside, format!("{target}/link")).unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    // The next pod with the same fsGroup: the pod may have changed the files, so they are
    // walked again, as the kubelet's `Always` would.
    env.stage(&id, &staging, with_group("4321")).await.unwrap();
    assert_eq!(owner(&format!("{staging}/file")).0, 4321, "walked again");
    assert_eq!(owner(&format!("{staging}/link")).0, 4321, "the link itself");
    assert_eq!(owner(&outside).0, 0, "never through the symlink");
    // No read-write publish since: a stage with the same group does not walk (the node's
    // root changing a file by hand is not a pod).
    std::os::unix::fs::chown(format!("{staging}/file"), None, Some(0)).unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.stage(&id, &staging, with_group("4321")).await.unwrap();
    assert_eq!(owner(&format!("{staging}/file")).0, 0, "not walked again");
    // A read-only publish lets no pod change anything: still not walked.
    env.publish(&id, &staging, &target, with_group("4321"), true)
        .await
        .unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.stage(&id, &staging, with_group("4321")).await.unwrap();
    assert_eq!(
        owner(&format!("{staging}/file")).0,
        0,
        "not walked after a ro publish"
    );
    // Another group: walked once more.
    env.unstage(&id, &staging).await.unwrap();
    env.stage(&id, &staging, with_group("5678")).await.unwrap();
    let (gid, mode) = owner(&format!("{staging}/file"));
    assert_eq!(gid, 5678);
    assert_eq!(mode & 0o060, 0o060, "group read-write");
    assert_eq!(owner(&outside).0, 0, "never through the symlink");
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}
