//! `strata peer-certs`: makes the peer CA and the key pair every node presents, and prints
//! them as a Kubernetes Secret (or writes the three files). The CA's key is used once, to
//! sign, and then dropped: it is never printed or written, so nobody can sign another
//! certificate; rotating means making a new Secret and rolling the DaemonSet.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::tls::{CA_FILE, CERT_FILE, KEY_FILE, SERVER_NAME};

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

/// The three PEM files of the peer Secret.
pub struct PeerFiles {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The civil date (year, month, day) of a Unix day number.
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Strata");
    dn.push(DnType::CommonName, common);
    dn
}

/// Makes a CA and a key pair for [`SERVER_NAME`] signed by it, valid from yesterday for
/// `years` years.
pub fn make(years: u16) -> Result<PeerFiles, String> {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let (y, m, d) = civil(days - 1);
    let from = rcgen::date_time_ymd(y, m, d);
    // Day 28 at most, so that the same day exists `years` later.
    let until = rcgen::date_time_ymd(y + i32::from(years), m, d.min(28));
    let failed = |what: &str, e: rcgen::Error| format!("make the peer {what}: {e}");

    let ca_key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", e))?;
    ca.distinguished_name = name("Strata peer CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = from;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| failed("CA", e))?;

    let key = KeyPair::generate().map_err(|e| failed("key", e))?;
    let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .map_err(|e| failed("certificate", e))?;
    leaf.distinguished_name = name(SERVER_NAME);
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = from;
    leaf.not_after = until;
    let issuer = Issuer::new(ca, ca_key);
    let cert = leaf
        .signed_by(&key, &issuer)
        .map_err(|e| failed("certificate", e))?;
    Ok(PeerFiles {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The Secret manifest holding the three files (type kubernetes.io/tls, the layout
/// cert-manager uses too).
pub fn secret_manifest(files: &PeerFiles, name: &str, namespace: &str) -> String {
    format!(
        "# The Strata peer service's certificates: made by `strata peer-certs`.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels:\n    app.kubernetes.io/name: strata\n    app.kubernetes.io/component: peer-tls\n\
         type: kubernetes.io/tls\ndata:\n  {CA_FILE}: {}\n  {CERT_FILE}: {}\n  {KEY_FILE}: {}\n",
        base64(files.ca_pem.as_bytes()),
        base64(files.cert_pem.as_bytes()),
        base64(files.key_pem.as_bytes()),
    )
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

pub fn run(args: PeerCertsArgs) -> Result<(), String> {
    if !is_dns_label(&args.name) || !is_dns_label(&args.namespace) {
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
    fn civil_dates_and_base64_are_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_790), (2026, 12, 3));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_files_are_pem_and_load_as_peer_tls() {
        let files = make(1).unwrap();
        assert!(files.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(files.key_pem.contains("PRIVATE KEY"));
        let manifest = secret_manifest(&files, "strata-peer-tls", "strata-system");
        assert!(manifest.contains("type: kubernetes.io/tls"));
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
        super::super::tls::PeerTls::load(&out).unwrap();
    }
}
