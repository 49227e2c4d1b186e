//! Snapshots: point-in-time copies of a volume's data, independent of their source. On a pool
//! that shares extents (xfs with reflink, btrfs) a snapshot costs O(1) whatever the volume
//! holds; elsewhere it copies the allocated data.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::freezer::Freezer;
use crate::ids::{NodeHint, is_snapshot_id, new_snapshot_id};
use crate::inflight::{Guard, InFlight};
use crate::model::{
    CopyMethod, GROUP_MEMBER_SNAPSHOT_RECORD_VERSION, PLAIN_SNAPSHOT_RECORD_VERSION,
    SNAPSHOT_RECORD_VERSION, SnapshotRecord, VolumeRecord,
};
use crate::reaper::Reaper;
use crate::store::{GroupStore, SnapshotStore};
use crate::validate;
use crate::volumes::Volumes;

/// Now, as a time since the epoch: the creation time of a snapshot.
pub(crate) fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The record of a snapshot of `source` taken at `taken`, in `group` if not empty.
pub(crate) fn snapshot_record(
    id: &str,
    name: &str,
    source: &VolumeRecord,
    method: CopyMethod,
    taken: Duration,
    group: &str,
) -> SnapshotRecord {
    SnapshotRecord {
        version: match (source.encryption.is_some(), group.is_empty()) {
            (true, _) => SNAPSHOT_RECORD_VERSION,
            (false, false) => GROUP_MEMBER_SNAPSHOT_RECORD_VERSION,
            (false, true) => PLAIN_SNAPSHOT_RECORD_VERSION,
        },
        id: id.to_owned(),
        name: name.to_owned(),
        source_volume_id: source.id.clone(),
        size_bytes: source.capacity_bytes,
        created_unix: taken.as_secs(),
        created_nanos: taken.subsec_nanos(),
        format: source.format.clone(),
        method,
        group_snapshot_id: group.to_owned(),
        encryption: source.encryption.clone(),
    }
}

/// The snapshots of this pool: CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot.
pub struct Snapshots {
    pub(crate) store: SnapshotStore,
    /// Group records decide whether a group's member is seen.
    groups: Arc<GroupStore>,
    volumes: Arc<Volumes>,
    freezer: Arc<Freezer>,
    backend: Arc<dyn Backend>,
    reaper: Arc<Reaper>,
    inflight: Arc<InFlight>,
    /// The node hint new snapshot ids carry.
    pub(crate) ids: NodeHint,
    crash: FaultPoints,
}

