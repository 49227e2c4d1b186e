//! Cross-node copies between drivers in one process: the peers are other drivers' exports,
//! reached through a [`Peers`] that can lose nodes, corrupt chunks and break streams.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::controller::CreateVolume;
use crate::fault::FaultPoints;
use crate::model::{AccessMode, CapacityRange, MIB, VolumeRecord};
use crate::testing::{Fixture, data_ranges, mount, mount_fs, node_fixture, node_fixture_of};

/// Other nodes, in this process.
#[derive(Default)]
pub(crate) struct LocalPeers {
    nodes: Mutex<HashMap<String, Arc<Exports>>>,
    down: Mutex<HashSet<String>>,
    lookups: Mutex<Vec<String>>,
    /// Chunks to corrupt in transit, from the next one on.
    corrupt: AtomicU32,
    /// Streams to break after this many chunks (0: none).
    break_after: AtomicU64,
    breaks: AtomicU32,
    /// Where the cluster records sources (ids without hints).
    cluster: Option<Arc<cluster::FakeCluster>>,
}

impl LocalPeers {
    pub(crate) fn add(&self, node: &str, exports: Arc<Exports>) {
        self.nodes.lock().unwrap().insert(node.into(), exports);
    }

    fn reach(&self, node: &str) -> Result<Arc<Exports>> {
        if self.down.lock().unwrap().contains(node) {
            return Err(Error::Unavailable(format!("node {node} does not answer")));
        }
        self.nodes
            .lock()
            .unwrap()
            .get(node)
            .cloned()
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))
    }
}

impl Peers for LocalPeers {
    fn nodes(&self) -> Result<Vec<String>> {
        let mut nodes: Vec<String> = self.nodes.lock().unwrap().keys().cloned().collect();
        nodes.sort();
        Ok(nodes)
    }

    fn holder(&self, source: &ContentSource) -> Result<Option<String>> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        match source {
            ContentSource::Volume(id) => cluster.volume_node(id),
            ContentSource::Snapshot(id) => cluster.snapshot_node(id),
        }
    }

    fn cluster_nodes(&self) -> Result<Option<Vec<String>>> {
        match &self.cluster {
            Some(cluster) => cluster.node_names(),
            None => Ok(None),
        }
    }

    fn lookup(&self, node: &str, source: &ContentSource) -> Result<Option<SourceInfo>> {
        self.lookups.lock().unwrap().push(node.into());
        self.reach(node)?.lookup(source)
    }

    fn open_read(&self, node: &str, source: &ContentSource) -> Result<RemoteRead> {
        let opened = self.reach(node)?.open(source, "reader")?;
        Ok(RemoteRead {
            read_id: opened.read_id,
            source: opened.source,
            allocated_bytes: opened.allocated_bytes,
        })
    }

    fn read(
        &self,
        node: &str,
        read_id: &str,
        from: u64,
        sink: &mut dyn FnMut(Chunk<'_>) -> Result<()>,
    ) -> Result<ReadEnd> {
        let exports = self.reach(node)?;
        let mut failed = None;
        let mut sent = 0;
        let break_after = self.break_after.load(Ordering::SeqCst);
        let end = exports.read(read_id, from, &mut |chunk| {
            if break_after > 0 && sent == break_after {
                self.break_after.store(0, Ordering::SeqCst);
                self.breaks.fetch_add(1, Ordering::SeqCst);
                failed = Some(Error::Unavailable("the connection broke".into()));
                return false;
            }
            sent += 1;
            let mut bytes = chunk.bytes.to_vec();
            if self
                .corrupt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                bytes[0] ^= 1;
            }
            let forwarded = sink(Chunk {
                bytes: &bytes,
                ..chunk
            });
            match forwarded {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        });
        match (failed, end) {
            (Some(e), _) => Err(e),
            (None, end) => end,
        }
    }

    fn release(&self, node: &str, read_id: &str) -> Result<()> {
        self.reach(node)?.release(read_id);
        Ok(())
    }

    fn modify_volume(
        &self,
        node: &str,
        volume_id: &str,
        parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        self.reach(node)?.modify_volume(volume_id, parameters)
    }

    fn move_out(
        &self,
        node: &str,
        step: MoveStep,
        volume_id: &str,
        move_id: &str,
    ) -> Result<MoveOut> {
        self.reach(node)?
            .move_out(step, volume_id, move_id, "node-b")
    }

    fn snapshot_ranges(
        &self,
        node: &str,
        query: &crate::block_ranges::RangeQuery,
        sink: &mut crate::block_ranges::PageSink<'_>,
    ) -> Result<()> {
        let exports = self.reach(node)?;
        let break_after = self.break_after.load(Ordering::SeqCst);
        let mut sent = 0;
        let mut broke = false;
        exports.snapshot_ranges(query, &mut |page| {
            if break_after > 0 && sent == break_after {
                self.break_after.store(0, Ordering::SeqCst);
                self.breaks.fetch_add(1, Ordering::SeqCst);
                broke = true;
                return false;
            }
            sent += 1;
            sink(page)
        })?;
        if broke {
            return Err(Error::Unavailable("the connection broke".into()));
        }
        Ok(())
    }
}

