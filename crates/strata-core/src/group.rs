//! Group snapshots: snapshots of several volumes taken at one instant, as if the node had
//! lost power then (crash-consistent across the group).
//!
//! Every source's filesystem is frozen (turns taken in volume-id order, the freezes run
//! together) before the first copy and thawed after the last one; a watchdog thaws them all
//! if the copies outlast the freeze limit, and the group then fails, keeping nothing. The members are ordinary snapshot
//! records naming the group. They are committed first and the group record last, so a crash
//! anywhere leaves either the whole group or evidence (`.creating-`/`.deleting-` in
//! `groups/`) from which startup removes the members: no half group is ever visible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, GroupConsistency};
use crate::capability::K8S_PARAMETER_PREFIX;
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::freezer::{FreezeFigures, Freezer, Frozen, thaw_together};
use crate::ids::{is_group_id, new_group_id, new_snapshot_id};
use crate::inflight::{Guard, InFlight};
use crate::model::{CopyMethod, GROUP_RECORD_VERSION, GroupMember, GroupSnapshotRecord};
use crate::model::{SnapshotRecord, VolumeRecord};
use crate::os::MountedFs;
use crate::reaper::Reaper;
use crate::snapshot::{Snapshots, now, snapshot_record};
use crate::store::{GroupStore, remove_object_dir};
use crate::validate::{self, echo};
use crate::volumes::Volumes;

/// The most volumes one group snapshot may name.
pub const MAX_GROUP_VOLUMES: usize = 128;

/// Copies of a group's members made at once.
const COPIES_AT_ONCE: usize = 8;

/// A group snapshot and its member snapshots, in the order of the record's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub record: GroupSnapshotRecord,
    pub members: Vec<SnapshotRecord>,
}

/// Checks the volume ids of a group: present, distinct, not too many. Returns them sorted
/// (the freeze order).
fn source_ids(ids: &[String]) -> Result<Vec<&str>> {
    if ids.is_empty() {
        return Err(Error::InvalidArgument(
            "source_volume_ids is required: name the volumes to snapshot together".into(),
        ));
    }
    if ids.len() > MAX_GROUP_VOLUMES {
        return Err(Error::InvalidArgument(format!(
            "source_volume_ids names {} volumes; at most {MAX_GROUP_VOLUMES} are allowed",
            ids.len()
        )));
    }
    let mut sorted = ids
        .iter()
        .map(|id| validate::required_str("source_volume_ids", id))
        .collect::<Result<Vec<_>>>()?;
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!(
            "source_volume_ids names volume {} twice",
            echo(w[0])
        )));
    }
    Ok(sorted)
}

/// Checks the snapshot ids a caller names for a group against the group's own.
fn check_snapshot_ids(record: &GroupSnapshotRecord, given: &[String]) -> Result<()> {
    if given.is_empty() {
        return Err(Error::InvalidArgument(
            "snapshot_ids is required: name the group's snapshots".into(),
        ));
    }
    let mut given: Vec<&str> = given.iter().map(String::as_str).collect();
    given.sort_unstable();
    if given != record.snapshot_ids() {
        // The ids themselves are not listed: a group of 128 would make a message of kilobytes.
        return Err(Error::InvalidArgument(format!(
            "snapshot_ids do not match group snapshot {}, which holds {} snapshots; pass the ids of its members (ListSnapshots shows their group_snapshot_id)",
            record.id,
            record.members.len()
        )));
    }
    Ok(())
}

/// One source of a group being taken: its record, its guard, and its member's staging.
struct Source {
    volume: VolumeRecord,
    _guard: Guard,
    snapshot_id: String,
    staging: PathBuf,
}

