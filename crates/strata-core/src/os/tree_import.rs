//! Applies a [`tree_stream`](crate::tree_stream) from another node under a new volume's
//! empty data directory. Everything is made relative to descriptors of directories this
//! import created (`mkdirat`, then opened with `O_NOFOLLOW`), files with `O_EXCL`, so no
//! name in the stream can reach outside the volume, whatever symlinks it also carries
//! (those are made as they are, never followed). A directory's mode, owner and time are
//! set when it is complete, so a read-only directory still receives its entries.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::tree::open_at;
use crate::tree_stream::{Attrs, Decoder, Event, Malformed};

/// Why an import stopped.
#[derive(Debug)]
pub enum ImportError {
    /// The stream is not one this build writes (the sender's fault).
    Malformed(Malformed),
    /// More than the volume may hold: file data, and [`ENTRY_BYTES`] and the name for each
    /// entry (so a stream of endless empty files stops too).
    TooLarge { limit: u64 },
    /// The filesystem refused (what, and its error).
    Io(String, io::Error),
}

impl From<Malformed> for ImportError {
    fn from(m: Malformed) -> Self {
        ImportError::Malformed(m)
    }
}

fn named(name: &[u8]) -> Result<CString, ImportError> {
    // The decoder checked the name; NUL cannot be in it.
    CString::new(name)
        .map_err(|_| ImportError::Malformed(Malformed("a name holding NUL".to_owned())))
}

fn io_err(what: &str, name: &[u8]) -> impl FnOnce(io::Error) -> ImportError {
    let what = format!("{what} {}", String::from_utf8_lossy(name));
    move |e| ImportError::Io(what, e)
}

