//! The CSI v1.12 wire types and gRPC stubs (package `csi.v1`), generated at build time.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

pub use v1::*;
