//! Clients other than our own: grpc-core (through Python's grpcio, with default options)
//! calls the real server over its unix socket.

mod common;

use std::process::Command;

use common::*;

/// One call's outcome as `tests/clients/grpc_core.py` prints it.
#[derive(serde::Deserialize, Debug)]
struct Outcome {
    call: String,
    code: String,
    length: usize,
    message: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_core_client_with_default_options_is_served() {
    let env = TestEnv::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/clients/grpc_core.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(env.dir.path().join("csi.sock"))
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'grpc'"),
        "this test needs grpcio: pip install grpcio (.ci/run installs it)"
    );
    assert!(out.status.success(), "the client failed: {stderr}");
    let outcomes: Vec<Outcome> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let code_of = |call: &str| {
        let o = outcomes
            .iter()
            .find(|o| o.call == call)
            .unwrap_or_else(|| panic!("{call} not called: {outcomes:?}"));
        assert!(o.length < 512, "{call}: a {}-byte message", o.length);
        (o.code.as_str(), o.message.as_str())
    };
    assert_eq!(code_of("GetPluginInfo").0, "OK");
    assert_eq!(code_of("Probe").0, "OK");
    assert_eq!(code_of("CreateVolume").0, "OK");
    let (code, message) = code_of("ListVolumes with a 100 KiB token");
    assert_eq!(code, "ABORTED", "{message}");
    let (code, message) = code_of("CreateVolume with a 100 KiB name");
    assert_eq!(code, "INVALID_ARGUMENT", "{message}");
    assert_eq!(code_of("CreateVolumeGroupSnapshot").0, "OK");
    assert_eq!(code_of("DeleteVolumeGroupSnapshot").0, "OK");
    assert_eq!(code_of("DeleteVolume").0, "OK");
    env.assert_clean();
}
