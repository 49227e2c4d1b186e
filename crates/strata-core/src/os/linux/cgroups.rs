//! The real cgroup filesystems under `--cgroup-root`: the blkio hierarchy of cgroup v1, or
//! the unified hierarchy of cgroup v2 where it has the io controller. Every directory
//! written to is checked to be on a cgroup filesystem, so a misconfigured root never writes
//! anywhere else.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use super::cstr;
use crate::host_error::{HostError, Result};
use crate::model::IoLimits;
use crate::os::cgroups::{
    CgroupRef, CgroupVersion, Cgroups, V1_FILES, io_max_line, parse_io_max, parse_v1_rules,
    pod_cgroup_candidates,
};

const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// The most of a cgroup file read (they hold a line per device).
const MAX_FILE: u64 = 64 * 1024;

pub struct LinuxCgroups {
    root: PathBuf,
}

impl LinuxCgroups {
    /// Cgroups under `root` (normally `/sys/fs/cgroup`; the host's, mounted into the
    /// container, in a DaemonSet).
    pub fn new(root: PathBuf) -> Self {
        LinuxCgroups { root }
    }

    fn fs_magic(path: &Path) -> Option<i64> {
        let c = cstr(path).ok()?;
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a writable statfs.
        let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        (r == 0).then_some(st.f_type as i64)
    }

    fn has_io_controller(dir: &Path) -> bool {
        fs::read_to_string(dir.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "io"))
    }

    /// The hierarchy that limits block I/O: v2 at the root, v1's blkio, or a v2 mounted
    /// beside v1 (`unified`) that has the io controller.
    fn hierarchy(&self) -> Result<(CgroupVersion, PathBuf)> {
        let root = &self.root;
        if Self::fs_magic(root) == Some(CGROUP2_SUPER_MAGIC) && Self::has_io_controller(root) {
            return Ok((CgroupVersion::V2, root.clone()));
        }
        let blkio = root.join("blkio");
        if Self::fs_magic(&blkio) == Some(CGROUP_SUPER_MAGIC) && blkio.join(V1_FILES[0].0).exists()
        {
            return Ok((CgroupVersion::V1, blkio));
        }
        let unified = root.join("unified");
        if Self::fs_magic(&unified) == Some(CGROUP2_SUPER_MAGIC)
            && Self::has_io_controller(&unified)
        {
            return Ok((CgroupVersion::V2, unified));
        }
        Err(HostError::Unsupported(format!(
            "no cgroup hierarchy that limits block I/O under {} (cgroup v1 blkio with throttling, or cgroup v2 with the io controller); mount the host's cgroup filesystem there (--cgroup-root)",
            root.display()
        )))
    }

    /// The directory of `cgroup`, checked to be on a cgroup filesystem of its version.
    fn dir(&self, cgroup: &CgroupRef) -> Result<Option<PathBuf>> {
        let (version, base) = self.hierarchy()?;
        if version != cgroup.version {
            return Err(HostError::Mismatch(format!(
                "cgroup {cgroup} was recorded under cgroup {:?}, but {} now has {version:?}",
                cgroup.version,
                self.root.display()
            )));
        }
        let dir = base.join(&cgroup.path);
        let want = match version {
            CgroupVersion::V1 => CGROUP_SUPER_MAGIC,
            CgroupVersion::V2 => CGROUP2_SUPER_MAGIC,
        };
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && Self::fs_magic(&dir) == Some(want) => Ok(Some(dir)),
            Ok(_) => Err(HostError::Mismatch(format!(
                "{} is not a cgroup directory",
                dir.display()
            ))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::io(format!("stat {}", dir.display()), e)),
        }
    }

    fn find(&self, paths: &[String]) -> Result<Option<CgroupRef>> {
        let (version, _) = self.hierarchy()?;
        for path in paths {
            let cgroup = CgroupRef {
                version,
                path: path.clone(),
            };
            if self.dir(&cgroup)?.is_some() {
                return Ok(Some(cgroup));
            }
        }
        Ok(None)
    }

    fn read(path: &Path) -> Result<String> {
        let mut text = String::new();
        fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE).read_to_string(&mut text))
            .map_err(|e| HostError::io(format!("read {}", path.display()), e))?;
        Ok(text)
    }

    /// Writes one line to a cgroup control file (the kernel takes it in one write).
    fn write(path: &Path, line: &str) -> Result<()> {
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| HostError::io(format!("write {line:?} to {}", path.display()), e))
    }
}

impl Cgroups for LinuxCgroups {
    fn pod_cgroup(&self, pod_uid: &str) -> Result<Option<CgroupRef>> {
        self.find(&pod_cgroup_candidates(pod_uid))
    }

    fn cgroup_at(&self, path: &str) -> Result<Option<CgroupRef>> {
        self.find(&[path.to_owned()])
    }

    fn set_limits(
        &self,
        cgroup: &CgroupRef,
        device: (u32, u32),
        limits: &IoLimits,
    ) -> Result<bool> {
        let Some(dir) = self.dir(cgroup)? else {
            return Ok(false);
        };
        let gone = |e: &HostError| matches!(e, HostError::Sys { errno, .. } if *errno == libc::ENOENT || *errno == libc::ENODEV);
        let result = match cgroup.version {
            CgroupVersion::V1 => V1_FILES.iter().try_for_each(|(file, value)| {
                let line = format!("{}:{} {}", device.0, device.1, value(limits));
                Self::write(&dir.join(file), &line)
            }),
            CgroupVersion::V2 => Self::write(&dir.join("io.max"), &io_max_line(device, limits)),
        };
        match result {
            Ok(()) => Ok(true),
            // The cgroup went away meanwhile (its pod ended), or the device did while its
            // rule was being removed: nothing is left to limit.
            Err(e) if gone(&e) => {
                if self.dir(cgroup)?.is_none() {
                    Ok(false)
                } else if limits.is_unlimited() {
                    Ok(true)
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    fn limits(&self, cgroup: &CgroupRef, device: (u32, u32)) -> Result<Option<IoLimits>> {
        let Some(dir) = self.dir(cgroup)? else {
            return Ok(None);
        };
        match cgroup.version {
            CgroupVersion::V1 => {
                let mut values = [0u64; 4];
                for (i, (file, _)) in V1_FILES.iter().enumerate() {
                    let text = Self::read(&dir.join(file))?;
                    values[i] = parse_v1_rules(&text)
                        .into_iter()
                        .find(|(d, _)| *d == device)
                        .map_or(0, |(_, v)| v);
                }
                Ok(Some(IoLimits {
                    read_bytes_per_second: values[0],
                    write_bytes_per_second: values[1],
                    read_iops: values[2],
                    write_iops: values[3],
                }))
            }
            CgroupVersion::V2 => Ok(Some(parse_io_max(
                &Self::read(&dir.join("io.max"))?,
                device,
            ))),
        }
    }
}
