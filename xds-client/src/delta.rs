//! Delta over `DeltaAggregatedResources`: responses hold what changed;
//! requests carry subscribe/unsubscribe diffs, and the first request of a
//! type on a stream lists the versions held (`initial_resource_versions`).

use std::collections::BTreeSet;
use std::time::SystemTime;

use postern_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};

use crate::client::{log_result, AdsClient, Flavor, OpenFuture, RequestStream, Session};
use crate::resource::{check_type, nack_message, nack_status};
use crate::state::{Interest, State, TypeState};
use crate::{Node, Resource, ResourceError, Update};

/// The explicit wildcard name of the xDS protocol.
const WILDCARD: &str = "*";

/// Requests for every type whose wanted names differ from what the server
/// was told on this stream; on a fresh stream that is every subscribed type,
/// with the node and the versions held.
pub(crate) fn subscription_requests(state: &mut State, node: &Node) -> Vec<DeltaDiscoveryRequest> {
    state
        .iter_mut()
        .filter(|(_, ts)| ts.needs_request())
        .map(|(type_url, ts)| request(type_url, ts, node, None))
        .collect()
}

/// Names to subscribe and unsubscribe to go from `sent` to `wanted`.
fn diff(
    first: bool,
    sent: Option<&Interest>,
    wanted: Option<&Interest>,
) -> (Vec<String>, Vec<String>) {
    let all = |names: &BTreeSet<String>| names.iter().cloned().collect::<Vec<_>>();
    let star = || vec![WILDCARD.to_owned()];
    match (sent, wanted) {
        // The legacy implicit wildcard: an empty first request, which every
        // server understands.
        (_, Some(Interest::Wildcard)) if first => (Vec::new(), Vec::new()),
        (None, Some(Interest::Wildcard)) => (star(), Vec::new()),
        (None, Some(Interest::Names(new))) => (all(new), Vec::new()),
        (Some(Interest::Wildcard), Some(Interest::Names(new))) => (all(new), star()),
        (Some(Interest::Names(old)), Some(Interest::Wildcard)) => (star(), all(old)),
        (Some(Interest::Names(old)), Some(Interest::Names(new))) => (
            new.difference(old).cloned().collect(),
            old.difference(new).cloned().collect(),
        ),
        (Some(Interest::Wildcard), None) => (Vec::new(), star()),
        (Some(Interest::Names(old)), None) => (Vec::new(), all(old)),
        (Some(Interest::Wildcard), Some(Interest::Wildcard)) | (None, None) => {
            (Vec::new(), Vec::new())
        }
    }
}

/// A request of `type_url`: the pending subscription diff, plus the ACK or
/// NACK of `response` (nonce, and error message for a NACK) when given.
/// Records what was sent.
fn request(
    type_url: &str,
    ts: &mut TypeState,
    node: &Node,
    response: Option<(&str, Option<&str>)>,
) -> DeltaDiscoveryRequest {
    let first = !ts.stream.started;
    let (resource_names_subscribe, resource_names_unsubscribe) =
        diff(first, ts.stream.sent.as_ref(), ts.interest.as_ref());
    ts.stream.started = true;
    ts.stream.sent = ts.interest.clone();
    let (response_nonce, error_detail) = match response {
        Some((nonce, error)) => (nonce.to_owned(), error.map(nack_status)),
        None => (String::new(), None),
    };
    DeltaDiscoveryRequest {
        node: first.then(|| node.clone()),
        type_url: type_url.to_owned(),
        resource_names_subscribe,
        resource_names_unsubscribe,
        initial_resource_versions: if first {
            ts.resources.clone().into_iter().collect()
        } else {
            Default::default()
        },
        response_nonce,
        error_detail,
        ..DeltaDiscoveryRequest::default()
    }
}

