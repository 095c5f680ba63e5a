use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderValue};
use http::{Method, Version};

use super::*;
use crate::config::file::{AppendAction, HeaderAddFile, HeaderMutationsFile};
use crate::http::headers::DownstreamPeer;

fn peer() -> DownstreamPeer {
    let remote: SocketAddr = "10.1.2.3:4567".parse().unwrap();
    DownstreamPeer::new(remote, 8080, &crate::tls::PeerTls::default(), None)
}

fn add(name: &str, value: &str, action: Option<AppendAction>) -> HeaderAddFile {
    HeaderAddFile {
        name: name.into(),
        value: value.into(),
        append_action: action,
        append: None,
        keep_empty_value: false,
    }
}

fn compile(file: &HeaderMutationsFile) -> Result<Arc<HeaderMutations>, Vec<(String, String)>> {
    let mut problems = Vec::new();
    let compiled =
        HeaderMutations::compile(file, "route.headers", &mut |p, r| problems.push((p, r)));
    if problems.is_empty() {
        Ok(compiled.expect("not empty"))
    } else {
        Err(problems)
    }
}

fn request_level(adds: Vec<HeaderAddFile>, removes: &[&str]) -> Arc<HeaderMutations> {
    compile(&HeaderMutationsFile {
        request_headers_to_add: adds,
        request_headers_to_remove: removes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .unwrap()
}

fn facts<'a>(peer: &'a DownstreamPeer, method: &'a Method) -> Facts<'a> {
    Facts {
        peer,
        authority: "api.example.com",
        path: "/v1/items",
        method,
        version: Version::HTTP_11,
        start: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        upstream: None,
        request_headers: None,
    }
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[test]
fn append_actions_follow_envoy() {
    let level = request_level(
        vec![
            add("x-append", "new", None),
            add("x-absent", "new", Some(AppendAction::AddIfAbsent)),
            add("x-present", "new", Some(AppendAction::AddIfAbsent)),
            add("x-over", "new", Some(AppendAction::OverwriteIfExistsOrAdd)),
            add(
                "x-over-missing",
                "new",
                Some(AppendAction::OverwriteIfExistsOrAdd),
            ),
            add("x-only-if", "new", Some(AppendAction::OverwriteIfExists)),
            add(
                "x-only-if-missing",
                "new",
                Some(AppendAction::OverwriteIfExists),
            ),
        ],
        &[],
    );
    let mut headers = HeaderMap::new();
    for name in ["x-append", "x-present", "x-over", "x-only-if"] {
        headers.append(name, HeaderValue::from_static("old"));
    }
    headers.append("x-over", HeaderValue::from_static("old2"));
    let (peer, method) = (peer(), Method::GET);
    level
        .request
        .apply(&mut headers, &facts(&peer, &method), true);
    assert_eq!(values(&headers, "x-append"), ["old", "new"]);
    assert_eq!(values(&headers, "x-absent"), ["new"]);
    assert_eq!(values(&headers, "x-present"), ["old"]);
    assert_eq!(values(&headers, "x-over"), ["new"]);
    assert_eq!(values(&headers, "x-over-missing"), ["new"]);
    assert_eq!(values(&headers, "x-only-if"), ["new"]);
    assert!(headers.get("x-only-if-missing").is_none());
}

#[test]
fn deprecated_append_maps_to_actions_and_conflicts_are_errors() {
    let mut overwrite = add("x-a", "v", None);
    overwrite.append = Some(false);
    let level = request_level(vec![overwrite], &[]);
    let mut headers = HeaderMap::new();
    headers.insert("x-a", HeaderValue::from_static("old"));
    let (peer, method) = (peer(), Method::GET);
    level
        .request
        .apply(&mut headers, &facts(&peer, &method), true);
    assert_eq!(values(&headers, "x-a"), ["v"]);

    let mut both = add("x-a", "v", Some(AppendAction::AddIfAbsent));
    both.append = Some(true);
    let err = compile(&HeaderMutationsFile {
        response_headers_to_add: vec![both],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(err[0].0, "route.headers.response_headers_to_add[0].append");
}

#[test]
fn removal_comes_before_addition_and_empty_values_are_skipped() {
    let mut keep = add("x-keep-empty", "%REQ(x-missing)%", None);
    keep.keep_empty_value = true;
    let level = request_level(
        vec![
            add("x-replace", "mine", None),
            add("x-empty", "%REQ(x-missing)%", None),
            keep,
        ],
        &["x-replace", "X-Drop"],
    );
    let mut headers = HeaderMap::new();
    headers.insert("x-replace", HeaderValue::from_static("theirs"));
    headers.insert("x-drop", HeaderValue::from_static("1"));
    let (peer, method) = (peer(), Method::GET);
    level
        .request
        .apply(&mut headers, &facts(&peer, &method), true);
    assert_eq!(values(&headers, "x-replace"), ["mine"]);
    assert!(headers.get("x-drop").is_none());
    assert!(headers.get("x-empty").is_none());
    assert_eq!(values(&headers, "x-keep-empty"), [""]);
}

#[test]
fn command_operators_are_filled_in() {
    let level = request_level(
        vec![
            add("x-client", "%DOWNSTREAM_REMOTE_ADDRESS%", None),
            add(
                "x-client-ip",
                "ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                None,
            ),
            add(
                "x-user-copy",
                "%REQ(x-user)%/%REQ(x-none?x-user)%/%REQ(x-user):3%",
                None,
            ),
            add(
                "x-host",
                "%REQ(:authority)% %REQ(:path)% %REQ(:method)%",
                None,
            ),
            add("x-proto", "%PROTOCOL%", None),
            add("x-start", "%START_TIME%", None),
            add("x-pct", "100%% sure", None),
            add("x-upstream", "%UPSTREAM_REMOTE_ADDRESS%", None),
            add("x-host-name", "%HOSTNAME%", None),
        ],
        &[],
    );
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("alice"));
    let (peer, method) = (peer(), Method::POST);
    level
        .request
        .apply(&mut headers, &facts(&peer, &method), true);
    assert_eq!(values(&headers, "x-client"), ["10.1.2.3:4567"]);
    assert_eq!(values(&headers, "x-client-ip"), ["ip=10.1.2.3"]);
    assert_eq!(values(&headers, "x-user-copy"), ["alice/alice/ali"]);
    assert_eq!(
        values(&headers, "x-host"),
        ["api.example.com /v1/items POST"]
    );
    assert_eq!(values(&headers, "x-proto"), ["HTTP/1.1"]);
    assert_eq!(values(&headers, "x-start"), ["2023-11-14T22:13:20.123Z"]);
    assert_eq!(values(&headers, "x-pct"), ["100% sure"]);
    // No upstream on the request side: the value is empty, so not added.
    assert!(headers.get("x-upstream").is_none());
    assert_eq!(values(&headers, "x-host-name"), [hostname()]);
}

#[test]
fn response_values_read_the_kept_request_and_the_upstream() {
    let level = compile(&HeaderMutationsFile {
        response_headers_to_add: vec![
            add("x-echo", "%REQ(x-user)%", None),
            add("x-upstream", "%UPSTREAM_REMOTE_ADDRESS%", None),
        ],
        ..Default::default()
    })
    .unwrap();
    assert!(level.response_reads_request());
    let mut request = HeaderMap::new();
    request.insert("x-user", HeaderValue::from_static("bob"));
    let (peer, method) = (peer(), Method::GET);
    let mut f = facts(&peer, &method);
    f.request_headers = Some(&request);
    f.upstream = Some("127.0.0.1:9000".parse().unwrap());
    let mut response = HeaderMap::new();
    level.response.apply(&mut response, &f, false);
    assert_eq!(values(&response, "x-echo"), ["bob"]);
    assert_eq!(values(&response, "x-upstream"), ["127.0.0.1:9000"]);
}

#[test]
fn bad_names_and_operators_are_errors_naming_the_field() {
    let file = HeaderMutationsFile {
        request_headers_to_add: vec![
            add(":path", "/x", None),
            add("Host", "evil", None),
            add("x-ok", "%UNKNOWN_THING%", None),
            add("x-ok", "50% off", None),
            add("x-ok", "%START_TIME(%s)%", None),
            add("transfer-encoding", "chunked", None),
            add("x-postern-peer", "forged", None),
            add("bad name", "v", None),
            add("x-ok", "%REQ()%", None),
        ],
        response_headers_to_remove: vec![":status".into(), "content-length".into()],
        ..Default::default()
    };
    let err = compile(&file).unwrap_err();
    let paths: Vec<&str> = err.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "route.headers.request_headers_to_add[0].name",
            "route.headers.request_headers_to_add[1].name",
            "route.headers.request_headers_to_add[2].value",
            "route.headers.request_headers_to_add[3].value",
            "route.headers.request_headers_to_add[4].value",
            "route.headers.request_headers_to_add[5].name",
            "route.headers.request_headers_to_add[6].name",
            "route.headers.request_headers_to_add[7].name",
            "route.headers.request_headers_to_add[8].value",
            "route.headers.response_headers_to_remove[0]",
            "route.headers.response_headers_to_remove[1]",
        ]
    );
    assert!(
        err[2]
            .1
            .contains("unknown command operator %UNKNOWN_THING%"),
        "{}",
        err[2].1
    );
    assert!(err[3].1.contains("unterminated"), "{}", err[3].1);
    assert!(err[0].1.contains("pseudo-headers and host"), "{}", err[0].1);
}

#[test]
fn levels_apply_least_specific_last_unless_most_specific_wins() {
    let level = |value: &str| {
        compile(&HeaderMutationsFile {
            request_headers_to_add: vec![add(
                "x-level",
                value,
                Some(AppendAction::OverwriteIfExistsOrAdd),
            )],
            ..Default::default()
        })
        .unwrap()
    };
    let (global, vhost, route, weighted) = (
        level("global"),
        level("vhost"),
        level("route"),
        level("weighted"),
    );
    let (peer, method) = (peer(), Method::GET);
    for (most_specific_wins, expected) in [(false, "global"), (true, "weighted")] {
        let plan = Plan::new(
            Some(&global),
            Some(&vhost),
            Some(&route),
            Some(&weighted),
            most_specific_wins,
        );
        let mut headers = HeaderMap::new();
        plan.apply_request(&mut headers, &facts(&peer, &method));
        assert_eq!(values(&headers, "x-level"), [expected]);
    }
    let plan = Plan::new(None, Some(&vhost), Some(&route), None, false);
    let mut headers = HeaderMap::new();
    plan.apply_request(&mut headers, &facts(&peer, &method));
    assert_eq!(values(&headers, "x-level"), ["vhost"]);
    assert!(!plan.changes_response());
}
