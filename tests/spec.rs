//! The spec's error tables, row by row, against two targets: the driver in-process over the
//! fake host (no root, no kernel state, a second) and the real server with real mounts. The
//! same rows must give the same codes on both. Rows that need a real kernel (what a mount
//! holds, filesystems, devices) are in `conformance.rs`; `docs/reliability.md` maps every
//! row to its test.

mod common;

use std::sync::Arc;

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata::client::{Csi, connect};
use strata::endpoint::Endpoint;
use strata_core::Driver;
use strata_core::backend::image::ImageBackend;
use strata_core::driver::Config;
use strata_core::fault::FaultPoints;
use strata_core::os::fake::FakeHost;
use tonic::Code;

const UNKNOWN_VOLUME: &str = "vol-0123456789abcdef01234567";
const UNKNOWN_SNAPSHOT: &str = "snap-0123456789abcdef01234567";
const UNKNOWN_GROUP: &str = "group-0123456789abcdef01234567";

/// A server to run the rows against, and a directory its node paths may use.
struct Target {
    csi: Csi,
    base: String,
    _keep: Box<dyn std::any::Any>,
}

/// The driver over the fake host, served in this process on a socket in a temp directory.
async fn over_the_fake_host() -> Target {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let fake = FakeHost::new();
    let host = fake.host();
    let config = Config {
        driver_name: "strata.csi.dev".into(),
        node_id: "test-node".into(),
        pool: pool.clone(),
        max_volumes_per_node: 100,
        topology_key: "strata.csi.dev/node".into(),
        allowed_path_prefixes: vec!["/var/lib/kubelet".into()],
        forbidden_paths: vec![pool.clone()],
        freeze_limit: std::time::Duration::from_secs(10),
    };
    let backend = Arc::new(ImageBackend::new(pool, host.clone()));
    let (driver, _) = Driver::open(config, host, backend, FaultPoints::default()).unwrap();
    let router = strata::server::csi_router(
        Arc::new(driver),
        strata::metrics::Metrics::new("strata.csi.dev"),
    );
    let socket = dir.path().join("csi.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let csi = connect(&Endpoint::Unix(socket)).await.unwrap();
    Target {
        csi,
        base: "/var/lib/kubelet/spec".into(),
        _keep: Box::new((dir, fake)),
    }
}

/// The real server, with real mounts, on a temporary pool.
async fn the_real_server() -> Target {
    let env = TestEnv::start().await;
    Target {
        csi: env.csi.clone(),
        base: env.path("node"),
        _keep: Box::new(env),
    }
}

fn cap(mode: Mode) -> csi::VolumeCapability {
    mount_cap("ext4", mode)
}

async fn create(
    t: &mut Target,
    req: csi::CreateVolumeRequest,
) -> Result<csi::Volume, tonic::Status> {
    t.csi
        .controller
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

/// Every row of the Identity and Controller tables.
async fn controller_rows(t: &mut Target) {
    let info = t
        .csi
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "strata.csi.dev");
    let probe = t.csi.identity.probe(csi::ProbeRequest {}).await.unwrap();
    assert_ne!(probe.into_inner().ready, Some(false));

    // CreateVolume.
    let single = cap(Mode::SingleNodeWriter);
    assert_eq!(
        code(create(t, create_req("", 16 * MIB, single.clone())).await),
        Code::InvalidArgument,
        "missing name"
    );
    let mut no_caps = create_req("a", 16 * MIB, single.clone());
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(create(t, no_caps).await),
        Code::InvalidArgument,
        "missing capabilities"
    );
    assert_eq!(
        code(
            create(
                t,
                create_req("a", 16 * MIB, cap(Mode::MultiNodeMultiWriter))
            )
            .await
        ),
        Code::InvalidArgument,
        "unsupported capability"
    );
    let mut param = create_req("a", 16 * MIB, single.clone());
    param.parameters.insert("color".into(), "blue".into());
    assert_eq!(
        code(create(t, param).await),
        Code::InvalidArgument,
        "unknown parameter"
    );
    let mut inverted = create_req("a", 32 * MIB, single.clone());
    inverted.capacity_range = Some(csi::CapacityRange {
        required_bytes: 32 * MIB,
        limit_bytes: 16 * MIB,
    });
    assert_eq!(
        code(create(t, inverted).await),
        Code::OutOfRange,
        "unsupported capacity_range"
    );
    let mut elsewhere = create_req("a", 16 * MIB, single.clone());
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [("strata.csi.dev/node".to_string(), "other-node".to_string())].into(),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(create(t, elsewhere).await),
        Code::ResourceExhausted,
        "unable to provision in accessible_topology"
    );
    for source in [
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: UNKNOWN_SNAPSHOT.into(),
        }),
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: UNKNOWN_VOLUME.into(),
        }),
    ] {
        let mut req = create_req("from-nothing", 16 * MIB, single.clone());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        assert_eq!(
            code(create(t, req).await),
            Code::NotFound,
            "source does not exist"
        );
    }
    let vol = create(t, create_req("a", 16 * MIB, single.clone()))
        .await
        .unwrap();
    let again = create(t, create_req("a", 16 * MIB, single.clone()))
        .await
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id, "idempotent");
    assert_eq!(
        code(create(t, create_req("a", 64 * MIB, single.clone())).await),
        Code::AlreadyExists,
        "already exists but incompatible"
    );
    let id = vol.volume_id.clone();

    // DeleteVolume, ValidateVolumeCapabilities, ControllerGetVolume, ListVolumes.
    let c = &mut t.csi.controller;
    let delete = |id: &str| csi::DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(c.delete_volume(delete("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.delete_volume(delete(UNKNOWN_VOLUME)).await),
        Code::Ok
    );
    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    assert_eq!(
        code(
            c.validate_volume_capabilities(validate(UNKNOWN_VOLUME, vec![single.clone()]))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(c.validate_volume_capabilities(validate(&id, vec![])).await),
        Code::InvalidArgument
    );
    let confirmed = c
        .validate_volume_capabilities(validate(&id, vec![single.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.confirmed.is_some());
    assert_eq!(
        code(
            c.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: UNKNOWN_VOLUME.into()
            })
            .await
        ),
        Code::NotFound
    );
    let list = |max: i32, token: &str| csi::ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    assert_eq!(
        code(c.list_volumes(list(0, "not-a-token")).await),
        Code::Aborted
    );
    assert_eq!(
        code(c.list_volumes(list(-1, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        c.list_volumes(list(0, ""))
            .await
            .unwrap()
            .into_inner()
            .entries
            .len(),
        1
    );
    assert_eq!(
        code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );

    // Snapshots.
    let snap = |name: &str, source: &str| csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.create_snapshot(snap("", &id)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap("s", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap("s", UNKNOWN_VOLUME)).await),
        Code::NotFound
    );
    let s = c
        .create_snapshot(snap("s", &id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let s2 = c
        .create_snapshot(snap("s", &id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s, s2, "idempotent");
    let other = create(t, create_req("b", 16 * MIB, single.clone()))
        .await
        .unwrap();
    let c = &mut t.csi.controller;
    assert_eq!(
        code(c.create_snapshot(snap("s", &other.volume_id)).await),
        Code::AlreadyExists
    );
    let snapshots = |token: &str, id: &str| csi::ListSnapshotsRequest {
        starting_token: token.into(),
        snapshot_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.list_snapshots(snapshots("bogus", "")).await),
        Code::Aborted
    );
    assert!(
        c.list_snapshots(snapshots("", UNKNOWN_SNAPSHOT))
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );
    let get = |id: &str| csi::GetSnapshotRequest {
        snapshot_id: id.into(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(c.get_snapshot(get(UNKNOWN_SNAPSHOT)).await),
        Code::NotFound
    );
    let delete_snap = |id: &str| csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(c.delete_snapshot(delete_snap("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.delete_snapshot(delete_snap(UNKNOWN_SNAPSHOT)).await),
        Code::Ok
    );
    c.delete_snapshot(delete_snap(&s.snapshot_id))
        .await
        .unwrap();

    // ControllerExpandVolume (answers for operators, though not advertised).
    let expand = |id: &str, range: Option<(i64, i64)>, cap: Option<csi::VolumeCapability>| {
        csi::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: range.map(|(required_bytes, limit_bytes)| csi::CapacityRange {
                required_bytes,
                limit_bytes,
            }),
            volume_capability: cap,
            ..Default::default()
        }
    };
    assert_eq!(
        code(c.controller_expand_volume(expand(&id, None, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_expand_volume(expand(UNKNOWN_VOLUME, Some((32 * MIB, 0)), None))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_expand_volume(expand(&id, Some((8 * MIB, 8 * MIB)), None))
                .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            c.controller_expand_volume(expand(
                &id,
                Some((32 * MIB, 0)),
                Some(cap(Mode::MultiNodeMultiWriter))
            ))
            .await
        ),
        Code::InvalidArgument
    );
    c.delete_volume(delete(&other.volume_id)).await.unwrap();
    c.delete_volume(delete(&id)).await.unwrap();
}

/// Every row of the GroupController tables, and the rules for group members in the
/// snapshot RPCs.
async fn group_rows(t: &mut Target) {
    use csi::plugin_capability::service::Type as Service;
    assert!(
        plugin_services(&mut t.csi)
            .await
            .contains(&(Service::GroupControllerService as i32))
    );
    let mut g = t.csi.groups.clone();
    let caps = g
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::group_controller_service_capability::{Type, rpc::Type as Rpc};
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(Type::Rpc(r)) if r.r#type == Rpc::CreateDeleteGetVolumeGroupSnapshot as i32
    )));

    let single = cap(Mode::SingleNodeWriter);
    let a = create(t, create_req("group-a", 16 * MIB, single.clone()))
        .await
        .unwrap()
        .volume_id;
    let b = create(t, create_req("group-b", 16 * MIB, single))
        .await
        .unwrap()
        .volume_id;
    let create_group = |name: &str, ids: &[&str]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // CreateVolumeGroupSnapshot.
    for (req, why) in [
        (create_group("", &[&a, &b]), "missing name"),
        (create_group("g", &[]), "missing source volumes"),
        (create_group("g", &[&a, &a]), "a volume named twice"),
        (create_group("g", &[&a, ""]), "an empty volume id"),
    ] {
        assert_eq!(
            code(g.create_volume_group_snapshot(req).await),
            Code::InvalidArgument,
            "{why}"
        );
    }
    let mut param = create_group("g", &[&a, &b]);
    param.parameters.insert("color".into(), "blue".into());
    assert_eq!(
        code(g.create_volume_group_snapshot(param).await),
        Code::InvalidArgument,
        "unknown parameter"
    );
    assert_eq!(
        code(
            g.create_volume_group_snapshot(create_group("g", &[&a, UNKNOWN_VOLUME]))
                .await
        ),
        Code::NotFound,
        "unknown volume"
    );
    let mut k8s = create_group("g", &[&a, &b]);
    k8s.parameters.insert(
        "csi.storage.k8s.io/volumegroupsnapshot/name".into(),
        "daily".into(),
    );
    let group = g
        .create_volume_group_snapshot(k8s)
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(group.ready_to_use);
    assert!(group.creation_time.is_some());
    assert_eq!(group.snapshots.len(), 2);
    let mut sources: Vec<&str> = group
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.as_str())
        .collect();
    sources.sort_unstable();
    let mut expected = [a.as_str(), b.as_str()];
    expected.sort_unstable();
    assert_eq!(sources, expected);
    for s in &group.snapshots {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        assert!(s.ready_to_use);
    }
    let again = g
        .create_volume_group_snapshot(create_group("g", &[&b, &a]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again, group, "same name and volumes: the same group");
    assert_eq!(
        code(
            g.create_volume_group_snapshot(create_group("g", &[&a]))
                .await
        ),
        Code::AlreadyExists,
        "same name, other volumes"
    );

    // Members are snapshots: listed, fetched, and not deletable alone.
    let ids: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let mut c = t.csi.controller.clone();
    let member = c
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: ids[0].clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(member.group_snapshot_id, group.group_snapshot_id);
    let listed = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: a.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .filter_map(|e| e.snapshot.as_ref())
            .any(|s| s.group_snapshot_id == group.group_snapshot_id)
    );
    assert_eq!(
        code(
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: ids[1].clone(),
                secrets: Default::default(),
            })
            .await
        ),
        Code::InvalidArgument,
        "a member cannot be deleted alone"
    );

    // GetVolumeGroupSnapshot.
    let get = |id: &str, ids: &[String]| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: ids.to_vec(),
        secrets: Default::default(),
    };
    let gid = group.group_snapshot_id.clone();
    assert_eq!(
        code(g.get_volume_group_snapshot(get("", &ids)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(g.get_volume_group_snapshot(get(UNKNOWN_GROUP, &ids)).await),
        Code::NotFound
    );
    assert_eq!(
        code(g.get_volume_group_snapshot(get(&gid, &ids[..1])).await),
        Code::InvalidArgument,
        "snapshot list mismatch"
    );
    let fetched = g
        .get_volume_group_snapshot(get(&gid, &ids))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(fetched, group);

    // DeleteVolumeGroupSnapshot.
    let delete_group = |id: &str, ids: &[String]| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: ids.to_vec(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(g.delete_volume_group_snapshot(delete_group("", &ids)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            g.delete_volume_group_snapshot(delete_group(&gid, &[UNKNOWN_SNAPSHOT.into()]))
                .await
        ),
        Code::InvalidArgument,
        "snapshot list mismatch"
    );
    for id in [gid.as_str(), gid.as_str(), UNKNOWN_GROUP, "not-ours"] {
        g.delete_volume_group_snapshot(delete_group(id, &ids))
            .await
            .unwrap();
    }
    assert_eq!(
        code(
            c.get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: ids[0].clone(),
                secrets: Default::default(),
            })
            .await
        ),
        Code::NotFound,
        "members go with their group"
    );
    for id in [a, b] {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            secrets: Default::default(),
        })
        .await
        .unwrap();
    }
}

/// Every row of the Node tables.
async fn node_rows(t: &mut Target) {
    let single = cap(Mode::SingleNodeSingleWriter);
    let id = create(t, create_req("n", 16 * MIB, single.clone()))
        .await
        .unwrap()
        .volume_id;
    let (staging, t1, t2) = (
        format!("{}/staging", t.base),
        format!("{}/t1", t.base),
        format!("{}/t2", t.base),
    );
    let csi = &mut t.csi;

    // NodeStageVolume.
    for (vid, path, why) in [
        ("", staging.as_str(), "missing volume_id"),
        (id.as_str(), "", "missing staging path"),
        (id.as_str(), "relative/path", "relative staging path"),
    ] {
        assert_eq!(
            code(node_stage(csi, vid, path, single.clone()).await),
            Code::InvalidArgument,
            "{why}"
        );
    }
    let no_cap = csi
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(no_cap), Code::InvalidArgument, "missing capability");
    assert_eq!(
        code(node_stage(csi, UNKNOWN_VOLUME, &staging, single.clone()).await),
        Code::NotFound
    );
    assert_eq!(
        code(node_stage(csi, &id, &staging, cap(Mode::MultiNodeMultiWriter)).await),
        Code::FailedPrecondition,
        "exceeds capabilities"
    );
    node_stage(csi, &id, &staging, single.clone())
        .await
        .unwrap();
    node_stage(csi, &id, &staging, single.clone())
        .await
        .unwrap();
    assert_eq!(
        code(node_stage(csi, &id, &staging, block_cap(Mode::SingleNodeWriter)).await),
        Code::AlreadyExists,
        "staged but incompatible"
    );

    // NodePublishVolume.
    assert_eq!(
        code(node_publish(csi, &id, "", &t1, single.clone(), false).await),
        Code::FailedPrecondition,
        "staging path not set"
    );
    assert_eq!(
        code(node_publish(csi, UNKNOWN_VOLUME, &staging, &t1, single.clone(), false).await),
        Code::NotFound
    );
    assert_eq!(
        code(node_publish(csi, &id, &staging, "", single.clone(), false).await),
        Code::InvalidArgument
    );
    node_publish(csi, &id, &staging, &t1, single.clone(), false)
        .await
        .unwrap();
    node_publish(csi, &id, &staging, &t1, single.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        code(node_publish(csi, &id, &staging, &t1, single.clone(), true).await),
        Code::AlreadyExists,
        "published but incompatible"
    );
    assert_eq!(
        code(node_publish(csi, &id, &staging, &t2, single.clone(), false).await),
        Code::FailedPrecondition,
        "SINGLE_NODE_SINGLE_WRITER at a second target"
    );

    // NodeGetVolumeStats.
    let stats = |vid: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: vid.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    let n = &mut csi.node;
    assert_eq!(
        code(n.node_get_volume_stats(stats(&id, "")).await),
        Code::InvalidArgument
    );
    for path in [t2.as_str(), "some/path", "/etc"] {
        assert_eq!(
            code(n.node_get_volume_stats(stats(&id, path)).await),
            Code::NotFound,
            "{path}"
        );
    }
    assert_eq!(
        code(n.node_get_volume_stats(stats(UNKNOWN_VOLUME, &t1)).await),
        Code::NotFound
    );
    let ok = n
        .node_get_volume_stats(stats(&id, &t1))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.usage.is_empty());

    // NodeExpandVolume.
    let expand =
        |vid: &str, path: &str, cap: Option<csi::VolumeCapability>| csi::NodeExpandVolumeRequest {
            volume_id: vid.into(),
            volume_path: path.into(),
            volume_capability: cap,
            ..Default::default()
        };
    assert_eq!(
        code(
            n.node_expand_volume(expand(UNKNOWN_VOLUME, &t1, None))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(n.node_expand_volume(expand(&id, "", None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_expand_volume(expand(&id, &t2, None)).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            n.node_expand_volume(expand(&id, &t1, Some(cap(Mode::MultiNodeMultiWriter))))
                .await
        ),
        Code::InvalidArgument
    );

    // DeleteVolume of a volume in use.
    let in_use = csi
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await;
    assert_eq!(code(in_use), Code::FailedPrecondition, "volume in use");

    // NodeUnpublishVolume and NodeUnstageVolume.
    assert_eq!(
        code(node_unpublish(csi, UNKNOWN_VOLUME, &t1).await),
        Code::NotFound
    );
    assert_eq!(
        code(node_unpublish(csi, &id, "").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node_unpublish(csi, &id, &t2).await),
        Code::Ok,
        "not published there"
    );
    node_unpublish(csi, &id, &t1).await.unwrap();
    node_unpublish(csi, &id, &t1).await.unwrap();
    assert_eq!(
        code(node_unstage(csi, UNKNOWN_VOLUME, &staging).await),
        Code::NotFound
    );
    assert_eq!(
        code(node_unstage(csi, &id, &t2).await),
        Code::Ok,
        "not staged there"
    );
    node_unstage(csi, &id, &staging).await.unwrap();
    node_unstage(csi, &id, &staging).await.unwrap();
    csi.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            secrets: Default::default(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_tables_over_the_fake_host() {
    let mut t = over_the_fake_host().await;
    controller_rows(&mut t).await;
    group_rows(&mut t).await;
    node_rows(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_tables_against_the_real_server() {
    let mut t = the_real_server().await;
    controller_rows(&mut t).await;
    group_rows(&mut t).await;
    node_rows(&mut t).await;
}
