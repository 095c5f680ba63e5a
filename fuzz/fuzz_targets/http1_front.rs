//! Raw bytes from a client, through a listener's HTTP front end: hyper's
//! HTTP/1.1 (and prior-knowledge HTTP/2) parser with the listener's limits,
//! the head checks, path normalisation, forwarding headers, RBAC, routing,
//! rewrites, redirects and local replies. Served on the example gateway's
//! listener and on the strict one of `fixtures/front.yaml`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_fuzz::front::serve(data));
