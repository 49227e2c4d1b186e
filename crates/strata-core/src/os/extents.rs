//! The allocated ranges of a file, found with SEEK_DATA and SEEK_HOLE on an open file (the
//! file held is the one read: nothing is looked up by path again).

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
        let mut ranges = vec![];
        let mut at = 0;
        while let Some((start, end)) = next_data(&file, at).unwrap() {
            ranges.push((start, end));
            at = end;
        }
        // Filesystems may round ranges out to their blocks, never in.
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert!(ranges[0].0 <= 1 << 20 && ranges[0].1 >= (1 << 20) + 4096);
        assert!(ranges[1].0 <= 5 << 20 && ranges[1].1 >= (5 << 20) + 4096);
        assert_eq!(next_data(&file, 8 << 20).unwrap(), None);
    }
}
