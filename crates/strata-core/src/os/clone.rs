//! Copying a file's data: shared extents where the filesystem can (FICLONE), else only its
//! allocated ranges. Used by the real host's file copies and by the tree copy.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::os::CopyMethod;
use crate::os::extents::next_data;

/// Makes `target` (empty) a copy of `source`: shared extents where the filesystem can
/// (FICLONE), else a copy of the allocated ranges only.
pub(crate) fn clone_or_copy(source: &File, target: &File, len: u64) -> io::Result<CopyMethod> {
    // SAFETY: FICLONE takes the source fd.
    if unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0 {
        return Ok(CopyMethod::Reflink);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // The filesystem cannot share extents: copy what is allocated.
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
            sparse_copy(source, target, len)?;
            Ok(CopyMethod::SparseCopy)
        }
        _ => Err(e),
    }
}

/// Copies the allocated ranges of `src` into `dst` (holes stay holes).
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pos = 0;
    while pos < len {
        let Some((data, hole)) = next_data(src, pos)? else {
            break; // only a hole remains
        };
        let (mut off_in, mut off_out) = (data as i64, data as i64);
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: offsets are valid pointers to i64 owned here.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, left, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            left -= n as usize;
        }
        pos = hole;
    }
    dst.set_len(len)
}
