//! Group snapshots with real filesystems: crash consistency under a live writer on every
//! backend that claims it, the freeze limit, every crash point of the group path, and the
//! backends that refuse or do not offer groups.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use tonic::Code;

fn group_req(name: &str, ids: &[String]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.to_vec(),
        ..Default::default()
    }
}

fn snapshot_ids(group: &csi::VolumeGroupSnapshot) -> Vec<String> {
    group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect()
}

/// The member of `group` taken from `volume`.
fn member<'a>(group: &'a csi::VolumeGroupSnapshot, volume: &str) -> &'a csi::Snapshot {
    group
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == volume)
        .expect("a member per source")
}

const COUNTER: &str = "counter";

fn write_counter(file: &fs::File, n: u64) -> std::io::Result<()> {
    file.write_all_at(format!("{n:020}\n").as_bytes(), 0)?;
    file.sync_data()
}

fn read_counter(dir: &str) -> u64 {
    let text = fs::read_to_string(format!("{dir}/{COUNTER}")).unwrap();
    text.trim().parse().unwrap_or_else(|_| panic!("{text:?}"))
}

impl TestEnv {
    async fn group(
        &mut self,
        name: &str,
        ids: &[String],
    ) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
        self.csi
            .groups
            .create_volume_group_snapshot(group_req(name, ids))
            .await
            .map(|r| r.into_inner().group_snapshot.unwrap())
    }

    async fn delete_group(&mut self, group: &csi::VolumeGroupSnapshot) {
        self.csi
            .groups
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: group.group_snapshot_id.clone(),
                snapshot_ids: snapshot_ids(group),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }

    async fn snapshots_listed(&mut self) -> Vec<csi::Snapshot> {
        self.csi
            .controller
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|e| e.snapshot)
            .collect()
    }

    /// Restores `snapshot` as a new volume, mounts it as a workload would, and returns what
    /// `read` finds there; everything is torn down again.
    async fn read_restored<T>(
        &mut self,
        snapshot: &csi::Snapshot,
        cap: csi::VolumeCapability,
        read: impl FnOnce(&str) -> T,
    ) -> T {
        let vol = self
            .restore(
                &format!("restore-{}", snapshot.snapshot_id),
                64 * MIB,
                cap.clone(),
                snapshot_source(&snapshot.snapshot_id),
            )
            .await
            .expect("restore a member");
        let target = self.mount(&vol.volume_id, "restored", cap).await;
        let found = read(&target);
        self.unmount(&vol.volume_id, "restored").await;
        self.delete(&vol.volume_id).await.unwrap();
        found
    }

    /// Entries of a pool directory other than `volumes/`, once background removal settled.
    fn pool_dir_entries(&self, dir: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let v: Vec<String> = fs::read_dir(self.pool().join(dir))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if v.is_empty() || std::time::Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Creates, stages and publishes volumes named `names`, returning ids and published paths.
async fn mounted(
    env: &mut TestEnv,
    names: &[&str],
    cap: &csi::VolumeCapability,
) -> Vec<(String, String)> {
    let mut out = vec![];
    for name in names {
        let id = env.create(name, 64 * MIB, cap.clone()).await.volume_id;
        let target = env.mount(&id, name, cap.clone()).await;
        out.push((id, target));
    }
    out
}

async fn unmounted(env: &mut TestEnv, volumes: &[(String, String)], names: &[&str]) {
    for ((id, _), name) in volumes.iter().zip(names) {
        env.unmount(id, name).await;
        env.delete(id).await.unwrap();
    }
}

/// A writer that increments a counter in A, fsyncs, then the same counter in B, fsyncs, in a
/// loop: at any single instant A = B or A = B + 1.
struct Writer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Writer {
    fn start(a: &str, b: &str) -> Writer {
        let open = |dir: &str| {
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(format!("{dir}/{COUNTER}"))
                .unwrap();
            write_counter(&f, 0).unwrap();
            fs::File::open(dir).unwrap().sync_all().unwrap();
            f
        };
        let (fa, fb) = (open(a), open(b));
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                write_counter(&fa, n)?;
                write_counter(&fb, n)?;
                r.store(n, Ordering::Relaxed);
            }
            Ok(())
        });
        Writer {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap().unwrap();
        self.rounds.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

const ROUNDS: usize = 20;

/// The test of consistency: group snapshots taken while the writer runs, each restored pair
/// read back through CSI, must show A = B or A = B + 1.
async fn counters_agree_in_every_group_snapshot(mut env: TestEnv, fs_type: &str) {
    let cap = mount_cap(fs_type, Mode::SingleNodeWriter);
    let names = ["a", "b"];
    let volumes = mounted(&mut env, &names, &cap).await;
    let ids: Vec<String> = volumes.iter().map(|(id, _)| id.clone()).collect();
    let writer = Writer::start(&volumes[0].1, &volumes[1].1);
    let mut groups = vec![];
    for round in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(15)).await;
        let g = env
            .group(&format!("round-{round}"), &ids)
            .await
            .expect("group snapshot under load");
        assert_eq!(g.snapshots.len(), 2);
        groups.push(g);
    }
    let written = writer.finish();
    assert!(written > 0, "the writer ran");
    let mut seen = vec![];
    for g in &groups {
        let a = env
            .read_restored(member(g, &ids[0]), cap.clone(), read_counter)
            .await;
        let b = env
            .read_restored(member(g, &ids[1]), cap.clone(), read_counter)
            .await;
        assert!(
            a == b || a == b + 1,
            "group {} is not one instant: A = {a}, B = {b}",
            g.group_snapshot_id
        );
        seen.push(a);
    }
    // The snapshots caught the writer mid-stream, not only before or after it.
    seen.dedup();
    assert!(
        seen.len() > 1,
        "every snapshot saw the same counter: {seen:?}"
    );
    for g in &groups {
        env.delete_group(g).await;
    }
    unmounted(&mut env, &volumes, &names).await;
    assert!(env.snapshots_listed().await.is_empty());
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_agree_in_every_group_snapshot_by_sparse_copy_on_ext4() {
    counters_agree_in_every_group_snapshot(TestEnv::start().await, "ext4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_agree_in_every_group_snapshot_by_reflink_on_xfs() {
    let env = TestEnv::start_pool(PoolKind::ImageOnXfs).await;
    counters_agree_in_every_group_snapshot(env, "xfs").await;
}

/// A group whose copies outlast `--freeze-limit-ms` is thawed at the limit and dropped
/// whole; the same call succeeds once the copies are fast again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_outlasting_the_freeze_limit_is_thawed_and_dropped() {
    let args = ["--freeze-limit-ms", "300"];
    let mut env = TestEnv::start_with_args(&args, Some("delay:group:after-first-copy=1500")).await;
    let cap = ext4();
    let names = ["a", "b"];
    let volumes = mounted(&mut env, &names, &cap).await;
    let ids: Vec<String> = volumes.iter().map(|(id, _)| id.clone()).collect();
    let err = env.group("slow", &ids).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("--freeze-limit-ms"), "{err:?}");
    for (_, target) in &volumes {
        assert_not_frozen(target);
    }
    assert!(env.snapshots_listed().await.is_empty(), "nothing kept");
    assert!(env.pool_dir_entries("groups").is_empty());
    assert!(env.pool_dir_entries("snapshots").is_empty());
    assert!(
        env.server_log().contains("outlasted the freeze limit"),
        "the overrun is logged"
    );

    env.restart(None).await;
    let g = env.group("slow", &ids).await.expect("retried in time");
    assert_eq!(g.snapshots.len(), 2);
    env.delete_group(&g).await;
    unmounted(&mut env, &volumes, &names).await;
    env.assert_clean();
}

