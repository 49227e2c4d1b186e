//! Operations: Prometheus metrics after a lifecycle, the liveness endpoint, JSON logs, and
//! documentation that keeps up with the flags.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use csi_proto as csi;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_and_time_every_method_and_code_and_health_follows_the_pool() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env = TestEnv::start_with_args(
        &[
            "--metrics-address",
            &addr,
            "--health-address",
            &addr,
            "--log-format",
            "json",
        ],
        None,
    )
    .await;
    let id = env.create("m", 16 * MIB, ext4()).await.volume_id;
    let (staging, target) = (env.path("s"), env.path("t"));
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.publish(&id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    let missing = env
        .csi
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "vol-0123456789abcdef01234567".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    let (status, text) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let ok = r#"grpc_status_code="OK""#;
    for method in [
        "/csi.v1.Controller/CreateVolume",
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodePublishVolume",
        "/csi.v1.Node/NodeUnpublishVolume",
        "/csi.v1.Node/NodeUnstageVolume",
    ] {
        let m = format!(r#"method_name="{method}""#);
        assert_eq!(
            sample(&text, "csi_operations_total", &[&m, ok]),
            Some(1.0),
            "{method}\n{text}"
        );
        assert_eq!(
            sample(&text, "csi_operations_seconds_count", &[&m, ok]),
            Some(1.0),
            "{method}"
        );
        assert_eq!(
            sample(
                &text,
                "csi_operations_seconds_bucket",
                &[&m, ok, r#"le="+Inf""#]
            ),
            Some(1.0)
        );
        assert!(text.contains(r#"le="0.0001""#), "buckets start at 0.1 ms");
    }
    let get = r#"method_name="/csi.v1.Controller/ControllerGetVolume""#;
    assert_eq!(
        sample(
            &text,
            "csi_operations_total",
            &[get, r#"grpc_status_code="NotFound""#]
        ),
        Some(1.0)
    );
    assert!(text.contains(r#"driver_name="strata.csi.dev""#));
    assert_eq!(sample(&text, "strata_volumes", &[]), Some(1.0));
    assert!(sample(&text, "strata_pool_capacity_bytes", &[]).unwrap() > 0.0);
    assert!(text.contains("strata_reconciliation_findings"));

    let (status, body) = http_get(port, "/healthz");
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");
    std::fs::remove_dir_all(env.pool().join("volumes")).unwrap();
    let (status, body) = http_get(port, "/healthz");
    assert!(
        status.contains("503") && body.contains("pool"),
        "{status} {body}"
    );
    assert!(http_get(port, "/nope").0.contains("404"));

    // One JSON object per line, with the fields operators grep for.
    let log = env.server_log();
    let rpc = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["method"] == "CreateVolume")
        .expect("a JSON line for CreateVolume");
    assert_eq!(rpc["fields"]["code"], "OK");
    assert!(rpc["fields"]["micros"].is_u64());
}

/// Every `strata serve` flag appears in the configuration reference.
#[test]
fn every_serve_flag_is_documented() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .collect();
    assert!(flags.len() > 8, "{help}");
    for flag in flags {
        if flag == "--help" || flag == "--version" {
            continue;
        }
        assert!(
            doc.contains(&format!("`{flag}")),
            "{flag} is not in docs/configuration.md"
        );
    }
    for param in strata_core::controller::STORAGE_CLASS_PARAMETERS {
        assert!(
            doc.contains(param),
            "StorageClass parameter {param} is not documented"
        );
    }
}

/// `strata pool release --pool DIR`, as an uninstall runs it on a node.
fn pool_release(pool: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["pool", "release", "--pool"])
        .arg(pool)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_release_frees_the_pool_image_only_when_nothing_uses_it() {
    use strata_core::os::linux::LinuxHost;
    use strata_core::os::{FileId, LoopDevices};
    let mut env = TestEnv::start_with_args(&["--pool-image", "1Gi"], None).await;
    let pool = env.dir.path().join("pool");
    let id = env.create("a", 16 * MIB, ext4()).await.volume_id;
    let staging = env.path("stage");
    env.stage(&id, &staging, ext4()).await.unwrap();
    // A server serves the pool: refused.
    let out = pool_release(&pool);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another strata server"));
    // The DaemonSet is gone, but a volume is still staged: refused, naming it.
    env.stop();
    let out = pool_release(&pool);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still in use") && err.contains(&id), "{err}");
    env.restart(None).await;
    env.unstage(&id, &staging).await.unwrap();
    env.stop();
    // Nothing uses it: released, and the data stays for the next server.
    let out = pool_release(&pool);
    assert!(out.status.success(), "{out:?}");
    let image = FileId::of(&pool.join("pool.img")).unwrap();
    assert!(
        LinuxHost.find(image).unwrap().is_none(),
        "loop device freed"
    );
    assert!(kernel_state_under(&pool).0.is_empty(), "pool unmounted");
    assert!(pool.join("pool.img").exists());
    // Again: nothing to do.
    assert!(pool_release(&pool).status.success());
    env.restart(None).await;
    env.stage(&id, &staging, ext4()).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.assert_clean();
}

#[test]
fn bad_serve_options_are_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let sock = format!("unix://{}/csi.sock", dir.path().display());
    for bad in [
        vec!["--pool-image", "100Mi"],
        vec!["--pool-image", "1Gi", "--backend", "btrfs"],
        vec!["--driver-name", "not a name"],
        vec!["--max-volumes=-1"],
        vec!["--allowed-path-prefix", "relative/dir"],
        vec!["--allowed-path-prefix", "/"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["serve", "--node-id", "n", "--endpoint", &sock, "--pool"])
            .arg(&pool)
            .args(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.lines().count() <= 2 && err.contains("--"),
            "{bad:?}: {err}"
        );
        assert!(!pool.exists(), "{bad:?} made the pool");
        assert!(
            !dir.path().join("csi.sock").exists(),
            "{bad:?} bound the socket"
        );
    }
}
