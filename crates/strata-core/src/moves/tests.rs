//! Moves between two drivers in one process (the peers of `peer::tests`), over the fake
//! cluster: the whole move with writes during the pre-copy, the gate off, a withdrawn
//! move, a PV changed under the commit, the seal, and restarts of either side.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::*;
use crate::model::{AccessMode, MIB};
use crate::node::StageVolume;
use crate::peer::tests::{Pair, cluster, contents, create, image, write_scattered};
use std::sync::Arc;

use crate::fault::FaultPoints;
use crate::testing::{Fixture, mount, node_fixture};

fn stage(f: &Fixture, id: &str) -> Result<()> {
    f.driver.node.stage_volume(StageVolume {
        volume_id: id.into(),
        staging_path: "/stage".into(),
        capability: mount(AccessMode::SingleNodeWriter),
        secrets: Default::default(),
    })
}

fn unstage(f: &Fixture, id: &str) {
    f.driver.node.unstage_volume(id, "/stage").unwrap();
}

struct Move {
    c: Pair,
    kube: FakeMoveCluster,
    id: String,
}

/// A formatted volume with 3 MiB of data on A, staged there (in use), its claim pinned
/// to A.
fn setup_in_use() -> Move {
    let c = cluster();
    let vol = create(&c.a, "src", 64 * MIB, None).unwrap();
    stage(&c.a, &vol.id).unwrap();
    write_scattered(&image(&c.a, &vol.id));
    let kube = FakeMoveCluster::default();
    kube.add(&vol.id, "data", "node-a");
    Move {
        c,
        kube,
        id: vol.id,
    }
}

/// The same, not in use.
fn setup() -> Move {
    let m = setup_in_use();
    unstage(&m.c.a, &m.id);
    m
}

impl Move {
    fn arrivals(&self) -> &Arrivals {
        self.c.b.driver.arrivals.as_deref().unwrap()
    }

    fn round_b(&self) -> ArrivalsRound {
        self.arrivals().round(&self.kube).unwrap()
    }

    fn round_a(&self) -> departures::DeparturesRound {
        self.c.a.driver.departures.reconcile(&self.kube).unwrap()
    }

    fn status(&self) -> Option<String> {
        self.kube.claim(&self.id).status
    }

    fn pool_leftovers(&self, f: &Fixture) -> Vec<String> {
        let pool = f
            .driver
            .volumes
            .dir("x")
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join(DIR);
        let mut left = vec![];
        for side in ["in", "out"] {
            for e in std::fs::read_dir(pool.join(side)).unwrap() {
                left.push(format!(
                    "{side}/{}",
                    e.unwrap().file_name().to_string_lossy()
                ));
            }
        }
        left
    }
}

