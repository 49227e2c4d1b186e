//! Node operations: stage, publish, and their reverses, volume stats and expansion. What is
//! staged or published is read from the kernel (mount table, loop devices) on every call, so
//! a retried call after a crash or a reboot sees the truth and finishes the job.
//!
//! Node paths are opened without following symlinks and acted on through their handles
//! ([`NodePath`]); devices are held open from the check to the mount
//! ([`Attached`](crate::backend::Attached)); each operation claims its volume and its path, so
//! two volumes never meet at one path. What is mounted where is in [`crate::attachment`].

mod ephemeral;
mod expand;
mod fsgroup;
mod growth;
mod publish;
mod stage;
mod stats;
mod unlock;

use std::sync::Arc;

use crate::backend::{Attachment, Backend};
use crate::capability::Capabilities;
use crate::controller::Controller;
use crate::encryption::Secrets;
use crate::error::{Error, Result};
use crate::fault::FaultPoints;
use crate::io_limits::{Consumer, IoLimiter};
use crate::model::Capability;
use crate::mounts::{Mounts, Owners};
use crate::moves::Departures;
use crate::os::Host;
use crate::os::{MountEntry, NodePath};
use crate::paths::{CheckedPath, NodePaths};
use crate::validate::{absolute_path, bounded_display, echo};
use crate::volumes::Volumes;
use ephemeral::InlineVolumes;
use fsgroup::FsGroups;
use growth::FsGrowth;
use unlock::VolumeKeys;

pub use ephemeral::{EphemeralVolume, is_ephemeral};
pub use stats::Usage;
pub use unlock::DATA_DIR;

