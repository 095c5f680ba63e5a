//! Compiles Postern's own protos (today the Istio CA API) with the vendored
//! `protoc`, so the build needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The protoc path goes through prost's config rather than the `PROTOC`
    // environment variable: mutating the environment is disallowed.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // `google/protobuf/struct.proto` comes from the vendored include directory
    // so the build does not depend on where (or whether) protobuf is installed.
    // prost maps `google.protobuf.*` to `prost_types`, so nothing is generated
    // for it here.
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[PathBuf::from("istio/ca.proto")],
            &[PathBuf::from("."), well_known],
        )?;
    // `compile_with_config` emits no rerun directives of its own; without this
    // cargo would rerun protoc whenever any file in the crate changed.
    println!("cargo:rerun-if-changed=istio/ca.proto");
    Ok(())
}
