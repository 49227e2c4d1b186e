//! What the store keeps and how it reads it back: the [`Record`] trait and its three kinds
//! (volumes, snapshots, group snapshots), reading an entry at startup (ours, not ours, or a
//! transient fault), and removing an object's directory.

use std::fs::{self};
use std::io::{self};
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ids::{is_group_id, is_snapshot_id, is_volume_id};
use crate::model::{
    FormatState, GROUP_RECORD_VERSION, GroupSnapshotRecord, SNAPSHOT_RECORD_VERSION,
    SnapshotRecord, VOLUME_RECORD_VERSION, VolumeRecord,
};

/// What the store keeps: a versioned JSON record with an id and a unique name (an empty name
/// is no name: such records are found by id only).
pub trait Record: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync {
    /// For messages: "volume", "snapshot".
    const KIND: &'static str;
    /// Folder of the pool holding these objects.
    const DIR: &'static str;
    /// File name of the record inside an object's directory.
    const FILE: &'static str;
    /// Newest schema version this build understands.
    const VERSION: u32;
    fn id(&self) -> &str;
    fn name(&self) -> &str;
    fn version(&self) -> u32;
    /// Whether `id` is an id of this kind that the driver could have generated.
    fn is_id(id: &str) -> bool;
    /// Brings the object's data in line with the record after a crash; says what it did.
    fn repair(&self, _dir: &Path, _backend: &dyn Backend) -> Result<Option<String>> {
        Ok(None)
    }
}

/// The accessors of a record type whose fields are named `id`, `name` and `version`.
macro_rules! record_fields {
    () => {
        fn id(&self) -> &str {
            &self.id
        }
        fn name(&self) -> &str {
            &self.name
        }
        fn version(&self) -> u32 {
            self.version
        }
    };
}

impl Record for VolumeRecord {
    const KIND: &'static str = "volume";
    const DIR: &'static str = "volumes";
    const FILE: &'static str = "volume.json";
    const VERSION: u32 = VOLUME_RECORD_VERSION;
    record_fields!();
    fn is_id(id: &str) -> bool {
        is_volume_id(id)
    }
    fn repair(&self, dir: &Path, backend: &dyn Backend) -> Result<Option<String>> {
        let holds_data = self.format != FormatState::Unformatted;
        backend.repair(dir, self.capacity_bytes, holds_data)
    }
}

impl Record for SnapshotRecord {
    const KIND: &'static str = "snapshot";
    const DIR: &'static str = "snapshots";
    const FILE: &'static str = "snapshot.json";
    const VERSION: u32 = SNAPSHOT_RECORD_VERSION;
    record_fields!();
    fn is_id(id: &str) -> bool {
        is_snapshot_id(id)
    }
}

impl Record for GroupSnapshotRecord {
    const KIND: &'static str = "group snapshot";
    const DIR: &'static str = "groups";
    const FILE: &'static str = "group.json";
    const VERSION: u32 = GROUP_RECORD_VERSION;
    record_fields!();
    fn is_id(id: &str) -> bool {
        is_group_id(id)
    }
}

/// A pool entry as startup finds it.
pub(super) enum Found<R> {
    /// A committed object, and what its repair did.
    Ours(R, Option<String>),
    /// Provably not a committed object of this store (no record, a record that does not
    /// parse or names another id): moved aside, never deleted.
    NotOurs(String),
}

/// Reads an entry's record. Only what proves the entry is not ours is `NotOurs`; an I/O
/// error is retried, then fails startup, so a transient fault never moves a healthy volume.
pub(super) fn read_record<R: Record>(name: &str, dir: &Path) -> Result<Found<R>> {
    if !R::is_id(name) {
        return Ok(Found::NotOurs(format!("{name:?} is not a {} id", R::KIND)));
    }
    let path = dir.join(R::FILE);
    let mut attempt = 0;
    let text = loop {
        match fs::read(&path) {
            Ok(text) => break text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Found::NotOurs(format!("no {}", R::FILE)));
            }
            Err(e) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(path = %path.display(), error = %e, attempt, "reading a record failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(50 << attempt));
            }
            Err(e) => {
                return Err(Error::Internal(format!(
                    "read {}: {e}; the pool cannot be read reliably: fix the I/O error and restart (nothing was moved)",
                    path.display()
                )));
            }
        }
    };
    let record: R = match serde_json::from_slice(&text) {
        Ok(r) => r,
        Err(e) => return Ok(Found::NotOurs(format!("{} does not parse: {e}", R::FILE))),
    };
    if record.version() > R::VERSION {
        return Err(Error::FailedPrecondition(format!(
            "{} has record version {}, newer than this Strata understands ({}); upgrade Strata",
            path.display(),
            record.version(),
            R::VERSION
        )));
    }
    if record.id() != name {
        return Ok(Found::NotOurs("its record names another id".into()));
    }
    Ok(Found::Ours(record, None))
}

pub(crate) fn encode<R: Record>(record: &R) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::Internal(format!("encode a {} record: {e}", R::KIND)))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Removes an object's directory and its data. Idempotent.
pub fn remove_object_dir(dir: &Path, backend: &dyn Backend) -> Result<()> {
    backend.destroy(dir)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", dir.display()), e)),
    }
}

/// A pool entry's name, path, and what reading it found.
type Scanned<R> = (String, PathBuf, Result<Found<R>>);

/// Reads and repairs committed entries on a few threads, keeping their order.
pub(super) fn load_all<R: Record>(
    entries: Vec<(String, PathBuf)>,
    backend: &dyn Backend,
) -> Result<Vec<Scanned<R>>> {
    const THREADS: usize = 8;
    let load = |name: &str, path: &Path| -> Result<Found<R>> {
        match read_record::<R>(name, path)? {
            Found::Ours(rec, _) => {
                let repaired = rec.repair(path, backend)?;
                Ok(Found::Ours(rec, repaired))
            }
            not_ours => Ok(not_ours),
        }
    };
    let chunk = entries.len().div_ceil(THREADS).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = entries
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(name, path)| (name.clone(), path.clone(), load(name, path)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(entries.len());
        for w in workers {
            // A lost worker would hide volumes from the index: refuse to start instead.
            all.extend(w.join().map_err(|_| {
                Error::Internal("the pool scan failed; see the log and restart".into())
            })?);
        }
        Ok(all)
    })
}
