//! The cluster as Kubernetes records it (kube-rs): the peer Service's EndpointSlices (node
//! name and address of every ready Strata), PersistentVolumes (the node a volume is pinned
//! to), VolumeSnapshotContents (the node that took a snapshot) and Nodes (which exist).
//! Every answer is read from the API server when asked, except the EndpointSlices, which a
//! watch keeps in step (a list, then its changes; a read lists while the watch is not in
//! step). Reads only; deploy/ grants exactly these (get and list on the three kinds; get,
//! list and watch on EndpointSlices in Strata's namespace only).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectList};
use strata_core::Error;
use strata_core::peer::Cluster;
use tokio::runtime::Handle;

use crate::kube_api::call;

/// The label the snapshot-controller puts on a VolumeSnapshotContent in distributed
/// snapshotting: the node whose snapshotter takes it.
pub const MANAGED_BY_LABEL: &str = "snapshot.storage.kubernetes.io/managed-by";

/// The port of the peer Service that carries the peer service.
pub const PEER_PORT_NAME: &str = "peer";

/// Objects listed per page.
const PAGE: u32 = 250;

pub struct KubeCluster {
    client: Client,
    namespace: String,
    service: String,
    driver: String,
    topology_key: String,
    runtime: Handle,
    /// The peer Service's EndpointSlices as a watch keeps them, while it is in step with
    /// the API server ([`KubeCluster::watch_endpoints`]); otherwise each read lists them.
    slices: Arc<SliceView>,
}

/// The EndpointSlices a watch has seen, by name; `None` while it is not in step (not
/// started, or relisting after an error), when reads go to the API server.
#[derive(Default)]
struct SliceView {
    slices: Mutex<Option<BTreeMap<String, EndpointSlice>>>,
}

impl SliceView {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<BTreeMap<String, EndpointSlice>>> {
        self.slices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoints, when in step.
    fn endpoints(&self) -> Option<BTreeMap<String, String>> {
        Some(peer_addresses(self.lock().as_ref()?.values()))
    }
}

/// How long a watch request lasts before it is made again (the API server ends it by then).
const WATCH_SECONDS: u32 = 290;

impl KubeCluster {
    /// A client from the pod's service account (or KUBECONFIG outside a cluster).
    pub async fn connect(
        namespace: &str,
        service: &str,
        driver: &str,
        topology_key: &str,
    ) -> Result<Self, String> {
        let client = Client::try_default()
            .await
            .map_err(|e| format!("--peer-service: cannot reach the Kubernetes API server: {e}"))?;
        Ok(Self::with_client(
            client,
            namespace,
            service,
            driver,
            topology_key,
        ))
    }

    pub fn with_client(
        client: Client,
        namespace: &str,
        service: &str,
        driver: &str,
        topology_key: &str,
    ) -> Self {
        KubeCluster {
            client,
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            driver: driver.to_owned(),
            topology_key: topology_key.to_owned(),
            runtime: Handle::current(),
            slices: Arc::default(),
        }
    }

