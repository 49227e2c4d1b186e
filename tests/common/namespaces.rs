//! Servers in their own mount namespaces over one shared "host" directory, as the DaemonSet
//! runs them (what the restart, ownership, orphaned-tool and random-kill tests share), and
//! the small helpers those tests use.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::*;
use csi_proto as csi;
use strata::client::Csi;
use strata_core::os::linux::LinuxHost;
use strata_core::os::{FileId, LoopDevices, Mounter, NodePath};
use tonic::Code;

/// A "host" for servers in their own mount namespaces: `host/` is a shared mount (as the
/// DaemonSet's Bidirectional hostPath volumes are) holding the pool and a kubelet-like
/// directory, seen at the same path by every namespace; each server sees the pool at a path
/// of its own (as a container sees `/pool`), so the kernel's backing-file paths differ
/// between generations.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub server: Option<Child>,
    pub pool_image: bool,
    pub generation: usize,
}

impl Host {
    pub fn new(pool_image: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("strata-ns-")
            .tempdir_in("/tmp")
            .unwrap();
        let host = dir.path().join("host");
        fs::create_dir_all(host.join("pool")).unwrap();
        fs::create_dir_all(host.join("kubelet")).unwrap();
        run("mount", &["--bind", &s(&host), &s(&host)]);
        run("mount", &["--make-shared", &s(&host)]);
        Host {
            dir,
            server: None,
            pool_image,
            generation: 0,
        }
    }

    pub fn host(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    pub fn kubelet(&self, name: &str) -> String {
        s(&self.host().join("kubelet").join(name))
    }

    pub fn socket(&self) -> PathBuf {
        self.host().join("csi.sock")
    }

    /// Starts a server in a new mount namespace, seeing the pool at `view-N/pool`.
    pub async fn start(&mut self) -> Csi {
        self.start_crashing_at(None).await
    }

    /// [`start`](Self::start), with the server killing itself at crash point `crash_at`.
    pub async fn start_crashing_at(&mut self, crash_at: Option<&str>) -> Csi {
        let mut child = self.spawn(crash_at);
        let csi = wait_for(&self.socket(), &mut child).await;
        self.server = Some(child);
        csi
    }

    /// Starts a server in a new mount namespace without waiting for it to serve.
    pub fn spawn(&mut self, crash_at: Option<&str>) -> Child {
        self.generation += 1;
        let view = self.dir.path().join(format!("view-{}", self.generation));
        fs::create_dir_all(&view).unwrap();
        let mut serve = format!(
            "mount --make-private / && mount --bind {host}/pool {view} && exec {bin} serve --node-id ns-node --endpoint unix://{sock} --pool {view} --allowed-path-prefix {host}/kubelet",
            host = s(&self.host()),
            view = s(&view),
            bin = env!("CARGO_BIN_EXE_strata"),
            sock = s(&self.socket()),
        );
        if self.pool_image {
            serve.push_str(" --pool-image 1Gi");
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut command = Command::new("unshare");
        if let Some(point) = crash_at {
            command.env("STRATA_CRASH_AT", point);
        }
        command
            .args(["-m", "--propagation", "unchanged", "sh", "-c", &serve])
            .env("STRATA_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// SIGKILL: the namespace dies with the process; propagated mounts stay on the host.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Where the pool's volumes are, as this (the host's) namespace sees them.
    pub fn pool(&self) -> PathBuf {
        if self.pool_image {
            self.host().join("pool/data")
        } else {
            self.host().join("pool")
        }
    }

    /// Loop devices serving a file, by identity.
    pub fn devices_of(&self, file: &Path) -> usize {
        let id = FileId::of(file).unwrap();
        LinuxHost
            .list()
            .unwrap()
            .iter()
            .filter(|d| d.backing == id)
            .count()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
        unmount_all_under(self.dir.path());
    }
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    out
}

/// Unmounts everything under `dir` (deepest first) and detaches loop devices serving files
/// under it, by identity.
pub fn unmount_all_under(dir: &Path) {
    for _ in 0..8 {
        let mut ids = vec![];
        collect_ids(dir, &mut ids);
        let (mut mounts, _) = kernel_state_under(dir);
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &mounts {
            let _ = LinuxHost.unmount(&mut NodePath::trusted(m));
        }
        let loops: Vec<_> = LinuxHost
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| ids.contains(&d.backing) || d.backing_file.starts_with(dir))
            .collect();
        for d in &loops {
            let _ = LinuxHost.detach(d);
        }
        if mounts.is_empty() && loops.is_empty() {
            return;
        }
    }
}

pub fn collect_ids(dir: &Path, ids: &mut Vec<FileId>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => collect_ids(&p, ids),
            Ok(m) if m.is_file() => ids.extend(FileId::of(&p).ok()),
            _ => {}
        }
    }
}

pub async fn create(csi: &mut Csi, name: &str, cap: csi::VolumeCapability) -> String {
    csi.controller
        .create_volume(create_req(name, 64 * MIB, cap))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// NodeStageVolume's status code.
pub async fn node_stage_code(
    csi: &mut Csi,
    id: &str,
    path: &str,
    cap: csi::VolumeCapability,
) -> Code {
    code(node_stage(csi, id, path, cap).await)
}

pub fn write_block(path: &str, offset: u64, data: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

pub fn read_block(path: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}
