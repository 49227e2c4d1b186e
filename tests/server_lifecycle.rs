//! The server's own life: a successor started while the previous server finishes its calls
//! waits for the pool and then serves; a server removes only the socket it bound; endpoints
//! that cannot work fail at once, before anything is made.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use csi_proto as csi;

fn sigterm(pid: u32) {
    // SAFETY: plain kill(2) on a child of this test.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

fn alive(pid: u32) -> bool {
    // Zombies count as gone: the test reaps its children only at the end.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_waits_for_the_pool_while_the_old_server_finishes_then_serves() {
    // The old server holds a CreateVolume in flight for 2 s after its data is made.
    let mut env = TestEnv::start_with(Some("delay:create:after-data=2000")).await;
    let old = env.pid().unwrap();
    let mut client = env.csi.clone();
    let in_flight = tokio::spawn(async move {
        client
            .controller
            .create_volume(create_req("in-flight", 16 * MIB, ext4()))
            .await
    });
    wait_until("the delay point", Duration::from_secs(5), || {
        env.server_log().contains("delay point reached")
    });
    // A rolling update: SIGTERM to the old one, the new one started right away.
    sigterm(old);
    let successor = env.spawn_successor(&[]);
    let new = successor.id();
    wait_until("the successor to wait", Duration::from_secs(5), || {
        env.server_log().contains("waiting for it to exit")
    });
    assert!(alive(new), "the successor waits instead of exiting");
    assert!(
        env.server_log().contains(&format!("holder_pid={old}")),
        "the log names who holds the pool"
    );
    // The old server finishes the call it had, then leaves; the successor serves.
    let created = in_flight.await.unwrap().unwrap().into_inner();
    wait_until("the old server to exit", Duration::from_secs(10), || {
        !alive(old)
    });
    env.adopt(successor).await;
    assert_eq!(env.pid(), Some(new));
    env.csi
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .expect("the successor answers on the endpoint the old one left");
    // What the old server made in its last call is the successor's to serve.
    let id = created.volume.unwrap().volume_id;
    env.delete(&id).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_gives_up_after_its_bound_and_leaves_the_serving_socket_alone() {
    let mut env = TestEnv::start().await;
    let started = Instant::now();
    let out = env
        .spawn_successor(&["--pool-lock-timeout", "1"])
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = env.server_log();
    assert!(
        log.contains("is in use by another strata server")
            && log.contains(&format!("pid {}", env.pid().unwrap()))
            && log.contains("--pool-lock-timeout"),
        "{log}"
    );
    // The server it waited for still owns and answers its socket.
    env.csi.identity.probe(csi::ProbeRequest {}).await.unwrap();
    env.restart(None).await;
    env.csi.identity.probe(csi::ProbeRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_removes_only_the_socket_it_bound() {
    let mut env = TestEnv::start().await;
    let socket = env.dir.path().join("csi.sock");
    // Somebody replaced the socket (a server started by hand on the same path, say).
    std::fs::remove_file(&socket).unwrap();
    let theirs = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    env.stop();
    assert!(socket.exists(), "another process's socket is not removed");
    drop(theirs);
    std::fs::remove_file(&socket).unwrap();
    // Its own socket it does remove.
    env.restart(None).await;
    env.stop();
    assert!(!socket.exists(), "its own socket is removed at exit");
}

/// `strata serve` with `endpoint`, expected to exit non-zero within a second, saying
/// `expected`, having made nothing.
fn refused_at_once(endpoint: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--node-id", "n", "--endpoint", endpoint, "--pool"])
        .arg(&pool)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{endpoint}: {err}");
    assert!(took < Duration::from_secs(1), "{endpoint}: took {took:?}");
    assert!(err.contains(expected), "{endpoint}: {err}");
    assert!(
        err.lines().count() <= 2,
        "{endpoint}: one clear line: {err}"
    );
    assert!(!pool.exists(), "{endpoint}: the pool was made");
}

#[test]
fn endpoints_that_cannot_work_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // 130 bytes: more than sun_path holds.
    let long = dir
        .path()
        .join("d".repeat(130 - dir.path().as_os_str().len() - 1));
    assert_eq!(long.as_os_str().len(), 130);
    refused_at_once(&format!("unix://{}", long.display()), "at most 107 bytes");
    refused_at_once(
        &format!("unix://{}/missing/csi.sock", dir.path().display()),
        "does not exist",
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    refused_at_once(
        &format!("unix://{}/csi.sock", file.display()),
        "is not a directory",
    );
    // A directory on a read-only filesystem (root may write anywhere else).
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "strata-test-ro"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(mounted.success());
    let result = std::panic::catch_unwind(|| {
        refused_at_once(
            &format!("unix://{}/csi.sock", ro.display()),
            "is not writable",
        )
    });
    assert!(Command::new("umount").arg(&ro).status().unwrap().success());
    result.unwrap();
    // A TCP address another process listens on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    refused_at_once(
        &format!("tcp://{}", taken.local_addr().unwrap()),
        "cannot listen on",
    );
}
