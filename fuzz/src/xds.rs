//! A `DiscoveryResponse` or `DeltaDiscoveryResponse` from the wire to a
//! validated config: the client's unwrapping (`postern_xds::sotw_resources`,
//! `postern_xds::delta_resources`), decoding and translation
//! (`config::xds`), then `Config::from_dynamic_model`, as the proxy's
//! `XdsHandler` does for one update on top of a mesh sidecar's bootstrap.

use std::sync::OnceLock;

use postern::config::file::{
    ClusterFile, ConfigFile, ListenerFile, SdsSourceFile, VirtualHostFile,
};
use postern::config::xds::{self as translate, EndpointSource, RouteSource};
use postern_proto::envoy::config::cluster::v3::Cluster;
use postern_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use postern_proto::envoy::config::listener::v3::Listener;
use postern_proto::envoy::config::route::v3::RouteConfiguration;
use postern_proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use postern_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource as WrappedResource,
};
use postern_proto::google::protobuf::Any;
use postern_proto::type_url;
use prost::Message;

/// Type URL of the `Resource` wrapper of state-of-the-world responses.
const WRAPPER_TYPE_URL: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// A sidecar bootstrap with an SDS identity, so mTLS listeners and clusters
/// translate as they would on a mesh workload.
const BOOTSTRAP: &str = r#"
node: { id: "sidecar~10.0.0.1~fuzz.default~default.svc.cluster.local", cluster: fuzz }
xds: { address: "http://127.0.0.1:15010" }
identity:
  spiffe_id: spiffe://cluster.local/ns/default/sa/fuzz
  source: { sds: {} }
"#;

fn bootstrap() -> &'static (ConfigFile, SdsSourceFile) {
    static BASE: OnceLock<(ConfigFile, SdsSourceFile)> = OnceLock::new();
    BASE.get_or_init(|| {
        let file: ConfigFile = serde_yaml_ng::from_str(BOOTSTRAP).expect("bootstrap parses");
        let sds: SdsSourceFile = serde_yaml_ng::from_str("{}").expect("sds names parse");
        (file, sds)
    })
}

/// A listener that takes RDS routes, as one bound by LDS would.
fn rds_listener(name: &str) -> ListenerFile {
    let mut listener: ListenerFile =
        serde_yaml_ng::from_str("{ name: rds, address: \"127.0.0.1:0\", kind: http }")
            .expect("listener parses");
    listener.name = name.to_owned();
    listener
}

/// Routes for a listener that takes them by RDS.
fn rds_routes() -> VirtualHostFile {
    serde_yaml_ng::from_str(
        r#"{ name: rds, domains: ["*"], routes: [{ name: all, match: {}, direct_response: { status: 200 } }] }"#,
    )
    .expect("virtual host parses")
}

/// An EDS cluster waiting for its endpoints.
fn eds_cluster(name: &str) -> ClusterFile {
    let mut cluster: ClusterFile =
        serde_yaml_ng::from_str("{ name: eds, endpoints: [] }").expect("cluster parses");
    cluster.name = name.to_owned();
    cluster
}

/// What became of a response.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a `DiscoveryResponse`, or the client refused a body.
    NotDecoded,
    /// A resource was NACKed, for this reason.
    Rejected(String),
    /// Every resource translated and the assembled config validated.
    Accepted,
}

/// Runs one response through the pipeline.
pub fn apply(bytes: &[u8]) -> Outcome {
    let Ok(response) = DiscoveryResponse::decode(bytes) else {
        return Outcome::NotDecoded;
    };
    let Ok(resources) = postern_xds::sotw_resources(
        &response.type_url,
        &response.version_info,
        response.resources,
    ) else {
        return Outcome::NotDecoded;
    };
    translate_all(&response.type_url, &resources)
}

/// Names a delta response may refresh with a body-less entry (a TTL
/// heartbeat), as if the client held them.
pub const HELD: &[&str] = &["held"];

