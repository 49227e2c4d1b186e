//! The wire types and gRPC stubs of the peer service (package `strata.peer.v1`): the one
//! channel between Strata nodes, which looks up what a node holds and streams its data.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strata.peer.v1");
}

pub use v1::*;
