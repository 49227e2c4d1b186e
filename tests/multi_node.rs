//! A cluster of two nodes, each with its own Strata on its own pool, driven the way the
//! Kubernetes components drive them: every node's external-resizer asks its own Strata what
//! it offers, and the kubelet of the node that holds a volume grows it.

mod common;

use common::*;
use csi::controller_service_capability::rpc::Type as C;
use csi::node_service_capability::rpc::Type as N;
use csi::plugin_capability::volume_expansion::Type as Expansion;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata::client::Csi;
use tonic::Code;

/// What external-resizer decides from a node's answers: `true` when it would call
/// ControllerExpandVolume on that node, `false` when it takes its node-only path (a "trivial"
/// resize of the PV, then NodeExpandVolume by the kubelet where the volume is).
async fn resizer_calls_the_controller(csi: &mut Csi) -> bool {
    let plugin = csi
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let online = plugin.capabilities.iter().any(|c| {
        matches!(&c.r#type,
            Some(csi::plugin_capability::Type::VolumeExpansion(e)) if e.r#type == Expansion::Online as i32)
    });
    assert!(online, "the plugin advertises online expansion");
    let controller = csi
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let has = |t: C| {
        controller.capabilities.iter().any(|c| {
            matches!(&c.r#type,
                Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type == t as i32)
        })
    };
    let node = csi
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let node_expands = node.capabilities.iter().any(|c| {
        matches!(&c.r#type,
            Some(csi::node_service_capability::Type::Rpc(r)) if r.r#type == N::ExpandVolume as i32)
    });
    assert!(node_expands, "the node grows volumes");
    has(C::ExpandVolume)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_reaches_the_node_that_holds_the_volume_and_no_other_answers_for_it() {
    let mut a = TestEnv::start_with_args(&["--node-id", "node-a"], None).await;
    let mut b = TestEnv::start_with_args(&["--node-id", "node-b"], None).await;
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = a.create("data", 320 * MIB, xfs.clone()).await.volume_id;
    let (staging, target) = (a.path("staging"), a.path("target"));
    a.stage(&id, &staging, xfs.clone()).await.unwrap();
    a.publish(&id, &staging, &target, xfs.clone(), false)
        .await
        .unwrap();
    std::fs::write(format!("{target}/kept"), b"data before growth").unwrap();

    // The PVC grows. Each node's resizer (one of them elected) asks its own Strata: none
    // offers ControllerExpandVolume, so none calls into a node for a volume it may not
    // hold, and none can mark the claim infeasible.
    for csi in [&mut a.csi, &mut b.csi] {
        assert!(!resizer_calls_the_controller(csi).await);
    }

    // The kubelet of node A, where the pod runs, grows the published volume online.
    let before = fs_size(&target);
    assert_eq!(
        node_expand(&mut a.csi, &id, &target, &staging, 400 * MIB)
            .await
            .unwrap(),
        400 * MIB
    );
    assert!(fs_size(&target) >= before + 70 * MIB as u64);
    // A retry (the kubelet's, after a timeout) is a no-op.
    assert_eq!(
        node_expand(&mut a.csi, &id, &target, &staging, 400 * MIB)
            .await
            .unwrap(),
        400 * MIB
    );
    // Node B has no such volume and no kubelet asks it; were it asked, it would not claim it.
    assert_eq!(
        node_expand(&mut b.csi, &id, &target, &staging, 400 * MIB)
            .await
            .map(drop)
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Offline: the claim grows while no pod uses it. The kubelet grows it when the next
    // pod starts, right after staging (volume_path = the staging path).
    a.unpublish(&id, &target).await.unwrap();
    a.unstage(&id, &staging).await.unwrap();
    a.stage(&id, &staging, xfs.clone()).await.unwrap();
    let before = fs_size(&staging);
    assert_eq!(
        node_expand(&mut a.csi, &id, &staging, &staging, 480 * MIB)
            .await
            .unwrap(),
        480 * MIB
    );
    assert!(fs_size(&staging) >= before + 70 * MIB as u64);
    a.publish(&id, &staging, &target, xfs.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(format!("{target}/kept")).unwrap(),
        b"data before growth"
    );
    // The volume's record knows its size: ListVolumes on A says 480 MiB; B lists nothing.
    let listed = a
        .csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        480 * MIB
    );
    let listed = b
        .csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());

    a.unpublish(&id, &target).await.unwrap();
    a.unstage(&id, &staging).await.unwrap();
    a.assert_clean();
    b.assert_clean();
}
