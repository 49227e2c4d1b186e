//! Volumes beyond their node: several `strata serve`, each with its own pool, node id and
//! peer listener in its own network namespace, joined by veth links, with certificates made
//! by `strata peer-certs`. Restores and clones across nodes, nodes that go away and come
//! back, a reader killed mid-copy, the provisioner's timeouts and retries, and callers that
//! are not Strata nodes.

mod common;
#[path = "common/helm.rs"]
mod helm;
#[path = "common/netns.rs"]
mod netns;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use csi_proto as csi;
use netns::Net;
use strata::client::snapshot::{each_metadata_page, metadata_pages};
use tonic::Code;

const PEER_PORT: u16 = 9820;

/// Nodes `node-0`..`node-N` in their own network namespaces.
struct Cluster {
    nodes: Vec<TestEnv>,
    net: Net,
    _certs: tempfile::TempDir,
}

fn node_args(net: &Net, i: usize, n: usize, tls: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--node-id".into(),
        format!("node-{i}"),
        "--peer-listen".into(),
        format!("0.0.0.0:{PEER_PORT}"),
        "--peer-tls-dir".into(),
        tls.display().to_string(),
        "--peer-timeout".into(),
        "3".into(),
        "--peer-read-idle".into(),
        "2".into(),
    ];
    for j in (0..n).filter(|j| *j != i) {
        args.push("--peer".into());
        args.push(format!("node-{j}={}", net.address(j, i, PEER_PORT)));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Cluster {
    /// A server per `(fs_type, backend)`, each on a pool of its own `fs_type` filesystem.
    async fn start_on_fs(pools: &[(&str, &str)]) -> Cluster {
        let n = pools.len();
        let net = Net::new(n);
        let certs = tempfile::tempdir().unwrap();
        let tls = peer_certs(certs.path());
        let mut nodes = vec![];
        for (i, (fs_type, backend)) in pools.iter().enumerate() {
            let args = node_args(&net, i, n, &tls, &["--backend", backend]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(TestEnv::start_on_fs_in(Some(&net.names[i]), fs_type, 1 << 30, &args).await);
        }
        Cluster {
            nodes,
            net,
            _certs: certs,
        }
    }

    async fn start(n: usize, extra: &[&[&str]]) -> Cluster {
        Self::start_with_certs(n, extra, peer_certs).await
    }

    /// [`Cluster::start`] with the peer certificates `make` writes into a directory.
    async fn start_with_certs(
        n: usize,
        extra: &[&[&str]],
        make: impl FnOnce(&Path) -> PathBuf,
    ) -> Cluster {
        let net = Net::new(n);
        let certs = tempfile::tempdir().unwrap();
        let tls = make(certs.path());
        let mut nodes = vec![];
        for i in 0..n {
            let args = node_args(&net, i, n, &tls, extra.get(i).copied().unwrap_or(&[]));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(TestEnv::start_in(Some(&net.names[i]), &args, None).await);
        }
        Cluster {
            nodes,
            net,
            _certs: certs,
        }
    }
}

fn image(env: &TestEnv, kind: &str, id: &str) -> PathBuf {
    env.pool().join(kind).join(id).join("image")
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

fn from_snapshot(name: &str, bytes: i64, snapshot: &str) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, bytes, ext4());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    req
}

fn from_volume(name: &str, bytes: i64, volume: &str) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, bytes, ext4());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: volume.into(),
            },
        )),
    });
    req
}

