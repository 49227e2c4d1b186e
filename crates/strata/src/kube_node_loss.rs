//! [`NodeLossCluster`] on kube-rs: the Node finalizer, the Lease, and what a lost node
//! leaves behind (its PVs, their claims, its VolumeSnapshotContents), with events. Every
//! answer is read from the API server when asked; writes of lists (finalizers) carry the
//! object's resourceVersion, so a concurrent change is a conflict retried next round, never
//! a lost write. deploy/ grants exactly what is used here (`strata-node-loss`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, Preconditions,
};
use strata_core::Error;
use strata_core::node_loss::{
    FINALIZER, LEASE, ManagedContent, NodeLossCluster, OnNodeLoss, PinnedVolume, Subject,
};
use tokio::runtime::Handle;

use crate::kube_api::{EventText, call, claim_reference, create_event, failed, not_found};
use crate::kube_cluster::{MANAGED_BY_LABEL, driver_handle, pinned_node};

pub struct KubeNodeLoss {
    client: Client,
    namespace: String,
    driver: String,
    topology_key: String,
    runtime: Handle,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl KubeNodeLoss {
    pub fn new(client: Client, namespace: &str, driver: &str, topology_key: &str) -> Self {
        KubeNodeLoss {
            client,
            namespace: namespace.to_owned(),
            driver: driver.to_owned(),
            topology_key: topology_key.to_owned(),
            runtime: Handle::current(),
        }
    }

    fn contents_api(&self) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent");
        Api::all_with(self.client.clone(), &ApiResource::from_gvk(&gvk))
    }

    /// Sets Node `node`'s finalizers to `change(current)`, guarded by its resourceVersion.
    async fn node_finalizers(
        &self,
        node: &str,
        change: impl Fn(&mut Vec<String>),
    ) -> Result<(), Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let Some(n) = call("get Node", api.get_opt(node)).await? else {
            return Ok(());
        };
        let mut finalizers = n.metadata.finalizers.clone().unwrap_or_default();
        let before = finalizers.clone();
        change(&mut finalizers);
        if finalizers == before {
            return Ok(());
        }
        let patch = serde_json::json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": n.metadata.resource_version,
        }});
        call(
            "patch Node finalizers",
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(drop)
    }

    async fn lease(&self, holder: &str, duration: Duration) -> Result<bool, Error> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let spec = |transitions: i32| LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(duration.as_secs() as i32),
            acquire_time: Some(now_micro()),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(mut lease) = call("get Lease", api.get_opt(LEASE)).await? else {
            let new = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE.to_owned()),
                    ..Default::default()
                },
                spec: Some(spec(0)),
            };
            // Two creating at once: one wins, the other is told it exists.
            return Ok(api.create(&PostParams::default(), &new).await.is_ok());
        };
        let current = lease.spec.clone().unwrap_or_default();
        let mine = current.holder_identity.as_deref() == Some(holder);
        let expired = match (current.renew_time.as_ref(), current.lease_duration_seconds) {
            // A time past what can be represented is one that never expires.
            (Some(renewed), Some(secs)) => renewed
                .0
                .checked_add(Duration::from_secs(secs.max(0) as u64))
                .is_ok_and(|until| until < Timestamp::now()),
            _ => true,
        };
        if !mine && !expired {
            return Ok(false);
        }
        let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let mut next = spec(transitions);
        if mine {
            next.acquire_time = current.acquire_time;
        }
        lease.spec = Some(next);
        // Replaced under its resourceVersion: of two janitors taking an expired Lease at
        // once, one is refused (409) and stays a follower.
        Ok(api
            .replace(LEASE, &PostParams::default(), &lease)
            .await
            .is_ok())
    }

    async fn pinned(&self, node: &str) -> Result<Vec<PinnedVolume>, Error> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let pvs = call("list PersistentVolumes", api.list(&ListParams::default())).await?;
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let mut policies: BTreeMap<String, OnNodeLoss> = BTreeMap::new();
        let mut out = vec![];
        for pv in pvs.items {
            let ours = driver_handle(&pv, &self.driver).is_some();
            if !ours || pinned_node(&pv, &self.topology_key).as_deref() != Some(node) {
                continue;
            }
            let spec = pv.spec.clone().unwrap_or_default();
            let policy = match spec.storage_class_name.as_deref() {
                None | Some("") => OnNodeLoss::Retain,
                Some(class) => match policies.get(class) {
                    Some(p) => *p,
                    None => {
                        let sc = call("get StorageClass", classes.get_opt(class)).await?;
                        // A class that is gone or says something else: keep (Retain).
                        let p = sc
                            .and_then(|sc| sc.parameters)
                            .map(|p| p.into_iter().collect::<BTreeMap<_, _>>())
                            .and_then(|p| OnNodeLoss::from_parameters(&p).ok())
                            .unwrap_or_default();
                        policies.insert(class.to_owned(), p);
                        p
                    }
                },
            };
            out.push(PinnedVolume {
                pv: pv.metadata.name.clone().unwrap_or_default(),
                claim_uid: spec.claim_ref.as_ref().and_then(|c| c.uid.clone()),
                claim: spec.claim_ref.and_then(|c| Some((c.namespace?, c.name?))),
                policy,
                deleting: pv.metadata.deletion_timestamp.is_some(),
            });
        }
        Ok(out)
    }

    async fn contents(&self, node: &str) -> Result<Vec<ManagedContent>, Error> {
        let api = self.contents_api();
        let selector = format!("{MANAGED_BY_LABEL}={node}");
        let list = call(
            "list VolumeSnapshotContents",
            api.list(&ListParams::default().labels(&selector)),
        )
        .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|c| c.data["spec"]["driver"].as_str() == Some(&self.driver))
            .map(|c| ManagedContent {
                deleting: c.metadata.deletion_timestamp.is_some(),
                name: c.metadata.name.unwrap_or_default(),
            })
            .collect())
    }

    async fn drop_finalizers_and_delete_pv(&self, pv: &str) -> Result<(), Error> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        let patched = api
            .patch(pv, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        if not_found(&patched) {
            return Ok(());
        }
        patched.map_err(|e| failed("patch PersistentVolume finalizers", e))?;
        let deleted = api.delete(pv, &DeleteParams::default()).await;
        if not_found(&deleted) {
            return Ok(());
        }
        deleted
            .map(drop)
            .map_err(|e| failed("delete PersistentVolume", e))
    }

    async fn record_event(
        &self,
        subject: &Subject,
        reason: &str,
        message: &str,
    ) -> Result<(), Error> {
        let (namespace, object) = match subject {
            Subject::Node(name) => (
                "default".to_owned(),
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(name.clone()),
                    // The kubelet's convention: a Node's events name it as their uid.
                    uid: Some(name.clone()),
                    ..Default::default()
                },
            ),
            Subject::Claim { namespace, name } => {
                (namespace.clone(), claim_reference(namespace, name))
            }
        };
        let event = EventText {
            prefix: "strata-node-loss-",
            reason,
            message,
            warning: true,
        };
        create_event(&self.client, &self.driver, &namespace, object, event).await
    }
}

