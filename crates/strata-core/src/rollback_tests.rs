//! Every rollback branch of stage, publish, create, snapshot and expansion, reached through a
//! host failure injected into the fake host ([`FakeHost::fail_next`]): the call fails with
//! the host's error, whatever it had made is undone (no loop device, mount, half-made volume
//! or snapshot, frozen filesystem), and the retry succeeds.
//!
//! [`FakeHost::fail_next`]: crate::os::fake::FakeHost::fail_next

use crate::controller::CreateVolume;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::model::{
    AccessMode, AccessType, Capability, CapacityRange, ContentSource, FormatState, MIB,
};
use crate::node::{PublishVolume, StageVolume};
use crate::os::HostError;
use crate::os::fake::Op;
use crate::testing::{Fixture, fixture, mount};

/// What the expansion tests grow a 16 MiB volume to.
const GROWN: CapacityRange = CapacityRange {
    required: 32 * MIB,
    limit: 0,
};

fn injected() -> HostError {
    HostError::other("injected host failure")
}

fn create(f: &Fixture, name: &str, source: Option<ContentSource>) -> Result<String> {
    f.driver
        .controller
        .create_volume(CreateVolume {
            name: name.into(),
            capabilities: vec![mount(AccessMode::SingleNodeWriter)],
            capacity: CapacityRange {
                required: 16 * MIB,
                limit: 0,
            },
            content_source: source,
            ..Default::default()
        })
        .map(|r| r.id)
}

fn block() -> Capability {
    Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    }
}

fn with_group(gid: &str) -> Capability {
    let mut cap = mount(AccessMode::SingleNodeWriter);
    if let AccessType::Mount {
        volume_mount_group, ..
    } = &mut cap.access_type
    {
        *volume_mount_group = gid.into();
    }
    cap
}

fn stage(d: &Driver, id: &str, capability: Capability) -> Result<()> {
    d.node.stage_volume(StageVolume {
        secrets: Default::default(),
        volume_id: id.into(),
        staging_path: "/stage".into(),
        capability,
    })
}

fn publish(d: &Driver, id: &str, capability: Capability, read_only: bool) -> Result<()> {
    d.node.publish_volume(PublishVolume {
        volume_id: id.into(),
        staging_path: "/stage".into(),
        target_path: "/target".into(),
        capability,
        read_only,
        consumer: Default::default(),
    })
}

/// Entries of a store directory (`volumes` or `snapshots`) that are not committed objects.
fn half_made(f: &Fixture, store: &str) -> Vec<String> {
    std::fs::read_dir(f._pool.path().join(store))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn counts(f: &Fixture) -> (usize, usize) {
    let s = f.fake.lock();
    (s.loops.len(), s.mounts.len())
}

/// Fails the next `op` and runs `call`: it must fail with the injected error and use it.
fn failing<T: std::fmt::Debug>(f: &Fixture, op: Op, call: impl FnOnce() -> Result<T>) {
    f.fake.fail_next(op, injected());
    let r = call();
    assert_eq!(r.unwrap_err(), Error::from(injected()), "{op:?}");
    assert_eq!(f.fake.failures_left(), 0, "{op:?} was reached");
}

#[test]
fn a_stage_whose_mkfs_fails_detaches_and_the_retry_formats() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    failing(&f, Op::Format, || {
        stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter))
    });
    assert_eq!(counts(&f), (0, 0), "no loop device, no mount");
    // The record says an mkfs was under way: the retry formats again, never probes it away.
    let record = f.driver.volumes.get(&id).unwrap();
    assert_eq!(record.format, FormatState::Formatting("ext4".into()));
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    assert_eq!(counts(&f), (1, 1));
}

#[test]
fn a_stage_whose_mount_or_probe_fails_detaches_and_formats_nothing_again() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    failing(&f, Op::Mount, || {
        stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter))
    });
    assert_eq!(counts(&f), (0, 0));
    assert_eq!(
        f.driver.volumes.get(&id).unwrap().format,
        FormatState::Formatted("ext4".into())
    );
    // Formatted now, so the next stage probes first; a failing probe leaves nothing either.
    failing(&f, Op::Probe, || {
        stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter))
    });
    assert_eq!(counts(&f), (0, 0));
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    assert_eq!(f.fake.lock().formats, 1);
    assert_eq!(counts(&f), (1, 1));
}

#[test]
fn a_stage_whose_attach_fails_leaves_nothing() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    failing(&f, Op::Attach, || stage(&f.driver, &id, block()));
    failing(&f, Op::Attach, || {
        stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter))
    });
    assert_eq!(counts(&f), (0, 0));
    stage(&f.driver, &id, block()).unwrap();
    assert_eq!(
        counts(&f),
        (1, 0),
        "a block volume is staged by attaching only"
    );
}

#[test]
fn a_stage_whose_group_walk_fails_walks_at_the_retry() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    failing(&f, Op::ApplyGroup, || {
        stage(&f.driver, &id, with_group("700"))
    });
    assert!(!f.driver.volumes.get(&id).unwrap().mount_group_current);
    // The filesystem stays staged (the kubelet retries the stage); the retry walks.
    stage(&f.driver, &id, with_group("700")).unwrap();
    assert_eq!(f.fake.lock().groups.len(), 1);
    assert!(f.driver.volumes.get(&id).unwrap().mount_group_current);
}

