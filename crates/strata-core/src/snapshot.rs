//! Snapshots: point-in-time copies of a volume's data, independent of their source. On a pool
//! that shares extents (xfs with reflink, btrfs) a snapshot costs O(1) whatever the volume
//! holds; elsewhere it copies the allocated data.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::model::{SNAPSHOT_RECORD_VERSION, SnapshotRecord};
use crate::validate::{self, is_snapshot_id, new_snapshot_id};

impl Driver {
    pub fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<SnapshotRecord> {
        let name = validate::required_str("name", name)?;
        validate::required_str("source_volume_id", source_volume_id)?;
        let _guard = self.guard(&format!("snapshot name {name:?}"))?;
        if let Some(existing) = self.snapshots.find_by_name(name) {
            return if existing.source_volume_id == source_volume_id {
                Ok(existing)
            } else {
                Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} exists for volume {}, not {source_volume_id}",
                    existing.source_volume_id
                )))
            };
        }
        let source = self.volume(source_volume_id)?;
        // The source must not be staged, expanded or deleted while it is copied; other
        // snapshots and clones of it may run alongside.
        let _source_guard = self.guard_shared(&source.id)?;
        let id = new_snapshot_id();
        let staging = self.snapshots.begin_create(&id)?;
        let source_dir = self.store.dir(&source.id);
        let taken = self
            .freeze_if_mounted(&source.id, &source_dir)
            .and_then(|frozen| {
                if frozen.is_some() {
                    self.crash.reach("snapshot:frozen");
                }
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let method =
                    self.backend
                        .copy_from(&source_dir, &staging, source.capacity_bytes, true)?;
                drop(frozen);
                Ok((method, now))
            })
            .and_then(|(method, now)| {
                self.crash.reach("snapshot:after-copy");
                self.snapshots.commit_create(
                    &staging,
                    SnapshotRecord {
                        version: SNAPSHOT_RECORD_VERSION,
                        id: id.clone(),
                        name: name.to_owned(),
                        source_volume_id: source.id.clone(),
                        size_bytes: source.capacity_bytes,
                        created_unix: now.as_secs(),
                        created_nanos: now.subsec_nanos(),
                        format: source.format.clone(),
                        method,
                    },
                )
            });
        match taken {
            Ok(record) => {
                tracing::info!(snapshot_id = %id, source = %source.id, method = ?record.method, "snapshot taken");
                Ok(record)
            }
            Err(e) => {
                self.snapshots.abort_create(&staging, self.backend.as_ref());
                Err(e)
            }
        }
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        validate::required_str("snapshot_id", id)?;
        if !is_snapshot_id(id) {
            return Ok(());
        }
        let _guard = self.guard(id)?;
        if let Some(doomed) = self.snapshots.retire(id)? {
            self.reaper.remove(doomed);
            tracing::info!(snapshot_id = %id, "snapshot deleted");
        }
        Ok(())
    }

    pub fn snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        validate::required_str("snapshot_id", id)?;
        self.snapshots
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id:?} does not exist")))
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
            let found = self
                .snapshots
                .get(snapshot_id)
                .filter(|s| source_volume_id.is_empty() || s.source_volume_id == source_volume_id);
            return Ok((found.into_iter().collect(), None));
        }
        if source_volume_id.is_empty() {
            let (page, more) = self.snapshots.page(after, max);
            let next = more.then(|| page.last().map(|r| r.id.clone())).flatten();
            return Ok((page, next));
        }
        let mut all = self.snapshots.filter(|s| {
            s.source_volume_id == source_volume_id && after.is_none_or(|a| s.id.as_str() > a)
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
        let s = f.driver.create_snapshot("s", &vol.id).unwrap();
        assert_eq!(f.driver.create_snapshot("s", &vol.id).unwrap(), s);
        assert!(matches!(
            f.driver
                .create_snapshot("s", "vol-0123456789abcdef01234567"),
            Err(Error::AlreadyExists(_))
        ));
        // A restore holds the snapshot shared: its delete waits, another restore does not.
        let restoring = f.driver.guard_shared(&s.id).unwrap();
        assert!(matches!(
            f.driver.delete_snapshot(&s.id),
            Err(Error::Aborted(_))
        ));
        let restored = f
            .driver
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
        f.driver.delete_snapshot(&s.id).unwrap();
        assert!(f.driver.snapshots.get(&s.id).is_none());
    }
}
