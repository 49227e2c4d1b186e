//! Per-volume I/O limits (the mutable parameters of CreateVolume and ControllerModifyVolume,
//! set from a VolumeAttributesClass): parsed and checked before anything is done, kept in
//! the volume's record, and applied on this node as block I/O throttling of the volume's
//! loop device in the cgroup of each pod that publishes it. Which cgroup got which rule is
//! recorded before the rule is written, so an unpublish, a change and a restart reach every
//! rule Strata wrote, and nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::model::{IoLimits, Throttled, VolumeRecord, parse_size};
use crate::os::cgroups::{CgroupRef, Cgroups};
use crate::validate::echo;
use crate::volumes::Volumes;

pub const MAX_READ_IOPS: &str = "maxReadIOPS";
pub const MAX_WRITE_IOPS: &str = "maxWriteIOPS";
pub const MAX_READ_BPS: &str = "maxReadBytesPerSecond";
pub const MAX_WRITE_BPS: &str = "maxWriteBytesPerSecond";

/// The mutable parameters Strata takes, each `0` for unlimited.
pub const MUTABLE_PARAMETERS: [&str; 4] =
    [MAX_READ_IOPS, MAX_WRITE_IOPS, MAX_READ_BPS, MAX_WRITE_BPS];

/// Keys the external-resizer adds with `--extra-modify-metadata`: not limits, accepted and
/// used only to find the volume's node.
pub const PV_NAME_KEY: &str = "csi.storage.k8s.io/pv/name";
pub const MODIFY_METADATA_KEYS: [&str; 3] = [
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    PV_NAME_KEY,
];

/// The volume context key the kubelet sets to the publishing pod's uid (with
/// `podInfoOnMount: true` in the CSIDriver).
pub const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";
/// The volume context key a container orchestrator other than Kubernetes may set to the
/// cgroup (relative to the hierarchy's root) the volume's I/O is charged to.
pub const CGROUP_KEY: &str = "strata.csi.dev/cgroup";

/// The kernel takes IOPS limits as 32-bit counts (the largest meaning "none").
const MAX_IOPS: u64 = u32::MAX as u64 - 1;

/// A change of limits: the keys a request names (absent keys stay as they are, as the
/// spec requires of ControllerModifyVolume).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitChange {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub read_bytes_per_second: Option<u64>,
    pub write_bytes_per_second: Option<u64>,
}

impl LimitChange {
    /// Parses mutable parameters: the four limits and the resizer's metadata keys; anything
    /// else, or a value that is not a count or a size, is INVALID_ARGUMENT.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self> {
        let mut change = LimitChange::default();
        for (key, value) in params {
            let slot = match key.as_str() {
                MAX_READ_IOPS => &mut change.read_iops,
                MAX_WRITE_IOPS => &mut change.write_iops,
                MAX_READ_BPS => &mut change.read_bytes_per_second,
                MAX_WRITE_BPS => &mut change.write_bytes_per_second,
                k if MODIFY_METADATA_KEYS.contains(&k) => continue,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown mutable parameter {}: Strata takes {}",
                        echo(other),
                        MUTABLE_PARAMETERS.join(", ")
                    )));
                }
            };
            *slot = Some(parse_value(key, value)?);
        }
        Ok(change)
    }

    pub fn is_empty(&self) -> bool {
        *self == LimitChange::default()
    }

    /// `limits` with this change made.
    pub fn applied_to(&self, limits: IoLimits) -> IoLimits {
        IoLimits {
            read_iops: self.read_iops.unwrap_or(limits.read_iops),
            write_iops: self.write_iops.unwrap_or(limits.write_iops),
            read_bytes_per_second: self
                .read_bytes_per_second
                .unwrap_or(limits.read_bytes_per_second),
            write_bytes_per_second: self
                .write_bytes_per_second
                .unwrap_or(limits.write_bytes_per_second),
        }
    }

    /// The change as mutable parameters again (for forwarding to the volume's node).
    pub fn to_parameters(&self) -> BTreeMap<String, String> {
        [
            (MAX_READ_IOPS, self.read_iops),
            (MAX_WRITE_IOPS, self.write_iops),
            (MAX_READ_BPS, self.read_bytes_per_second),
            (MAX_WRITE_BPS, self.write_bytes_per_second),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_string())))
        .collect()
    }
}

fn parse_value(key: &str, value: &str) -> Result<u64> {
    let bad = |why: String| {
        Error::InvalidArgument(format!("mutable parameter {key} = {}: {why}", echo(value)))
    };
    let value = value.trim();
    if key.ends_with("IOPS") {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "expected a whole number of I/O operations per second (0: unlimited)".into(),
            ));
        }
        let n: u64 = value
            .parse()
            .map_err(|_| bad(format!("at most {MAX_IOPS}")))?;
        if n > MAX_IOPS {
            return Err(bad(format!("at most {MAX_IOPS}")));
        }
        Ok(n)
    } else {
        let n = parse_size(value)
            .map_err(|e| bad(format!("{e} (bytes per second, such as 2Mi; 0: unlimited)")))?;
        if n == u64::MAX {
            return Err(bad("too large".into()));
        }
        Ok(n)
    }
}

