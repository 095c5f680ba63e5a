//! Static YAML config loading (`Config::from_yaml`), and the promise that a
//! config that validated loads again from its own dump.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Certificate and identity paths are read during validation: a device
    // or proc file would make the run hang or balloon, which says nothing
    // about the parser.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let Ok(config) = postern::Config::from_yaml(text) else {
        return;
    };
    let dumped = serde_yaml_ng::to_string(&*config.source).expect("a loaded config serialises");
    if let Err(err) = postern::Config::from_yaml(&dumped) {
        panic!("a config that loaded does not load from its own dump: {err}\n{dumped}");
    }
});