/// The node service's work: NodeStageVolume, NodeUnstageVolume, NodePublishVolume (inline
/// volumes too), NodeUnpublishVolume, NodeGetVolumeStats, NodeExpandVolume. One operation
/// per file of this module.
pub struct Node {
    volumes: Arc<Volumes>,
    paths: Arc<NodePaths>,
    fsgroups: FsGroups,
    growth: FsGrowth,
    keys: VolumeKeys,
    inline: InlineVolumes,
    mounts: Arc<Mounts>,
    capabilities: Arc<Capabilities>,
    host: Host,
    backend: Arc<dyn Backend>,
    limits: Arc<IoLimiter>,
    /// Volumes sealed for a move to another node are not staged here.
    departures: Arc<Departures>,
    crash: FaultPoints,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        volumes: Arc<Volumes>,
        paths: NodePaths,
        mounts: Arc<Mounts>,
        capabilities: Arc<Capabilities>,
        controller: Arc<Controller>,
        host: Host,
        backend: Arc<dyn Backend>,
        limits: Arc<IoLimiter>,
        departures: Arc<Departures>,
        crash: FaultPoints,
    ) -> Self {
        let paths = Arc::new(paths);
        Node {
            fsgroups: FsGroups::new(volumes.clone(), paths.clone(), host.clone()),
            growth: FsGrowth::new(volumes.clone(), host.filesystems.clone()),
            keys: VolumeKeys::new(host.fscrypt.clone(), host.mounter.clone()),
            // Inline volumes are created and deleted as CreateVolume and DeleteVolume would.
            inline: InlineVolumes::new(
                controller,
                volumes.clone(),
                paths.clone(),
                host.mounter.clone(),
                crash.clone(),
            ),
            volumes,
            paths,
            mounts,
            capabilities,
            host,
            backend,
            limits,
            departures,
            crash,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StageVolume {
    pub volume_id: String,
    /// As the request gives it; checked by the operation.
    pub staging_path: String,
    pub capability: Capability,
    /// The node-stage secrets: `encryptionKey` for an encrypted volume.
    pub secrets: Secrets,
}

#[derive(Debug, Clone)]
pub struct PublishVolume {
    pub volume_id: String,
    /// As the request gives them (empty: not set); checked by the operation.
    pub staging_path: String,
    pub target_path: String,
    pub capability: Capability,
    pub read_only: bool,
    /// Whose I/O the target is (from the volume context), for the volume's I/O limits.
    pub consumer: Consumer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    /// `None` when the volume is abnormal and its usage cannot be read.
    pub usage: Option<Usage>,
    pub abnormal: Option<String>,
}

impl Node {
    /// The `volume_path` of NodeGetVolumeStats or NodeExpandVolume, already known not to be
    /// empty ([`required_volume_path`], checked before the lookup). A path Strata never mounts on (relative, outside the allowed directories, in the pool)
    /// cannot hold the volume: NOT_FOUND, as the spec's tables say for a volume that is not
    /// at the path.
    pub(crate) fn volume_path(&self, volume_id: &str, raw: &str) -> Result<CheckedPath> {
        self.paths
            .check("volume_path", raw)
            .map_err(|_| not_at(volume_id, raw))
    }

    /// The volume's mount at `path` (its filesystem, a bind of it, or its device node), with
    /// the node opened there and the volume's attachment; NOT_FOUND when the path does not
    /// show the volume.
    pub(crate) fn visible_at(
        &self,
        volume_id: &str,
        path: &CheckedPath,
        owners: &Owners,
    ) -> Result<(NodePath, MountEntry, Attachment)> {
        let not_here = || not_at(volume_id, &path.path.to_string_lossy());
        let att = owners.attachment.clone().ok_or_else(not_here)?;
        match self.paths.mount_at(path)? {
            Some((node, Some(entry))) if owners.show(&entry) => Ok((node, entry, att)),
            _ => Err(not_here()),
        }
    }

    /// For NodeUnstageVolume and NodeUnpublishVolume: a path Strata never mounts on holds
    /// nothing of a volume's, so there is nothing to undo there (the spec's answer for a
    /// volume not staged or published at a path is OK). `None` then, with a warning.
    pub(crate) fn undo_path(
        &self,
        field: &str,
        volume_id: &str,
        raw: &str,
    ) -> Result<Option<CheckedPath>> {
        let path = absolute_path(field, raw)?;
        match self.paths.check_clean(field, &path) {
            Ok(checked) => Ok(Some(checked)),
            Err(e) => {
                self.volumes.get(volume_id)?;
                tracing::warn!(volume_id, error = %e, "nothing to undo: Strata never mounts there");
                Ok(None)
            }
        }
    }
}

/// The argument checks of NodeGetVolumeStats and NodeExpandVolume, made before the volume
/// is looked up: both fields are required.
pub(crate) fn required_volume_path(raw: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::InvalidArgument("volume_path is required".into()));
    }
    Ok(())
}

pub(crate) fn not_at(volume_id: &str, path: &str) -> Error {
    Error::NotFound(format!(
        "volume {volume_id} is not staged or published at {}",
        echo(path)
    ))
}

