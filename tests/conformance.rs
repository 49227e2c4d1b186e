//! Conformance with the CSI v1.12 spec (`spec.md`): one test per rule this driver covers,
//! named after the rule. Each runs the real server on its own pool.

mod common;

use std::collections::HashMap;

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use tonic::Code;

async fn create_code(env: &mut TestEnv, req: csi::CreateVolumeRequest) -> Code {
    code(env.csi.controller.create_volume(req).await)
}

fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: [("strata.csi.dev/node".to_string(), node.to_string())].into(),
    }
}

// ---- Identity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let mut env = TestEnv::start().await;
    let info = env
        .csi
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "strata.csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    use csi::plugin_capability::service::Type as S;
    let services = plugin_services(&mut env.csi).await;
    assert!(services.contains(&(S::ControllerService as i32)));
    assert!(services.contains(&(S::VolumeAccessibilityConstraints as i32)));
    let probe = env
        .csi
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_fails_with_failed_precondition_when_the_pool_is_unusable() {
    let mut env = TestEnv::start().await;
    std::fs::remove_dir_all(env.pool().join("volumes")).unwrap();
    let err = env
        .csi
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

// ---- CreateVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_for_the_same_name_and_arguments() {
    let mut env = TestEnv::start().await;
    let a = env.create("same", 20 * MIB, ext4()).await;
    let b = env.create("same", 20 * MIB, ext4()).await;
    assert_eq!(a, b);
    assert_eq!(env.pool_entries().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_rounds_capacity_up_and_honours_limits() {
    let mut env = TestEnv::start().await;
    assert_eq!(
        env.create("a", 20 * MIB + 1, ext4()).await.capacity_bytes,
        21 * MIB
    );
    assert_eq!(env.create("b", 1, ext4()).await.capacity_bytes, 16 * MIB);
    let mut unset = create_req("c", 0, ext4());
    unset.capacity_range = None;
    let c = env
        .csi
        .controller
        .create_volume(unset)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(c.capacity_bytes, 1 << 30);
    let mut limited = create_req("d", 0, ext4());
    limited.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 100 * MIB + 7,
    });
    let d = env
        .csi
        .controller
        .create_volume(limited)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(d.capacity_bytes, 100 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_carries_this_nodes_topology_and_honours_requisite() {
    let mut env = TestEnv::start().await;
    let v = env.create("a", 16 * MIB, ext4()).await;
    assert_eq!(v.accessible_topology, vec![topology("test-node")]);
    let mut elsewhere = create_req("b", 16 * MIB, ext4());
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topology("other-node")],
        preferred: vec![],
    });
    assert_eq!(
        create_code(&mut env, elsewhere).await,
        Code::ResourceExhausted
    );
    let mut here = create_req("c", 16 * MIB, ext4());
    here.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topology("other-node"), topology("test-node")],
        preferred: vec![topology("test-node")],
    });
    assert_eq!(create_code(&mut env, here).await, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let env = TestEnv::start().await;
    let mut tasks = vec![];
    for _ in 0..8 {
        let mut c = env.csi.controller.clone();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req("race", 16 * MIB, ext4())).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(env.pool_entries().len(), 1);
}

// ---- DeleteVolume ----

// ---- ValidateVolumeCapabilities ----

// ---- ListVolumes ----

