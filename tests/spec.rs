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
use strata::client::snapshot::metadata_pages;
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
        export_limits: Default::default(),
    };
    let backend = Arc::new(ImageBackend::new(pool, host.clone()));
    let (driver, _) = Driver::open(config, host, backend, FaultPoints::default(), None).unwrap();
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

/// The rows checked on one target. A row that gives another code is recorded with its
/// table and its name, and the rest still run; the test then fails listing every such row.
#[derive(Default)]
struct Rows {
    checked: std::cell::Cell<usize>,
    failed: std::cell::RefCell<Vec<String>>,
}

impl Rows {
    fn check(&self, table: &str, row: &str, got: Code, want: Code) {
        self.checked.set(self.checked.get() + 1);
        if got != want {
            self.failed.borrow_mut().push(format!(
                "{table}: {row}: answered {got:?}, the spec says {want:?}"
            ));
        }
    }

    /// A row whose outcome is a fact about the answer rather than a code.
    fn holds(&self, table: &str, row: &str, fact: bool) {
        self.check(
            table,
            row,
            if fact { Code::Ok } else { Code::Unknown },
            Code::Ok,
        );
    }

    fn finish(self, target: &str) {
        let failed = self.failed.into_inner();
        assert!(
            failed.is_empty(),
            "{} of {} rows failed on {target}:\n{}",
            failed.len(),
            self.checked.get(),
            failed.join("\n")
        );
        assert!(self.checked.get() > 50, "the rows ran");
    }
}

