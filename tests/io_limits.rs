//! I/O limits for real: the kernel's blkio throttling (cgroup v1, what this machine has) in
//! pod cgroups laid out as the kubelet lays them out, with both cgroup drivers. A direct-I/O
//! writer inside a limited pod is slowed, a change reaches every publishing pod live, a
//! restart in a new mount namespace keeps every rule reachable, and unpublish leaves no rule.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::namespaces::Host;
use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use strata::client::Csi;
use tonic::Code;

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A pod's cgroup made as the kubelet makes it; removed on drop (with the parents it made).
struct PodCgroup {
    uid: String,
    dir: PathBuf,
    made: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(uid: &str, relative: &str) -> Self {
        let mut made = vec![];
        let mut dir = PathBuf::from(BLKIO);
        for part in relative.split('/') {
            dir.push(part);
            if fs::create_dir(&dir).is_ok() {
                made.push(dir.clone());
            }
        }
        PodCgroup {
            uid: uid.into(),
            dir,
            made,
        }
    }

    /// The rule for `device` in a throttle file, if any.
    fn rule(&self, file: &str, device: &str) -> Option<u64> {
        let text = fs::read_to_string(self.dir.join(file)).unwrap();
        text.lines().find_map(|l| {
            let (d, v) = l.split_once(' ')?;
            (d == device).then(|| v.parse().unwrap())
        })
    }

    fn rules(&self) -> String {
        [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
            "blkio.throttle.read_iops_device",
            "blkio.throttle.write_iops_device",
        ]
        .iter()
        .map(|f| fs::read_to_string(self.dir.join(f)).unwrap())
        .collect()
    }

