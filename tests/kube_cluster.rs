//! Strata's Kubernetes client against a real kube-apiserver (built from its Go module by
//! scripts/kube-apiserver.sh) with Debian's etcd: it runs as the strata-node service account
//! with exactly the RBAC rules of deploy/kubernetes/peer.yaml, reads the peer Service's
//! EndpointSlices, PersistentVolumes and VolumeSnapshotContents, and two servers find each
//! other through the EndpointSlices to restore a snapshot across nodes; with
//! deploy/kubernetes/node-loss.yaml's, the elected Strata releases a deleted Node.

#[path = "common/apiserver.rs"]
mod apiserver;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use apiserver::*;
use common::*;
use csi_proto as csi;
use strata::kube_cluster::KubeCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_client_reads_what_it_needs_as_its_service_account_and_nothing_more() {
    let api = tokio::task::spawn_blocking(ApiServer::start).await.unwrap();
    let kubeconfig = api.install_strata();
    // Addresses of the documentation range: only read here, never reached.
    api.apply(&endpoint_slice(
        "strata-peer-a",
        "node-a",
        "192.0.2.10",
        9820,
        true,
    ));
    api.apply(&endpoint_slice(
        "strata-peer-b",
        "node-b",
        "192.0.2.11",
        9820,
        false,
    ));
    // Another Service's slice in the namespace is not a peer.
    let other = endpoint_slice("other", "node-c", "192.0.2.12", 9820, true);
    api.apply(&other.replace("\"strata-peer\"}", "\"other\"}"));
    api.apply(
        r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"pvc-old"},
 "spec":{"capacity":{"storage":"1Gi"},"accessModes":["ReadWriteOnce"],
  "csi":{"driver":"strata.csi.dev","volumeHandle":"vol-0123456789abcdef01234567"},
  "nodeAffinity":{"required":{"nodeSelectorTerms":[{"matchExpressions":[
   {"key":"strata.csi.dev/node","operator":"In","values":["node-a"]}]}]}}}}"#,
    );
    api.apply(
        r#"{"apiVersion":"snapshot.storage.k8s.io/v1","kind":"VolumeSnapshotContent",
 "metadata":{"name":"snapcontent-old","labels":{"snapshot.storage.kubernetes.io/managed-by":"node-b"}},
 "spec":{"driver":"strata.csi.dev","deletionPolicy":"Delete","source":{"snapshotHandle":"snap-0123456789abcdef01234567"},
  "volumeSnapshotRef":{"name":"s","namespace":"default"}},
 "status":{"snapshotHandle":"snap-0123456789abcdef01234567"}}"#,
    );
    let cluster = KubeCluster::with_client(
        client_as(&kubeconfig).await,
        "strata-system",
        "strata-peer",
        "strata.csi.dev",
        "strata.csi.dev/node",
    );
    let endpoints = cluster.endpoints().await.unwrap();
    assert_eq!(
        endpoints.into_iter().collect::<Vec<_>>(),
        vec![("node-a".to_owned(), "192.0.2.10:9820".to_owned())],
        "only ready endpoints of the peer Service"
    );
    // The watch: the same after its list, then each change as it comes (a node ready, a
    // node gone), with no list in between.
    let watch = cluster.watch_endpoints();
    let watched = |want: &[(&str, &str)]| {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if cluster.watched_endpoints().as_ref() == Some(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the watch shows {:?}, not {want:?}",
                cluster.watched_endpoints()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    tokio::task::block_in_place(|| watched(&[("node-a", "192.0.2.10:9820")]));
    api.apply(&endpoint_slice(
        "strata-peer-b",
        "node-b",
        "192.0.2.11",
        9820,
        true,
    ));
    tokio::task::block_in_place(|| {
        watched(&[("node-a", "192.0.2.10:9820"), ("node-b", "192.0.2.11:9820")])
    });
    api.kubectl(&[
        "-n",
        "strata-system",
        "delete",
        "endpointslice",
        "strata-peer-b",
    ]);
    tokio::task::block_in_place(|| watched(&[("node-a", "192.0.2.10:9820")]));
    watch.abort();
    assert_eq!(
        cluster
            .pv_node("vol-0123456789abcdef01234567")
            .await
            .unwrap()
            .as_deref(),
        Some("node-a")
    );
    assert_eq!(
        cluster
            .pv_node("vol-ffffffffffffffffffffffff")
            .await
            .unwrap(),
        None
    );
    // By the PV's name, as ControllerModifyVolume gives it (--extra-modify-metadata): one
    // get, under the same RBAC; a name that is not this volume's PV falls back to the list.
    assert_eq!(
        cluster
            .named_pv_node("pvc-old", "vol-0123456789abcdef01234567")
            .await
            .unwrap()
            .as_deref(),
        Some("node-a")
    );
    assert_eq!(
        cluster
            .named_pv_node("pvc-missing", "vol-0123456789abcdef01234567")
            .await
            .unwrap()
            .as_deref(),
        Some("node-a")
    );
    assert_eq!(
        cluster
            .named_pv_node("pvc-old", "vol-ffffffffffffffffffffffff")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        cluster
            .content_node("snap-0123456789abcdef01234567")
            .await
            .unwrap()
            .as_deref(),
        Some("node-b")
    );
    // Which nodes exist (a source whose node is gone for good is NOT_FOUND).
    api.apply(r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"}}"#);
    assert_eq!(cluster.nodes().await.unwrap(), vec!["node-a".to_owned()]);
    // Exactly what deploy/kubernetes/peer.yaml grants: reads of these, nothing else.
    for (allowed, args) in [
        (
            true,
            vec![
                "list",
                "endpointslices.discovery.k8s.io",
                "-n",
                "strata-system",
            ],
        ),
        (
            true,
            vec![
                "watch",
                "endpointslices.discovery.k8s.io",
                "-n",
                "strata-system",
            ],
        ),
        (
            false,
            vec!["list", "endpointslices.discovery.k8s.io", "-n", "default"],
        ),
        (true, vec!["list", "persistentvolumes"]),
        (false, vec!["delete", "persistentvolumes"]),
        (false, vec!["patch", "persistentvolumes"]),
        (
            true,
            vec!["get", "volumesnapshotcontents.snapshot.storage.k8s.io"],
        ),
        (
            false,
            vec!["update", "volumesnapshotcontents.snapshot.storage.k8s.io"],
        ),
        (false, vec!["get", "secrets", "-n", "strata-system"]),
        (true, vec!["list", "nodes"]),
        (false, vec!["patch", "nodes"]),
        (
            false,
            vec![
                "create",
                "endpointslices.discovery.k8s.io",
                "-n",
                "strata-system",
            ],
        ),
    ] {
        assert_eq!(api.can_i(&args), allowed, "{args:?}");
    }
    // A client the API server refuses (a token for nobody) is UNAVAILABLE, with the reason.
    let stranger = api.dir.path().join("stranger.kubeconfig");
    let text = fs::read_to_string(&kubeconfig).unwrap();
    let start = text.find("token: ").unwrap() + 7;
    let end = start + text[start..].find('\n').unwrap();
    fs::write(
        &stranger,
        format!("{}not-a-token{}", &text[..start], &text[end..]),
    )
    .unwrap();
    let refused = KubeCluster::with_client(
        client_as(&stranger).await,
        "strata-system",
        "strata-peer",
        "strata.csi.dev",
        "strata.csi.dev/node",
    );
    let err = refused.endpoints().await.unwrap_err();
    assert!(matches!(err, strata_core::Error::Unavailable(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_find_each_other_through_the_peer_services_endpoint_slices() {
    // Namespace 0 holds the API server; 1 and 2 the nodes, each linked to the others.
    let net = netns::Net::new(3);
    const PEER: u16 = 9820;
    let addresses: Vec<String> = [1, 2].iter().map(|i| net.ip(0, *i)).collect();
    let ns0 = net.names[0].clone();
    let api = tokio::task::spawn_blocking(move || ApiServer::start_in(Some(&ns0), &addresses))
        .await
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let tls = peer_certs(certs.path());
    let ip = |of: usize, from: usize| net.ip(of, from);
    let mut nodes = start_peer_nodes(&api, &net, &tls, PEER, &[]).await;
    let (a, b) = nodes.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let vol = a.create("src", 64 << 20, ext4()).await;
    let image = a.pool().join("volumes").join(&vol.volume_id).join("image");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
        f.write_all_at(&[0x5a; 1 << 20], 8 << 20).unwrap();
    }
    let snap = a.snapshot("snap", &vol.volume_id).await.unwrap();
    let mut req = create_req("restored", 64 << 20, ext4());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = b
        .csi
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let copy = b
        .pool()
        .join("volumes")
        .join(&restored.volume_id)
        .join("image");
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&image).unwrap());
    assert!(
        b.server_log().contains("peers from Kubernetes"),
        "{}",
        b.server_log()
    );
    // Node A leaves the Service (not ready): B says it cannot reach it, and the
    // provisioner retries, rather than NOT_FOUND.
    api.apply(&endpoint_slice(
        "strata-peer-node-a",
        "node-a",
        &ip(1, 2),
        PEER,
        false,
    ));
    // B's EndpointSlice watch sees it within milliseconds; a second is plenty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut again = create_req("again", 64 << 20, ext4());
    again.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            },
        )),
    });
    let err = b
        .csi
        .controller
        .create_volume(again.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // With Node objects: node A's still there (NotReady, say) is the same UNAVAILABLE; once
    // it is deleted for good, what it held is NOT_FOUND (final).
    for node in ["node-a", "node-b"] {
        api.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}}}}"#
        ));
    }
    let err = b
        .csi
        .controller
        .create_volume(again.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    api.kubectl(&["delete", "node", "node-a"]);
    let err = b.csi.controller.create_volume(again).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    drop(nodes);
    drop(api);
    drop(net);
}

