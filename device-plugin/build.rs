//! Generates the kubelet device plugin API (types, server and client stubs) from the vendored
//! upstream proto. `protox` parses it in Rust, so the build needs no system `protoc`.

use std::error::Error;

const PROTO: &str = "proto/deviceplugin/v1beta1/api.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}
