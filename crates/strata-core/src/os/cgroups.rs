//! Block I/O limits in cgroups: a pod's cgroup found by its uid under the kubelet's layouts,
//! and per-device limits written into a cgroup (cgroup v1 `blkio.throttle.*_device`, cgroup
//! v2 `io.max`). The core decides which limits go where; this layer finds and writes.

use crate::host_error::Result;
use crate::model::IoLimits;
pub use crate::model::{CgroupRef, CgroupVersion};

/// Cgroups as the kernel has them.
pub trait Cgroups: Send + Sync {
    /// The cgroup of the pod with uid `pod_uid` (already checked to be a uid) under the
    /// kubelet's layouts: the cgroupfs driver's `kubepods[/QOS]/pod<uid>` and the systemd
    /// driver's `kubepods.slice[/kubepods-QOS.slice]/kubepods[-QOS]-pod<uid>.slice`. `None`
    /// when the pod has no cgroup there.
    fn pod_cgroup(&self, pod_uid: &str) -> Result<Option<CgroupRef>>;
    /// The cgroup at `path` (already checked to be a clean relative path), if it exists.
    fn cgroup_at(&self, path: &str) -> Result<Option<CgroupRef>>;
    /// Replaces the limits of `device` in `cgroup` with `limits` (all zero: the rule is
    /// removed). `false` when the cgroup is gone (its pod ended): nothing to limit.
    fn set_limits(&self, cgroup: &CgroupRef, device: (u32, u32), limits: &IoLimits)
    -> Result<bool>;
    /// The limits in force for `device` in `cgroup` (all zero: no rule). `None` when the
    /// cgroup is gone.
    fn limits(&self, cgroup: &CgroupRef, device: (u32, u32)) -> Result<Option<IoLimits>>;
}

/// The kubelet's names for a pod's cgroup, relative to the hierarchy root, for every QoS
/// class and both cgroup drivers (the systemd driver writes the uid with `_` for `-`).
pub fn pod_cgroup_candidates(pod_uid: &str) -> Vec<String> {
    let slice_uid = pod_uid.replace('-', "_");
    let mut out = vec![format!("kubepods/pod{pod_uid}")];
    for qos in ["burstable", "besteffort"] {
        out.push(format!("kubepods/{qos}/pod{pod_uid}"));
    }
    out.push(format!("kubepods.slice/kubepods-pod{slice_uid}.slice"));
    for qos in ["burstable", "besteffort"] {
        out.push(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{slice_uid}.slice"
        ));
    }
    out
}

/// A cgroup v1 throttle file's rules (`MAJ:MIN VALUE` per line) as (device, value).
pub fn parse_v1_rules(text: &str) -> Vec<((u32, u32), u64)> {
    text.lines()
        .take(4096)
        .filter_map(|line| {
            let (dev, value) = line.split_once(' ')?;
            Some((parse_device(dev)?, value.trim().parse().ok()?))
        })
        .collect()
}

/// The cgroup v2 `io.max` limits of `device` (`MAJ:MIN rbps=N wbps=max riops=N wiops=max`).
pub fn parse_io_max(text: &str, device: (u32, u32)) -> IoLimits {
    let mut limits = IoLimits::default();
    for line in text.lines().take(4096) {
        let mut words = line.split_whitespace();
        if words.next().and_then(parse_device) != Some(device) {
            continue;
        }
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let value = if value == "max" {
                0
            } else {
                value.parse().unwrap_or(0)
            };
            match key {
                "rbps" => limits.read_bytes_per_second = value,
                "wbps" => limits.write_bytes_per_second = value,
                "riops" => limits.read_iops = value,
                "wiops" => limits.write_iops = value,
                _ => {}
            }
        }
    }
    limits
}

/// The `io.max` line that sets `limits` on `device` (zero written as `max`).
pub fn io_max_line(device: (u32, u32), limits: &IoLimits) -> String {
    let v = |n: u64| {
        if n == 0 {
            "max".to_owned()
        } else {
            n.to_string()
        }
    };
    format!(
        "{}:{} rbps={} wbps={} riops={} wiops={}",
        device.0,
        device.1,
        v(limits.read_bytes_per_second),
        v(limits.write_bytes_per_second),
        v(limits.read_iops),
        v(limits.write_iops)
    )
}

fn parse_device(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Which of the four limits a cgroup v1 throttle file holds.
pub type LimitOf = fn(&IoLimits) -> u64;

/// The cgroup v1 throttle files and which limit each holds.
pub const V1_FILES: [(&str, LimitOf); 4] = [
    ("blkio.throttle.read_bps_device", |l| {
        l.read_bytes_per_second
    }),
    ("blkio.throttle.write_bps_device", |l| {
        l.write_bytes_per_second
    }),
    ("blkio.throttle.read_iops_device", |l| l.read_iops),
    ("blkio.throttle.write_iops_device", |l| l.write_iops),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_layouts_of_both_drivers() {
        let c = pod_cgroup_candidates("0a1b-2c");
        assert!(c.contains(&"kubepods/burstable/pod0a1b-2c".to_owned()));
        assert!(c.contains(&"kubepods/pod0a1b-2c".to_owned()));
        assert!(
            c.contains(
                &"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b_2c.slice"
                    .to_owned()
            )
        );
        assert!(c.contains(&"kubepods.slice/kubepods-pod0a1b_2c.slice".to_owned()));
    }

    #[test]
    fn rules_are_read_and_written_as_the_kernel_does() {
        assert_eq!(
            parse_v1_rules("7:3 2097152\n8:0 100\ngarbage\n"),
            vec![((7, 3), 2097152), ((8, 0), 100)]
        );
        let limits = IoLimits {
            read_iops: 0,
            write_iops: 500,
            read_bytes_per_second: 2 << 20,
            write_bytes_per_second: 0,
        };
        let line = io_max_line((7, 3), &limits);
        assert_eq!(line, "7:3 rbps=2097152 wbps=max riops=max wiops=500");
        assert_eq!(
            parse_io_max(&format!("8:0 rbps=1\n{line}\n"), (7, 3)),
            limits
        );
        assert_eq!(parse_io_max("8:0 rbps=1", (7, 3)), IoLimits::default());
    }
}
