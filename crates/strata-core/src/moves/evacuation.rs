//! Evacuating a node: while its Node asks ([`EVACUATE`]), each of this node's volumes is
//! asked to move ([`MOVE_TO`] on its claim) to the node with the most room that fits it, a
//! few at a time; the targets do the moves. With it, `kubectl drain` brings a StatefulSet's
//! pods back up elsewhere with their data, after one short final copy each. A volume that
//! fits nowhere stays here and is reported on its claim, never lost.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{EVACUATE, MOVE_TO, MoveCluster, PinnedClaim};
use crate::error::Result;
use crate::volumes::Volumes;

/// Moves in flight from one node at once, by default.
pub const PARALLEL: usize = 2;

/// What a round of [`Evacuation::round`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvacuationRound {
    /// Moves asked for now: (volume, target).
    pub asked: Vec<(String, String)>,
    /// Volumes that fit on no node.
    pub no_room: Vec<String>,
    /// Moves already in flight.
    pub in_flight: usize,
    /// This driver's volumes still pinned here.
    pub left: usize,
}

/// This node's evacuation.
pub struct Evacuation {
    node_id: String,
    volumes: Arc<Volumes>,
    parallel: usize,
}

impl Evacuation {
    pub fn new(node_id: &str, volumes: Arc<Volumes>, parallel: usize) -> Self {
        Evacuation {
            node_id: node_id.to_owned(),
            volumes,
            parallel: parallel.max(1),
        }
    }

    /// One pass: nothing unless the Node asks; else moves asked for up to the bound.
    pub fn round(&self, cluster: &dyn MoveCluster) -> Result<EvacuationRound> {
        let mut round = EvacuationRound::default();
        if !cluster.evacuating(&self.node_id)? {
            return Ok(round);
        }
        let claims = cluster.claims_on(&self.node_id)?;
        let mut room = cluster.room()?;
        room.remove(&self.node_id);
        let size = |c: &PinnedClaim| {
            self.volumes
                .store
                .get(&c.volume_id)
                .map(|r| r.capacity_bytes)
        };
        // Moves in flight hold room on their targets.
        let in_flight: Vec<&PinnedClaim> = claims.iter().filter(|c| c.move_to.is_some()).collect();
        for c in &in_flight {
            if let (Some(target), Some(bytes)) = (&c.move_to, size(c))
                && let Some(free) = room.get_mut(target)
            {
                *free = free.saturating_sub(bytes);
            }
        }
        round.in_flight = in_flight.len();
        round.left = claims.len();
        let mut slots = self.parallel.saturating_sub(in_flight.len());
        // The largest first: they are the hardest to place.
        let mut waiting: Vec<(&PinnedClaim, u64)> = claims
            .iter()
            .filter(|c| c.move_to.is_none())
            .filter_map(|c| Some((c, size(c)?)))
            .collect();
        waiting.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.volume_id.cmp(&b.0.volume_id))
        });
        for (c, bytes) in waiting {
            if slots == 0 {
                break;
            }
            match best_fit(&room, bytes) {
                Some(target) => {
                    cluster.ask_move(&c.namespace, &c.claim, &target)?;
                    tracing::info!(volume_id = %c.volume_id, claim = %c.claim, to_node = %target,
                        "evacuating: move asked for ({MOVE_TO})");
                    if let Some(free) = room.get_mut(&target) {
                        *free = free.saturating_sub(bytes);
                    }
                    slots -= 1;
                    round.asked.push((c.volume_id.clone(), target));
                }
                None => {
                    let status = format!(
                        "Failed: no node has room for volume {} ({bytes} bytes) to evacuate node {} ({EVACUATE}); it stays here",
                        c.volume_id, self.node_id
                    );
                    if c.status.as_deref() != Some(status.as_str()) {
                        cluster.report(&c.namespace, &c.claim, &status, true, false)?;
                    }
                    round.no_room.push(c.volume_id.clone());
                }
            }
        }
        Ok(round)
    }
}

/// The node with the most room that fits `bytes` (the first by name among equals).
fn best_fit(room: &BTreeMap<String, u64>, bytes: u64) -> Option<String> {
    room.iter()
        .filter(|(_, free)| **free >= bytes)
        .max_by(|(a, free_a), (b, free_b)| free_a.cmp(free_b).then_with(|| b.cmp(a)))
        .map(|(node, _)| node.clone())
}

#[cfg(test)]
mod tests {
    use super::best_fit;

    #[test]
    fn the_node_with_most_room_that_fits_wins_the_first_by_name_among_equals() {
        let room = [("b", 50u64), ("a", 80), ("c", 80), ("d", 10)]
            .map(|(n, r)| (n.to_owned(), r))
            .into();
        assert_eq!(best_fit(&room, 20).as_deref(), Some("a"));
        assert_eq!(best_fit(&room, 80).as_deref(), Some("a"));
        assert_eq!(best_fit(&room, 81), None);
    }
}
