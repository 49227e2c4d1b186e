use std::sync::Arc;

use super::fake::{FakeNode, FakeNodeLossCluster};
use super::*;

fn volume(pv: &str, claim: Option<&str>, policy: OnNodeLoss, deleting: bool) -> PinnedVolume {
    PinnedVolume {
        pv: pv.into(),
        claim: claim.map(|c| ("apps".to_owned(), c.to_owned())),
        claim_uid: claim.map(|c| format!("uid-{c}")),
        policy,
        deleting,
    }
}

/// Nodes a (alive, protected), b (deleted, protected) and c (NotReady: not deleted), with
/// volumes and snapshots on b and one volume on a.
fn cluster() -> Arc<FakeNodeLossCluster> {
    let c = Arc::new(FakeNodeLossCluster::default());
    {
        let mut s = c.lock();
        for (name, deleting) in [("a", false), ("b", true), ("c", false)] {
            s.nodes.insert(
                name.into(),
                FakeNode {
                    finalizers: [FINALIZER.to_owned(), "other/keep".to_owned()]
                        .into_iter()
                        .filter(|f| f == FINALIZER || name == "c")
                        .collect(),
                    deleting,
                },
            );
        }
        for (node, v) in [
            (
                "b",
                volume("pv-del", Some("db-0"), OnNodeLoss::Delete, false),
            ),
            (
                "b",
                volume("pv-keep", Some("db-1"), OnNodeLoss::Retain, false),
            ),
            (
                "b",
                volume("pv-going", Some("db-2"), OnNodeLoss::Retain, true),
            ),
            ("b", volume("pv-unbound", None, OnNodeLoss::Delete, false)),
            (
                "a",
                volume("pv-alive", Some("web-0"), OnNodeLoss::Delete, false),
            ),
        ] {
            if let (Some(claim), Some(uid)) = (&v.claim, &v.claim_uid) {
                s.claims.insert(claim.clone(), uid.clone());
            }
            s.volumes.insert(v.pv.clone(), (node.to_owned(), v));
        }
        for (name, deleting) in [("snapcontent-1", true), ("snapcontent-2", false)] {
            s.contents.insert(
                name.into(),
                (
                    "b".into(),
                    ManagedContent {
                        name: name.into(),
                        deleting,
                    },
                ),
            );
        }
    }
    c
}

fn claim(name: &str) -> (String, String) {
    ("apps".to_owned(), name.to_owned())
}

#[test]
fn a_deleted_node_is_released_by_each_classs_policy() {
    let c = cluster();
    let janitor = NodeLoss::new(c.clone(), "a");
    let round = janitor.round().unwrap();
    assert!(round.leader);
    assert_eq!(round.nodes_released, vec!["b".to_owned()]);
    assert_eq!(round.claims_deleted, vec![claim("db-0")]);
    let mut released = round.volumes_released.clone();
    released.sort();
    assert_eq!(released, vec!["pv-del", "pv-going", "pv-unbound"]);
    assert_eq!(round.volumes_reported, vec!["pv-keep".to_owned()]);
    assert_eq!(round.contents_released, vec!["snapcontent-1".to_owned()]);
    assert_eq!(round.contents_reported, vec!["snapcontent-2".to_owned()]);
    let s = c.lock();
    assert!(
        !s.nodes.contains_key("b"),
        "the Node is gone with its finalizer"
    );
    assert!(
        s.nodes["a"].finalizers.contains(FINALIZER),
        "a live node is untouched"
    );
    assert!(s.nodes.contains_key("c"), "a node not deleted is untouched");
    assert!(s.claims.contains_key(&claim("db-1")) && s.claims.contains_key(&claim("web-0")));
    assert!(!s.claims.contains_key(&claim("db-0")));
    assert!(s.volumes.contains_key("pv-keep") && s.volumes.contains_key("pv-alive"));
    let reasons: Vec<&str> = s.events.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        reasons,
        vec!["VolumeLostWithNode", "VolumeLostWithNode", "StrataDataLost"],
        "{:?}",
        s.events
    );
    drop(s);
    // The next round finds nothing to do.
    let again = janitor.round().unwrap();
    assert!(again.leader && again.nodes_released.is_empty());
}