fn set_times(fd: libc::c_int, name: Option<&CString>, a: &Attrs) -> io::Result<()> {
    let times = [
        // Access time: now (it is not kept).
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: a.mtime_seconds as libc::time_t,
            tv_nsec: a.mtime_nanoseconds as libc::c_long,
        },
    ];
    // SAFETY: times holds two timespecs; name, when given, is NUL-terminated.
    let rc = unsafe {
        match name {
            Some(n) => libc::utimensat(fd, n.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW),
            None => libc::futimens(fd, times.as_ptr()),
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Owner, then mode (chown clears set-id bits), then time, of an open file or directory.
fn finish(file: &File, a: &Attrs) -> io::Result<()> {
    // SAFETY: plain syscalls on a descriptor we own.
    if unsafe { libc::fchown(file.as_raw_fd(), a.uid, a.gid) } < 0
        || unsafe { libc::fchmod(file.as_raw_fd(), a.mode & 0o7777) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    set_times(file.as_raw_fd(), None, a)
}

/// What each entry (directory, file, symlink) counts against the limit besides its name
/// and a symlink's target: about an inode's size.
pub const ENTRY_BYTES: u64 = 256;

/// An import under way: fed the stream in order, across resumed streams.
pub struct TreeImport {
    decoder: Decoder,
    /// Open directories, the root first, with the attributes each gets when complete.
    dirs: Vec<(File, Attrs)>,
    root: File,
    /// The file being written and its attributes.
    file: Option<(File, Attrs)>,
    /// File data written.
    data_bytes: u64,
    /// File data and entries' charges, against `limit`.
    charged: u64,
    limit: u64,
}

impl TreeImport {
    /// An import into the empty directory `root`, taking at most `limit` bytes of file data
    /// and entries.
    pub fn new(root: File, limit: u64) -> Self {
        TreeImport {
            decoder: Decoder::new(),
            dirs: vec![],
            root,
            file: None,
            data_bytes: 0,
            charged: 0,
            limit,
        }
    }

    /// Stream bytes taken so far: where a resumed stream must start.
    pub fn position(&self) -> u64 {
        self.decoder.taken()
    }

    /// File data written so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Whether the whole tree has arrived.
    pub fn finished(&self) -> bool {
        self.decoder.finished()
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), ImportError> {
        let TreeImport {
            decoder,
            dirs,
            root,
            file,
            data_bytes,
            charged,
            limit,
        } = self;
        decoder.feed(bytes, &mut |event| {
            *charged += charge(&event);
            if *charged > *limit {
                return Err(ImportError::TooLarge { limit: *limit });
            }
            apply(event, root, dirs, file, data_bytes)
        })
    }

    /// Flushes everything written to the disk (the whole filesystem: a tree is many files).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(self.root.as_raw_fd()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What `event` counts against the limit.
fn charge(event: &Event<'_>) -> u64 {
    match event {
        Event::Dir { name, .. } | Event::File { name, .. } => ENTRY_BYTES + name.len() as u64,
        Event::Symlink { name, target, .. } => ENTRY_BYTES + (name.len() + target.len()) as u64,
        Event::Data { bytes, .. } => bytes.len() as u64,
        Event::Root(_) | Event::EndDir | Event::EndFile => 0,
    }
}

fn apply(
    event: Event<'_>,
    root: &File,
    dirs: &mut Vec<(File, Attrs)>,
    file: &mut Option<(File, Attrs)>,
    data_bytes: &mut u64,
) -> Result<(), ImportError> {
    let parent = |dirs: &Vec<(File, Attrs)>| dirs.last().map(|(d, _)| d.as_raw_fd());
    match event {
        Event::Root(attrs) => {
            let copy = root
                .try_clone()
                .map_err(|e| ImportError::Io("hold the new volume's root".into(), e))?;
            dirs.push((copy, attrs));
        }
        Event::Dir { attrs, name } => {
            let c = named(name)?;
            let at = parent(dirs).unwrap_or(root.as_raw_fd());
            // SAFETY: c is NUL-terminated.
            if unsafe { libc::mkdirat(at, c.as_ptr(), 0o700) } < 0 {
                return Err(io_err("create directory", name)(io::Error::last_os_error()));
            }
            let dir = open_at(
                at,
                &c,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(io_err("open directory", name))?;
            dirs.push((dir, attrs));
        }
        Event::EndDir => {
            if let Some((dir, attrs)) = dirs.pop() {
                finish(&dir, &attrs)
                    .map_err(|e| ImportError::Io("set the attributes of a directory".into(), e))?;
            }
        }
        Event::File { attrs, name, size } => {
            let c = named(name)?;
            let at = parent(dirs).unwrap_or(root.as_raw_fd());
            let f = open_at(
                at,
                &c,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
            .map_err(io_err("create file", name))?;
            f.set_len(size).map_err(io_err("size file", name))?;
            *file = Some((f, attrs));
        }
        Event::Data { offset, bytes } => {
            if bytes.is_empty() {
                return Ok(());
            }
            *data_bytes += bytes.len() as u64;
            if let Some((f, _)) = file.as_ref() {
                f.write_all_at(bytes, offset)
                    .map_err(|e| ImportError::Io(format!("write file data at {offset}"), e))?;
            }
        }
        Event::EndFile => {
            if let Some((f, attrs)) = file.take() {
                finish(&f, &attrs)
                    .map_err(|e| ImportError::Io("set the attributes of a file".into(), e))?;
            }
        }
        Event::Symlink {
            attrs,
            name,
            target,
        } => {
            let c = named(name)?;
            let t = named(target)?;
            let at = parent(dirs).unwrap_or(root.as_raw_fd());
            // SAFETY: both strings are NUL-terminated.
            if unsafe { libc::symlinkat(t.as_ptr(), at, c.as_ptr()) } < 0
                || unsafe {
                    libc::fchownat(
                        at,
                        c.as_ptr(),
                        attrs.uid,
                        attrs.gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                } < 0
            {
                return Err(io_err("create symlink", name)(io::Error::last_os_error()));
            }
            set_times(at, Some(&c), &attrs).map_err(io_err("time symlink", name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "tree_import_tests.rs"]
mod tests;
