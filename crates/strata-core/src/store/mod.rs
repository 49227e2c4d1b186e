//! The metadata store: one directory per object (volume or snapshot) under
//! `<pool>/volumes` or `<pool>/snapshots`, holding the backend's data and the JSON record.
//! Records are written atomically (temp file, fsync, rename, fsync of the directory) and an
//! in-memory index is rebuilt from disk at startup.
//!
//! Directory names carry the state of an operation, so a crash leaves evidence:
//! `.creating-<id>` is an object not yet committed, `.deleting-<id>` one being removed.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::Backend;
use crate::durable::{GroupCommit, sync_dir, write_atomic};
use crate::error::{Error, IoContext, Result};
use crate::model::{GroupSnapshotRecord, SnapshotRecord, VolumeRecord};

const CREATING: &str = ".creating-";
const DELETING: &str = ".deleting-";

mod record;

pub(crate) use record::encode as encode_record;
use record::{Found, encode, load_all};
pub use record::{Record, remove_object_dir};

/// What startup found and did about it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    /// Objects found committed and kept.
    pub records: usize,
    /// Creations interrupted by a crash, rolled back.
    pub rolled_back_creates: Vec<String>,
    /// Deletions interrupted by a crash, completed.
    pub completed_deletes: Vec<String>,
    /// Committed objects whose data the backend brought back in line with the record.
    pub repaired: Vec<String>,
    /// Directories that could not be accounted for, moved to `lost+found`.
    pub quarantined: Vec<String>,
}

struct Index<R> {
    by_id: BTreeMap<String, R>,
    by_name: HashMap<String, String>,
}

impl<R> Default for Index<R> {
    fn default() -> Self {
        Index {
            by_id: BTreeMap::new(),
            by_name: HashMap::new(),
        }
    }
}

impl<R: Record> Index<R> {
    fn insert(&mut self, record: R) {
        if !record.name().is_empty() {
            self.by_name
                .insert(record.name().to_owned(), record.id().to_owned());
        }
        self.by_id.insert(record.id().to_owned(), record);
    }

    fn remove(&mut self, id: &str) {
        if let Some(rec) = self.by_id.remove(id)
            && self.by_name.get(rec.name()).is_some_and(|i| i == id)
        {
            self.by_name.remove(rec.name());
        }
    }
}

pub struct Store<R: Record> {
    volumes: PathBuf,
    /// Renames in `volumes` made durable together (group commit).
    commits: GroupCommit,
    lost_found: PathBuf,
    index: RwLock<Index<R>>,
}

pub type VolumeStore = Store<VolumeRecord>;
pub type SnapshotStore = Store<SnapshotRecord>;
pub type GroupStore = Store<GroupSnapshotRecord>;

impl<R: Record> Store<R> {
    /// Opens the pool's store and reconciles it with what is on disk: half-done creates are
    /// rolled back, half-done deletes completed, committed objects repaired by the backend.
    pub fn open(pool: &Path, backend: &dyn Backend) -> Result<(Self, Reconciliation)> {
        let store = Store {
            volumes: pool.join(R::DIR),
            commits: GroupCommit::new(pool.join(R::DIR)),
            lost_found: pool.join("lost+found"),
            index: RwLock::new(Index::default()),
        };
        fs::create_dir_all(&store.volumes).ctx(|| format!("create {}", store.volumes.display()))?;
        let report = store.reconcile(backend)?;
        Ok((store, report))
    }

