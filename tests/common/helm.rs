//! The Helm chart rendered by the helm CI uses, for tests of what it generates at install.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The helm CI uses (.ci/run exports it as STRATA_HELM), else the same release built from
/// its Go module into the same cache.
pub fn helm() -> PathBuf {
    if let Ok(p) = std::env::var("STRATA_HELM") {
        return p.into();
    }
    const VERSION: &str = "v4.2.4";
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = PathBuf::from(home).join(format!(".cache/strata-ci/helm-{VERSION}"));
    let bin = dir.join("helm");
    if !bin.exists() {
        let built = Command::new("go")
            .args(["install", &format!("helm.sh/helm/v4/cmd/helm@{VERSION}")])
            .env("GOBIN", &dir)
            .env("GOFLAGS", "-buildvcs=false")
            .status()
            .expect("this test needs Go to build helm");
        assert!(built.success(), "building helm failed");
    }
    bin
}

/// `helm template strata deploy/helm/strata -n strata-system ARGS`.
pub fn render(args: &[&str]) -> String {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/strata");
    let out = Command::new(helm())
        .args(["template", "strata"])
        .arg(&chart)
        .args(["--namespace", "strata-system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The base64 value of `key` in a rendering (`  key: VALUE`), decoded.
pub fn data(text: &str, key: &str) -> Vec<u8> {
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("{key} missing from: {text}"));
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(value.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{key} is not base64");
    out.stdout
}
