//! Protobuf types for Postern.
//!
//! This crate will re-export the Envoy v3 API (from `envoy-types`) and compile
//! Postern's own protos once the xDS and CA issues land. It holds no logic.