    /// Ids of the objects whose creation or deletion a crash interrupted, read before
    /// [`open`](Self::open) completes them (it removes the evidence).
    pub fn interrupted(pool: &Path) -> Result<Vec<String>> {
        let dir = pool.join(R::DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
        };
        let mut ids = vec![];
        for entry in entries {
            let name = entry
                .ctx(|| format!("list {}", dir.display()))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if let Some(id) = name
                .strip_prefix(CREATING)
                .or_else(|| name.strip_prefix(DELETING))
            {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    fn reconcile(&self, backend: &dyn Backend) -> Result<Reconciliation> {
        let mut report = Reconciliation::default();
        let mut index = Index::default();
        let mut committed = vec![];
        let entries =
            fs::read_dir(&self.volumes).ctx(|| format!("list {}", self.volumes.display()))?;
        for entry in entries {
            let entry = entry.ctx(|| format!("list {}", self.volumes.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(id) = name.strip_prefix(CREATING) {
                tracing::warn!(
                    kind = R::KIND,
                    id,
                    "rolling back a creation interrupted by a crash"
                );
                remove_object_dir(&path, backend)?;
                report.rolled_back_creates.push(id.to_owned());
            } else if let Some(id) = name.strip_prefix(DELETING) {
                tracing::info!(
                    kind = R::KIND,
                    id,
                    "completing a deletion interrupted by a crash"
                );
                remove_object_dir(&path, backend)?;
                report.completed_deletes.push(id.to_owned());
            } else if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
            } else {
                committed.push((name, path));
            }
        }
        // Reading records and checking data is I/O bound: spread it over a few threads, which
        // matters on a cold page cache with thousands of volumes.
        for (name, path, loaded) in load_all::<R>(committed, backend)? {
            match loaded? {
                Found::Ours(rec, repaired) => {
                    if !rec.name().is_empty()
                        && let Some(other) = index.by_name.get(rec.name())
                    {
                        // Impossible unless the pool was edited by hand: keep the first.
                        tracing::error!(kind = R::KIND, id = rec.id(), other = %other, name = rec.name(),
                            "two objects share a name; quarantining the second");
                        report.quarantined.push(self.quarantine(&path, &name)?);
                        continue;
                    }
                    if let Some(done) = repaired {
                        tracing::warn!(kind = R::KIND, id = rec.id(), %done, "repaired after a crash");
                        report.repaired.push(rec.id().to_owned());
                    }
                    index.insert(rec);
                }
                Found::NotOurs(why) => {
                    tracing::error!(entry = %name, %why,
                        "cannot account for a pool entry; moving it to lost+found");
                    report.quarantined.push(self.quarantine(&path, &name)?);
                }
            }
        }
        if !report.rolled_back_creates.is_empty() || !report.completed_deletes.is_empty() {
            sync_dir(&self.volumes)?;
        }
        report.records = index.by_id.len();
        *self.write_index() = index;
        Ok(report)
    }

    /// Moves an unexplained entry aside, never deleting data; returns where it went.
    fn quarantine(&self, path: &Path, name: &str) -> Result<String> {
        fs::create_dir_all(&self.lost_found)
            .ctx(|| format!("create {}", self.lost_found.display()))?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dest = self.lost_found.join(format!("{name}.{stamp}"));
        fs::rename(path, &dest).ctx(|| format!("move {} to {}", path.display(), dest.display()))?;
        sync_dir(&self.volumes)?;
        Ok(dest.display().to_string())
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index<R>> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index<R>> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory of a committed object.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.volumes.join(id)
    }

    pub fn get(&self, id: &str) -> Option<R> {
        self.read_index().by_id.get(id).cloned()
    }

    pub fn find_by_name(&self, name: &str) -> Option<R> {
        let index = self.read_index();
        index
            .by_name
            .get(name)
            .and_then(|id| index.by_id.get(id))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.read_index().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every record matching `keep`, in id order.
    pub fn filter(&self, keep: impl Fn(&R) -> bool) -> Vec<R> {
        self.read_index()
            .by_id
            .values()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    }

    /// Up to `max` records with ids after `after`, in id order, and whether more follow.
    /// Paging by the last id seen stays correct while volumes come and go between pages.
    pub fn page(&self, after: Option<&str>, max: usize) -> (Vec<R>, bool) {
        let index = self.read_index();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut iter = index
            .by_id
            .range::<str, _>((lower, Bound::Unbounded))
            .map(|(_, r)| r);
        let page: Vec<R> = iter.by_ref().take(max).cloned().collect();
        let more = iter.next().is_some();
        (page, more)
    }

    /// Starts a creation: returns a fresh directory for the backend to fill. Until
    /// [`commit_create`](Self::commit_create) a crash rolls it back.
    pub fn begin_create(&self, id: &str) -> Result<PathBuf> {
        let dir = self.volumes.join(format!("{CREATING}{id}"));
        fs::create_dir(&dir).ctx(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Makes a creation durable and visible: writes the record, renames the directory to the
    /// volume id and syncs the parent.
    pub fn commit_create(&self, staging: &Path, record: R) -> Result<R> {
        // The directory is not visible yet, so the record needs no temp file: the rename of
        // the directory is what makes the creation atomic.
        let path = staging.join(R::FILE);
        let bytes = encode(&record)?;
        File::create_new(&path)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
            .ctx(|| format!("write {}", path.display()))?;
        sync_dir(staging)?;
        let dir = self.dir(record.id());
        fs::rename(staging, &dir).ctx(|| format!("commit {}", dir.display()))?;
        self.commits.sync()?;
        self.write_index().insert(record.clone());
        Ok(record)
    }

    /// Makes an object filled elsewhere in the pool (`dir`, on the same filesystem) durable
    /// and visible under `record`'s id, as [`commit_create`](Self::commit_create) does for a
    /// staging directory: the record is written into it, then it is renamed in. A crash
    /// leaves it either where it was or committed. Already committed: nothing to do.
    pub fn adopt(&self, dir: &Path, record: R) -> Result<R> {
        if let Some(existing) = self.get(record.id()) {
            return Ok(existing);
        }
        let bytes = encode(&record)?;
        write_atomic(dir, R::FILE, &bytes)?;
        let target = self.dir(record.id());
        fs::rename(dir, &target).ctx(|| format!("commit {}", target.display()))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        self.commits.sync()?;
        self.write_index().insert(record.clone());
        Ok(record)
    }

    /// Rolls back a creation that failed before its commit.
    pub fn abort_create(&self, staging: &Path, backend: &dyn Backend) {
        if let Err(e) = remove_object_dir(staging, backend) {
            tracing::error!(dir = %staging.display(), error = %e,
                "could not roll back a failed creation; startup will retry");
        }
    }

    /// Rewrites a committed object's record.
    pub fn update(&self, record: R) -> Result<()> {
        write_atomic(&self.dir(record.id()), R::FILE, &encode(&record)?)?;
        self.write_index()
            .by_id
            .insert(record.id().to_owned(), record);
        Ok(())
    }

    /// Deletes an object from the store: renames its directory out of sight, durably, and
    /// forgets it. Returns the renamed directory, whose data the caller removes with
    /// [`remove_object_dir`] (a crash before that is completed at startup).
    pub fn retire(&self, id: &str) -> Result<Option<PathBuf>> {
        let dir = self.dir(id);
        let doomed = self.volumes.join(format!("{DELETING}{id}"));
        let retired = match fs::rename(&dir, &doomed) {
            Ok(()) => {
                self.commits.sync()?;
                Some(doomed)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("delete {}", dir.display()), e)),
        };
        self.write_index().remove(id);
        Ok(retired)
    }

    /// Deletes an object and its data at once.
    pub fn delete(&self, id: &str, backend: &dyn Backend) -> Result<()> {
        match self.retire(id)? {
            Some(doomed) => remove_object_dir(&doomed, backend),
            None => Ok(()),
        }
    }
}

impl SnapshotStore {
    /// Removes the member snapshots of groups whose creation or deletion a crash interrupted
    /// (`interrupted` read from `groups/` before the group store completes it). Members of a
    /// group with no trace at all are kept and reported: nothing proves they are not wanted.
    pub(crate) fn release_group_members(
        &self,
        interrupted: &[String],
        backend: &dyn Backend,
    ) -> Result<Vec<String>> {
        let members = self.filter(|s| {
            !s.group_snapshot_id.is_empty() && interrupted.contains(&s.group_snapshot_id)
        });
        let mut released = vec![];
        for m in members {
            tracing::warn!(snapshot_id = %m.id, group = %m.group_snapshot_id,
                "removing a member of a group snapshot a crash interrupted");
            self.delete(&m.id, backend)?;
            released.push(m.id);
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::image::ImageBackend;
    use crate::ids::new_volume_id;
    use crate::model::{FormatState, VOLUME_RECORD_VERSION};
    use crate::os::fake::FakeHost;

    fn backend(pool: &Path) -> ImageBackend {
        ImageBackend::new(pool.to_owned(), FakeHost::new().host())
    }

    fn record(id: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            version: VOLUME_RECORD_VERSION,
            id: id.into(),
            name: name.into(),
            capacity_bytes: 1 << 20,
            parameters: Default::default(),
            created_unix: 0,
            format: FormatState::Unformatted,
            content_source: None,
            resize_pending: false,
            mount_group: None,
            mount_group_current: false,
            io_limits: Default::default(),
            throttled: vec![],
            encryption: None,
        }
    }

    fn create(store: &VolumeStore, name: &str) -> VolumeRecord {
        let id = new_volume_id(&crate::ids::NodeHint::of("test"));
        let dir = store.begin_create(&id).unwrap();
        store.commit_create(&dir, record(&id, name)).unwrap()
    }

    #[test]
    fn records_survive_reopen_and_half_done_work_is_reconciled() {
        let pool = tempfile::tempdir().unwrap();
        let (store, report) = VolumeStore::open(pool.path(), &backend(pool.path())).unwrap();
        assert_eq!(report, Reconciliation::default());
        let a = create(&store, "a");
        let b = create(&store, "b");
        // A creation that never committed, and a deletion cut short.
        let half = store
            .begin_create(&new_volume_id(&crate::ids::NodeHint::of("test")))
            .unwrap();
        fs::write(half.join("image"), b"x").unwrap();
        fs::rename(
            store.dir(&b.id),
            pool.path()
                .join("volumes")
                .join(format!(".deleting-{}", b.id)),
        )
        .unwrap();
        // Something nobody can explain.
        fs::create_dir(pool.path().join("volumes/mystery")).unwrap();
        drop(store);

        let (store, report) = VolumeStore::open(pool.path(), &backend(pool.path())).unwrap();
        assert_eq!(report.records, 1);
        assert_eq!(report.rolled_back_creates.len(), 1);
        assert_eq!(report.completed_deletes, vec![b.id.clone()]);
        assert_eq!(report.quarantined.len(), 1);
        assert!(!half.exists());
        assert_eq!(store.find_by_name("a").unwrap(), a);
        assert!(store.find_by_name("b").is_none());
        assert_eq!(
            fs::read_dir(pool.path().join("lost+found"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn pages_continue_after_the_last_id_even_when_it_is_gone() {
        let pool = tempfile::tempdir().unwrap();
        let (store, _) = VolumeStore::open(pool.path(), &backend(pool.path())).unwrap();
        let mut ids: Vec<String> = (0..5)
            .map(|i| create(&store, &format!("v{i}")).id)
            .collect();
        ids.sort();
        let (first, more) = store.page(None, 2);
        assert!(more);
        assert_eq!(
            first.iter().map(|r| &r.id).collect::<Vec<_>>(),
            vec![&ids[0], &ids[1]]
        );
        store.delete(&ids[1], &backend(pool.path())).unwrap();
        let (second, more) = store.page(Some(&ids[1]), 2);
        assert!(more);
        assert_eq!(second[0].id, ids[2]);
        let (last, more) = store.page(Some(&ids[3]), 2);
        assert!(!more);
        assert_eq!(last.len(), 1);
    }

    #[test]
    fn an_unreadable_record_fails_startup_and_moves_nothing() {
        let pool = tempfile::tempdir().unwrap();
        let (store, _) = VolumeStore::open(pool.path(), &backend(pool.path())).unwrap();
        let a = create(&store, "a");
        // A record that cannot be read (EISDIR standing in for EIO): not proof that the
        // entry is foreign, so it is neither quarantined nor dropped from the index.
        let record = store.dir(&a.id).join(VolumeRecord::FILE);
        fs::rename(&record, pool.path().join("saved.json")).unwrap();
        fs::create_dir(&record).unwrap();
        drop(store);
        let err = VolumeStore::open(pool.path(), &backend(pool.path()))
            .err()
            .expect("startup fails");
        assert!(err.to_string().contains("nothing was moved"), "{err}");
        assert!(store_dir_exists(pool.path(), &a.id));
        assert!(!pool.path().join("lost+found").exists());
        // The fault gone, the volume is back as it was.
        fs::remove_dir(&record).unwrap();
        fs::rename(pool.path().join("saved.json"), &record).unwrap();
        let (store, report) = VolumeStore::open(pool.path(), &backend(pool.path())).unwrap();
        assert_eq!(report.quarantined.len(), 0);
        assert_eq!(store.find_by_name("a").unwrap(), a);
    }

    fn store_dir_exists(pool: &Path, id: &str) -> bool {
        pool.join("volumes").join(id).is_dir()
    }

    #[test]
    fn newer_record_versions_are_refused() {
        let pool = tempfile::tempdir().unwrap();
        let (store, _) = VolumeStore::open(pool.path(), &backend(pool.path())).unwrap();
        let mut rec = create(&store, "a");
        rec.version = VOLUME_RECORD_VERSION + 1;
        store.update(rec).unwrap();
        drop(store);
        assert!(matches!(
            VolumeStore::open(pool.path(), &backend(pool.path())),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn empty_images_lost_in_a_crash_are_recreated_and_data_is_never_invented() {
        let pool = tempfile::tempdir().unwrap();
        let b = backend(pool.path());
        let (store, _) = VolumeStore::open(pool.path(), &b).unwrap();
        let mk = |name: &str| {
            let id = new_volume_id(&crate::ids::NodeHint::of("test"));
            let dir = store.begin_create(&id).unwrap();
            b.create(&dir, 1 << 20).unwrap();
            store.commit_create(&dir, record(&id, name)).unwrap()
        };
        let (lost, short, formatted) = (mk("lost"), mk("short"), mk("formatted"));
        let mut rec = formatted.clone();
        rec.format = FormatState::Formatted("ext4".into());
        store.update(rec).unwrap();
        fs::remove_file(store.dir(&lost.id).join("image")).unwrap();
        File::options()
            .write(true)
            .open(store.dir(&short.id).join("image"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        fs::remove_file(store.dir(&formatted.id).join("image")).unwrap();
        drop(store);

        let (store, report) = VolumeStore::open(pool.path(), &b).unwrap();
        let mut repaired = report.repaired.clone();
        repaired.sort();
        let mut want = vec![lost.id.clone(), short.id.clone()];
        want.sort();
        assert_eq!(repaired, want);
        for v in [&lost, &short] {
            assert_eq!(
                fs::metadata(store.dir(&v.id).join("image")).unwrap().len(),
                1 << 20
            );
        }
        assert!(!store.dir(&formatted.id).join("image").exists());
        assert!(b.condition(&store.dir(&formatted.id), 1 << 20).is_some());
    }
}
