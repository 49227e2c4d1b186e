//! The peer service between Strata nodes (`strata.peer.v1`): gRPC over mutual TLS on its
//! own listener. [`service`] serves this node's exports, [`client`] reaches the others
//! (the core sees them as `strata_core::peer::Peers`), [`tls`] loads the certificates
//! every node shares (`crate::certs::peer` makes them), [`listener`] accepts both gRPC and
//! [`bulk`] reads on the one port.

pub mod bulk;
pub mod client;
pub mod listener;
pub mod options;
pub mod service;
pub mod tls;

pub use options::PeerOptions;
