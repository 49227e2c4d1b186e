//! `strata bench` runs every scenario against a real server and reports in JSON. Figures are
//! printed, never asserted: benchmarks are not tests of speed.

mod common;

use std::process::Command;

use common::*;

fn bench(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let workdir = env.path("bench");
    // scale creates and lists only: it mounts nothing, so it takes no workdir.
    let workdir_args = if args[0] == "scale" {
        vec![]
    } else {
        vec!["--workdir", workdir.as_str()]
    };
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("bench")
        .args(args)
        .args(workdir_args)
        .args(["-o", "json"])
        .env("CSI_ENDPOINT", format!("unix://{}", env.path("csi.sock")))
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

    let r = bench(&env, &["snapshot", "--sizes", "1Mi,4Mi"]);
    assert_eq!(r.as_array().unwrap().len(), 2);
    assert!(
        r.as_array()
            .unwrap()
            .iter()
            .all(|row| row["verified"] == true)
    );

    env.assert_clean();
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
}
