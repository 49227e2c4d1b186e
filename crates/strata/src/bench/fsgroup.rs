//! `strata bench fsgroup`: what a pod's fsGroup costs at pod start on a volume holding many
//! files. A driver with VOLUME_MOUNT_GROUP is handed the group at stage and publish; the
//! kubelet does not say which fsGroupChangePolicy the pod has, and the default is `Always`,
//! so Strata walks the tree whenever a pod may have changed the files since the last walk
//! (a read-write publish). Measured: the first pod start with the group (a walk), the next
//! one after that pod had the volume read-write (a walk again), a pod start without a group
//! (no walk: what `OnRootMismatch` would cost when the root matches), and the kubelet's own
//! recursive walk (what it does at every pod start when the driver lacks the capability).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use csi::volume_capability::AccessType;
use serde::Serialize;

use super::{Outcome, Run, bring_up, mount_existing, offer, tear_down, unmount};
use crate::client::Csi;
use crate::client::shared::{CapabilityArgs, ModeArg};
use crate::units::parse_size;
use csi_proto as csi;

#[derive(clap::Args)]
pub struct FsGroupArgs {
    #[arg(long, default_value_t = 100_000)]
    pub files: u64,
    /// Volume size (ext4 gives one inode per 16 KiB: 2 GiB holds 131,072).
    #[arg(long, default_value = "2Gi", value_parser = parse_size)]
    pub size: u64,
    /// The group given as `volume_mount_group`.
    #[arg(long, default_value_t = 4321)]
    pub group: u32,
    /// Directory for staging and target paths.
    #[arg(long, default_value = "/tmp/strata-bench")]
    pub workdir: PathBuf,
}

#[derive(Serialize)]
struct FsGroupReport {
    files: u64,
    /// The first pod start with the group: Strata walks the tree.
    first_stage_and_publish_ms: f64,
    /// The next pod start with the same group, after the first pod had the volume
    /// read-write: walked again (fsGroupChangePolicy `Always`).
    second_stage_and_publish_ms: f64,
    /// A pod start without a group: no walk.
    without_group_stage_and_publish_ms: f64,
    recursive_chown_ms: f64,
}

/// Files per directory, so no directory grows too large.
const PER_DIR: u64 = 1000;

fn populate(root: &Path, files: u64) -> std::io::Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{}", i / PER_DIR));
        if i % PER_DIR == 0 {
            fs::create_dir(&dir)?;
        }
        fs::File::create(dir.join(format!("f{i}")))?;
    }
    fs::File::open(root)?.sync_all()
}

/// The kubelet's fsGroup walk: every entry's group, group read-write, setgid and
/// group-executable directories; symlinks are not followed.
fn recursive_chown(path: &Path, gid: u32) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, None, Some(gid))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut mode = meta.mode() & 0o7777 | 0o060;
    if meta.is_dir() {
        mode |= 0o2010;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            recursive_chown(&entry?.path(), gid)?;
        }
    }
    Ok(())
}

fn with_group(mut cap: csi::VolumeCapability, group: u32) -> csi::VolumeCapability {
    if let Some(AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.volume_mount_group = group.to_string();
    }
    cap
}

pub async fn fsgroup(mut csi: Csi, run: &Run, args: FsGroupArgs) -> Result<Outcome, String> {
    let offer = offer(&mut csi).await?;
    if !offer.mount_group {
        return Ok(Outcome::Skipped(
            "the driver does not offer VOLUME_MOUNT_GROUP (the kubelet applies fsGroup itself, walking the volume)".into(),
        ));
    }
    let workdir = &args.workdir;
    fs::create_dir_all(workdir).map_err(|e| format!("create {}: {e}", workdir.display()))?;
    let plain = CapabilityArgs::ext4(ModeArg::SingleNodeWriter).to_csi();
    let grouped = with_group(plain.clone(), args.group);
    let m = bring_up(
        &mut csi,
        run,
        &offer,
        &plain,
        format!("fsgroupbench-{}", std::process::id()),
        args.size,
        workdir,
    )
    .await?;
    let (root, files) = (PathBuf::from(&m.target), args.files);
    tokio::task::spawn_blocking(move || populate(&root, files))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("create {files} files: {e}"))?;
    unmount(&mut csi, run, &m).await?;
    let mut times = vec![];
    for cap in [&grouped, &grouped, &plain] {
        let start = Instant::now();
        let again = mount_existing(&mut csi, run, &offer, cap, m.id.clone(), workdir).await?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        unmount(&mut csi, run, &again).await?;
    }
    // The kubelet's walk, on the same tree, to another group (so every entry changes).
    let again = mount_existing(&mut csi, run, &offer, &plain, m.id.clone(), workdir).await?;
    let (root, gid) = (PathBuf::from(&again.target), args.group + 1);
    let start = Instant::now();
    let walked = tokio::task::spawn_blocking(move || recursive_chown(&root, gid))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("recursive chown: {e}")));
    let chown_ms = start.elapsed().as_secs_f64() * 1e3;
    tear_down(&mut csi, run, &offer, again).await?;
    walked?;
    let report = FsGroupReport {
        files: args.files,
        first_stage_and_publish_ms: times[0],
        second_stage_and_publish_ms: times[1],
        without_group_stage_and_publish_ms: times[2],
        recursive_chown_ms: chown_ms,
    };
    let table = format!(
        "{} files, fsGroup {}\n{:<60} {:>10.1} ms\n{:<60} {:>10.1} ms\n{:<60} {:>10.1} ms\n{:<60} {:>10.1} ms\n",
        report.files,
        args.group,
        "stage+publish with the group, first time",
        report.first_stage_and_publish_ms,
        "stage+publish with the group after a pod wrote (walked again)",
        report.second_stage_and_publish_ms,
        "stage+publish without a group",
        report.without_group_stage_and_publish_ms,
        "the kubelet's recursive walk (every start)",
        report.recursive_chown_ms
    );
    let figures = vec![
        (
            "first stage+publish with a group ms".to_owned(),
            report.first_stage_and_publish_ms,
        ),
        (
            "second stage+publish with a group ms".to_owned(),
            report.second_stage_and_publish_ms,
        ),
        (
            "stage+publish without a group ms".to_owned(),
            report.without_group_stage_and_publish_ms,
        ),
        ("recursive chown ms".to_owned(), report.recursive_chown_ms),
    ];
    Ok(Outcome::measured(&report, table, figures))
}