impl NodeLossCluster for KubeNodeLoss {
    fn protect_node(&self, node: &str) -> Result<(), Error> {
        self.runtime.block_on(self.node_finalizers(node, |f| {
            if !f.iter().any(|x| x == FINALIZER) {
                f.push(FINALIZER.to_owned());
            }
        }))
    }

    fn deleted_nodes(&self) -> Result<Vec<String>, Error> {
        self.runtime.block_on(async {
            let api: Api<Node> = Api::all(self.client.clone());
            let nodes = call("list Nodes", api.list(&ListParams::default())).await?;
            Ok(nodes
                .items
                .into_iter()
                .filter(|n| {
                    n.metadata.deletion_timestamp.is_some()
                        && n.metadata
                            .finalizers
                            .as_ref()
                            .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
                })
                .filter_map(|n| n.metadata.name)
                .collect())
        })
    }

    fn hold_lease(&self, holder: &str, duration: Duration) -> Result<bool, Error> {
        self.runtime.block_on(self.lease(holder, duration))
    }

    fn volumes_on(&self, node: &str) -> Result<Vec<PinnedVolume>, Error> {
        self.runtime.block_on(self.pinned(node))
    }

    fn delete_claim(&self, namespace: &str, name: &str, uid: Option<&str>) -> Result<bool, Error> {
        self.runtime.block_on(async {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
            // Only the claim the PV was bound to: a new claim its owner made under the same
            // name fails the uid precondition (409) and stays.
            let params = DeleteParams {
                preconditions: uid.map(|uid| Preconditions {
                    uid: Some(uid.to_owned()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
                Err(e) => Err(failed("delete PersistentVolumeClaim", e)),
            }
        })
    }

    fn release_volume(&self, pv: &str) -> Result<(), Error> {
        self.runtime
            .block_on(self.drop_finalizers_and_delete_pv(pv))
    }

    fn contents_of(&self, node: &str) -> Result<Vec<ManagedContent>, Error> {
        self.runtime.block_on(self.contents(node))
    }

    fn release_content(&self, name: &str) -> Result<(), Error> {
        self.runtime.block_on(async {
            let patch = serde_json::json!({"metadata": {"finalizers": null}});
            let patched = self
                .contents_api()
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            if not_found(&patched) {
                return Ok(());
            }
            patched
                .map(drop)
                .map_err(|e| failed("patch VolumeSnapshotContent finalizers", e))
        })
    }

    fn release_node(&self, node: &str) -> Result<(), Error> {
        self.runtime
            .block_on(self.node_finalizers(node, |f| f.retain(|x| x != FINALIZER)))
    }

    fn event(&self, subject: &Subject, reason: &str, message: &str) -> Result<(), Error> {
        self.runtime
            .block_on(self.record_event(subject, reason, message))
    }
}

/// `strata node-loss release-finalizers`: removes Strata's finalizer from every Node (or the
/// one named), as an uninstall must, with the caller's kubeconfig. Other finalizers stay.
pub async fn release_finalizers(node: Option<&str>) -> Result<Vec<String>, String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API server (KUBECONFIG): {e}"))?;
    let api: Api<Node> = Api::all(client.clone());
    let nodes = call("list Nodes", api.list(&ListParams::default()))
        .await
        .map_err(|e| e.to_string())?;
    let cluster = KubeNodeLoss::new(client, "", "", "");
    let mut released = vec![];
    for n in nodes.items {
        let name = n.metadata.name.clone().unwrap_or_default();
        let ours = n
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|x| x == FINALIZER));
        if !ours || node.is_some_and(|want| want != name) {
            continue;
        }
        cluster
            .node_finalizers(&name, |f| f.retain(|x| x != FINALIZER))
            .await
            .map_err(|e| format!("node {name}: {e}"))?;
        released.push(name);
    }
    Ok(released)
}
