//! `strata bench` runs every scenario against a real server and reports in JSON. Figures are
//! printed, never asserted: benchmarks are not tests of speed.

mod common;

use std::process::Command;

use common::*;

#[path = "common/minimal_csi.rs"]
mod minimal_csi;

/// `bench io` made short: a small file and a fraction of a second per job.
const QUICK_IO: [&str; 7] = [
    "io",
    "--size",
    "4Mi",
    "--seconds",
    "0.2",
    "--engine",
    "builtin",
];

fn bench(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    bench_at(&env.path("csi.sock"), &env.path("bench"), args)
}

/// Runs `strata bench ARGS` against the driver at `socket`, mounting under `workdir`.
fn bench_at(socket: &str, workdir: &str, args: &[&str]) -> serde_json::Value {
    // scale creates and lists only: it mounts nothing, so it takes no workdir.
    let workdir_args = if args[0] == "scale" {
        vec![]
    } else {
        vec!["--workdir", workdir]
    };
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("bench")
        .args(args)
        .args(workdir_args)
        .args(["-o", "json"])
        .env("CSI_ENDPOINT", format!("unix://{socket}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `strata bench compare SCENARIO` of endpoints `a` and `b` with the scenario's `options`:
/// its JSON, or what it printed on stderr when it failed.
fn compare(
    scenario: &str,
    a: &str,
    b: &str,
    rounds: &str,
    options: &[&str],
) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "bench", "compare", scenario, "--rounds", rounds, "-o", "json",
        ])
        .args(["--endpoint", a, "--endpoint", b, "--"])
        .args(options)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

fn calls(report: &serde_json::Value, rpc: &str) -> u64 {
    report["rpcs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rpc"] == rpc)
        .map(|r| r["calls"].as_u64().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_cleans_up() {
    let env = TestEnv::start().await;
    let r = bench(
        &env,
        &[
            "lifecycle",
            "--volumes",
            "4",
            "--concurrency",
            "2",
            "--size",
            "32Mi",
        ],
    );
    assert_eq!(r["volumes"], 4);
    for rpc in [
        "CreateVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "write+fsync",
        "NodeUnstageVolume",
        "DeleteVolume",
    ] {
        assert_eq!(calls(&r, rpc), 4, "{rpc}");
    }
    assert_eq!(
        calls(&r, "ControllerPublishVolume"),
        0,
        "Strata has no controller publish"
    );

    let r = bench(
        &env,
        &[
            "lifecycle",
            "--volumes",
            "2",
            "--concurrency",
            "1",
            "--size",
            "32Mi",
            "--block",
        ],
    );
    assert_eq!(calls(&r, "write+fsync"), 2);

    let r = bench(
        &env,
        &[
            "churn",
            "--seconds",
            "2",
            "--concurrency",
            "2",
            "--size",
            "32Mi",
        ],
    );
    assert!(r["volumes"].as_u64().unwrap() > 0, "operations done");

    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let cmd = std::fs::read_to_string(e.path().join("cmdline")).ok()?;
            cmd.contains(&env.path("csi.sock"))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .unwrap();
    let r = bench(
        &env,
        &[
            "scale",
            "--volumes",
            "50",
            "--concurrency",
            "2",
            "--page-size",
            "7",
            "--pid",
            &pid,
        ],
    );
    assert_eq!(calls(&r, "CreateVolume"), 50);
    assert_eq!(calls(&r, "ListVolumes (page)"), 8);
    assert!(r["rss_kib"].as_array().unwrap().len() >= 3, "{r}");

    let r = bench(&env, &["snapshot", "--sizes", "1Mi", "--block"]);
    assert_eq!(r[0]["verified"], true, "{r}");
    let r = bench(&env, &["snapshot", "--sizes", "1Mi,4Mi"]);
    assert_eq!(r.as_array().unwrap().len(), 2);
    assert!(
        r.as_array()
            .unwrap()
            .iter()
            .all(|row| row["verified"] == true)
    );

    // Changed block tracking: the delta holds every scattered rewrite; both volumes and
    // their snapshots are gone after.
    let r = bench(
        &env,
        &[
            "cbt",
            "--size",
            "64Mi",
            "--data",
            "8Mi",
            "--changed-percent",
            "5",
            "--flat-size",
            "256Mi",
            "--flat-writes",
            "64",
            "--pid",
            &pid,
        ],
    );
    assert_eq!(r["delta_covers_every_write"], true, "{r}");
    assert_eq!(r["rewrites"], 51, "{r}");
    assert!(r["delta"]["bytes"].as_u64().unwrap() >= 51 * 65536, "{r}");
    assert_eq!(r["allocated"]["bytes"], 8 << 20, "{r}");
    assert_eq!(r["flat"]["allocated"]["ranges"], 128, "{r}");
    assert_eq!(r["flat"]["delta"]["ranges"], 64, "{r}");
    assert!(r["flat"]["delta"]["driver_peak_growth_kib"].is_u64(), "{r}");

    let r = bench(
        &env,
        &["group", "--volumes", "3", "--data", "4Mi", "--rounds", "2"],
    );
    assert_eq!(r["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(r["restored_members_verified"], true);

    let r = bench(
        &env,
        &[
            "fsgroup", "--files", "300", "--size", "32Mi", "--group", "4321",
        ],
    );
    assert_eq!(r["files"], 300);
    assert!(r["second_stage_and_publish_ms"].as_f64().unwrap() > 0.0);
    assert!(r["without_group_stage_and_publish_ms"].as_f64().unwrap() > 0.0);
    // More files than the volume has inodes: the run fails and leaves no volume behind.
    let err = failing_bench(&env, &["fsgroup", "--files", "20000", "--size", "32Mi"]);
    assert!(err.contains("create 20000 files"), "{err}");

    // The data path beside a native directory: every job on both sides, nothing left there.
    let native = env.path("native");
    std::fs::create_dir_all(&native).unwrap();
    let r = bench(&env, &[&QUICK_IO[..], &["--native-dir", &native]].concat());
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{r}");
    for row in rows {
        assert!(row["native"]["iops"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
        assert!(
            row["volume"]["cpu_busy_percent"].as_f64().is_some(),
            "{row}"
        );
    }
    assert_eq!(std::fs::read_dir(&native).unwrap().count(), 0);

    env.assert_clean();
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
    assert!(
        std::fs::read_dir(env.pool().join("groups"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "no group left"
    );
}

/// Every scenario against a driver that offers nothing but volumes and publish (no staging,
/// no snapshots, no groups, no VOLUME_MOUNT_GROUP): data goes through the published path,
/// what the driver lacks is skipped with a reason, and `compare` sets it beside Strata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_adapts_to_what_the_driver_offers() {
    let env = TestEnv::start().await;
    let mini_socket = env.path("mini.sock");
    minimal_csi::serve(
        &env.dir.path().join("mini-volumes"),
        std::path::Path::new(&mini_socket),
    );
    let workdir = env.path("mini-bench");
    let r = bench_at(
        &mini_socket,
        &workdir,
        &[
            "lifecycle",
            "--volumes",
            "3",
            "--concurrency",
            "1",
            "--data",
            "64Ki",
        ],
    );
    assert_eq!(calls(&r, "NodeStageVolume"), 0, "{r}");
    assert_eq!(calls(&r, "NodePublishVolume"), 3, "{r}");
    assert_eq!(calls(&r, "write+fsync"), 3, "{r}");
    let r = bench_at(
        &mini_socket,
        &workdir,
        &[
            "churn",
            "--seconds",
            "1",
            "--concurrency",
            "1",
            "--data",
            "64Ki",
        ],
    );
    assert!(r["volumes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(calls(&r, "CreateSnapshot"), 0, "{r}");
    for (scenario, lacking) in [
        ("snapshot", "CREATE_DELETE_SNAPSHOT"),
        ("group", "GROUP_SNAPSHOT"),
        ("fsgroup", "VOLUME_MOUNT_GROUP"),
        ("cbt", "SnapshotMetadata"),
    ] {
        let r = bench_at(&mini_socket, &workdir, &[scenario]);
        assert!(
            r["skipped"].as_str().unwrap_or_default().contains(lacking),
            "{scenario}: {r}"
        );
    }
    let r = bench_at(&mini_socket, &workdir, &QUICK_IO);
    assert_eq!(r["rows"].as_array().unwrap().len(), 4, "{r}");
    let r = bench_at(&mini_socket, &workdir, &["scale", "--volumes", "5"]);
    assert_eq!(calls(&r, "CreateVolume"), 5, "{r}");

    // Side by side: Strata (A) and the minimal driver (B), interleaved.
    let (strata, mini) = (
        format!("unix://{}", env.path("csi.sock")),
        format!("unix://{mini_socket}"),
    );
    let options = ["--volumes", "2", "--size", "32Mi", "--workdir", &workdir];
    let c = compare("lifecycle", &strata, &mini, "2", &options).unwrap();
    assert_eq!(c["rounds"], 2);
    let figure = |name: &str| {
        c["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["figure"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {c}"))
    };
    let rate = figure("volumes/s");
    assert!(rate["a"].as_f64().unwrap() > 0.0 && rate["ratio"].as_f64().unwrap() > 0.0);
    // Strata stages; the minimal driver does not: its side has no figure there.
    assert!(figure("NodeStageVolume p50 ms")["b"].is_null(), "{c}");

    // A scenario only one side offers is measured there and reported skipped for the other.
    let options = ["--sizes", "1Mi", "--workdir", &workdir];
    let c = compare("snapshot", &strata, &mini, "1", &options).unwrap();
    assert!(
        c["skipped"][0].as_str().unwrap().contains("mini.sock"),
        "{c}"
    );
    // Bad options are refused before anything runs.
    let err = compare("lifecycle", "/a", "/b", "1", &["--volumes", "many"]).unwrap_err();
    assert!(err.contains("--volumes"), "{err}");

    env.assert_clean();
    assert!(
        std::fs::read_dir(env.dir.path().join("mini-volumes"))
            .unwrap()
            .next()
            .is_none(),
        "the minimal driver's volumes were all deleted"
    );
}

/// `strata bench SCENARIO ARGS` against `env`, expected to fail: what it printed on stderr.
fn failing_bench(env: &TestEnv, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("bench")
        .args(args)
        .args(["--workdir", &env.path("bench")])
        .env("CSI_ENDPOINT", format!("unix://{}", env.path("csi.sock")))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} did not fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A run stopped part-way by an error (a write that does not fit, a restore the pool has no
/// room for) undoes what it made: no volume, mount, loop device, snapshot or group is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_fails_part_way_leaves_nothing_behind() {
    let env = TestEnv::start_on_fs_sized("ext4", 300 << 20, &[]).await;
    let undone = "(what the run had made is undone)";
    // More data than the volumes hold: every client fails with its volume published.
    let err = failing_bench(
        &env,
        &[
            "lifecycle",
            "--volumes",
            "6",
            "--concurrency",
            "2",
            "--size",
            "16Mi",
            "--data",
            "64Mi",
        ],
    );
    assert!(err.contains("write data") && err.contains(undone), "{err}");
    let err = failing_bench(
        &env,
        &[
            "churn",
            "--seconds",
            "3",
            "--size",
            "16Mi",
            "--data",
            "64Mi",
        ],
    );
    assert!(err.contains("write data") && err.contains(undone), "{err}");
    // The restore finds the pool too full, with the source published and its snapshot made.
    let err = failing_bench(&env, &["snapshot", "--sizes", "100Mi"]);
    assert!(
        err.contains("CreateVolume from snapshot") && err.contains(undone),
        "{err}"
    );
    // The same for a group's member, with the group made.
    let err = failing_bench(
        &env,
        &["group", "--volumes", "2", "--data", "50Mi", "--rounds", "1"],
    );
    assert!(
        err.contains("CreateVolume from a member") && err.contains(undone),
        "{err}"
    );
    env.assert_clean();
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
    for kind in ["snapshots", "groups"] {
        let left: Vec<_> = std::fs::read_dir(env.pool().join(kind))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{kind} left: {left:?}");
    }
}

/// `bench move` against a server's peer service on loopback (the bench holds the peer
/// certificates): the final copy carries only what changed, the copy matches the source,
/// and nothing of the move or the volume is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_move_measures_a_final_copy_of_only_what_changed_and_keeps_nothing() {
    let certs = tempfile::tempdir().unwrap();
    let tls = peer_certs(certs.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let tls = tls.display().to_string();
    let env = TestEnv::start_with_args(
        &[
            "--node-id",
            "node-a",
            "--peer-listen",
            &address,
            "--peer-tls-dir",
            &tls,
        ],
        None,
    )
    .await;
    let peer = format!("node-a={address}");
    let r = bench(
        &env,
        &[
            "move",
            "--size",
            "64Mi",
            "--data",
            "16Mi",
            "--changed-percent",
            "2",
            "--peer",
            &peer,
            "--peer-tls-dir",
            &tls,
        ],
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["precopy_bytes"], 16 << 20, "{r}");
    let (changed, sent) = (
        r["changed_bytes"].as_u64().unwrap(),
        r["final_bytes"].as_u64().unwrap(),
    );
    assert!(changed > 0 && sent >= changed && sent < 4 * changed, "{r}");
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
    // A node without --peer pulls nothing, so it has only the source's half.
    let left: Vec<_> = std::fs::read_dir(env.pool().join("moves").join("out"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "moves/out: {left:?}");
}