#[test]
fn a_volume_moves_with_the_writes_made_during_its_pre_copy() {
    let m = setup_in_use();
    m.kube.ask(&m.id, Some("node-b"));

    // The pre-copy runs while the volume is staged; the final copy waits.
    let r = m.round_b();
    assert_eq!(r.precopied, vec![m.id.clone()]);
    assert_eq!(r.waiting, vec![m.id.clone()]);
    assert!(
        m.status().unwrap().starts_with("Waiting: volume"),
        "{:?}",
        m.status()
    );
    assert_eq!(m.kube.claim(&m.id).pv_node.as_deref(), Some("node-a"));
    assert!(m.c.b.driver.volumes.store.get(&m.id).is_none());
    // Not in B's list while it arrives.
    assert_eq!(m.c.b.driver.volumes.count(), 0);

    // The application keeps writing: a new range, a rewritten one, a discarded one.
    let img = image(&m.c.a, &m.id);
    img.write_all_at(&vec![9u8; MIB as usize], 40 * MIB)
        .unwrap();
    img.write_all_at(&vec![8u8; 4096], 7 * MIB + 4096).unwrap();
    img.write_all_at(&vec![0u8; (MIB / 2) as usize], 63 * MIB)
        .unwrap();
    img.sync_all().unwrap();
    // A round while it is still in use changes nothing.
    assert_eq!(m.round_b().waiting, vec![m.id.clone()]);
    assert!(m.round_a().retired.is_empty());

    unstage(&m.c.a, &m.id);
    let r = m.round_b();
    assert_eq!(r.moved, vec![m.id.clone()]);
    let claim = m.kube.claim(&m.id);
    assert_eq!(claim.pv_node.as_deref(), Some("node-b"));
    assert_eq!(claim.move_to, None, "the intent is cleared once done");
    assert_eq!(
        claim.status.as_deref(),
        Some("Moved from node node-a to node node-b")
    );
    // B serves it under the same id, with A's data as it was last written.
    let moved = m.c.b.driver.volumes.store.get(&m.id).unwrap();
    let source = m.c.a.driver.volumes.store.get(&m.id).unwrap();
    assert_eq!(moved.capacity_bytes, source.capacity_bytes);
    assert_eq!(moved.name, source.name);
    assert_eq!(contents(&image(&m.c.b, &m.id)), contents(&img));
    // Sealed on A until A sees the PV point to B, then retired there.
    assert!(
        stage(&m.c.a, &m.id)
            .unwrap_err()
            .to_string()
            .contains("moving to node node-b")
    );
    assert_eq!(m.round_a().retired, vec![m.id.clone()]);
    assert!(m.c.a.driver.volumes.store.get(&m.id).is_none());
    assert_eq!(moved.format, source.format);
    assert!(
        m.pool_leftovers(&m.c.a).is_empty(),
        "{:?}",
        m.pool_leftovers(&m.c.a)
    );
    assert!(
        m.pool_leftovers(&m.c.b).is_empty(),
        "{:?}",
        m.pool_leftovers(&m.c.b)
    );
    // Nothing more to do on either side.
    assert_eq!(m.round_b(), ArrivalsRound::default());
    assert_eq!(m.round_a(), departures::DeparturesRound::default());
}

#[test]
fn the_final_copy_sends_only_what_changed() {
    let m = setup_in_use();
    m.kube.ask(&m.id, Some("node-b"));
    m.round_b();
    let pulled = || {
        m.c.b
            .driver
            .remote
            .as_ref()
            .unwrap()
            .figures()
            .bytes_pulled
            .load(Ordering::SeqCst)
    };
    let after_precopy = pulled();
    assert_eq!(
        after_precopy,
        3 * MIB,
        "the pre-copy carries the allocated data"
    );
    image(&m.c.a, &m.id)
        .write_all_at(&vec![5u8; 8192], 31 * MIB)
        .unwrap();
    unstage(&m.c.a, &m.id);
    assert_eq!(m.round_b().moved, vec![m.id.clone()]);
    let delta = pulled() - after_precopy;
    assert!(
        (8192..=64 << 10).contains(&delta),
        "final copy of {delta} bytes"
    );
}

#[test]
fn a_cluster_without_the_gate_refuses_at_once_and_nothing_is_made() {
    let m = setup();
    m.kube.gate_off.store(true, Ordering::SeqCst);
    m.kube.ask(&m.id, Some("node-b"));
    let r = m.round_b();
    assert_eq!(r.failed.len(), 1);
    let status = m.status().unwrap();
    assert!(
        status.starts_with("Refused:") && status.contains("MutablePVNodeAffinity"),
        "{status}"
    );
    assert!(
        m.kube.events.lock().unwrap().iter().all(|e| e.2),
        "reported as a warning"
    );
    assert!(m.pool_leftovers(&m.c.a).is_empty());
    assert!(m.pool_leftovers(&m.c.b).is_empty());
    // Reported once, not every round.
    m.round_b();
    assert_eq!(m.kube.events.lock().unwrap().len(), 1);
}

#[test]
fn a_move_withdrawn_before_its_commit_leaves_everything_as_it_was() {
    let m = setup_in_use();
    m.kube.ask(&m.id, Some("node-b"));
    assert_eq!(m.round_b().waiting, vec![m.id.clone()]);
    assert!(!m.pool_leftovers(&m.c.a).is_empty());
    m.kube.ask(&m.id, None);
    assert_eq!(m.round_b().cancelled, vec![m.id.clone()]);
    assert!(m.pool_leftovers(&m.c.b).is_empty());
    assert!(
        m.pool_leftovers(&m.c.a).is_empty(),
        "the target told the source"
    );
    assert_eq!(m.kube.claim(&m.id).pv_node.as_deref(), Some("node-a"));
    assert!(m.c.a.driver.volumes.store.get(&m.id).is_some());
    unstage(&m.c.a, &m.id);
    stage(&m.c.a, &m.id).unwrap();
}

