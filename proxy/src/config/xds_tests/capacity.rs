//! Capacity and hostile-input settings from xDS: the listen backlog and
//! what to do with header names holding underscores.

use super::ignored::with_manager;
use super::*;
use crate::http::headers::UnderscoreHeaders;

#[test]
fn tcp_backlog_size_sets_the_listen_backlog() {
    let l = http_listener(Vec::new());
    let (file, _) = listener(&l, None).unwrap();
    assert_eq!(file.limits.tcp_backlog_size, DEFAULT_TCP_BACKLOG_SIZE);

    let mut set = http_listener(Vec::new());
    set.tcp_backlog_size = Some(UInt32Value { value: 4096 });
    let (file, _) = listener(&set, None).unwrap();
    assert_eq!(file.limits.tcp_backlog_size, 4096);

    // Past an int it means "as many as the kernel allows", as in Envoy.
    set.tcp_backlog_size = Some(UInt32Value { value: u32::MAX });
    let (file, _) = listener(&set, None).unwrap();
    assert_eq!(file.limits.tcp_backlog_size, i32::MAX as u32);

    set.tcp_backlog_size = Some(UInt32Value { value: 0 });
    let problems = listener(&set, None).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("tcp_backlog_size: ") && p.contains("more than 0")),
        "{problems:?}"
    );
}

#[test]
fn a_tcp_proxy_listener_takes_its_backlog_too() {
    let mut l = tcp_listener("db", socket("127.0.0.1", 0), "db");
    l.tcp_backlog_size = Some(UInt32Value { value: 64 });
    let (file, _) = listener(&l, None).unwrap();
    assert_eq!(file.limits.tcp_backlog_size, 64);
}

#[test]
fn headers_with_underscores_action_maps_onto_the_listener_setting() {
    use self::core::http_protocol_options::HeadersWithUnderscoresAction as Action;
    let with = |action: i32| {
        with_manager(|m| {
            m.common_http_protocol_options = Some(core::HttpProtocolOptions {
                headers_with_underscores_action: action,
                ..Default::default()
            });
        })
    };
    for (action, setting) in [
        (Action::Allow, UnderscoreHeaders::Allow),
        (Action::RejectRequest, UnderscoreHeaders::RejectRequest),
        (Action::DropHeader, UnderscoreHeaders::DropHeader),
    ] {
        let (file, _) = listener(&with(action as i32), None).unwrap();
        assert_eq!(file.limits.headers_with_underscores, setting, "{action:?}");
    }
    // Without the options, Envoy's default: allow.
    let (file, _) = listener(&with_manager(|_| {}), None).unwrap();
    assert_eq!(
        file.limits.headers_with_underscores,
        UnderscoreHeaders::Allow
    );

    let problems = listener(&with(7), None).unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains(
            ".common_http_protocol_options.headers_with_underscores_action: unknown value 7"
        )),
        "{problems:?}"
    );
}
