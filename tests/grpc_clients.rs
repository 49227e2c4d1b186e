//! Clients other than our own call the real server over its unix socket: grpc-core (through
//! Python's grpcio, with default options), and grpc-go dialled as the kubelet and the
//! sidecars dial.

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

/// A call's outcome as a client printed it.
trait Called: std::fmt::Debug {
    fn call(&self) -> &str;
    /// The length of the status message.
    fn length(&self) -> usize;
}

impl Called for Outcome {
    fn call(&self) -> &str {
        &self.call
    }
    fn length(&self) -> usize {
        self.length
    }
}

impl Called for GoOutcome {
    fn call(&self) -> &str {
        &self.call
    }
    fn length(&self) -> usize {
        self.length
    }
}

/// What a client that exited successfully printed: one JSON object per call.
fn outcomes<T: serde::de::DeserializeOwned>(out: &std::process::Output) -> Vec<T> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client failed: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The outcome of `call`, whose message must be short.
fn find<'a, T: Called>(outcomes: &'a [T], call: &str) -> &'a T {
    let o = outcomes
        .iter()
        .find(|o| o.call() == call)
        .unwrap_or_else(|| panic!("{call} not called: {outcomes:?}"));
    assert!(o.length() < 512, "{call}: a {}-byte message", o.length());
    o
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
    let outcomes: Vec<Outcome> = outcomes(&out);
    let code_of = |call: &str| {
        let o = find(&outcomes, call);
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

/// One call's outcome as `tests/clients/grpc_go.go` prints it.
#[derive(serde::Deserialize, Debug)]
struct GoOutcome {
    dial: String,
    call: String,
    code: i32,
    length: usize,
    message: String,
    /// Streamed calls: messages and BlockMetadata tuples received.
    #[serde(default)]
    messages: usize,
    #[serde(default)]
    tuples: usize,
}

/// Builds `tests/clients/grpc_go.go` against the system's grpc-go (Debian's
/// golang-google-grpc-dev, in GOPATH mode: no module download).
fn build_go_client() -> std::path::PathBuf {
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpc-go");
    std::fs::create_dir_all(&out_dir).unwrap();
    let binary = out_dir.join("grpc_go");
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/clients/grpc_go.go"
    );
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(source)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", out_dir.join("cache"))
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs Go and grpc-go: apt-get install golang-go golang-google-grpc-dev (.ci/run installs them): {e}")
        });
    assert!(
        built.status.success(),
        "building the grpc-go client (apt-get install golang-go golang-google-grpc-dev): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    binary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_dialled_as_the_kubelet_and_the_sidecars_is_served() {
    let env = TestEnv::start().await;
    let client = build_go_client();
    let (staging, target) = (env.path("stage"), env.path("publish"));
    let out = Command::new(client)
        .arg(env.dir.path().join("csi.sock"))
        .args([&staging, &target])
        .output()
        .unwrap();
    let outcomes: Vec<GoOutcome> = outcomes(&out);
    let code_of = |call: &str| {
        let o = find(&outcomes, call);
        (
            tonic::Code::from_i32(o.code),
            o.dial.as_str(),
            o.message.as_str(),
        )
    };
    for call in [
        "GetPluginInfo",
        "Probe",
        "CreateVolume",
        "NodeGetInfo",
        "NodeGetCapabilities",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeGetVolumeStats",
        "CreateSnapshot",
        "GetMetadataAllocated",
        "GetMetadataDelta",
        "DeleteSnapshot 1",
        "DeleteSnapshot 2",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "DeleteVolume",
    ] {
        let (code, dial, message) = code_of(call);
        assert_eq!(code, tonic::Code::Ok, "{call} ({dial}): {message}");
    }
    let (code, _, message) = code_of("CreateVolume with a 100 KiB name");
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    let (code, _, message) = code_of("DeleteVolume without an id");
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    // Streamed as the external-snapshot-metadata sidecar reads them: one tuple per message
    // when asked so, the written file among the changes, a missing base refused.
    let allocated = find(&outcomes, "GetMetadataAllocated");
    assert!(allocated.tuples >= 2, "{allocated:?}");
    assert_eq!(allocated.messages, allocated.tuples, "{allocated:?}");
    let delta = find(&outcomes, "GetMetadataDelta");
    assert!(delta.tuples >= 1 && delta.messages >= 1, "{delta:?}");
    let (code, _, message) = code_of("GetMetadataDelta without a base");
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());
    env.assert_clean();
}