#[test]
fn a_source_that_sees_the_intent_withdrawn_unseals_by_itself() {
    let m = setup();
    m.kube.ask(&m.id, Some("node-b"));
    // Sealed, then the commit is refused (the PV changed): the move stays in flight.
    m.kube.conflict_next_repin.store(true, Ordering::SeqCst);
    m.round_b();
    assert_eq!(
        m.c.a.driver.departures.sealed(&m.id).as_deref(),
        Some("node-b")
    );
    assert!(stage(&m.c.a, &m.id).is_err());
    // The target is gone (its node lost) and the intent withdrawn: the source alone sees
    // it, unseals and drops its copy.
    m.kube.ask(&m.id, None);
    assert_eq!(m.round_a().cancelled, vec![m.id.clone()]);
    assert!(m.c.a.driver.departures.sealed(&m.id).is_none());
    assert!(m.pool_leftovers(&m.c.a).is_empty());
    stage(&m.c.a, &m.id).unwrap();
}

#[test]
fn a_pv_changed_under_the_commit_is_retried_with_its_new_version() {
    let m = setup();
    m.kube.ask(&m.id, Some("node-b"));
    m.kube.conflict_next_repin.store(true, Ordering::SeqCst);
    let r = m.round_b();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(m.status().unwrap().contains("changed since it was read"));
    assert_eq!(m.kube.claim(&m.id).pv_node.as_deref(), Some("node-a"));
    // The data is complete and the volume sealed: the next round only commits.
    assert!(m.c.a.driver.departures.sealed(&m.id).is_some());
    assert_eq!(m.round_b().moved, vec![m.id.clone()]);
    assert_eq!(m.kube.claim(&m.id).pv_node.as_deref(), Some("node-b"));
}

#[test]
fn either_side_restarted_at_any_step_resumes_from_its_records() {
    let m = setup_in_use();
    m.kube.ask(&m.id, Some("node-b"));
    m.round_b();
    // Both sides restart: their halves are read back from their pools.
    let (a, b) = (&m.c.a.driver, &m.c.b.driver);
    let reopen_b = || {
        Arrivals::open(
            "node-b",
            b.config.pool.as_path(),
            m.c.peers.clone(),
            b.remote.clone().unwrap(),
            b.volumes.clone(),
            b.backend.clone(),
            Default::default(),
        )
        .unwrap()
    };
    let reopen_a = || {
        Departures::open(
            "node-a",
            a.config.pool.as_path(),
            a.volumes.clone(),
            a.backend.clone(),
            a.freezer.clone(),
            Default::default(),
        )
        .unwrap()
    };
    let reopened_b = reopen_b();
    assert_eq!(reopened_b.arriving(), vec![m.id.clone()]);
    assert_eq!(
        reopen_a().departing(),
        vec![(m.id.clone(), "node-b".to_owned())]
    );
    // A pre-copy cut short on either side (data without a record) is dropped at startup.
    let pool_b = b.config.pool.join(DIR).join("in");
    std::fs::create_dir(pool_b.join("vol-cut-short")).unwrap();
    let pool_a = a.config.pool.join(DIR).join("out");
    std::fs::create_dir(pool_a.join(".partial-vol-cut-short")).unwrap();
    drop((reopen_b(), reopen_a()));
    assert!(!pool_b.join("vol-cut-short").exists());
    assert!(!pool_a.join(".partial-vol-cut-short").exists());
    // The reopened target finishes the move.
    unstage(&m.c.a, &m.id);
    assert_eq!(reopened_b.round(&m.kube).unwrap().moved, vec![m.id.clone()]);
    assert_eq!(
        contents(&image(&m.c.b, &m.id)),
        contents(&image(&m.c.a, &m.id))
    );
}

#[test]
fn a_commit_whose_copy_was_not_taken_in_is_taken_in_after_a_restart() {
    let m = setup();
    m.kube.ask(&m.id, Some("node-b"));
    // As if the target died right after pinning the PV: the arrival is complete, the PV
    // says node-b, the intent is still there.
    m.kube.drop_done_reports.store(true, Ordering::SeqCst);
    assert_eq!(m.round_b().moved, vec![m.id.clone()]);
    assert_eq!(m.kube.claim(&m.id).move_to.as_deref(), Some("node-b"));
    m.kube.drop_done_reports.store(false, Ordering::SeqCst);
    // The next round only reports.
    assert_eq!(m.round_b().moved, vec![m.id.clone()]);
    assert_eq!(m.kube.claim(&m.id).move_to, None);
    assert!(m.c.b.driver.volumes.store.get(&m.id).is_some());
    assert_eq!(m.round_a().retired, vec![m.id.clone()]);
}

