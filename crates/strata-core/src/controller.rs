//! Controller operations: provisioning, listing and capacity. Pure domain logic; the gRPC
//! layer converts requests into these types and the results back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::Backend;
use crate::capability::Capabilities;
use crate::encryption::{self, Passphrase, Secrets, WrappedKey};
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::filesystem::Filesystem;
use crate::freezer::Freezer;
use crate::ids::{NodeHint, is_volume_id, new_volume_id};
use crate::inflight::InFlight;
use crate::io_limits::{IoLimiter, LimitChange, PV_NAME_KEY};
use crate::model::{
    AccessType, Capability, CapacityRange, ContentSource, FormatState, MIB, Topology, VolumeRecord,
    volume_record_version,
};
use crate::peer::{CopyInto, Forwarding, RemoteCopies};
use crate::reaper::Reaper;
use crate::snapshot::Snapshots;
use crate::validate;
use crate::volumes::Volumes;

/// The StorageClass parameters Strata understands (documented in docs/configuration.md).
pub const STORAGE_CLASS_PARAMETERS: &[&str] = &[
    "csi.storage.k8s.io/fstype",
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
];

#[derive(Debug, Clone, Default)]
pub struct CreateVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    /// Topologies the volume must be reachable from (any one of them).
    pub requisite: Vec<Topology>,
    /// A snapshot or volume whose data the new volume starts with.
    pub content_source: Option<ContentSource>,
    /// The volume's I/O limits ([`crate::io_limits`]).
    pub mutable_parameters: BTreeMap<String, String>,
    /// The provisioner's secrets: `encryptionKey` for an encrypted volume.
    pub secrets: Secrets,
}

/// A volume with its health, for Get and List.
#[derive(Debug, Clone)]
pub struct VolumeStatus {
    pub record: VolumeRecord,
    /// Why the volume is unhealthy; `None` when it is fine.
    pub abnormal: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub available_bytes: u64,
    pub maximum_volume_bytes: u64,
    pub minimum_volume_bytes: u64,
}

/// Where this node's volumes are reachable from: the topology segment that names it.
#[derive(Debug, Clone)]
pub struct NodeTopology {
    pub key: String,
    pub node_id: String,
}

impl NodeTopology {
    /// The topology of every volume: this node.
    pub fn topology(&self) -> Topology {
        [(self.key.clone(), self.node_id.clone())].into()
    }

    /// Whether `t` names this node.
    pub(crate) fn is_this_node(&self, t: &Topology) -> bool {
        t.get(&self.key) == Some(&self.node_id)
    }
}

/// Where a new volume's data comes from.
enum Origin {
    Empty,
    /// A snapshot or volume of this node, pinned while it is copied.
    Local {
        dir: std::path::PathBuf,
        size: u64,
        format: FormatState,
        encryption: Option<WrappedKey>,
        _guard: crate::inflight::Guard,
    },
    /// A snapshot or volume another node holds.
    Remote {
        node: String,
        info: crate::peer::SourceInfo,
        remote: Arc<RemoteCopies>,
    },
}

