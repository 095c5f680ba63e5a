//! The path normaliser. Input: one byte of options (bit 0: merge slashes;
//! bits 1-2: escaped slashes reject / decode / keep), then the path.
//!
//! Checked: a normal form is a fixed point, holds no dot segment (and no
//! `//` when slashes merge), starts with `/`, does not depend on the
//! escaped-slash setting when there is no escaped slash, and, when the path
//! came as hyper would deliver it, is still a valid request target.

#![no_main]

use postern::route::normalize::{normalize_path, EscapedSlashes, PathNormalization};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let options = PathNormalization {
        enabled: true,
        merge_slashes: flags & 1 == 1,
        escaped_slashes: match (flags >> 1) % 3 {
            0 => EscapedSlashes::Reject,
            1 => EscapedSlashes::Decode,
            _ => EscapedSlashes::Keep,
        },
    };
    let Ok(normal) = normalize_path(path, &options) else {
        return;
    };
    if path == "*" {
        assert_eq!(normal, "*");
        return;
    }
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    for segment in normal[1..].split('/') {
        assert!(segment != "." && segment != "..", "{path:?} -> {normal:?}");
    }
    if options.merge_slashes {
        assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
    }
    let again = normalize_path(&normal, &options);
    assert_eq!(again.as_deref(), Ok(&*normal), "{path:?} is not stable");
    // A path `reject` lets through has no encoded slash, so the other
    // settings have nothing different to do with it.
    if options.escaped_slashes == EscapedSlashes::Reject {
        for other in [EscapedSlashes::Decode, EscapedSlashes::Keep] {
            let alternative = PathNormalization {
                escaped_slashes: other,
                ..options
            };
            assert_eq!(
                normalize_path(path, &alternative).as_deref(),
                Ok(&*normal),
                "{path:?} with {other:?}"
            );
        }
    }
    // As the request path sees it: a target hyper accepted stays a target.
    if let Ok(target) = http::uri::PathAndQuery::try_from(path) {
        if target.path() == path {
            assert!(
                http::uri::PathAndQuery::try_from(&*normal).is_ok(),
                "{path:?} -> {normal:?} is no longer a valid target"
            );
        }
    }
});