pub(crate) fn still_published(volume_id: &str, m: &MountEntry) -> Error {
    Error::FailedPrecondition(format!(
        "volume {volume_id} is still published at {}: unpublish it first",
        bounded_display(&m.mount_point)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::CreateVolume;
    use crate::driver::Driver;
    use crate::model::{AccessMode, FormatState, MIB};
    use crate::os::HostError;

    use crate::testing::{fixture, mount};

    fn create(d: &Driver) -> String {
        create_named(d, "v")
    }

    fn create_named(d: &Driver, name: &str) -> String {
        d.controller
            .create_volume(CreateVolume {
                name: name.into(),
                capabilities: vec![mount(AccessMode::SingleNodeWriter)],
                capacity: crate::model::CapacityRange {
                    required: 16 * MIB,
                    limit: 0,
                },
                ..Default::default()
            })
            .unwrap()
            .id
    }

    fn stage(d: &Driver, id: &str) -> Result<()> {
        stage_with(d, id, Secrets::default())
    }

    fn stage_with(d: &Driver, id: &str, secrets: Secrets) -> Result<()> {
        d.node.stage_volume(StageVolume {
            volume_id: id.into(),
            staging_path: "/stage".into(),
            capability: mount(AccessMode::SingleNodeWriter),
            secrets,
        })
    }

    fn key(text: &str) -> Secrets {
        crate::testing::secrets(&[(crate::encryption::SECRET_KEY, text)])
    }

    #[test]
    fn an_encrypted_volume_is_staged_only_with_its_secret_and_leaves_nothing_when_refused() {
        use crate::os::fake::Op;
        let f = fixture();
        let d = &f.driver;
        let id =
            crate::testing::create_volume(d, "enc", &[("encrypted", "true")], key("a")).unwrap();
        let nothing_left = || {
            let s = f.fake.lock();
            assert!(s.mounts.is_empty(), "{:?}", s.mounts);
            assert!(s.loops.is_empty(), "{:?}", s.loops);
        };
        for (secrets, why) in [(Secrets::default(), "missing"), (key("b"), "does not open")] {
            let e = stage_with(d, &id, secrets).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains(why)),
                "{e:?}"
            );
            nothing_left();
        }
        // The kernel refuses the key, or the directory has another policy: unmounted again.
        f.fake.fail_next(Op::AddKey, HostError::other("refused"));
        let e = stage_with(d, &id, key("a")).unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        nothing_left();
        f.fake.fail_next(
            Op::EncryptDir,
            HostError::Sys {
                what: "encrypt".into(),
                errno: libc::EEXIST,
            },
        );
        let e = stage_with(d, &id, key("a")).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        nothing_left();
        assert_eq!(f.fake.failures_left(), 0);

        stage_with(d, &id, key("a")).unwrap();
        stage_with(d, &id, key("a")).unwrap();
        assert_eq!(f.fake.lock().keys[std::path::Path::new("/stage")].len(), 1);
        publish(d, &id, "/target", false, AccessMode::SingleNodeWriter).unwrap();
        let root = {
            let s = f.fake.lock();
            let m = s
                .mounts
                .iter()
                .find(|m| m.mount_point == std::path::Path::new("/target"));
            m.unwrap().root.clone()
        };
        assert_eq!(
            root,
            std::path::Path::new("/").join(DATA_DIR),
            "the pod sees the data directory"
        );
        d.node.unpublish_volume(&id, "/target").unwrap();
        d.node.unstage_volume(&id, "/stage").unwrap();
        assert!(
            f.fake.lock().keys[std::path::Path::new("/stage")].is_empty(),
            "the key is removed"
        );
        nothing_left();
        // A raw block stage of it is refused.
        let e = d
            .node
            .stage_volume(StageVolume {
                volume_id: id.clone(),
                staging_path: "/stage".into(),
                capability: crate::model::Capability {
                    access_type: crate::model::AccessType::Block,
                    access_mode: AccessMode::SingleNodeWriter,
                },
                secrets: key("a"),
            })
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }

    fn publish(
        d: &Driver,
        id: &str,
        target: &str,
        read_only: bool,
        mode: AccessMode,
    ) -> Result<()> {
        d.node.publish_volume(PublishVolume {
            volume_id: id.into(),
            staging_path: "/stage".into(),
            target_path: target.into(),
            capability: mount(mode),
            read_only,
            consumer: Default::default(),
        })
    }

    #[test]
    fn staging_formats_once_and_survives_a_reboot() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        stage(&f.driver, &id).unwrap();
        assert_eq!(f.fake.lock().formats, 1);
        assert_eq!(f.fake.lock().mounts.len(), 1);
        assert_eq!(
            f.driver.volumes.store.get(&id).unwrap().format,
            FormatState::Formatted("ext4".into())
        );
        f.fake.reboot();
        stage(&f.driver, &id).unwrap();
        assert_eq!(
            f.fake.lock().formats,
            1,
            "an existing filesystem is mounted, not reformatted"
        );
        f.driver.node.unstage_volume(&id, "/stage").unwrap();
        assert!(f.fake.lock().mounts.is_empty());
        assert!(f.fake.lock().loops.is_empty());
    }

    fn probes_and_formats(f: &crate::testing::Fixture) -> (usize, usize) {
        let s = f.fake.lock();
        (s.probes, s.formats)
    }

    #[test]
    fn only_a_volume_that_may_hold_something_is_probed_before_mkfs() {
        let f = fixture();
        // Never formatted and nothing allocated in its image: formatted without a probe.
        let fresh = create(&f.driver);
        stage(&f.driver, &fresh).unwrap();
        assert_eq!(probes_and_formats(&f), (0, 1));
        f.driver.node.unstage_volume(&fresh, "/stage").unwrap();
        // Formatted: probed (the filesystem is checked), not formatted again.
        stage(&f.driver, &fresh).unwrap();
        assert_eq!(probes_and_formats(&f), (1, 1));
        f.driver.node.unstage_volume(&fresh, "/stage").unwrap();
        // Never formatted but written (as a raw block device would be): probed, and refused.
        let written = create_named(&f.driver, "written");
        let image = f.driver.volumes.store.dir(&written).join("image");
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap(),
            b"not a filesystem",
            4096,
        )
        .unwrap();
        let refused = stage(&f.driver, &written);
        assert!(
            matches!(refused, Err(Error::FailedPrecondition(_))),
            "{refused:?}"
        );
        assert_eq!(probes_and_formats(&f), (2, 1));
    }

    #[test]
    fn an_mkfs_cut_short_by_a_crash_is_redone() {
        let f = fixture();
        let id = create(&f.driver);
        let mut rec = f.driver.volumes.store.get(&id).unwrap();
        rec.format = FormatState::Formatting("ext4".into());
        f.driver.volumes.store.update(rec).unwrap();
        // The partial mkfs left a signature behind.
        let image = f.driver.volumes.store.dir(&id).join("image");
        f.fake.lock().filesystems.insert(image, "ext4".into());
        stage(&f.driver, &id).unwrap();
        assert_eq!(f.fake.lock().formats, 1);
    }

    #[test]
    fn publish_and_unstage_conflicts_get_the_spec_codes() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        publish(&f.driver, &id, "/t1", false, AccessMode::SingleNodeWriter).unwrap();
        publish(&f.driver, &id, "/t1", false, AccessMode::SingleNodeWriter).unwrap();
        assert!(matches!(
            publish(&f.driver, &id, "/t1", true, AccessMode::SingleNodeWriter),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            publish(&f.driver, &id, "/t2", false, AccessMode::SingleNodeWriter),
            Err(Error::FailedPrecondition(_))
        ));
        publish(
            &f.driver,
            &id,
            "/t2",
            true,
            AccessMode::SingleNodeMultiWriter,
        )
        .unwrap();
        assert!(matches!(
            f.driver.node.unstage_volume(&id, "/stage"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            f.driver.controller.delete_volume(&id),
            Err(Error::FailedPrecondition(_))
        ));
        f.driver.node.unpublish_volume(&id, "/t1").unwrap();
        f.driver.node.unpublish_volume(&id, "/t2").unwrap();
        f.driver.node.unstage_volume(&id, "/stage").unwrap();
        f.driver.controller.delete_volume(&id).unwrap();
    }

    #[test]
    fn unstage_where_the_volume_is_not_staged_answers_ok_and_touches_nothing() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        // Staged at /stage; an unstage at another path is a no-op (the spec's rule).
        f.driver.node.unstage_volume(&id, "/elsewhere").unwrap();
        assert_eq!(f.fake.lock().mounts.len(), 1);
        assert_eq!(f.fake.lock().loops.len(), 1);
        f.driver.node.unstage_volume(&id, "/stage").unwrap();
        assert!(f.fake.lock().mounts.is_empty());
    }

    #[test]
    fn a_concurrent_operation_on_the_same_volume_is_aborted() {
        let f = fixture();
        let id = create(&f.driver);
        let _busy = f.driver.volumes.guard(&id).unwrap();
        assert!(matches!(stage(&f.driver, &id), Err(Error::Aborted(_))));
        assert!(matches!(
            f.driver.controller.delete_volume(&id),
            Err(Error::Aborted(_))
        ));
    }

    #[test]
    fn stats_report_usage_of_the_mounted_filesystem() {
        let f = fixture();
        let id = create(&f.driver);
        stage(&f.driver, &id).unwrap();
        // Staged, but not at these paths: NOT_FOUND, however the path is spelled.
        for elsewhere in ["/proc", "/var/lib/kubelet/other", "some/path", "/etc/x"] {
            assert!(
                matches!(
                    f.driver.node.volume_stats(&id, elsewhere),
                    Err(Error::NotFound(_))
                ),
                "{elsewhere}"
            );
        }
        assert!(matches!(
            f.driver.node.volume_stats(&id, ""),
            Err(Error::InvalidArgument(_))
        ));
        let here = "/var/lib/kubelet/stage";
        f.fake.lock().mounts[0].mount_point = here.into();
        let s = f.driver.node.volume_stats(&id, here).unwrap();
        assert!(matches!(s.usage, Some(Usage::Filesystem(_))));
        assert_eq!(s.abnormal, None);
        // The filesystem remounted itself read-only after errors.
        f.fake.lock().mounts[0].super_options = vec!["ro".into()];
        let s = f.driver.node.volume_stats(&id, here).unwrap();
        assert!(s.abnormal.unwrap().contains("read-only after errors"));
    }

    #[test]
    fn a_mount_group_is_applied_once_per_change() {
        let f = fixture();
        let id = create(&f.driver);
        let grouped = |gid: &str| {
            let mut cap = mount(AccessMode::SingleNodeWriter);
            if let crate::model::AccessType::Mount {
                volume_mount_group, ..
            } = &mut cap.access_type
            {
                *volume_mount_group = gid.into();
            }
            cap
        };
        let stage_as = |gid: &str| {
            f.driver.node.stage_volume(StageVolume {
                secrets: Default::default(),
                volume_id: id.clone(),
                staging_path: "/stage".into(),
                capability: grouped(gid),
            })
        };
        assert!(matches!(stage_as("staff"), Err(Error::InvalidArgument(_))));
        stage_as("100").unwrap();
        stage_as("100").unwrap();
        assert_eq!(f.fake.lock().groups.len(), 1, "once for one group");
        f.driver.node.unstage_volume(&id, "/stage").unwrap();
        stage_as("200").unwrap();
        let groups: Vec<u32> = f.fake.lock().groups.iter().map(|(_, g)| *g).collect();
        assert_eq!(groups, vec![100, 200]);
        assert_eq!(f.driver.volumes.get(&id).unwrap().mount_group, Some(200));
        // A read-write publish may let a pod change the files: every stage or publish with
        // a group walks again after it (fsGroupChangePolicy `Always`), even the same group.
        let publish_as = |target: &str, gid: &str, read_only: bool| {
            f.driver.node.publish_volume(PublishVolume {
                volume_id: id.clone(),
                staging_path: "/stage".into(),
                target_path: target.into(),
                capability: grouped(gid),
                read_only,
                consumer: Default::default(),
            })
        };
        let walks = || f.fake.lock().groups.len();
        publish_as("/t1", "200", true).unwrap();
        assert_eq!(
            walks(),
            2,
            "current, and a read-only publish changes nothing"
        );
        f.driver.node.unpublish_volume(&id, "/t1").unwrap();
        publish_as("/t1", "200", false).unwrap();
        assert_eq!(
            walks(),
            2,
            "still current when the read-write publish starts"
        );
        assert!(!f.driver.volumes.get(&id).unwrap().mount_group_current);
        f.driver.node.unpublish_volume(&id, "/t1").unwrap();
        publish_as("/t2", "200", false).unwrap();
        assert_eq!(walks(), 3, "a pod may have written since: walked again");
        f.driver.node.unpublish_volume(&id, "/t2").unwrap();
        f.driver.node.unstage_volume(&id, "/stage").unwrap();
        stage_as("200").unwrap();
        assert_eq!(walks(), 4);
        stage_as("200").unwrap();
        assert_eq!(walks(), 4, "nothing could write in between");
    }

    #[test]
    fn an_unstage_racing_a_stage_waits_for_its_group_walk() {
        let f = crate::testing::fixture_with(
            crate::fault::FaultPoints::default().with_delay(Some("stage:before-group=400".into())),
        );
        let id = create(&f.driver);
        let mut cap = mount(AccessMode::SingleNodeWriter);
        if let crate::model::AccessType::Mount {
            volume_mount_group, ..
        } = &mut cap.access_type
        {
            *volume_mount_group = "300".into();
        }
        std::thread::scope(|s| {
            let staging = s.spawn(|| {
                f.driver.node.stage_volume(StageVolume {
                    secrets: Default::default(),
                    volume_id: id.clone(),
                    staging_path: "/stage".into(),
                    capability: cap.clone(),
                })
            });
            // The stage has mounted and is about to walk: the volume is still its own.
            std::thread::sleep(std::time::Duration::from_millis(150));
            assert!(matches!(
                f.driver.node.unstage_volume(&id, "/stage"),
                Err(Error::Aborted(_))
            ));
            staging.join().unwrap().unwrap();
        });
        assert_eq!(f.fake.lock().groups.len(), 1);
        assert_eq!(f.fake.lock().mounts.len(), 1);
        f.driver.node.unstage_volume(&id, "/stage").unwrap();
    }

    #[test]
    fn node_calls_check_their_arguments_before_looking_the_volume_up() {
        let f = fixture();
        let missing = "vol-000000000000000000000000";
        // NodeGetVolumeStats and NodeExpandVolume: both fields are required.
        assert!(matches!(
            f.driver.node.volume_stats(missing, ""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            f.driver.node.volume_stats("", "/stage"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            f.driver
                .node
                .node_expand_volume(missing, "", crate::model::CapacityRange::default()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            f.driver.node.volume_stats(missing, "/stage"),
            Err(Error::NotFound(_))
        ));
        // Stage and publish: a bad path, group or capability before the lookup.
        let bad_group = {
            let mut cap = mount(AccessMode::SingleNodeWriter);
            if let crate::model::AccessType::Mount {
                volume_mount_group, ..
            } = &mut cap.access_type
            {
                *volume_mount_group = "staff".into();
            }
            cap
        };
        for (staging, cap) in [
            ("", mount(AccessMode::SingleNodeWriter)),
            ("relative", mount(AccessMode::SingleNodeWriter)),
            ("/stage", bad_group.clone()),
        ] {
            let r = f.driver.node.stage_volume(StageVolume {
                secrets: Default::default(),
                volume_id: missing.into(),
                staging_path: staging.into(),
                capability: cap.clone(),
            });
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{staging}: {r:?}"
            );
            let r = f.driver.node.publish_volume(PublishVolume {
                volume_id: missing.into(),
                staging_path: "/stage".into(),
                target_path: if staging == "/stage" { "/t" } else { staging }.into(),
                capability: cap,
                read_only: false,
                consumer: Default::default(),
            });
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{staging}: {r:?}"
            );
        }
    }

    #[test]
    fn an_id_strata_could_never_have_issued_is_not_found_at_unpublish() {
        let f = fixture();
        for id in ["../../etc/passwd", "a/b", "/", ".", "..", "-x", "a b"] {
            assert!(
                matches!(
                    f.driver.node.unpublish_volume(id, "/t"),
                    Err(Error::NotFound(_))
                ),
                "{id}"
            );
        }
        // Well-formed ids at paths Strata never used stay OK (the kubelet retries):
        // a finished inline volume's handle, and a volume id outside the allowed paths.
        f.driver
            .node
            .unpublish_volume("csi-0123456789abcdef", "/t")
            .unwrap();
        let id = create(&f.driver);
        f.driver.node.unpublish_volume(&id, "/t").unwrap();
        // An inline publish refuses such a handle before making anything.
        let r = f.driver.node.publish_ephemeral(EphemeralVolume {
            handle: "../x".into(),
            target_path: "/t".into(),
            attributes: [(
                super::ephemeral::EPHEMERAL_KEY.to_owned(),
                "true".to_owned(),
            )]
            .into(),
            capability: mount(AccessMode::SingleNodeWriter),
            read_only: false,
        });
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        assert_eq!(f.driver.volume_count(), 1);
    }
}