/// A PV of the driver pinned to `node`, bound to claim apps/`claim`, of class `class`, with
/// the provisioner's finalizer (what only that node's provisioner would remove).
fn pinned_pv(name: &str, node: &str, claim: &str, uid: &str, class: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"PersistentVolume","metadata":{{"name":"{name}",
 "finalizers":["external-provisioner.volume.kubernetes.io/finalizer"]}},
 "spec":{{"capacity":{{"storage":"1Gi"}},"accessModes":["ReadWriteOnce"],"storageClassName":"{class}",
  "claimRef":{{"namespace":"apps","name":"{claim}","uid":"{uid}"}},
  "csi":{{"driver":"strata.csi.dev","volumeHandle":"vol-{name}"}},
  "nodeAffinity":{{"required":{{"nodeSelectorTerms":[{{"matchExpressions":[
   {{"key":"strata.csi.dev/node","operator":"In","values":["{node}"]}}]}}]}}}}}}}}"#
    )
}

/// A Node deleted for good, with Strata's finalizer on it: the elected Strata (as the
/// strata-node service account, with exactly deploy/kubernetes/node-loss.yaml's rights)
/// deletes the claim of a class with `onNodeLoss: Delete` and releases its PV, keeps the
/// other (an event on its claim), releases a snapshot being deleted, and then the Node.
/// A second Strata does nothing while the first holds the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_is_released_by_the_elected_strata_with_exactly_its_rights() {
    use strata::kube_node_loss::KubeNodeLoss;
    use strata_core::node_loss::{FINALIZER, NodeLoss};

    let api = tokio::task::spawn_blocking(ApiServer::start).await.unwrap();
    let kubeconfig = api.install_strata();
    let node_loss =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/node-loss.yaml");
    api.kubectl(&[
        "-n",
        "strata-system",
        "apply",
        "-f",
        node_loss.to_str().unwrap(),
    ]);
    api.kubectl(&["create", "namespace", "apps"]);
    for node in ["node-a", "node-b", "node-c"] {
        api.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}}}}"#
        ));
    }
    api.apply(
        r#"{"apiVersion":"storage.k8s.io/v1","kind":"StorageClass","metadata":{"name":"strata-replaceable"},
 "provisioner":"strata.csi.dev","parameters":{"onNodeLoss":"Delete"}}"#,
    );
    api.apply(
        r#"{"apiVersion":"storage.k8s.io/v1","kind":"StorageClass","metadata":{"name":"strata"},
 "provisioner":"strata.csi.dev"}"#,
    );
    for (claim, class) in [
        ("db-0", "strata-replaceable"),
        ("db-1", "strata"),
        ("db-2", "strata-replaceable"),
    ] {
        api.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{{"name":"{claim}","namespace":"apps"}},
 "spec":{{"storageClassName":"{class}","accessModes":["ReadWriteOnce"],"resources":{{"requests":{{"storage":"1Gi"}}}}}}}}"#
        ));
    }
    let uid = |claim: &str| {
        api.kubectl(&[
            "-n",
            "apps",
            "get",
            "pvc",
            claim,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
    };
    api.apply(&pinned_pv(
        "pv-b-replaceable",
        "node-b",
        "db-0",
        &uid("db-0"),
        "strata-replaceable",
    ));
    api.apply(&pinned_pv(
        "pv-b-kept",
        "node-b",
        "db-1",
        &uid("db-1"),
        "strata",
    ));
    // Bound to an earlier db-2: the db-2 there now is a new claim its owner made, and stays.
    api.apply(&pinned_pv(
        "pv-b-stale",
        "node-b",
        "db-2",
        "00000000-0000-0000-0000-000000000000",
        "strata-replaceable",
    ));
    api.apply(&pinned_pv(
        "pv-a",
        "node-a",
        "web-0",
        "0",
        "strata-replaceable",
    ));
    api.apply(
        r#"{"apiVersion":"snapshot.storage.k8s.io/v1","kind":"VolumeSnapshotContent",
 "metadata":{"name":"snapcontent-b","labels":{"snapshot.storage.kubernetes.io/managed-by":"node-b"},
  "finalizers":["snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"]},
 "spec":{"driver":"strata.csi.dev","deletionPolicy":"Delete","source":{"snapshotHandle":"snap-b"},
  "volumeSnapshotRef":{"name":"s","namespace":"apps"}}}"#,
    );
    api.kubectl(&[
        "delete",
        "volumesnapshotcontent",
        "snapcontent-b",
        "--wait=false",
    ]);

    let client = client_as(&kubeconfig).await;
    let janitor = |node: &str| {
        NodeLoss::new(
            std::sync::Arc::new(KubeNodeLoss::new(
                client.clone(),
                "strata-system",
                "strata.csi.dev",
                "strata.csi.dev/node",
            )),
            node,
        )
    };
    let (a, b, c) = (janitor("node-a"), janitor("node-b"), janitor("node-c"));
    // Each Strata protects its own Node.
    let (a, c) = tokio::task::spawn_blocking(move || {
        a.protect().unwrap();
        b.protect().unwrap();
        b.protect().unwrap();
        (a, c)
    })
    .await
    .unwrap();
    let finalizers = |node: &str| {
        api.kubectl_try(&["get", "node", node, "-o", "jsonpath={.metadata.finalizers}"])
    };
    assert_eq!(finalizers("node-b").unwrap(), format!("[\"{FINALIZER}\"]"));
    // node-a's Strata is elected first; node-b is then deleted for good (not NotReady).
    let (a, c, first) = tokio::task::spawn_blocking(move || {
        let first = a.round().unwrap();
        (a, c, first)
    })
    .await
    .unwrap();
    assert!(first.leader && first.nodes_released.is_empty());
    api.kubectl(&["delete", "node", "node-b", "--wait=false"]);
    assert!(finalizers("node-b").is_ok(), "held by the finalizer");
    let (a, c, second, round) = tokio::task::spawn_blocking(move || {
        let second = c.round().unwrap();
        let round = a.round().unwrap();
        (a, c, second, round)
    })
    .await
    .unwrap();
    assert!(
        !second.leader,
        "node-c's Strata waits while node-a's holds the Lease"
    );
    assert!(round.leader);
    assert_eq!(round.nodes_released, vec!["node-b".to_owned()]);
    assert_eq!(
        round.claims_deleted,
        vec![("apps".to_owned(), "db-0".to_owned())]
    );
    let mut released = round.volumes_released.clone();
    released.sort();
    assert_eq!(released, vec!["pv-b-replaceable", "pv-b-stale"]);
    assert_eq!(round.volumes_reported, vec!["pv-b-kept".to_owned()]);
    assert_eq!(round.contents_released, vec!["snapcontent-b".to_owned()]);
    assert!(finalizers("node-b").is_err(), "the Node is gone");
    assert!(api.kubectl_try(&["get", "pv", "pv-b-replaceable"]).is_err());
    assert!(
        api.kubectl_try(&["get", "volumesnapshotcontent", "snapcontent-b"])
            .is_err()
    );
    api.kubectl(&["get", "pv", "pv-b-kept"]);
    api.kubectl(&["get", "pv", "pv-a"]);
    let deleting = api
        .kubectl_try(&[
            "-n",
            "apps",
            "get",
            "pvc",
            "db-0",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ])
        .unwrap_or_default();
    assert!(
        api.kubectl_try(&["-n", "apps", "get", "pvc", "db-0"])
            .is_err()
            || !deleting.is_empty(),
        "the replaceable claim is deleted"
    );
    api.kubectl(&["-n", "apps", "get", "pvc", "db-1"]);
    let db2 = api.kubectl(&[
        "-n",
        "apps",
        "get",
        "pvc",
        "db-2",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        db2.is_empty(),
        "a new claim of a lost volume's name is not deleted"
    );
    let events = api.kubectl(&[
        "-n",
        "apps",
        "get",
        "events",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("VolumeLostWithNode"), "{events}");
    assert_eq!(finalizers("node-a").unwrap(), format!("[\"{FINALIZER}\"]"));
    // A later round has nothing to do.
    let again = tokio::task::spawn_blocking(move || a.round().unwrap())
        .await
        .unwrap();
    assert!(again.leader && again.nodes_released.is_empty());
    drop(c);

    // An uninstall removes the finalizer from every Node (here as the service account).
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["node-loss", "release-finalizers"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node node-a"));
    assert_eq!(finalizers("node-a").unwrap(), "");

    // Exactly what node-loss.yaml grants.
    for (allowed, args) in [
        (true, vec!["patch", "nodes"]),
        (false, vec!["delete", "nodes"]),
        (true, vec!["delete", "persistentvolumes"]),
        (true, vec!["delete", "persistentvolumeclaims", "-n", "apps"]),
        (false, vec!["patch", "persistentvolumeclaims", "-n", "apps"]),
        (
            true,
            vec![
                "create",
                "leases.coordination.k8s.io",
                "-n",
                "strata-system",
            ],
        ),
        (
            false,
            vec!["create", "leases.coordination.k8s.io", "-n", "default"],
        ),
        (false, vec!["delete", "pods", "-n", "apps"]),
        (false, vec!["get", "secrets", "-n", "apps"]),
    ] {
        assert_eq!(api.can_i(&args), allowed, "{args:?}");
    }
}
