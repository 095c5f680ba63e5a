//! A `DiscoveryResponse` as the control plane would send it: unwrapped by
//! the ADS client, decoded and translated per type (Listener,
//! RouteConfiguration, Cluster, ClusterLoadAssignment, Secret), and
//! validated as one config.
//!
//! With `POSTERN_FUZZ_DEBUG` set, prints what became of each input, to check
//! that seeds are accepted (`cargo fuzz run xds_response seeds/xds_response
//! -- -runs=0`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let outcome = postern_fuzz::xds::apply(data);
    if postern_fuzz::debug() {
        eprintln!("xds_response: {outcome:?}");
    }
});