async fn list(
    env: &mut TestEnv,
    max: i32,
    token: &str,
) -> Result<csi::ListVolumesResponse, tonic::Status> {
    env.csi
        .controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paginates_and_stays_correct_while_volumes_change() {
    let mut env = TestEnv::start().await;
    let mut ids = vec![];
    for i in 0..7 {
        ids.push(
            env.create(&format!("v{i}"), 16 * MIB, ext4())
                .await
                .volume_id,
        );
    }
    ids.sort();
    let all = list(&mut env, 0, "").await.unwrap();
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());
    assert!(
        all.entries
            .iter()
            .all(|e| e.status.as_ref().unwrap().volume_condition.is_some())
    );

    let first = list(&mut env, 3, "").await.unwrap();
    assert_eq!(first.entries.len(), 3);
    assert!(!first.next_token.is_empty());
    // Between pages: the last listed volume is deleted, one unlisted is deleted, one is added.
    env.delete(&ids[2]).await.unwrap();
    env.delete(&ids[4]).await.unwrap();
    let added = env.create("late", 16 * MIB, ext4()).await.volume_id;
    let mut seen: Vec<String> = first
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    let mut token = first.next_token;
    while !token.is_empty() {
        let page = list(&mut env, 3, &token).await.unwrap();
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        token = page.next_token;
    }
    let mut expected: Vec<String> = ids.iter().filter(|i| **i != ids[4]).cloned().collect();
    expected.push(added);
    expected.sort();
    seen.sort();
    assert_eq!(
        seen, expected,
        "each surviving volume exactly once, plus the new one"
    );
}

// ---- ControllerGetVolume, GetCapacity, capabilities ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_get_volume_reports_volume_and_condition() {
    let mut env = TestEnv::start().await;
    let vol = env.create("a", 16 * MIB, ext4()).await;
    let get = |id: &str| csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    let c = &mut env.csi.controller;
    assert_eq!(
        code(c.controller_get_volume(get("")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_get_volume(get("vol-0123456789abcdef01234567"))
                .await
        ),
        Code::NotFound
    );
    let r = c
        .controller_get_volume(get(&vol.volume_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.volume.unwrap(), vol);
    assert!(!r.status.unwrap().volume_condition.unwrap().abnormal);
    // The backing image disappears: the condition says so.
    std::fs::remove_file(
        env.pool()
            .join("volumes")
            .join(&vol.volume_id)
            .join("image"),
    )
    .unwrap();
    let r = env
        .csi
        .controller
        .controller_get_volume(get(&vol.volume_id))
        .await
        .unwrap()
        .into_inner();
    let cond = r.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("image"), "{cond:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_reports_pool_space_for_this_node_only() {
    let mut env = TestEnv::start().await;
    let here = env
        .csi
        .controller
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![ext4()],
            accessible_topology: Some(topology("test-node")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 0);
    assert!(here.maximum_volume_size.unwrap() > 0);
    assert_eq!(here.minimum_volume_size, Some(16 * MIB));
    let elsewhere = env
        .csi
        .controller
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topology("other-node")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_advertised_and_the_rest_is_unimplemented() {
    let mut env = TestEnv::start().await;
    use csi::controller_service_capability::rpc::Type as C;
    let caps = env
        .csi
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        C::CreateDeleteVolume,
        C::ListVolumes,
        C::GetCapacity,
        C::GetVolume,
        C::VolumeCondition,
        C::CreateDeleteSnapshot,
        C::ListSnapshots,
        C::GetSnapshot,
        C::CloneVolume,
        C::ModifyVolume,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?}");
    }
    // Volumes grow on their node (NodeExpandVolume): external-resizer then takes its
    // node-only path and never asks a node that does not hold the volume.
    assert!(!rpcs.contains(&(C::ExpandVolume as i32)));
    assert!(!rpcs.contains(&(C::PublishUnpublishVolume as i32)));
    let c = &mut env.csi.controller;
    assert_eq!(
        code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_modify_volume(csi::ControllerModifyVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );

    use csi::node_service_capability::rpc::Type as N;
    let node = env
        .csi
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = node
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        N::StageUnstageVolume,
        N::GetVolumeStats,
        N::VolumeCondition,
        N::SingleNodeMultiWriter,
        N::ExpandVolume,
        N::VolumeMountGroup,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?}");
    }
}

