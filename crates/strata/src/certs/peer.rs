//! `strata peer-certs`: makes the peer CA and the key pair every node presents, both as a
//! server and as a client, and prints them as a Kubernetes Secret (or writes the three files).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::{CertFiles, Leaf, is_dns_name, issue, tls_secret};
use crate::peer::tls::{CA_FILE, CERT_FILE, KEY_FILE, SERVER_NAME};

#[derive(Debug, Clone, clap::Args)]
pub struct PeerCertsArgs {
    /// Write ca.crt, tls.crt and tls.key (mode 0600) into this new directory instead of
    /// printing a Secret.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The Secret's name (the DaemonSet mounts `strata-peer-tls`).
    #[arg(long, default_value = "strata-peer-tls")]
    pub name: String,
    /// The Secret's namespace.
    #[arg(long, default_value = "strata-system")]
    pub namespace: String,
    /// How many years the certificates are valid.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub years: u16,
}

/// Makes the peer CA and a key pair for [`SERVER_NAME`] signed by it.
pub fn make(years: u16) -> Result<CertFiles, String> {
    issue(&Leaf {
        ca_name: "Strata peer CA",
        dns_names: vec![SERVER_NAME.to_owned()],
        client_auth: true,
        years,
    })
}

/// The Secret manifest holding the three files.
pub fn secret_manifest(files: &CertFiles, name: &str, namespace: &str) -> String {
    format!(
        "# The Strata peer service's certificates: made by `strata peer-certs`.\n{}",
        tls_secret(files, name, namespace, "peer-tls", true)
    )
}

pub fn run(args: PeerCertsArgs) -> Result<(), String> {
    if !is_dns_name(&args.name) || !is_dns_name(&args.namespace) {
        return Err("--name and --namespace must be Kubernetes names (lowercase letters, digits, '-' and '.')".into());
    }
    let files = make(args.years)?;
    match args.out_dir {
        None => {
            print!("{}", secret_manifest(&files, &args.name, &args.namespace));
            Ok(())
        }
        Some(dir) => {
            fs::create_dir(&dir).map_err(|e| {
                format!(
                    "create {}: {e} (give a directory that does not exist yet)",
                    dir.display()
                )
            })?;
            for (file, pem) in [
                (CA_FILE, &files.ca_pem),
                (CERT_FILE, &files.cert_pem),
                (KEY_FILE, &files.key_pem),
            ] {
                let path = dir.join(file);
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| f.write_all(pem.as_bytes()).and_then(|()| f.sync_all()))
                    .map_err(|e| format!("write {}: {e}", path.display()))?;
            }
            eprintln!(
                "wrote {CA_FILE}, {CERT_FILE} and {KEY_FILE} to {}",
                dir.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_are_pem_and_load_as_peer_tls() {
        let files = make(1).unwrap();
        assert!(files.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(files.key_pem.contains("PRIVATE KEY"));
        let manifest = secret_manifest(&files, "strata-peer-tls", "strata-system");
        assert!(manifest.contains("type: kubernetes.io/tls"));
        assert!(manifest.contains("  ca.crt: "));
        assert!(!manifest.contains("BEGIN"), "the data is base64");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        run(PeerCertsArgs {
            out_dir: Some(out.clone()),
            name: "strata-peer-tls".into(),
            namespace: "strata-system".into(),
            years: 1,
        })
        .unwrap();
        crate::peer::tls::PeerTls::load(&out).unwrap();
    }
}
