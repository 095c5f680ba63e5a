//! Compiles `proto/echo.proto` with the vendored `protoc`, so the build needs
//! no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The protoc path goes through prost's config rather than the `PROTOC`
    // environment variable: mutating the environment is disallowed.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/echo.proto"], &["proto"])?;
    Ok(())
}