impl Snapshots {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: SnapshotStore,
        groups: Arc<GroupStore>,
        volumes: Arc<Volumes>,
        freezer: Arc<Freezer>,
        backend: Arc<dyn Backend>,
        reaper: Arc<Reaper>,
        inflight: Arc<InFlight>,
        ids: NodeHint,
        crash: FaultPoints,
    ) -> Self {
        Snapshots {
            store,
            groups,
            volumes,
            freezer,
            backend,
            reaper,
            inflight,
            ids,
            crash,
        }
    }

    pub fn count(&self) -> usize {
        self.store.len()
    }

    /// The snapshot's directory in the pool.
    pub(crate) fn dir(&self, id: &str) -> PathBuf {
        self.store.dir(id)
    }

    /// An existing, visible snapshot pinned for reading (a restore from it): it cannot be
    /// deleted until the guard goes.
    pub(crate) fn pin(&self, id: &str) -> Result<(SnapshotRecord, Guard)> {
        let guard = self.inflight.acquire_shared(id)?;
        Ok((self.get(id)?, guard))
    }

    pub fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<SnapshotRecord> {
        let name = validate::required_str("name", name)?;
        validate::required_str("source_volume_id", source_volume_id)?;
        let _guard = self.inflight.acquire(format!("snapshot name {name:?}"))?;
        if let Some(existing) = self.store.find_by_name(name) {
            return if existing.source_volume_id == source_volume_id {
                Ok(existing)
            } else {
                Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} exists for volume {}, not {source_volume_id}",
                    existing.source_volume_id
                )))
            };
        }
        let source = self.volumes.get(source_volume_id)?;
        // The source must not be staged, expanded or deleted while it is copied; other
        // snapshots and clones of it may run alongside.
        let _source_guard = self.volumes.guard_shared(&source.id)?;
        let id = new_snapshot_id(&self.ids);
        let staging = self.store.begin_create(&id)?;
        let source_dir = self.volumes.dir(&source.id);
        let taken = self
            .freezer
            .freeze_if_mounted(&source.id, &source_dir)
            .and_then(|frozen| {
                if frozen.is_some() {
                    self.crash.reach("snapshot:frozen");
                }
                let now = now();
                let method =
                    self.backend
                        .copy_from(&source_dir, &staging, source.capacity_bytes, true)?;
                drop(frozen);
                Ok((method, now))
            })
            .and_then(|(method, now)| {
                self.crash.reach("snapshot:after-copy");
                self.store.commit_create(
                    &staging,
                    snapshot_record(&id, name, &source, method, now, ""),
                )
            });
        match taken {
            Ok(record) => {
                tracing::info!(snapshot_id = %id, source = %source.id, method = ?record.method, "snapshot taken");
                Ok(record)
            }
            Err(e) => {
                self.store.abort_create(&staging, self.backend.as_ref());
                Err(e)
            }
        }
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        validate::required_str("snapshot_id", id)?;
        if !is_snapshot_id(id) {
            return Ok(());
        }
        let _guard = self.inflight.acquire(id)?;
        if let Some(member) = self.store.get(id)
            && self.groups.get(&member.group_snapshot_id).is_some()
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} belongs to group snapshot {}: delete the group (DeleteVolumeGroupSnapshot), which deletes its snapshots",
                member.group_snapshot_id
            )));
        }
        if let Some(doomed) = self.store.retire(id)? {
            self.reaper.remove(doomed);
            tracing::info!(snapshot_id = %id, "snapshot deleted");
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<SnapshotRecord> {
        validate::required_str("snapshot_id", id)?;
        self.store
            .get(id)
            .filter(|s| self.visible(s))
            .ok_or_else(|| Error::NotFound(format!("snapshot {id:?} does not exist")))
    }

    /// Whether a snapshot is shown: a member of a group only while its group is committed, so
    /// no half group is ever seen while one is taken or deleted (or after a crash, until
    /// startup removes the rest).
    fn visible(&self, s: &SnapshotRecord) -> bool {
        s.group_snapshot_id.is_empty() || self.groups.get(&s.group_snapshot_id).is_some()
    }

    /// A page of snapshots, optionally only one id or one source volume's, and the next token.
    pub fn list_snapshots(
        &self,
        max_entries: i32,
        starting_token: &str,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<(Vec<SnapshotRecord>, Option<String>)> {
        let (after, max) = validate::paging(max_entries, starting_token, is_snapshot_id)?;
        if !snapshot_id.is_empty() {
            // Filtering on an id that does not exist is an empty list, not an error.
            let found = self.store.get(snapshot_id).filter(|s| {
                self.visible(s)
                    && (source_volume_id.is_empty() || s.source_volume_id == source_volume_id)
            });
            return Ok((found.into_iter().collect(), None));
        }
        if source_volume_id.is_empty() {
            let (mut page, more) = self.store.page(after, max);
            // The token follows the page as stored; a page may hold fewer than `max`.
            let next = more.then(|| page.last().map(|r| r.id.clone())).flatten();
            page.retain(|s| self.visible(s));
            return Ok((page, next));
        }
        let mut all = self.store.filter(|s| {
            s.source_volume_id == source_volume_id
                && after.is_none_or(|a| s.id.as_str() > a)
                && self.visible(s)
        });
        let more = all.len() > max;
        all.truncate(max);
        let next = more.then(|| all.last().map(|r| r.id.clone())).flatten();
        Ok((all, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::CreateVolume;
    use crate::model::{AccessMode, CapacityRange, ContentSource, MIB};
    use crate::testing::{fixture, mount};

    #[test]
    fn a_snapshot_is_idempotent_and_pinned_while_a_restore_reads_it() {
        let f = fixture();
        let cap = mount(AccessMode::SingleNodeWriter);
        let vol = f
            .driver
            .controller
            .create_volume(CreateVolume {
                name: "v".into(),
                capabilities: vec![cap.clone()],
                capacity: CapacityRange {
                    required: 16 * MIB,
                    limit: 0,
                },
                ..Default::default()
            })
            .unwrap();
        let s = f.driver.snapshots.create_snapshot("s", &vol.id).unwrap();
        assert_eq!(f.driver.snapshots.create_snapshot("s", &vol.id).unwrap(), s);
        assert!(matches!(
            f.driver
                .snapshots
                .create_snapshot("s", "vol-0123456789abcdef01234567"),
            Err(Error::AlreadyExists(_))
        ));
        // A restore holds the snapshot shared: its delete waits, another restore does not.
        let restoring = f.driver.volumes.guard_shared(&s.id).unwrap();
        assert!(matches!(
            f.driver.snapshots.delete_snapshot(&s.id),
            Err(Error::Aborted(_))
        ));
        let restored = f
            .driver
            .controller
            .create_volume(CreateVolume {
                name: "r".into(),
                capabilities: vec![cap],
                capacity: CapacityRange {
                    required: 16 * MIB,
                    limit: 0,
                },
                content_source: Some(ContentSource::Snapshot(s.id.clone())),
                ..Default::default()
            })
            .unwrap();
        drop(restoring);
        assert_eq!(restored.capacity_bytes, 16 * MIB);
        f.driver.snapshots.delete_snapshot(&s.id).unwrap();
        assert!(f.driver.snapshots.store.get(&s.id).is_none());
    }
}