pub(crate) struct Pair {
    pub(crate) peers: Arc<LocalPeers>,
    pub(crate) a: Fixture,
    pub(crate) b: Fixture,
}

pub(crate) fn cluster() -> Pair {
    let peers = Arc::new(LocalPeers::default());
    let a = node_fixture("node-a", FaultPoints::default(), Some(peers.clone()));
    let b = node_fixture("node-b", FaultPoints::default(), Some(peers.clone()));
    peers.add("node-a", a.driver.exports.clone());
    peers.add("node-b", b.driver.exports.clone());
    Pair { peers, a, b }
}

pub(crate) fn create(
    f: &Fixture,
    name: &str,
    bytes: u64,
    source: Option<ContentSource>,
) -> Result<VolumeRecord> {
    f.driver.controller.create_volume(CreateVolume {
        name: name.into(),
        capacity: CapacityRange {
            required: bytes,
            limit: 0,
        },
        capabilities: vec![mount(AccessMode::SingleNodeWriter)],
        content_source: source,
        ..Default::default()
    })
}

pub(crate) fn image(f: &Fixture, id: &str) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(f.driver.volumes.dir(id).join("image"))
        .unwrap()
}

pub(crate) fn contents(file: &File) -> Vec<u8> {
    let mut all = vec![0u8; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut all, 0).unwrap();
    all
}

/// A 64 MiB volume on A with 3 MiB of data at scattered offsets.
pub(crate) fn volume_with_data(c: &Pair) -> VolumeRecord {
    let vol = create(&c.a, "src", 64 * MIB, None).unwrap();
    write_scattered(&image(&c.a, &vol.id));
    vol
}

/// 3 MiB of data at scattered offsets of a 64 MiB image.
pub(crate) fn write_scattered(img: &File) {
    for (i, at) in [0u64, 7, 31, 63].into_iter().enumerate() {
        let len = if i == 1 { 3 * MIB / 2 } else { MIB / 2 };
        img.write_all_at(&vec![i as u8 + 1; len as usize], at * MIB)
            .unwrap();
    }
    img.sync_all().unwrap();
}

