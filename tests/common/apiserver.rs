//! A real kube-apiserver (built from its Go module by scripts/kube-apiserver.sh) with
//! Debian's etcd, on loopback or in a network namespace, and what tests install in it:
//! Strata's namespace, service account and RBAC, and kubeconfigs that act as it.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// etcd and kube-apiserver on loopback, stopped (and their data removed) on drop.
/// Which kube-apiserver to run.
#[derive(Default, Clone, Copy)]
pub struct Release {
    /// A release tag (`v1.35.4`); `None`: the minimum supported one.
    pub version: Option<&'static str>,
    /// `--feature-gates`.
    pub feature_gates: Option<&'static str>,
}

pub struct ApiServer {
    pub dir: tempfile::TempDir,
    pub etcd: Child,
    pub apiserver: Child,
    /// The port on loopback (of `netns`, if set).
    pub port: u16,
    pub url: String,
    pub netns: Option<String>,
    /// The CA of the serving certificate.
    pub ca: PathBuf,
}

/// `program` in the network namespace `netns`, if any.
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A serving certificate for `addresses`, and its CA (both PEM, the key last).
pub fn serving_cert(addresses: &[String]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(addresses.to_vec()).unwrap();
    let cert = leaf.signed_by(&key, &Issuer::new(ca, ca_key)).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The kube-apiserver of `release` (None: the minimum supported one, which .ci/run
/// exports as STRATA_KUBE_APISERVER), built once by scripts/kube-apiserver.sh.
fn apiserver_binary(release: Option<&str>) -> PathBuf {
    if let (Ok(p), None) = (std::env::var("STRATA_KUBE_APISERVER"), release) {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kube-apiserver.sh");
    let out = Command::new(script)
        .args(release)
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/kube-apiserver.sh builds kube-apiserver with Go");
    assert!(out.status.success(), "building kube-apiserver failed");
    String::from_utf8(out.stdout).unwrap().trim().into()
}

impl ApiServer {
    /// On host loopback.
    pub fn start() -> ApiServer {
        Self::start_in(None, &[])
    }

    /// In the network namespace `netns` (if any), listening on every address there, with
    /// a serving certificate for loopback and `addresses`.
    pub fn start_in(netns: Option<&str>, addresses: &[String]) -> ApiServer {
        Self::start_release(netns, addresses, Release::default())
    }

    /// [`ApiServer::start_in`] of another release, with feature gates.
    pub fn start_release(netns: Option<&str>, addresses: &[String], release: Release) -> ApiServer {
        let binary = apiserver_binary(release.version);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let log = |name: &str| fs::File::create(d.join(name)).unwrap();
        let etcd = command_in(netns, "etcd")
            .arg("--data-dir")
            .arg(d.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .stdout(log("etcd.log"))
            .stderr(log("etcd.log"))
            .spawn()
            .expect("etcd (Debian's etcd-server)");
        let key = rcgen::KeyPair::generate().unwrap();
        fs::write(d.join("sa.key"), key.serialize_pem()).unwrap();
        fs::write(d.join("sa.pub"), key.public_key_pem()).unwrap();
        fs::write(
            d.join("tokens.csv"),
            "admin-token,admin,admin,\"system:masters\"\n",
        )
        .unwrap();
        let mut sans = vec!["127.0.0.1".to_owned()];
        sans.extend_from_slice(addresses);
        let (ca, cert, key) = serving_cert(&sans);
        fs::write(d.join("ca.crt"), ca).unwrap();
        fs::write(d.join("tls.crt"), cert).unwrap();
        fs::write(d.join("tls.key"), key).unwrap();
        let bind = if netns.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let apiserver = command_in(netns, binary)
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg(format!("--secure-port={secure}"))
            .arg(format!("--bind-address={bind}"))
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--tls-cert-file={}", d.join("tls.crt").display()))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("tls.key").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .args(
                release
                    .feature_gates
                    .map(|g| format!("--feature-gates={g}")),
            )
            .stdout(log("apiserver.log"))
            .stderr(log("apiserver.log"))
            .spawn()
            .unwrap();
        let mut server = ApiServer {
            ca: dir.path().join("ca.crt"),
            dir,
            etcd,
            apiserver,
            port: secure,
            url: format!("https://127.0.0.1:{secure}"),
            netns: netns.map(str::to_owned),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while server.kubectl_try(&["get", "--raw", "/readyz"]).is_err() {
            let exited = server.apiserver.try_wait().ok().flatten().is_some();
            assert!(
                Instant::now() < deadline && !exited,
                "kube-apiserver did not get ready: {}",
                fs::read_to_string(server.dir.path().join("apiserver.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        server
    }

    pub fn kubectl_try(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_input(args, None)
    }

    pub fn kubectl_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = command_in(self.netns.as_deref(), "kubectl")
            .arg(format!("--server={}", self.url))
            .arg("--token=admin-token")
            .arg(format!("--certificate-authority={}", self.ca.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "kubectl {args:?}: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_try(args).unwrap()
    }

    pub fn apply(&self, manifest: &str) {
        self.kubectl_input(&["apply", "-f", "-"], Some(manifest))
            .unwrap();
    }

    /// The namespace, the service account and deploy/kubernetes/peer.yaml, as installed;
    /// returns a kubeconfig that authenticates as that service account on loopback.
    pub fn install_strata(&self) -> PathBuf {
        let url = self.url.clone();
        self.install_strata_at(&url)
    }

    /// [`ApiServer::install_strata`], the kubeconfig reaching the API server at `url`.
    pub fn install_strata_at(&self, url: &str) -> PathBuf {
        self.kubectl(&["create", "namespace", "strata-system"]);
        self.kubectl(&[
            "-n",
            "strata-system",
            "create",
            "serviceaccount",
            "strata-node",
        ]);
        let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/peer.yaml");
        self.kubectl(&["-n", "strata-system", "apply", "-f", peer.to_str().unwrap()]);
        // The VolumeSnapshotContent kind, enough of it for the test (the real CRDs come
        // from external-snapshotter).
        self.apply(VSC_CRD);
        let token = self.kubectl(&["-n", "strata-system", "create", "token", "strata-node"]);
        let kubeconfig = self.dir.path().join("strata-node.kubeconfig");
        let ca = &self.ca;
        fs::write(&kubeconfig, kubeconfig_text(url, ca, token.trim())).unwrap();
        // Wait until the CRD is served.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .kubectl_try(&["get", "volumesnapshotcontents"])
            .is_err()
        {
            assert!(Instant::now() < deadline, "the CRD is not served");
            std::thread::sleep(Duration::from_millis(300));
        }
        kubeconfig
    }

    /// [`ApiServer::install_strata_at`] for the first node; later nodes get their own
    /// kubeconfig (another URL) for the same service account.
    pub fn install_strata_once(&self, url: &str, node: &str) -> PathBuf {
        if self
            .kubectl_try(&["get", "namespace", "strata-system"])
            .is_err()
        {
            self.install_strata_at(url);
        }
        let token = self.kubectl(&["-n", "strata-system", "create", "token", "strata-node"]);
        let kubeconfig = self.dir.path().join(format!("{node}.kubeconfig"));
        fs::write(&kubeconfig, kubeconfig_text(url, &self.ca, token.trim())).unwrap();
        kubeconfig
    }

    pub fn can_i(&self, args: &[&str]) -> bool {
        let mut all = vec![
            "auth",
            "can-i",
            "--as=system:serviceaccount:strata-system:strata-node",
        ];
        all.extend_from_slice(args);
        self.kubectl_try(&all).is_ok_and(|out| out.trim() == "yes")
    }
}

pub fn kubeconfig_text(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: strata-node\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: strata-node\n    namespace: strata-system\ncurrent-context: test\n",
        ca.display()
    )
}

pub const VSC_CRD: &str = r#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition",
 "metadata":{"name":"volumesnapshotcontents.snapshot.storage.k8s.io",
  "annotations":{"api-approved.kubernetes.io":"https://github.com/kubernetes-csi/external-snapshotter/pull/419"}},
 "spec":{"group":"snapshot.storage.k8s.io","scope":"Cluster",
  "names":{"kind":"VolumeSnapshotContent","plural":"volumesnapshotcontents","singular":"volumesnapshotcontent"},
  "versions":[{"name":"v1","served":true,"storage":true,
   "schema":{"openAPIV3Schema":{"type":"object","x-kubernetes-preserve-unknown-fields":true}}}]}}"#;

pub fn endpoint_slice(name: &str, node: &str, address: &str, port: u16, ready: bool) -> String {
    format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
 "metadata":{{"name":"{name}","namespace":"strata-system","labels":{{"kubernetes.io/service-name":"strata-peer"}}}},
 "addressType":"IPv4","ports":[{{"name":"peer","port":{port},"protocol":"TCP"}}],
 "endpoints":[{{"addresses":["{address}"],"nodeName":"{node}","conditions":{{"ready":{ready}}}}}]}}"#
    )
}

pub async fn client_as(kubeconfig: &Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// node-a and node-b, in namespaces 1 and 2 of `net` (the API server in 0), each with its
/// own kubeconfig as the strata-node service account, its EndpointSlice in the peer
/// Service, and the peer service on `port` with the certificates in `tls`; `extra` are
/// more arguments of both.
pub async fn start_peer_nodes(
    api: &ApiServer,
    net: &crate::netns::Net,
    tls: &Path,
    port: u16,
    extra: &[&str],
) -> Vec<crate::common::TestEnv> {
    let mut nodes = vec![];
    for (i, node) in [(1, "node-a"), (2, "node-b")] {
        // The address each node is known by: the one on its link with the other node.
        let other = 3 - i;
        let kubeconfig =
            api.install_strata_once(&format!("https://{}:{}", net.ip(0, i), api.port), node);
        api.apply(&endpoint_slice(
            &format!("strata-peer-{node}"),
            node,
            &net.ip(i, other),
            port,
            true,
        ));
        let (tls, listen) = (tls.display().to_string(), format!("0.0.0.0:{port}"));
        let mut args = vec![
            "--node-id",
            node,
            "--peer-listen",
            &listen,
            "--peer-tls-dir",
            &tls,
            "--peer-service",
            "strata-peer",
            "--peer-namespace",
            "strata-system",
        ];
        args.extend_from_slice(extra);
        nodes.push(
            crate::common::TestEnv::start_with_env(
                Some(&net.names[i]),
                &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
                &args,
                None,
            )
            .await,
        );
    }
    nodes
}
