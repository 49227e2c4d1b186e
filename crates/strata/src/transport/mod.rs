//! The byte stream between a client and the gRPC server, for what neither `h2` nor tonic
//! lets the server configure: see [`frames`] for why request headers are rewritten.

pub mod frames;
pub mod hpack;
mod stream;

pub use stream::Normalized;
