//! State of the world over `StreamAggregatedResources`: every response holds
//! the complete set of a type; requests carry the accepted `version_info`
//! and the names wanted.

use std::time::SystemTime;

use postern_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use crate::client::{log_result, AdsClient, Flavor, OpenFuture, RequestStream, Session};
use crate::resource::{nack_message, nack_status, sotw_resources};
use crate::state::{Interest, State, TypeState};
use crate::{Node, Update};

/// Requests for every type whose wanted names differ from what the server
/// was told on this stream; on a fresh stream that is every subscribed type,
/// with the node and the last accepted version.
pub(crate) fn subscription_requests(state: &mut State, node: &Node) -> Vec<DiscoveryRequest> {
    state
        .iter_mut()
        .filter(|(_, ts)| ts.needs_request())
        .map(|(type_url, ts)| request(type_url, ts, node, None))
        .collect()
}

/// A request of `type_url` telling the server the current interest, the
/// accepted version and the last nonce; it is a NACK when `error` is given.
/// Records what was sent.
fn request(
    type_url: &str,
    ts: &mut TypeState,
    node: &Node,
    error: Option<&str>,
) -> DiscoveryRequest {
    let resource_names = match &ts.interest {
        Some(Interest::Names(names)) => {
            ts.stream.named_sent = true;
            names.iter().cloned().collect()
        }
        // Empty is the legacy wildcard, understood by every server, but only
        // until names were sent: after that it would mean "none".
        Some(Interest::Wildcard) if ts.stream.named_sent => vec!["*".to_owned()],
        Some(Interest::Wildcard) => Vec::new(),
        // Unsubscribed from every name of the type.
        None => Vec::new(),
    };
    let first = !ts.stream.started;
    ts.stream.started = true;
    ts.stream.sent = ts.interest.clone();
    DiscoveryRequest {
        version_info: ts.version.clone(),
        node: first.then(|| node.clone()),
        resource_names,
        type_url: type_url.to_owned(),
        response_nonce: ts.stream.nonce.clone(),
        error_detail: error.map(nack_status),
        ..DiscoveryRequest::default()
    }
}

/// Hands a response to the handler and returns the ACK or NACK; `None` for
/// a response of a type not subscribed to, which is ignored.
pub(crate) fn handle(
    session: &Session<'_>,
    response: DiscoveryResponse,
) -> Option<DiscoveryRequest> {
    let DiscoveryResponse {
        version_info,
        resources,
        type_url,
        nonce,
        ..
    } = response;
    {
        let mut state = session.shared.lock();
        match state.get_mut(&type_url) {
            Some(ts) if ts.interest.is_some() => {
                ts.stream.nonce.clone_from(&nonce);
                ts.last_nonce.clone_from(&nonce);
            }
            _ => {
                tracing::debug!(type_url, "ignoring a response of a type not subscribed to");
                return None;
            }
        }
    }

    // No lock here: the handler may change subscriptions.
    let result = sotw_resources(&type_url, &version_info, resources).and_then(|resources| {
        session.handler.on_update(
            &type_url,
            Update::State {
                version_info: version_info.clone(),
                resources,
            },
        )
    });

    let mut state = session.shared.lock();
    let ts = state.get_mut(&type_url)?;
    let error = match result {
        Ok(()) => {
            ts.version.clone_from(&version_info);
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
    log_result(&type_url, &version_info, error.as_deref());
    Some(request(&type_url, ts, session.node, error.as_deref()))
}

/// The state-of-the-world protocol.
pub(crate) struct Sotw;

impl Flavor for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn open(
        client: &mut AdsClient,
        requests: RequestStream<DiscoveryRequest>,
    ) -> OpenFuture<'_, DiscoveryResponse> {
        Box::pin(client.stream_aggregated_resources(requests))
    }

    fn subscriptions(state: &mut State, node: &Node) -> Vec<DiscoveryRequest> {
        subscription_requests(state, node)
    }

    fn handle(session: &Session<'_>, response: DiscoveryResponse) -> Option<DiscoveryRequest> {
        handle(session, response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Shared, Subscriptions};
    use std::sync::Arc;

    fn node() -> Node {
        Node {
            id: "n1".into(),
            ..Node::default()
        }
    }

    #[test]
    fn first_request_carries_node_then_wildcard_becomes_star_after_names() {
        let shared = Arc::new(Shared::default());
        let subs = Subscriptions {
            shared: shared.clone(),
        };
        subs.set("t", vec!["a".into()]);
        let reqs = subscription_requests(&mut shared.lock(), &node());
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].node.as_ref().map(|n| n.id.as_str()), Some("n1"));
        assert_eq!(reqs[0].resource_names, ["a"]);
        assert!(subscription_requests(&mut shared.lock(), &node()).is_empty());

        subs.set("t", vec![]);
        let reqs = subscription_requests(&mut shared.lock(), &node());
        assert!(reqs[0].node.is_none());
        assert_eq!(reqs[0].resource_names, ["*"]);

        subs.remove("t");
        let reqs = subscription_requests(&mut shared.lock(), &node());
        assert!(reqs[0].resource_names.is_empty());
    }
}