// ---- Node ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_info_reports_id_limit_and_topology() {
    let mut env = TestEnv::start().await;
    let info = env
        .csi
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    assert_eq!(info.max_volumes_per_node, 100);
    assert_eq!(info.accessible_topology, Some(topology("test-node")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_incompatible_capability_at_the_same_path_is_already_exists() {
    let mut env = TestEnv::start().await;
    let cap = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = env.create("a", 320 * MIB, cap.clone()).await.volume_id;
    let staging = env.path("staging");
    env.stage(&id, &staging, cap).await.unwrap();
    assert_eq!(
        code(env.stage(&id, &staging, ext4()).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            env.stage(&id, &staging, block_cap(Mode::SingleNodeWriter))
                .await
        ),
        Code::AlreadyExists
    );
    env.unstage(&id, &staging).await.unwrap();
    // The volume holds xfs now: staging it as ext4 elsewhere is refused, not reformatted.
    assert_eq!(
        code(env.stage(&id, &staging, ext4()).await),
        Code::FailedPrecondition
    );
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_volume_stats_errors_and_abnormal_condition() {
    let mut env = TestEnv::start().await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let staging = env.path("staging");
    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    let n = &mut env.csi.node;
    assert_eq!(
        code(n.node_get_volume_stats(stats(&id, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_get_volume_stats(stats("", &staging)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_get_volume_stats(stats("vol-0123456789abcdef01234567", &staging))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(n.node_get_volume_stats(stats(&id, &staging)).await),
        Code::NotFound,
        "not mounted there"
    );
    env.stage(&id, &staging, ext4()).await.unwrap();
    // Staged, but not at the path asked about (an existing directory, a relative path, one
    // outside the allowed directories, one that does not exist): NOT_FOUND.
    let elsewhere = env.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for path in [
        elsewhere.as_str(),
        "some/path",
        "/etc",
        "/tmp/strata-no-such-path",
    ] {
        assert_eq!(
            code(env.csi.node.node_get_volume_stats(stats(&id, path)).await),
            Code::NotFound,
            "{path}"
        );
        assert_eq!(
            code(
                env.csi
                    .node
                    .node_get_volume_stats(stats("vol-0123456789abcdef01234567", path))
                    .await
            ),
            Code::NotFound,
            "{path}"
        );
    }
    let ok = env
        .csi
        .node
        .node_get_volume_stats(stats(&id, &staging))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.volume_condition.unwrap().abnormal);
    // The backing image is deleted behind the driver's back.
    std::fs::remove_file(env.pool().join("volumes").join(&id).join("image")).unwrap();
    let bad = env
        .csi
        .node
        .node_get_volume_stats(stats(&id, &staging))
        .await
        .unwrap()
        .into_inner();
    let cond = bad.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_logged() {
    let mut env = TestEnv::start().await;
    let secret = "s3cr3t-value-that-must-not-leak";
    let mut req = create_req("with-secrets", 16 * MIB, ext4());
    req.secrets = HashMap::from([("password".to_string(), secret.to_string())]);
    env.csi.controller.create_volume(req).await.unwrap();
    let log = env.server_log();
    assert!(log.contains("CreateVolume"));
    assert!(!log.contains(secret));
    // What the core logs inside a call carries the call and its volume (a span).
    let id = env.create("spanned", 16 * MIB, ext4()).await.volume_id;
    let staging = env.path("staging");
    env.stage(&id, &staging, ext4()).await.unwrap();
    let span = format!("rpc{{method=\"NodeStageVolume\" volume_id=\"{id}\"}}");
    assert!(
        env.server_log()
            .lines()
            .any(|l| l.contains(&span) && !l.contains("micros=")),
        "no line inside the stage carries its span:\n{}",
        env.server_log()
    );
    env.unstage(&id, &staging).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_calls_never_unmount_what_is_not_the_volumes() {
    use strata_core::os::linux::LinuxHost;
    use strata_core::os::{Mounter, NodePath};
    let mut env = TestEnv::start().await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let foreign = env.path("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let bind_source = env.path("src");
    std::fs::create_dir(&bind_source).unwrap();
    LinuxHost
        .bind(
            &NodePath::trusted(std::path::Path::new(&bind_source)),
            &NodePath::trusted(std::path::Path::new(&foreign)),
            &Default::default(),
        )
        .unwrap();
    let mounted = || {
        !common::kernel_state_under(std::path::Path::new(&foreign))
            .0
            .is_empty()
    };

    assert_eq!(
        code(env.unpublish(&id, &foreign).await),
        Code::FailedPrecondition
    );
    assert!(mounted());
    assert_eq!(
        code(env.unstage(&id, &foreign).await),
        Code::Ok,
        "not staged there"
    );
    assert!(mounted());
    // Staging onto a path that holds another mount is refused too.
    assert_eq!(
        code(env.stage(&id, &foreign, ext4()).await),
        Code::AlreadyExists
    );
    assert!(mounted());
    LinuxHost
        .unmount(&mut NodePath::trusted(std::path::Path::new(&foreign)))
        .unwrap();
    env.unstage(&id, &foreign).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_paths_outside_the_allowed_directories_are_refused() {
    let mut env = TestEnv::start().await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    // Outside /tmp and /var/lib/kubelet, inside the pool, and through a symlink to /etc.
    let link = env.path("escape");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let pool_path = env.pool().join("volumes").display().to_string();
    for bad in [
        "/etc/strata-test".to_string(),
        "/root/x".to_string(),
        format!("{link}/strata-test"),
        pool_path,
    ] {
        assert_eq!(
            code(env.stage(&id, &bad, ext4()).await),
            Code::InvalidArgument,
            "{bad}"
        );
        assert_eq!(
            code(env.publish(&id, &env.path("s"), &bad, ext4(), false).await),
            Code::InvalidArgument,
            "{bad}"
        );
        // Nothing of Strata's can be published or staged there: nothing to undo. A path
        // through a symlink is refused as such (the volume is not staged, so its unstage
        // has nothing to look at).
        let undo = if bad.starts_with(&link) {
            Code::InvalidArgument
        } else {
            Code::Ok
        };
        assert_eq!(code(env.unpublish(&id, &bad).await), undo, "{bad}");
        assert_eq!(code(env.unstage(&id, &bad).await), Code::Ok, "{bad}");
        assert_eq!(
            code(env.unpublish("vol-0123456789abcdef01234567", &bad).await),
            Code::NotFound,
            "{bad}"
        );
    }
    assert!(!std::path::Path::new("/etc/strata-test").exists());
    env.assert_clean();
}

/// The error-table rows about capabilities the plugin does not offer: each RPC answers
/// with the code its own table names (docs/reliability.md lists every row and its test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_beyond_the_plugin_get_each_rpcs_code() {
    let mut env = TestEnv::start().await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let multi = mount_cap("ext4", Mode::MultiNodeMultiWriter);
    let staging = env.path("staging");
    // NodeStageVolume and NodePublishVolume: "Exceeds capabilities" is FAILED_PRECONDITION.
    assert_eq!(
        code(env.stage(&id, &staging, multi.clone()).await),
        Code::FailedPrecondition
    );
    env.stage(&id, &staging, ext4()).await.unwrap();
    assert_eq!(
        code(
            env.publish(&id, &staging, &env.path("t"), multi.clone(), false)
                .await
        ),
        Code::FailedPrecondition
    );
    // NodeExpandVolume and ControllerExpandVolume: INVALID_ARGUMENT.
    let node_expand = env
        .csi
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: staging.clone(),
            volume_capability: Some(multi.clone()),
            ..Default::default()
        })
        .await;
    assert_eq!(code(node_expand), Code::InvalidArgument);
    let controller_expand = env
        .csi
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(multi),
            ..Default::default()
        })
        .await;
    assert_eq!(code(controller_expand), Code::InvalidArgument);
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

/// CreateVolume's "Source incompatible or not supported": a restore or clone whose
/// requested filesystem differs from the one in its source is INVALID_ARGUMENT at create
/// time, not a FAILED_PRECONDITION at the first stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_another_filesystem_is_invalid_argument() {
    let mut env = TestEnv::start().await;
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = env.create("x", 320 * MIB, xfs.clone()).await.volume_id;
    let staging = env.path("staging");
    env.stage(&id, &staging, xfs.clone()).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    let snap = env.snapshot("s", &id).await.unwrap().snapshot_id;
    for source in [
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.clone(),
        }),
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: id.clone(),
        }),
    ] {
        let mut req = create_req("as-ext4", 320 * MIB, ext4());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source.clone()),
        });
        assert_eq!(
            create_code(&mut env, req).await,
            Code::InvalidArgument,
            "{source:?}"
        );
        // The same filesystem, or a raw block view of the same bytes, is fine.
        let mut req = create_req("as-xfs", 320 * MIB, xfs.clone());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        let made = env.csi.controller.create_volume(req).await.unwrap();
        env.delete(&made.into_inner().volume.unwrap().volume_id)
            .await
            .unwrap();
    }
    assert_eq!(env.pool_entries(), vec![id]);
}

