//! Request path normalisation, run before routing and every policy so that
//! `/admin/../x`, `//admin`, `/%61dmin` and `/admin%2f` cannot slip past a
//! rule written for `/admin/`. The normalised path is also what goes
//! upstream, so the backend sees what the policy saw.

use std::borrow::Cow;

/// What to do with `%2F` and `%5C` (an encoded `/` or `\`) in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Answer 400: the safe default, since a backend that decodes them would
    /// see a different path than the policies did.
    #[default]
    Reject,
    /// Decode them to `/` and `\` before the rest of normalisation.
    Decode,
    /// Leave them encoded (upper-cased).
    Keep,
}

/// How a listener normalises paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathNormalization {
    /// Normalise at all (decode unreserved escapes, remove dot segments).
    pub enabled: bool,
    /// Merge runs of `/` into one.
    pub merge_slashes: bool,
    /// Encoded slash handling.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathNormalization {
    fn default() -> Self {
        PathNormalization {
            enabled: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
        }
    }
}

/// Why a path is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding in path")]
    BadEscape,
    /// `%2F` or `%5C` with `escaped_slashes: reject`.
    #[error("encoded slash in path")]
    EscapedSlash,
    /// The path does not start with `/`.
    #[error("path must start with /")]
    NotAbsolute,
    /// A dot segment with parameters (`..;x`), which some servers read as
    /// `..`: refused rather than guessed at.
    #[error("dot segment with parameters in path")]
    DotSegmentParams,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises the path part of a request target (no query). Returns the
/// input untouched (borrowed) when nothing changes.
pub fn normalize_path<'a>(
    path: &'a str,
    options: &PathNormalization,
) -> Result<Cow<'a, str>, PathError> {
    if path == "*" {
        // Only OPTIONS may use it; the caller checks the method.
        return Ok(Cow::Borrowed(path));
    }
    if !options.enabled {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let needs_work = bytes.contains(&b'%')
        || bytes.contains(&b'\\')
        || path.contains("/.")
        || path.contains(';')
        || (options.merge_slashes && path.contains("//"));
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Escapes: unreserved ones decoded, others upper-cased, slashes per
    // option. Bytes, so non-ASCII characters pass through whole.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            // Some backends read a backslash as a slash: treat it like %5C.
            match options.escaped_slashes {
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                EscapedSlashes::Decode => decoded.push(b'/'),
                EscapedSlashes::Keep => decoded.extend_from_slice(b"%5C"),
            }
            i += 1;
            continue;
        }
        if bytes[i] != b'%' {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let value = hi * 16 + lo;
        match value {
            b'/' | b'\\' => match options.escaped_slashes {
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                // A decoded backslash is a slash too, for the same reason.
                EscapedSlashes::Decode => decoded.push(b'/'),
                EscapedSlashes::Keep => {
                    decoded.extend_from_slice(if value == b'/' { b"%2F" } else { b"%5C" })
                }
            },
            v if unreserved(v) => decoded.push(v),
            v => decoded.extend_from_slice(format!("%{v:02X}").as_bytes()),
        }
        i += 3;
    }
    // Only ASCII was decoded and the rest is copied byte for byte, so this
    // is the input's own UTF-8.
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::BadEscape)?;
    // 2. Repeated slashes.
    let merged = if options.merge_slashes {
        let mut out = String::with_capacity(decoded.len());
        let mut last_slash = false;
        for c in decoded.chars() {
            if c == '/' && last_slash {
                continue;
            }
            last_slash = c == '/';
            out.push(c);
        }
        out
    } else {
        decoded
    };
    // 3. Dot segments (RFC 3986 §5.2.4), segment by segment.
    let trailing = merged.ends_with('/') || merged.ends_with("/.") || merged.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in merged[1..].split('/') {
        if segment.starts_with(".;") || segment.starts_with("..;") {
            return Err(PathError::DotSegmentParams);
        }
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(merged.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || (trailing && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> Result<String, PathError> {
        normalize_path(path, &PathNormalization::default()).map(Cow::into_owned)
    }

    #[test]
    fn bypass_tricks_are_normalised_or_refused() {
        assert_eq!(norm("/admin/../x").unwrap(), "/x");
        assert_eq!(norm("/public/../admin/secrets").unwrap(), "/admin/secrets");
        assert_eq!(norm("//admin").unwrap(), "/admin");
        assert_eq!(norm("/%61dmin").unwrap(), "/admin");
        assert_eq!(norm("/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(norm("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert_eq!(norm("/a%7e").unwrap(), "/a~");
        assert_eq!(norm("/a%3f").unwrap(), "/a%3F");
        assert_eq!(norm("/admin%2f"), Err(PathError::EscapedSlash));
        assert_eq!(norm("/admin%5Cx"), Err(PathError::EscapedSlash));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%2"), Err(PathError::BadEscape));
        assert_eq!(norm("relative"), Err(PathError::NotAbsolute));
        assert_eq!(norm("/public\\..\\admin"), Err(PathError::EscapedSlash));
        assert_eq!(norm("/public/..;x/admin"), Err(PathError::DotSegmentParams));
        assert_eq!(norm("/a;v=1/b").unwrap(), "/a;v=1/b");
        assert_eq!(norm("/café/%41/../b").unwrap(), "/café/b");
    }

    #[test]
    fn escaped_slash_options_and_switches() {
        let decode = PathNormalization {
            escaped_slashes: EscapedSlashes::Decode,
            ..Default::default()
        };
        assert_eq!(normalize_path("/admin%2f..%2fx", &decode).unwrap(), "/x");
        assert_eq!(
            normalize_path("/public\\..\\admin", &decode).unwrap(),
            "/admin"
        );
        assert_eq!(normalize_path("/a%5c..%5cb", &decode).unwrap(), "/b");
        let keep = PathNormalization {
            escaped_slashes: EscapedSlashes::Keep,
            ..Default::default()
        };
        assert_eq!(normalize_path("/a%2fb", &keep).unwrap(), "/a%2Fb");
        let no_merge = PathNormalization {
            merge_slashes: false,
            ..Default::default()
        };
        assert_eq!(normalize_path("/a//b", &no_merge).unwrap(), "/a//b");
        let off = PathNormalization {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(normalize_path("/a/../b", &off).unwrap(), "/a/../b");
        assert!(matches!(
            normalize_path("/plain/path", &PathNormalization::default()).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    proptest::proptest! {
        #[test]
        fn normal_form_is_a_fixed_point(path in "(/[a-z.%2-9A-F]{0,4}){1,6}") {
            if let Ok(once) = norm(&path) {
                let twice = norm(&once).unwrap();
                proptest::prop_assert_eq!(&once, &twice);
                proptest::prop_assert!(!once.contains("/../") && !once.contains("/./") && !once.contains("//"));
            }
        }
    }
}
