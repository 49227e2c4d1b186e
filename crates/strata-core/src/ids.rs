//! The ids Strata issues for volumes, snapshots and group snapshots: their shape (a prefix,
//! 24 hex digits and, since the peer service, a node hint: the only strings ever turned into
//! pool paths) and their generation (time-ordered, with random bits).
//!
//! The node hint is 8 hex digits of a hash of the id's node (FNV-1a, 32 bits): another node
//! resolves it against the node ids it knows, without the API server. A node id can be 253
//! bytes long and the CSI spec bounds ids to 128, so the hint is a hash, not the name; two
//! nodes sharing a hint are both asked.

use std::time::{SystemTime, UNIX_EPOCH};

pub const VOLUME_ID_PREFIX: &str = "vol-";
pub const SNAPSHOT_ID_PREFIX: &str = "snap-";
pub const GROUP_ID_PREFIX: &str = "group-";
const ID_HEX: usize = 24;
const HINT_HEX: usize = 8;

/// The hint ids made on one node carry: 8 hex digits of the node id's FNV-1a hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeHint(String);

impl NodeHint {
    pub fn of(node_id: &str) -> Self {
        let mut hash: u32 = 0x811c_9dc5;
        for b in node_id.bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        NodeHint(format!("{hash:08x}"))
    }

    /// The hint an id carries; `None` for ids made before hints (or not made here).
    pub fn in_id(id: &str) -> Option<NodeHint> {
        let (_, hint) = id.rsplit_once('-')?;
        (hint.len() == HINT_HEX && is_hex(hint) && id.len() > HINT_HEX + 1 + ID_HEX)
            .then(|| NodeHint(hint.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

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

/// `prefix`, 24 lowercase hex digits, and optionally `-` and an 8-digit node hint.
fn is_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        let (body, hint) = match rest.split_once('-') {
            Some((body, hint)) => (body, Some(hint)),
            None => (rest, None),
        };
        body.len() == ID_HEX
            && is_hex(body)
            && hint.is_none_or(|h| h.len() == HINT_HEX && is_hex(h))
    })
}

fn is_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_volume_id(node: &NodeHint) -> String {
    new_id(VOLUME_ID_PREFIX, node)
}

pub fn new_snapshot_id(node: &NodeHint) -> String {
    new_id(SNAPSHOT_ID_PREFIX, node)
}

pub fn new_group_id(node: &NodeHint) -> String {
    new_id(GROUP_ID_PREFIX, node)
}

/// A fresh id: milliseconds since the epoch then random bits, so ids sort roughly by creation
/// time and never collide in practice (creation still refuses an existing directory).
fn new_id(prefix: &str, node: &NodeHint) -> String {
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
    id.push('-');
    id.push_str(node.as_str());
    id
}

/// `bytes` random bytes as lowercase hex (ids of short-lived things, such as peer reads).
pub fn random_hex(bytes: usize) -> String {
    let mut random = vec![0u8; bytes];
    fill_random(&mut random);
    random.iter().map(|b| format!("{b:02x}")).collect()
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
        let node = NodeHint::of("node-a");
        let a = new_volume_id(&node);
        let b = new_volume_id(&node);
        assert!(is_volume_id(&a), "{a}");
        assert_ne!(a, b);
        for bad in [
            "",
            "vol-",
            "../../etc",
            "vol-../../../../etc/passwdxx",
            "vol-0123456789abcdef0123456G",
            "vol-0123456789ABCDEF01234567",
            "vol-0123456789abcdef01234567-",
            "vol-0123456789abcdef01234567-0123456",
            "vol-0123456789abcdef01234567-012345678",
            "vol-0123456789abcdef01234567-0123456G",
            "vol-0123456789abcdef01234567-01234567-01234567",
        ] {
            assert!(!is_volume_id(bad), "{bad}");
        }
        assert!(is_volume_id("vol-0123456789abcdef01234567"));
        assert!(is_volume_id("vol-0123456789abcdef01234567-89abcdef"));
        let s = new_snapshot_id(&node);
        assert!(is_snapshot_id(&s) && !is_volume_id(&s), "{s}");
    }

    #[test]
    fn ids_carry_the_hint_of_their_node() {
        let a = NodeHint::of("node-a");
        assert_ne!(a, NodeHint::of("node-b"));
        // FNV-1a is fixed: hints of ids made by older or newer versions keep resolving.
        assert_eq!(NodeHint::of("").as_str(), "811c9dc5");
        assert_eq!(NodeHint::of("a").as_str(), "e40c292c");
        assert_eq!(NodeHint::in_id(&new_volume_id(&a)), Some(a.clone()));
        assert_eq!(NodeHint::in_id(&new_group_id(&a)), Some(a));
        assert_eq!(NodeHint::in_id("vol-0123456789abcdef01234567"), None);
        assert_eq!(NodeHint::in_id("vol-89abcdef"), None);
    }
}
