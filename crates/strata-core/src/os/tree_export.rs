//! Writes a directory tree as a [`tree_stream`](crate::tree_stream), cut into chunks for the
//! peer service. The tree is a snapshot or a held copy, so the same walk gives the same bytes
//! each time: a broken stream resumes at a byte offset by walking again and skipping what was
//! sent (file data skipped is not even read). Entries are reached as in `os::tree`: from
//! their parent's descriptor with `O_NOFOLLOW`, typed by the descriptor opened, so nothing
//! outside the tree is ever read. Names are sent in byte order; special files (sockets,
//! FIFOs, devices) are not data and are left out, as a local copy leaves them.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::extents::next_data;
use super::tree::{entries, found_at, fstat, reopen};
use crate::tree_stream::{self as ts, Attrs, MAX_DEPTH, MAX_TARGET};

/// A chunk of the stream, at its byte offset in it.
pub struct StreamChunk<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
}

/// What a finished walk sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sent {
    /// Bytes sent (from the starting offset on).
    pub bytes: u64,
    pub chunks: u64,
}

/// Why a walk stopped.
#[derive(Debug)]
pub enum Stopped {
    /// The receiver is gone (`send` said so).
    Receiver,
    /// The tree could not be read.
    Io(io::Error),
}

impl From<io::Error> for Stopped {
    fn from(e: io::Error) -> Self {
        Stopped::Io(e)
    }
}

/// The stream as it is cut: bytes before `from` are counted, not sent.
struct Out<'a> {
    buf: Vec<u8>,
    chunk: usize,
    /// Stream offset of `buf`'s first byte.
    at: u64,
    from: u64,
    sent: Sent,
    send: &'a mut dyn FnMut(StreamChunk<'_>) -> bool,
}