/// "Operation pending" rows: a CreateSnapshot of a volume busy with another call, and a
/// DeleteSnapshot of a snapshot a restore is reading, are ABORTED, and succeed once the
/// other call is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_operations_on_a_volume_or_snapshot_are_aborted() {
    let mut env = TestEnv::start_with(Some("delay:stage:after-attach=1500")).await;
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let mut c = env.csi.clone();
    let (id2, st) = (id.clone(), env.path("staging"));
    let stage = tokio::spawn(async move { node_stage(&mut c, &id2, &st, ext4()).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(code(env.snapshot("s", &id).await), Code::Aborted);
    stage.await.unwrap().unwrap();
    let snap = env.snapshot("s", &id).await.unwrap().snapshot_id;
    env.unstage(&id, &env.path("staging")).await.unwrap();

    env.restart(Some("delay:create:after-data=1500")).await;
    let mut req = create_req("restored", 16 * MIB, ext4());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.clone(),
            },
        )),
    });
    let mut c = env.csi.clone();
    let restore = tokio::spawn(async move { c.controller.create_volume(req).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let delete = |id: &str| csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        secrets: Default::default(),
    };
    assert_eq!(
        code(env.csi.controller.delete_snapshot(delete(&snap)).await),
        Code::Aborted
    );
    let restored = restore.await.unwrap().unwrap().into_inner().volume.unwrap();
    env.csi
        .controller
        .delete_snapshot(delete(&snap))
        .await
        .unwrap();
    env.delete(&restored.volume_id).await.unwrap();
    env.delete(&id).await.unwrap();
    env.assert_clean();
}

