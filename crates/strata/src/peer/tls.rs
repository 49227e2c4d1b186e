//! The peer certificates: a CA made at install and one key pair signed by it for the name
//! [`SERVER_NAME`], which every node presents both as a server and as a client. A caller
//! without a certificate from that CA fails the TLS handshake, before any handler runs.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The name in every peer certificate, checked by the client instead of a host name
/// (nodes are reached by address).
pub const SERVER_NAME: &str = "strata-peer";

/// The files of the peer Secret, as cert-manager and `strata peer-certs` name them.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// A TLS handshake not done within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest file read from the TLS directory.
const MAX_PEM_BYTES: u64 = 64 * 1024;

/// The peer CA and this node's identity.
#[derive(Clone)]
pub struct PeerTls {
    ca: Certificate,
    identity: Identity,
    /// The same files, for configurations made with rustls itself.
    pem: Arc<Pem>,
}

/// What both rustls configurations are made of: the provider, the CA, this node's chain
/// and key.
type RustlsParts = (
    Arc<rustls::crypto::CryptoProvider>,
    Arc<rustls::RootCertStore>,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

struct Pem {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Drop for Pem {
    fn drop(&mut self) {
        // The key does not outlive its use in memory.
        self.key.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&self.key);
    }
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("PeerTls { .. }")
    }
}

fn read_pem(dir: &Path, name: &str, label: &str) -> Result<Vec<u8>, String> {
    let path = dir.join(name);
    let meta = fs::metadata(&path).map_err(|e| {
        format!(
            "--peer-tls-dir: cannot read {}: {e}; mount the peer Secret there (`strata peer-certs` makes one)",
            path.display()
        )
    })?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "--peer-tls-dir: {} is {} bytes; a PEM file here is at most {MAX_PEM_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    let bytes =
        fs::read(&path).map_err(|e| format!("--peer-tls-dir: read {}: {e}", path.display()))?;
    // Only the shape is checked here (the contents are never echoed): TLS checks the rest.
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(label) {
        return Err(format!(
            "--peer-tls-dir: {} holds no PEM {label}",
            path.display()
        ));
    }
    Ok(bytes)
}

impl PeerTls {
    /// Whether `dir` holds any of the three files (an optional Secret not made yet holds
    /// none).
    pub fn present(dir: &Path) -> bool {
        [CA_FILE, CERT_FILE, KEY_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
    }

    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let ca = read_pem(dir, CA_FILE, "CERTIFICATE")?;
        let cert = read_pem(dir, CERT_FILE, "CERTIFICATE")?;
        let key = read_pem(dir, KEY_FILE, "PRIVATE KEY")?;
        let tls = PeerTls {
            ca: Certificate::from_pem(&ca),
            identity: Identity::from_pem(&cert, &key),
            pem: Arc::new(Pem { ca, cert, key }),
        };
        // Parsed now, so a bad file stops the server before it touches the pool: as the
        // listener takes them, and as the gRPC client does.
        tls.rustls_server(&[]).map_err(|e| {
            format!(
                "--peer-tls-dir {}: unusable certificates: {e}",
                dir.display()
            )
        })?;
        tonic::transport::Endpoint::from_static("https://127.0.0.1:1")
            .tls_config(tls.client())
            .map_err(|e| {
                format!(
                    "--peer-tls-dir {}: unusable certificates: {e}",
                    dir.display()
                )
            })?;
        Ok(tls)
    }

    /// The caller's side: only a server with a certificate from the CA for
    /// [`SERVER_NAME`], and this node's certificate presented.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .domain_name(SERVER_NAME)
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    fn rustls_parts(&self) -> Result<RustlsParts, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.pem.ca) {
            let ca = ca.map_err(|_| "the peer CA is not PEM".to_owned())?;
            roots
                .add(ca)
                .map_err(|e| format!("the peer CA is unusable: {e}"))?;
        }
        let chain = CertificateDer::pem_slice_iter(&self.pem.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "the peer certificate is not PEM".to_owned())?;
        let key = PrivateKeyDer::from_pem_slice(&self.pem.key)
            .map_err(|_| "the peer key is not PEM".to_owned())?;
        Ok((provider, Arc::new(roots), chain, key))
    }

    /// The listener's side as a rustls configuration: this node's certificate, and a client
    /// certificate from the CA required of every caller; `alpn` names the protocols it
    /// speaks.
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, String> {
        let (provider, roots, chain, key) = self.rustls_parts()?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("the peer CA cannot verify clients: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("the peer certificate is unusable: {e}"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The caller's side as a rustls configuration, as [`client`](Self::client), asking
    /// for the protocols in `alpn`.
    pub fn rustls_client(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, String> {
        let (provider, roots, chain, key) = self.rustls_parts()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the peer certificate is unusable: {e}"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}