    /// Keeps the peer Service's EndpointSlices by a watch (a list, then the changes from
    /// its resourceVersion), so that finding a node's address reads no list; an error drops
    /// the view (reads list again) until the next list succeeds, a second later.
    pub fn watch_endpoints(&self) -> tokio::task::JoinHandle<()> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("kubernetes.io/service-name={}", self.service);
        let view = self.slices.clone();
        self.runtime.spawn(async move {
            loop {
                if let Err(e) = follow(&api, &selector, &view).await {
                    tracing::warn!(error = %e, "the EndpointSlice watch stopped; reads list until it is back");
                }
                *view.lock() = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    /// The endpoints as the watch has them; `None` while it is not in step.
    pub fn watched_endpoints(&self) -> Option<BTreeMap<String, String>> {
        self.slices.endpoints()
    }

    /// Every object of `api` matching `params`, page by page.
    pub(crate) async fn list_all<K>(
        api: &Api<K>,
        params: ListParams,
        what: &str,
    ) -> Result<Vec<K>, Error>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut all = vec![];
        let mut params = params.limit(PAGE);
        loop {
            let page: ObjectList<K> = call(what, api.list(&params)).await?;
            all.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(all),
            }
        }
    }

    /// The endpoints of the peer Service, as `node → HOST:PORT`: from the watch when it is
    /// in step, else listed.
    pub async fn endpoints(&self) -> Result<BTreeMap<String, String>, Error> {
        if let Some(endpoints) = self.slices.endpoints() {
            return Ok(endpoints);
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("kubernetes.io/service-name={}", self.service);
        let slices = Self::list_all(
            &api,
            ListParams::default().labels(&selector),
            "list EndpointSlices",
        )
        .await?;
        Ok(peer_addresses(&slices))
    }

    /// The volume handle of `pv`, if it is this driver's.
    fn handle<'a>(&self, pv: &'a PersistentVolume) -> Option<&'a str> {
        driver_handle(pv, &self.driver)
    }

    pub async fn pv_node(&self, volume_id: &str) -> Result<Option<String>, Error> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let pvs = Self::list_all(&api, ListParams::default(), "list PersistentVolumes").await?;
        Ok(pvs
            .iter()
            .find(|pv| self.handle(pv) == Some(volume_id))
            .and_then(|pv| pinned_node(pv, &self.topology_key)))
    }

    /// The node of PV `pv_name`, if it is this driver's PV of `volume_id`.
    pub async fn named_pv_node(
        &self,
        pv_name: &str,
        volume_id: &str,
    ) -> Result<Option<String>, Error> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let pv = call("get PersistentVolume", api.get_opt(pv_name)).await?;
        let ours = pv
            .as_ref()
            .is_some_and(|pv| self.handle(pv) == Some(volume_id));
        match pv {
            Some(pv) if ours => Ok(pinned_node(&pv, &self.topology_key)),
            // Not this volume's PV (renamed, or the parameter is wrong): by handle.
            _ => self.pv_node(volume_id).await,
        }
    }

    /// The names of every Node object.
    pub async fn nodes(&self) -> Result<Vec<String>, Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let nodes = Self::list_all(&api, ListParams::default(), "list Nodes").await?;
        Ok(nodes.into_iter().filter_map(|n| n.metadata.name).collect())
    }

    pub async fn content_node(&self, snapshot_id: &str) -> Result<Option<String>, Error> {
        let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent");
        let resource = ApiResource::from_gvk(&gvk);
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let contents =
            Self::list_all(&api, ListParams::default(), "list VolumeSnapshotContents").await?;
        Ok(contents
            .iter()
            .find(|c| {
                c.data["spec"]["driver"].as_str() == Some(&self.driver)
                    && c.data["status"]["snapshotHandle"].as_str() == Some(snapshot_id)
            })
            .and_then(|c| c.metadata.labels.as_ref()?.get(MANAGED_BY_LABEL).cloned()))
    }
}

/// Lists the slices into `view`, then applies the watch's changes until the watch fails
/// (a resourceVersion too old included: the caller lists again).
async fn follow(api: &Api<EndpointSlice>, selector: &str, view: &SliceView) -> Result<(), String> {
    use kube::api::{WatchEvent, WatchParams};
    use tokio_stream::StreamExt;
    let list = call(
        "list EndpointSlices",
        api.list(&ListParams::default().labels(selector)),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut version = list.metadata.resource_version.unwrap_or_default();
    let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
    *view.lock() = Some(list.items.into_iter().map(|s| (name(&s), s)).collect());
    loop {
        let params = WatchParams::default()
            .labels(selector)
            .timeout(WATCH_SECONDS);
        let stream = api
            .watch(&params, &version)
            .await
            .map_err(|e| format!("watch EndpointSlices: {e}"))?;
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let event = event.map_err(|e| format!("watch EndpointSlices: {e}"))?;
            let mut slices = view.lock();
            let slices = slices.as_mut().ok_or("the view was dropped")?;
            let changed = match event {
                WatchEvent::Added(s) | WatchEvent::Modified(s) => {
                    let v = s.metadata.resource_version.clone();
                    slices.insert(name(&s), s);
                    v
                }
                WatchEvent::Deleted(s) => {
                    slices.remove(&name(&s));
                    s.metadata.resource_version
                }
                WatchEvent::Bookmark(b) => Some(b.metadata.resource_version),
                WatchEvent::Error(e) => return Err(format!("watch EndpointSlices: {}", e.message)),
            };
            if let Some(v) = changed {
                version = v;
            }
        }
    }
}