/// The controller service's work: CreateVolume (empty, restored, cloned), DeleteVolume,
/// ControllerExpandVolume, ValidateVolumeCapabilities, ControllerGetVolume, ListVolumes,
/// GetCapacity.
pub struct Controller {
    volumes: Arc<Volumes>,
    snapshots: Arc<Snapshots>,
    capabilities: Arc<Capabilities>,
    freezer: Arc<Freezer>,
    backend: Arc<dyn Backend>,
    reaper: Arc<Reaper>,
    inflight: Arc<InFlight>,
    topology: NodeTopology,
    /// The node hint new volume ids carry.
    ids: NodeHint,
    /// Copies from other nodes (when the peer service is configured).
    remote: Option<Arc<RemoteCopies>>,
    /// The volumes' I/O limits.
    limits: Arc<IoLimiter>,
    /// Calls forwarded to the node holding a volume (when the peer service is configured).
    forwarding: Option<Arc<Forwarding>>,
    crash: FaultPoints,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        volumes: Arc<Volumes>,
        snapshots: Arc<Snapshots>,
        capabilities: Arc<Capabilities>,
        freezer: Arc<Freezer>,
        backend: Arc<dyn Backend>,
        reaper: Arc<Reaper>,
        inflight: Arc<InFlight>,
        topology: NodeTopology,
        remote: Option<Arc<RemoteCopies>>,
        limits: Arc<IoLimiter>,
        forwarding: Option<Arc<Forwarding>>,
        crash: FaultPoints,
    ) -> Self {
        Controller {
            volumes,
            snapshots,
            capabilities,
            freezer,
            backend,
            reaper,
            inflight,
            ids: NodeHint::of(&topology.node_id),
            topology,
            remote,
            limits,
            forwarding,
            crash,
        }
    }

    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord> {
        let name = validate::required_str("name", &req.name)?;
        if req.capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        for cap in &req.capabilities {
            self.capabilities.check_capability(cap)?;
        }
        self.capabilities.check_parameters(&req.parameters)?;
        let io_limits = self.limits.initial(&req.mutable_parameters)?;
        let encrypt = encryption::requested(&req.parameters)?;
        let passphrase = if encrypt {
            self.check_encryptable(&req.capabilities)?;
            Some(req.secrets.passphrase(encryption::SECRET_KEY)?)
        } else {
            None
        };
        if !req.requisite.is_empty() && !req.requisite.iter().any(|t| self.topology.is_this_node(t))
        {
            return Err(Error::ResourceExhausted(format!(
                "none of the requisite topologies is node {:?} ({}); this driver provisions only on its own node",
                self.topology.node_id, self.topology.key
            )));
        }
        let _guard = self.inflight.acquire(format!("name {name:?}"))?;

        if let Some(existing) = self.volumes.store.find_by_name(name) {
            if !req.capacity.contains(existing.capacity_bytes) {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with {} bytes, outside the requested capacity range",
                    existing.capacity_bytes
                )));
            }
            if existing.parameters != req.parameters {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with other parameters"
                )));
            }
            if existing.io_limits != io_limits {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with other I/O limits (mutable parameters)"
                )));
            }
            if existing.content_source != req.content_source {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with another content source ({:?})",
                    existing.content_source
                )));
            }
            return Ok(existing);
        }

        // The source, if any: here (its directory, pinned) or on another node.
        let origin = self.origin(req.content_source.as_ref())?;
        let (source_size, mut format, source_key) = match &origin {
            Origin::Empty => (0, FormatState::Unformatted, None),
            Origin::Local {
                size,
                format,
                encryption,
                ..
            } => (*size, format.clone(), encryption.clone()),
            Origin::Remote { info, .. } => (
                info.size_bytes,
                info.format.clone(),
                info.encryption.clone(),
            ),
        };
        let wrapped = volume_key(
            passphrase.as_ref(),
            source_key,
            matches!(origin, Origin::Empty),
        )?;
        self.capabilities
            .check_source_filesystem(&req.capabilities, &format)?;
        if req.capacity.limit != 0 && req.capacity.limit < source_size {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {} is below the source's {source_size} bytes",
                req.capacity.limit
            )));
        }
        let floor = self.capabilities.filesystem_floor(&req.capabilities)?;
        if let Some((fs, min)) = floor
            .as_ref()
            .filter(|(_, min)| req.capacity.limit != 0 && req.capacity.limit < *min)
        {
            return Err(Error::OutOfRange(format!(
                "an {fs} volume needs at least {} MiB (mkfs.{fs} refuses less), above limit_bytes {}: raise the limit or use ext4",
                min / MIB,
                req.capacity.limit
            )));
        }
        let range = CapacityRange {
            required: req
                .capacity
                .required
                .max(source_size)
                .max(floor.as_ref().map_or(0, |(_, min)| *min)),
            limit: req.capacity.limit,
        };
        let size = self.backend.size_policy().size_for(range)?;
        let free = self.backend.pool_usage()?.available_bytes;
        if size > free {
            return Err(Error::ResourceExhausted(format!(
                "the pool has {free} bytes free, less than the {size} bytes requested: free space or delete volumes"
            )));
        }

        let id = new_volume_id(&self.ids);
        let staging = self.volumes.store.begin_create(&id)?;
        let filled = match &origin {
            Origin::Empty => self.backend.create(&staging, size),
            Origin::Local { dir, .. } => {
                // A failed freeze is a failed create: rolled back below like any other.
                let frozen = match &req.content_source {
                    Some(ContentSource::Volume(source)) => {
                        self.freezer.freeze_if_mounted(source, dir)
                    }
                    _ => Ok(None),
                };
                frozen.and_then(|frozen| {
                    let copied = self.backend.copy_from(dir, &staging, size, false).map(drop);
                    drop(frozen);
                    copied
                })
            }
            Origin::Remote { node, remote, .. } => {
                let source = req.content_source.as_ref().ok_or_else(|| {
                    Error::Internal("a remote origin without a content source".into())
                })?;
                tracing::info!(volume_id = %id, source = %crate::peer::Named(source), from_node = %node,
                    "copying the source from another node");
                let filled =
                    match self.backend.block_layout() {
                        true => self.backend.import(&staging, size).and_then(|file| {
                            remote.pull(node, source, CopyInto::Blocks(&file), size)
                        }),
                        false => self.backend.import_tree(&staging, size).and_then(|root| {
                            remote.pull(node, source, CopyInto::Tree(&root), size)
                        }),
                    };
                filled.map(|read| format = read.format)
            }
        };
        let created = filled.and_then(|()| {
            self.crash.reach("create:after-data");
            let record = VolumeRecord {
                version: volume_record_version(wrapped.is_some()),
                id: id.clone(),
                name: name.to_owned(),
                capacity_bytes: size,
                parameters: req.parameters,
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                resize_pending: size > source_size && matches!(format, FormatState::Formatted(_)),
                format,
                content_source: req.content_source,
                // A copy's files keep their groups, but nothing records which: the first
                // stage with a group walks the tree once.
                mount_group: None,
                mount_group_current: false,
                io_limits,
                throttled: vec![],
                encryption: wrapped,
            };
            self.volumes.store.commit_create(&staging, record)
        });
        match created {
            Ok(record) => {
                tracing::info!(volume_id = %id, name, size, "volume created");
                Ok(record)
            }
            Err(e) => {
                self.volumes
                    .store
                    .abort_create(&staging, self.backend.as_ref());
                Err(e)
            }
        }
    }

    /// Where a new volume's data comes from. A local source is pinned for the copy: a
    /// concurrent DeleteSnapshot waits (ABORTED, retried) instead of pulling the data away
    /// mid-copy, and a volume does not change while it is copied (other clones and snapshots
    /// of it may run alongside). A source this node does not hold is looked for on the other
    /// nodes when the peer service is configured.
    fn origin(&self, source: Option<&ContentSource>) -> Result<Origin> {
        let local = match source {
            None => return Ok(Origin::Empty),
            Some(ContentSource::Snapshot(id)) => self.snapshots.get(id).and_then(|_| {
                // Looked up again after the pin, so a snapshot deleted just before is
                // NOT_FOUND.
                let (snap, guard) = self.snapshots.pin(id)?;
                Ok(Origin::Local {
                    dir: self.snapshots.dir(&snap.id),
                    size: snap.size_bytes,
                    format: snap.format,
                    encryption: snap.encryption,
                    _guard: guard,
                })
            }),
            Some(ContentSource::Volume(id)) => self.volumes.get(id).and_then(|vol| {
                let guard = self.volumes.guard_shared(&vol.id)?;
                Ok(Origin::Local {
                    dir: self.volumes.dir(&vol.id),
                    size: vol.capacity_bytes,
                    format: vol.format,
                    encryption: vol.encryption,
                    _guard: guard,
                })
            }),
        };
        let (Err(Error::NotFound(not_here)), Some(source)) = (&local, source) else {
            return local;
        };
        let Some(remote) = &self.remote else {
            // Made on another node, which this one cannot reach without the peer service:
            // retried (the provisioner) until the service is configured.
            let hint = NodeHint::in_id(crate::peer::source_id(source));
            if hint.is_some_and(|h| h != self.ids) {
                return Err(Error::Unavailable(format!(
                    "{not_here} on this node: it was made on another node, and the peer service that copies between nodes is off here (make the peer certificates: docs/operations.md)"
                )));
            }
            return local;
        };
        match remote.locate(source)? {
            Some((node, info)) if info.is_tree() == self.backend.block_layout() => {
                Err(Error::InvalidArgument(format!(
                    "{} is held by node {node}'s {} backend, whose data cannot become a volume of this node's {} backend: restore or clone it on a node with the {} backend",
                    crate::peer::Named(source),
                    info.backend,
                    self.backend.kind(),
                    info.backend
                )))
            }
            Some((node, info)) => Ok(Origin::Remote {
                node,
                info,
                remote: remote.clone(),
            }),
            None => Err(Error::NotFound(format!(
                "{not_here}, on this node or any other this node reaches"
            ))),
        }
    }

    /// Encryption asked for where it cannot be had: INVALID_ARGUMENT before anything is
    /// made. fscrypt encrypts the files of an ext4 filesystem; the image backend formats
    /// one per volume.
    fn check_encryptable(&self, capabilities: &[Capability]) -> Result<()> {
        let kind = self.backend.kind();
        if kind != "image" {
            return Err(Error::InvalidArgument(format!(
                "encrypted volumes need the image backend (ext4 filesystem volumes); this node runs the {kind} backend"
            )));
        }
        for cap in capabilities {
            match &cap.access_type {
                AccessType::Block => {
                    return Err(Error::InvalidArgument(
                        "a raw block volume cannot be encrypted: Strata encrypts the files of an ext4 filesystem (fscrypt); ask for a filesystem volume".into(),
                    ));
                }
                AccessType::Mount { fs_type, .. } => {
                    let fs = Filesystem::requested(fs_type)?;
                    if fs != Filesystem::Ext4 {
                        return Err(Error::InvalidArgument(format!(
                            "a {} volume cannot be encrypted: fscrypt is used on ext4 only here; ask for fs_type ext4",
                            fs.name()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn delete_volume(&self, id: &str) -> Result<()> {
        validate::required_str("volume_id", id)?;
        if !is_volume_id(id) {
            // Not an id this driver could have made, so it does not exist: deleted already.
            return Ok(());
        }
        let _guard = self.volumes.guard(id)?;
        if self.volumes.store.get(id).is_none() {
            return Ok(());
        }
        let dir = self.volumes.dir(id);
        if let Some(att) = self.backend.attachment(&dir)? {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is in use on this node ({att}): unpublish and unstage it first"
            )));
        }
        if let Some(doomed) = self.volumes.store.retire(id)? {
            self.crash.reach("delete:after-retire");
            self.reaper.remove(doomed);
        }
        tracing::info!(volume_id = %id, "volume deleted");
        Ok(())
    }

    /// Grows a volume to the requested capacity; returns the new capacity and whether the
    /// node must grow the filesystem (NodeExpandVolume). Never shrinks.
    pub fn expand_volume(&self, id: &str, range: CapacityRange) -> Result<(u64, bool)> {
        let record = self.volumes.get(id)?;
        let _guard = self.volumes.guard(&record.id)?;
        let record = self.volumes.grow(record, range)?;
        Ok((record.capacity_bytes, record.resize_pending))
    }

    /// ControllerModifyVolume: changes the volume's I/O limits where it lives, here or on
    /// the node that holds it (forwarded over the peer service). The parameters are
    /// checked before anything is done; the answer comes once the limits are applied
    /// wherever the volume is published.
    pub fn modify_volume(&self, id: &str, parameters: &BTreeMap<String, String>) -> Result<()> {
        validate::required_str("volume_id", id)?;
        let change = LimitChange::parse(parameters)?;
        self.limits.check(&change)?;
        if self.volumes.store.get(id).is_some() || !is_volume_id(id) {
            return self.limits.modify(id, &change);
        }
        let pv_name = parameters.get(PV_NAME_KEY).map(String::as_str);
        match &self.forwarding {
            Some(forwarding) => forwarding.modify_volume(id, pv_name, &change),
            None => {
                let hint = NodeHint::in_id(id);
                if hint.is_some_and(|h| h != self.ids) {
                    return Err(Error::Unavailable(format!(
                        "volume {id} was made on another node, and the peer service that forwards calls to it is off here (make the peer certificates: docs/operations.md)"
                    )));
                }
                self.limits.modify(id, &change)
            }
        }
    }

    /// `Ok(None)` when every capability is supported; `Ok(Some(reason))` when one is not.
    pub fn validate_capabilities(
        &self,
        id: &str,
        capabilities: &[Capability],
        parameters: &BTreeMap<String, String>,
        mutable_parameters: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let record = self.volumes.get(id)?;
        if capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        if !parameters.is_empty() && *parameters != record.parameters {
            return Ok(Some(
                "parameters differ from those the volume was created with".into(),
            ));
        }
        let change = LimitChange::parse(mutable_parameters)?;
        if change.applied_to(record.io_limits) != record.io_limits {
            return Ok(Some(
                "mutable parameters differ from the volume's current I/O limits".into(),
            ));
        }
        Ok(capabilities
            .iter()
            .find_map(|cap| self.capabilities.check_capability(cap).err())
            .map(|e| e.to_string()))
    }

    fn status(&self, record: VolumeRecord) -> VolumeStatus {
        let abnormal = self
            .backend
            .condition(&self.volumes.dir(&record.id), record.capacity_bytes);
        VolumeStatus { record, abnormal }
    }

    pub fn get_volume(&self, id: &str) -> Result<VolumeStatus> {
        Ok(self.status(self.volumes.get(id)?))
    }

    /// A page of volumes after `starting_token` and the token of the next page, if any.
    pub fn list_volumes(
        &self,
        max_entries: i32,
        starting_token: &str,
    ) -> Result<(Vec<VolumeStatus>, Option<String>)> {
        let (after, max) = validate::paging(max_entries, starting_token, is_volume_id)?;
        let (page, more) = self.volumes.store.page(after, max);
        let next = more.then(|| page.last().map(|r| r.id.clone())).flatten();
        Ok((page.into_iter().map(|r| self.status(r)).collect(), next))
    }

    pub fn capacity(
        &self,
        capabilities: &[Capability],
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        let policy = self.backend.size_policy();
        let unusable = capabilities
            .iter()
            .any(|c| self.capabilities.check_capability(c).is_err())
            || self.capabilities.check_parameters(parameters).is_err()
            || topology.is_some_and(|t| !self.topology.is_this_node(t));
        if unusable {
            return Ok(Capacity {
                available_bytes: 0,
                maximum_volume_bytes: 0,
                minimum_volume_bytes: policy.minimum,
            });
        }
        let free = self.backend.pool_usage()?.available_bytes;
        let granular = free - free % policy.granularity;
        let floor = self
            .capabilities
            .filesystem_floor(capabilities)?
            .map_or(0, |(_, min)| min);
        Ok(Capacity {
            available_bytes: free,
            maximum_volume_bytes: granular.min(policy.maximum),
            minimum_volume_bytes: policy.minimum.max(floor),
        })
    }
}

/// The wrapped key a new volume gets. Encryption follows the data: a copy of an encrypted
/// source holds the same encrypted files and keeps its key, which must be asked for (with
/// `encrypted: "true"`) and opened by the given secret, so a wrong Secret fails here and not
/// at the first mount; an unencrypted source cannot become encrypted by being copied.
fn volume_key(
    passphrase: Option<&Passphrase>,
    source_key: Option<WrappedKey>,
    empty: bool,
) -> Result<Option<WrappedKey>> {
    match (passphrase, source_key) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::InvalidArgument(format!(
            "the source is encrypted: a copy of it must be too; use a StorageClass with {}: \"true\" and the Secret the source was created with",
            encryption::PARAMETER
        ))),
        (Some(pass), Some(key)) => {
            encryption::unwrap(pass, &key, "the source")?;
            Ok(Some(key))
        }
        (Some(_), None) if !empty => Err(Error::InvalidArgument(
            "the source is not encrypted, and a copy of it cannot be encrypted in place: restore it into an unencrypted volume and copy the files into an encrypted one".into(),
        )),
        (Some(pass), None) => Ok(Some(encryption::new_key(pass)?.1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessMode, MIB};
    use crate::node::StageVolume;
    use crate::testing::{fixture, mount, mount_fs};

    fn req(name: &str, bytes: u64, cap: Capability) -> CreateVolume {
        CreateVolume {
            name: name.into(),
            capabilities: vec![cap],
            capacity: CapacityRange {
                required: bytes,
                limit: 0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn creates_are_idempotent_by_name_and_refuse_another_shape() {
        let f = fixture();
        let cap = mount(AccessMode::SingleNodeWriter);
        let a = f
            .driver
            .controller
            .create_volume(req("a", 16 * MIB, cap.clone()))
            .unwrap();
        let again = f
            .driver
            .controller
            .create_volume(req("a", 16 * MIB, cap.clone()))
            .unwrap();
        assert_eq!(a.id, again.id);
        assert!(matches!(
            f.driver.controller.create_volume(req("a", 64 * MIB, cap)),
            Err(Error::AlreadyExists(_))
        ));
    }

    #[test]
    fn an_xfs_volume_gets_the_size_mkfs_xfs_needs_or_out_of_range() {
        let f = fixture();
        let xfs = mount_fs("xfs", AccessMode::SingleNodeWriter);
        let v = f
            .driver
            .controller
            .create_volume(req("x", 16 * MIB, xfs.clone()))
            .unwrap();
        assert_eq!(v.capacity_bytes, 300 * MIB);
        let mut capped = req("y", 16 * MIB, xfs);
        capped.capacity.limit = 100 * MIB;
        assert!(matches!(
            f.driver.controller.create_volume(capped),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn a_clone_keeps_its_sources_filesystem_and_readers_share_the_source() {
        let f = fixture();
        let cap = mount(AccessMode::SingleNodeWriter);
        let src = f
            .driver
            .controller
            .create_volume(req("src", 16 * MIB, cap.clone()))
            .unwrap();
        f.driver
            .node
            .stage_volume(StageVolume {
                secrets: Default::default(),
                volume_id: src.id.clone(),
                staging_path: "/stage".into(),
                capability: cap.clone(),
            })
            .unwrap();
        f.driver.node.unstage_volume(&src.id, "/stage").unwrap();
        let clone = |name: &str, cap: Capability| {
            let mut r = req(name, 16 * MIB, cap);
            r.content_source = Some(ContentSource::Volume(src.id.clone()));
            f.driver.controller.create_volume(r)
        };
        // The source holds ext4 now: an xfs clone is refused before any copy.
        assert!(matches!(
            clone("as-xfs", mount_fs("xfs", AccessMode::SingleNodeWriter)),
            Err(Error::InvalidArgument(_))
        ));
        // A clone while another reader holds the source goes through; a delete does not.
        let reading = f.driver.volumes.guard_shared(&src.id).unwrap();
        let c = clone("c", cap).unwrap();
        assert!(matches!(
            f.driver.controller.delete_volume(&src.id),
            Err(Error::Aborted(_))
        ));
        drop(reading);
        assert_eq!(c.format, FormatState::Formatted("ext4".into()));
        f.driver.controller.delete_volume(&src.id).unwrap();
    }
}