fn no_staging_left(f: &Fixture) {
    let volumes = f.driver.volumes.dir("x").parent().unwrap().to_owned();
    let left: Vec<_> = std::fs::read_dir(volumes)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_snapshot_on_one_node_restores_on_another_byte_identical_and_sparse() {
    let c = cluster();
    let vol = volume_with_data(&c);
    let snap = c.a.driver.snapshots.create_snapshot("s", &vol.id).unwrap();
    let restored = create(
        &c.b,
        "restored",
        64 * MIB,
        Some(ContentSource::Snapshot(snap.id.clone())),
    )
    .unwrap();
    assert_eq!(
        restored.content_source,
        Some(ContentSource::Snapshot(snap.id.clone()))
    );
    assert_eq!(restored.format, snap.format);
    assert!(
        restored
            .id
            .ends_with(crate::ids::NodeHint::of("node-b").as_str())
    );
    let (src, dst) = (image(&c.a, &vol.id), image(&c.b, &restored.id));
    assert_eq!(contents(&src), contents(&dst));
    // Only allocated extents travel: the copy holds data where the source does, and only
    // there (compared as data ranges: st_blocks also counts the filesystem's own extent
    // blocks, which differ with how the writes were laid out).
    assert_eq!(data_ranges(&dst), data_ranges(&src));
    let figures = c.b.driver.remote.as_ref().unwrap().figures();
    assert_eq!(figures.bytes_pulled.load(Ordering::SeqCst), 3 * MIB);
    assert_eq!(figures.copies_done.load(Ordering::SeqCst), 1);
    assert_eq!(figures.copies_in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(c.a.driver.exports.open_reads(), 0, "the read was released");
    // The hint named node A: no other node was asked.
    assert_eq!(*c.peers.lookups.lock().unwrap(), vec!["node-a".to_owned()]);
    // A retried CreateVolume answers the same volume without copying again.
    let again = create(
        &c.b,
        "restored",
        64 * MIB,
        Some(ContentSource::Snapshot(snap.id)),
    )
    .unwrap();
    assert_eq!(again.id, restored.id);
    assert_eq!(figures.copies_done.load(Ordering::SeqCst), 1);
}

#[test]
fn a_volume_on_one_node_clones_on_another_and_leaves_nothing_behind() {
    let c = cluster();
    let vol = volume_with_data(&c);
    let clone = create(
        &c.b,
        "clone",
        64 * MIB,
        Some(ContentSource::Volume(vol.id.clone())),
    )
    .unwrap();
    assert_eq!(
        contents(&image(&c.a, &vol.id)),
        contents(&image(&c.b, &clone.id))
    );
    assert_eq!(c.a.driver.exports.open_reads(), 0);
    let scratch = c.a._pool.path().join(exports::READS_DIR);
    assert_eq!(
        std::fs::read_dir(scratch).unwrap().count(),
        0,
        "the instant copy is gone"
    );
    // A clone larger than its source keeps the source's bytes and holes after them.
    let bigger = create(
        &c.b,
        "bigger",
        96 * MIB,
        Some(ContentSource::Volume(vol.id.clone())),
    )
    .unwrap();
    assert_eq!(bigger.capacity_bytes, 96 * MIB);
    assert!(bigger.resize_pending || bigger.format == crate::model::FormatState::Unformatted);
    let grown = contents(&image(&c.b, &bigger.id));
    assert_eq!(
        &grown[..(64 * MIB) as usize],
        &contents(&image(&c.a, &vol.id))[..]
    );
    assert!(grown[(64 * MIB) as usize..].iter().all(|b| *b == 0));
}

#[test]
fn sources_held_nowhere_are_not_found_and_unreachable_holders_are_unavailable() {
    let c = cluster();
    let vol = volume_with_data(&c);
    let snap = c.a.driver.snapshots.create_snapshot("s", &vol.id).unwrap();
    c.peers.down.lock().unwrap().insert("node-a".into());
    let err = create(
        &c.b,
        "r",
        64 * MIB,
        Some(ContentSource::Snapshot(snap.id.clone())),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(ref m) if m.contains("cannot be reached")),
        "{err}"
    );
    no_staging_left(&c.b);
    // A is back: the provisioner's retry succeeds.
    c.peers.down.lock().unwrap().clear();
    create(
        &c.b,
        "r",
        64 * MIB,
        Some(ContentSource::Snapshot(snap.id.clone())),
    )
    .unwrap();
    // Gone everywhere: NOT_FOUND, final.
    c.a.driver.snapshots.delete_snapshot(&snap.id).unwrap();
    let err = create(&c.b, "r2", 64 * MIB, Some(ContentSource::Snapshot(snap.id))).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    // An id B made itself is never looked for elsewhere.
    c.peers.lookups.lock().unwrap().clear();
    let own = crate::ids::new_snapshot_id(&crate::ids::NodeHint::of("node-b"));
    let err = create(&c.b, "r3", 64 * MIB, Some(ContentSource::Snapshot(own))).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(c.peers.lookups.lock().unwrap().is_empty());
    // An id without a hint (made before hints) is asked of every other node.
    let err = create(
        &c.b,
        "r4",
        64 * MIB,
        Some(ContentSource::Volume("vol-0123456789abcdef01234567".into())),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(*c.peers.lookups.lock().unwrap(), vec!["node-a".to_owned()]);
}

#[test]
fn a_corrupted_chunk_is_fetched_again_and_a_corrupting_link_fails_the_create() {
    let c = cluster();
    let vol = volume_with_data(&c);
    c.peers.corrupt.store(1, Ordering::SeqCst);
    let ok = create(
        &c.b,
        "once",
        64 * MIB,
        Some(ContentSource::Volume(vol.id.clone())),
    )
    .unwrap();
    assert_eq!(
        contents(&image(&c.a, &vol.id)),
        contents(&image(&c.b, &ok.id))
    );
    c.peers.corrupt.store(u32::MAX, Ordering::SeqCst);
    let err = create(
        &c.b,
        "always",
        64 * MIB,
        Some(ContentSource::Volume(vol.id.clone())),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(ref m) if m.contains("checksum")),
        "{err}"
    );
    assert!(
        c.b.driver
            .controller
            .list_volumes(0, "")
            .unwrap()
            .0
            .iter()
            .all(|v| v.record.name != "always")
    );
    no_staging_left(&c.b);
    assert_eq!(c.a.driver.exports.open_reads(), 0);
}

#[test]
fn a_broken_stream_resumes_where_it_stopped() {
    let c = cluster();
    let vol = volume_with_data(&c);
    c.peers.break_after.store(2, Ordering::SeqCst);
    let copy = create(
        &c.b,
        "resumed",
        64 * MIB,
        Some(ContentSource::Volume(vol.id.clone())),
    )
    .unwrap();
    assert_eq!(c.peers.breaks.load(Ordering::SeqCst), 1);
    assert_eq!(
        contents(&image(&c.a, &vol.id)),
        contents(&image(&c.b, &copy.id))
    );
    // Nothing was sent twice.
    let figures = c.b.driver.remote.as_ref().unwrap().figures();
    assert_eq!(figures.bytes_pulled.load(Ordering::SeqCst), 3 * MIB);
}

#[test]
fn reads_are_bounded_per_peer_and_expire_when_idle() {
    let c = cluster();
    let vol = volume_with_data(&c);
    let snap = c.a.driver.snapshots.create_snapshot("s", &vol.id).unwrap();
    let exports = &c.a.driver.exports;
    let source = ContentSource::Snapshot(snap.id.clone());
    let limit = exports.limits().max_reads_per_peer;
    let reads: Vec<_> = (0..limit)
        .map(|_| exports.open(&source, "node-b").unwrap())
        .collect();
    let err = exports.open(&source, "node-b").unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    // Another node still gets its reads.
    let other = exports.open(&source, "node-c").unwrap();
    for r in &reads {
        exports.release(&r.read_id);
    }
    exports.release(&r_id(&other));
    assert_eq!(exports.open_reads(), 0);
    // A read held open keeps the snapshot's data even after DeleteSnapshot.
    let held = exports.open(&source, "node-b").unwrap();
    c.a.driver.snapshots.delete_snapshot(&snap.id).unwrap();
    let mut bytes = 0;
    let end = exports
        .read(&held.read_id, 0, &mut |chunk| {
            bytes += chunk.bytes.len() as u64;
            true
        })
        .unwrap();
    assert_eq!((bytes, end.data_bytes), (3 * MIB, 3 * MIB));
    // Unknown reads are NOT_FOUND; releasing twice is fine.
    exports.release(&held.read_id);
    exports.release(&held.read_id);
    let err = exports.read(&held.read_id, 0, &mut |_| true).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

fn r_id(r: &OpenedRead) -> String {
    r.read_id.clone()
}

#[test]
fn reads_idle_past_the_limit_are_closed() {
    let pool = tempfile::tempdir().unwrap();
    let f = node_fixture("node-a", FaultPoints::default(), None);
    let vol = create(&f, "v", 16 * MIB, None).unwrap();
    let exports = Exports::new(
        "node-a".into(),
        pool.path(),
        ExportSources {
            volumes: f.driver.volumes.clone(),
            snapshots: f.driver.snapshots.clone(),
            freezer: f.driver.freezer.clone(),
            backend: f.driver.backend.clone(),
            io_limits: f.driver.io_limits.clone(),
            snapshot_metadata: f.driver.snapshot_metadata.clone(),
            departures: f.driver.departures.clone(),
        },
        ExportLimits {
            idle: std::time::Duration::ZERO,
            ..ExportLimits::default()
        },
    )
    .unwrap();
    let read = exports
        .open(&ContentSource::Volume(vol.id), "node-b")
        .unwrap();
    exports.expire();
    assert_eq!(exports.open_reads(), 0);
    assert!(matches!(
        exports.read(&read.read_id, 0, &mut |_| true),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn the_filesystem_state_travels_and_unknown_states_are_refused() {
    use crate::model::FormatState;
    for f in [
        FormatState::Unformatted,
        FormatState::Formatting("xfs".into()),
        FormatState::Formatted("ext4".into()),
    ] {
        assert_eq!(format_from_wire(&format_to_wire(&f)).unwrap(), f);
    }
    for bad in [
        "",
        "formatted:",
        "formatted:../x",
        "formatted:EXT4",
        "other:ext4",
        "unformatted:x",
    ] {
        assert!(format_from_wire(bad).is_err(), "{bad}");
    }
}

#[test]
fn ids_without_a_hint_are_looked_up_in_the_cluster_first() {
    let fake = Arc::new(cluster::FakeCluster::default());
    let peers = Arc::new(LocalPeers {
        cluster: Some(fake.clone()),
        ..LocalPeers::default()
    });
    let nodes: Vec<Fixture> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .map(|n| node_fixture(n, FaultPoints::default(), Some(peers.clone())))
        .collect();
    for (n, f) in ["node-a", "node-b", "node-c"].into_iter().zip(&nodes) {
        peers.add(n, f.driver.exports.clone());
    }
    let old = "vol-0123456789abcdef01234567";
    let source = Some(ContentSource::Volume(old.into()));
    // The PV says node C: only C is asked.
    fake.volumes
        .lock()
        .unwrap()
        .insert(old.into(), "node-c".into());
    let err = create(&nodes[1], "x", 16 * MIB, source.clone()).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(*peers.lookups.lock().unwrap(), vec!["node-c".to_owned()]);
    // Nothing records it: every other node is asked.
    peers.lookups.lock().unwrap().clear();
    fake.volumes.lock().unwrap().clear();
    create(&nodes[1], "x", 16 * MIB, source.clone()).unwrap_err();
    assert_eq!(
        *peers.lookups.lock().unwrap(),
        vec!["node-a".to_owned(), "node-c".to_owned()]
    );
    // The node it records has no peer endpoint: UNAVAILABLE (it may come back).
    fake.volumes
        .lock()
        .unwrap()
        .insert(old.into(), "node-gone".into());
    let err = create(&nodes[1], "x", 16 * MIB, source.clone()).unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(ref m) if m.contains("node-gone")),
        "{err}"
    );
    // The API server does not answer: UNAVAILABLE, retried.
    *fake.failing.lock().unwrap() =
        Some(Error::Unavailable("the API server does not answer".into()));
    let err = create(&nodes[1], "x", 16 * MIB, source).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    // Ids with a hint never need the cluster.
    *fake.failing.lock().unwrap() = None;
    let reads = fake.reads.load(Ordering::SeqCst);
    let vol = create(&nodes[0], "src", 16 * MIB, None).unwrap();
    create(
        &nodes[1],
        "clone",
        16 * MIB,
        Some(ContentSource::Volume(vol.id)),
    )
    .unwrap();
    assert_eq!(fake.reads.load(Ordering::SeqCst), reads);
}

#[test]
fn without_the_peer_service_a_source_made_elsewhere_is_unavailable_not_gone() {
    let alone = node_fixture("node-b", FaultPoints::default(), None);
    let elsewhere = crate::ids::new_snapshot_id(&crate::ids::NodeHint::of("node-a"));
    let err = create(
        &alone,
        "r",
        16 * MIB,
        Some(ContentSource::Snapshot(elsewhere)),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(ref m) if m.contains("peer service")),
        "{err}"
    );
    // Its own ids, and ids without a hint, stay NOT_FOUND (final).
    let own = crate::ids::new_snapshot_id(&crate::ids::NodeHint::of("node-b"));
    for id in [own, "snap-0123456789abcdef01234567".to_owned()] {
        let err = create(&alone, "r", 16 * MIB, Some(ContentSource::Snapshot(id))).unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
    }
}

#[test]
fn a_change_of_io_limits_sent_to_another_node_lands_on_the_volumes_node() {
    let c = cluster();
    let vol = create(&c.a, "v", 16 * MIB, None).unwrap();
    let change: std::collections::BTreeMap<String, String> = [
        ("maxWriteIOPS".to_owned(), "500".to_owned()),
        ("csi.storage.k8s.io/pv/name".to_owned(), "pvc-1".to_owned()),
    ]
    .into();
    c.b.driver
        .controller
        .modify_volume(&vol.id, &change)
        .unwrap();
    let on_a = c.a.driver.volumes.store.get(&vol.id).unwrap();
    assert_eq!(on_a.io_limits.write_iops, 500);
    assert!(c.b.driver.volumes.store.get(&vol.id).is_none());
    // A bad value is refused on the node called, before anything is sent.
    let bad = [("maxWriteIOPS".to_owned(), "x".to_owned())].into();
    assert!(matches!(
        c.b.driver.controller.modify_volume(&vol.id, &bad),
        Err(Error::InvalidArgument(_))
    ));
    // The owner down: UNAVAILABLE, and the retry lands once it is back.
    c.peers.down.lock().unwrap().insert("node-a".into());
    let later = [("maxWriteIOPS".to_owned(), "600".to_owned())].into();
    let err =
        c.b.driver
            .controller
            .modify_volume(&vol.id, &later)
            .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    c.peers.down.lock().unwrap().clear();
    c.b.driver
        .controller
        .modify_volume(&vol.id, &later)
        .unwrap();
    assert_eq!(
        c.a.driver
            .volumes
            .store
            .get(&vol.id)
            .unwrap()
            .io_limits
            .write_iops,
        600
    );
    // A volume that was on A and is gone: NOT_FOUND from A, final.
    let gone = crate::ids::new_volume_id(&crate::ids::NodeHint::of("node-a"));
    let err =
        c.b.driver
            .controller
            .modify_volume(&gone, &later)
            .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    // Made on a node no longer reachable at all: UNAVAILABLE, retried.
    let lost = crate::ids::new_volume_id(&crate::ids::NodeHint::of("node-z"));
    let err =
        c.b.driver
            .controller
            .modify_volume(&lost, &later)
            .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
}

#[test]
fn a_volume_without_a_hint_is_found_through_its_pv() {
    let fake = Arc::new(cluster::FakeCluster::default());
    let peers = Arc::new(LocalPeers {
        cluster: Some(fake.clone()),
        ..LocalPeers::default()
    });
    let a = node_fixture("node-a", FaultPoints::default(), Some(peers.clone()));
    let b = node_fixture("node-b", FaultPoints::default(), Some(peers.clone()));
    peers.add("node-a", a.driver.exports.clone());
    peers.add("node-b", b.driver.exports.clone());
    let old = "vol-0123456789abcdef01234567";
    let change = [("maxReadIOPS".to_owned(), "5".to_owned())].into();
    // Nothing records it and no node holds it: NOT_FOUND after asking the others.
    let err = b.driver.controller.modify_volume(old, &change).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    // Its PV names a node that is not reachable: UNAVAILABLE.
    fake.volumes
        .lock()
        .unwrap()
        .insert(old.into(), "node-gone".into());
    let err = b.driver.controller.modify_volume(old, &change).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
}

/// Every range of an answer to `query` asked of `f`.
fn metadata(f: &Fixture, query: &crate::block_ranges::RangeQuery) -> Result<Vec<(u64, u64)>> {
    let mut out = vec![];
    f.driver.snapshot_metadata.answer(query, &mut |page| {
        assert_eq!(page.capacity_bytes, 64 * MIB);
        out.extend(page.ranges.iter().map(|r| (r.offset, r.end())));
        true
    })?;
    Ok(out)
}

#[test]
fn snapshot_metadata_asked_of_another_node_is_answered_by_the_holder_and_resumes() {
    use crate::block_ranges::RangeQuery;
    let c = cluster();
    let vol = volume_with_data(&c);
    let s1 =
        c.a.driver
            .snapshots
            .create_snapshot("s1", &vol.id)
            .unwrap()
            .id;
    for at in [40, 50] {
        image(&c.a, &vol.id)
            .write_all_at(&vec![9u8; MIB as usize], at * MIB)
            .unwrap();
    }
    let s2 =
        c.a.driver
            .snapshots
            .create_snapshot("s2", &vol.id)
            .unwrap()
            .id;
    for base in [None, Some(s1.as_str())] {
        let query = RangeQuery::new(base, &s2, 0, 1).unwrap();
        let here = metadata(&c.a, &query).unwrap();
        assert!(!here.is_empty());
        assert_eq!(metadata(&c.b, &query).unwrap(), here);
        // The stream breaks after a page: resumed at the next byte, the same answer.
        c.peers.break_after.store(1, Ordering::SeqCst);
        let breaks = c.peers.breaks.load(Ordering::SeqCst);
        assert_eq!(metadata(&c.b, &query).unwrap(), here);
        assert_eq!(c.peers.breaks.load(Ordering::SeqCst), breaks + 1);
    }
    let delta = metadata(&c.b, &RangeQuery::new(Some(&s1), &s2, 0, 0).unwrap()).unwrap();
    assert_eq!(delta, vec![(40 * MIB, 41 * MIB), (50 * MIB, 51 * MIB)]);
    // Base on A, target on B (the volume moved): FAILED_PRECONDITION, on either node.
    let moved = create(&c.b, "moved", 64 * MIB, None).unwrap();
    let on_b =
        c.b.driver
            .snapshots
            .create_snapshot("s3", &moved.id)
            .unwrap()
            .id;
    for f in [&c.a, &c.b] {
        let err = metadata(f, &RangeQuery::new(Some(&s1), &on_b, 0, 0).unwrap()).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }
    // The holder down: UNAVAILABLE (retried); a snapshot held nowhere: NOT_FOUND.
    c.peers.down.lock().unwrap().insert("node-a".into());
    let err = metadata(&c.b, &RangeQuery::new(None, &s2, 0, 0).unwrap()).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    c.peers.down.lock().unwrap().clear();
    let gone = crate::ids::new_snapshot_id(&crate::ids::NodeHint::of("node-a"));
    let err = metadata(&c.b, &RangeQuery::new(None, &gone, 0, 0).unwrap()).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[test]
fn a_source_made_on_a_node_the_cluster_no_longer_has_is_gone_not_unavailable() {
    let fake = Arc::new(cluster::FakeCluster::default());
    let peers = Arc::new(LocalPeers {
        cluster: Some(fake.clone()),
        ..LocalPeers::default()
    });
    let b = node_fixture("node-b", FaultPoints::default(), Some(peers.clone()));
    peers.add("node-b", b.driver.exports.clone());
    let made_on_z = crate::ids::new_snapshot_id(&crate::ids::NodeHint::of("node-z"));
    let source = Some(ContentSource::Snapshot(made_on_z));
    // The cluster does not say which nodes exist: node-z may come back (retried).
    let err = create(&b, "r", 16 * MIB, source.clone()).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    // A list of Nodes without this node's own proves nothing (an API server without
    // kubelets, a partial answer): UNAVAILABLE.
    *fake.node_names.lock().unwrap() = Some(vec![]);
    let err = create(&b, "r", 16 * MIB, source.clone()).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    // node-z still has its Node object (NotReady, say): still UNAVAILABLE.
    *fake.node_names.lock().unwrap() = Some(vec!["node-b".into(), "node-z".into()]);
    let err = create(&b, "r", 16 * MIB, source.clone()).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    // Its Node object was deleted: the snapshot went with it (NOT_FOUND, final).
    *fake.node_names.lock().unwrap() = Some(vec!["node-b".into()]);
    let err = create(&b, "r", 16 * MIB, source).unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("no longer has")),
        "{err}"
    );
}

/// Two nodes with the dir backend (a volume's data is a directory tree).
fn dir_cluster() -> Pair {
    let peers = Arc::new(LocalPeers::default());
    let a = node_fixture_of("node-a", FaultPoints::default(), Some(peers.clone()), true);
    let b = node_fixture_of("node-b", FaultPoints::default(), Some(peers.clone()), true);
    peers.add("node-a", a.driver.exports.clone());
    peers.add("node-b", b.driver.exports.clone());
    Pair { peers, a, b }
}

/// [`dir_cluster`] with a volume on A holding the tree [`write_tree`] makes.
fn dir_cluster_with_tree() -> (Pair, VolumeRecord) {
    let c = dir_cluster();
    let vol = create_dir_volume(&c.a, "src", None).unwrap();
    write_tree(&tree_of(&c.a, &vol.id));
    (c, vol)
}

fn create_dir_volume(
    f: &Fixture,
    name: &str,
    source: Option<ContentSource>,
) -> Result<VolumeRecord> {
    f.driver.controller.create_volume(CreateVolume {
        name: name.into(),
        capacity: CapacityRange {
            required: 64 * MIB,
            limit: 0,
        },
        capabilities: vec![mount_fs("", AccessMode::SingleNodeWriter)],
        content_source: source,
        ..Default::default()
    })
}

fn tree_of(f: &Fixture, id: &str) -> std::path::PathBuf {
    f.driver
        .volumes
        .dir(id)
        .join(crate::backend::directory::DATA_DIR)
}

/// A tree with a sparse 2 MiB file (several chunks), a nested directory and a symlink.
fn write_tree(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("app/logs")).unwrap();
    let big = File::create(root.join("app/data.bin")).unwrap();
    big.set_len(8 * MIB).unwrap();
    let pattern: Vec<u8> = (0..2 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    big.write_all_at(&pattern, 3 * MIB).unwrap();
    std::fs::write(root.join("app/logs/today"), b"line\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("app/escape")).unwrap();
}

/// Paths, kinds, modes, sizes and contents under `root`, in order.
fn tree_listing(root: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                stack.push(path.clone());
                "dir".into()
            } else {
                format!("{:08x}", crc32fast::hash(&std::fs::read(&path).unwrap()))
            };
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.push(format!("{rel} {what} {:o} {}", m.mode(), m.len()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_dir_snapshot_restores_on_another_node_as_the_same_tree() {
    let (c, vol) = dir_cluster_with_tree();
    let snap = c.a.driver.snapshots.create_snapshot("s", &vol.id).unwrap();
    c.peers.break_after.store(3, Ordering::SeqCst);
    let restored = create_dir_volume(
        &c.b,
        "restored",
        Some(ContentSource::Snapshot(snap.id.clone())),
    )
    .unwrap();
    assert_eq!(
        c.peers.breaks.load(Ordering::SeqCst),
        1,
        "the stream broke once"
    );
    let (src, dst) = (tree_of(&c.a, &vol.id), tree_of(&c.b, &restored.id));
    assert_eq!(tree_listing(&dst), tree_listing(&src));
    // Holes stay holes; the symlink was made, not followed.
    let big = std::fs::metadata(dst.join("app/data.bin")).unwrap();
    assert!(big.blocks() * 512 < 3 * MIB, "{} blocks", big.blocks());
    assert_eq!(
        std::fs::read_link(dst.join("app/escape")).unwrap(),
        std::path::Path::new("/etc/shadow")
    );
    assert_eq!(c.a.driver.exports.open_reads(), 0, "the read was released");
    no_staging_left(&c.b);
}

#[test]
fn a_dir_volume_clones_on_another_node_and_its_copy_goes_with_the_read() {
    let (c, vol) = dir_cluster_with_tree();
    c.peers.corrupt.store(1, Ordering::SeqCst);
    let clone =
        create_dir_volume(&c.b, "clone", Some(ContentSource::Volume(vol.id.clone()))).unwrap();
    assert_eq!(
        tree_listing(&tree_of(&c.b, &clone.id)),
        tree_listing(&tree_of(&c.a, &vol.id))
    );
    // The copy made for the read is gone with it.
    let scratch = c.a._pool.path().join(exports::READS_DIR);
    assert_eq!(std::fs::read_dir(scratch).unwrap().count(), 0);
}

#[test]
fn a_snapshot_under_a_tree_read_is_not_deleted_until_the_read_ends() {
    let (c, vol) = dir_cluster_with_tree();
    let snap = c.a.driver.snapshots.create_snapshot("s", &vol.id).unwrap();
    let exports = &c.a.driver.exports;
    let read = exports
        .open(&ContentSource::Snapshot(snap.id.clone()), "node-b")
        .unwrap();
    assert!(read.allocated_bytes >= 2 * MIB, "{}", read.allocated_bytes);
    let err = c.a.driver.snapshots.delete_snapshot(&snap.id).unwrap_err();
    assert!(matches!(err, Error::Aborted(_)), "{err}");
    exports.release(&read.read_id);
    c.a.driver.snapshots.delete_snapshot(&snap.id).unwrap();
}

#[test]
fn a_tree_cannot_become_an_image_volume_nor_an_image_a_tree() {
    let peers = Arc::new(LocalPeers::default());
    let a = node_fixture_of("node-a", FaultPoints::default(), Some(peers.clone()), true);
    let b = node_fixture("node-b", FaultPoints::default(), Some(peers.clone()));
    peers.add("node-a", a.driver.exports.clone());
    peers.add("node-b", b.driver.exports.clone());
    let tree = create_dir_volume(&a, "tree", None).unwrap();
    let err = create(&b, "img", 64 * MIB, Some(ContentSource::Volume(tree.id))).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("dir backend")),
        "{err}"
    );
    let img = create(&b, "img2", 64 * MIB, None).unwrap();
    let err = create_dir_volume(&a, "tree2", Some(ContentSource::Volume(img.id))).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("image backend")),
        "{err}"
    );
    assert_eq!(b.driver.volumes.store.len(), 1);
    assert_eq!(
        a.driver.exports.open_reads() + b.driver.exports.open_reads(),
        0
    );
}

#[test]
fn a_dir_volume_is_not_moved_and_says_what_to_do_instead() {
    let c = dir_cluster();
    let vol = create_dir_volume(&c.a, "src", None).unwrap();
    let err =
        c.a.driver
            .exports
            .move_out(MoveStep::Precopy, &vol.id, "move-1", "node-b")
            .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("restore the snapshot on node node-b")),
        "{err}"
    );
    assert_eq!(c.a.driver.exports.open_reads(), 0);
}