#[test]
fn only_the_lease_holder_acts_and_another_takes_over_when_it_stops_renewing() {
    let c = cluster();
    let (a, d) = (NodeLoss::new(c.clone(), "a"), NodeLoss::new(c.clone(), "d"));
    // a holds the Lease (nothing deleted yet matters to the check).
    c.lock().nodes.get_mut("b").unwrap().deleting = false;
    assert!(a.round().unwrap().leader);
    c.lock().nodes.get_mut("b").unwrap().deleting = true;
    c.lock().now += 10;
    let round = d.round().unwrap();
    assert!(!round.leader, "a renewed 10 s ago");
    assert!(
        c.lock().nodes.contains_key("b"),
        "the second janitor did nothing"
    );
    // a stops (its node lost, or the pod gone): after the Lease's duration d takes over.
    c.lock().now += LEASE_DURATION.as_secs() + 1;
    let round = d.round().unwrap();
    assert!(round.leader);
    assert_eq!(round.nodes_released, vec!["b".to_owned()]);
    // And a, back, does not act while d renews.
    assert!(!a.round().unwrap().leader);
}

#[test]
fn a_round_cut_short_is_finished_by_the_next_and_the_finalizer_goes_last() {
    let c = cluster();
    let janitor = NodeLoss::new(c.clone(), "a");
    c.lock().failing.insert(
        "contents_of",
        Error::Unavailable("the API server did not answer".into()),
    );
    assert!(matches!(janitor.round(), Err(Error::Unavailable(_))));
    {
        let s = c.lock();
        assert!(
            s.nodes["b"].finalizers.contains(FINALIZER),
            "not released yet"
        );
        assert!(
            !s.claims.contains_key(&claim("db-0")),
            "the claim went already"
        );
    }
    // Its owner (a StatefulSet) makes a new claim of that name meanwhile: the next round
    // must not take it for the lost one.
    c.lock().claims.insert(claim("db-0"), "uid-new".into());
    // A failed event is logged and does not stop the round.
    c.lock()
        .failing
        .insert("event", Error::Unavailable("no".into()));
    let round = janitor.round().unwrap();
    assert_eq!(round.nodes_released, vec!["b".to_owned()]);
    assert!(!c.lock().nodes.contains_key("b"));
    assert!(
        round.claims_deleted.is_empty(),
        "deleted once, in the first round"
    );
    assert_eq!(
        c.lock().claims.get(&claim("db-0")).map(String::as_str),
        Some("uid-new"),
        "the new claim of the same name stays"
    );
}

#[test]
fn a_janitor_never_releases_its_own_node_and_protects_it() {
    let c = cluster();
    let b = NodeLoss::new(c.clone(), "b");
    let round = b.round().unwrap();
    assert!(round.leader && round.nodes_released.is_empty());
    assert!(c.lock().nodes.contains_key("b"));
    let e = NodeLoss::new(c.clone(), "e");
    c.lock().nodes.insert("e".into(), FakeNode::default());
    e.protect().unwrap();
    assert!(c.lock().nodes["e"].finalizers.contains(FINALIZER));
}

#[test]
fn the_policy_is_retain_or_delete() {
    let p = |v: &str| BTreeMap::from([(PARAMETER.to_owned(), v.to_owned())]);
    assert_eq!(
        OnNodeLoss::from_parameters(&BTreeMap::new()).unwrap(),
        OnNodeLoss::Retain
    );
    assert_eq!(
        OnNodeLoss::from_parameters(&p("Delete")).unwrap(),
        OnNodeLoss::Delete
    );
    assert!(OnNodeLoss::from_parameters(&p("delete")).is_err());
}
