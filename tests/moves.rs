//! Moving a volume between two real servers, each in its own network namespace with its own
//! pool, through a real kube-apiserver: v1.35 with the MutablePVNodeAffinity gate (the
//! commit), v1.34 without it (the refusal). The servers run as the strata-node service
//! account with exactly deploy/kubernetes/peer.yaml and moves.yaml. A claim asks
//! (`strata.csi.dev/move-to`); the target pre-copies while the volume is mounted and
//! written on the source, finishes once it is unmounted, pins the PV to itself, and serves
//! the volume under the same id with every file; the source retires its copy. Then the
//! crash tests: either side SIGKILLed at each step of a move, restarted, and the move ends
//! with exactly one copy serving, and nothing left in either pool.

#[path = "common/apiserver.rs"]
mod apiserver;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use apiserver::*;
use common::*;

const PEER: u16 = 9821;
const GATED: Release = Release {
    version: Some("v1.35.4"),
    feature_gates: Some("MutablePVNodeAffinity=true"),
};

struct Cluster {
    api: ApiServer,
    nodes: Vec<TestEnv>,
    _tls: tempfile::TempDir,
    _net: netns::Net,
}

const NODES: [&str; 2] = ["node-a", "node-b"];

impl Cluster {
    /// The API server in namespace 0, node-a and node-b in 1 and 2, each with --moves and
    /// the peer service found through EndpointSlices.
    async fn start(release: Release) -> Cluster {
        let net = netns::Net::new(3);
        let addresses: Vec<String> = [1, 2].iter().map(|i| net.ip(0, *i)).collect();
        let ns0 = net.names[0].clone();
        let api = tokio::task::spawn_blocking(move || {
            ApiServer::start_release(Some(&ns0), &addresses, release)
        })
        .await
        .unwrap();
        let tls = tempfile::tempdir().unwrap();
        let dir = peer_certs(tls.path());
        let nodes = start_peer_nodes(&api, &net, &dir, PEER, &["--moves"]).await;
        let moves =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/moves.yaml");
        api.kubectl(&["apply", "-f", moves.to_str().unwrap()]);
        Cluster {
            api,
            nodes,
            _tls: tls,
            _net: net,
        }
    }

    /// [`Cluster::start`], with a 64 MiB ext4 volume on node-a and its claim default/data.
    async fn with_volume(release: Release) -> (Cluster, String) {
        let mut c = Cluster::start(release).await;
        let vol = c.node("node-a").create("data", 64 << 20, ext4()).await;
        c.claim(&vol.volume_id, "node-a");
        (c, vol.volume_id)
    }

    fn node(&mut self, name: &str) -> &mut TestEnv {
        let i = NODES.iter().position(|n| *n == name).unwrap();
        &mut self.nodes[i]
    }

    /// A PV of `volume_id` pinned to `node`, bound to claim default/data.
    fn claim(&self, volume_id: &str, node: &str) {
        self.claim_named("data", volume_id, node, "");
    }

