//! Conversions between CSI messages and core types. Missing required sub-messages become
//! INVALID_ARGUMENT here, before the core sees the request.

use std::collections::HashMap;

use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata_core::controller::VolumeStatus;
use strata_core::group::GroupSnapshot;
use strata_core::model::{
    AccessMode, AccessType, Capability, ContentSource, SnapshotRecord, Topology,
};
use strata_core::{Error, Result, validate};

pub fn capability(cap: &csi::VolumeCapability) -> Result<Capability> {
    use csi::volume_capability::AccessType as Csi;
    let access_type = match &cap.access_type {
        Some(Csi::Block(_)) => AccessType::Block,
        Some(Csi::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
            volume_mount_group: m.volume_mount_group.clone(),
        },
        None => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_type is required (block or mount)".into(),
            ));
        }
    };
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    let access_mode = match mode {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
        Mode::Unknown => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_mode is required and must be a known mode".into(),
            ));
        }
    };
    Ok(Capability {
        access_type,
        access_mode,
    })
}

pub fn capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    caps.iter().map(capability).collect()
}

pub fn required_capability(cap: Option<&csi::VolumeCapability>) -> Result<Capability> {
    capability(cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?)
}

pub fn topology(t: &csi::Topology) -> Topology {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn csi_topology(t: Topology) -> csi::Topology {
    csi::Topology {
        segments: t.into_iter().collect(),
    }
}

pub fn volume(status_topology: Topology, record: &strata_core::model::VolumeRecord) -> csi::Volume {
    csi::Volume {
        capacity_bytes: record.capacity_bytes as i64,
        volume_id: record.id.clone(),
        volume_context: HashMap::new(),
        content_source: record.content_source.as_ref().map(csi_content_source),
        accessible_topology: vec![csi_topology(status_topology)],
    }
}

pub fn content_source(source: &csi::VolumeContentSource) -> Result<ContentSource> {
    use csi::volume_content_source::Type;
    match &source.r#type {
        Some(Type::Snapshot(s)) => Ok(ContentSource::Snapshot(
            validate::required_str("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?
                .to_owned(),
        )),
        Some(Type::Volume(v)) => Ok(ContentSource::Volume(
            validate::required_str("volume_content_source.volume.volume_id", &v.volume_id)?
                .to_owned(),
        )),
        None => Err(Error::InvalidArgument(
            "volume_content_source needs a snapshot or a volume".into(),
        )),
    }
}

fn csi_content_source(source: &ContentSource) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(match source {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

fn timestamp(unix: u64, nanos: u32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: unix as i64,
        nanos: nanos as i32,
    })
}

pub fn snapshot(record: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: record.size_bytes as i64,
        snapshot_id: record.id.clone(),
        source_volume_id: record.source_volume_id.clone(),
        creation_time: timestamp(record.created_unix, record.created_nanos),
        // Copies are complete when CreateSnapshot returns.
        ready_to_use: true,
        group_snapshot_id: record.group_snapshot_id.clone(),
    }
}

pub fn group_snapshot(group: &GroupSnapshot) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: group.record.id.clone(),
        snapshots: group.members.iter().map(snapshot).collect(),
        creation_time: timestamp(group.record.created_unix, group.record.created_nanos),
        // Every member is a complete copy when the group is committed.
        ready_to_use: true,
    }
}

pub fn condition(status: &VolumeStatus) -> csi::VolumeCondition {
    volume_condition(status.abnormal.clone())
}

pub fn volume_condition(abnormal: Option<String>) -> csi::VolumeCondition {
    match abnormal {
        Some(message) => csi::VolumeCondition {
            abnormal: true,
            message,
        },
        None => csi::VolumeCondition {
            abnormal: false,
            message: "volume is healthy".into(),
        },
    }
}

/// A CSI access-mode message, for clients building requests.
/// Volume usage as NodeGetVolumeStats reports it: bytes and inodes of a filesystem, the size
/// of a block device, nothing when it cannot be read.
pub fn usage(usage: Option<strata_core::node::Usage>) -> Vec<csi::VolumeUsage> {
    use csi::volume_usage::Unit;
    use strata_core::node::Usage;
    let row = |unit: Unit, total: u64, available: u64, used: u64| csi::VolumeUsage {
        available: available as i64,
        total: total as i64,
        used: used as i64,
        unit: unit as i32,
    };
    match usage {
        Some(Usage::Filesystem(u)) => vec![
            row(Unit::Bytes, u.total_bytes, u.available_bytes, u.used_bytes),
            row(Unit::Inodes, u.total_inodes, u.free_inodes, u.used_inodes),
        ],
        Some(Usage::Block { total_bytes }) => vec![row(Unit::Bytes, total_bytes, 0, 0)],
        None => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::AccessMode as CsiMode;

    #[test]
    fn missing_parts_of_a_capability_are_invalid() {
        let none = csi::VolumeCapability::default();
        assert!(matches!(capability(&none), Err(Error::InvalidArgument(_))));
        let no_mode = csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
            access_mode: None,
        };
        assert!(matches!(
            capability(&no_mode),
            Err(Error::InvalidArgument(_))
        ));
        let bogus_mode = csi::VolumeCapability {
            access_mode: Some(CsiMode { mode: 99 }),
            ..no_mode.clone()
        };
        assert!(matches!(
            capability(&bogus_mode),
            Err(Error::InvalidArgument(_))
        ));
        let ok = csi::VolumeCapability {
            access_mode: Some(CsiMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            ..no_mode
        };
        assert!(capability(&ok).unwrap().is_block());
    }
}
