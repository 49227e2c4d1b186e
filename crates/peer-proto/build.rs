//! Compiles the peer proto with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/peer.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        // A chunk's data is a slice of the received buffer, not a copy of it.
        .bytes(".strata.peer.v1.Data.bytes")
        .compile_fds(fds)?;
    Ok(())
}