    /// Seconds a direct-I/O write of 8 MiB to `file` takes from inside this cgroup.
    fn timed_write(&self, file: &str) -> Duration {
        let started = Instant::now();
        let script = format!(
            "echo $$ > {procs} && exec dd if=/dev/zero of={file} bs=1M count=8 oflag=direct status=none",
            procs = self.dir.join("cgroup.procs").display()
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        started.elapsed()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

fn uid() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut state = now
        ^ (u64::from(std::process::id()) << 32)
        ^ NEXT.fetch_add(0x9e37_79b9, std::sync::atomic::Ordering::SeqCst);
    let n = |s: &mut u64| xorshift(s);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        n(&mut state) as u32,
        n(&mut state) as u16,
        n(&mut state) as u16 & 0xfff,
        n(&mut state) as u16 & 0xfff,
        n(&mut state) & 0xffff_ffff_ffff
    )
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn modify(csi: &mut Csi, id: &str, pairs: &[(&str, &str)]) -> Result<(), tonic::Status> {
    csi.controller
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: id.into(),
            mutable_parameters: params(pairs),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn publish_for(
    csi: &mut Csi,
    id: &str,
    staging: &str,
    target: &str,
    pod: &PodCgroup,
) -> Result<(), tonic::Status> {
    csi.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: Some(mount_cap("ext4", Mode::SingleNodeMultiWriter)),
            volume_context: params(&[
                ("csi.storage.k8s.io/pod.uid", &pod.uid),
                ("csi.storage.k8s.io/pod.name", "writer"),
                ("csi.storage.k8s.io/ephemeral", "false"),
            ]),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// The device (MAJ:MIN) mounted at `path`.
fn device_at(path: &str) -> String {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "MAJ:MIN", "--mountpoint", path])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_slow_a_pods_direct_writes_follow_changes_and_outlive_restarts() {
    if !PathBuf::from(BLKIO)
        .join("blkio.throttle.write_bps_device")
        .exists()
    {
        eprintln!("skipped: no cgroup v1 blkio throttling on this machine");
        return;
    }
    let (uid_a, uid_b) = (uid(), uid());
    // The cgroupfs driver's layout, and the systemd driver's (uid with underscores).
    let pod_a = PodCgroup::new(&uid_a, &format!("kubepods/besteffort/pod{uid_a}"));
    let pod_b = PodCgroup::new(
        &uid_b,
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid_b.replace('-', "_")
        ),
    );
    let mut host = Host::new(false);
    let mut csi = host.start().await;
    let staging = host.kubelet("stage");
    let (target_a, target_b) = (host.kubelet("pod-a"), host.kubelet("pod-b"));

    let mut req = create_req(
        "limited",
        64 * MIB,
        mount_cap("ext4", Mode::SingleNodeMultiWriter),
    );
    req.mutable_parameters = params(&[("maxWriteBytesPerSecond", "2Mi")]);
    let id = csi
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    node_stage(
        &mut csi,
        &id,
        &staging,
        mount_cap("ext4", Mode::SingleNodeMultiWriter),
    )
    .await
    .unwrap();
    publish_for(&mut csi, &id, &staging, &target_a, &pod_a)
        .await
        .unwrap();
    let device = device_at(&staging);
    assert_eq!(
        pod_a.rule("blkio.throttle.write_bps_device", &device),
        Some(2 << 20)
    );
    // 8 MiB at 2 MiB/s: at least 3 s (the first 2 MiB may pass at once).
    let slow = pod_a.timed_write(&format!("{target_a}/file"));
    assert!(
        slow >= Duration::from_secs(3),
        "limited write took {slow:?}"
    );

    // Lifted (0): the rule goes, the same write is fast.
    modify(&mut csi, &id, &[("maxWriteBytesPerSecond", "0")])
        .await
        .unwrap();
    assert_eq!(pod_a.rule("blkio.throttle.write_bps_device", &device), None);
    let fast = pod_a.timed_write(&format!("{target_a}/file"));
    assert!(
        fast < Duration::from_secs(2),
        "unlimited write took {fast:?}"
    );

    // A second pod publishes it; a change reaches both cgroups.
    publish_for(&mut csi, &id, &staging, &target_b, &pod_b)
        .await
        .unwrap();
    modify(
        &mut csi,
        &id,
        &[("maxWriteBytesPerSecond", "4Mi"), ("maxReadIOPS", "300")],
    )
    .await
    .unwrap();
    for pod in [&pod_a, &pod_b] {
        assert_eq!(
            pod.rule("blkio.throttle.write_bps_device", &device),
            Some(4 << 20)
        );
        assert_eq!(
            pod.rule("blkio.throttle.read_iops_device", &device),
            Some(300)
        );
    }
    // An unknown key or a bad value: INVALID_ARGUMENT, and nothing changed.
    let before = (pod_a.rules(), pod_b.rules());
    for bad in [
        vec![("maxWriteIOPS", "10"), ("maxIOPS", "1")],
        vec![("maxWriteIOPS", "ten")],
    ] {
        let r = modify(&mut csi, &id, &bad).await;
        assert_eq!(code(r), Code::InvalidArgument);
    }
    assert_eq!((pod_a.rules(), pod_b.rules()), before);

    // A restart in a new mount namespace, the old one's mounts still live: the rules stay,
    // and a change still reaches every pod.
    host.kill();
    let mut csi = host.start().await;
    assert_eq!(
        pod_b.rule("blkio.throttle.write_bps_device", &device),
        Some(4 << 20)
    );
    modify(&mut csi, &id, &[("maxWriteBytesPerSecond", "1Mi")])
        .await
        .unwrap();
    for pod in [&pod_a, &pod_b] {
        assert_eq!(
            pod.rule("blkio.throttle.write_bps_device", &device),
            Some(1 << 20)
        );
    }

    // Unpublish leaves no rule behind.
    node_unpublish(&mut csi, &id, &target_a).await.unwrap();
    node_unpublish(&mut csi, &id, &target_b).await.unwrap();
    for pod in [&pod_a, &pod_b] {
        assert!(
            pod.rules().is_empty(),
            "rules left in {}: {}",
            pod.dir.display(),
            pod.rules()
        );
    }

    // As after a reboot: staged again (a new loop device), the next publish applies the
    // recorded limits to the device it uses now.
    node_unstage(&mut csi, &id, &staging).await.unwrap();
    node_stage(
        &mut csi,
        &id,
        &staging,
        mount_cap("ext4", Mode::SingleNodeMultiWriter),
    )
    .await
    .unwrap();
    publish_for(&mut csi, &id, &staging, &target_a, &pod_a)
        .await
        .unwrap();
    let device = device_at(&staging);
    assert_eq!(
        pod_a.rule("blkio.throttle.write_bps_device", &device),
        Some(1 << 20)
    );
    assert_eq!(
        pod_a.rule("blkio.throttle.read_iops_device", &device),
        Some(300)
    );
    node_unpublish(&mut csi, &id, &target_a).await.unwrap();
    assert!(pod_a.rules().is_empty());
    node_unstage(&mut csi, &id, &staging).await.unwrap();
    csi.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limited_volume_is_not_published_for_a_pod_whose_cgroup_is_not_found() {
    if !PathBuf::from(BLKIO)
        .join("blkio.throttle.write_bps_device")
        .exists()
    {
        return;
    }
    let mut env = TestEnv::start().await;
    let mut req = create_req(
        "limited",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    req.mutable_parameters = params(&[("maxReadIOPS", "100")]);
    let id = env
        .csi
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = env.path("stage");
    env.stage(&id, &staging, mount_cap("ext4", Mode::SingleNodeWriter))
        .await
        .unwrap();
    let ghost = PodCgroup {
        uid: uid(),
        dir: PathBuf::from(BLKIO).join("nowhere"),
        made: vec![],
    };
    let target = env.path("target");
    let r = publish_for(&mut env.csi, &id, &staging, &target, &ghost).await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(!PathBuf::from(&target).exists() || fs::read_dir(&target).is_ok());
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}
