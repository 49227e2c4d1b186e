//! [`MoveCluster`] on kube-rs: the claims asking for a move (their `strata.csi.dev/move-to`),
//! a Node asking to be evacuated, the room on other nodes (this driver's
//! CSIStorageCapacities, on schedulable Nodes), where a volume's PV is pinned, the commit (the PV's node affinity patched under its
//! resourceVersion; KEP-5381, gate `MutablePVNodeAffinity`), and the progress written into
//! the claim and as events. Everything is read from the API server when asked. deploy/
//! grants exactly what is used here (`strata-moves`).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use strata_core::Error;
use strata_core::moves::{
    EVACUATE, MOVE_STATUS, MOVE_TO, MoveCluster, MoveIntent, PinnedClaim, VolumePlacement,
};
use tokio::runtime::Handle;

use crate::kube_api::{EventText, call, claim_reference, create_event, failed};
use crate::kube_cluster::{KubeCluster, driver_handle, pinned_node};

pub struct KubeMoves {
    client: Client,
    driver: String,
    topology_key: String,
    runtime: Handle,
}

/// An annotation of an object.
fn annotation(meta: &kube::api::ObjectMeta, key: &str) -> Option<String> {
    meta.annotations.as_ref()?.get(key).cloned()
}

impl KubeMoves {
    pub fn new(client: Client, driver: &str, topology_key: &str) -> Self {
        KubeMoves {
            client,
            driver: driver.to_owned(),
            topology_key: topology_key.to_owned(),
            runtime: Handle::current(),
        }
    }

    /// The volume handle of a PV of this driver.
    fn handle(&self, pv: &PersistentVolume) -> Option<String> {
        driver_handle(pv, &self.driver).map(str::to_owned)
    }

