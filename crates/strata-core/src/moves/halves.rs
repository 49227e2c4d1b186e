//! A node's halves of moves in its pool: one folder per side (`moves/in`, `moves/out`)
//! holding `<volume>.json`, the record of what was done, written atomically before it is
//! acted on, beside the data that belongs to it (`<volume>/`). Records of a version this
//! build does not know, or that do not parse, are removed at startup (what they describe
//! is then dropped or made again).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::durable::{sync_dir, write_atomic};
use crate::error::{Error, IoContext, Result};

/// A record of one half of a move: of one volume, at a version.
pub(crate) trait Half: Serialize + DeserializeOwned {
    const KIND: &'static str;
    const VERSION: u32;
    fn volume_id(&self) -> &str;
    fn version(&self) -> u32;
}

/// The folder of one side's halves.
pub(crate) struct Halves {
    dir: PathBuf,
}

/// What a folder held at startup: the records by volume id, and the names of everything
/// else in it (data, partial copies), for the caller to keep or remove.
pub(crate) struct Found<H> {
    pub records: BTreeMap<String, H>,
    pub others: Vec<String>,
}

impl Halves {
    /// The folder `side` of the pool's moves, made if missing.
    pub fn open(pool: &Path, side: &str) -> Result<Self> {
        let dir = pool.join(super::DIR).join(side);
        fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        Ok(Halves { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder's records, and the names of the other entries (not temp files).
    pub fn load<H: Half>(&self) -> Result<Found<H>> {
        let mut found = Found {
            records: BTreeMap::new(),
            others: vec![],
        };
        let dir = &self.dir;
        for entry in fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
            let entry = entry.ctx(|| format!("list {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                if !name.ends_with(".tmp") {
                    found.others.push(name);
                }
                continue;
            };
            let bytes = fs::read(entry.path()).ctx(|| format!("read {name}"))?;
            match serde_json::from_slice::<H>(&bytes) {
                Ok(h) if h.volume_id() == id && h.version() <= H::VERSION => {
                    found.records.insert(id.to_owned(), h);
                }
                _ => {
                    tracing::warn!(file = %name, kind = H::KIND, "removing a record of a move that does not parse");
                    fs::remove_file(entry.path()).ctx(|| format!("remove {name}"))?;
                }
            }
        }
        Ok(found)
    }

    /// Writes a record, durably.
    pub fn write<H: Half>(&self, half: &H) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(half)
            .map_err(|e| Error::Internal(format!("encode {}: {e}", H::KIND)))?;
        write_atomic(&self.dir, &format!("{}.json", half.volume_id()), &bytes)
    }

    /// Removes a record, durably. Idempotent.
    pub fn remove(&self, volume_id: &str) -> Result<()> {
        let json = self.dir.join(format!("{volume_id}.json"));
        match fs::remove_file(&json) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", json.display()), e)),
        }
    }
}