/// Every crash point of the group path: after SIGKILL and a restart no filesystem is
/// frozen, no half group is visible, the retried call succeeds, and its members hold the
/// data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_crash_point_leaves_no_half_group_and_the_retry_succeeds() {
    const POINTS: &[&str] = &[
        "group:frozen",
        "group:after-first-copy",
        "group:before-thaw",
        "group:before-commit",
    ];
    for point in POINTS {
        let mut env = TestEnv::start().await;
        let cap = ext4();
        let names = ["a", "b"];
        let volumes = mounted(&mut env, &names, &cap).await;
        let ids: Vec<String> = volumes.iter().map(|(id, _)| id.clone()).collect();
        for (i, (_, target)) in volumes.iter().enumerate() {
            fs::write(format!("{target}/data"), payload(i as u8, 4096)).unwrap();
            fs::File::open(target).unwrap().sync_all().unwrap();
        }
        env.restart(Some(point)).await;
        let mut groups = env.csi.groups.clone();
        let req = group_req("g", &ids);
        let err = groups
            .create_volume_group_snapshot(req)
            .await
            .expect_err("the server dies at the crash point");
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{point}: {err:?}"
        );
        env.wait_for_exit();

        env.restart(None).await;
        for (_, target) in &volumes {
            assert_not_frozen(target);
        }
        assert!(
            env.snapshots_listed().await.is_empty(),
            "{point}: a half group is visible"
        );
        assert!(env.pool_dir_entries("groups").is_empty(), "{point}");
        assert!(env.pool_dir_entries("snapshots").is_empty(), "{point}");

        let g = env
            .group("g", &ids)
            .await
            .expect("the retried call succeeds");
        assert_eq!(g.snapshots.len(), 2, "{point}");
        for (i, id) in ids.iter().enumerate() {
            let data = env
                .read_restored(member(&g, id), cap.clone(), |t| {
                    fs::read(format!("{t}/data")).unwrap()
                })
                .await;
            assert_eq!(data, payload(i as u8, 4096), "{point}");
        }
        env.delete_group(&g).await;
        unmounted(&mut env, &volumes, &names).await;
        env.assert_clean();
    }
}

