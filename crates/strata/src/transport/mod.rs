//! The byte stream between a client and the gRPC server, for what neither `h2` nor tonic
//! lets the server configure: the rewriting itself is the `strata-h2` crate (see its
//! `frames` module for why request headers are rewritten); this wraps a connection in it.

mod stream;

pub use strata_h2::{frames, hpack};
pub use stream::Normalized;
