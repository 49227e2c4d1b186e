//! Install-time certificates: a CA made for one purpose and a key pair signed by it, printed
//! as Kubernetes manifests. The CA's key is used once, to sign, and then dropped: it is never
//! printed or written, so nobody can sign another certificate; rotating means making new
//! ones and rolling the DaemonSet.
//!
//! [`peer`] makes the peer service's (`strata peer-certs`), [`snapshot_metadata`] the
//! external-snapshot-metadata sidecar's (`strata snapshot-metadata-certs`).

pub mod peer;
pub mod snapshot_metadata;

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A CA certificate and a key pair it signed, as PEM.
pub struct CertFiles {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What the signed certificate is for.
pub struct Leaf<'a> {
    /// The CA's common name.
    pub ca_name: &'a str,
    /// The certificate's DNS names; the first is also its common name.
    pub dns_names: Vec<String>,
    /// Whether it may also authenticate a client (mutual TLS), not only a server.
    pub client_auth: bool,
    /// How many years both are valid.
    pub years: u16,
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

/// Makes a CA and a key pair for `leaf` signed by it, valid from yesterday for
/// `leaf.years` years.
pub fn issue(leaf: &Leaf<'_>) -> Result<CertFiles, String> {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let (y, m, d) = civil(days - 1);
    let from = rcgen::date_time_ymd(y, m, d);
    // Day 28 at most, so that the same day exists `years` later.
    let until = rcgen::date_time_ymd(y + i32::from(leaf.years), m, d.min(28));
    let failed = |what: &str, e: rcgen::Error| format!("make the {what}: {e}");
    let common = leaf
        .dns_names
        .first()
        .ok_or_else(|| "a certificate needs a DNS name".to_owned())?;

    let ca_key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", e))?;
    ca.distinguished_name = name(leaf.ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = from;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| failed("CA", e))?;

    let key = KeyPair::generate().map_err(|e| failed("key", e))?;
    let mut params =
        CertificateParams::new(leaf.dns_names.clone()).map_err(|e| failed("certificate", e))?;
    params.distinguished_name = name(common);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if leaf.client_auth {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.not_before = from;
    params.not_after = until;
    let issuer = Issuer::new(ca, ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| failed("certificate", e))?;
    Ok(CertFiles {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Standard base64 with padding (what a Secret's `data` and a CR's `caCert` hold).
pub fn base64(bytes: &[u8]) -> String {
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

/// Whether `s` is a Kubernetes object name (a DNS subdomain).
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A `kubernetes.io/tls` Secret (the layout cert-manager uses too) holding `files`; the CA
/// certificate goes in only when `with_ca`.
pub fn tls_secret(
    files: &CertFiles,
    name: &str,
    namespace: &str,
    component: &str,
    with_ca: bool,
) -> String {
    let ca = if with_ca {
        format!("  ca.crt: {}\n", base64(files.ca_pem.as_bytes()))
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels:\n    app.kubernetes.io/name: strata\n    app.kubernetes.io/component: {component}\n\
         type: kubernetes.io/tls\ndata:\n{ca}  tls.crt: {}\n  tls.key: {}\n",
        base64(files.cert_pem.as_bytes()),
        base64(files.key_pem.as_bytes()),
    )
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
    fn names_are_checked() {
        assert!(is_dns_name("strata-system"));
        assert!(is_dns_name("strata.csi.dev"));
        for bad in ["", "-a", "a-", "A", "a b", "a/b", "a\nb"] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
    }
}