/// How many volumes ListVolumes shows.
async fn volume_count(t: &mut Target) -> usize {
    t.csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len()
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
async fn controller_rows(t: &mut Target, rows: &Rows) {
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
    rows.check(
        "CreateVolume",
        "missing name",
        code(create(t, create_req("", 16 * MIB, single.clone())).await),
        Code::InvalidArgument,
    );
    let mut no_caps = create_req("a", 16 * MIB, single.clone());
    no_caps.volume_capabilities.clear();
    rows.check(
        "CreateVolume",
        "missing capabilities",
        code(create(t, no_caps).await),
        Code::InvalidArgument,
    );
    rows.check(
        "CreateVolume",
        "unsupported capability",
        code(
            create(
                t,
                create_req("a", 16 * MIB, cap(Mode::MultiNodeMultiWriter)),
            )
            .await,
        ),
        Code::InvalidArgument,
    );
    let mut param = create_req("a", 16 * MIB, single.clone());
    param.parameters.insert("color".into(), "blue".into());
    rows.check(
        "CreateVolume",
        "unknown parameter",
        code(create(t, param).await),
        Code::InvalidArgument,
    );
    let mut inverted = create_req("a", 32 * MIB, single.clone());
    inverted.capacity_range = Some(csi::CapacityRange {
        required_bytes: 32 * MIB,
        limit_bytes: 16 * MIB,
    });
    rows.check(
        "CreateVolume",
        "unsupported capacity_range",
        code(create(t, inverted).await),
        Code::OutOfRange,
    );
    let mut elsewhere = create_req("a", 16 * MIB, single.clone());
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [("strata.csi.dev/node".to_string(), "other-node".to_string())].into(),
        }],
        preferred: vec![],
    });
    rows.check(
        "CreateVolume",
        "unable to provision in accessible_topology",
        code(create(t, elsewhere).await),
        Code::ResourceExhausted,
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
        rows.check(
            "CreateVolume",
            "source does not exist",
            code(create(t, req).await),
            Code::NotFound,
        );
    }
    // CreateVolume: every other malformed or unsatisfiable request, and that none of them
    // makes anything.
    let before = volume_count(t).await;
    let mut no_mode = create_req("b", 16 * MIB, single.clone());
    no_mode.volume_capabilities[0].access_mode = None;
    let mut no_type = create_req("b", 16 * MIB, single.clone());
    no_type.volume_capabilities[0].access_type = None;
    let mut suid = create_req("b", 16 * MIB, single.clone());
    if let Some(csi::volume_capability::AccessType::Mount(m)) =
        &mut suid.volume_capabilities[0].access_type
    {
        m.mount_flags = vec!["suid".into()];
    }
    let with_source = |source: Option<csi::volume_content_source::Type>| {
        let mut req = create_req("b", 16 * MIB, single.clone());
        req.volume_content_source = Some(csi::VolumeContentSource { r#type: source });
        req
    };
    let mut not_granular = create_req("b", 20 * MIB + 1, single.clone());
    not_granular.capacity_range.as_mut().unwrap().limit_bytes = 20 * MIB + 2;
    let mut below_minimum = create_req("b", 0, single.clone());
    below_minimum.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    let mut negative = create_req("b", -1, single.clone());
    negative.capacity_range.as_mut().unwrap().limit_bytes = 0;
    for (row, req, want) in [
        ("missing access mode", no_mode, Code::InvalidArgument),
        ("missing access type", no_type, Code::InvalidArgument),
        (
            "name over 128 bytes",
            create_req(&"n".repeat(129), 16 * MIB, single.clone()),
            Code::InvalidArgument,
        ),
        (
            "unsupported filesystem",
            create_req("b", 16 * MIB, mount_cap("ntfs", Mode::SingleNodeWriter)),
            Code::InvalidArgument,
        ),
        (
            "a mount flag off the allowlist",
            suid,
            Code::InvalidArgument,
        ),
        (
            "source volume does not exist",
            with_source(Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: UNKNOWN_VOLUME.into(),
                },
            ))),
            Code::NotFound,
        ),
        (
            "a content source of no kind",
            with_source(None),
            Code::InvalidArgument,
        ),
        (
            "a snapshot source without an id",
            with_source(Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: String::new(),
                },
            ))),
            Code::InvalidArgument,
        ),
        (
            "no size the granularity allows between required and limit",
            not_granular,
            Code::OutOfRange,
        ),
        (
            "limit below the minimum size",
            below_minimum,
            Code::OutOfRange,
        ),
        ("negative required_bytes", negative, Code::InvalidArgument),
        (
            "larger than the pool (15 TiB)",
            create_req("b", 15 << 40, single.clone()),
            Code::ResourceExhausted,
        ),
    ] {
        rows.check("CreateVolume", row, code(create(t, req).await), want);
    }
    rows.holds(
        "CreateVolume",
        "a refused request makes nothing",
        volume_count(t).await == before,
    );
    // Kubernetes' own keys are not StorageClass parameters of Strata's: accepted.
    let mut k8s = create_req("k8s-keys", 16 * MIB, single.clone());
    k8s.parameters = [("csi.storage.k8s.io/pvc/name".to_owned(), "data".to_owned())].into();
    let k8s = create(t, k8s).await;
    rows.check(
        "CreateVolume",
        "Kubernetes' csi.storage.k8s.io/ keys are accepted",
        code(k8s.clone()),
        Code::Ok,
    );
    if let Ok(v) = k8s {
        t.csi
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.volume_id,
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }
    let vol = create(t, create_req("a", 16 * MIB, single.clone()))
        .await
        .unwrap();
    let again = create(t, create_req("a", 16 * MIB, single.clone()))
        .await
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id, "idempotent");
    rows.check(
        "CreateVolume",
        "already exists but incompatible",
        code(create(t, create_req("a", 64 * MIB, single.clone())).await),
        Code::AlreadyExists,
    );
    let mut other_parameters = create_req("a", 16 * MIB, single.clone());
    other_parameters.parameters =
        [("csi.storage.k8s.io/pvc/name".to_owned(), "other".to_owned())].into();
    rows.check(
        "CreateVolume",
        "already exists with other parameters",
        code(create(t, other_parameters).await),
        Code::AlreadyExists,
    );
    let id = vol.volume_id.clone();

    // DeleteVolume, ValidateVolumeCapabilities, ControllerGetVolume, ListVolumes.
    let c = &mut t.csi.controller;
    let delete = |id: &str| csi::DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: Default::default(),
    };
    rows.check(
        "DeleteVolume",
        "missing volume_id",
        code(c.delete_volume(delete("")).await),
        Code::InvalidArgument,
    );
    rows.check(
        "DeleteVolume",
        "unknown volume: deleted already",
        code(c.delete_volume(delete(UNKNOWN_VOLUME)).await),
        Code::Ok,
    );
    rows.check(
        "DeleteVolume",
        "an id Strata could never have issued: deleted already",
        code(c.delete_volume(delete("../../etc")).await),
        Code::Ok,
    );
    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    rows.check(
        "ValidateVolumeCapabilities",
        "volume does not exist",
        code(
            c.validate_volume_capabilities(validate(UNKNOWN_VOLUME, vec![single.clone()]))
                .await,
        ),
        Code::NotFound,
    );
    rows.check(
        "ValidateVolumeCapabilities",
        "missing capabilities",
        code(c.validate_volume_capabilities(validate(&id, vec![])).await),
        Code::InvalidArgument,
    );
    rows.check(
        "ValidateVolumeCapabilities",
        "missing volume_id",
        code(
            c.validate_volume_capabilities(validate("", vec![single.clone()]))
                .await,
        ),
        Code::InvalidArgument,
    );
    let confirmed = c
        .validate_volume_capabilities(validate(
            &id,
            vec![single.clone(), block_cap(Mode::SingleNodeWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    rows.holds(
        "ValidateVolumeCapabilities",
        "every supported capability is confirmed",
        confirmed
            .confirmed
            .is_some_and(|c| c.volume_capabilities.len() == 2),
    );
    let refused = c
        .validate_volume_capabilities(validate(&id, vec![cap(Mode::MultiNodeReaderOnly)]))
        .await
        .unwrap()
        .into_inner();
    rows.holds(
        "ValidateVolumeCapabilities",
        "an unsupported capability is not confirmed, and the message says why",
        refused.confirmed.is_none() && !refused.message.is_empty(),
    );
    rows.check(
        "ControllerGetVolume",
        "volume does not exist",
        code(
            c.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: UNKNOWN_VOLUME.into(),
            })
            .await,
        ),
        Code::NotFound,
    );
    let list = |max: i32, token: &str| csi::ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    rows.check(
        "ListVolumes",
        "invalid starting_token",
        code(c.list_volumes(list(0, "not-a-token")).await),
        Code::Aborted,
    );
    rows.check(
        "ListVolumes",
        "negative max_entries",
        code(c.list_volumes(list(-1, "")).await),
        Code::InvalidArgument,
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
    rows.check(
        "ControllerPublishVolume",
        "not implemented",
        code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
                .await,
        ),
        Code::Unimplemented,
    );

    // Snapshots.
    let snap = |name: &str, source: &str| csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    };
    rows.check(
        "CreateSnapshot",
        "missing name",
        code(c.create_snapshot(snap("", &id)).await),
        Code::InvalidArgument,
    );
    rows.check(
        "CreateSnapshot",
        "missing source_volume_id",
        code(c.create_snapshot(snap("s", "")).await),
        Code::InvalidArgument,
    );
    rows.check(
        "CreateSnapshot",
        "source volume does not exist",
        code(c.create_snapshot(snap("s", UNKNOWN_VOLUME)).await),
        Code::NotFound,
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
    rows.check(
        "CreateSnapshot",
        "already exists but incompatible",
        code(c.create_snapshot(snap("s", &other.volume_id)).await),
        Code::AlreadyExists,
    );
    let snapshots = |token: &str, id: &str| csi::ListSnapshotsRequest {
        starting_token: token.into(),
        snapshot_id: id.into(),
        ..Default::default()
    };
    rows.check(
        "ListSnapshots",
        "invalid starting_token",
        code(c.list_snapshots(snapshots("bogus", "")).await),
        Code::Aborted,
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
    rows.check(
        "GetSnapshot",
        "snapshot does not exist",
        code(c.get_snapshot(get(UNKNOWN_SNAPSHOT)).await),
        Code::NotFound,
    );
    let delete_snap = |id: &str| csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        secrets: Default::default(),
    };
    rows.check(
        "DeleteSnapshot",
        "missing snapshot_id",
        code(c.delete_snapshot(delete_snap("")).await),
        Code::InvalidArgument,
    );
    rows.check(
        "DeleteSnapshot",
        "unknown snapshot: deleted already",
        code(c.delete_snapshot(delete_snap(UNKNOWN_SNAPSHOT)).await),
        Code::Ok,
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
    rows.check(
        "ControllerExpandVolume",
        "missing capacity_range",
        code(c.controller_expand_volume(expand(&id, None, None)).await),
        Code::InvalidArgument,
    );
    rows.check(
        "ControllerExpandVolume",
        "volume does not exist",
        code(
            c.controller_expand_volume(expand(UNKNOWN_VOLUME, Some((32 * MIB, 0)), None))
                .await,
        ),
        Code::NotFound,
    );
    rows.check(
        "ControllerExpandVolume",
        "unsupported capacity_range (a shrink)",
        code(
            c.controller_expand_volume(expand(&id, Some((8 * MIB, 8 * MIB)), None))
                .await,
        ),
        Code::OutOfRange,
    );
    rows.check(
        "ControllerExpandVolume",
        "exceeds capabilities",
        code(
            c.controller_expand_volume(expand(
                &id,
                Some((32 * MIB, 0)),
                Some(cap(Mode::MultiNodeMultiWriter)),
            ))
            .await,
        ),
        Code::InvalidArgument,
    );

    // ControllerModifyVolume (the volume's I/O limits).
    let modify = |id: &str, pairs: &[(&str, &str)]| csi::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    rows.check(
        "ControllerModifyVolume",
        "missing volume_id",
        code(
            c.controller_modify_volume(modify("", &[("maxReadIOPS", "1")]))
                .await,
        ),
        Code::InvalidArgument,
    );
    rows.check(
        "ControllerModifyVolume",
        "parameters not supported (an unknown key)",
        code(
            c.controller_modify_volume(modify(&id, &[("maxReadIOPS", "1"), ("speed", "fast")]))
                .await,
        ),
        Code::InvalidArgument,
    );
    rows.check(
        "ControllerModifyVolume",
        "parameters not supported (a bad value)",
        code(
            c.controller_modify_volume(modify(&id, &[("maxWriteBytesPerSecond", "-2Mi")]))
                .await,
        ),
        Code::InvalidArgument,
    );
    rows.check(
        "ControllerModifyVolume",
        "volume does not exist",
        code(
            c.controller_modify_volume(modify(UNKNOWN_VOLUME, &[("maxReadIOPS", "1")]))
                .await,
        ),
        Code::NotFound,
    );
    rows.check(
        "ControllerModifyVolume",
        "a valid change (idempotent)",
        code(
            c.controller_modify_volume(modify(&id, &[("maxReadIOPS", "100")]))
                .await,
        ),
        Code::Ok,
    );
    rows.check(
        "ControllerModifyVolume",
        "the same change again",
        code(
            c.controller_modify_volume(modify(&id, &[("maxReadIOPS", "100")]))
                .await,
        ),
        Code::Ok,
    );
    c.delete_volume(delete(&other.volume_id)).await.unwrap();
    c.delete_volume(delete(&id)).await.unwrap();
}

/// Every row of the GroupController tables, and the rules for group members in the
/// snapshot RPCs.
async fn group_rows(t: &mut Target, rows: &Rows) {
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
        rows.check(
            "CreateVolumeGroupSnapshot",
            why,
            code(g.create_volume_group_snapshot(req).await),
            Code::InvalidArgument,
        );
    }
    let mut param = create_group("g", &[&a, &b]);
    param.parameters.insert("color".into(), "blue".into());
    rows.check(
        "CreateVolumeGroupSnapshot",
        "unknown parameter",
        code(g.create_volume_group_snapshot(param).await),
        Code::InvalidArgument,
    );
    rows.check(
        "CreateVolumeGroupSnapshot",
        "unknown volume",
        code(
            g.create_volume_group_snapshot(create_group("g", &[&a, UNKNOWN_VOLUME]))
                .await,
        ),
        Code::NotFound,
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
    rows.check(
        "CreateVolumeGroupSnapshot",
        "same name, other volumes",
        code(
            g.create_volume_group_snapshot(create_group("g", &[&a]))
                .await,
        ),
        Code::AlreadyExists,
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
    rows.check(
        "CreateVolumeGroupSnapshot",
        "a member cannot be deleted alone",
        code(
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: ids[1].clone(),
                secrets: Default::default(),
            })
            .await,
        ),
        Code::InvalidArgument,
    );

    // GetVolumeGroupSnapshot.
    let get = |id: &str, ids: &[String]| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: ids.to_vec(),
        secrets: Default::default(),
    };
    let gid = group.group_snapshot_id.clone();
    rows.check(
        "GetVolumeGroupSnapshot",
        "missing group_snapshot_id",
        code(g.get_volume_group_snapshot(get("", &ids)).await),
        Code::InvalidArgument,
    );
    rows.check(
        "GetVolumeGroupSnapshot",
        "group snapshot does not exist",
        code(g.get_volume_group_snapshot(get(UNKNOWN_GROUP, &ids)).await),
        Code::NotFound,
    );
    rows.check(
        "GetVolumeGroupSnapshot",
        "snapshot list mismatch",
        code(g.get_volume_group_snapshot(get(&gid, &ids[..1])).await),
        Code::InvalidArgument,
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
    rows.check(
        "DeleteVolumeGroupSnapshot",
        "missing group_snapshot_id",
        code(g.delete_volume_group_snapshot(delete_group("", &ids)).await),
        Code::InvalidArgument,
    );
    rows.check(
        "DeleteVolumeGroupSnapshot",
        "snapshot list mismatch",
        code(
            g.delete_volume_group_snapshot(delete_group(&gid, &[UNKNOWN_SNAPSHOT.into()]))
                .await,
        ),
        Code::InvalidArgument,
    );
    for id in [gid.as_str(), gid.as_str(), UNKNOWN_GROUP, "not-ours"] {
        g.delete_volume_group_snapshot(delete_group(id, &ids))
            .await
            .unwrap();
    }
    rows.check(
        "DeleteVolumeGroupSnapshot",
        "members go with their group",
        code(
            c.get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: ids[0].clone(),
                secrets: Default::default(),
            })
            .await,
        ),
        Code::NotFound,
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
async fn node_rows(t: &mut Target, rows: &Rows) {
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
    let base = t.base.clone();
    let csi = &mut t.csi;

    // NodeStageVolume.
    let dotted = format!("{staging}/../x");
    for (vid, path, why) in [
        ("", staging.as_str(), "missing volume_id"),
        (id.as_str(), "", "missing staging path"),
        (id.as_str(), "relative/path", "relative staging path"),
        (id.as_str(), dotted.as_str(), "'..' in the staging path"),
    ] {
        rows.check(
            "NodeStageVolume",
            why,
            code(node_stage(csi, vid, path, single.clone()).await),
            Code::InvalidArgument,
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
    rows.check(
        "NodeStageVolume",
        "missing capability",
        code(no_cap),
        Code::InvalidArgument,
    );
    rows.check(
        "NodeStageVolume",
        "volume does not exist",
        code(node_stage(csi, UNKNOWN_VOLUME, &staging, single.clone()).await),
        Code::NotFound,
    );
    rows.check(
        "NodeStageVolume",
        "exceeds capabilities",
        code(node_stage(csi, &id, &staging, cap(Mode::MultiNodeMultiWriter)).await),
        Code::FailedPrecondition,
    );
    node_stage(csi, &id, &staging, single.clone())
        .await
        .unwrap();
    node_stage(csi, &id, &staging, single.clone())
        .await
        .unwrap();
    rows.check(
        "NodeStageVolume",
        "staged but incompatible",
        code(node_stage(csi, &id, &staging, block_cap(Mode::SingleNodeWriter)).await),
        Code::AlreadyExists,
    );

    // NodePublishVolume.
    rows.check(
        "NodePublishVolume",
        "staging path not set",
        code(node_publish(csi, &id, "", &t1, single.clone(), false).await),
        Code::FailedPrecondition,
    );
    rows.check(
        "NodePublishVolume",
        "volume does not exist",
        code(node_publish(csi, UNKNOWN_VOLUME, &staging, &t1, single.clone(), false).await),
        Code::NotFound,
    );
    rows.check(
        "NodePublishVolume",
        "missing volume_id",
        code(node_publish(csi, "", &staging, &t1, single.clone(), false).await),
        Code::InvalidArgument,
    );
    let elsewhere = format!("{base}/elsewhere");
    rows.check(
        "NodePublishVolume",
        "not staged at staging_target_path",
        code(node_publish(csi, &id, &elsewhere, &t1, single.clone(), false).await),
        Code::FailedPrecondition,
    );
    rows.check(
        "NodeUnstageVolume",
        "not staged at this path: nothing to do",
        code(node_unstage(csi, &id, &elsewhere).await),
        Code::Ok,
    );
    rows.check(
        "NodePublishVolume",
        "missing target_path",
        code(node_publish(csi, &id, &staging, "", single.clone(), false).await),
        Code::InvalidArgument,
    );
    node_publish(csi, &id, &staging, &t1, single.clone(), false)
        .await
        .unwrap();
    node_publish(csi, &id, &staging, &t1, single.clone(), false)
        .await
        .unwrap();
    rows.check(
        "NodePublishVolume",
        "published but incompatible",
        code(node_publish(csi, &id, &staging, &t1, single.clone(), true).await),
        Code::AlreadyExists,
    );
    rows.check(
        "NodePublishVolume",
        "SINGLE_NODE_SINGLE_WRITER at a second target",
        code(node_publish(csi, &id, &staging, &t2, single.clone(), false).await),
        Code::FailedPrecondition,
    );
    let t3 = format!("{base}/t3");
    let multi = cap(Mode::SingleNodeMultiWriter);
    rows.check(
        "NodePublishVolume",
        "SINGLE_NODE_MULTI_WRITER at a second target",
        code(node_publish(csi, &id, &staging, &t3, multi, false).await),
        Code::Ok,
    );
    rows.check(
        "NodePublishVolume",
        "a filesystem volume published as a raw block device too",
        code(
            node_publish(
                csi,
                &id,
                &staging,
                &format!("{base}/dev"),
                block_cap(Mode::SingleNodeMultiWriter),
                false,
            )
            .await,
        ),
        Code::FailedPrecondition,
    );
    rows.check(
        "NodeUnpublishVolume",
        "missing volume_id",
        code(node_unpublish(csi, "", &t3).await),
        Code::InvalidArgument,
    );
    rows.check(
        "NodeUnpublishVolume",
        "never published at this path: nothing to do",
        code(node_unpublish(csi, &id, &format!("{base}/never")).await),
        Code::Ok,
    );
    node_unpublish(csi, &id, &t3).await.unwrap();

    // NodeGetVolumeStats.
    let stats = |vid: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: vid.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    let n = &mut csi.node;
    rows.check(
        "NodeGetVolumeStats",
        "missing volume_path",
        code(n.node_get_volume_stats(stats(&id, "")).await),
        Code::InvalidArgument,
    );
    for path in [t2.as_str(), "some/path", "/etc"] {
        rows.check(
            "NodeGetVolumeStats",
            &format!("not at {path}"),
            code(n.node_get_volume_stats(stats(&id, path)).await),
            Code::NotFound,
        );
    }
    rows.check(
        "NodeGetVolumeStats",
        "volume does not exist",
        code(n.node_get_volume_stats(stats(UNKNOWN_VOLUME, &t1)).await),
        Code::NotFound,
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
    rows.check(
        "NodeExpandVolume",
        "volume does not exist",
        code(
            n.node_expand_volume(expand(UNKNOWN_VOLUME, &t1, None))
                .await,
        ),
        Code::NotFound,
    );
    rows.check(
        "NodeExpandVolume",
        "missing volume_path",
        code(n.node_expand_volume(expand(&id, "", None)).await),
        Code::InvalidArgument,
    );
    rows.check(
        "NodeExpandVolume",
        "volume not at volume_path",
        code(n.node_expand_volume(expand(&id, &t2, None)).await),
        Code::NotFound,
    );
    rows.check(
        "NodeExpandVolume",
        "exceeds capabilities",
        code(
            n.node_expand_volume(expand(&id, &t1, Some(cap(Mode::MultiNodeMultiWriter))))
                .await,
        ),
        Code::InvalidArgument,
    );

    // DeleteVolume of a volume in use.
    let in_use = csi
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await;
    rows.check(
        "DeleteVolume of a volume in use",
        "volume in use",
        code(in_use),
        Code::FailedPrecondition,
    );

    // NodeUnpublishVolume and NodeUnstageVolume.
    rows.check(
        "NodeUnpublishVolume",
        "volume does not exist",
        code(node_unpublish(csi, UNKNOWN_VOLUME, &t1).await),
        Code::NotFound,
    );
    rows.check(
        "NodeUnpublishVolume",
        "missing target_path",
        code(node_unpublish(csi, &id, "").await),
        Code::InvalidArgument,
    );
    rows.check(
        "NodeUnpublishVolume and NodeUnstageVolume",
        "not published there",
        code(node_unpublish(csi, &id, &t2).await),
        Code::Ok,
    );
    node_unpublish(csi, &id, &t1).await.unwrap();
    node_unpublish(csi, &id, &t1).await.unwrap();
    rows.check(
        "NodeUnstageVolume",
        "volume does not exist",
        code(node_unstage(csi, UNKNOWN_VOLUME, &staging).await),
        Code::NotFound,
    );
    rows.check(
        "NodeUnpublishVolume and NodeUnstageVolume",
        "not staged there",
        code(node_unstage(csi, &id, &t2).await),
        Code::Ok,
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

/// Every row of the SnapshotMetadata tables (GetMetadataAllocated, GetMetadataDelta).
async fn metadata_rows(t: &mut Target, rows: &Rows) {
    use csi::plugin_capability::service::Type as Service;
    rows.holds(
        "GetPluginCapabilities",
        "SNAPSHOT_METADATA_SERVICE advertised on a pool with a block layout",
        plugin_services(&mut t.csi)
            .await
            .contains(&(Service::SnapshotMetadataService as i32)),
    );
    let single = cap(Mode::SingleNodeWriter);
    let a = create(t, create_req("cbt-a", 16 * MIB, single.clone()))
        .await
        .unwrap()
        .volume_id;
    let b = create(t, create_req("cbt-b", 16 * MIB, single))
        .await
        .unwrap()
        .volume_id;
    let mut snapshots = vec![];
    for (name, source) in [("cbt-a1", &a), ("cbt-a2", &a), ("cbt-b1", &b)] {
        snapshots.push(
            t.csi
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: source.clone(),
                    name: name.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap()
                .snapshot_id,
        );
    }
    let (a1, a2, b1) = (&snapshots[0], &snapshots[1], &snapshots[2]);
    let size = 16 * MIB;
    for (start, max, id, why, want) in [
        (0, 0, a1.as_str(), "a valid request", Code::Ok),
        (size, 0, a1, "starting_offset at the end", Code::Ok),
        (0, 0, "", "missing snapshot_id", Code::InvalidArgument),
        (0, -1, a1, "negative max_results", Code::InvalidArgument),
        (
            0,
            0,
            UNKNOWN_SNAPSHOT,
            "unknown snapshot_id",
            Code::NotFound,
        ),
        (-1, 0, a1, "negative starting_offset", Code::OutOfRange),
        (
            size + 1,
            0,
            a1,
            "starting_offset past the end",
            Code::OutOfRange,
        ),
    ] {
        rows.check(
            "GetMetadataAllocated",
            why,
            code(metadata_pages(&mut t.csi, None, id, start, max).await),
            want,
        );
    }
    for (start, base, target, why, want) in [
        (0, a1.as_str(), a2.as_str(), "a valid request", Code::Ok),
        (0, "", a2, "missing base_snapshot_id", Code::InvalidArgument),
        (
            0,
            a1,
            "",
            "missing target_snapshot_id",
            Code::InvalidArgument,
        ),
        (0, a2, a1, "base newer than target", Code::InvalidArgument),
        (
            0,
            UNKNOWN_SNAPSHOT,
            a2,
            "unknown base_snapshot_id",
            Code::NotFound,
        ),
        (
            0,
            a1,
            UNKNOWN_SNAPSHOT,
            "unknown target_snapshot_id",
            Code::NotFound,
        ),
        (
            0,
            a1,
            b1,
            "snapshots of different volumes (no changes are tracked between them)",
            Code::FailedPrecondition,
        ),
        (-1, a1, a2, "negative starting_offset", Code::OutOfRange),
        (
            size + 1,
            a1,
            a2,
            "starting_offset past the end",
            Code::OutOfRange,
        ),
    ] {
        rows.check(
            "GetMetadataDelta",
            why,
            code(metadata_pages(&mut t.csi, Some(base), target, start, 0).await),
            want,
        );
    }
    for id in &snapshots {
        t.csi
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for id in [a, b] {
        t.csi
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Every table on one target: each group of rows in its own section, so a failing row is
/// reported by name and the other rows still run.
async fn all_rows(mut t: Target, target: &str) {
    let rows = Rows::default();
    controller_rows(&mut t, &rows).await;
    group_rows(&mut t, &rows).await;
    metadata_rows(&mut t, &rows).await;
    node_rows(&mut t, &rows).await;
    rows.finish(target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_tables_over_the_fake_host() {
    all_rows(over_the_fake_host().await, "the fake host").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_tables_against_the_real_server() {
    all_rows(the_real_server().await, "the real server").await;
}