/// Group snapshots: CreateVolumeGroupSnapshot, DeleteVolumeGroupSnapshot,
/// GetVolumeGroupSnapshot.
pub struct Groups {
    pub(crate) store: Arc<GroupStore>,
    snapshots: Arc<Snapshots>,
    volumes: Arc<Volumes>,
    freezer: Arc<Freezer>,
    backend: Arc<dyn Backend>,
    reaper: Arc<Reaper>,
    inflight: Arc<InFlight>,
    /// The longest the sources may stay frozen.
    freeze_limit: Duration,
    crash: FaultPoints,
}

impl Groups {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<GroupStore>,
        snapshots: Arc<Snapshots>,
        volumes: Arc<Volumes>,
        freezer: Arc<Freezer>,
        backend: Arc<dyn Backend>,
        reaper: Arc<Reaper>,
        inflight: Arc<InFlight>,
        freeze_limit: Duration,
        crash: FaultPoints,
    ) -> Self {
        Groups {
            store,
            snapshots,
            volumes,
            freezer,
            backend,
            reaper,
            inflight,
            freeze_limit,
            crash,
        }
    }

    pub fn count(&self) -> usize {
        self.store.len()
    }

    /// Whether this backend offers group snapshots at all.
    pub fn supports_group_snapshots(&self) -> bool {
        self.backend.group_consistency() != GroupConsistency::None
    }

    pub fn freeze_figures(&self) -> FreezeFigures {
        self.freezer.figures()
    }

    pub fn create_group_snapshot(
        &self,
        name: &str,
        source_volume_ids: &[String],
        parameters: &BTreeMap<String, String>,
    ) -> Result<GroupSnapshot> {
        let name = validate::required_str("name", name)?;
        let ids = source_ids(source_volume_ids)?;
        if let Some(key) = parameters
            .keys()
            .find(|k| !k.starts_with(K8S_PARAMETER_PREFIX))
        {
            return Err(Error::InvalidArgument(format!(
                "unknown group snapshot parameter {}; Strata takes none",
                echo(key)
            )));
        }
        match self.backend.group_consistency() {
            GroupConsistency::Freeze => {}
            GroupConsistency::OneVolume if ids.len() == 1 => {}
            GroupConsistency::OneVolume => {
                return Err(Error::FailedPrecondition(format!(
                    "the {} backend cannot snapshot several volumes at one instant (each subvolume snapshot is atomic, but a btrfs snapshot cannot be taken on a frozen filesystem and nothing else holds the writers); snapshot one volume per group, or use the image backend",
                    self.backend.kind()
                )));
            }
            GroupConsistency::None => {
                return Err(Error::FailedPrecondition(format!(
                    "the {} backend copies files one by one, so no snapshot of it is a single instant; use the image or btrfs backend for group snapshots",
                    self.backend.kind()
                )));
            }
        }
        let _name_guard = self
            .inflight
            .acquire(format!("group snapshot name {name:?}"))?;
        if let Some(existing) = self.store.find_by_name(name) {
            return if existing.sources() == ids {
                self.with_members(existing)
            } else {
                Err(Error::AlreadyExists(format!(
                    "group snapshot {} ({}) exists for another set of {} volumes; use another name",
                    echo(name),
                    existing.id,
                    existing.members.len()
                )))
            };
        }
        let volumes = ids
            .iter()
            .map(|id| self.volumes.get(id))
            .collect::<Result<Vec<_>>>()?;
        let id = new_group_id(&self.snapshots.ids);
        let staging = self.store.begin_create(&id)?;
        let mut sources = Vec::with_capacity(volumes.len());
        let taken = volumes
            .into_iter()
            .try_for_each(|volume| {
                // The sources must not change while they are copied; snapshots and clones
                // of them may run alongside.
                let guard = self.inflight.acquire_shared(&volume.id)?;
                let snapshot_id = new_snapshot_id(&self.snapshots.ids);
                let member_staging = self.snapshots.store.begin_create(&snapshot_id)?;
                sources.push(Source {
                    volume,
                    _guard: guard,
                    snapshot_id,
                    staging: member_staging,
                });
                Ok(())
            })
            .and_then(|()| self.copy_frozen(&sources))
            .and_then(|(methods, instant, window)| {
                self.commit_group(&id, name, &sources, methods, instant, window, &staging)
            });
        match taken {
            Ok(group) => {
                tracing::info!(group_snapshot_id = %id, volumes = group.members.len(),
                    freeze_micros = group.record.freeze_micros, "group snapshot taken");
                Ok(group)
            }
            Err(e) => {
                let mut left = false;
                for s in &sources {
                    // Committed members go with the group they were for.
                    if self.snapshots.store.get(&s.snapshot_id).is_some() {
                        if let Err(e) = self
                            .snapshots
                            .store
                            .delete(&s.snapshot_id, self.backend.as_ref())
                        {
                            left = true;
                            tracing::error!(snapshot_id = %s.snapshot_id, error = %e,
                                "could not remove a member of a failed group snapshot; startup will");
                        }
                    } else {
                        self.snapshots
                            .store
                            .abort_create(&s.staging, self.backend.as_ref());
                    }
                }
                // The group's `.creating-` directory is what tells startup to remove members
                // left behind: it goes only when none is.
                if !left {
                    self.store.abort_create(&staging, self.backend.as_ref());
                }
                Err(e)
            }
        }
    }

    /// Freezes every mounted source, copies each into its member's staging (all at once), and
    /// thaws them all after the last copy. Returns the copy methods, the instant the group
    /// shows, and how long the filesystems were frozen.
    fn copy_frozen(&self, sources: &[Source]) -> Result<(Vec<CopyMethod>, Duration, Duration)> {
        let limit = self.freeze_limit;
        // Turns are taken in volume-id order (two groups sharing volumes never wait on each
        // other in a cycle), bounded by the limit too; then every filesystem is frozen at once.
        let deadline = Instant::now() + limit;
        let turns = sources
            .iter()
            .map(|s| {
                self.freezer
                    .freeze_turn(&s.volume.id, &self.volumes.dir(&s.volume.id), deadline)
            })
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        // The window opens with the first freeze (which flushes that filesystem).
        let started = Instant::now();
        let mut frozen = self.freezer.freeze_all(turns)?;
        let instant = now();
        if !frozen.is_empty() {
            self.crash.reach("group:frozen");
        }
        let expired = AtomicBool::new(false);
        let (done, finished) = mpsc::channel::<()>();
        let copied = std::thread::scope(|scope| {
            if !frozen.is_empty() {
                let left = limit.saturating_sub(started.elapsed());
                let filesystems: Vec<&MountedFs> = frozen.iter().map(Frozen::fs).collect();
                let expired = &expired;
                scope.spawn(move || self.thaw_at_deadline(&filesystems, left, finished, expired));
            }
            let copied = self.copy_all(sources);
            if !frozen.is_empty() {
                self.crash.reach("group:before-thaw");
            }
            drop(done);
            copied
        });
        let over = expired.load(Ordering::SeqCst);
        if over {
            frozen.iter_mut().for_each(Frozen::mark_thawed);
        }
        let volumes = frozen.len();
        thaw_together(frozen);
        let window = started.elapsed();
        if volumes > 0 {
            self.freezer.record(window, over);
            tracing::info!(
                volumes,
                freeze_micros = window.as_micros() as u64,
                over_limit = over,
                "group snapshot freeze window"
            );
        }
        if over {
            return Err(Error::Aborted(format!(
                "the copies took longer than the freeze limit ({} ms), so the filesystems were thawed and the group snapshot was dropped; retry when the pool is less busy, or raise --freeze-limit-ms",
                limit.as_millis()
            )));
        }
        Ok((copied?, instant, window))
    }

    /// Copies every source into its member's staging, a few at a time: on a reflink pool
    /// each copy is a clone and a sync, and the syncs share the pool's journal commits.
    /// The methods are in the order of `sources`.
    fn copy_all(&self, sources: &[Source]) -> Result<Vec<CopyMethod>> {
        let next = AtomicUsize::new(0);
        let copy = |i: usize| -> Result<CopyMethod> {
            let s = &sources[i];
            let method = self.backend.copy_from(
                &self.volumes.dir(&s.volume.id),
                &s.staging,
                s.volume.capacity_bytes,
                true,
            )?;
            if i == 0 {
                self.crash.reach("group:after-first-copy");
            }
            Ok(method)
        };
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..sources.len().min(COPIES_AT_ONCE))
                .map(|_| {
                    let (next, copy) = (&next, &copy);
                    scope.spawn(move || {
                        let mut done = vec![];
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= sources.len() {
                                return done;
                            }
                            done.push((i, copy(i)));
                        }
                    })
                })
                .collect();
            let mut results: Vec<(usize, Result<CopyMethod>)> = vec![];
            for w in workers {
                match w.join() {
                    Ok(done) => results.extend(done),
                    Err(_) => results.push((
                        usize::MAX,
                        Err(Error::Internal(
                            "a copy of a group member did not complete".into(),
                        )),
                    )),
                }
            }
            results.sort_by_key(|(i, _)| *i);
            results
                .into_iter()
                .map(|(_, r)| r)
                .collect::<Result<Vec<_>>>()
        })
    }

    /// Thaws `filesystems` if `finished` is not signalled within `limit`.
    fn thaw_at_deadline(
        &self,
        filesystems: &[&MountedFs],
        limit: Duration,
        finished: mpsc::Receiver<()>,
        expired: &AtomicBool,
    ) {
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
            expired.store(true, Ordering::SeqCst);
            tracing::error!(
                limit_ms = limit.as_millis() as u64,
                "a group snapshot outlasted the freeze limit: thawing its filesystems"
            );
            for fs in filesystems {
                if let Err(e) = self.freezer.thaw(fs) {
                    tracing::error!(mount_point = %fs.mount_point.display(), error = %e, "could not thaw");
                }
            }
        }
    }

    /// Commits the members, then the group record that makes them a group.
    #[allow(clippy::too_many_arguments)]
    fn commit_group(
        &self,
        id: &str,
        name: &str,
        sources: &[Source],
        methods: Vec<CopyMethod>,
        instant: Duration,
        window: Duration,
        staging: &Path,
    ) -> Result<GroupSnapshot> {
        let mut members = Vec::with_capacity(sources.len());
        // Held until the group is committed: no member can be deleted on its own before.
        let mut _member_guards = Vec::with_capacity(sources.len());
        for (s, method) in sources.iter().zip(methods) {
            _member_guards.push(self.inflight.acquire(&s.snapshot_id)?);
            let record = snapshot_record(&s.snapshot_id, "", &s.volume, method, instant, id);
            members.push(self.snapshots.store.commit_create(&s.staging, record)?);
        }
        self.crash.reach("group:before-commit");
        let record = self.store.commit_create(
            staging,
            GroupSnapshotRecord {
                version: GROUP_RECORD_VERSION,
                id: id.to_owned(),
                name: name.to_owned(),
                members: sources
                    .iter()
                    .map(|s| GroupMember {
                        source_volume_id: s.volume.id.clone(),
                        snapshot_id: s.snapshot_id.clone(),
                    })
                    .collect(),
                created_unix: instant.as_secs(),
                created_nanos: instant.subsec_nanos(),
                freeze_micros: window.as_micros() as u64,
            },
        )?;
        Ok(GroupSnapshot { record, members })
    }

    fn with_members(&self, record: GroupSnapshotRecord) -> Result<GroupSnapshot> {
        let members = record
            .members
            .iter()
            .map(|m| {
                self.snapshots.store.get(&m.snapshot_id).ok_or_else(|| {
                    Error::Internal(format!(
                        "group snapshot {} lists snapshot {}, which is missing; delete the group and take it again",
                        record.id, m.snapshot_id
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GroupSnapshot { record, members })
    }

    pub fn group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<GroupSnapshot> {
        validate::required_str("group_snapshot_id", id)?;
        let record = self.store.get(id).ok_or_else(|| {
            Error::NotFound(format!("group snapshot {} does not exist", echo(id)))
        })?;
        check_snapshot_ids(&record, snapshot_ids)?;
        self.with_members(record)
    }

    /// Deletes a group snapshot and its members. The group record goes first (renamed out of
    /// sight), so a crash part-way leaves evidence from which startup finishes the members.
    pub fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<()> {
        validate::required_str("group_snapshot_id", id)?;
        if !is_group_id(id) {
            return Ok(());
        }
        let _guard = self.inflight.acquire(id)?;
        let Some(record) = self.store.get(id) else {
            return Ok(());
        };
        check_snapshot_ids(&record, snapshot_ids)?;
        // A restore reading a member holds it: the delete waits for it (ABORTED, retried).
        let _members = record
            .members
            .iter()
            .map(|m| self.inflight.acquire(&m.snapshot_id))
            .collect::<Result<Vec<_>>>()?;
        let Some(doomed) = self.store.retire(id)? else {
            return Ok(());
        };
        self.crash.reach("group:after-retire");
        for m in &record.members {
            if let Some(data) = self.snapshots.store.retire(&m.snapshot_id)? {
                self.reaper.remove(data);
            }
        }
        remove_object_dir(&doomed, self.backend.as_ref())?;
        tracing::info!(group_snapshot_id = %id, "group snapshot deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::CreateVolume;
    use crate::model::{AccessMode, CapacityRange, MIB};
    use crate::testing::{fixture, mount};

    fn volumes(f: &crate::testing::Fixture, names: &[&str]) -> Vec<String> {
        names
            .iter()
            .map(|n| {
                f.driver
                    .controller
                    .create_volume(CreateVolume {
                        name: (*n).into(),
                        capabilities: vec![mount(AccessMode::SingleNodeWriter)],
                        capacity: CapacityRange {
                            required: 16 * MIB,
                            limit: 0,
                        },
                        ..Default::default()
                    })
                    .unwrap()
                    .id
            })
            .collect()
    }

    /// A fixture holding a group snapshot of two volumes.
    fn group_of_two() -> (crate::testing::Fixture, GroupSnapshot) {
        let f = fixture();
        let ids = volumes(&f, &["a", "b"]);
        let g = f
            .driver
            .groups
            .create_group_snapshot("g", &ids, &BTreeMap::new())
            .unwrap();
        (f, g)
    }

    #[test]
    fn a_group_is_idempotent_by_name_and_sources_and_deleted_whole() {
        let f = fixture();
        let ids = volumes(&f, &["a", "b"]);
        let none = BTreeMap::new();
        let g = f
            .driver
            .groups
            .create_group_snapshot("g", &ids, &none)
            .unwrap();
        assert_eq!(g.members.len(), 2);
        assert!(g.members.iter().all(|m| m.group_snapshot_id == g.record.id));
        // The same sources in another order are the same group; other sources are not.
        let reversed: Vec<String> = ids.iter().rev().cloned().collect();
        assert_eq!(
            f.driver
                .groups
                .create_group_snapshot("g", &reversed, &none)
                .unwrap(),
            g
        );
        assert!(matches!(
            f.driver.groups.create_group_snapshot("g", &ids[..1], &none),
            Err(Error::AlreadyExists(_))
        ));
        let member = g.members[0].id.clone();
        assert!(matches!(
            f.driver.snapshots.delete_snapshot(&member),
            Err(Error::InvalidArgument(_))
        ));
        let snapshot_ids: Vec<String> = g.members.iter().map(|m| m.id.clone()).collect();
        assert!(matches!(
            f.driver
                .groups
                .delete_group_snapshot(&g.record.id, &snapshot_ids[..1]),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            f.driver
                .groups
                .group_snapshot(&g.record.id, &snapshot_ids)
                .unwrap(),
            g
        );
        f.driver
            .groups
            .delete_group_snapshot(&g.record.id, &snapshot_ids)
            .unwrap();
        assert!(f.driver.snapshots.get(&member).is_err());
        assert!(matches!(
            f.driver.groups.group_snapshot(&g.record.id, &snapshot_ids),
            Err(Error::NotFound(_))
        ));
        // Deleting what is gone, or was never a group, succeeds.
        f.driver
            .groups
            .delete_group_snapshot(&g.record.id, &snapshot_ids)
            .unwrap();
        f.driver
            .groups
            .delete_group_snapshot("not-a-group", &snapshot_ids)
            .unwrap();
    }

    #[test]
    fn bad_group_requests_are_refused_before_anything_is_made() {
        let f = fixture();
        let ids = volumes(&f, &["a"]);
        let none = BTreeMap::new();
        let cases: Vec<(&str, Vec<String>, BTreeMap<String, String>)> = vec![
            ("", ids.clone(), none.clone()),
            ("g", vec![], none.clone()),
            ("g", vec![ids[0].clone(), ids[0].clone()], none.clone()),
            ("g", vec![String::new()], none.clone()),
            (
                "g",
                ids.clone(),
                [("fsType".to_owned(), "xfs".to_owned())].into(),
            ),
        ];
        for (name, sources, params) in cases {
            assert!(
                matches!(
                    f.driver
                        .groups
                        .create_group_snapshot(name, &sources, &params),
                    Err(Error::InvalidArgument(_))
                ),
                "{name:?} {sources:?} {params:?}"
            );
        }
        assert!(matches!(
            f.driver.groups.create_group_snapshot(
                "g",
                &["vol-0123456789abcdef01234567".to_owned()],
                &none
            ),
            Err(Error::NotFound(_))
        ));
        assert!(f.driver.groups.store.is_empty());
        assert_eq!(f.driver.snapshots.count(), 0);
        assert!(matches!(
            f.driver.groups.group_snapshot("", &[]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn members_are_seen_only_while_their_group_is_committed() {
        let (f, g) = group_of_two();
        let listed = |f: &crate::testing::Fixture| {
            f.driver.snapshots.list_snapshots(0, "", "", "").unwrap().0
        };
        assert_eq!(listed(&f).len(), 2);
        // As while a delete is between retiring the group and its members.
        f.driver.groups.store.retire(&g.record.id).unwrap();
        assert!(listed(&f).is_empty());
        for m in &g.members {
            assert!(matches!(
                f.driver.snapshots.get(&m.id),
                Err(Error::NotFound(_))
            ));
            let by_source = f
                .driver
                .snapshots
                .list_snapshots(0, "", "", &m.source_volume_id)
                .unwrap()
                .0;
            assert!(by_source.is_empty());
            assert!(
                f.driver
                    .snapshots
                    .list_snapshots(0, "", &m.id, "")
                    .unwrap()
                    .0
                    .is_empty()
            );
            // With no group left, a member is an ordinary snapshot to delete.
            f.driver.snapshots.delete_snapshot(&m.id).unwrap();
        }
    }

    #[test]
    fn a_member_being_restored_holds_off_the_group_delete() {
        let (f, g) = group_of_two();
        let snapshot_ids: Vec<String> = g.members.iter().map(|m| m.id.clone()).collect();
        let restoring = f.driver.volumes.guard_shared(&snapshot_ids[1]).unwrap();
        assert!(matches!(
            f.driver
                .groups
                .delete_group_snapshot(&g.record.id, &snapshot_ids),
            Err(Error::Aborted(_))
        ));
        drop(restoring);
        f.driver
            .groups
            .delete_group_snapshot(&g.record.id, &snapshot_ids)
            .unwrap();
    }
}
