//! Domain types shared by the controller and node logic: capabilities, sizes, topology and
//! the durable volume record.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::encryption::WrappedKey;
use crate::error::{Error, Result};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// How a workload may use a volume. Multi-node modes are not offered: volumes are node-local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    /// Whether several target paths on this node may publish the volume at once (spec table
    /// for a second NodePublishVolume with another target path).
    pub fn allows_several_targets(self) -> bool {
        self.is_multi_node() || self == AccessMode::SingleNodeMultiWriter
    }

    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

/// Block device, or a filesystem mounted with optional flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Block,
    Mount {
        /// Empty means the driver's default.
        fs_type: String,
        mount_flags: Vec<String>,
        volume_mount_group: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        self.access_type == AccessType::Block
    }
}

/// Filesystems the node formats and mounts.
/// Parses sizes as people and Kubernetes quantities write them, such as `1073741824`, `64Mi`, `1G`, `512MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64Mi or 1G"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit {u:?}; use Ki, Mi, Gi, Ti or K, M, G, T"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `required_bytes` and `limit_bytes` of a CSI capacity range; zero means unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    pub required: u64,
    pub limit: u64,
}

impl CapacityRange {
    pub fn from_signed(required: i64, limit: i64) -> Result<Self> {
        if required < 0 || limit < 0 {
            return Err(Error::InvalidArgument(format!(
                "capacity_range must not be negative (required_bytes {required}, limit_bytes {limit})"
            )));
        }
        Ok(CapacityRange {
            required: required as u64,
            limit: limit as u64,
        })
    }

    pub fn contains(&self, bytes: u64) -> bool {
        bytes >= self.required && (self.limit == 0 || bytes <= self.limit)
    }
}

/// Size rules of a backend: sizes are multiples of `granularity`, at least `minimum`.
#[derive(Debug, Clone, Copy)]
pub struct SizePolicy {
    pub granularity: u64,
    pub minimum: u64,
    pub default: u64,
    pub maximum: u64,
}

impl SizePolicy {
    /// The size to provision for `range`: the required size rounded up to the granularity,
    /// or the default when nothing is required, and never above the limit.
    pub fn size_for(&self, range: CapacityRange) -> Result<u64> {
        let CapacityRange { required, limit } = range;
        if limit != 0 && limit < required {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {limit} is below required_bytes {required}"
            )));
        }
        let want = if required == 0 {
            if limit != 0 {
                self.round_down(limit.min(self.default))
            } else {
                self.default
            }
        } else {
            self.round_up(required.max(self.minimum)).ok_or_else(|| {
                Error::OutOfRange(format!("required_bytes {required} is too large"))
            })?
        };
        let want = want.max(self.minimum);
        if want > self.maximum {
            return Err(Error::OutOfRange(format!(
                "{want} bytes exceeds the largest volume this driver creates ({} bytes)",
                self.maximum
            )));
        }
        if limit != 0 && want > limit {
            return Err(Error::OutOfRange(format!(
                "cannot fit a volume within limit_bytes {limit}: sizes are multiples of {} bytes and at least {} bytes",
                self.granularity, self.minimum
            )));
        }
        Ok(want)
    }

    fn round_up(&self, n: u64) -> Option<u64> {
        n.checked_next_multiple_of(self.granularity)
    }

    fn round_down(&self, n: u64) -> u64 {
        n - n % self.granularity
    }
}

/// Where a request or volume may be reached: segments such as `{driver/node: n1}`.
pub type Topology = BTreeMap<String, String>;

/// Progress of formatting the volume's filesystem, recorded so a crash in the middle of mkfs
/// is told apart from a volume that holds data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "fs_type")]
pub enum FormatState {
    #[default]
    Unformatted,
    Formatting(String),
    Formatted(String),
}

