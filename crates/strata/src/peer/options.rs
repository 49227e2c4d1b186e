//! `strata serve`'s peer options: where the peer service listens, its certificates, and
//! the other nodes' addresses when they are given statically (Nomad, tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The peer service's options (part of `strata serve`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PeerOptions {
    /// Serve the peer service (gRPC over mutual TLS) on ADDRESS:PORT, e.g. 0.0.0.0:9820.
    #[arg(long, env = "STRATA_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Directory holding the peer certificates: ca.crt, tls.crt, tls.key (the Secret
    /// `strata peer-certs` or cert-manager makes, mounted). Required with --peer-listen
    /// or --peer.
    #[arg(long, env = "STRATA_PEER_TLS_DIR")]
    pub peer_tls_dir: Option<PathBuf>,
    /// Another node's peer service, NODE=HOST:PORT (NODE its --node-id); repeatable.
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
    /// Find the other nodes in Kubernetes: the EndpointSlices of this headless Service
    /// (port `peer`) in --peer-namespace; and the node of a volume or snapshot whose id has
    /// no node hint from its PV or VolumeSnapshotContent.
    #[arg(long, env = "STRATA_PEER_SERVICE", conflicts_with = "peers")]
    pub peer_service: Option<String>,
    /// The namespace of --peer-service (the DaemonSet's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "strata-system")]
    pub peer_namespace: String,
    /// Start without the peer service (logging why) when --peer-tls-dir holds no
    /// certificates yet, instead of refusing to start: for a DaemonSet whose Secret is
    /// made after the install.
    #[arg(long)]
    pub peer_tls_optional: bool,
    /// Seconds a peer may take to answer a call, or between two chunks of a stream,
    /// before it counts as unreachable (UNAVAILABLE, retried by the caller).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub peer_timeout: u64,
    /// Seconds a read another node opened here stays open unused (a reader that died)
    /// before it is closed and what it held is freed.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub peer_read_idle: u64,
}

fn parse_peer(s: &str) -> Result<(String, String), String> {
    let (node, address) = s
        .split_once('=')
        .ok_or_else(|| "expected NODE=HOST:PORT".to_owned())?;
    if node.is_empty() || node.len() > 256 {
        return Err("NODE must be 1 to 256 bytes (the node's --node-id)".into());
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| "expected NODE=HOST:PORT".to_owned())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "{:?} is not HOST:PORT",
            address.chars().take(300).collect::<String>()
        ));
    }
    Ok((node.to_owned(), address.to_owned()))
}

impl PeerOptions {
    /// Whether this node takes part in the peer service at all.
    pub fn enabled(&self) -> bool {
        self.peer_listen.is_some() || !self.peers.is_empty() || self.peer_service.is_some()
    }

    pub fn read_idle(&self) -> Duration {
        Duration::from_secs(self.peer_read_idle)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.peer_timeout)
    }

    /// The static addresses by node; a node named twice is refused.
    pub fn addresses(&self) -> Result<BTreeMap<String, String>, String> {
        let mut map = BTreeMap::new();
        for (node, address) in &self.peers {
            if map.insert(node.clone(), address.clone()).is_some() {
                return Err(format!("--peer names node {node:?} twice"));
            }
        }
        Ok(map)
    }

    /// Checks the options together, before anything is made.
    pub fn validate(&self, node_id: &str) -> Result<(), String> {
        if self.enabled() && self.peer_tls_dir.is_none() {
            return Err(
                "--peer-listen and --peer need --peer-tls-dir: the peer service is never served or called without mutual TLS".into(),
            );
        }
        if let Some(s) = &self.peer_service {
            let ok = !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(
                    "--peer-service must be a Service name (lowercase letters, digits and '-')"
                        .into(),
                );
            }
            if !cfg!(feature = "kubernetes") {
                return Err("--peer-service needs Kubernetes support, which this build leaves out (cargo feature `kubernetes`); give the peers with --peer".into());
            }
        }
        let addresses = self.addresses()?;
        if addresses.contains_key(node_id) {
            return Err(format!(
                "--peer names this node ({node_id:?}); list the other nodes only"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_node_equals_host_port() {
        assert_eq!(
            parse_peer("node-a=10.0.0.1:9820").unwrap(),
            ("node-a".into(), "10.0.0.1:9820".into())
        );
        assert!(parse_peer("node-a=[fd00::1]:9820").is_ok());
        for bad in [
            "",
            "node-a",
            "=1.2.3.4:1",
            "a=1.2.3.4",
            "a=1.2.3.4:0",
            "a=:1",
            "a=h/x:1",
            "a=h:99999",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_peer_service_needs_tls_and_other_nodes() {
        let mut o = PeerOptions {
            peers: vec![("b".into(), "h:1".into())],
            ..Default::default()
        };
        assert!(o.validate("a").unwrap_err().contains("--peer-tls-dir"));
        o.peer_tls_dir = Some("/x".into());
        o.validate("a").unwrap();
        assert!(o.validate("b").unwrap_err().contains("this node"));
        o.peers.push(("b".into(), "h:2".into()));
        assert!(o.validate("a").unwrap_err().contains("twice"));
    }
}
