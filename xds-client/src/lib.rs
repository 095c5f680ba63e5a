//! The ADS client for Postern.
//!
//! Will own the xDS stream lifecycle, subscriptions, ACK/NACK and back-off
//! (see the xDS issue). Generic over resource types; knows nothing of routing.
