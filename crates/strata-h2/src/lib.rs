//! The client-to-server half of a CSI connection's HTTP/2 byte stream, rewritten so that
//! every request's `:authority` is one `h2` accepts (see [`frames`] for why). It parses
//! untrusted bytes before `h2` does, so it lives apart, with no dependency but `http`: its
//! fuzz targets (`fuzz/`) build quickly, and every bound it keeps is stated in [`hpack`]
//! and [`frames`].

pub mod frames;
pub mod hpack;

#[cfg(test)]
mod differential;
