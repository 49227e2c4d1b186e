//! The real host: mount(2), loop device ioctls, statvfs(2), and the mkfs/blkid tools.
//! One module per host trait: [`mount`] (Mounter), [`loops`] (LoopDevices), [`filesystems`]
//! (Filesystems), and [`tools`], how every external tool is run.

mod cgroups;
mod filesystems;
mod fscrypt;
mod loops;
mod mount;
pub mod tools;

pub use cgroups::LinuxCgroups;
pub use tools::{run, tool_says};

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::host_error::{HostError, Result};

/// The host as the kernel sees it. Stateless: every query goes to the kernel.
pub struct LinuxHost;

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| HostError::Path(format!("path {} contains NUL", path.display())))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