    async fn list_intents(&self, target: &str) -> Result<Vec<MoveIntent>, Error> {
        let claims: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let claims = KubeCluster::list_all(
            &claims,
            ListParams::default(),
            "list PersistentVolumeClaims",
        )
        .await?;
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mut out = vec![];
        for claim in claims {
            if annotation(&claim.metadata, MOVE_TO).as_deref() != Some(target) {
                continue;
            }
            let Some(pv_name) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
                continue;
            };
            let Some(pv) = call("get PersistentVolume", pvs.get_opt(&pv_name)).await? else {
                continue;
            };
            let Some(volume_id) = self.handle(&pv) else {
                continue;
            };
            out.push(MoveIntent {
                namespace: claim.metadata.namespace.clone().unwrap_or_default(),
                claim: claim.metadata.name.clone().unwrap_or_default(),
                pv: pv_name,
                volume_id,
                pv_node: pinned_node(&pv, &self.topology_key),
                resource_version: pv.metadata.resource_version.clone().unwrap_or_default(),
                target: target.to_owned(),
                status: annotation(&claim.metadata, MOVE_STATUS),
            });
        }
        Ok(out)
    }

    async fn node_evacuating(&self, node: &str) -> Result<bool, Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        Ok(call("get Node", api.get_opt(node))
            .await?
            .is_some_and(|n| annotation(&n.metadata, EVACUATE).as_deref() == Some("true")))
    }

    async fn pinned_claims(&self, node: &str) -> Result<Vec<PinnedClaim>, Error> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let pvs =
            KubeCluster::list_all(&pvs, ListParams::default(), "list PersistentVolumes").await?;
        let mut out = vec![];
        for pv in pvs {
            let Some(volume_id) = self.handle(&pv) else {
                continue;
            };
            if pinned_node(&pv, &self.topology_key).as_deref() != Some(node) {
                continue;
            }
            let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.clone());
            let Some((namespace, name)) = claim.and_then(|c| Some((c.namespace?, c.name?))) else {
                continue;
            };
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &namespace);
            let Some(claim) = call("get PersistentVolumeClaim", api.get_opt(&name)).await? else {
                continue;
            };
            out.push(PinnedClaim {
                move_to: annotation(&claim.metadata, MOVE_TO),
                status: annotation(&claim.metadata, MOVE_STATUS),
                namespace,
                claim: name,
                volume_id,
            });
        }
        Ok(out)
    }

    async fn free_room(&self) -> Result<BTreeMap<String, u64>, Error> {
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let classes: BTreeSet<String> =
            KubeCluster::list_all(&classes, ListParams::default(), "list StorageClasses")
                .await?
                .into_iter()
                .filter(|c| c.provisioner == self.driver)
                .filter_map(|c| c.metadata.name)
                .collect();
        let api: Api<CSIStorageCapacity> = Api::all(self.client.clone());
        let capacities =
            KubeCluster::list_all(&api, ListParams::default(), "list CSIStorageCapacities").await?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let usable: BTreeSet<String> =
            KubeCluster::list_all(&nodes, ListParams::default(), "list Nodes")
                .await?
                .into_iter()
                .filter(|n| {
                    !n.spec
                        .as_ref()
                        .and_then(|s| s.unschedulable)
                        .unwrap_or(false)
                        && annotation(&n.metadata, EVACUATE).as_deref() != Some("true")
                })
                .filter_map(|n| n.metadata.name)
                .collect();
        let mut room = BTreeMap::new();
        for c in capacities {
            if !classes.contains(&c.storage_class_name) {
                continue;
            }
            let node = c
                .node_topology
                .as_ref()
                .and_then(|t| t.match_labels.as_ref())
                .and_then(|l| l.get(&self.topology_key));
            let (Some(node), Some(bytes)) =
                (node, c.capacity.as_ref().and_then(|q| parse_quantity(&q.0)))
            else {
                continue;
            };
            if usable.contains(node) {
                // Every class of the driver draws from the node's one pool.
                let free = room.entry(node.clone()).or_insert(0u64);
                *free = (*free).max(bytes);
            }
        }
        Ok(room)
    }

    async fn find_placement(&self, volume_id: &str) -> Result<Option<VolumePlacement>, Error> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let pvs =
            KubeCluster::list_all(&pvs, ListParams::default(), "list PersistentVolumes").await?;
        let Some(pv) = pvs
            .into_iter()
            .find(|pv| self.handle(pv).as_deref() == Some(volume_id))
        else {
            return Ok(None);
        };
        let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.clone());
        let move_to = match claim.and_then(|c| Some((c.namespace?, c.name?))) {
            Some((namespace, name)) => {
                let api: Api<PersistentVolumeClaim> =
                    Api::namespaced(self.client.clone(), &namespace);
                call("get PersistentVolumeClaim", api.get_opt(&name))
                    .await?
                    .and_then(|c| annotation(&c.metadata, MOVE_TO))
            }
            None => None,
        };
        Ok(Some(VolumePlacement {
            pv_node: pinned_node(&pv, &self.topology_key),
            move_to,
        }))
    }

    /// Patches PV `pv`'s node affinity to `node` (a dry run when `dry_run`), under
    /// `resource_version` when given.
    async fn patch_affinity(
        &self,
        pv: &str,
        node: &str,
        resource_version: Option<&str>,
        dry_run: bool,
    ) -> Result<(), Error> {
        let mut patch = serde_json::json!({"spec": {"nodeAffinity": {"required": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": self.topology_key,
                "operator": "In",
                "values": [node],
            }]}]
        }}}});
        if let Some(rv) = resource_version {
            patch["metadata"] = serde_json::json!({"resourceVersion": rv});
        }
        let params = PatchParams {
            dry_run,
            ..PatchParams::default()
        };
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let what = "patch PersistentVolume node affinity";
        let patched = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            api.patch(pv, &params, &Patch::Merge(&patch)),
        )
        .await
        .map_err(|_| failed(what, "timed out"))?;
        match patched {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Aborted(format!(
                "PV {pv} changed since it was read; retried with its new version"
            ))),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Err(Error::NotFound(format!("PV {pv} does not exist")))
            }
            Err(kube::Error::Api(s)) if s.code == 422 => {
                let said: String = s.message.chars().take(300).collect();
                Err(Error::FailedPrecondition(format!(
                    "the API server refuses to change PV {pv}'s node affinity ({said}): enable the feature gate MutablePVNodeAffinity (Kubernetes 1.35 or later) on the API server, or snapshot the volume and restore it into a new claim on the target (docs/operations.md)"
                )))
            }
            Err(e) => Err(failed(what, e)),
        }
    }

    /// Writes `status` into the claim (and, when `done`, removes its intent).
    async fn write_status(
        &self,
        namespace: &str,
        claim: &str,
        status: &str,
        done: bool,
    ) -> Result<(), Error> {
        let mut annotations = serde_json::Map::new();
        annotations.insert(MOVE_STATUS.to_owned(), status.into());
        if done {
            annotations.insert(MOVE_TO.to_owned(), serde_json::Value::Null);
        }
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        call(
            "annotate PersistentVolumeClaim",
            api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(drop)
    }

    async fn write_report(
        &self,
        namespace: &str,
        claim: &str,
        status: &str,
        warning: bool,
        done: bool,
    ) -> Result<(), Error> {
        self.write_status(namespace, claim, status, done).await?;
        let reason = match (done, status.split([':', ' ']).next()) {
            (true, _) => "VolumeMoved".to_owned(),
            (false, Some(word)) if !word.is_empty() => format!("Move{word}"),
            _ => "Move".to_owned(),
        };
        let text = EventText {
            prefix: "strata-move-",
            reason: &reason,
            message: status,
            warning,
        };
        create_event(
            &self.client,
            &self.driver,
            namespace,
            claim_reference(namespace, claim),
            text,
        )
        .await
    }
}

