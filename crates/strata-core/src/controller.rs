//! Controller operations: provisioning, listing and capacity. Pure domain logic; the gRPC
//! layer converts requests into these types and the results back.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::ids::{is_volume_id, new_volume_id};
use crate::model::{
    Capability, CapacityRange, ContentSource, FormatState, MIB, Topology, VOLUME_RECORD_VERSION,
    VolumeRecord,
};
use crate::validate;

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

impl Driver {
    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord> {
        let name = validate::required_str("name", &req.name)?;
        if req.capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        for cap in &req.capabilities {
            self.check_capability(cap)?;
        }
        self.check_parameters(&req.parameters)?;
        if !req.requisite.is_empty() && !req.requisite.iter().any(|t| self.is_this_node(t)) {
            return Err(Error::ResourceExhausted(format!(
                "none of the requisite topologies is node {:?} ({}); this driver provisions only on its own node",
                self.config.node_id, self.config.topology_key
            )));
        }
        let _guard = self.guard(&format!("name {name:?}"))?;

        if let Some(existing) = self.store.find_by_name(name) {
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
            if existing.content_source != req.content_source {
                return Err(Error::AlreadyExists(format!(
                    "volume {name:?} exists with another content source ({:?})",
                    existing.content_source
                )));
            }
            return Ok(existing);
        }

        // The source, if any: its directory, size and filesystem state.
        let (source_dir, source_size, format, _source_guard) = match &req.content_source {
            None => (None, 0, FormatState::Unformatted, None),
            Some(ContentSource::Snapshot(id)) => {
                // Pinned for the copy: a concurrent DeleteSnapshot waits (ABORTED, retried)
                // instead of pulling the data away mid-copy; looked up after the pin, so a
                // snapshot deleted just before is NOT_FOUND.
                self.snapshot(id)?;
                let guard = self.guard_shared(id)?;
                let snap = self.snapshot(id)?;
                (
                    Some(self.snapshots.dir(&snap.id)),
                    snap.size_bytes,
                    snap.format,
                    Some(guard),
                )
            }
            Some(ContentSource::Volume(id)) => {
                let vol = self.volume(id)?;
                // The source must not change while it is copied (other clones and snapshots
                // of it may run alongside).
                let guard = self.guard_shared(&vol.id)?;
                (
                    Some(self.store.dir(&vol.id)),
                    vol.capacity_bytes,
                    vol.format,
                    Some(guard),
                )
            }
        };
        self.check_source_filesystem(&req.capabilities, &format)?;
        if req.capacity.limit != 0 && req.capacity.limit < source_size {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {} is below the source's {source_size} bytes",
                req.capacity.limit
            )));
        }
        let floor = self.filesystem_floor(&req.capabilities)?;
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

        let id = new_volume_id();
        let staging = self.store.begin_create(&id)?;
        let filled = match &source_dir {
            None => self.backend.create(&staging, size),
            Some(src) => {
                // A failed freeze is a failed create: rolled back below like any other.
                let frozen = match &req.content_source {
                    Some(ContentSource::Volume(source)) => self.freeze_if_mounted(source, src),
                    _ => Ok(None),
                };
                frozen.and_then(|frozen| {
                    let copied = self.backend.copy_from(src, &staging, size, false).map(drop);
                    drop(frozen);
                    copied
                })
            }
        };
        let created = filled.and_then(|()| {
            self.crash.reach("create:after-data");
            let record = VolumeRecord {
                version: VOLUME_RECORD_VERSION,
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
            };
            self.store.commit_create(&staging, record)
        });
        match created {
            Ok(record) => {
                tracing::info!(volume_id = %id, name, size, "volume created");
                Ok(record)
            }
            Err(e) => {
                self.store.abort_create(&staging, self.backend.as_ref());
                Err(e)
            }
        }
    }

    pub fn delete_volume(&self, id: &str) -> Result<()> {
        validate::required_str("volume_id", id)?;
        if !is_volume_id(id) {
            // Not an id this driver could have made, so it does not exist: deleted already.
            return Ok(());
        }
        let _guard = self.guard(id)?;
        if self.store.get(id).is_none() {
            return Ok(());
        }
        let dir = self.store.dir(id);
        if let Some(att) = self.backend.attachment(&dir)? {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is in use on this node ({att}): unpublish and unstage it first"
            )));
        }
        if let Some(doomed) = self.store.retire(id)? {
            self.crash.reach("delete:after-retire");
            self.reaper.remove(doomed);
        }
        tracing::info!(volume_id = %id, "volume deleted");
        Ok(())
    }

    /// Grows a volume to the requested capacity; returns the new capacity and whether the
    /// node must grow the filesystem (NodeExpandVolume). Never shrinks.
    pub fn expand_volume(&self, id: &str, range: CapacityRange) -> Result<(u64, bool)> {
        let record = self.volume(id)?;
        let _guard = self.guard(&record.id)?;
        let record = self.grow_volume(record, range)?;
        Ok((record.capacity_bytes, record.resize_pending))
    }

    /// Grows the volume's storage to `range` (the caller holds the volume's guard) and
    /// records the new size, with the filesystem marked for growth. A range it already
    /// satisfies changes nothing; one below its size is OUT_OF_RANGE.
    pub(crate) fn grow_volume(
        &self,
        mut record: VolumeRecord,
        range: CapacityRange,
    ) -> Result<VolumeRecord> {
        let id = &record.id;
        if range.limit != 0 && range.limit < record.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {id} is {} bytes, above limit_bytes {}: volumes cannot shrink",
                record.capacity_bytes, range.limit
            )));
        }
        if range.required <= record.capacity_bytes {
            return Ok(record);
        }
        let size = self.backend.size_policy().size_for(range)?;
        let growth = size - record.capacity_bytes;
        let free = self.backend.pool_usage()?.available_bytes;
        if growth > free {
            return Err(Error::ResourceExhausted(format!(
                "the pool has {free} bytes free, less than the {growth} bytes this expansion adds"
            )));
        }
        self.backend.expand(&self.store.dir(id), size)?;
        self.crash.reach("expand:after-grow");
        record.capacity_bytes = size;
        record.resize_pending = matches!(record.format, FormatState::Formatted(_));
        self.store.update(record.clone())?;
        tracing::info!(volume_id = %record.id, size, "volume expanded");
        Ok(record)
    }

    /// `Ok(None)` when every capability is supported; `Ok(Some(reason))` when one is not.
    pub fn validate_capabilities(
        &self,
        id: &str,
        capabilities: &[Capability],
        parameters: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let record = self.volume(id)?;
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
        Ok(capabilities
            .iter()
            .find_map(|cap| self.check_capability(cap).err())
            .map(|e| e.to_string()))
    }

    fn status(&self, record: VolumeRecord) -> VolumeStatus {
        let abnormal = self
            .backend
            .condition(&self.store.dir(&record.id), record.capacity_bytes);
        VolumeStatus { record, abnormal }
    }

    pub fn get_volume(&self, id: &str) -> Result<VolumeStatus> {
        Ok(self.status(self.volume(id)?))
    }

    /// A page of volumes after `starting_token` and the token of the next page, if any.
    pub fn list_volumes(
        &self,
        max_entries: i32,
        starting_token: &str,
    ) -> Result<(Vec<VolumeStatus>, Option<String>)> {
        let (after, max) = validate::paging(max_entries, starting_token, is_volume_id)?;
        let (page, more) = self.store.page(after, max);
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
            .any(|c| self.check_capability(c).is_err())
            || self.check_parameters(parameters).is_err()
            || topology.is_some_and(|t| !self.is_this_node(t));
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
            .filesystem_floor(capabilities)?
            .map_or(0, |(_, min)| min);
        Ok(Capacity {
            available_bytes: free,
            maximum_volume_bytes: granular.min(policy.maximum),
            minimum_volume_bytes: policy.minimum.max(floor),
        })
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
            .create_volume(req("a", 16 * MIB, cap.clone()))
            .unwrap();
        let again = f
            .driver
            .create_volume(req("a", 16 * MIB, cap.clone()))
            .unwrap();
        assert_eq!(a.id, again.id);
        assert!(matches!(
            f.driver.create_volume(req("a", 64 * MIB, cap)),
            Err(Error::AlreadyExists(_))
        ));
    }

    #[test]
    fn an_xfs_volume_gets_the_size_mkfs_xfs_needs_or_out_of_range() {
        let f = fixture();
        let xfs = mount_fs("xfs", AccessMode::SingleNodeWriter);
        let v = f
            .driver
            .create_volume(req("x", 16 * MIB, xfs.clone()))
            .unwrap();
        assert_eq!(v.capacity_bytes, 300 * MIB);
        let mut capped = req("y", 16 * MIB, xfs);
        capped.capacity.limit = 100 * MIB;
        assert!(matches!(
            f.driver.create_volume(capped),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn a_clone_keeps_its_sources_filesystem_and_readers_share_the_source() {
        let f = fixture();
        let cap = mount(AccessMode::SingleNodeWriter);
        let src = f
            .driver
            .create_volume(req("src", 16 * MIB, cap.clone()))
            .unwrap();
        f.driver
            .stage_volume(StageVolume {
                volume_id: src.id.clone(),
                staging_path: "/stage".into(),
                capability: cap.clone(),
            })
            .unwrap();
        f.driver.unstage_volume(&src.id, "/stage").unwrap();
        let clone = |name: &str, cap: Capability| {
            let mut r = req(name, 16 * MIB, cap);
            r.content_source = Some(ContentSource::Volume(src.id.clone()));
            f.driver.create_volume(r)
        };
        // The source holds ext4 now: an xfs clone is refused before any copy.
        assert!(matches!(
            clone("as-xfs", mount_fs("xfs", AccessMode::SingleNodeWriter)),
            Err(Error::InvalidArgument(_))
        ));
        // A clone while another reader holds the source goes through; a delete does not.
        let reading = f.driver.guard_shared(&src.id).unwrap();
        let c = clone("c", cap).unwrap();
        assert!(matches!(
            f.driver.delete_volume(&src.id),
            Err(Error::Aborted(_))
        ));
        drop(reading);
        assert_eq!(c.format, FormatState::Formatted("ext4".into()));
        f.driver.delete_volume(&src.id).unwrap();
    }
}
