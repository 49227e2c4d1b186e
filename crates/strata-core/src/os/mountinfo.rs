//! Parser for `/proc/self/mountinfo`, the kernel's own account of what is mounted where.

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory (or file) of the source filesystem that is mounted: `/` for a whole
    /// filesystem, `/loop3` for a bind of a device node from devtmpfs.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nodev`...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Options of the filesystem itself (shared by every mount of it).
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    /// Mounted read-write but the filesystem itself went read-only: ext4 and xfs do this
    /// after errors (errors=remount-ro, shutdown).
    pub fn failed_read_only(&self) -> bool {
        !self.read_only() && self.super_options.iter().any(|o| o == "ro")
    }

    pub fn device(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

/// Parses the whole file; malformed lines are skipped (the kernel does not write any).
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let options = fields.next()?.split(',').map(str::to_owned).collect();
    // Optional fields end at a lone "-".
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fs_type = fields.next()?.to_owned();
    let source = unescape(fields.next().unwrap_or(""));
    let super_options = fields
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(MountEntry {
        mount_id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        options,
        fs_type,
        source,
        super_options,
    })
}

/// The kernel escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_optional_fields_and_escapes() {
        let text = "\
36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue
612 30 7:3 / /tmp/stage ro,relatime shared:300 - xfs /dev/loop3 ro,attr2
700 30 0:5 /loop3 /tmp/pub/dev rw,nosuid - devtmpfs udev rw,size=100k
garbage
";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt two"));
        assert_eq!(m[0].fs_type, "ext3");
        assert!(!m[0].read_only());
        assert_eq!(m[1].device(), (7, 3));
        assert!(m[1].read_only());
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[2].root, PathBuf::from("/loop3"));
        assert!(!m[0].failed_read_only());
        let failed = parse("1 2 7:1 / /s rw,relatime - ext4 /dev/loop1 ro,errors=remount-ro\n");
        assert!(failed[0].failed_read_only());
    }
}
