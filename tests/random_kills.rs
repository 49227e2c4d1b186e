//! Random kills: SIGKILL at instants nobody chose, under kubelet-like clients that retry
//! every call as the kubelet and the sidecars do; every lifecycle completes, fsynced data
//! survives, nothing is left.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::namespaces::*;
use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata::client::{Csi, connect};
use strata::endpoint::Endpoint;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{FileId, LoopDevices};
use tonic::Code;

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
