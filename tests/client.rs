//! The `strata` client commands against a running server: tables, JSON, and the full
//! create / snapshot / restore / expand / delete flow an operator would type.

mod common;

use std::process::Command;

use common::*;

fn strata(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env("CSI_ENDPOINT", format!("unix://{}", env.path("csi.sock")))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_id(env: &TestEnv, args: &[&str]) -> String {
    let (ok, out, err) = strata(env, args);
    assert!(ok, "{args:?}: {err}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    rows[0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_drive_a_volume_through_its_life_with_the_client() {
    let env = TestEnv::start().await;
    let (ok, out, _) = strata(&env, &["info"]);
    assert!(
        ok && out.contains("strata.csi.dev") && out.contains("test-node"),
        "{out}"
    );

    let id = json_id(
        &env,
        &["volume", "create", "demo", "--size", "64Mi", "-o", "json"],
    );
    // Tables read as people write sizes; JSON has numbers.
    let (ok, out, _) = strata(&env, &["volume", "list"]);
    assert!(
        ok && out.starts_with("ID") && out.contains(&id) && out.contains("64Mi"),
        "{out}"
    );
    let (ok, out, _) = strata(&env, &["volume", "list", "-o", "json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(ok && listed[0]["capacity"] == 67_108_864, "{out}");
    // A create's result is the id alone on stdout; the confirmation goes to stderr.
    let (ok, out, err) = strata(&env, &["volume", "create", "scripted", "--size", "16Mi"]);
    let scripted = out.trim().to_owned();
    assert!(
        ok && scripted.starts_with("vol-") && !scripted.contains(char::is_whitespace),
        "{out}"
    );
    assert!(
        err.contains("created volume") && err.contains("16Mi"),
        "{err}"
    );
    let (ok, out, err) = strata(&env, &["volume", "delete", &scripted]);
    assert!(
        ok && out.is_empty() && err.contains("deleted"),
        "{out} {err}"
    );

    let (staging, target) = (env.path("stage"), env.path("mnt"));
    let (ok, _, err) = strata(&env, &["node", "stage", &id, "--staging-path", &staging]);
    assert!(ok, "{err}");
    let (ok, _, err) = strata(
        &env,
        &[
            "node",
            "publish",
            &id,
            "--staging-path",
            &staging,
            "--target-path",
            &target,
        ],
    );
    assert!(ok, "{err}");
    std::fs::write(format!("{target}/hello"), b"hello").unwrap();
    let (ok, out, _) = strata(
        &env,
        &["node", "stats", &id, "--path", &target, "-o", "json"],
    );
    assert!(ok && out.contains("\"unit\": \"bytes\""), "{out}");

    let snap = json_id(&env, &["snapshot", "create", "snap", &id, "-o", "json"]);
    // The node that holds each snapshot, for importing it into Kubernetes.
    let (ok, out, _) = strata(&env, &["snapshot", "list", "--source-volume-id", &id]);
    assert!(
        ok && out.contains(&snap) && out.contains("NODE") && out.contains("test-node"),
        "{out}"
    );
    // What a backup tool would copy: the snapshot's ranges, and none changed against itself.
    let (ok, out, err) = strata(&env, &["snapshot", "allocated", &snap, "-o", "json"]);
    let ranges: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(
        ok && !ranges.is_empty() && err.contains("bytes allocated, of a 67108864-byte volume"),
        "{out} {err}"
    );
    let (ok, out, err) = strata(&env, &["snapshot", "changed", &snap, &snap]);
    assert!(
        ok && out.starts_with("OFFSET") && err.starts_with("0 range(s)"),
        "{out} {err}"
    );
    let (ok, out, _) = strata(&env, &["snapshot", "get", &snap, "-o", "json"]);
    let got: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let created = got[0]["created"].as_str().unwrap_or_default();
    assert!(
        ok && created.len() >= 20 && created.contains('T') && created.ends_with('Z'),
        "an RFC 3339 time: {out}"
    );
    assert!(
        got[0]["ready"] == true && got[0]["size"] == 67_108_864,
        "{out}"
    );
    let restored = json_id(
        &env,
        &[
            "volume",
            "create",
            "restored",
            "--size",
            "128Mi",
            "--from-snapshot",
            &snap,
            "-o",
            "json",
        ],
    );
    let (ok, out, _) = strata(&env, &["volume", "expand", &restored, "--size", "256Mi"]);
    assert!(ok && out.contains("256Mi"), "{out}");
    // Its I/O limits: changed, and a bad key refused with the server's reason.
    let (ok, out, err) = strata(
        &env,
        &[
            "volume",
            "modify",
            &restored,
            "--param",
            "maxWriteIOPS=500",
            "--param",
            "maxReadBytesPerSecond=20Mi",
        ],
    );
    assert!(ok && out.contains("modified"), "{out} {err}");
    let (ok, _, err) = strata(&env, &["volume", "modify", &restored, "--param", "iops=5"]);
    assert!(!ok && err.contains("unknown mutable parameter"), "{err}");

    // A group snapshot of the staged volume and the restored one, at one instant.
    let (ok, out, err) = strata(&env, &["snapshot", "group-create", "both", &id, &restored]);
    let group = out.trim().to_owned();
    assert!(ok && group.starts_with("group-"), "{out} {err}");
    let (ok, out, _) = strata(&env, &["snapshot", "group-get", &group, "-o", "json"]);
    let members: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(
        ok && members.len() == 2 && members.iter().all(|m| m["group"] == group.as_str()),
        "{out}"
    );
    let (ok, out, _) = strata(&env, &["snapshot", "list"]);
    assert!(ok && out.contains("GROUP") && out.contains(&group), "{out}");
    let member = members[0]["id"].as_str().unwrap();
    let (ok, _, err) = strata(&env, &["snapshot", "delete", member]);
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("group"),
        "a member goes only with its group: {err}"
    );
    let (ok, _, err) = strata(&env, &["snapshot", "group-delete", &group]);
    assert!(ok, "{err}");
    let (ok, out, _) = strata(&env, &["snapshot", "list", "-o", "json"]);
    let left: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(
        ok && left.len() == 1,
        "only the plain snapshot is left: {out}"
    );

    // Errors are one line with the gRPC code and the driver's advice; the exit code is 1.
    let (ok, _, err) = strata(&env, &["volume", "delete", &id]);
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("unpublish"),
        "{err}"
    );

    for args in [
        vec!["node", "unpublish", &id, "--target-path", &target],
        vec!["node", "unstage", &id, "--staging-path", &staging],
        vec!["volume", "delete", &id],
        vec!["volume", "delete", &restored],
        vec!["snapshot", "delete", &snap],
    ] {
        let (ok, _, err) = strata(&env, &args);
        assert!(ok, "{args:?}: {err}");
    }
    let (ok, out, _) = strata(&env, &["volume", "list", "-o", "json"]);
    assert!(ok && out.trim() == "[]", "{out}");
    env.assert_clean();
}