/// Current schema version of [`VolumeRecord`]. Records from newer versions are refused.
/// Version 2 records hold an encrypted volume's wrapped key; a volume without one is still
/// written as version 1, so only a pool with encrypted volumes needs a Strata that knows
/// them (an older one would drop the key when it rewrote the record: it refuses to start).
pub const VOLUME_RECORD_VERSION: u32 = 2;
/// Version of a volume record without encryption.
pub const PLAIN_VOLUME_RECORD_VERSION: u32 = 1;

/// The record version a volume with (or without) a wrapped key is written with.
pub fn volume_record_version(encrypted: bool) -> u32 {
    if encrypted {
        VOLUME_RECORD_VERSION
    } else {
        PLAIN_VOLUME_RECORD_VERSION
    }
}

/// The durable description of a volume, stored beside its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub id: String,
    pub name: String,
    pub capacity_bytes: u64,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    pub created_unix: u64,
    #[serde(default)]
    pub format: FormatState,
    /// Where the initial data came from, if not empty.
    #[serde(default)]
    pub content_source: Option<ContentSource>,
    /// The device grew and its filesystem must follow (at the next stage or node expand).
    #[serde(default)]
    pub resize_pending: bool,
    /// The group (VOLUME_MOUNT_GROUP) the volume's files were last given, so the walk is
    /// done once per group change, not at every mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_group: Option<u32>,
    /// The files still carry `mount_group` as it was applied: no read-write publish has let
    /// a pod change them since. Only then may a stage or publish skip the walk (Kubernetes'
    /// default fsGroupChangePolicy, `Always`). Records written before it read as false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mount_group_current: bool,
    /// The I/O limits of the volume (its mutable parameters), applied wherever it is
    /// published.
    #[serde(default, skip_serializing_if = "IoLimits::is_unlimited")]
    pub io_limits: IoLimits,
    /// Where the volume is published and whose cgroup its I/O is charged to: each entry
    /// was recorded before its limits were written there, so an unpublish, a change of
    /// the limits and a restart find every rule Strata wrote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttled: Vec<Throttled>,
    /// An encrypted volume's data key, wrapped ([`crate::encryption`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<WrappedKey>,
}

/// Per-volume I/O limits; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    #[serde(default)]
    pub read_iops: u64,
    #[serde(default)]
    pub write_iops: u64,
    #[serde(default)]
    pub read_bytes_per_second: u64,
    #[serde(default)]
    pub write_bytes_per_second: u64,
}

impl IoLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == IoLimits::default()
    }
}

/// Which cgroup interface a cgroup is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// The blkio hierarchy of cgroup v1.
    V1,
    /// The unified hierarchy (cgroup v2) with the io controller.
    V2,
}

/// A cgroup: its path relative to the root of its hierarchy (`kubepods/burstable/pod…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CgroupRef {
    pub version: CgroupVersion,
    pub path: String,
}

impl std::fmt::Display for CgroupRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = match self.version {
            CgroupVersion::V1 => "blkio",
            CgroupVersion::V2 => "io",
        };
        write!(f, "{v}:/{}", self.path)
    }
}

/// A published target of a volume whose I/O is limited in a cgroup: the rule Strata wrote
/// for `device` in `cgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttled {
    /// The target path as the publish named it.
    pub target: String,
    pub cgroup: CgroupRef,
    /// The device (major, minor) the rule names: the loop device the target shows.
    pub device: (u32, u32),
}

/// What a new volume's data is copied from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// How a snapshot's data was copied from its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// Shared extents (FICLONE): O(1) whatever the data.
    Reflink,
    /// A copy of the allocated ranges only: O(data).
    SparseCopy,
}

/// Current schema version of [`SnapshotRecord`]. Version 2 records are members of a group
/// snapshot; a plain snapshot is still written as version 1, so only a pool holding group
/// snapshots needs a Strata that knows them (an older one refuses to start on it rather than
/// let a member be deleted alone). Version 3 records hold a wrapped key (snapshots of
/// encrypted volumes, in a group or not).
pub const SNAPSHOT_RECORD_VERSION: u32 = 3;
/// Version of a snapshot record that belongs to a group and holds no key.
pub const GROUP_MEMBER_SNAPSHOT_RECORD_VERSION: u32 = 2;
/// Version of a snapshot record that belongs to no group and holds no key.
pub const PLAIN_SNAPSHOT_RECORD_VERSION: u32 = 1;