impl MoveCluster for KubeMoves {
    fn intents(&self, target: &str) -> Result<Vec<MoveIntent>, Error> {
        self.runtime.block_on(self.list_intents(target))
    }

    fn placement(&self, volume_id: &str) -> Result<Option<VolumePlacement>, Error> {
        self.runtime.block_on(self.find_placement(volume_id))
    }

    fn check_repin(&self, pv: &str, node: &str) -> Result<(), Error> {
        self.runtime
            .block_on(self.patch_affinity(pv, node, None, true))
    }

    fn repin(&self, pv: &str, resource_version: &str, node: &str) -> Result<(), Error> {
        self.runtime
            .block_on(self.patch_affinity(pv, node, Some(resource_version), false))
    }

    fn report(
        &self,
        namespace: &str,
        claim: &str,
        status: &str,
        warning: bool,
        done: bool,
    ) -> Result<(), Error> {
        self.runtime
            .block_on(self.write_report(namespace, claim, status, warning, done))
    }

    fn progress(&self, namespace: &str, claim: &str, status: &str) -> Result<(), Error> {
        self.runtime
            .block_on(self.write_status(namespace, claim, status, false))
    }

    fn evacuating(&self, node: &str) -> Result<bool, Error> {
        self.runtime.block_on(self.node_evacuating(node))
    }

    fn claims_on(&self, node: &str) -> Result<Vec<PinnedClaim>, Error> {
        self.runtime.block_on(self.pinned_claims(node))
    }

    fn room(&self) -> Result<BTreeMap<String, u64>, Error> {
        self.runtime.block_on(self.free_room())
    }

    fn ask_move(&self, namespace: &str, claim: &str, target: &str) -> Result<(), Error> {
        self.runtime
            .block_on(annotate_move(&self.client, namespace, claim, Some(target)))
    }
}

/// Sets (or removes) a claim's [`MOVE_TO`].
async fn annotate_move(
    client: &Client,
    namespace: &str,
    claim: &str,
    to: Option<&str>,
) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut annotations = serde_json::Map::new();
    annotations.insert(MOVE_TO.to_owned(), to.into());
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    call(
        "annotate PersistentVolumeClaim",
        api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await
    .map(drop)
}

/// A Kubernetes quantity of bytes (`1073741824`, `10Gi`, `500M`), as storage capacity
/// objects carry it; `None` for a form a byte count does not take (fractions, exponents,
/// milli) or past what a u64 holds.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let digits = q.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let (number, suffix) = q.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "P" => 1000u64.pow(5),
        "E" => 1000u64.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// `strata volume move`: sets (or, with `to` unset, removes) a claim's
/// `strata.csi.dev/move-to`, with the caller's kubeconfig.
pub async fn ask_move(namespace: &str, claim: &str, to: Option<&str>) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API server (KUBECONFIG): {e}"))?;
    annotate_move(&client, namespace, claim, to)
        .await
        .map_err(|e| format!("claim {namespace}/{claim}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn quantities_of_bytes_are_read_and_other_forms_refused() {
        assert_eq!(parse_quantity("1073741824"), Some(1 << 30));
        assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("3k"), Some(3000));
        for bad in [
            "",
            "Gi",
            "1.5Gi",
            "1e9",
            "100m",
            "-1",
            "20Ei",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }
}
