use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use postern_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, DescriptorStatus, RateLimit,
};

use super::*;
use crate::route::{HeaderMatch, ValueMatch};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(n, v)| {
            (
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            )
        })
        .collect()
}

fn policy(actions: Vec<Action>) -> Arc<RateLimitPolicy> {
    Arc::new(RateLimitPolicy { stage: 0, actions })
}

fn facts<'a>(headers: &'a HeaderMap, jwt: &'a [VerifiedJwt]) -> RequestFacts<'a> {
    RequestFacts {
        headers,
        remote_ip: "10.1.2.3".parse::<IpAddr>().unwrap(),
        destination_cluster: Some("backend"),
        source_cluster: "web",
        spiffe_id: None,
        jwt,
    }
}

fn entries(d: &RateLimitDescriptor) -> Vec<(&str, &str)> {
    d.entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect()
}

fn header(name: &str) -> Action {
    Action::RequestHeader {
        name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
        key: name.to_string(),
        skip_if_absent: false,
    }
}

#[test]
fn every_action_adds_its_entry_in_order() {
    let h = headers(&[("x-user", "alice"), ("x-plan", "gold")]);
    let jwt = [VerifiedJwt {
        provider: Arc::from("p"),
        claims: Arc::new(crate::authn::jwt::Claims::new(
            serde_json::json!({ "sub": "u-7" })
                .as_object()
                .unwrap()
                .clone(),
        )),
    }];
    let mut f = facts(&h, &jwt);
    f.spiffe_id = Some("spiffe://td/ns/a/sa/b");
    let p = policy(vec![
        header("x-user"),
        Action::RemoteAddress,
        Action::GenericKey {
            key: "generic_key".into(),
            value: "api".into(),
        },
        Action::HeaderValueMatch {
            key: "header_match".into(),
            value: "gold".into(),
            default: None,
            expect_match: true,
            headers: vec![HeaderMatch {
                name: HeaderName::from_static("x-plan"),
                value: ValueMatch::Exact("gold".into()),
                invert: false,
            }],
        },
        Action::DestinationCluster,
        Action::SourceCluster,
        Action::SpiffeId {
            key: "spiffe_id".into(),
            skip_if_absent: false,
        },
        Action::JwtClaim {
            key: "user".into(),
            claim: crate::authn::jwt::ClaimPath::parse("sub").unwrap(),
            skip_if_absent: false,
        },
    ]);
    let out = descriptors(&[p], 0, &f);
    assert_eq!(out.len(), 1);
    assert_eq!(
        entries(&out[0]),
        [
            ("x-user", "alice"),
            ("remote_address", "10.1.2.3"),
            ("generic_key", "api"),
            ("header_match", "gold"),
            ("destination_cluster", "backend"),
            ("source_cluster", "web"),
            ("spiffe_id", "spiffe://td/ns/a/sa/b"),
            ("user", "u-7"),
        ]
    );
}

#[test]
fn a_missing_value_drops_the_descriptor_unless_skipped() {
    let h = headers(&[("x-b", "2")]);
    let f = facts(&h, &[]);
    let dropped = policy(vec![header("x-a"), header("x-b")]);
    let skipped = policy(vec![
        Action::RequestHeader {
            name: HeaderName::from_static("x-a"),
            key: "a".into(),
            skip_if_absent: true,
        },
        header("x-b"),
    ]);
    let all_skipped = policy(vec![Action::SpiffeId {
        key: "spiffe_id".into(),
        skip_if_absent: true,
    }]);
    let out = descriptors(&[dropped, skipped, all_skipped], 0, &f);
    // Only the middle one: the first lacks x-a, the last has no entries.
    assert_eq!(out.len(), 1);
    assert_eq!(entries(&out[0]), [("x-b", "2")]);
}

#[test]
fn header_value_match_uses_default_or_drops() {
    let matcher = |expect_match, default: Option<&str>| {
        policy(vec![Action::HeaderValueMatch {
            key: "k".into(),
            value: "matched".into(),
            default: default.map(str::to_string),
            expect_match,
            headers: vec![HeaderMatch {
                name: HeaderName::from_static("x-admin"),
                value: ValueMatch::Present(true),
                invert: false,
            }],
        }])
    };
    let without = headers(&[]);
    let with = headers(&[("x-admin", "1")]);
    assert!(descriptors(&[matcher(true, None)], 0, &facts(&without, &[])).is_empty());
    let out = descriptors(&[matcher(true, Some("other"))], 0, &facts(&without, &[]));
    assert_eq!(entries(&out[0]), [("k", "other")]);
    // expect_match: false adds the entry when the headers do not match.
    let out = descriptors(&[matcher(false, None)], 0, &facts(&without, &[]));
    assert_eq!(entries(&out[0]), [("k", "matched")]);
    assert!(descriptors(&[matcher(false, None)], 0, &facts(&with, &[])).is_empty());
}

#[test]
fn only_the_filter_stage_counts_and_no_cluster_drops() {
    let h = headers(&[]);
    let mut f = facts(&h, &[]);
    let stage1 = Arc::new(RateLimitPolicy {
        stage: 1,
        actions: vec![Action::RemoteAddress],
    });
    let stage0 = policy(vec![Action::DestinationCluster]);
    let out = descriptors(&[stage1.clone(), stage0.clone()], 1, &f);
    assert_eq!(entries(&out[0]), [("remote_address", "10.1.2.3")]);
    assert_eq!(out.len(), 1);
    f.destination_cluster = None;
    assert!(descriptors(&[stage0], 0, &f).is_empty());
}

#[test]
fn x_ratelimit_headers_name_the_tightest_limit_and_every_policy() {
    let status = |rpu, unit: Unit, name: &str, remaining, reset| DescriptorStatus {
        code: 1,
        current_limit: Some(RateLimit {
            name: name.to_string(),
            requests_per_unit: rpu,
            unit: unit as i32,
        }),
        limit_remaining: remaining,
        duration_until_reset: Some(postern_proto::google::protobuf::Duration {
            seconds: reset,
            nanos: 0,
        }),
        quota: None,
    };
    let out = x_ratelimit_headers(&[
        status(10, Unit::Second, "per-ip", 7, 1),
        status(1000, Unit::Hour, "", 3, 1800),
        DescriptorStatus::default(),
    ]);
    let get = |name: &str| {
        out.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        get("x-ratelimit-limit").as_deref(),
        Some("1000, 10;w=1;name=\"per-ip\", 1000;w=3600")
    );
    assert_eq!(get("x-ratelimit-remaining").as_deref(), Some("3"));
    assert_eq!(get("x-ratelimit-reset").as_deref(), Some("1800"));
    assert!(x_ratelimit_headers(&[DescriptorStatus::default()]).is_empty());
}