/// Hands a response to the handler and returns the ACK or NACK; `None` for
/// a response of a type not subscribed to, which is ignored.
pub(crate) fn handle(
    session: &Session<'_>,
    response: DeltaDiscoveryResponse,
) -> Option<DeltaDiscoveryRequest> {
    let DeltaDiscoveryResponse {
        system_version_info,
        resources,
        type_url,
        removed_resources,
        removed_resource_names,
        nonce,
        ..
    } = response;
    let added = {
        let mut state = session.shared.lock();
        match state.get_mut(&type_url) {
            Some(ts) if ts.interest.is_some() => {
                ts.last_nonce.clone_from(&nonce);
                delta_resources(&type_url, |name| ts.resources.contains_key(name), resources)
            }
            _ => {
                tracing::debug!(type_url, "ignoring a response of a type not subscribed to");
                return None;
            }
        }
    };
    let mut removed = removed_resources;
    removed.extend(removed_resource_names.into_iter().map(|n| n.name));

    // No lock here: the handler may change subscriptions.
    let result = added.and_then(|added| {
        let held: Vec<(String, String)> = added
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        session
            .handler
            .on_update(
                &type_url,
                Update::Delta {
                    system_version_info: system_version_info.clone(),
                    added,
                    removed: removed.clone(),
                },
            )
            .map(|()| held)
    });

    let mut state = session.shared.lock();
    let ts = state.get_mut(&type_url)?;
    let error = match result {
        Ok(held) => {
            for name in &removed {
                ts.resources.remove(name);
            }
            ts.resources.extend(held);
            ts.version.clone_from(&system_version_info);
            ts.last_update = Some(SystemTime::now());
            ts.last_nack = None;
            None
        }
        Err(errors) => {
            let message = nack_message(&errors);
            ts.last_nack = Some(message.clone());
            Some(message)
        }
    };
    log_result(&type_url, &system_version_info, error.as_deref());
    Some(request(
        &type_url,
        ts,
        session.node,
        Some((&nonce, error.as_deref())),
    ))
}

/// Turns the resources of a delta response into what the client hands the
/// [`Handler`](crate::Handler) as `added` of [`Update::Delta`], or lists what
/// is wrong with them. `held` tells whether a name is held already: a
/// body-less entry for one is a TTL heartbeat and is dropped.
///
/// # Errors
///
/// One [`ResourceError`] per entry that has no name, is of another type than
/// `type_url`, or has no body and is not held.
pub fn delta_resources(
    type_url: &str,
    held: impl Fn(&str) -> bool,
    resources: Vec<DeltaResource>,
) -> Result<Vec<Resource>, Vec<ResourceError>> {
    let mut added = Vec::with_capacity(resources.len());
    let mut errors = Vec::new();
    for (index, resource) in resources.into_iter().enumerate() {
        let name = resource
            .resource_name
            .map(|n| n.name)
            .filter(|n| !n.is_empty())
            .unwrap_or(resource.name);
        if name.is_empty() {
            errors.push(ResourceError {
                name: format!("resources[{index}]"),
                reason: "the resource has no name".into(),
            });
            continue;
        }
        match resource.resource {
            Some(body) => match check_type(type_url, &name, &body) {
                Ok(()) => added.push(Resource {
                    name,
                    version: resource.version,
                    body,
                }),
                Err(error) => errors.push(error),
            },
            // A body-less entry for a resource held is a TTL heartbeat; TTLs
            // are not tracked, so there is nothing to refresh.
            None if held(&name) => {}
            None => errors.push(ResourceError {
                name,
                reason: "the resource has no body".into(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(added)
    } else {
        Err(errors)
    }
}

/// The delta protocol.
pub(crate) struct Delta;

impl Flavor for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn open(
        client: &mut AdsClient,
        requests: RequestStream<DeltaDiscoveryRequest>,
    ) -> OpenFuture<'_, DeltaDiscoveryResponse> {
        Box::pin(client.delta_aggregated_resources(requests))
    }

    fn subscriptions(state: &mut State, node: &Node) -> Vec<DeltaDiscoveryRequest> {
        subscription_requests(state, node)
    }

    fn handle(
        session: &Session<'_>,
        response: DeltaDiscoveryResponse,
    ) -> Option<DeltaDiscoveryRequest> {
        handle(session, response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Interest {
        Interest::Names(list.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn diffs() {
        let w = Interest::Wildcard;
        let ab = names(&["a", "b"]);
        let bc = names(&["b", "c"]);
        assert_eq!(diff(true, None, Some(&w)), (vec![], vec![]));
        assert_eq!(
            diff(true, None, Some(&ab)),
            (vec!["a".into(), "b".into()], vec![])
        );
        assert_eq!(
            diff(false, Some(&ab), Some(&bc)),
            (vec!["c".into()], vec!["a".into()])
        );
        assert_eq!(
            diff(false, Some(&w), Some(&ab)),
            (vec!["a".into(), "b".into()], vec!["*".into()])
        );
        assert_eq!(
            diff(false, Some(&ab), Some(&w)),
            (vec!["*".into()], vec!["a".into(), "b".into()])
        );
        assert_eq!(
            diff(false, Some(&ab), None),
            (vec![], vec!["a".into(), "b".into()])
        );
        assert_eq!(diff(false, None, Some(&w)), (vec!["*".into()], vec![]));
    }
}