/// Whose I/O a publish is: a Kubernetes pod (by uid), a cgroup another orchestrator names,
/// or unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Consumer {
    Pod(String),
    Cgroup(String),
    #[default]
    Unknown,
}

impl Consumer {
    /// Reads the publishing pod or cgroup from a publish request's volume context.
    pub fn from_context(context: &BTreeMap<String, String>) -> Result<Self> {
        if let Some(uid) = context.get(POD_UID_KEY) {
            let ok = (1..=64).contains(&uid.len())
                && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "volume_context {POD_UID_KEY} = {} is not a pod uid",
                    echo(uid)
                )));
            }
            return Ok(Consumer::Pod(uid.clone()));
        }
        if let Some(path) = context.get(CGROUP_KEY) {
            let ok = path.len() <= 512
                && path.split('/').all(|c| {
                    !c.is_empty()
                        && !c.starts_with('.')
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
                });
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "volume_context {CGROUP_KEY} = {} is not a cgroup path relative to the hierarchy's root (such as nomad.slice/share.slice)",
                    echo(path)
                )));
            }
            return Ok(Consumer::Cgroup(path.clone()));
        }
        Ok(Consumer::Unknown)
    }
}

/// Applies volumes' I/O limits in the cgroups of their consumers.
pub struct IoLimiter {
    volumes: Arc<Volumes>,
    cgroups: Arc<dyn Cgroups>,
    /// Whether the backend's volumes are devices whose I/O a cgroup can limit.
    supported: bool,
    backend: &'static str,
    /// A publish with limits but no known consumer was logged once.
    warned_unknown: AtomicBool,
}

impl IoLimiter {
    pub fn new(
        volumes: Arc<Volumes>,
        cgroups: Arc<dyn Cgroups>,
        supported: bool,
        backend: &'static str,
    ) -> Self {
        IoLimiter {
            volumes,
            cgroups,
            supported,
            backend,
            warned_unknown: AtomicBool::new(false),
        }
    }

    fn unsupported(&self) -> Error {
        Error::InvalidArgument(format!(
            "the {} backend's volumes are directories, whose I/O this node cannot limit per volume: I/O limits need the image backend",
            self.backend
        ))
    }

    /// The limits a new volume starts with, from CreateVolume's mutable parameters.
    pub fn initial(&self, params: &BTreeMap<String, String>) -> Result<IoLimits> {
        let change = LimitChange::parse(params)?;
        if !change.is_empty() && !self.supported {
            return Err(self.unsupported());
        }
        Ok(change.applied_to(IoLimits::default()))
    }

    /// Checks a change before anything is done (INVALID_ARGUMENT for what this node can
    /// never apply).
    pub fn check(&self, change: &LimitChange) -> Result<()> {
        if !change.is_empty() && !self.supported {
            return Err(self.unsupported());
        }
        Ok(())
    }

    fn cgroup_of(&self, consumer: &Consumer) -> Result<Option<CgroupRef>> {
        Ok(match consumer {
            Consumer::Pod(uid) => self.cgroups.pod_cgroup(uid)?,
            Consumer::Cgroup(path) => self.cgroups.cgroup_at(path)?,
            Consumer::Unknown => None,
        })
    }

