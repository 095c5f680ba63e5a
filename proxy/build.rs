//! Links release builds of the `postern` binary with the code layout from
//! `bench/layout.sh`, which groups the functions a running proxy executes
//! so that few pages of code stay resident.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=layout/hot-text.ld");
    println!("cargo:rerun-if-changed=build.rs");
    // For a linker that cannot take an INSERT script (gold, mold), or to
    // compare builds with and without the layout.
    println!("cargo:rerun-if-env-changed=POSTERN_NO_CODE_LAYOUT");
    if std::env::var_os("POSTERN_NO_CODE_LAYOUT").is_some() {
        return;
    }
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    // A linker script with INSERT is for ELF linkers (lld, GNU ld).
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let script = PathBuf::from(dir).join("layout/hot-text.ld");
    if release && linux && script.exists() {
        println!(
            "cargo:rustc-link-arg-bin=postern=-Wl,-T,{}",
            script.display()
        );
    }
}