#[test]
fn a_stage_whose_offline_growth_fails_detaches_and_grows_at_the_retry() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    f.driver.node.unstage_volume(&id, "/stage").unwrap();
    f.driver.controller.expand_volume(&id, GROWN).unwrap();
    failing(&f, Op::Grow, || {
        stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter))
    });
    assert_eq!(counts(&f), (0, 0));
    assert!(f.driver.volumes.get(&id).unwrap().resize_pending);
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    assert!(!f.driver.volumes.get(&id).unwrap().resize_pending);
    assert_eq!(f.fake.lock().grows, 1);
}

#[test]
fn a_publish_whose_bind_fails_mounts_nothing_and_the_retry_binds() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    failing(&f, Op::Bind, || {
        publish(&f.driver, &id, mount(AccessMode::SingleNodeWriter), false)
    });
    assert_eq!(counts(&f), (1, 1), "only the stage's mount");
    // The failed bind may have been the one a pod writes through: the next walk is owed.
    assert!(!f.driver.volumes.get(&id).unwrap().mount_group_current);
    publish(&f.driver, &id, mount(AccessMode::SingleNodeWriter), false).unwrap();
    assert_eq!(counts(&f), (1, 2));
}

#[test]
fn a_read_only_block_publish_whose_bind_fails_releases_its_device() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, block()).unwrap();
    let mut ro = block();
    ro.access_mode = AccessMode::SingleNodeReaderOnly;
    failing(&f, Op::Bind, || publish(&f.driver, &id, ro.clone(), true));
    assert_eq!(counts(&f), (1, 0), "the read-only device is gone again");
    publish(&f.driver, &id, ro, true).unwrap();
    assert_eq!(counts(&f), (2, 1));
}

#[test]
fn a_restore_whose_copy_fails_leaves_no_volume() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    let snap = f.driver.snapshots.create_snapshot("s", &id).unwrap().id;
    let from = || Some(ContentSource::Snapshot(snap.clone()));
    failing(&f, Op::CloneFile, || create(&f, "restored", from()));
    assert_eq!(f.driver.volume_count(), 1);
    assert!(
        half_made(&f, "volumes").is_empty(),
        "{:?}",
        half_made(&f, "volumes")
    );
    create(&f, "restored", from()).unwrap();
    assert_eq!(f.driver.volume_count(), 2);
}

#[test]
fn a_clone_of_a_mounted_volume_whose_freeze_or_copy_fails_leaves_nothing_frozen() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    let from = || Some(ContentSource::Volume(id.clone()));
    for op in [Op::Freeze, Op::CloneFile] {
        failing(&f, op, || create(&f, "copy", from()));
        assert!(f.fake.lock().frozen.is_empty(), "{op:?}");
        assert_eq!(f.driver.volume_count(), 1, "{op:?}");
        assert!(half_made(&f, "volumes").is_empty(), "{op:?}");
    }
    create(&f, "copy", from()).unwrap();
    assert!(f.fake.lock().frozen.is_empty());
}

#[test]
fn a_snapshot_whose_freeze_or_copy_fails_leaves_no_snapshot_and_nothing_frozen() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    for op in [Op::Freeze, Op::CloneFile] {
        failing(&f, op, || f.driver.snapshots.create_snapshot("s", &id));
        assert!(f.fake.lock().frozen.is_empty(), "{op:?}");
        assert_eq!(f.driver.snapshots.count(), 0, "{op:?}");
        assert!(half_made(&f, "snapshots").is_empty(), "{op:?}");
    }
    f.driver.snapshots.create_snapshot("s", &id).unwrap();
    assert_eq!(f.driver.snapshots.count(), 1);
}

#[test]
fn an_expansion_whose_device_refresh_fails_is_not_recorded_and_the_retry_completes() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    let to = GROWN;
    failing(&f, Op::RefreshCapacity, || {
        f.driver.controller.expand_volume(&id, to)
    });
    assert_eq!(f.driver.volumes.get(&id).unwrap().capacity_bytes, 16 * MIB);
    let (size, node_grows) = f.driver.controller.expand_volume(&id, to).unwrap();
    assert_eq!((size, node_grows), (32 * MIB, true));
}

#[test]
fn a_node_expansion_whose_filesystem_growth_fails_grows_at_the_retry() {
    let f = fixture();
    let id = create(&f, "v", None).unwrap();
    stage(&f.driver, &id, mount(AccessMode::SingleNodeWriter)).unwrap();
    let to = GROWN;
    let here = "/stage";
    failing(&f, Op::Grow, || {
        f.driver.node.node_expand_volume(&id, here, to)
    });
    let record = f.driver.volumes.get(&id).unwrap();
    assert_eq!(record.capacity_bytes, 32 * MIB, "the image grew");
    assert!(
        record.resize_pending,
        "the filesystem still owes its growth"
    );
    assert_eq!(
        f.driver.node.node_expand_volume(&id, here, to).unwrap(),
        32 * MIB
    );
    assert!(!f.driver.volumes.get(&id).unwrap().resize_pending);
}