/// mkfs.xfs refuses devices under 300 MiB: decided at CreateVolume, where the fsType is
/// known, never discovered by every NodeStageVolume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volumes_are_made_at_least_as_large_as_mkfs_xfs_needs() {
    let mut env = TestEnv::start().await;
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let small = env.create("small-xfs", 16 * MIB, xfs.clone()).await;
    assert_eq!(
        small.capacity_bytes,
        300 * MIB,
        "rounded up to the xfs minimum"
    );
    let staging = env.path("staging");
    env.stage(&small.volume_id, &staging, xfs.clone())
        .await
        .unwrap();
    env.unstage(&small.volume_id, &staging).await.unwrap();
    // Within a limit below the minimum: OUT_OF_RANGE, in one short line.
    let mut capped = create_req("capped-xfs", 16 * MIB, xfs.clone());
    capped.capacity_range = Some(csi::CapacityRange {
        required_bytes: 16 * MIB,
        limit_bytes: 100 * MIB,
    });
    let err = env.csi.controller.create_volume(capped).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().len() < 200 && !err.message().contains('\n'),
        "{}",
        err.message()
    );
    // GetCapacity reports the minimum of the filesystem asked about.
    let minimum = |caps: Vec<csi::VolumeCapability>| {
        let mut c = env.csi.controller.clone();
        async move {
            c.get_capacity(csi::GetCapacityRequest {
                volume_capabilities: caps,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .minimum_volume_size
        }
    };
    assert_eq!(minimum(vec![xfs]).await, Some(300 * MIB));
    assert_eq!(minimum(vec![ext4()]).await, Some(16 * MIB));
    env.delete(&small.volume_id).await.unwrap();
    env.assert_clean();
}