/// The durable description of a snapshot: a point-in-time copy of a volume's data, independent
/// of the source once taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub version: u32,
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    /// Size of the source volume when the snapshot was taken.
    pub size_bytes: u64,
    pub created_unix: u64,
    pub created_nanos: u32,
    /// The source's filesystem state, inherited by volumes restored from the snapshot.
    #[serde(default)]
    pub format: FormatState,
    pub method: CopyMethod,
    /// The group snapshot this snapshot was taken in, if any: such a snapshot is deleted
    /// only with its group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_snapshot_id: String,
    /// The source's wrapped key when it is encrypted: the snapshot holds the same encrypted
    /// data, and so do the volumes restored from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<WrappedKey>,
}

/// Current schema version of [`GroupSnapshotRecord`].
pub const GROUP_RECORD_VERSION: u32 = 1;

/// The durable description of a group snapshot: snapshots of several volumes taken at one
/// instant. The members are ordinary snapshot records naming the group; this record is
/// committed after all of them, so a group without its record is a creation cut short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshotRecord {
    pub version: u32,
    pub id: String,
    pub name: String,
    /// One member per source volume, in the order of the source volume ids.
    pub members: Vec<GroupMember>,
    pub created_unix: u64,
    pub created_nanos: u32,
    /// How long the sources' filesystems were frozen, in microseconds.
    pub freeze_micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub source_volume_id: String,
    pub snapshot_id: String,
}

impl GroupSnapshotRecord {
    /// The source volume ids, sorted: a group is the same group whatever order the caller
    /// named its volumes in.
    pub fn sources(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.source_volume_id.as_str())
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn snapshot_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.snapshot_id.as_str())
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SizePolicy = SizePolicy {
        granularity: MIB,
        minimum: 16 * MIB,
        default: GIB,
        maximum: 1 << 50,
    };

    fn range(required: u64, limit: u64) -> CapacityRange {
        CapacityRange { required, limit }
    }

    #[test]
    fn sizes_round_up_and_honour_limits() {
        assert_eq!(POLICY.size_for(range(0, 0)).unwrap(), GIB);
        assert_eq!(POLICY.size_for(range(100 * MIB + 1, 0)).unwrap(), 101 * MIB);
        assert_eq!(POLICY.size_for(range(1, 0)).unwrap(), 16 * MIB);
        assert_eq!(POLICY.size_for(range(0, 100 * MIB + 5)).unwrap(), 100 * MIB);
        assert_eq!(
            POLICY.size_for(range(64 * MIB, 64 * MIB)).unwrap(),
            64 * MIB
        );
        assert!(matches!(
            POLICY.size_for(range(64 * MIB + 1, 64 * MIB + 2)),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            POLICY.size_for(range(10, 5)),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            POLICY.size_for(range(0, MIB)),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            POLICY.size_for(range(u64::MAX, 0)),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn negative_ranges_are_invalid() {
        assert!(matches!(
            CapacityRange::from_signed(-1, 0),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn record_roundtrips_with_format_state() {
        let rec = VolumeRecord {
            version: VOLUME_RECORD_VERSION,
            id: "vol-1".into(),
            name: "n".into(),
            capacity_bytes: MIB,
            parameters: BTreeMap::new(),
            created_unix: 1,
            format: FormatState::Formatted("xfs".into()),
            content_source: None,
            resize_pending: false,
            mount_group: None,
            mount_group_current: false,
            io_limits: IoLimits::default(),
            throttled: vec![],
            encryption: None,
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert!(
            text.contains(r#""format":{"state":"formatted","fs_type":"xfs"}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<VolumeRecord>(&text).unwrap(), rec);
    }
}
