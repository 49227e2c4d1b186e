//! The ids Strata issues for volumes, snapshots and group snapshots: their shape (a prefix
//! and 24 hex digits, the only strings ever turned into pool paths) and their generation
//! (time-ordered, with random bits).

use std::time::{SystemTime, UNIX_EPOCH};

pub const VOLUME_ID_PREFIX: &str = "vol-";
pub const SNAPSHOT_ID_PREFIX: &str = "snap-";
pub const GROUP_ID_PREFIX: &str = "group-";
const ID_HEX: usize = 24;

/// Whether `id` has the exact shape of a volume id this driver generates.
pub fn is_volume_id(id: &str) -> bool {
    is_id(VOLUME_ID_PREFIX, id)
}

/// Whether `id` has the exact shape of a snapshot id this driver generates.
pub fn is_snapshot_id(id: &str) -> bool {
    is_id(SNAPSHOT_ID_PREFIX, id)
}

/// Whether `id` has the exact shape of a group snapshot id this driver generates.
pub fn is_group_id(id: &str) -> bool {
    is_id(GROUP_ID_PREFIX, id)
}

fn is_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == ID_HEX
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

pub fn new_volume_id() -> String {
    new_id(VOLUME_ID_PREFIX)
}

pub fn new_snapshot_id() -> String {
    new_id(SNAPSHOT_ID_PREFIX)
}

pub fn new_group_id() -> String {
    new_id(GROUP_ID_PREFIX)
}

/// A fresh id: milliseconds since the epoch then random bits, so ids sort roughly by creation
/// time and never collide in practice (creation still refuses an existing directory).
fn new_id(prefix: &str) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut random = [0u8; 6];
    fill_random(&mut random);
    let mut id = format!("{prefix}{:012x}", millis & 0xffff_ffff_ffff);
    for b in random {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

fn fill_random(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // Entropy is always available after boot; fall back to the clock rather than fail.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 4) * 8)) as u8 ^ i as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_have_the_checked_shape() {
        let a = new_volume_id();
        let b = new_volume_id();
        assert!(is_volume_id(&a), "{a}");
        assert_ne!(a, b);
        for bad in [
            "",
            "vol-",
            "../../etc",
            "vol-../../../../etc/passwdxx",
            "vol-0123456789abcdef0123456G",
            "vol-0123456789ABCDEF01234567",
        ] {
            assert!(!is_volume_id(bad), "{bad}");
        }
        assert!(is_volume_id("vol-0123456789abcdef01234567"));
        let s = new_snapshot_id();
        assert!(is_snapshot_id(&s) && !is_volume_id(&s), "{s}");
    }
}
