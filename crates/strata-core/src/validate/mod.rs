//! Checks on every string, path and map that arrives in a request. Nothing from a request
//! becomes a path in the pool unless it has the shape of an id Strata issues
//! ([`crate::ids`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

pub mod mount_options;

/// The general CSI size limit of a string field.
pub const MAX_STRING_BYTES: usize = 128;
/// The general CSI size limit of a map field (keys and values together).
pub const MAX_MAP_BYTES: usize = 4096;
/// Paths may be as long as the OS allows.
pub const MAX_PATH_BYTES: usize = 4096;

/// A required, bounded string field: present, at most 128 bytes, no NUL.
pub fn required_str<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    bounded_str(field, value)
}

/// An optional string field within the general size limit.
pub fn bounded_str<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.len() > MAX_STRING_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes; CSI allows at most {MAX_STRING_BYTES}",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} must not contain NUL"
        )));
    }
    Ok(value)
}

/// A map field within the general 4 KiB limit.
pub fn bounded_map<K: AsRef<str>, V: AsRef<str>>(
    field: &str,
    map: impl IntoIterator<Item = (K, V)>,
) -> Result<()> {
    let total: usize = map
        .into_iter()
        .map(|(k, v)| k.as_ref().len() + v.as_ref().len())
        .sum();
    if total > MAX_MAP_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} holds {total} bytes; CSI allows at most {MAX_MAP_BYTES}"
        )));
    }
    Ok(())
}

/// A required absolute path without `..`, NUL or a trailing oddity; returned normalised.
pub fn absolute_path(field: &str, value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if value.len() > MAX_PATH_BYTES || value.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} must be a path of at most {MAX_PATH_BYTES} bytes without NUL"
        )));
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{field} {} must be an absolute path",
            echo(value)
        )));
    }
    let mut clean = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => clean.push(p),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{field} {} must not contain '..'",
                    echo(value)
                )));
            }
        }
    }
    if clean == Path::new("/") {
        return Err(Error::InvalidArgument(format!(
            "{field} must not be the root directory"
        )));
    }
    Ok(clean)
}

/// Whether `handle` could name an inline ephemeral volume (the kubelet's handle, which
/// Strata keeps as the volume's name): 1 to 128 bytes of letters, digits, '-', '_' and '.',
/// starting with a letter or digit. The kubelet's are `csi-` and 64 hex digits.
pub fn is_inline_handle(handle: &str) -> bool {
    !handle.is_empty()
        && handle.len() <= MAX_STRING_BYTES
        && handle.starts_with(|c: char| c.is_ascii_alphanumeric())
        && handle
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The most of a caller-supplied value a message echoes.
pub const MAX_ECHO_BYTES: usize = 128;

/// `value` cut to at most `max` bytes (at a character boundary), marked with "…" when cut.
pub fn bounded(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_owned();
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

/// A caller-supplied value as a message may echo it: bounded and quoted.
pub fn echo(value: &str) -> String {
    format!("{:?}", bounded(value, MAX_ECHO_BYTES))
}

/// A caller-supplied path as a message may echo it.
pub fn bounded_display(path: &Path) -> String {
    bounded(&path.to_string_lossy(), MAX_ECHO_BYTES)
}

/// Checks a List request's paging fields: returns the id to continue after (a token is the
/// last id of the previous page, so pages stay correct while objects come and go) and the
/// page size. A token this driver could not have issued is ABORTED, as the spec requires.
pub fn paging(
    max_entries: i32,
    starting_token: &str,
    is_id: fn(&str) -> bool,
) -> Result<(Option<&str>, usize)> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(format!(
            "max_entries must not be negative, got {max_entries}"
        )));
    }
    let after = match starting_token {
        "" => None,
        t if is_id(t) => Some(t),
        t => {
            return Err(Error::Aborted(format!(
                "starting_token {} was not issued by this driver: restart the listing without a token",
                echo(t)
            )));
        }
    };
    let max = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    Ok((after, max))
}

/// Copies a request map into an ordered map (for stable comparison and storage).
pub fn ordered(map: &HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_clean() {
        assert_eq!(
            absolute_path("p", "/var/lib//x/./y/").unwrap(),
            PathBuf::from("/var/lib/x/y")
        );
        for bad in ["", "relative/x", "/a/../b", "/", "/a\0b"] {
            assert!(
                matches!(absolute_path("p", bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn strings_and_maps_are_bounded() {
        assert!(required_str("name", "").is_err());
        assert!(required_str("name", &"x".repeat(129)).is_err());
        assert!(required_str("name", "a\0").is_err());
        assert!(required_str("name", &"x".repeat(128)).is_ok());
        let big: HashMap<String, String> = [("k".to_string(), "v".repeat(5000))].into();
        assert!(bounded_map("parameters", &big).is_err());
    }
}