/// A raw block volume in a group is copied in the same window as the frozen filesystems (a
/// freeze cannot stop its writers): what was written and synced before the group is in its
/// member, beside the filesystem member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_in_a_group_is_captured_with_the_filesystems() {
    let mut env = TestEnv::start_pool(PoolKind::ImageOnXfs).await;
    let (fs_cap, blk_cap) = (ext4(), block_cap(Mode::SingleNodeWriter));
    let fs_id = env.create("fs", 64 * MIB, fs_cap.clone()).await.volume_id;
    let blk_id = env.create("blk", 64 * MIB, blk_cap.clone()).await.volume_id;
    let dir = env.mount(&fs_id, "fs", fs_cap.clone()).await;
    let dev = env.mount(&blk_id, "blk", blk_cap.clone()).await;
    fs::write(format!("{dir}/data"), payload(1, 4096)).unwrap();
    fs::File::open(&dir).unwrap().sync_all().unwrap();
    let device = fs::OpenOptions::new().write(true).open(&dev).unwrap();
    device.write_all_at(&payload(2, 1 << 20), 1 << 20).unwrap();
    device.sync_all().unwrap();
    drop(device);
    let g = env
        .group("mixed", &[fs_id.clone(), blk_id.clone()])
        .await
        .expect("a group of a filesystem and a block volume");
    let on_fs = env
        .read_restored(member(&g, &fs_id), fs_cap, |t| {
            fs::read(format!("{t}/data")).unwrap()
        })
        .await;
    assert_eq!(on_fs, payload(1, 4096));
    let on_blk = env
        .read_restored(member(&g, &blk_id), blk_cap, |t| {
            let mut back = vec![0; 1 << 20];
            std::os::unix::fs::FileExt::read_exact_at(
                &fs::File::open(t).unwrap(),
                &mut back,
                1 << 20,
            )
            .unwrap();
            back
        })
        .await;
    assert_eq!(on_blk, payload(2, 1 << 20));
    env.delete_group(&g).await;
    env.unmount(&fs_id, "fs").await;
    env.unmount(&blk_id, "blk").await;
    for id in [&fs_id, &blk_id] {
        env.delete(id).await.unwrap();
    }
    env.assert_clean();
}

/// A crash between retiring a group and removing its members: startup finishes the delete,
/// and the retried delete succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_deleting_a_group_is_finished_at_startup() {
    let mut env = TestEnv::start().await;
    let ids = vec![
        env.create("a", 16 * MIB, ext4()).await.volume_id,
        env.create("b", 16 * MIB, ext4()).await.volume_id,
    ];
    let g = env.group("g", &ids).await.unwrap();
    env.restart(Some("group:after-retire")).await;
    let mut groups = env.csi.groups.clone();
    let req = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: g.group_snapshot_id.clone(),
        snapshot_ids: snapshot_ids(&g),
        secrets: Default::default(),
    };
    let err = groups
        .delete_volume_group_snapshot(req.clone())
        .await
        .expect_err("the server dies at the crash point");
    assert_ne!(err.code(), Code::Ok);
    env.wait_for_exit();
    env.restart(None).await;
    assert!(env.snapshots_listed().await.is_empty());
    assert!(env.pool_dir_entries("groups").is_empty());
    assert!(env.pool_dir_entries("snapshots").is_empty());
    env.csi
        .groups
        .delete_volume_group_snapshot(req)
        .await
        .expect("the retried delete succeeds");
    for id in &ids {
        env.delete(id).await.unwrap();
    }
    env.assert_clean();
}

/// btrfs snapshots one subvolume atomically but cannot freeze several together: a group of
/// one is taken and restores, a group of several is refused with FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_takes_groups_of_one_volume_and_refuses_several() {
    let mut env = TestEnv::start_pool(PoolKind::BtrfsOnBtrfs).await;
    let cap = mount_cap("", Mode::SingleNodeWriter);
    let names = ["a", "b"];
    let volumes = mounted(&mut env, &names, &cap).await;
    let ids: Vec<String> = volumes.iter().map(|(id, _)| id.clone()).collect();
    let err = env.group("both", &ids).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("one volume per group"), "{err:?}");
    let writer = Writer::start(&volumes[0].1, &volumes[1].1);
    let g = env.group("one", &ids[..1]).await.expect("a group of one");
    writer.finish();
    let found = env
        .read_restored(&g.snapshots[0], cap.clone(), read_counter)
        .await;
    assert!(found <= read_counter(&volumes[0].1));
    env.delete_group(&g).await;
    unmounted(&mut env, &volumes, &names).await;
    env.assert_clean();
}

/// The dir backend copies file by file, so it offers no group snapshots: not advertised,
/// and the calls say so (UNIMPLEMENTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dir_backend_does_not_offer_group_snapshots() {
    let mut env = TestEnv::start_pool(PoolKind::DirOnExt4).await;
    use csi::plugin_capability::service::Type as Service;
    assert!(
        !plugin_services(&mut env.csi)
            .await
            .contains(&(Service::GroupControllerService as i32))
    );
    let caps = env
        .csi
        .groups
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.is_empty());
    let id = env
        .create("a", 16 * MIB, mount_cap("", Mode::SingleNodeWriter))
        .await
        .volume_id;
    let err = env.group("g", std::slice::from_ref(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    env.delete(&id).await.unwrap();
}
