//! What the client reads of a resource without decoding it: its name (field
//! 1 of every Envoy v3 resource type), the `Resource` wrapper some servers
//! put around state-of-the-world bodies, and the labels and NACK text that
//! go with a type.

use postern_proto::envoy::service::discovery::v3::Resource as WrappedResource;
use postern_proto::google::rpc::Status;
use postern_proto::type_url;
use prost::Message as _;

use crate::{Any, Resource, ResourceError};

/// Type URL of `envoy.service.discovery.v3.Resource`, which a server may wrap
/// state-of-the-world bodies in (to carry a TTL or a per-resource name).
const WRAPPER_TYPE_URL: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// `google.rpc.Code.INVALID_ARGUMENT`, the code Envoy puts in a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Field 1 of a message, read as a string; every other field is skipped.
///
/// Listener, RouteConfiguration, Cluster, ClusterLoadAssignment, Secret,
/// VirtualHost and ScopedRouteConfiguration all keep their name there, so
/// this reads a name without knowing the type.
#[derive(Clone, PartialEq, prost::Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

/// The short `type` label of a type URL for metrics and logs.
pub(crate) fn type_label(type_url: &str) -> &'static str {
    match type_url {
        type_url::LISTENER => "listener",
        type_url::ROUTE => "route",
        type_url::CLUSTER => "cluster",
        type_url::ENDPOINT => "endpoint",
        type_url::SECRET => "secret",
        _ => "other",
    }
}

/// Turns the bodies of a state-of-the-world response into resources,
/// unwrapping `Resource` wrappers, or lists what is wrong with them: what
/// the client hands the [`Handler`](crate::Handler) as [`Update::State`](crate::Update::State).
///
/// # Errors
///
/// One [`ResourceError`] per body that has no name, cannot be unwrapped, or
/// is of another type than `type_url`.
pub fn sotw_resources(
    type_url: &str,
    version: &str,
    bodies: Vec<Any>,
) -> Result<Vec<Resource>, Vec<ResourceError>> {
    let mut resources = Vec::with_capacity(bodies.len());
    let mut errors = Vec::new();
    for (index, any) in bodies.into_iter().enumerate() {
        match sotw_resource(type_url, version, index, any) {
            Ok(resource) => resources.push(resource),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(errors)
    }
}

fn sotw_resource(
    type_url: &str,
    version: &str,
    index: usize,
    any: Any,
) -> Result<Resource, ResourceError> {
    let unnamed = |reason: String| ResourceError {
        name: format!("resources[{index}]"),
        reason,
    };
    if any.type_url == WRAPPER_TYPE_URL {
        let wrapped = WrappedResource::decode(any.value.as_slice())
            .map_err(|e| unnamed(format!("cannot decode the Resource wrapper: {e}")))?;
        let name = wrapped
            .resource_name
            .map(|n| n.name)
            .filter(|n| !n.is_empty())
            .unwrap_or(wrapped.name);
        let body = wrapped.resource.ok_or_else(|| ResourceError {
            name: name.clone(),
            reason: "the Resource wrapper holds no resource".into(),
        })?;
        // The wrapper's name wins over the body's: that is what it is for.
        let name = if name.is_empty() {
            body_name(&body).map_err(unnamed)?
        } else {
            name
        };
        check_type(type_url, &name, &body)?;
        return Ok(Resource {
            name,
            version: version.to_owned(),
            body,
        });
    }
    let name = body_name(&any).map_err(unnamed)?;
    check_type(type_url, &name, &any)?;
    Ok(Resource {
        name,
        version: version.to_owned(),
        body: any,
    })
}

/// Reads a body's name from field 1.
fn body_name(any: &Any) -> Result<String, String> {
    let name = NameOnly::decode(any.value.as_slice())
        .map_err(|e| format!("cannot read the resource name: {e}"))?
        .name;
    if name.is_empty() {
        return Err("the resource has no name".into());
    }
    Ok(name)
}

/// A body of another type than the response's is a server bug the handler
/// must never see.
pub(crate) fn check_type(type_url: &str, name: &str, body: &Any) -> Result<(), ResourceError> {
    if body.type_url == type_url {
        Ok(())
    } else {
        Err(ResourceError {
            name: name.to_owned(),
            reason: format!(
                "resource of type {} in a response of type {type_url}",
                body.type_url
            ),
        })
    }
}

/// The text of a NACK: `name: reason` per rejected resource.
pub(crate) fn nack_message(errors: &[ResourceError]) -> String {
    if errors.is_empty() {
        // A handler that rejects without saying why still must not look
        // like an ACK to the server.
        return "update rejected".into();
    }
    errors
        .iter()
        .map(|e| format!("{}: {}", e.name, e.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `error_detail` of a NACK.
pub(crate) fn nack_status(message: &str) -> Status {
    Status {
        code: INVALID_ARGUMENT,
        message: message.to_owned(),
        details: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::envoy::config::cluster::v3::Cluster;
    use postern_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;

    fn any<M: prost::Name>(message: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: message.encode_to_vec(),
        }
    }

    #[test]
    fn names_come_from_field_one() {
        let cluster = Cluster {
            name: "web".into(),
            ..Cluster::default()
        };
        let cla = ClusterLoadAssignment {
            cluster_name: "db".into(),
            ..ClusterLoadAssignment::default()
        };
        let got = sotw_resources(type_url::CLUSTER, "v1", vec![any(&cluster)]).unwrap();
        assert_eq!(got[0].name, "web");
        assert_eq!(got[0].version, "v1");
        let got = sotw_resources(type_url::ENDPOINT, "v1", vec![any(&cla)]).unwrap();
        assert_eq!(got[0].name, "db");
    }

    #[test]
    fn wrapper_is_unwrapped() {
        let cluster = any(&Cluster {
            name: "web".into(),
            ..Cluster::default()
        });
        let wrapped = any(&WrappedResource {
            name: "web".into(),
            resource: Some(cluster.clone()),
            ..WrappedResource::default()
        });
        let got = sotw_resources(type_url::CLUSTER, "v1", vec![wrapped]).unwrap();
        assert_eq!(got[0].body, cluster);
        assert_eq!(got[0].name, "web");
    }

    #[test]
    fn wrong_type_and_missing_name_are_rejected() {
        let cluster = any(&Cluster {
            name: "web".into(),
            ..Cluster::default()
        });
        let nameless = any(&Cluster::default());
        let errors = sotw_resources(type_url::LISTENER, "v1", vec![cluster, nameless]).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].name, "web");
        assert!(errors[0].reason.contains("Cluster"), "{}", errors[0].reason);
        assert_eq!(errors[1].name, "resources[1]");
    }

    #[test]
    fn nack_message_names_each_resource() {
        let message = nack_message(&[
            ResourceError {
                name: "a".into(),
                reason: "bad port".into(),
            },
            ResourceError {
                name: "b".into(),
                reason: "no route".into(),
            },
        ]);
        assert_eq!(message, "a: bad port; b: no route");
        assert_eq!(nack_status(&message).code, 3);
    }

    #[test]
    fn labels() {
        assert_eq!(type_label(type_url::LISTENER), "listener");
        assert_eq!(type_label(type_url::SECRET), "secret");
        assert_eq!(type_label("type.googleapis.com/x.Y"), "other");
    }
}
