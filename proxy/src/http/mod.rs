//! The HTTP connection manager: hyper glue, the request path to clusters,
//! body types and header handling.

pub mod body;
pub mod conn;
pub mod headers;
pub mod protocol;
pub mod proxy;
pub mod server;
