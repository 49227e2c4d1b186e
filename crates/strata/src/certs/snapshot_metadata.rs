//! `strata snapshot-metadata-certs`: what the external-snapshot-metadata sidecar and the
//! backup tools that call it need, printed as manifests to apply once:
//! - the sidecar's TLS Secret (a certificate for the sidecar's Service, signed by a CA made
//!   for it alone);
//! - the SnapshotMetadataService object (`cbt.storage.k8s.io/v1beta1`, named after the
//!   driver) that gives backup tools the Service's address, that CA and the token audience.

use super::{CertFiles, Leaf, base64, is_dns_name, issue, tls_secret};

#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotMetadataCertsArgs {
    /// The namespace Strata runs in (the Secret's and the Service's).
    #[arg(long, default_value = "strata-system")]
    pub namespace: String,
    /// The Service in front of the sidecars (deploy/components/snapshot-metadata).
    #[arg(long, default_value = "strata-snapshot-metadata")]
    pub service: String,
    /// The Service's port.
    #[arg(long, default_value_t = 6443, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The Secret's name (the DaemonSet mounts `strata-snapshot-metadata-tls`).
    #[arg(long, default_value = "strata-snapshot-metadata-tls")]
    pub secret_name: String,
    /// The CSI driver's name: the SnapshotMetadataService is named after it.
    #[arg(long, default_value = "strata.csi.dev")]
    pub driver_name: String,
    /// The audience backup tools put in the service-account tokens they present
    /// (default: the driver's name).
    #[arg(long)]
    pub audience: Option<String>,
    /// How many years the certificates are valid.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub years: u16,
}

/// The names the sidecars' Service answers to inside the cluster.
fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        service.to_owned(),
    ]
}

/// The two manifests, as one YAML stream.
pub fn manifests(files: &CertFiles, args: &SnapshotMetadataCertsArgs) -> String {
    let audience = args.audience.as_deref().unwrap_or(&args.driver_name);
    format!(
        "# The external-snapshot-metadata sidecar's certificate and the SnapshotMetadataService\n\
         # that points backup tools at it: made by `strata snapshot-metadata-certs`.\n{}---\n\
         apiVersion: cbt.storage.k8s.io/v1beta1\nkind: SnapshotMetadataService\nmetadata:\n  \
         name: {driver}\n  labels:\n    app.kubernetes.io/name: strata\n\
         spec:\n  address: {service}.{namespace}:{port}\n  caCert: {ca}\n  audience: {audience}\n",
        tls_secret(
            files,
            &args.secret_name,
            &args.namespace,
            "snapshot-metadata-tls",
            false
        ),
        driver = args.driver_name,
        service = args.service,
        namespace = args.namespace,
        port = args.port,
        ca = base64(files.ca_pem.as_bytes()),
    )
}

fn check(args: &SnapshotMetadataCertsArgs) -> Result<(), String> {
    for (flag, value) in [
        ("--namespace", &args.namespace),
        ("--service", &args.service),
        ("--secret-name", &args.secret_name),
        ("--driver-name", &args.driver_name),
    ] {
        if !is_dns_name(value) {
            return Err(format!(
                "{flag} must be a Kubernetes name (lowercase letters, digits, '-' and '.')"
            ));
        }
    }
    // A label: the Service's name is the first part of the DNS names the certificate holds.
    if args.service.contains('.') || args.service.len() > 63 {
        return Err("--service must be a Service name (at most 63 characters, no '.')".into());
    }
    if let Some(audience) = &args.audience {
        let fits = !audience.is_empty()
            && audience.len() <= 253
            && audience.bytes().all(|b| b.is_ascii_graphic());
        if !fits {
            return Err("--audience must be 1 to 253 printable characters without spaces".into());
        }
    }
    Ok(())
}

pub fn run(args: SnapshotMetadataCertsArgs) -> Result<(), String> {
    check(&args)?;
    let files = issue(&Leaf {
        ca_name: "Strata snapshot metadata CA",
        dns_names: service_names(&args.service, &args.namespace),
        client_auth: false,
        years: args.years,
    })?;
    print!("{}", manifests(&files, &args));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> SnapshotMetadataCertsArgs {
        SnapshotMetadataCertsArgs {
            namespace: "strata-system".into(),
            service: "strata-snapshot-metadata".into(),
            port: 6443,
            secret_name: "strata-snapshot-metadata-tls".into(),
            driver_name: "strata.csi.dev".into(),
            audience: None,
            years: 1,
        }
    }

    #[test]
    fn the_manifests_name_the_service_the_ca_and_the_audience() {
        let a = args();
        let files = issue(&Leaf {
            ca_name: "test CA",
            dns_names: service_names(&a.service, &a.namespace),
            client_auth: false,
            years: 1,
        })
        .unwrap();
        let text = manifests(&files, &a);
        assert!(!text.contains("BEGIN"), "PEM goes in base64");
        assert!(!text.contains("ca.crt"), "the sidecar's Secret holds no CA");
        let docs: Vec<&str> = text.split("\n---\n").collect();
        assert_eq!(docs.len(), 2);
        assert!(docs[0].contains("kind: Secret"));
        assert!(docs[0].contains("  name: strata-snapshot-metadata-tls\n"));
        assert!(docs[0].contains("  tls.crt: ") && docs[0].contains("  tls.key: "));
        let sms = docs[1];
        assert!(sms.starts_with(
            "apiVersion: cbt.storage.k8s.io/v1beta1\nkind: SnapshotMetadataService\n"
        ));
        assert!(sms.contains("  name: strata.csi.dev\n"));
        assert!(sms.contains("  address: strata-snapshot-metadata.strata-system:6443\n"));
        assert!(sms.contains(&format!("  caCert: {}\n", base64(files.ca_pem.as_bytes()))));
        assert!(sms.contains("  audience: strata.csi.dev\n"));
        let own = manifests(
            &files,
            &SnapshotMetadataCertsArgs {
                audience: Some("velero".into()),
                ..a
            },
        );
        assert!(own.contains("  audience: velero\n"));
    }

    #[test]
    fn the_certificate_is_for_the_service_names() {
        let names = service_names("svc", "ns");
        assert_eq!(names[0], "svc.ns");
        assert!(names.contains(&"svc.ns.svc.cluster.local".to_owned()));
        assert!(run(args()).is_ok());
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_made() {
        for bad in [
            SnapshotMetadataCertsArgs {
                namespace: "Bad".into(),
                ..args()
            },
            SnapshotMetadataCertsArgs {
                service: "a.b".into(),
                ..args()
            },
            SnapshotMetadataCertsArgs {
                driver_name: "x/y".into(),
                ..args()
            },
            SnapshotMetadataCertsArgs {
                audience: Some("two words".into()),
                ..args()
            },
            SnapshotMetadataCertsArgs {
                audience: Some(String::new()),
                ..args()
            },
        ] {
            assert!(run(bad).is_err());
        }
    }
}
