//! fscrypt through its ioctls (linux/fscrypt.h): FS_IOC_ADD_ENCRYPTION_KEY,
//! FS_IOC_REMOVE_ENCRYPTION_KEY, FS_IOC_SET_ENCRYPTION_POLICY and
//! FS_IOC_GET_ENCRYPTION_POLICY_EX. The raw key is copied into the request only for the
//! call and zeroed after it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use zeroize::Zeroize;

use super::{LinuxHost, check};
use crate::host_error::{HostError, Result};
use crate::os::NodePath;
use crate::os::fscrypt::{Fscrypt, KeyId};

const FS_IOC_ADD_ENCRYPTION_KEY: libc::c_ulong = 0xc050_6617;
const FS_IOC_REMOVE_ENCRYPTION_KEY: libc::c_ulong = 0xc040_6618;
const FS_IOC_SET_ENCRYPTION_POLICY: libc::c_ulong = 0x800c_6613;
const FS_IOC_GET_ENCRYPTION_POLICY_EX: libc::c_ulong = 0xc009_6616;

const KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
const POLICY_V2: u8 = 2;
const MODE_AES_256_XTS: u8 = 1;
const MODE_AES_256_CTS: u8 = 4;
const POLICY_FLAGS_PAD_32: u8 = 0x03;
const MAX_KEY: usize = 64;

#[repr(C)]
#[derive(Default)]
struct KeySpecifier {
    kind: u32,
    reserved: u32,
    u: [u8; 32],
}

#[repr(C)]
struct AddKeyArg {
    key_spec: KeySpecifier,
    raw_size: u32,
    key_id: u32,
    reserved: [u32; 8],
    raw: [u8; MAX_KEY],
}

#[repr(C)]
#[derive(Default)]
struct RemoveKeyArg {
    key_spec: KeySpecifier,
    removal_status_flags: u32,
    reserved: [u32; 5],
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PolicyV2 {
    version: u8,
    contents_encryption_mode: u8,
    filenames_encryption_mode: u8,
    flags: u8,
    reserved: [u8; 4],
    master_key_identifier: KeyId,
}

#[repr(C)]
#[derive(Default)]
struct GetPolicyExArg {
    policy_size: u64,
    policy: PolicyV2,
}

fn identifier_spec(id: &KeyId) -> KeySpecifier {
    let mut spec = KeySpecifier {
        kind: KEY_SPEC_TYPE_IDENTIFIER,
        ..Default::default()
    };
    spec.u[..16].copy_from_slice(id);
    spec
}

/// A real descriptor on the opened mount root (the pinned handle is O_PATH, which takes no
/// ioctl): reopened through its /proc/self/fd link, so it is the same object.
fn open_root(root: &NodePath) -> Result<OwnedFd> {
    let path = root.kernel_path();
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| HostError::Path("a path contains NUL".into()))?;
    // SAFETY: c is NUL-terminated; the returned descriptor is owned below.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
    .map_err(|e| HostError::io(format!("open {}", root.path.display()), e))?;
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory `name` in `dir`, opened without following a symlink; `None` if missing.
fn open_child(dir: &OwnedFd, name: &str, root: &NodePath) -> Result<Option<OwnedFd>> {
    let c = CString::new(name).map_err(|_| HostError::Path("a name contains NUL".into()))?;
    // SAFETY: c is NUL-terminated; dir is a valid descriptor.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => Err(HostError::Path(format!(
                "{}/{name} is a symlink or a file, not the volume's directory",
                root.path.display()
            ))),
            _ => Err(HostError::io(
                format!("open {}/{name}", root.path.display()),
                e,
            )),
        };
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn get_policy(dir: &OwnedFd) -> io::Result<Option<KeyId>> {
    let mut arg = GetPolicyExArg {
        policy_size: std::mem::size_of::<PolicyV2>() as u64,
        ..Default::default()
    };
    // SAFETY: arg is a valid, writable fscrypt_get_policy_ex_arg of the size it declares.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GET_ENCRYPTION_POLICY_EX, &mut arg) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    Ok((arg.policy.version == POLICY_V2).then_some(arg.policy.master_key_identifier))
}

impl Fscrypt for LinuxHost {
    fn add_key(&self, root: &NodePath, key: &[u8]) -> Result<KeyId> {
        if key.len() > MAX_KEY {
            return Err(HostError::other("an fscrypt key is at most 64 bytes"));
        }
        let fd = open_root(root)?;
        let mut arg = AddKeyArg {
            key_spec: KeySpecifier {
                kind: KEY_SPEC_TYPE_IDENTIFIER,
                ..Default::default()
            },
            raw_size: key.len() as u32,
            key_id: 0,
            reserved: [0; 8],
            raw: [0; MAX_KEY],
        };
        arg.raw[..key.len()].copy_from_slice(key);
        // SAFETY: arg is a valid fscrypt_add_key_arg followed by raw_size key bytes.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_ADD_ENCRYPTION_KEY, &mut arg) };
        let err = io::Error::last_os_error();
        arg.raw.zeroize();
        if r < 0 {
            return Err(HostError::io(
                format!("add the volume key to {}", root.path.display()),
                err,
            ));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&arg.key_spec.u[..16]);
        Ok(id)
    }

    fn remove_key(&self, root: &NodePath, id: &KeyId) -> Result<()> {
        let fd = open_root(root)?;
        let mut arg = RemoveKeyArg {
            key_spec: identifier_spec(id),
            ..Default::default()
        };
        // SAFETY: arg is a valid fscrypt_remove_key_arg.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_REMOVE_ENCRYPTION_KEY, &mut arg) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Not there (never added, or gone with an earlier unstage): nothing to remove.
            if e.raw_os_error() == Some(libc::ENOKEY) {
                return Ok(());
            }
            return Err(HostError::io(
                format!("remove the volume key from {}", root.path.display()),
                e,
            ));
        }
        Ok(())
    }

    fn policy(&self, root: &NodePath, name: &str) -> Result<Option<KeyId>> {
        let fd = open_root(root)?;
        let Some(dir) = open_child(&fd, name, root)? else {
            return Ok(None);
        };
        get_policy(&dir).map_err(|e| {
            HostError::io(
                format!(
                    "read the encryption policy of {}/{name}",
                    root.path.display()
                ),
                e,
            )
        })
    }

    fn encrypt_dir(&self, root: &NodePath, name: &str, id: &KeyId) -> Result<()> {
        let fd = open_root(root)?;
        let dir = match open_child(&fd, name, root)? {
            Some(dir) => dir,
            None => {
                let c = CString::new(name)
                    .map_err(|_| HostError::Path("a name contains NUL".into()))?;
                // SAFETY: c is NUL-terminated; fd is a valid directory descriptor.
                if unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(HostError::io(
                            format!("create {}/{name}", root.path.display()),
                            e,
                        ));
                    }
                }
                open_child(&fd, name, root)?.ok_or_else(|| {
                    HostError::other(format!("{}/{name} vanished", root.path.display()))
                })?
            }
        };
        let policy = PolicyV2 {
            version: POLICY_V2,
            contents_encryption_mode: MODE_AES_256_XTS,
            filenames_encryption_mode: MODE_AES_256_CTS,
            flags: POLICY_FLAGS_PAD_32,
            reserved: [0; 4],
            master_key_identifier: *id,
        };
        // SAFETY: policy is a valid fscrypt_policy_v2; the kernel reads its version first.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SET_ENCRYPTION_POLICY, &policy) };
        if r < 0 {
            return Err(HostError::io(
                format!("encrypt {}/{name}", root.path.display()),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}
