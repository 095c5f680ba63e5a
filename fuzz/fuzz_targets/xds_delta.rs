//! A `DeltaDiscoveryResponse` as a delta control plane would send it:
//! unwrapped by the ADS client (`postern_xds::delta_resources`), then
//! decoded and translated per type and validated as one config, like
//! `xds_response`.
//!
//! Checked besides "no panic": every resource handed on has a name and the
//! response's type, heartbeats (body-less entries of held names) are not
//! handed on, and the same resources in state-of-the-world wrappers unwrap
//! to the same names and bodies.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let outcome = postern_fuzz::xds::apply_delta(data);
    if postern_fuzz::debug() {
        eprintln!("xds_delta: {outcome:?}");
    }
});
