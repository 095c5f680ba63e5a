//! Writes the seed corpus of the `xds_response` fuzz target: encoded
//! `DiscoveryResponse`s of every type Postern takes, built from the example
//! mesh of the reference control plane and from the envoy builders the
//! integration tests use.
//!
//! ```text
//! cargo run -p postern-tests --example fuzz_seeds -- fuzz/seeds/xds_response
//! ```

use std::path::PathBuf;

use postern_control::ads::{pack, Snapshot};
use postern_control::mesh::parse_mesh;
use postern_proto::envoy::config::rbac::v3 as rbac;
use postern_proto::envoy::service::discovery::v3::{DiscoveryResponse, Resource};
use postern_proto::google::protobuf::Any;
use postern_proto::type_url;
use postern_tests::envoy::{
    certificate_secret, http_listener, http_listener_with_filters, rbac_filter, root_secret,
    static_cluster,
};
use postern_tests::mesh::TestCa;
use prost::Message;

const MESH: &str = include_str!("../../control-plane/examples/mesh.yaml");
const PEERS: &[&str] = &["spiffe://cluster.local/ns/default/sa/web"];

fn response(type_url: &str, version: &str, resources: Vec<Any>) -> Vec<u8> {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url.into(),
        nonce: "1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn of_type(snapshot: &Snapshot, type_url: &str) -> Vec<Any> {
    snapshot
        .of_type(type_url)
        .map(|(_, any)| any.clone())
        .collect()
}

/// An RBAC filter that lets one SPIFFE ID read `/items/` only.
fn rbac_rules() -> rbac::Rbac {
    use postern_proto::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    use postern_proto::envoy::config::route::v3::HeaderMatcher;
    use postern_proto::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
    let principal = rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Authenticated(
            rbac::principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(PEERS[0].into())),
                    ignore_case: false,
                }),
            },
        )),
    };
    let permission = rbac::Permission {
        rule: Some(rbac::permission::Rule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("GET".into())),
                ignore_case: false,
            })),
            ..Default::default()
        })),
    };
    rbac::Rbac {
        action: rbac::rbac::Action::Allow as i32,
        policies: [(
            "reads".to_string(),
            rbac::Policy {
                permissions: vec![permission],
                principals: vec![principal],
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

fn main() -> anyhow::Result<()> {
    let dir: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds/xds_response".into())
        .into();
    std::fs::create_dir_all(&dir)?;
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);

    let mesh = parse_mesh(MESH, "mesh-1")?;
    for (name, kind) in [
        ("mesh-lds", type_url::LISTENER),
        ("mesh-rds", type_url::ROUTE),
        ("mesh-cds", type_url::CLUSTER),
        ("mesh-eds", type_url::ENDPOINT),
    ] {
        write(name, response(kind, "mesh-1", of_type(&mesh, kind)))?;
    }

    let addr = "127.0.0.1:8080".parse()?;
    let upstream = "127.0.0.1:9000".parse()?;
    write(
        "lds-inline-routes",
        response(
            type_url::LISTENER,
            "1",
            vec![pack(&http_listener("edge", addr, "web", None))],
        ),
    )?;
    write(
        "lds-mtls-rbac",
        response(
            type_url::LISTENER,
            "1",
            vec![pack(&http_listener_with_filters(
                "inbound",
                addr,
                "local-app",
                Some(PEERS),
                vec![rbac_filter(rbac_rules())],
            ))],
        ),
    )?;
    write(
        "cds-static-and-mtls",
        response(
            type_url::CLUSTER,
            "1",
            vec![
                pack(&static_cluster("web", upstream, None)),
                pack(&static_cluster("mesh-web", upstream, Some(PEERS))),
            ],
        ),
    )?;
    // A server may wrap state-of-the-world bodies in a Resource.
    let wrapped = Resource {
        name: "web".into(),
        version: "1".into(),
        resource: Some(pack(&static_cluster("web", upstream, None))),
        ..Default::default()
    };
    write(
        "cds-wrapped",
        response(type_url::CLUSTER, "1", vec![pack(&wrapped)]),
    )?;

    let ca = TestCa::new("fuzz seed CA");
    // Valid for ten years, so the seed keeps its meaning.
    let issued = ca.issue(
        "spiffe://cluster.local/ns/default/sa/fuzz",
        -60,
        10 * 365 * 24 * 3600,
    );
    write(
        "sds-certificate-and-roots",
        response(
            type_url::SECRET,
            "1",
            vec![
                pack(&certificate_secret(&issued.cert_pem, &issued.key_pem)),
                pack(&root_secret(ca.root_pem())),
            ],
        ),
    )?;
    println!("wrote seeds to {}", dir.display());
    Ok(())
}
