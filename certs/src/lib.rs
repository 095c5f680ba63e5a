//! Workload identity for Postern.
//!
//! Will own SPIFFE IDs, key and CSR generation, certificate checks, trust
//! bundles and the rotation loop (see the mTLS issue). Knows nothing of HTTP.
