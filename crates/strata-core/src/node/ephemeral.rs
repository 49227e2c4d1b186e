//! CSI inline ephemeral volumes (lifecycle mode Ephemeral): a pod declares the volume inline,
//! and the kubelet calls only NodePublishVolume and NodeUnpublishVolume, with its own volume
//! handle and `csi.storage.k8s.io/ephemeral: "true"` in the volume context. Publish creates a
//! volume named by that handle (idempotent, so a retry after a crash finds it), formats it
//! and mounts it at the target; unpublish unmounts it and deletes it with its data. The
//! volume is an ordinary one meanwhile: in the store, counted against capacity, recovered by
//! startup like any other.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::controller::{Controller, CreateVolume};
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::model::{
    AccessMode, AccessType, Capability, CapacityRange, GIB, VolumeRecord, parse_size,
};
use crate::os::{Create, Mounter};
use crate::paths::NodePaths;
use crate::validate::{self, echo};
use crate::volumes::Volumes;

use super::Node;
use super::StageVolume;

/// The volume-context key the kubelet sets for an inline volume.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// The attributes a pod may give an inline volume.
pub const SIZE_ATTRIBUTE: &str = "size";
pub const FS_TYPE_ATTRIBUTE: &str = "fsType";
/// The size of an inline volume that names none.
pub const DEFAULT_EPHEMERAL_BYTES: u64 = GIB;

/// NodePublishVolume of an inline volume.
#[derive(Debug, Clone)]
pub struct EphemeralVolume {
    /// The kubelet's handle for the volume (not a Strata id): the new volume's name.
    pub handle: String,
    pub target_path: String,
    /// The volume context: the pod's `volumeAttributes` and the kubelet's own keys.
    pub attributes: BTreeMap<String, String>,
    pub capability: Capability,
    pub read_only: bool,
}

/// Whether a volume context marks an inline ephemeral volume.
pub fn is_ephemeral(context: &BTreeMap<String, String>) -> bool {
    context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true")
}

/// Inline volumes: made by their publish, staged straight at the target by the node, and
/// deleted by their unpublish. The node whose stage and unstage they use is passed in.
pub struct InlineVolumes {
    controller: Arc<Controller>,
    volumes: Arc<Volumes>,
    paths: Arc<NodePaths>,
    mounter: Arc<dyn Mounter>,
    crash: FaultPoints,
}

impl InlineVolumes {
    pub fn new(
        controller: Arc<Controller>,
        volumes: Arc<Volumes>,
        paths: Arc<NodePaths>,
        mounter: Arc<dyn Mounter>,
        crash: FaultPoints,
    ) -> Self {
        InlineVolumes {
            controller,
            volumes,
            paths,
            mounter,
            crash,
        }
    }

    /// NodePublishVolume of an inline volume: create it (by its handle, so a retry finds it)
    /// and stage it at the target.
    pub(crate) fn publish(&self, node: &Node, req: EphemeralVolume) -> Result<()> {
        let handle = validate::required_str("volume_id", &req.handle)?;
        if !validate::is_inline_handle(handle) {
            return Err(Error::InvalidArgument(format!(
                "volume_id {} cannot name an inline volume: use letters, digits, '-', '_' and '.', starting with a letter or digit",
                echo(handle)
            )));
        }
        // Checked before anything is made.
        let target = self.paths.check("target_path", &req.target_path)?;
        if req.read_only {
            return Err(Error::InvalidArgument(
                "a read-only inline volume would always be empty: drop readOnly, or use a PersistentVolumeClaim".into(),
            ));
        }
        let AccessType::Mount {
            mount_flags,
            volume_mount_group,
            ..
        } = &req.capability.access_type
        else {
            return Err(Error::InvalidArgument(
                "inline volumes are filesystems; a raw block inline volume is not offered".into(),
            ));
        };
        if let Some(key) = req.attributes.keys().find(|k| {
            !k.starts_with(crate::capability::K8S_PARAMETER_PREFIX)
                && *k != SIZE_ATTRIBUTE
                && *k != FS_TYPE_ATTRIBUTE
        }) {
            return Err(Error::InvalidArgument(format!(
                "unknown volumeAttributes key {}: an inline volume takes {SIZE_ATTRIBUTE} and {FS_TYPE_ATTRIBUTE}",
                echo(key)
            )));
        }
        let size = match req.attributes.get(SIZE_ATTRIBUTE) {
            None => DEFAULT_EPHEMERAL_BYTES,
            Some(s) => parse_size(s).map_err(|e| {
                Error::InvalidArgument(format!("volumeAttributes {SIZE_ATTRIBUTE}: {}", echo(&e)))
            })?,
        };
        let fs_type = req
            .attributes
            .get(FS_TYPE_ATTRIBUTE)
            .cloned()
            .unwrap_or_default();
        let capability = Capability {
            access_type: AccessType::Mount {
                fs_type,
                mount_flags: mount_flags.clone(),
                // The pod's fsGroup: a fresh filesystem's root must be writable to it.
                volume_mount_group: volume_mount_group.clone(),
            },
            access_mode: AccessMode::SingleNodeWriter,
        };
        let record = self.controller.create_volume(CreateVolume {
            name: handle.to_owned(),
            capacity: CapacityRange {
                required: size,
                limit: 0,
            },
            capabilities: vec![capability.clone()],
            parameters: BTreeMap::from([(EPHEMERAL_KEY.to_owned(), "true".to_owned())]),
            ..Default::default()
        })?;
        self.crash.reach("ephemeral:after-create");
        // Mounted straight at the target: there is no staging step for an inline volume.
        node.stage_volume(StageVolume {
            volume_id: record.id,
            staging_path: target.path.to_string_lossy().into_owned(),
            capability,
            // Inline volumes are never encrypted (their parameters are Strata's own).
            secrets: Default::default(),
        })
    }

    /// The inline volume the kubelet's handle names, if it is one.
    pub(crate) fn record(&self, handle: &str) -> Option<VolumeRecord> {
        self.volumes
            .store
            .find_by_name(handle)
            .filter(|r| r.parameters.get(EPHEMERAL_KEY).is_some_and(|v| v == "true"))
    }

    /// NodeUnpublishVolume of an inline volume: unmount, remove the target the publish made,
    /// delete the volume and its data.
    pub(crate) fn unpublish(
        &self,
        node: &Node,
        record: &VolumeRecord,
        target_path: &str,
    ) -> Result<()> {
        node.unstage_volume(&record.id, target_path)?;
        if let Some(target) = node.undo_path("target_path", &record.id, target_path)?
            && let Some(opened) = self.paths.open(&target, Create::Nothing)?
        {
            self.mounter.remove_if_created(&opened)?;
        }
        self.crash.reach("ephemeral:before-delete");
        self.controller.delete_volume(&record.id)
    }
}
