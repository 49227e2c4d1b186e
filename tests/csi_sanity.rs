//! The upstream conformance suite, csi-sanity (kubernetes-csi/csi-test), against the real
//! server: filesystem volumes on the host's filesystem, raw block volumes, and filesystem
//! volumes on an xfs pool image. Every spec it runs must pass; the only ones skipped are
//! those this machine cannot pass, each named in [`skips`] with its reason.
//!
//! csi-sanity is built from its Go module at [`CSI_SANITY_VERSION`] (a tag of the upstream
//! repository) into `target/tools/` the first time, so `cargo test` needs Go and the Go
//! module proxy; `.ci/run` builds it before the tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The csi-test release whose csi-sanity runs here: the first that knows every capability
/// of CSI v1.12 that Strata advertises (v5.4.0 refuses GET_SNAPSHOT as unknown).
const CSI_SANITY_VERSION: &str = "v5.5.0";
const CSI_SANITY_MODULE: &str = "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity";

/// What a production StorageClass passes: the provisioner's `--extra-create-metadata` keys
/// (Strata takes no parameters of its own on the image backend).
const PARAMETERS: &str = "csi.storage.k8s.io/pvc/name: sanity-claim
csi.storage.k8s.io/pvc/namespace: default
csi.storage.k8s.io/pv/name: pvc-0123456789
";

/// Builds (once) and returns the pinned csi-sanity.
fn csi_sanity() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_csi_sanity).clone()
}

fn build_csi_sanity() -> PathBuf {
    let bin_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tools")
        .join(format!("csi-sanity-{CSI_SANITY_VERSION}"));
    let bin = bin_dir.join("csi-sanity");
    if bin.exists() {
        return bin;
    }
    let out = Command::new("go")
        .args([
            "install",
            &format!("{CSI_SANITY_MODULE}@{CSI_SANITY_VERSION}"),
        ])
        .env("GOBIN", &bin_dir)
        .env("GOFLAGS", "-buildvcs=false")
        .output()
        .expect("csi-sanity is built with Go: install golang-go");
    assert!(
        out.status.success(),
        "go install csi-sanity {CSI_SANITY_VERSION}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Whether this process may grow a mounted ext4 filesystem (resize2fs needs
/// CAP_SYS_RESOURCE for the online resize ioctl).
fn can_grow_ext4_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The specs skipped on this machine, each with why.
fn skips(block: bool) -> Vec<(&'static str, &'static str)> {
    let mut skips = vec![];
    if !block && !can_grow_ext4_online() {
        skips.push((
            "should work if node-expand is called after node-publish",
            "grows a published ext4 filesystem online, which needs CAP_SYS_RESOURCE; this sandbox lacks it",
        ));
    }
    skips
}

/// Runs csi-sanity against `env`, asserting that it passed every spec it ran.
fn run_sanity(env: &TestEnv, block: bool, volume_size: u64) {
    let params = env.dir.path().join("sanity-parameters.yaml");
    std::fs::write(&params, PARAMETERS).unwrap();
    // The mutable parameters (I/O limits) its volumes are created and modified with.
    let mutable = env.dir.path().join("sanity-mutable-parameters.yaml");
    std::fs::write(
        &mutable,
        "maxWriteIOPS: \"1000\"\nmaxReadBytesPerSecond: \"64Mi\"\n",
    )
    .unwrap();
    let skips = skips(block);
    for (name, why) in &skips {
        eprintln!("skipping csi-sanity spec {name:?}: {why}");
    }
    let mut cmd = Command::new(csi_sanity());
    cmd.arg(format!("--csi.endpoint=unix://{}", env.path("csi.sock")))
        .arg(format!("--csi.stagingdir={}", env.path("sanity-stage")))
        .arg(format!("--csi.mountdir={}", env.path("sanity-target")))
        .arg(format!("--csi.testvolumesize={volume_size}"))
        .arg(format!("--csi.testvolumeexpandsize={}", 2 * volume_size))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!(
            "--csi.testvolumemutableparameters={}",
            mutable.display()
        ))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=10m");
    if block {
        cmd.arg("--csi.testvolumeaccesstype=block");
    }
    if !skips.is_empty() {
        let names: Vec<String> = skips.iter().map(|(n, _)| regex_quote(n)).collect();
        cmd.arg(format!("--ginkgo.skip={}", names.join("|")));
    }
    let out = cmd.output().expect("run csi-sanity");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("Ran ") || l.contains("Passed |") || l.contains("[FAIL]"))
        .collect();
    eprintln!("csi-sanity: {}", summary.join("\n"));
    assert!(
        out.status.success(),
        "csi-sanity failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = stdout
        .lines()
        .find_map(|l| {
            l.split_once(" Passed |")?
                .0
                .rsplit(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        passed > 50 && stdout.contains(" 0 Failed"),
        "csi-sanity ran too few specs or reported failures:\n{stdout}"
    );
    env.assert_clean();
    assert!(
        env.pool_entries().is_empty(),
        "csi-sanity's volumes are all deleted: {:?}",
        env.pool_entries()
    );
}

/// Escapes what a Go regular expression would read as syntax.
fn regex_quote(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_with_filesystem_volumes() {
    let env = TestEnv::start().await;
    run_sanity(&env, false, 256 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_with_block_volumes() {
    let env = TestEnv::start().await;
    run_sanity(&env, true, 256 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes_on_a_pool_image() {
    // The sizes a production claim asks for: the pool image is sparse, and so are volumes.
    let env = TestEnv::start_with_args(&["--pool-image", "64Gi"], None).await;
    run_sanity(&env, false, 1 << 30);
}
