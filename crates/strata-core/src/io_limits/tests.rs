//! I/O limits over the fake host: parsing, create, publish and unpublish in pods' cgroups,
//! live changes, failures that change nothing, restarts.

use std::collections::BTreeMap;

use super::*;
use crate::controller::CreateVolume;
use crate::model::{AccessMode, AccessType, Capability, CapacityRange, MIB};
use crate::node::{PublishVolume, StageVolume};
use crate::os::fake::Op;
use crate::testing::{Fixture, fixture, mount};

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create(f: &Fixture, name: &str, mutable: &[(&str, &str)], block: bool) -> Result<String> {
    let cap = if block {
        Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeMultiWriter,
        }
    } else {
        mount(AccessMode::SingleNodeMultiWriter)
    };
    Ok(f.driver
        .controller
        .create_volume(CreateVolume {
            name: name.into(),
            capacity: CapacityRange {
                required: 16 * MIB,
                limit: 0,
            },
            capabilities: vec![cap],
            mutable_parameters: params(mutable),
            ..Default::default()
        })?
        .id)
}

fn cap(block: bool) -> Capability {
    if block {
        Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeMultiWriter,
        }
    } else {
        mount(AccessMode::SingleNodeMultiWriter)
    }
}

fn stage(f: &Fixture, id: &str, block: bool) {
    f.driver
        .node
        .stage_volume(StageVolume {
            secrets: Default::default(),
            volume_id: id.into(),
            staging_path: "/stage".into(),
            capability: cap(block),
        })
        .unwrap();
}

fn publish(f: &Fixture, id: &str, target: &str, pod: &str, block: bool) -> Result<()> {
    f.driver.node.publish_volume(PublishVolume {
        volume_id: id.into(),
        staging_path: "/stage".into(),
        target_path: target.into(),
        capability: cap(block),
        read_only: false,
        consumer: Consumer::Pod(pod.into()),
    })
}

/// The rules in every cgroup, by cgroup path.
fn rules(f: &Fixture) -> BTreeMap<String, IoLimits> {
    f.fake
        .lock()
        .io_rules
        .iter()
        .map(|((path, _), l)| (path.clone(), *l))
        .collect()
}

#[test]
fn parameters_are_checked_and_parsed() {
    let change = LimitChange::parse(&params(&[
        ("maxReadIOPS", "100"),
        ("maxWriteBytesPerSecond", "2Mi"),
        ("csi.storage.k8s.io/pv/name", "pvc-1"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
    ]))
    .unwrap();
    assert_eq!(change.read_iops, Some(100));
    assert_eq!(change.write_bytes_per_second, Some(2 << 20));
    assert_eq!(change.write_iops, None);
    let limits = change.applied_to(IoLimits {
        write_iops: 7,
        ..Default::default()
    });
    assert_eq!(limits.write_iops, 7, "absent keys stay as they are");
    for bad in [
        ("maxReadIOPS", "-1"),
        ("maxReadIOPS", "1.5"),
        ("maxReadIOPS", ""),
        ("maxWriteIOPS", "4294967295"),
        ("maxReadBytesPerSecond", "2Xi"),
        ("maxReadBytesPerSecond", "lots"),
        ("maxreadiops", "1"),
        ("iops", "1"),
    ] {
        let r = LimitChange::parse(&params(&[bad]));
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{bad:?}: {r:?}"
        );
    }
    assert_eq!(
        LimitChange::parse(&change.to_parameters()).unwrap(),
        LimitChange {
            read_iops: Some(100),
            write_bytes_per_second: Some(2 << 20),
            ..Default::default()
        }
    );
}