    /// A PV `pv-NAME` of `volume_id` of class `class` pinned to `node`, bound to claim
    /// default/NAME.
    fn claim_named(&self, name: &str, volume_id: &str, node: &str, class: &str) {
        self.api.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"PersistentVolume","metadata":{{"name":"pv-{name}"}},
 "spec":{{"capacity":{{"storage":"64Mi"}},"accessModes":["ReadWriteOnce"],"storageClassName":"{class}",
  "claimRef":{{"namespace":"default","name":"{name}"}},
  "csi":{{"driver":"strata.csi.dev","volumeHandle":"{volume_id}","fsType":"ext4"}},
  "nodeAffinity":{{"required":{{"nodeSelectorTerms":[{{"matchExpressions":[
   {{"key":"strata.csi.dev/node","operator":"In","values":["{node}"]}}]}}]}}}}}}}}"#
        ));
        self.api.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{{"name":"{name}","namespace":"default"}},
 "spec":{{"accessModes":["ReadWriteOnce"],"storageClassName":"{class}","volumeName":"pv-{name}",
  "resources":{{"requests":{{"storage":"64Mi"}}}}}}}}"#
        ));
    }

    fn ask(&self, target: &str) {
        self.api.kubectl(&[
            "-n",
            "default",
            "annotate",
            "--overwrite",
            "pvc",
            "data",
            &format!("strata.csi.dev/move-to={target}"),
        ]);
    }

    fn jsonpath(&self, kind: &str, path: &str) -> String {
        let name = if kind == "pv" { "pv-data" } else { "data" };
        self.api.kubectl(&[
            "-n",
            "default",
            "get",
            kind,
            name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    fn pinned_to(&self) -> String {
        self.jsonpath(
            "pv",
            "{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}",
        )
    }

    fn status(&self) -> String {
        self.jsonpath(
            "pvc",
            r"{.metadata.annotations.strata\.csi\.dev/move-status}",
        )
    }

    fn move_to(&self) -> String {
        self.jsonpath("pvc", r"{.metadata.annotations.strata\.csi\.dev/move-to}")
    }

    /// Waits until `done` holds, up to `limit`, showing the claim and the logs if not.
    async fn wait(&mut self, what: &str, limit: Duration, done: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            if Instant::now() > deadline {
                panic!(
                    "{what}: not within {} s; status {:?}, pinned to {:?}\n--- node-a\n{}\n--- node-b\n{}",
                    limit.as_secs(),
                    self.status(),
                    self.pinned_to(),
                    self.nodes[0].server_log(),
                    self.nodes[1].server_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits for the move to `target` to be done: the PV pinned there, the intent gone,
    /// the source's copy retired.
    async fn wait_moved(&mut self, source: &str, target: &str, volume_id: &str) {
        let target_owned = target.to_owned();
        self.wait("the move", Duration::from_secs(90), move |c| {
            c.pinned_to() == target_owned && c.move_to().is_empty()
        })
        .await;
        assert!(self.status().starts_with("Moved"), "{}", self.status());
        let image = Path::new("volumes").join(volume_id);
        wait_gone(&self.node(source).pool().join(&image)).await;
        assert!(self.node(target).pool().join(&image).exists());
        // The source drops its copy of the move just after the volume (a moment later).
        for node in NODES {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let left = leftovers(&self.node(node).pool());
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    let log = self.node(node).server_log();
                    panic!("{node} left {left:?}:\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits up to a minute for the source's copy at `path` to be retired.
async fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "the source kept {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What a pool holds of moves in flight.
fn leftovers(pool: &Path) -> Vec<String> {
    let mut left = vec![];
    for side in ["in", "out"] {
        let entries = fs::read_dir(pool.join("moves").join(side)).unwrap();
        left.extend(
            entries.map(|e| format!("{side}/{}", e.unwrap().file_name().to_string_lossy())),
        );
    }
    left
}

/// Mounts the volume on `node`, writes `name`, reads back every earlier file, unmounts.
async fn write_and_check(c: &mut Cluster, node: &str, id: &str, name: &str, earlier: &[String]) {
    let env = c.node(node);
    let target = env.mount(id, "data", ext4()).await;
    for file in earlier {
        assert_eq!(
            fs::read_to_string(Path::new(&target).join(file)).unwrap(),
            format!("{file} written"),
            "on {node}"
        );
    }
    fs::write(Path::new(&target).join(name), format!("{name} written")).unwrap();
    env.unmount(id, "data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_in_use_moves_to_another_node_with_its_data() {
    let (mut c, id) = Cluster::with_volume(GATED).await;
    // In use on node-a while the move starts.
    let target = c.node("node-a").mount(&id, "data", ext4()).await;
    fs::write(Path::new(&target).join("before"), "before written").unwrap();
    c.ask("node-b");
    c.wait("the pre-copy", Duration::from_secs(60), |c| {
        c.status().starts_with("Waiting")
    })
    .await;
    assert!(
        c.status().contains("in use on node node-a"),
        "{}",
        c.status()
    );
    assert_eq!(c.pinned_to(), "node-a");
    // Written after the pre-copy: the final copy carries it.
    fs::write(Path::new(&target).join("during"), "during written").unwrap();
    c.node("node-a").unmount(&id, "data").await;
    c.wait_moved("node-a", "node-b", &id).await;
    write_and_check(
        &mut c,
        "node-b",
        &id,
        "after",
        &["before".into(), "during".into()],
    )
    .await;
    // Node A no longer has it; its events are on the claim.
    let err = c
        .node("node-a")
        .stage(&id, "/tmp/strata-moved-away", ext4())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let events = c.api.kubectl(&[
        "-n",
        "default",
        "get",
        "events",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        events.contains("MoveCopying") && events.contains("VolumeMoved"),
        "{events}"
    );
    // Withdrawn before its commit: everything stays as it was.
    let target = c.node("node-b").mount(&id, "data", ext4()).await;
    c.ask("node-a");
    c.wait("the pre-copy back", Duration::from_secs(60), |c| {
        c.status().starts_with("Waiting")
    })
    .await;
    c.api.kubectl(&[
        "-n",
        "default",
        "annotate",
        "pvc",
        "data",
        "strata.csi.dev/move-to-",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(leftovers(&c.node("node-a").pool()).is_empty()
        && leftovers(&c.node("node-b").pool()).is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "a withdrawn move left its copies"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(c.pinned_to(), "node-b");
    assert!(Path::new(&target).join("after").exists());
    c.node("node-b").unmount(&id, "data").await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gate_a_move_is_refused_at_once_and_nothing_is_copied() {
    let (mut c, _) = Cluster::with_volume(Release::default()).await;
    c.ask("node-b");
    c.wait("the refusal", Duration::from_secs(30), |c| {
        c.status().starts_with("Refused")
    })
    .await;
    let status = c.status();
    assert!(status.contains("MutablePVNodeAffinity"), "{status}");
    assert_eq!(c.pinned_to(), "node-a");
    for node in NODES {
        assert!(leftovers(&c.node(node).pool()).is_empty());
    }
    let events = c.api.kubectl(&[
        "-n",
        "default",
        "get",
        "events",
        "-o",
        "jsonpath={.items[*].type}",
    ]);
    assert!(events.contains("Warning"), "{events}");
    drop(c);
}

/// Either side killed at each step of a move (its fault points), restarted: the move
/// ends with the volume served by exactly one node, with every file written before, and
/// nothing left of the move in either pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_killed_at_any_step_on_either_side_ends_with_one_serving_copy() {
    let (mut c, id) = Cluster::with_volume(GATED).await;
    let mut files: Vec<String> = vec![];
    let mut holder = "node-a";
    // (the side killed, its fault point)
    let steps = [
        ("target", "move:after-precopy"),
        ("source", "move:after-base"),
        ("target", "move:after-final"),
        ("source", "move:after-seal"),
        ("target", "move:after-repin"),
        ("source", "move:before-retire"),
    ];
    for (side, point) in steps {
        let other = if holder == "node-a" {
            "node-b"
        } else {
            "node-a"
        };
        let name = format!("file-{}", files.len());
        write_and_check(&mut c, holder, &id, &name, &files).await;
        files.push(name);
        let victim = if side == "source" { holder } else { other };
        c.node(victim).restart(Some(point)).await;
        c.ask(other);
        let died = {
            let env = c.node(victim);
            tokio::task::block_in_place(|| env.exited_within(Duration::from_secs(60)))
        };
        assert!(
            died,
            "{victim} did not reach {point}:\n{}",
            c.node(victim).server_log()
        );
        c.node(victim).restart(None).await;
        c.wait_moved(holder, other, &id).await;
        holder = other;
    }
    write_and_check(&mut c, holder, &id, "last", &files).await;
    drop(c);
}

/// A drained node (cordoned, annotated strata.csi.dev/evacuate) has each of its volumes
/// moved to the node with room, as this driver's CSIStorageCapacities say; a node without
/// room is not chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuated_node_moves_every_volume_to_a_node_with_room() {
    let mut c = Cluster::start(GATED).await;
    c.api.apply(
        r#"{"apiVersion":"storage.k8s.io/v1","kind":"StorageClass","metadata":{"name":"strata"},
 "provisioner":"strata.csi.dev","volumeBindingMode":"WaitForFirstConsumer"}"#,
    );
    for node in NODES {
        c.api.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}}}}"#
        ));
        // node-a claims room too: being evacuated, it is never chosen.
        c.api.apply(&format!(
            r#"{{"apiVersion":"storage.k8s.io/v1","kind":"CSIStorageCapacity",
 "metadata":{{"name":"cap-{node}","namespace":"strata-system"}},"storageClassName":"strata",
 "nodeTopology":{{"matchLabels":{{"strata.csi.dev/node":"{node}"}}}},"capacity":"10Gi"}}"#
        ));
    }
    let mut ids = vec![];
    for i in 0..3 {
        let name = format!("data-{i}");
        let vol = c.node("node-a").create(&name, 64 << 20, ext4()).await;
        write_and_check(&mut c, "node-a", &vol.volume_id, &name, &[]).await;
        c.claim_named(&name, &vol.volume_id, "node-a", "strata");
        ids.push((name, vol.volume_id));
    }
    // What `kubectl drain` and the operator do.
    c.api.kubectl(&["cordon", "node-a"]);
    c.api
        .kubectl(&["annotate", "node", "node-a", "strata.csi.dev/evacuate=true"]);
    let pinned = |c: &Cluster, name: &str| {
        c.api.kubectl(&[
            "get",
            "pv",
            &format!("pv-{name}"),
            "-o",
            "jsonpath={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}",
        ])
    };
    let names: Vec<String> = ids.iter().map(|(n, _)| n.clone()).collect();
    c.wait("the evacuation", Duration::from_secs(120), move |c| {
        names.iter().all(|n| pinned(c, n) == "node-b")
    })
    .await;
    for (name, id) in &ids {
        wait_gone(&c.node("node-a").pool().join("volumes").join(id)).await;
        write_and_check(&mut c, "node-b", id, "moved", std::slice::from_ref(name)).await;
    }
    drop(c);
}