impl Out<'_> {
    /// Offset of the next byte written.
    fn position(&self) -> u64 {
        self.at + self.buf.len() as u64
    }

    fn write(&mut self, mut bytes: &[u8]) -> Result<(), Stopped> {
        let skip = self
            .from
            .saturating_sub(self.position())
            .min(bytes.len() as u64) as usize;
        if skip > 0 {
            self.at += skip as u64;
            bytes = &bytes[skip..];
        }
        while !bytes.is_empty() {
            let n = (self.chunk - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == self.chunk {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Whether `len` bytes from here fall wholly before `from` (skipped without reading).
    fn skips(&mut self, len: u64) -> bool {
        if self.buf.is_empty() && self.position() + len <= self.from {
            self.at += len;
            return true;
        }
        false
    }

    fn flush(&mut self) -> Result<(), Stopped> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = StreamChunk {
            offset: self.at,
            bytes: &self.buf,
        };
        if !(self.send)(chunk) {
            return Err(Stopped::Receiver);
        }
        self.sent.bytes += self.buf.len() as u64;
        self.sent.chunks += 1;
        self.at += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

fn attrs(st: &libc::stat) -> Attrs {
    Attrs {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_seconds: st.st_mtime,
        mtime_nanoseconds: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
    }
}

struct Walk<'a, 'b> {
    out: &'a mut Out<'b>,
    header: Vec<u8>,
    data: Vec<u8>,
}

impl Walk<'_, '_> {
    fn emit(&mut self, build: impl FnOnce(&mut Vec<u8>)) -> Result<(), Stopped> {
        self.header.clear();
        build(&mut self.header);
        let header = std::mem::take(&mut self.header);
        let written = self.out.write(&header);
        self.header = header;
        written
    }

    fn dir(&mut self, dir: &File, depth: usize) -> Result<(), Stopped> {
        let mut names = entries(dir)?;
        names.sort();
        for name in names {
            self.entry(dir, &name, depth)?;
        }
        Ok(())
    }

    fn entry(&mut self, dir: &File, name: &CStr, depth: usize) -> Result<(), Stopped> {
        let bytes = name.to_bytes();
        if !ts::valid_name(bytes) {
            return Ok(());
        }
        let Some((found, st)) = found_at(dir, name)? else {
            return Ok(());
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let Some(sub) = reopen(&found, libc::O_RDONLY | libc::O_DIRECTORY)? else {
                    return Ok(());
                };
                if depth + 1 >= MAX_DEPTH {
                    return Err(io::Error::other(format!(
                        "the tree is deeper than {MAX_DEPTH} directories"
                    ))
                    .into());
                }
                self.emit(|h| ts::dir(h, &attrs(&st), bytes))?;
                self.dir(&sub, depth + 1)?;
                self.emit(ts::end_dir)
            }
            libc::S_IFREG => {
                let Some(file) = reopen(&found, libc::O_RDONLY)? else {
                    return Ok(());
                };
                let st = fstat(&file)?;
                let size = st.st_size.max(0) as u64;
                self.emit(|h| ts::file(h, &attrs(&st), bytes, size))?;
                self.file_data(&file, size)?;
                self.emit(ts::end_file)
            }
            libc::S_IFLNK => {
                let mut target = vec![0u8; MAX_TARGET + 1];
                // SAFETY: readlinkat on the O_PATH descriptor of the link itself (empty
                // name) writes at most target.len() bytes.
                let n = unsafe {
                    libc::readlinkat(
                        found.as_raw_fd(),
                        c"".as_ptr(),
                        target.as_mut_ptr().cast(),
                        target.len(),
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error().into());
                }
                let n = n as usize;
                if n == 0 || n > MAX_TARGET {
                    return Ok(());
                }
                self.emit(|h| ts::symlink(h, &attrs(&st), bytes, &target[..n]))
            }
            _ => {
                tracing::warn!(name = %String::from_utf8_lossy(bytes),
                    "leaving a special file out of a copy to another node");
                Ok(())
            }
        }
    }

    /// The file's allocated ranges as data records.
    fn file_data(&mut self, file: &File, size: u64) -> Result<(), Stopped> {
        let mut at = 0;
        while at < size {
            let Some((start, stop)) = next_data(file, at)? else {
                break;
            };
            let stop = stop.min(size);
            let mut offset = start;
            while offset < stop {
                let len = (stop - offset).min(self.data.len() as u64) as u32;
                self.emit(|h| ts::data_header(h, offset, len))?;
                if !self.out.skips(u64::from(len)) {
                    let buf = &mut self.data[..len as usize];
                    file.read_exact_at(buf, offset)?;
                    self.out.write(buf)?;
                }
                offset += u64::from(len);
            }
            at = stop.max(at + 1);
        }
        Ok(())
    }
}

/// Streams the tree under `root` from stream offset `from` on, in chunks of `chunk_bytes`
/// (the last may be shorter). `send` returns `false` when the receiver is gone.
pub fn export(
    root: &File,
    from: u64,
    chunk_bytes: usize,
    send: &mut dyn FnMut(StreamChunk<'_>) -> bool,
) -> Result<Sent, Stopped> {
    let chunk = chunk_bytes.max(64);
    let mut out = Out {
        buf: Vec::with_capacity(chunk),
        chunk,
        at: 0,
        from,
        sent: Sent::default(),
        send,
    };
    let mut walk = Walk {
        out: &mut out,
        header: Vec::with_capacity(512),
        data: vec![0u8; chunk.min(ts::MAX_DATA as usize)],
    };
    let st = fstat(root)?;
    walk.emit(|h| ts::start(h, &attrs(&st)))?;
    walk.dir(root, 0)?;
    walk.emit(ts::end_dir)?;
    out.flush()?;
    Ok(out.sent)
}

/// Bytes allocated under `root` (like `du`), walked as [`export`] walks it.
pub fn allocated(root: &File) -> io::Result<u64> {
    fn under(dir: &File, depth: usize) -> io::Result<u64> {
        if depth >= MAX_DEPTH {
            return Err(io::Error::other(format!(
                "the tree is deeper than {MAX_DEPTH} directories"
            )));
        }
        let mut total = 0;
        for name in entries(dir)? {
            let Some((found, st)) = found_at(dir, &name)? else {
                continue;
            };
            total += st.st_blocks.max(0) as u64 * 512;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR
                && let Some(sub) = reopen(&found, libc::O_RDONLY | libc::O_DIRECTORY)?
            {
                total += under(&sub, depth + 1)?;
            }
        }
        Ok(total)
    }
    Ok(fstat(root)?.st_blocks.max(0) as u64 * 512 + under(root, 0)?)
}