#[test]
fn an_unreachable_cluster_changes_nothing() {
    let m = setup();
    m.kube.ask(&m.id, Some("node-b"));
    *m.kube.failing.lock().unwrap() = Some(Error::Unavailable("the API server is down".into()));
    assert!(m.arrivals().round(&m.kube).is_err());
    assert!(m.pool_leftovers(&m.c.b).is_empty());
}

#[test]
fn a_peer_record_is_bounded_and_must_name_the_volume() {
    let m = setup();
    let record = m.c.a.driver.volumes.store.get(&m.id).unwrap();
    let wire = record_to_wire(&record).unwrap();
    assert_eq!(record_from_wire(&wire, &m.id).unwrap(), record);
    assert!(record_from_wire(&wire, "vol-other").is_err());
    assert!(record_from_wire(&vec![b' '; MAX_RECORD_BYTES + 1], &m.id).is_err());
    assert!(record_from_wire(b"{", &m.id).is_err());
}

#[test]
fn an_evacuated_node_moves_its_volumes_a_few_at_a_time_and_reports_what_fits_nowhere() {
    use evacuation::PARALLEL;
    let c = cluster();
    let kube = FakeMoveCluster::default();
    let mut ids = vec![];
    for i in 0..10 {
        let v = create(&c.a, &format!("v{i}"), 16 * MIB, None).unwrap();
        kube.add(&v.id, &format!("c{i}"), "node-a");
        ids.push(v.id);
    }
    let big = create(&c.a, "big", 256 * MIB, None).unwrap();
    kube.add(&big.id, "big", "node-a");
    kube.room.lock().unwrap().insert("node-a".into(), 1 << 40);
    kube.room.lock().unwrap().insert("node-b".into(), 200 * MIB);
    let (a, b) = (&c.a.driver, &c.b.driver);
    // Not asked: nothing happens.
    assert_eq!(
        a.evacuation.round(&kube).unwrap(),
        EvacuationRound::default()
    );
    kube.evacuating.lock().unwrap().push("node-a".into());
    for rounds in 0.. {
        assert!(rounds < 20, "the evacuation does not end");
        let r = a.evacuation.round(&kube).unwrap();
        assert!(r.in_flight + r.asked.len() <= PARALLEL, "{r:?}");
        assert_eq!(r.no_room, vec![big.id.clone()], "{r:?}");
        if r.left == 1 {
            break;
        }
        let moved = b.arrivals.as_ref().unwrap().round(&kube).unwrap().moved;
        // What the storage capacity objects would say next.
        *kube.room.lock().unwrap().get_mut("node-b").unwrap() -= 16 * MIB * moved.len() as u64;
        a.departures.reconcile(&kube).unwrap();
    }
    for id in &ids {
        assert_eq!(kube.claim(id).pv_node.as_deref(), Some("node-b"));
        assert!(b.volumes.store.get(id).is_some() && a.volumes.store.get(id).is_none());
    }
    // The one that fits nowhere stays, reported once.
    assert!(a.volumes.store.get(&big.id).is_some());
    let status = kube.claim(&big.id).status.unwrap();
    assert!(status.starts_with("Failed: no node has room"), "{status}");
    let reports = kube
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == "big")
        .count();
    assert_eq!(reports, 1);
}

