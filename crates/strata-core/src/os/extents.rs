//! The allocated ranges of a file, found with SEEK_DATA and SEEK_HOLE on an open file, and
//! where its blocks are on disk, found with FIEMAP (the file held is the one read: nothing is
//! looked up by path again).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The first range of data at or after `from`: `(start, end)`, or `None` when only a hole
/// remains. Filesystems without hole tracking report the whole file as data.
pub fn next_data(file: &File, from: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let from = i64::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on an fd this function borrows.
    let data = unsafe { libc::lseek(fd, from, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((data as u64, hole as u64)))
}

/// Bytes allocated to the file (what a copy of its data ranges moves).
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

/// One extent of a file as FIEMAP reports it: `length` bytes at `logical` in the file, kept
/// at `physical` on the filesystem's device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// FIEMAP flags an extent may carry.
pub mod flags {
    pub const LAST: u32 = 0x1;
    pub const UNKNOWN: u32 = 0x2;
    pub const DELALLOC: u32 = 0x4;
    pub const ENCODED: u32 = 0x8;
    pub const DATA_ENCRYPTED: u32 = 0x80;
    pub const NOT_ALIGNED: u32 = 0x100;
    pub const DATA_INLINE: u32 = 0x200;
    pub const DATA_TAIL: u32 = 0x400;
    pub const UNWRITTEN: u32 = 0x800;
    pub const SHARED: u32 = 0x2000;
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    /// Preallocated and never written: reads as zeros, as a hole does.
    pub fn reads_as_zeros(&self) -> bool {
        self.flags & flags::UNWRITTEN != 0
    }

    /// Whether `physical` says where the data is: not when it is not yet allocated, packed
    /// with other data, or transformed on the way to the disk.
    pub fn physical_is_exact(&self) -> bool {
        self.flags
            & (flags::UNKNOWN
                | flags::DELALLOC
                | flags::ENCODED
                | flags::NOT_ALIGNED
                | flags::DATA_INLINE
                | flags::DATA_TAIL)
            == 0
    }
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Extents asked for per call: 56 bytes each.
pub const EXTENTS_PER_CALL: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct RawMap {
    start: u64,
    length: u64,
    flags: u32,
    mapped: u32,
    count: u32,
    reserved: u32,
    extents: [RawExtent; EXTENTS_PER_CALL],
}

/// Up to [`EXTENTS_PER_CALL`] extents of `file` from `from` on, in file order, after the
/// file's dirty data is written (so every extent has its place). Empty past the last one.
pub fn map(file: &File, from: u64) -> io::Result<Vec<Extent>> {
    let mut raw = Box::new(RawMap {
        start: from,
        length: u64::MAX - from,
        flags: FIEMAP_FLAG_SYNC,
        mapped: 0,
        count: EXTENTS_PER_CALL as u32,
        reserved: 0,
        extents: [RawExtent::default(); EXTENTS_PER_CALL],
    });
    // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `count` extents into the
    // array that follows it, all inside `raw`, which lives across the call.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            FS_IOC_FIEMAP as _,
            &mut *raw as *mut RawMap,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mapped = (raw.mapped as usize).min(EXTENTS_PER_CALL);
    Ok(raw.extents[..mapped]
        .iter()
        .filter(|e| e.length > 0)
        .map(|e| Extent {
            logical: e.logical,
            physical: e.physical,
            length: e.length,
            flags: e.flags,
        })
        .collect())
}

/// The extents of a file in order, fetched a call's worth at a time, so a file of any size
/// is walked in bounded memory.
pub struct Extents<'a> {
    file: &'a File,
    next_from: u64,
    queued: std::collections::VecDeque<Extent>,
    done: bool,
}

impl<'a> Extents<'a> {
    pub fn new(file: &'a File, from: u64) -> Self {
        Extents {
            file,
            next_from: from,
            queued: Default::default(),
            done: false,
        }
    }

    /// The next extent that ends after `at` (skipping the ones before), without taking it.
    pub fn peek_after(&mut self, at: u64) -> io::Result<Option<Extent>> {
        loop {
            while let Some(e) = self.queued.front() {
                if e.end() > at {
                    return Ok(Some(*e));
                }
                self.queued.pop_front();
            }
            if self.done {
                return Ok(None);
            }
            let batch = map(self.file, self.next_from.max(at))?;
            match batch.last() {
                None => self.done = true,
                Some(last) => {
                    self.done = last.flags & flags::LAST != 0;
                    // Never backwards: a filesystem that answers the same extent again
                    // cannot loop this walk.
                    let next = last.end().max(self.next_from.saturating_add(1));
                    self.next_from = next;
                }
            }
            self.queued.extend(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_the_data_ranges_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        file.write_all_at(&[9u8; 4096], 5 << 20).unwrap();
        let ranges = crate::testing::data_ranges(&file);
        // Filesystems may round ranges out to their blocks, never in.
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert!(ranges[0].0 <= 1 << 20 && ranges[0].1 >= (1 << 20) + 4096);
        assert!(ranges[1].0 <= 5 << 20 && ranges[1].1 >= (5 << 20) + 4096);
        assert_eq!(next_data(&file, 8 << 20).unwrap(), None);
    }
}