    /// At NodePublishVolume, before the bind (the caller holds the volume's guard):
    /// records that `target` charges `device`'s I/O to the consumer's cgroup, then writes
    /// the volume's limits there. Returns the entry, for [`IoLimiter::undo`] if the
    /// publish fails after it.
    pub(crate) fn publish(
        &self,
        record: &VolumeRecord,
        target: &str,
        consumer: &Consumer,
        device: (u32, u32),
    ) -> Result<Option<Throttled>> {
        if !self.supported {
            return Ok(None);
        }
        let limited = !record.io_limits.is_unlimited();
        let found = if limited || *consumer != Consumer::Unknown {
            self.cgroup_of(consumer)
        } else {
            Ok(None)
        };
        let cgroup = match (found, consumer) {
            (Ok(Some(cgroup)), _) => cgroup,
            (Ok(None), Consumer::Unknown) => {
                if limited && !self.warned_unknown.swap(true, Ordering::Relaxed) {
                    tracing::warn!(volume_id = %record.id,
                        "a volume with I/O limits is published without a pod uid or a cgroup in the volume context: its limits cannot apply there (set podInfoOnMount in the CSIDriver, or strata.csi.dev/cgroup)");
                }
                return Ok(None);
            }
            (Ok(None), _) if !limited => {
                tracing::warn!(volume_id = %record.id, ?consumer,
                    "the publishing cgroup was not found: later I/O limits will not reach this target");
                return Ok(None);
            }
            (Ok(None), _) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} has I/O limits, but the cgroup of {} was not found: mount the host's cgroup filesystem at --cgroup-root (docs/operations.md)",
                    record.id,
                    match consumer {
                        Consumer::Pod(uid) => format!("pod {uid}"),
                        Consumer::Cgroup(path) => format!("cgroup {}", echo(path)),
                        Consumer::Unknown => "the consumer".into(),
                    }
                )));
            }
            (Err(e), _) if !limited => {
                tracing::warn!(volume_id = %record.id, error = %e,
                    "cgroups cannot be read: later I/O limits will not reach this target");
                return Ok(None);
            }
            (Err(e), _) => return Err(e),
        };
        let entry = Throttled {
            target: target.to_owned(),
            cgroup,
            device,
        };
        let mut record = record.clone();
        if !record.throttled.contains(&entry) {
            record.throttled.retain(|t| t.target != target);
            record.throttled.push(entry.clone());
            self.volumes.store.update(record.clone())?;
        }
        if limited {
            if let Err(e) = self
                .cgroups
                .set_limits(&entry.cgroup, device, &record.io_limits)
            {
                self.undo(&record.id, &entry);
                return Err(e.into());
            }
            tracing::info!(volume_id = %record.id, cgroup = %entry.cgroup, ?device, limits = ?record.io_limits,
                "I/O limits applied");
        }
        Ok(Some(entry))
    }

    /// Takes back what [`IoLimiter::publish`] did, for a publish that failed after it.
    pub(crate) fn undo(&self, volume_id: &str, entry: &Throttled) {
        if let Err(e) = self.unpublished(volume_id, &entry.target) {
            tracing::warn!(volume_id, error = %e, "could not take back the I/O limits of a failed publish; the next unpublish does");
        }
    }

    /// At NodeUnpublishVolume, after the unmount (the caller holds the guard): removes
    /// the rules of `target` (unless another target of the volume charges the same cgroup
    /// and device), then forgets the entry.
    pub(crate) fn unpublished(&self, volume_id: &str, target: &str) -> Result<()> {
        let Some(mut record) = self.volumes.store.get(volume_id) else {
            return Ok(());
        };
        let (gone, kept): (Vec<_>, Vec<_>) =
            record.throttled.drain(..).partition(|t| t.target == target);
        if gone.is_empty() {
            return Ok(());
        }
        for t in &gone {
            let shared = kept
                .iter()
                .any(|k| k.cgroup == t.cgroup && k.device == t.device);
            if !shared {
                self.cgroups
                    .set_limits(&t.cgroup, t.device, &IoLimits::default())?;
            }
        }
        record.throttled = kept;
        self.volumes.store.update(record)?;
        Ok(())
    }

    /// ControllerModifyVolume on this node: the new limits are recorded, then written to
    /// every cgroup the volume's targets charge; only then is the change done. A cgroup
    /// that is gone (its pod ended) is forgotten.
    pub fn modify(&self, volume_id: &str, change: &LimitChange) -> Result<()> {
        let record = self.volumes.get(volume_id)?;
        self.check(change)?;
        if change.is_empty() {
            return Ok(());
        }
        let _guard = self.volumes.guard(&record.id)?;
        let mut record = self.volumes.get(volume_id)?;
        let limits = change.applied_to(record.io_limits);
        if limits != record.io_limits {
            record.io_limits = limits;
            self.volumes.store.update(record.clone())?;
        }
        self.apply_all(record)?;
        tracing::info!(volume_id, ?limits, "I/O limits changed");
        Ok(())
    }

    /// Writes the record's limits to every cgroup its targets charge; forgets cgroups that
    /// are gone.
    fn apply_all(&self, mut record: VolumeRecord) -> Result<()> {
        let mut failed = None;
        let before = record.throttled.len();
        let mut kept = vec![];
        for t in std::mem::take(&mut record.throttled) {
            match self
                .cgroups
                .set_limits(&t.cgroup, t.device, &record.io_limits)
            {
                Ok(true) => kept.push(t),
                Ok(false) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                    kept.push(t);
                }
            }
        }
        record.throttled = kept;
        if record.throttled.len() != before {
            self.volumes.store.update(record.clone())?;
        }
        match failed {
            Some(e) => Err(Error::Unavailable(format!(
                "the I/O limits of volume {} are recorded but could not be written to every cgroup that uses it ({e}); retry",
                record.id
            ))),
            None => Ok(()),
        }
    }

    /// At startup: every recorded rule is written again (a crash may have come between
    /// the record and the cgroup), and cgroups that are gone are forgotten.
    pub(crate) fn reconcile(&self) {
        if !self.supported {
            return;
        }
        for record in self.volumes.store.filter(|r| !r.throttled.is_empty()) {
            let id = record.id.clone();
            let Ok(_guard) = self.volumes.guard(&id) else {
                continue;
            };
            if let Err(e) = self.apply_all(record) {
                tracing::warn!(volume_id = %id, error = %e, "could not reapply I/O limits at startup");
            }
        }
    }

    /// The limits in force in the cgroup of each target of a volume, for checks.
    pub fn in_force(&self, volume_id: &str) -> Result<Vec<(Throttled, Option<IoLimits>)>> {
        let record = self.volumes.get(volume_id)?;
        record
            .throttled
            .into_iter()
            .map(|t| {
                let limits = self.cgroups.limits(&t.cgroup, t.device)?;
                Ok((t, limits))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
