//! What the core's unit tests share: a driver over the fake host on a temporary pool, and
//! the capabilities they ask for.

use std::sync::Arc;

use crate::backend::dir::dir_backend;
use crate::backend::image::ImageBackend;
use crate::driver::{Config, Driver};
use crate::fault::FaultPoints;
use crate::model::{AccessMode, AccessType, Capability};
use crate::os::fake::FakeHost;

pub(crate) struct Fixture {
    pub(crate) _pool: tempfile::TempDir,
    pub(crate) fake: Arc<FakeHost>,
    pub(crate) driver: Driver,
}

/// A driver with the image backend over the fake host; node paths anywhere.
pub(crate) fn fixture() -> Fixture {
    fixture_with(FaultPoints::default())
}

/// [`fixture`] with fault points armed (a delay point holds an operation in flight).
pub(crate) fn fixture_with(faults: FaultPoints) -> Fixture {
    node_fixture("n1", faults, None)
}

/// A driver of node `node_id`, reaching other nodes through `peers`.
pub(crate) fn node_fixture(
    node_id: &str,
    faults: FaultPoints,
    peers: Option<Arc<dyn crate::peer::Peers>>,
) -> Fixture {
    node_fixture_of(node_id, faults, peers, false)
}

/// [`node_fixture`] with the image backend, or the dir backend when `dir`.
pub(crate) fn node_fixture_of(
    node_id: &str,
    faults: FaultPoints,
    peers: Option<Arc<dyn crate::peer::Peers>>,
    dir: bool,
) -> Fixture {
    let pool = tempfile::tempdir().unwrap();
    let fake = FakeHost::new();
    let host = fake.host();
    let config = Config {
        driver_name: "strata.csi.dev".into(),
        node_id: node_id.into(),
        pool: pool.path().to_owned(),
        max_volumes_per_node: 0,
        topology_key: "strata.csi.dev/node".into(),
        allowed_path_prefixes: vec!["/".into()],
        forbidden_paths: vec![],
        freeze_limit: std::time::Duration::from_secs(10),
        export_limits: Default::default(),
    };
    if dir {
        // The pool's filesystem, where a directory volume's bind source is located.
        fake.lock().mounts.push(crate::os::mountinfo::MountEntry {
            mount_id: 1,
            major: 0,
            minor: 42,
            root: "/".into(),
            mount_point: pool.path().to_owned(),
            options: vec!["rw".into()],
            fs_type: "tmpfs".into(),
            source: "tmpfs".into(),
            super_options: vec!["rw".into()],
        });
    }
    let backend: Arc<dyn crate::backend::Backend> = match dir {
        false => Arc::new(ImageBackend::new(pool.path().to_owned(), host.clone())),
        true => Arc::new(dir_backend(pool.path().to_owned(), host.clone())),
    };
    let (driver, _) = Driver::open(config, host, backend, faults, peers).unwrap();
    Fixture {
        _pool: pool,
        fake,
        driver,
    }
}

/// An ext4 mount capability.
pub(crate) fn mount(mode: AccessMode) -> Capability {
    mount_fs("ext4", mode)
}

pub(crate) fn mount_fs(fs_type: &str, mode: AccessMode) -> Capability {
    Capability {
        access_type: AccessType::Mount {
            fs_type: fs_type.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        },
        access_mode: mode,
    }
}

/// Secrets whose values are `value` 40 times (long enough for a passphrase).
pub(crate) fn secrets(pairs: &[(&str, &str)]) -> crate::encryption::Secrets {
    crate::encryption::Secrets::new(pairs.iter().map(|(k, v)| (k.to_string(), v.repeat(40))))
}

/// A 16 MiB ext4 volume `name` made by the controller with `parameters` and `secrets`.
pub(crate) fn create_volume(
    driver: &Driver,
    name: &str,
    parameters: &[(&str, &str)],
    secrets: crate::encryption::Secrets,
) -> crate::error::Result<String> {
    driver
        .controller
        .create_volume(crate::controller::CreateVolume {
            name: name.into(),
            capabilities: vec![mount(AccessMode::SingleNodeWriter)],
            capacity: crate::model::CapacityRange {
                required: 16 * crate::model::MIB,
                limit: 0,
            },
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets,
            ..Default::default()
        })
        .map(|r| r.id)
}

/// Every range of data in `file` (SEEK_DATA/SEEK_HOLE), in order.
pub(crate) fn data_ranges(file: &std::fs::File) -> Vec<(u64, u64)> {
    let (mut out, mut at) = (vec![], 0);
    while let Some((start, end)) = crate::os::extents::next_data(file, at).unwrap() {
        out.push((start, end));
        at = end;
    }
    out
}
