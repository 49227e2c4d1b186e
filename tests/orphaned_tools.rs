//! Tools die with a killed server (mkfs, resize2fs and xfs_growfs run with
//! PR_SET_PDEATHSIG), and the retried call succeeds.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::namespaces::*;
use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;

/// A `mkfs.ext4` that records its pid and waits (as a bash builtin, so the pid is the tool
/// itself), then runs the real one.
fn slow_mkfs(dir: &Path) -> PathBuf {
    slow_tool(dir, "mkfs.ext4", "mkfs.pids")
}

/// `tool` slowed down the same way, recording its pid in `pids`.
fn slow_tool(dir: &Path, tool: &str, pids: &str) -> PathBuf {
    let bin = dir.join(TOOLS_DIR);
    fs::create_dir_all(&bin).unwrap();
    let real = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_owned();
    let script = format!(
        "#!/bin/bash\necho $$ >> {pids}\nread -t 5 <> <(:)\nexec {real} \"$@\"\n",
        pids = dir.join(pids).display()
    );
    let path = bin.join(tool);
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Waits until a slowed tool has started (its pid is recorded).
async fn wait_for_tool(pids: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never started",
            pids.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a stage of `id`, kills the server once the slowed tool it runs has started, and
/// checks that the tool died with it.
async fn kill_during_stage(env: &mut TestEnv, id: &str, staging: &str, pids: &Path) {
    let mut c = env.csi.clone();
    let (id2, st2) = (id.to_owned(), staging.to_owned());
    let pending = tokio::spawn(async move { node_stage_code(&mut c, &id2, &st2, ext4()).await });
    wait_for_tool(pids).await;
    env.kill();
    let _ = pending.await;
    assert_tool_died(pids);
}

/// Asserts that the slowed tool died with the server that started it.
fn assert_tool_died(pids: &Path) {
    let pid: i32 = fs::read_to_string(pids)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Dead is gone, or a zombie waiting for init to reap it (which a loaded machine delays).
    let alive = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() {
        assert!(Instant::now() < deadline, "tool {pid} outlived the server");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_die_with_a_killed_server_and_the_retry_succeeds() {
    let mut env = TestEnv::start().await;
    slow_mkfs(env.dir.path());
    env.restart(None).await;
    let id = env.create("v", 32 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    let pids = env.dir.path().join("mkfs.pids");
    kill_during_stage(&mut env, &id, &staging, &pids).await;
    env.restart(None).await;
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_growfs_dies_with_a_killed_server_and_the_retried_expansion_succeeds() {
    let mut env = TestEnv::start().await;
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let id = env.create("x", 320 * MIB, xfs.clone()).await.volume_id;
    let staging = env.path("stage");
    env.stage(&id, &staging, xfs.clone()).await.unwrap();
    env.expand(&id, 400 * MIB).await.unwrap();
    // Restarted with a slow xfs_growfs on its PATH.
    slow_tool(env.dir.path(), "xfs_growfs", "growfs.pids");
    env.restart(None).await;
    let expand = node_expand_req(&id, &staging, "", 400 * MIB);
    let mut c = env.csi.clone();
    let req = expand.clone();
    let pending = tokio::spawn(async move { c.node.node_expand_volume(req).await });
    let pids = env.dir.path().join("growfs.pids");
    wait_for_tool(&pids).await;
    env.kill();
    let _ = pending.await;
    assert_tool_died(&pids);
    fs::remove_file(&pids).unwrap();
    env.restart(None).await;
    env.csi.node.node_expand_volume(expand).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize2fs_dies_with_a_killed_server_and_the_retried_stage_grows_the_volume() {
    let mut env = TestEnv::start().await;
    let id = env.create("r", 64 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    // Formatted once, then expanded while not staged: the next stage grows it offline.
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.expand(&id, 128 * MIB).await.unwrap();
    slow_tool(env.dir.path(), "resize2fs", "resize2fs.pids");
    env.restart(None).await;
    let pids = env.dir.path().join("resize2fs.pids");
    kill_during_stage(&mut env, &id, &staging, &pids).await;
    fs::remove_file(&pids).unwrap();
    env.restart(None).await;
    env.stage(&id, &staging, ext4()).await.unwrap();
    let stat = fs_size(&staging);
    assert!(
        stat > 100 * MIB as u64,
        "the retried stage grew the filesystem: {stat} bytes"
    );
    env.unstage(&id, &staging).await.unwrap();
    let image = env.pool().join("volumes").join(&id).join("image");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "the grown filesystem: {fsck:?}");
    env.assert_clean();
}
