//! The reference control plane for Postern.
//!
//! Will serve ADS from a YAML mesh description and sign CSRs as a CA (see the
//! xDS and mTLS issues).