#[test]
fn consumers_come_from_the_volume_context() {
    assert_eq!(
        Consumer::from_context(&params(&[(POD_UID_KEY, "0b1c-22")])).unwrap(),
        Consumer::Pod("0b1c-22".into())
    );
    assert_eq!(
        Consumer::from_context(&params(&[(CGROUP_KEY, "nomad.slice/a-b.scope")])).unwrap(),
        Consumer::Cgroup("nomad.slice/a-b.scope".into())
    );
    assert_eq!(
        Consumer::from_context(&params(&[])).unwrap(),
        Consumer::Unknown
    );
    for bad in [
        (POD_UID_KEY, "../x"),
        (POD_UID_KEY, ""),
        (CGROUP_KEY, "../etc"),
        (CGROUP_KEY, "/abs"),
        (CGROUP_KEY, "a//b"),
        (CGROUP_KEY, "a/./b"),
    ] {
        assert!(
            matches!(
                Consumer::from_context(&params(&[bad])),
                Err(Error::InvalidArgument(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn limits_follow_the_volume_into_each_pods_cgroup_and_leave_with_it() {
    let f = fixture();
    let id = create(&f, "v", &[("maxWriteBytesPerSecond", "2Mi")], false).unwrap();
    let a = f.fake.add_pod("aaaa");
    let b = f.fake.add_pod("bbbb");
    stage(&f, &id, false);
    publish(&f, &id, "/pods/a/mount", "aaaa", false).unwrap();
    publish(&f, &id, "/pods/b/mount", "bbbb", false).unwrap();
    // Retried publishes change nothing.
    publish(&f, &id, "/pods/a/mount", "aaaa", false).unwrap();
    let want = IoLimits {
        write_bytes_per_second: 2 << 20,
        ..Default::default()
    };
    assert_eq!(rules(&f), [(a.clone(), want), (b.clone(), want)].into());
    assert_eq!(f.driver.volumes.store.get(&id).unwrap().throttled.len(), 2);

    // A change reaches both pods; absent keys stay.
    f.driver
        .controller
        .modify_volume(&id, &params(&[("maxReadIOPS", "300")]))
        .unwrap();
    let want = IoLimits {
        read_iops: 300,
        ..want
    };
    assert_eq!(rules(&f), [(a.clone(), want), (b.clone(), want)].into());
    let in_force = f.driver.io_limits.in_force(&id).unwrap();
    assert!(in_force.iter().all(|(_, l)| *l == Some(want)));

    // Unpublish takes the rule out of that pod only.
    f.driver
        .node
        .unpublish_volume(&id, "/pods/a/mount")
        .unwrap();
    assert_eq!(rules(&f), [(b.clone(), want)].into());
    // Lifting the limits (0) removes the rule; the target stays known for later changes.
    f.driver
        .controller
        .modify_volume(
            &id,
            &params(&[("maxReadIOPS", "0"), ("maxWriteBytesPerSecond", "0")]),
        )
        .unwrap();
    assert!(rules(&f).is_empty());
    f.driver
        .controller
        .modify_volume(&id, &params(&[("maxWriteIOPS", "50")]))
        .unwrap();
    assert_eq!(rules(&f).len(), 1);
    f.driver
        .node
        .unpublish_volume(&id, "/pods/b/mount")
        .unwrap();
    assert!(rules(&f).is_empty());
    assert!(
        f.driver
            .volumes
            .store
            .get(&id)
            .unwrap()
            .throttled
            .is_empty()
    );
}

#[test]
fn raw_block_targets_are_limited_too() {
    let f = fixture();
    let id = create(&f, "b", &[("maxReadIOPS", "10")], true).unwrap();
    f.fake.add_pod("p1");
    stage(&f, &id, true);
    publish(&f, &id, "/dev-target", "p1", true).unwrap();
    assert_eq!(rules(&f).len(), 1);
    let device = f.driver.volumes.store.get(&id).unwrap().throttled[0].device;
    let att = f.fake.lock().loops[0].clone();
    assert_eq!(device, (att.major, att.minor));
    f.driver.node.unpublish_volume(&id, "/dev-target").unwrap();
    assert!(rules(&f).is_empty());
}

#[test]
fn a_bad_change_changes_nothing() {
    let f = fixture();
    let id = create(&f, "v", &[("maxWriteIOPS", "100")], false).unwrap();
    f.fake.add_pod("p");
    stage(&f, &id, false);
    publish(&f, &id, "/t", "p", false).unwrap();
    let before = (f.driver.volumes.store.get(&id).unwrap(), rules(&f));
    for bad in [
        params(&[("maxReadIOPS", "5"), ("unknownKey", "1")]),
        params(&[("maxReadIOPS", "5"), ("maxWriteIOPS", "fast")]),
    ] {
        assert!(matches!(
            f.driver.controller.modify_volume(&id, &bad),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            (f.driver.volumes.store.get(&id).unwrap(), rules(&f)),
            before
        );
    }
    assert!(matches!(
        f.driver
            .controller
            .modify_volume("", &params(&[("maxReadIOPS", "5")])),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        f.driver
            .controller
            .modify_volume("vol-0000000000000000", &params(&[("maxReadIOPS", "5")])),
        Err(Error::NotFound(_))
    ));
    // CreateVolume checks its mutable parameters before anything is made.
    assert!(matches!(
        create(&f, "w", &[("maxReadIops", "5")], false),
        Err(Error::InvalidArgument(_))
    ));
    assert!(f.driver.volumes.store.find_by_name("w").is_none());
    // The same name with other limits is another volume.
    assert!(matches!(
        create(&f, "v", &[("maxWriteIOPS", "200")], false),
        Err(Error::AlreadyExists(_))
    ));
}

#[test]
fn a_cgroup_that_fails_to_take_the_rule_fails_the_publish_and_leaves_nothing() {
    let f = fixture();
    let id = create(&f, "v", &[("maxWriteIOPS", "100")], false).unwrap();
    f.fake.add_pod("p");
    stage(&f, &id, false);
    f.fake.fail_next(
        Op::SetLimits,
        crate::os::HostError::Sys {
            what: "write".into(),
            errno: libc::EINVAL,
        },
    );
    assert!(publish(&f, &id, "/t", "p", false).is_err());
    assert!(rules(&f).is_empty());
    assert!(
        f.driver
            .volumes
            .store
            .get(&id)
            .unwrap()
            .throttled
            .is_empty()
    );
    assert_eq!(f.fake.lock().mounts.len(), 1, "only the stage is mounted");
    // A failed bind takes the rule back.
    f.fake.fail_next(
        Op::Bind,
        crate::os::HostError::Sys {
            what: "bind".into(),
            errno: libc::EIO,
        },
    );
    assert!(publish(&f, &id, "/t", "p", false).is_err());
    assert!(rules(&f).is_empty());
    assert!(
        f.driver
            .volumes
            .store
            .get(&id)
            .unwrap()
            .throttled
            .is_empty()
    );
    publish(&f, &id, "/t", "p", false).unwrap();
    assert_eq!(rules(&f).len(), 1);
}

#[test]
fn a_pod_without_a_cgroup_cannot_publish_a_limited_volume() {
    let f = fixture();
    let limited = create(&f, "v", &[("maxWriteIOPS", "100")], false).unwrap();
    stage(&f, &limited, false);
    assert!(matches!(
        publish(&f, &limited, "/t", "nopod", false),
        Err(Error::FailedPrecondition(_))
    ));
    // Without a pod uid (another orchestrator), the publish goes on, unlimited.
    f.driver
        .node
        .publish_volume(PublishVolume {
            volume_id: limited.clone(),
            staging_path: "/stage".into(),
            target_path: "/t".into(),
            capability: cap(false),
            read_only: false,
            consumer: Consumer::Unknown,
        })
        .unwrap();
    assert!(rules(&f).is_empty());
}

#[test]
fn a_change_fails_until_every_cgroup_has_it_and_forgets_ended_pods() {
    let f = fixture();
    let id = create(&f, "v", &[("maxWriteIOPS", "100")], false).unwrap();
    f.fake.add_pod("p");
    f.fake.add_pod("q");
    stage(&f, &id, false);
    publish(&f, &id, "/t1", "p", false).unwrap();
    publish(&f, &id, "/t2", "q", false).unwrap();
    f.fake.fail_next(
        Op::SetLimits,
        crate::os::HostError::Sys {
            what: "write".into(),
            errno: libc::EBUSY,
        },
    );
    let change = params(&[("maxWriteIOPS", "7")]);
    assert!(matches!(
        f.driver.controller.modify_volume(&id, &change),
        Err(Error::Unavailable(_))
    ));
    // The resizer retries: now every cgroup has it.
    f.driver.controller.modify_volume(&id, &change).unwrap();
    assert!(rules(&f).values().all(|l| l.write_iops == 7));
    // A pod that ended is forgotten at the next change.
    f.fake.remove_pod("q");
    f.driver
        .controller
        .modify_volume(&id, &params(&[("maxWriteIOPS", "8")]))
        .unwrap();
    let record = f.driver.volumes.store.get(&id).unwrap();
    assert_eq!(record.throttled.len(), 1);
    assert_eq!(record.io_limits.write_iops, 8);
}