async fn create(
    env: &mut TestEnv,
    req: csi::CreateVolumeRequest,
) -> Result<csi::Volume, tonic::Status> {
    env.csi
        .controller
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

/// An ext4 volume on `env`, staged and published, with `mib` MiB of random data in a file.
async fn published_with_data(
    env: &mut TestEnv,
    name: &str,
    mib: usize,
) -> (String, String, String) {
    let vol = env.create(name, 256 << 20, ext4()).await;
    let (staging, target) = (
        env.path(&format!("{name}-staging")),
        env.path(&format!("{name}-target")),
    );
    fs::create_dir_all(&staging).unwrap();
    env.stage(&vol.volume_id, &staging, ext4()).await.unwrap();
    env.publish(&vol.volume_id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    let data: Vec<u8> = (0..mib << 20).map(|i| (i * 7919 % 251) as u8).collect();
    fs::write(Path::new(&target).join("data"), &data).unwrap();
    let sync = Command::new("sync")
        .arg("-f")
        .arg(&target)
        .status()
        .unwrap();
    assert!(sync.success());
    (vol.volume_id, staging, target)
}

async fn unpublish_all(env: &mut TestEnv, id: &str, staging: &str, target: &str) {
    env.unpublish(id, target).await.unwrap();
    env.unstage(id, staging).await.unwrap();
}

fn no_creation_left(env: &TestEnv) {
    let left: Vec<String> = fs::read_dir(env.pool().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "half-made volumes: {left:?}");
    let reads = env.pool().join("peer-reads");
    let held: Vec<_> = fs::read_dir(&reads)
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(
        held.iter().all(|n| *n == 0),
        "copies of reads left in {}",
        reads.display()
    );
}

async fn volume_names(env: &mut TestEnv) -> Vec<String> {
    let list = env
        .csi
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    list.entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_and_a_live_volume_clones_on_another_node() {
    let mut c = Cluster::start(2, &[]).await;
    let (a, b) = c.nodes.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let (vol, staging, target) = published_with_data(a, "src", 8).await;
    let snap = a.snapshot("snap", &vol).await.unwrap();

    // Restore on node 1 of a snapshot node 0 holds: byte-identical, and only what the
    // snapshot allocates travelled and was allocated.
    let restored = create(b, from_snapshot("restored", 256 << 20, &snap.snapshot_id))
        .await
        .unwrap();
    let topology = &restored.accessible_topology[0].segments;
    assert_eq!(
        topology.get("strata.csi.dev/node").map(String::as_str),
        Some("node-1")
    );
    let (src, dst) = (
        image(a, "snapshots", &snap.snapshot_id),
        image(b, "volumes", &restored.volume_id),
    );
    assert!(
        same_bytes(&src, &dst),
        "the restored image differs from the snapshot"
    );
    assert!(
        allocated(&dst) <= allocated(&src),
        "{} > {}",
        allocated(&dst),
        allocated(&src)
    );
    assert!(
        allocated(&dst) < 64 << 20,
        "the copy is sparse: {}",
        allocated(&dst)
    );
    // The restored volume mounts on node 1 with the data.
    let (s2, t2) = (b.path("r-staging"), b.path("r-target"));
    fs::create_dir_all(&s2).unwrap();
    b.stage(&restored.volume_id, &s2, ext4()).await.unwrap();
    b.publish(&restored.volume_id, &s2, &t2, ext4(), false)
        .await
        .unwrap();
    assert_eq!(
        fs::read(Path::new(&t2).join("data")).unwrap(),
        fs::read(Path::new(&target).join("data")).unwrap()
    );
    unpublish_all(b, &restored.volume_id, &s2, &t2).await;

    // Clone, on node 1, of the volume node 0 has mounted while a writer keeps writing to it:
    // a crash-consistent copy, and nothing left on node 0.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (writing, file) = (writing.clone(), Path::new(&target).join("log"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = fs::File::create(file).unwrap();
            let mut n = 0u64;
            while writing.load(Ordering::SeqCst) {
                writeln!(f, "line {n}").unwrap();
                n += 1;
                if n.is_multiple_of(1000) {
                    f.sync_data().unwrap();
                }
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let clone = create(b, from_volume("clone", 256 << 20, &vol))
        .await
        .unwrap();
    writing.store(false, Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image(b, "volumes", &clone.volume_id))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the clone's filesystem is not clean: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    no_creation_left(a);
    no_creation_left(b);
    let log = a.server_log();
    assert!(log.contains("peer read released"), "{log}");
    assert!(!log.contains("peer read closed: idle"));
    let log = b.server_log();
    assert!(log.contains("copied from another node"), "{log}");
    unpublish_all(a, &vol, &staging, &target).await;
    drop(c.net);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_be_reached_is_unavailable_until_it_is_back() {
    let mut c = Cluster::start(2, &[]).await;
    let vol = c.nodes[0].create("src", 64 << 20, ext4()).await;
    let snap = c.nodes[0].snapshot("snap", &vol.volume_id).await.unwrap();
    let req = || from_snapshot("restored", 64 << 20, &snap.snapshot_id);

    // Node 0's links are down: the call fails within the peer timeout, as UNAVAILABLE
    // (which the provisioner retries), and leaves nothing on node 1.
    c.net.set_links(0, false);
    let started = Instant::now();
    let err = create(&mut c.nodes[1], req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("node-0"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(20));
    no_creation_left(&c.nodes[1]);
    c.net.set_links(0, true);
    create(&mut c.nodes[1], req()).await.unwrap();

    // Node 0's server is killed: UNAVAILABLE; restarted, the retry succeeds.
    c.nodes[0].kill();
    let err = create(
        &mut c.nodes[1],
        from_snapshot("again", 64 << 20, &snap.snapshot_id),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    c.nodes[0].restart(None).await;
    create(
        &mut c.nodes[1],
        from_snapshot("again", 64 << 20, &snap.snapshot_id),
    )
    .await
    .unwrap();
    // Gone everywhere: NOT_FOUND, which the provisioner takes as final.
    c.nodes[0]
        .csi
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
    let err = create(
        &mut c.nodes[1],
        from_snapshot("gone", 64 << 20, &snap.snapshot_id),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_mid_copy_is_unavailable_and_the_retry_completes_once_it_is_back() {
    let mut c = Cluster::start(2, &[]).await;
    let (vol, staging, target) = published_with_data(&mut c.nodes[0], "src", 6).await;
    let snap = c.nodes[0].snapshot("snap", &vol).await.unwrap();
    unpublish_all(&mut c.nodes[0], &vol, &staging, &target).await;
    // Each chunk node 1 writes takes 500 ms: node 0 dies while it streams.
    c.nodes[1].restart(Some("delay:copy:after-chunk=500")).await;
    let mut b = c.nodes[1].csi.clone();
    let snapshot_id = snap.snapshot_id.clone();
    let copy = tokio::spawn(async move {
        b.controller
            .create_volume(from_snapshot("restored", 256 << 20, &snapshot_id))
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.nodes[0].server_log().contains("peer read opened") {
        assert!(Instant::now() < deadline, "the copy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.nodes[0].kill();
    let err = copy.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        c.nodes[1].server_log().contains("resuming"),
        "the stream was resumed first"
    );
    assert!(volume_names(&mut c.nodes[1]).await.is_empty());
    no_creation_left(&c.nodes[1]);
    // Node 0 is back: the provisioner's retry copies the whole snapshot again.
    c.nodes[0].restart(None).await;
    let restored = create(
        &mut c.nodes[1],
        from_snapshot("restored", 256 << 20, &snap.snapshot_id),
    )
    .await
    .unwrap();
    assert!(same_bytes(
        &image(&c.nodes[0], "snapshots", &snap.snapshot_id),
        &image(&c.nodes[1], "volumes", &restored.volume_id)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_killed_mid_copy_retries_to_completion_and_leaves_nothing() {
    let mut c = Cluster::start(2, &[]).await;
    let (vol, staging, target) = published_with_data(&mut c.nodes[0], "src", 6).await;
    unpublish_all(&mut c.nodes[0], &vol, &staging, &target).await;
    // Node 1 dies after the first chunk it writes.
    c.nodes[1].restart(Some("copy:after-chunk")).await;
    let err = create(&mut c.nodes[1], from_volume("clone", 256 << 20, &vol)).await;
    assert!(err.is_err(), "the server was killed mid-copy");
    c.nodes[1].wait_for_exit();
    c.nodes[1].restart(None).await;
    // Nothing half-made is listed; the provisioner's retry completes.
    assert!(volume_names(&mut c.nodes[1]).await.is_empty());
    no_creation_left(&c.nodes[1]);
    let clone = create(&mut c.nodes[1], from_volume("clone", 256 << 20, &vol))
        .await
        .unwrap();
    assert_eq!(
        volume_names(&mut c.nodes[1]).await,
        vec![clone.volume_id.clone()]
    );
    assert!(same_bytes(
        &image(&c.nodes[0], "volumes", &vol),
        &image(&c.nodes[1], "volumes", &clone.volume_id)
    ));
    // The read the dead reader held on node 0 is closed once idle; its copy is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !c.nodes[0].server_log().contains("peer read closed: idle") {
        assert!(Instant::now() < deadline, "{}", c.nodes[0].server_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    no_creation_left(&c.nodes[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provisioners_timeouts_and_retries_end_in_one_volume() {
    // Each chunk node 1 writes takes 700 ms: the copy outlasts the provisioner's timeout.
    let mut c = Cluster::start(2, &[]).await;
    let (vol, staging, target) = published_with_data(&mut c.nodes[0], "src", 3).await;
    let snap = c.nodes[0].snapshot("snap", &vol).await.unwrap();
    unpublish_all(&mut c.nodes[0], &vol, &staging, &target).await;
    c.nodes[1].restart(Some("delay:copy:after-chunk=700")).await;
    // external-provisioner: CreateVolume with its --timeout, then retries with backoff,
    // the same request each time, until a final answer.
    let mut codes = vec![];
    let mut backoff = Duration::from_millis(100);
    let volume = loop {
        let mut req = tonic::Request::new(from_snapshot("pvc-1", 256 << 20, &snap.snapshot_id));
        req.set_timeout(Duration::from_secs(1));
        match c.nodes[1].csi.controller.create_volume(req).await {
            Ok(r) => break r.into_inner().volume.unwrap(),
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::DeadlineExceeded | Code::Aborted | Code::Cancelled
                    ),
                    "a final error while the copy runs: {s:?}"
                );
                codes.push(s.code());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        assert!(codes.len() < 30, "{codes:?}");
    };
    // The first call timed out (tonic reports its own deadline as CANCELLED, Go's gRPC as
    // DEADLINE_EXCEEDED); the retries while the copy ran found it in flight (ABORTED).
    assert!(
        matches!(codes[0], Code::DeadlineExceeded | Code::Cancelled),
        "{codes:?}"
    );
    assert!(codes.contains(&Code::Aborted), "{codes:?}");
    assert_eq!(
        volume_names(&mut c.nodes[1]).await,
        vec![volume.volume_id.clone()]
    );
    assert!(same_bytes(
        &image(&c.nodes[0], "snapshots", &snap.snapshot_id),
        &image(&c.nodes[1], "volumes", &volume.volume_id)
    ));
}

/// A raw client of node `i`'s peer service on loopback.
async fn peer_call(
    address: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<strata_peer_proto::LookupResponse, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = strata_peer_proto::peer_client::PeerClient::new(channel);
    client
        .lookup(strata_peer_proto::LookupRequest {
            kind: strata_peer_proto::SourceKind::Volume as i32,
            id: "vol-0123456789abcdef01234567".into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{s:?}"))
}

/// Node `node-a` serving its peer service on a free loopback port with the certificates in
/// `tls`, and that port's address.
async fn listening_node(tls: &Path) -> (TestEnv, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let address = format!("127.0.0.1:{port}");
    let tls_dir = tls.display().to_string();
    let env = TestEnv::start_with_args(
        &[
            "--node-id",
            "node-a",
            "--peer-listen",
            &address,
            "--peer-tls-dir",
            &tls_dir,
        ],
        None,
    )
    .await;
    (env, address)
}

fn tls_files(dir: &Path) -> (String, String, String) {
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
    (read("ca.crt"), read("tls.crt"), read("tls.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_certificate_of_the_peer_ca_are_refused_before_any_handler() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let certs = tempfile::tempdir().unwrap();
    let (ours, theirs) = (peer_certs(certs.path()), peer_certs(certs.path()));
    let (mut a, address) = listening_node(&ours).await;
    let vol = a.create("src", 64 << 20, ext4()).await;
    let (ca, cert, key) = tls_files(&ours);
    let (other_ca, other_cert, other_key) = tls_files(&theirs);
    let client = |ca: &str, identity: Option<(&str, &str)>| {
        let mut c = ClientTlsConfig::new()
            .domain_name("strata-peer")
            .ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        c
    };
    // Clear text, no client certificate, a certificate of another CA: all refused.
    assert!(peer_call(&address, None).await.is_err());
    assert!(peer_call(&address, Some(client(&ca, None))).await.is_err());
    assert!(
        peer_call(&address, Some(client(&ca, Some((&other_cert, &other_key)))))
            .await
            .is_err()
    );
    // A server of another CA is not trusted either.
    assert!(
        peer_call(&address, Some(client(&other_ca, Some((&cert, &key)))))
            .await
            .is_err()
    );
    let log = a.server_log();
    assert!(
        !log.contains("method=\"peer."),
        "a refused caller reached a handler: {log}"
    );
    // The node's own certificate is served.
    let answer = peer_call(&address, Some(client(&ca, Some((&cert, &key)))))
        .await
        .unwrap();
    assert!(!answer.found);
    assert_eq!(answer.node_id, "node-a");
    // A node whose certificates come from another CA cannot copy from this one.
    let other_dir = theirs.display().to_string();
    let peer = format!("node-a={address}");
    let mut b = TestEnv::start_with_args(
        &[
            "--node-id",
            "node-b",
            "--peer-tls-dir",
            &other_dir,
            "--peer",
            &peer,
            "--peer-timeout",
            "3",
        ],
        None,
    )
    .await;
    let err = create(&mut b, from_volume("clone", 64 << 20, &vol.volume_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!a.server_log().contains("peer read opened"));
    // Serving or calling peers without TLS material is refused at startup.
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "serve",
            "--endpoint",
            "unix:///tmp/strata-never.sock",
            "--node-id",
            "x",
        ])
        .args([
            "--pool",
            "/tmp/strata-never-pool",
            "--peer-listen",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--peer-tls-dir"));
    assert!(!Path::new("/tmp/strata-never-pool").exists());
}

async fn modify(env: &mut TestEnv, id: &str, pairs: &[(&str, &str)]) -> Result<(), tonic::Status> {
    env.csi
        .controller
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: id.into(),
            mutable_parameters: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// The volume's record on its node's pool, as JSON.
fn record(env: &TestEnv, id: &str) -> serde_json::Value {
    let text = fs::read_to_string(env.pool().join("volumes").join(id).join("volume.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_io_limits_sent_to_another_node_is_applied_on_the_volumes_node() {
    let mut c = Cluster::start(2, &[]).await;
    let mut req = create_req("limited", 32 << 20, ext4());
    req.mutable_parameters = [("maxWriteIOPS".to_owned(), "100".to_owned())].into();
    let vol = create(&mut c.nodes[0], req).await.unwrap();
    let id = vol.volume_id;

    // A pod on node 0 publishes it (a cgroup laid out as the kubelet's cgroupfs driver).
    let blkio = Path::new("/sys/fs/cgroup/blkio");
    let pod_uid = format!("0e1d{:08x}-aaaa-4bbb-8ccc-{:012x}", std::process::id(), 7);
    let pod_dir = blkio.join(format!("kubepods/burstable/pod{pod_uid}"));
    let with_cgroups = blkio.join("blkio.throttle.write_iops_device").exists();
    let staging = c.nodes[0].path("stage");
    let target = c.nodes[0].path("target");
    // Removed at the end, also when the test fails (empty parents too).
    struct Made(Vec<PathBuf>);
    impl Drop for Made {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = fs::remove_dir(dir);
            }
        }
    }
    let _made = Made(
        pod_dir
            .ancestors()
            .take_while(|d| *d != blkio)
            .map(Path::to_path_buf)
            .collect(),
    );
    if with_cgroups {
        fs::create_dir_all(&pod_dir).unwrap();
        c.nodes[0].stage(&id, &staging, ext4()).await.unwrap();
        c.nodes[0]
            .csi
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(ext4()),
                volume_context: [("csi.storage.k8s.io/pod.uid".to_owned(), pod_uid.clone())].into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let rule =
        || fs::read_to_string(pod_dir.join("blkio.throttle.write_iops_device")).unwrap_or_default();

    // The resizer runs beside node 1: the call lands on node 0, and answers once applied.
    modify(
        &mut c.nodes[1],
        &id,
        &[
            ("maxWriteIOPS", "500"),
            ("csi.storage.k8s.io/pv/name", "pvc-0001"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(record(&c.nodes[0], &id)["io_limits"]["write_iops"], 500);
    if with_cgroups {
        assert!(rule().trim_end().ends_with(" 500"), "{}", rule());
    }
    // A bad value is refused on node 1 before anything is sent.
    let err = modify(&mut c.nodes[1], &id, &[("maxWriteIOPS", "lots")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(record(&c.nodes[0], &id)["io_limits"]["write_iops"], 500);

    // Node 0 down: UNAVAILABLE (the resizer retries); back, the retry lands.
    c.nodes[0].kill();
    let err = modify(&mut c.nodes[1], &id, &[("maxWriteIOPS", "600")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    c.nodes[0].restart(None).await;
    modify(&mut c.nodes[1], &id, &[("maxWriteIOPS", "600")])
        .await
        .unwrap();
    assert_eq!(record(&c.nodes[0], &id)["io_limits"]["write_iops"], 600);
    if with_cgroups {
        assert!(rule().trim_end().ends_with(" 600"), "{}", rule());
        unpublish_all(&mut c.nodes[0], &id, &staging, &target).await;
        assert_eq!(rule(), "");
    }
    // A volume no node holds: NOT_FOUND.
    let err = modify(
        &mut c.nodes[1],
        "vol-0123456789abcdef01234567",
        &[("maxWriteIOPS", "1")],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

/// The ranges a SnapshotMetadata call answers on `env`, three to a message: (offset, length)
/// tuples in order.
async fn metadata_ranges(
    env: &mut TestEnv,
    base: Option<&str>,
    target: &str,
) -> Result<Vec<(i64, i64)>, tonic::Status> {
    let pages = metadata_pages(&mut env.csi, base, target, 0, 3).await?;
    Ok(pages
        .iter()
        .flat_map(|p| &p.block_metadata)
        .map(|b| (b.byte_offset, b.size_bytes))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_metadata_asked_of_another_node_comes_from_the_holder() {
    let mut c = Cluster::start(2, &[]).await;
    let (id, staging, target) = published_with_data(&mut c.nodes[0], "cbt", 4).await;
    let s1 = c.nodes[0].snapshot("cbt-1", &id).await.unwrap().snapshot_id;
    fs::write(Path::new(&target).join("more"), vec![9u8; 3 << 20]).unwrap();
    assert!(
        Command::new("sync")
            .arg("-f")
            .arg(&target)
            .status()
            .unwrap()
            .success()
    );
    let s2 = c.nodes[0].snapshot("cbt-2", &id).await.unwrap().snapshot_id;

    // The backup tool's sidecar runs beside node 1: the same answer as node 0's own.
    for base in [None, Some(s1.as_str())] {
        let here = metadata_ranges(&mut c.nodes[0], base, &s2).await.unwrap();
        let there = metadata_ranges(&mut c.nodes[1], base, &s2).await.unwrap();
        assert!(!here.is_empty());
        assert_eq!(here, there, "base {base:?}");
    }
    // Base and target on different nodes: no changes are tracked between them.
    let other = c.nodes[1].create("other", 64 << 20, ext4()).await.volume_id;
    let s3 = c.nodes[1]
        .snapshot("cbt-3", &other)
        .await
        .unwrap()
        .snapshot_id;
    let err = metadata_ranges(&mut c.nodes[1], Some(&s1), &s3)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // No node holds it: NOT_FOUND.
    let err = metadata_ranges(&mut c.nodes[1], None, "snap-0123456789abcdef01234567")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The holder down: UNAVAILABLE (the sidecar's caller retries); back, the retry answers.
    c.nodes[0].kill();
    let err = metadata_ranges(&mut c.nodes[1], None, &s2)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    c.nodes[0].restart(None).await;
    assert!(
        !metadata_ranges(&mut c.nodes[1], None, &s2)
            .await
            .unwrap()
            .is_empty()
    );
    unpublish_all(&mut c.nodes[0], &id, &staging, &target).await;
}

/// Reads one SnapshotMetadata answer from `env` message by message: the ranges received
/// before the stream ended, and how it ended. `after_first` runs once the first message is in.
async fn metadata_until_broken(
    env: &mut TestEnv,
    base: Option<&str>,
    target: &str,
    starting_offset: i64,
    mut after_first: impl FnMut(),
) -> (Vec<(i64, i64)>, Result<(), tonic::Status>) {
    let mut ranges = vec![];
    let ended = each_metadata_page(&mut env.csi, base, target, starting_offset, 1, |page| {
        if ranges.is_empty() {
            after_first();
        }
        ranges.extend(
            page.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    })
    .await;
    (ranges, ended)
}

/// The holder of the snapshots is SIGKILLed in the middle of a forwarded stream: the client
/// has the ranges sent so far, then UNAVAILABLE (the forwarding node's own resumes find no
/// holder); once the holder is back, the client asks again from the end of the last range
/// and the two parts make exactly the whole answer, in order, with no overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_metadata_resumes_after_the_holder_dies_mid_stream() {
    let mut c = Cluster::start(2, &[]).await;
    let (id, staging, target) = published_with_data(&mut c.nodes[0], "cbt-kill", 4).await;
    let s1 = c.nodes[0]
        .snapshot("cbt-kill-1", &id)
        .await
        .unwrap()
        .snapshot_id;
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        fs::write(Path::new(&target).join(name), vec![i as u8 + 1; 1 << 20]).unwrap();
    }
    assert!(
        Command::new("sync")
            .arg("-f")
            .arg(&target)
            .status()
            .unwrap()
            .success()
    );
    let s2 = c.nodes[0]
        .snapshot("cbt-kill-2", &id)
        .await
        .unwrap()
        .snapshot_id;

    for base in [None, Some(s1.as_str())] {
        let whole = metadata_ranges(&mut c.nodes[0], base, &s2).await.unwrap();
        assert!(whole.len() >= 2, "several pages of one range: {whole:?}");
        // Each page the holder sends for another node is followed by half a second here.
        c.nodes[0]
            .restart(Some("delay:metadata:after-forwarded-page=500"))
            .await;
        let holder = c.nodes[0].pid().unwrap();
        let (first, ended) = metadata_until_broken(&mut c.nodes[1], base, &s2, 0, || {
            // SIGKILL, as a crash: the holder is sleeping after its first page.
            assert!(
                Command::new("kill")
                    .args(["-9", &holder.to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
        })
        .await;
        let err = ended.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(!first.is_empty() && first.len() < whole.len(), "{first:?}");
        c.nodes[0].kill();
        c.nodes[0].restart(None).await;

        let (last_start, last_size) = *first.last().unwrap();
        let (rest, ended) =
            metadata_until_broken(&mut c.nodes[1], base, &s2, last_start + last_size, || {}).await;
        ended.unwrap();
        let mut joined = first.clone();
        joined.extend(rest);
        assert!(
            joined.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "ordered, no overlap: {joined:?}"
        );
        assert_eq!(joined, whole, "base {base:?}");
    }
    unpublish_all(&mut c.nodes[0], &id, &staging, &target).await;
}

/// An encrypted volume's snapshot restored on another node: the wrapped key travels with the
/// data (over the peer service), the restore asks for the same Secret, and the copy opens
/// on its node with it and with nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_snapshot_restores_on_another_node_with_its_secret() {
    let key = "the Secret's encryptionKey, thirty-two bytes or more";
    let secrets =
        || std::collections::HashMap::from([("encryptionKey".to_owned(), key.to_owned())]);
    let encrypted = |mut req: csi::CreateVolumeRequest| {
        req.parameters = [("encrypted".to_owned(), "true".to_owned())].into();
        req.secrets = secrets();
        req
    };
    let stage = |id: &str, staging: &str, with: bool| csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(ext4()),
        secrets: if with { secrets() } else { Default::default() },
        ..Default::default()
    };
    let mut c = Cluster::start(2, &[]).await;
    let (a, b) = c.nodes.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let vol = create(a, encrypted(create_req("enc", 64 << 20, ext4())))
        .await
        .unwrap()
        .volume_id;
    let (staging, target) = (a.path("enc-staging"), a.path("enc-target"));
    a.csi
        .node
        .node_stage_volume(stage(&vol, &staging, true))
        .await
        .unwrap();
    a.publish(&vol, &staging, &target, ext4(), false)
        .await
        .unwrap();
    fs::write(Path::new(&target).join("f"), b"encrypted across nodes").unwrap();
    let snap = a.snapshot("enc-snap", &vol).await.unwrap().snapshot_id;

    // Without the Secret (or as an unencrypted volume) it is refused on node 1.
    let err = create(b, from_snapshot("plain", 64 << 20, &snap))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let restored = create(b, encrypted(from_snapshot("restored", 64 << 20, &snap)))
        .await
        .unwrap()
        .volume_id;
    let (bs, bt) = (b.path("restored-staging"), b.path("restored-target"));
    let err = b
        .csi
        .node
        .node_stage_volume(stage(&restored, &bs, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    b.csi
        .node
        .node_stage_volume(stage(&restored, &bs, true))
        .await
        .unwrap();
    b.publish(&restored, &bs, &bt, ext4(), false).await.unwrap();
    assert_eq!(
        fs::read(Path::new(&bt).join("f")).unwrap(),
        b"encrypted across nodes"
    );
    unpublish_all(b, &restored, &bs, &bt).await;
    unpublish_all(a, &vol, &staging, &target).await;
}

/// The peer Secret the Helm chart makes at install, written out as the kubelet would mount it.
fn helm_peer_certs(dir: &Path) -> PathBuf {
    let text = helm::render(&["--show-only", "templates/peer-tls.yaml"]);
    let tls = dir.join("helm-tls");
    fs::create_dir(&tls).unwrap();
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        fs::write(tls.join(file), helm::data(&text, file)).unwrap();
    }
    tls
}

/// The certificates the Helm chart generates at install (sprig's genCA and genSignedCert,
/// RSA) are what two Strata need to talk: a snapshot restores across nodes with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_charts_generated_certificates_carry_a_restore_across_nodes() {
    let mut c = Cluster::start_with_certs(2, &[], helm_peer_certs).await;
    let (a, b) = c.nodes.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let (vol, staging, target) = published_with_data(a, "helm-src", 2).await;
    let snap = a.snapshot("helm-snap", &vol).await.unwrap();
    let restored = create(
        b,
        from_snapshot("helm-restored", 256 << 20, &snap.snapshot_id),
    )
    .await
    .unwrap();
    assert!(same_bytes(
        &image(a, "snapshots", &snap.snapshot_id),
        &image(b, "volumes", &restored.volume_id)
    ));
    unpublish_all(a, &vol, &staging, &target).await;
}

/// Paths, kinds, modes, owners, sizes and contents (or targets) under `root`, in order.
fn tree_listing(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel == "lost+found" {
                continue;
            }
            let m = fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                stack.push(path.clone());
                "dir".into()
            } else {
                let data = fs::read(&path).unwrap();
                format!("{} bytes {:08x}", data.len(), crc32fast::hash(&data))
            };
            out.push(format!(
                "{rel} {what} {:o} {}:{}",
                m.mode(),
                m.uid(),
                m.gid()
            ));
        }
    }
    out.sort();
    out
}

/// What a workload leaves in a directory volume: nested folders, a sparse file, owners,
/// a symlink out of the volume.
fn write_tree(root: &Path) {
    use std::os::unix::fs::FileExt;
    fs::create_dir_all(root.join("db/wal")).unwrap();
    let sparse = fs::File::create(root.join("db/table")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    let data: Vec<u8> = (0u64..3 << 20).map(|i| (i * 7919 % 251) as u8).collect();
    sparse.write_all_at(&data, 40 << 20).unwrap();
    fs::write(root.join("db/wal/0001"), b"begin;commit;").unwrap();
    std::os::unix::fs::chown(root.join("db/wal/0001"), Some(999), Some(999)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("db/escape")).unwrap();
    let sync = Command::new("sync").arg("-f").arg(root).status().unwrap();
    assert!(sync.success());
}

fn mount_any() -> csi::VolumeCapability {
    mount_cap(
        "",
        csi::volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

async fn directory_volumes_restore_and_clone_across_nodes(fs_type: &str, backend: &str) {
    let mut c = Cluster::start_on_fs(&[(fs_type, backend), (fs_type, backend)]).await;
    let (a, b) = c.nodes.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let vol = a.create("src", 256 << 20, mount_any()).await.volume_id;
    let (staging, target) = (a.path("src-staging"), a.path("src-target"));
    fs::create_dir_all(&staging).unwrap();
    a.stage(&vol, &staging, mount_any()).await.unwrap();
    a.publish(&vol, &staging, &target, mount_any(), false)
        .await
        .unwrap();
    write_tree(Path::new(&target));
    let snap = a.snapshot("snap", &vol).await.unwrap();

    // A restore on node 1 of node 0's snapshot, and a clone of the volume node 0 has
    // mounted: the same tree, holes kept, the symlink made as it is.
    let mut req = from_snapshot("restored", 256 << 20, &snap.snapshot_id);
    req.volume_capabilities = vec![mount_any()];
    let restored = create(b, req).await.unwrap();
    let mut req = from_volume("clone", 256 << 20, &vol);
    req.volume_capabilities = vec![mount_any()];
    let clone = create(b, req).await.unwrap();
    let expected = tree_listing(Path::new(&target));
    assert!(expected.len() >= 5, "{expected:?}");
    for (name, id) in [("r", &restored.volume_id), ("c", &clone.volume_id)] {
        let (s, t) = (
            b.path(&format!("{name}-staging")),
            b.path(&format!("{name}-target")),
        );
        fs::create_dir_all(&s).unwrap();
        b.stage(id, &s, mount_any()).await.unwrap();
        b.publish(id, &s, &t, mount_any(), false).await.unwrap();
        assert_eq!(tree_listing(Path::new(&t)), expected, "{backend}: {name}");
        let table = fs::metadata(Path::new(&t).join("db/table")).unwrap();
        assert!(
            table.blocks() * 512 < 8 << 20,
            "sparse: {} blocks",
            table.blocks()
        );
        unpublish_all(b, id, &s, &t).await;
    }
    let log = b.server_log();
    assert!(log.contains("copied from another node"), "{log}");
    no_creation_left(a);
    no_creation_left(b);
    // Both copies delete; the source and its snapshot are untouched and delete too.
    b.delete(&restored.volume_id).await.unwrap();
    b.delete(&clone.volume_id).await.unwrap();
    unpublish_all(a, &vol, &staging, &target).await;
    a.delete_snapshot(&snap.snapshot_id).await.unwrap();
    a.delete(&vol).await.unwrap();
    drop(c.net);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_volumes_restore_and_clone_across_nodes() {
    directory_volumes_restore_and_clone_across_nodes("ext4", "dir").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_volumes_restore_and_clone_across_nodes() {
    directory_volumes_restore_and_clone_across_nodes("btrfs", "btrfs").await;
}

/// A volume on `env` holding the tree [`write_tree`] makes (published for the writing, then
/// not in use); returns its id and the tree's listing.
async fn volume_with_tree(env: &mut TestEnv, name: &str) -> (String, Vec<String>) {
    let vol = env.create(name, 256 << 20, mount_any()).await.volume_id;
    let (staging, target) = (
        env.path(&format!("{name}-staging")),
        env.path(&format!("{name}-target")),
    );
    fs::create_dir_all(&staging).unwrap();
    env.stage(&vol, &staging, mount_any()).await.unwrap();
    env.publish(&vol, &staging, &target, mount_any(), false)
        .await
        .unwrap();
    write_tree(Path::new(&target));
    let listing = tree_listing(Path::new(&target));
    unpublish_all(env, &vol, &staging, &target).await;
    (vol, listing)
}

/// The btrfs subvolumes under `env`'s pool, by path.
fn subvolumes(env: &TestEnv) -> Vec<String> {
    let out = Command::new("btrfs")
        .args(["subvolume", "list", "-o"])
        .arg(env.pool())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(" path ").nth(1).map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_copies_killed_on_either_side_leave_no_subvolume_behind() {
    let mut c = Cluster::start_on_fs(&[("btrfs", "btrfs"), ("btrfs", "btrfs")]).await;
    let (vol, expected) = volume_with_tree(&mut c.nodes[0], "src").await;
    let before = subvolumes(&c.nodes[0]);
    // Node 1 dies after the first chunk of the tree it applies.
    c.nodes[1].restart(Some("copy:after-chunk")).await;
    let mut req = from_volume("clone", 256 << 20, &vol);
    req.volume_capabilities = vec![mount_any()];
    assert!(create(&mut c.nodes[1], req.clone()).await.is_err());
    c.nodes[1].wait_for_exit();
    c.nodes[1].restart(None).await;
    // Its half-made subvolume is gone; the provisioner's retry makes the whole tree.
    assert!(volume_names(&mut c.nodes[1]).await.is_empty());
    assert_eq!(subvolumes(&c.nodes[1]), Vec::<String>::new());
    no_creation_left(&c.nodes[1]);
    let clone = create(&mut c.nodes[1], req).await.unwrap();
    let (s, t) = (c.nodes[1].path("c-staging"), c.nodes[1].path("c-target"));
    fs::create_dir_all(&s).unwrap();
    let b = &mut c.nodes[1];
    b.stage(&clone.volume_id, &s, mount_any()).await.unwrap();
    b.publish(&clone.volume_id, &s, &t, mount_any(), false)
        .await
        .unwrap();
    assert_eq!(tree_listing(Path::new(&t)), expected);
    unpublish_all(b, &clone.volume_id, &s, &t).await;
    // Node 0 still holds the copy it made for the dead reader's read (a snapshot
    // subvolume) until that read idles out; killed now, its restart removes it.
    assert!(
        subvolumes(&c.nodes[0]).len() > before.len(),
        "{:?}",
        subvolumes(&c.nodes[0])
    );
    c.nodes[0].kill();
    c.nodes[0].restart(None).await;
    assert_eq!(subvolumes(&c.nodes[0]), before);
    no_creation_left(&c.nodes[0]);
    drop(c.net);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dir_snapshot_restores_as_a_btrfs_volume_and_never_as_an_image() {
    let mut c =
        Cluster::start_on_fs(&[("ext4", "dir"), ("btrfs", "btrfs"), ("ext4", "image")]).await;
    let (vol, expected) = volume_with_tree(&mut c.nodes[0], "src").await;
    let snap = c.nodes[0].snapshot("snap", &vol).await.unwrap();
    let mut req = from_snapshot("restored", 256 << 20, &snap.snapshot_id);
    req.volume_capabilities = vec![mount_any()];
    let restored = create(&mut c.nodes[1], req).await.unwrap();
    let b = &mut c.nodes[1];
    let (s, t) = (b.path("r-staging"), b.path("r-target"));
    fs::create_dir_all(&s).unwrap();
    b.stage(&restored.volume_id, &s, mount_any()).await.unwrap();
    b.publish(&restored.volume_id, &s, &t, mount_any(), false)
        .await
        .unwrap();
    assert_eq!(tree_listing(Path::new(&t)), expected);
    unpublish_all(b, &restored.volume_id, &s, &t).await;
    // The image node refuses at once, naming both backends; nothing is made there.
    let err = create(
        &mut c.nodes[2],
        from_snapshot("as-image", 256 << 20, &snap.snapshot_id),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("dir backend"), "{err:?}");
    assert!(volume_names(&mut c.nodes[2]).await.is_empty());
    no_creation_left(&c.nodes[2]);
    no_creation_left(&c.nodes[0]);
    drop(c.net);
}

/// A gRPC client of the peer service at `address`, presenting the certificates in `dir`.
async fn peer_client(
    address: &str,
    dir: &Path,
) -> strata_peer_proto::peer_client::PeerClient<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let (ca, cert, key) = tls_files(dir);
    let tls = ClientTlsConfig::new()
        .domain_name("strata-peer")
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    strata_peer_proto::peer_client::PeerClient::new(channel)
}

/// A bulk read as a node makes it, with the certificates in `dir`: the chunks' bytes
/// by offset, or what stopped it.
fn bulk_read(
    dir: &Path,
    address: &str,
    read_id: &str,
    from: u64,
) -> Result<(Vec<(u64, usize)>, strata_core::peer::ReadEnd), String> {
    let tls = strata::peer::tls::PeerTls::load(dir).unwrap();
    let config = tls.rustls_client(&[strata::peer::bulk::ALPN]).unwrap();
    let request = strata::peer::bulk::Request {
        read_id: read_id.into(),
        from,
    };
    let mut chunks = vec![];
    let read = strata::peer::bulk::read(
        &config,
        "node-a",
        address,
        &request,
        Duration::from_secs(5),
        Duration::from_secs(3),
        &mut |c| {
            assert_eq!(crc32fast::hash(c.bytes), c.crc32);
            chunks.push((c.offset, c.bytes.len()));
            Ok(())
        },
    );
    match read {
        Ok(end) => Ok((chunks, end)),
        Err(strata::peer::bulk::Failed::NotConnected(why)) => Err(format!("not connected: {why}")),
        Err(strata::peer::bulk::Failed::Read(e)) => Err(format!("read: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_reads_take_the_same_handshake_refuse_bad_requests_and_match_read_extents() {
    let certs = tempfile::tempdir().unwrap();
    let (ours, theirs) = (peer_certs(certs.path()), peer_certs(certs.path()));
    let (mut a, address) = listening_node(&ours).await;
    let (vol, staging, target) = published_with_data(&mut a, "src", 2).await;
    let snap = a.snapshot("snap", &vol).await.unwrap();
    unpublish_all(&mut a, &vol, &staging, &target).await;
    let mut client = peer_client(&address, &ours).await;
    let opened = client
        .open_read(strata_peer_proto::OpenReadRequest {
            kind: strata_peer_proto::SourceKind::Snapshot as i32,
            id: snap.snapshot_id.clone(),
            reader_node: "node-b".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // A certificate of another CA is refused in the handshake, as for gRPC.
    let other = tokio::task::spawn_blocking({
        let (theirs, address, id) = (theirs.clone(), address.clone(), opened.read_id.clone());
        move || bulk_read(&theirs, &address, &id, 0)
    })
    .await
    .unwrap();
    assert!(other.unwrap_err().starts_with("not connected"));
    // Bytes that are not a request, from a caller with a good certificate: the connection
    // is closed, nothing is sent, and the listener goes on.
    let garbage = tokio::task::spawn_blocking({
        let (ours, address) = (ours.clone(), address.clone());
        move || {
            use std::io::{Read, Write};
            let tls = strata::peer::tls::PeerTls::load(&ours).unwrap();
            let config = tls.rustls_client(&[strata::peer::bulk::ALPN]).unwrap();
            let name = rustls::pki_types::ServerName::try_from("strata-peer").unwrap();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            let tcp = std::net::TcpStream::connect(&address).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(b"GET / HTTP/1.1\r\n\r\n\xff\xff\xff\xff")
                .unwrap();
            s.flush().unwrap();
            let mut got = vec![];
            let _ = s.read_to_end(&mut got);
            got
        }
    })
    .await
    .unwrap();
    assert!(garbage.is_empty(), "{} bytes answered", garbage.len());
    // An unknown read is NOT_FOUND, as from ReadExtents.
    let unknown = tokio::task::spawn_blocking({
        let (ours, address) = (ours.clone(), address.clone());
        move || bulk_read(&ours, &address, "read-000000000000000000000000", 0)
    })
    .await
    .unwrap();
    let err = unknown.unwrap_err();
    assert!(err.contains("is not open on node node-a"), "{err}");

    // The read itself: the allocated bytes once, and what ReadExtents sends the same.
    let (chunks, end) = tokio::task::spawn_blocking({
        let (ours, address, id) = (ours.clone(), address.clone(), opened.read_id.clone());
        move || bulk_read(&ours, &address, &id, 0)
    })
    .await
    .unwrap()
    .unwrap();
    let total: usize = chunks.iter().map(|c| c.1).sum();
    assert_eq!(
        (total as u64, chunks.len() as u64),
        (end.data_bytes, end.chunks)
    );
    // The snapshot's data (its 2 MiB file and the filesystem's own), no more than it takes.
    assert!(end.data_bytes >= 2 << 20 && end.data_bytes <= opened.allocated_bytes);
    let mut stream = client
        .read_extents(strata_peer_proto::ReadExtentsRequest {
            read_id: opened.read_id.clone(),
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut grpc = vec![];
    while let Some(m) = stream.message().await.unwrap() {
        match m.kind.unwrap() {
            strata_peer_proto::extent_chunk::Kind::Data(d) => grpc.push((d.offset, d.bytes.len())),
            strata_peer_proto::extent_chunk::Kind::End(e) => {
                assert_eq!(e.data_bytes, end.data_bytes);
                break;
            }
        }
    }
    assert_eq!(grpc, chunks);
    // Resumed from the middle: only the rest.
    let middle = chunks[chunks.len() / 2].0;
    let (rest, _) = tokio::task::spawn_blocking({
        let (ours, address, id) = (ours.clone(), address.clone(), opened.read_id.clone());
        move || bulk_read(&ours, &address, &id, middle)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(rest[..], chunks[chunks.len() / 2..]);
    let log = a.server_log();
    assert!(log.contains("peer stream sent"), "{log}");
}