#[test]
fn a_long_pre_copy_shows_its_progress_in_the_claim_without_events() {
    // Node B takes 20 ms per chunk it writes; its progress is shown every 10 ms.
    let peers = Arc::new(crate::peer::tests::LocalPeers::default());
    let slow = FaultPoints::default().with_delay(Some("copy:after-chunk=20".into()));
    let a = node_fixture("node-a", FaultPoints::default(), Some(peers.clone()));
    let b = node_fixture("node-b", slow, Some(peers.clone()));
    peers.add("node-a", a.driver.exports.clone());
    peers.add("node-b", b.driver.exports.clone());
    let c = Pair { peers, a, b };
    let vol = create(&c.a, "src", 64 * MIB, None).unwrap();
    write_scattered(&image(&c.a, &vol.id));
    let kube = Arc::new(FakeMoveCluster::default());
    kube.add(&vol.id, "data", "node-a");
    kube.ask(&vol.id, Some("node-b"));
    let arrivals = c.b.driver.arrivals.clone().unwrap();
    arrivals.set_progress_period(std::time::Duration::from_millis(10));
    let seen = std::thread::scope(|scope| {
        let round = scope.spawn(|| arrivals.round(kube.as_ref()).unwrap());
        let mut seen = vec![];
        while !round.is_finished() {
            if let Some(s) = kube.claim(&vol.id).status
                && !seen.contains(&s)
            {
                seen.push(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(round.join().unwrap().moved, vec![vol.id.clone()]);
        seen
    });
    let progress: Vec<_> = seen.iter().filter(|s| s.contains(" MiB")).collect();
    assert!(!progress.is_empty(), "{seen:?}");
    assert!(
        progress.iter().all(|s| s.ends_with(" of 3 MiB")),
        "{progress:?}"
    );
    // Events only for the steps, never for progress.
    let events = kube.events.lock().unwrap();
    assert!(events.iter().all(|e| !e.1.contains(" MiB")), "{events:?}");
}

#[test]
fn a_volume_grown_after_its_pre_copy_arrives_at_its_new_size() {
    let m = setup_in_use();
    m.kube.ask(&m.id, Some("node-b"));
    assert_eq!(m.round_b().waiting, vec![m.id.clone()]);
    let grown = 96 * MIB;
    m.c.a
        .driver
        .controller
        .expand_volume(
            &m.id,
            crate::model::CapacityRange {
                required: grown,
                limit: 0,
            },
        )
        .unwrap();
    image(&m.c.a, &m.id)
        .write_all_at(&[7u8; 4096], grown - 4096)
        .unwrap();
    unstage(&m.c.a, &m.id);
    assert_eq!(m.round_b().moved, vec![m.id.clone()]);
    let moved = m.c.b.driver.volumes.store.get(&m.id).unwrap();
    assert_eq!(moved.capacity_bytes, grown);
    assert_eq!(
        contents(&image(&m.c.b, &m.id)),
        contents(&image(&m.c.a, &m.id))
    );
}

#[test]
fn a_volume_deleted_on_its_node_mid_move_leaves_nothing_on_either() {
    let m = setup_in_use();
    m.kube.ask(&m.id, Some("node-b"));
    assert_eq!(m.round_b().waiting, vec![m.id.clone()]);
    unstage(&m.c.a, &m.id);
    // The claim is deleted: its provisioner deletes the volume on its node.
    m.c.a.driver.controller.delete_volume(&m.id).unwrap();
    let r = m.round_b();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(
        m.pool_leftovers(&m.c.b).is_empty(),
        "{:?}",
        m.pool_leftovers(&m.c.b)
    );
    m.kube.claims.lock().unwrap().remove(&m.id);
    assert_eq!(m.round_a().cancelled, vec![m.id.clone()]);
    assert!(
        m.pool_leftovers(&m.c.a).is_empty(),
        "{:?}",
        m.pool_leftovers(&m.c.a)
    );
    assert!(m.c.b.driver.volumes.store.get(&m.id).is_none());
}

#[test]
fn an_encrypted_volume_moves_with_its_wrapped_key() {
    let c = cluster();
    let key =
        crate::testing::secrets(&[(crate::encryption::SECRET_KEY, "a passphrase for the move")]);
    let id =
        crate::testing::create_volume(&c.a.driver, "enc", &[("encrypted", "true")], key).unwrap();
    let kube = FakeMoveCluster::default();
    kube.add(&id, "enc", "node-a");
    kube.ask(&id, Some("node-b"));
    let r = c.b.driver.arrivals.as_ref().unwrap().round(&kube).unwrap();
    assert_eq!(r.moved, vec![id.clone()]);
    let (source, moved) = (
        c.a.driver.volumes.store.get(&id).unwrap(),
        c.b.driver.volumes.store.get(&id).unwrap(),
    );
    assert!(moved.encryption.is_some());
    assert_eq!(moved.encryption, source.encryption);
    assert_eq!(moved.version, source.version);
}
