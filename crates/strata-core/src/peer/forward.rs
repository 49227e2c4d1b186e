//! Calls that only the node holding a volume can carry out, made on whichever node the
//! caller reached (the one leader-elected resizer runs beside any Strata): the owner is
//! found from the id's node hint, or from the cluster (the PV's node affinity), and the
//! call is forwarded to it over the peer service.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Peers;
use crate::block_ranges::{PageSink, RangeQuery};
use crate::error::{Error, Result};
use crate::ids::NodeHint;
use crate::io_limits::LimitChange;
use crate::model::ContentSource;

pub struct Forwarding {
    peers: Arc<dyn Peers>,
    node_id: String,
    hint: NodeHint,
}

impl Forwarding {
    pub fn new(peers: Arc<dyn Peers>, node_id: &str) -> Self {
        Forwarding {
            peers,
            node_id: node_id.to_owned(),
            hint: NodeHint::of(node_id),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node that holds `source`, which this node does not; `None` when no node does.
    /// UNAVAILABLE when a node that may hold it cannot be asked now.
    pub fn holder(&self, source: &ContentSource) -> Result<Option<String>> {
        Ok(super::locate(self.peers.as_ref(), &self.node_id, &self.hint, source)?.map(|(n, _)| n))
    }

    /// The pages of a snapshot metadata answer from `node`, which holds the snapshots.
    pub fn snapshot_ranges(
        &self,
        node: &str,
        query: &RangeQuery,
        sink: &mut PageSink<'_>,
    ) -> Result<()> {
        self.peers.snapshot_ranges(node, query, sink)
    }

    /// The node that holds volume `volume_id`, which this node does not. NOT_FOUND when
    /// no node does; UNAVAILABLE when the node that may hold it cannot be reached now.
    pub fn volume_owner(&self, volume_id: &str, pv_name: Option<&str>) -> Result<String> {
        let not_found =
            |where_: &str| Error::NotFound(format!("volume {volume_id:?} does not exist {where_}"));
        let hint = NodeHint::in_id(volume_id);
        if hint.as_ref() == Some(&self.hint) {
            return Err(not_found("(it was made on this node)"));
        }
        let nodes = self.peers.nodes()?;
        if let Some(hint) = &hint {
            return nodes
                .into_iter()
                .find(|n| *n != self.node_id && NodeHint::of(n) == *hint)
                .ok_or_else(|| {
                    Error::Unavailable(format!(
                        "volume {volume_id} was made on a node (hint {}) that has no reachable peer service now; retry once it is back",
                        hint.as_str()
                    ))
                });
        }
        match self.peers.volume_holder(volume_id, pv_name)? {
            Some(node) if node == self.node_id => Err(not_found("(its PV names this node)")),
            Some(node) if nodes.contains(&node) => Ok(node),
            Some(node) => Err(Error::Unavailable(format!(
                "volume {volume_id} is on node {node}, whose peer service is not reachable (no ready endpoint); retry once it is back"
            ))),
            // Nothing records it (made before hints, outside Kubernetes): every node is asked.
            None => {
                let source = ContentSource::Volume(volume_id.to_owned());
                let mut unreachable = None;
                for node in nodes.into_iter().filter(|n| *n != self.node_id) {
                    match self.peers.lookup(&node, &source) {
                        Ok(Some(_)) => return Ok(node),
                        Ok(None) => {}
                        Err(Error::Unavailable(m)) => {
                            unreachable.get_or_insert(m);
                        }
                        Err(e) => return Err(e),
                    }
                }
                match unreachable {
                    Some(m) => Err(Error::Unavailable(format!(
                        "volume {volume_id} is not on this node, and a node that may hold it cannot be reached ({m}); retry once it is back"
                    ))),
                    None => Err(not_found("on any node")),
                }
            }
        }
    }

    /// ControllerModifyVolume of a volume another node holds: applied there, answered
    /// when it is.
    pub fn modify_volume(
        &self,
        volume_id: &str,
        pv_name: Option<&str>,
        change: &LimitChange,
    ) -> Result<()> {
        let node = self.volume_owner(volume_id, pv_name)?;
        tracing::info!(volume_id, to_node = %node, "forwarding a change of I/O limits to the volume's node");
        let parameters: BTreeMap<String, String> = change.to_parameters();
        self.peers.modify_volume(&node, volume_id, &parameters)
    }
}