/// The volume handle of `pv`, if it is a PV of `driver`.
pub fn driver_handle<'a>(pv: &'a PersistentVolume, driver: &str) -> Option<&'a str> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == driver).then_some(csi.volume_handle.as_str())
}

/// The ready endpoints of the peer port, by node (the first address of each).
pub fn peer_addresses<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for slice in slices {
        let port = slice.ports.iter().flatten().find_map(|p| {
            (p.name.as_deref() == Some(PEER_PORT_NAME))
                .then_some(p.port)
                .flatten()
        });
        let Some(port) = port else { continue };
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let (Some(node), Some(address), true) = (&e.node_name, e.addresses.first(), ready)
            else {
                continue;
            };
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            out.insert(node.clone(), format!("{host}:{port}"));
        }
    }
    out
}

/// The node a PV's required node affinity names under `topology_key`.
pub fn pinned_node(pv: &PersistentVolume, topology_key: &str) -> Option<String> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|term| {
        term.match_expressions.iter().flatten().find_map(|e| {
            (e.key == topology_key && e.operator == "In")
                .then(|| e.values.as_ref()?.first().cloned())
                .flatten()
        })
    })
}

impl Cluster for KubeCluster {
    fn peer_endpoints(&self) -> Result<BTreeMap<String, String>, Error> {
        self.runtime.block_on(self.endpoints())
    }

    fn volume_node(&self, volume_id: &str) -> Result<Option<String>, Error> {
        self.runtime.block_on(self.pv_node(volume_id))
    }

    fn named_volume_node(&self, pv_name: &str, volume_id: &str) -> Result<Option<String>, Error> {
        self.runtime
            .block_on(self.named_pv_node(pv_name, volume_id))
    }

    fn snapshot_node(&self, snapshot_id: &str) -> Result<Option<String>, Error> {
        self.runtime.block_on(self.content_node(snapshot_id))
    }

    fn node_names(&self) -> Result<Option<Vec<String>>, Error> {
        self.runtime.block_on(self.nodes()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_node_affinity_are_read_as_kubernetes_writes_them() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "addressType": "IPv4",
            "metadata": {"name": "strata-peer-abc"},
            "ports": [{"name": "metrics", "port": 9808}, {"name": "peer", "port": 9820}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "node-a", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "nodeName": "node-b", "conditions": {"ready": false}},
                {"addresses": ["fd00::3"], "nodeName": "node-c"},
                {"addresses": ["10.0.0.4"]}
            ]
        }))
        .unwrap();
        let got = peer_addresses(&[slice]);
        assert_eq!(got.get("node-a").map(String::as_str), Some("10.0.0.1:9820"));
        assert_eq!(
            got.get("node-c").map(String::as_str),
            Some("[fd00::3]:9820")
        );
        assert_eq!(got.len(), 2, "{got:?}");
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-1"},
            "spec": {
                "csi": {"driver": "strata.csi.dev", "volumeHandle": "vol-1"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "other", "operator": "In", "values": ["x"]},
                    {"key": "strata.csi.dev/node", "operator": "In", "values": ["node-a"]}
                ]}]}}
            }
        }))
        .unwrap();
        assert_eq!(
            pinned_node(&pv, "strata.csi.dev/node").as_deref(),
            Some("node-a")
        );
        assert_eq!(pinned_node(&pv, "missing"), None);
    }
}