/// Runs one `DeltaDiscoveryResponse` through the pipeline: the client's
/// unwrapping (`postern_xds::delta_resources`), then the same translation
/// as [`apply`] for the resources it adds.
///
/// # Panics
///
/// When the client hands over a resource without a name or of another type
/// than the response's, keeps a body-less entry, or unwraps the same
/// resources differently from state of the world.
pub fn apply_delta(bytes: &[u8]) -> Outcome {
    let Ok(response) = DeltaDiscoveryResponse::decode(bytes) else {
        return Outcome::NotDecoded;
    };
    let type_url = response.type_url;
    let with_body = response
        .resources
        .iter()
        .filter(|r| r.resource.is_some())
        .count();
    let Ok(added) =
        postern_xds::delta_resources(&type_url, |name| HELD.contains(&name), response.resources)
    else {
        return Outcome::NotDecoded;
    };
    assert_eq!(added.len(), with_body, "a heartbeat reached the handler");
    for resource in &added {
        assert!(!resource.name.is_empty(), "a resource without a name");
        assert_eq!(
            resource.body.type_url, type_url,
            "a resource of another type"
        );
    }
    // A server may send the same resources over either protocol; the
    // handler must be given the same names and bodies.
    let wrapped = added
        .iter()
        .map(|r| Any {
            type_url: WRAPPER_TYPE_URL.to_owned(),
            value: WrappedResource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.body.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        })
        .collect();
    let sotw = postern_xds::sotw_resources(&type_url, "sotw", wrapped)
        .expect("what delta accepts, state of the world accepts");
    assert!(
        sotw.iter()
            .map(|r| (&r.name, &r.body))
            .eq(added.iter().map(|r| (&r.name, &r.body))),
        "delta and state of the world unwrap differently"
    );
    translate_all(&type_url, &added)
}

/// Translates resources of one type as the handler does, then validates
/// the config they make with the bootstrap.
fn translate_all(type_url: &str, resources: &[postern_xds::Resource]) -> Outcome {
    let (base, sds) = bootstrap();
    let mut file = base.clone();
    let mut virtuals = Vec::new();
    for resource in resources {
        let body = &resource.body;
        let translated = match type_url {
            type_url::LISTENER => {
                translate::decode::<Listener>(body, type_url::LISTENER).and_then(|l| {
                    let (mut listener, routes) = translate::listener(&l, Some(sds))?;
                    if let RouteSource::Rds(_) = routes {
                        // As if its RouteConfiguration had come: the handler
                        // holds the listener back until then.
                        listener.virtual_hosts = vec![rds_routes()];
                    }
                    if translate::binds_to_port(&l) {
                        file.listeners.push(listener);
                    } else {
                        virtuals.push(listener);
                    }
                    Ok(())
                })
            }
            type_url::ROUTE => translate::decode::<RouteConfiguration>(body, type_url::ROUTE)
                .and_then(|rc| {
                    let mut listener = rds_listener(&resource.name);
                    translate::route_configuration(&rc)?.apply_to(&mut listener);
                    file.listeners.push(listener);
                    Ok(())
                }),
            type_url::CLUSTER => {
                translate::decode::<Cluster>(body, type_url::CLUSTER).and_then(|c| {
                    let (cluster, source) = translate::cluster(&c, Some(sds))?;
                    assert!(
                        source == EndpointSource::Inline || cluster.endpoints.is_empty(),
                        "an EDS cluster came with inline endpoints"
                    );
                    file.clusters.push(cluster);
                    Ok(())
                })
            }
            type_url::ENDPOINT => {
                translate::decode::<ClusterLoadAssignment>(body, type_url::ENDPOINT).and_then(
                    |cla| {
                        let endpoints = translate::load_assignment(&cla)?;
                        let mut cluster = eds_cluster(&resource.name);
                        cluster.endpoints = endpoints;
                        file.clusters.push(cluster);
                        Ok(())
                    },
                )
            }
            type_url::SECRET => translate::decode::<Secret>(body, type_url::SECRET)
                .and_then(|s| translate::secret(&s).map(|_| ())),
            other => return Outcome::Rejected(format!("type {other} is not supported")),
        };
        if let Err(problems) = translated {
            return Outcome::Rejected(problems.join("; "));
        }
    }
    translate::attach_virtual_listeners(&mut file.listeners, &virtuals);
    match postern::Config::from_dynamic_model(file) {
        Ok(config) => {
            // The running config is also what /config_dump serves.
            let _ = config.to_json();
            Outcome::Accepted
        }
        Err(err) => Outcome::Rejected(err.to_string()),
    }
}
