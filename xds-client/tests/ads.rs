//! The ADS client against an in-process fake control plane on 127.0.0.1:0:
//! subscriptions, ACK/NACK, re-entrant subscription changes, reconnects,
//! delta, TLS and metrics.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use postern_proto::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use postern_xds::{Protocol, ResourceError, Update, XdsClient};
use support::*;

#[tokio::test]
async fn sotw_subscribes_with_node_and_acks_with_version_and_nonce() {
    let mut server = FakeServer::start().await;
    let (handler, mut observed) = recorder(accept_all);
    let client = XdsClient::new(config(server.addr, Protocol::StateOfTheWorld), handler);
    let status = client.status();
    client.subscriptions().set(CLUSTER, vec![]);
    client.subscriptions().set(ROUTE, vec!["r1".into()]);
    let (_subs, _task) = spawn(client);

    let mut stream = server.next_sotw().await;
    let cds = stream.next_request().await;
    assert_eq!(cds.type_url, CLUSTER);
    assert_eq!(
        cds.node.as_ref().map(|n| n.id.as_str()),
        Some(node().id.as_str())
    );
    assert!(
        cds.resource_names.is_empty(),
        "wildcard: {:?}",
        cds.resource_names
    );
    assert_eq!(
        (cds.version_info.as_str(), cds.response_nonce.as_str()),
        ("", "")
    );
    let rds = stream.next_request().await;
    assert_eq!(rds.type_url, ROUTE);
    assert!(
        rds.node.is_some(),
        "the first request of each type carries the node"
    );
    assert_eq!(rds.resource_names, ["r1"]);
    assert!(observed.next_connection().await);

    let body = cluster("web");
    stream.respond(sotw_response(
        CLUSTER,
        "v1",
        "n1",
        vec![body.clone(), cluster("db")],
    ));
    let (type_url, update) = observed.next_update().await;
    assert_eq!(type_url, CLUSTER);
    let Update::State {
        version_info,
        resources,
    } = update
    else {
        panic!("expected state of the world");
    };
    assert_eq!(version_info, "v1");
    assert_eq!(resources.len(), 2);
    assert_eq!(
        (resources[0].name.as_str(), resources[0].version.as_str()),
        ("web", "v1")
    );
    assert_eq!(resources[0].body, body);
    assert_eq!(resources[1].name, "db");

    let ack = stream.next_request().await;
    assert_eq!(ack.type_url, CLUSTER);
    assert_eq!(ack.version_info, "v1");
    assert_eq!(ack.response_nonce, "n1");
    assert!(ack.error_detail.is_none());
    assert!(ack.node.is_none());

    let snapshot = status.snapshot();
    assert_eq!(snapshot.len(), 2);
    assert_eq!(snapshot[0].type_url, CLUSTER);
    assert_eq!(snapshot[0].version, "v1");
    assert_eq!(snapshot[0].nonce, "n1");
    assert!(snapshot[0].last_update.is_some());
    assert_eq!(snapshot[1].version, "");
}

#[tokio::test]
async fn sotw_nack_names_the_resource_and_keeps_the_old_version() {
    let mut server = FakeServer::start().await;
    let (handler, mut observed) = recorder(|_, update| {
        if state_names(update).iter().any(|n| n == "bad") {
            Err(vec![ResourceError {
                name: "bad".into(),
                reason: "unknown load-balancing policy".into(),
            }])
        } else {
            Ok(())
        }
    });
    let client = XdsClient::new(config(server.addr, Protocol::StateOfTheWorld), handler);
    let status = client.status();
    let (subs, _task) = spawn(client);
    subs.set(CLUSTER, vec![]);

    let mut stream = server.next_sotw().await;
    stream.next_request().await;
    stream.respond(sotw_response(CLUSTER, "v1", "n1", vec![cluster("good")]));
    let ack = stream.next_request().await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "n1")
    );

    stream.respond(sotw_response(
        CLUSTER,
        "v2",
        "n2",
        vec![cluster("good"), cluster("bad")],
    ));
    let (_, update) = observed.next_update().await;
    assert_eq!(state_names(&update), ["good"]);
    let (_, update) = observed.next_update().await;
    assert_eq!(state_names(&update), ["good", "bad"]);
    let nack = stream.next_request().await;
    assert_eq!(
        nack.version_info, "v1",
        "a NACK carries the last accepted version"
    );
    assert_eq!(nack.response_nonce, "n2");
    let detail = nack.error_detail.expect("a NACK has an error_detail");
    assert_eq!(detail.code, 3);
    assert!(
        detail
            .message
            .contains("bad: unknown load-balancing policy"),
        "{}",
        detail.message
    );
    let snapshot = &status.snapshot()[0];
    assert_eq!(snapshot.version, "v1");
    assert!(snapshot
        .last_nack
        .as_deref()
        .is_some_and(|m| m.contains("bad")));

    // A subscription change is a new request with the accepted version and
    // the last nonce.
    subs.set(CLUSTER, vec!["good".into()]);
    let change = stream.next_request().await;
    assert_eq!(change.resource_names, ["good"]);
    assert_eq!(change.version_info, "v1");
    assert_eq!(change.response_nonce, "n2");
    assert!(change.error_detail.is_none());

    // A body of the wrong type never reaches the handler and is NACKed.
    stream.respond(sotw_response(CLUSTER, "v3", "n3", vec![listener("l1")]));
    let nack = stream.next_request().await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "n3")
    );
    let message = nack.error_detail.expect("NACK").message;
    assert!(message.starts_with("l1: "), "{message}");
    stream.respond(sotw_response(CLUSTER, "v4", "n4", vec![cluster("good")]));
    let (_, update) = observed.next_update().await;
    assert_eq!(
        state_names(&update),
        ["good"],
        "v3 never reached the handler"
    );
    let ack = stream.next_request().await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v4", "n4")
    );
    assert_eq!(status.snapshot()[0].last_nack, None);
}

#[tokio::test]
async fn handler_subscribes_from_inside_on_update() {
    let mut server = FakeServer::start().await;
    let cell: Cell<postern_xds::Subscriptions> = Arc::default();
    let subs_for_handler = cell.clone();
    let (handler, _observed) = recorder(move |type_url, update| {
        if type_url == LISTENER {
            // Each listener names its route configuration "<listener>-routes".
            let routes = state_names(update)
                .into_iter()
                .map(|l| format!("{l}-routes"))
                .collect();
            let guard = subs_for_handler.lock().unwrap();
            guard.as_ref().unwrap().set(ROUTE, routes);
        }
        Ok(())
    });
    let client = XdsClient::new(config(server.addr, Protocol::StateOfTheWorld), handler);
    *cell.lock().unwrap() = Some(client.subscriptions());
    client.subscriptions().set(LISTENER, vec![]);
    let (_subs, _task) = spawn(client);

    let mut stream = server.next_sotw().await;
    assert_eq!(stream.next_request().await.type_url, LISTENER);
    stream.respond(sotw_response(
        LISTENER,
        "1",
        "a",
        vec![listener("http"), listener("grpc")],
    ));
    let ack = stream.next_request().await;
    assert_eq!(
        (ack.type_url.as_str(), ack.version_info.as_str()),
        (LISTENER, "1")
    );
    let rds = stream.next_request().await;
    assert_eq!(rds.type_url, ROUTE);
    assert_eq!(rds.resource_names, ["grpc-routes", "http-routes"]);
    assert!(rds.node.is_some());
    stream.respond(sotw_response(
        ROUTE,
        "7",
        "b",
        vec![route("grpc-routes"), route("http-routes")],
    ));
    let ack = stream.next_request().await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (ROUTE, "b")
    );
}

#[tokio::test]
async fn sotw_reconnect_resubscribes_with_the_last_version() {
    let mut server = FakeServer::start().await;
    let (handler, mut observed) = recorder(accept_all);
    let client = XdsClient::new(config(server.addr, Protocol::StateOfTheWorld), handler);
    let (subs, _task) = spawn(client);
    subs.set(CLUSTER, vec![]);
    subs.set(ENDPOINT, vec!["web".into()]);

    let mut stream = server.next_sotw().await;
    stream.next_request().await;
    stream.next_request().await;
    assert!(observed.next_connection().await);
    stream.respond(sotw_response(CLUSTER, "c1", "n1", vec![cluster("web")]));
    stream.next_request().await;
    stream.respond(sotw_response(ENDPOINT, "e7", "n2", vec![endpoints("web")]));
    let ack = stream.next_request().await;
    assert_eq!(ack.version_info, "e7");

    let addr = server.stop().await;
    assert!(!observed.next_connection().await);
    let mut server = FakeServer::start_on(addr, None).await;
    let mut stream = server.next_sotw().await;
    let cds = stream.next_request().await;
    assert_eq!(cds.type_url, CLUSTER);
    assert_eq!(cds.version_info, "c1");
    assert!(cds.resource_names.is_empty());
    assert_eq!(cds.response_nonce, "", "nonces belong to the old stream");
    assert!(cds.node.is_some());
    let eds = stream.next_request().await;
    assert_eq!(eds.type_url, ENDPOINT);
    assert_eq!(eds.version_info, "e7");
    assert_eq!(eds.resource_names, ["web"]);
    assert!(eds.node.is_some());
    assert!(observed.next_connection().await);
}

#[tokio::test]
async fn delta_updates_nacks_and_reconnects_with_initial_versions() {
    let mut server = FakeServer::start().await;
    let (handler, mut observed) = recorder(|_, update| match update {
        Update::Delta { added, .. } if added.iter().any(|r| r.name == "bad") => {
            Err(vec![ResourceError {
                name: "bad".into(),
                reason: "no endpoints".into(),
            }])
        }
        _ => Ok(()),
    });
    let client = XdsClient::new(config(server.addr, Protocol::Delta), handler);
    let status = client.status();
    let (subs, _task) = spawn(client);
    subs.set(CLUSTER, vec![]);

    let mut stream = server.next_delta().await;
    let first = stream.next_request().await;
    assert_eq!(first.type_url, CLUSTER);
    assert_eq!(
        first.node.as_ref().map(|n| n.id.as_str()),
        Some(node().id.as_str())
    );
    assert!(first.resource_names_subscribe.is_empty(), "wildcard");
    assert!(first.initial_resource_versions.is_empty());

    let web = cluster("web");
    stream.respond(delta_response(
        CLUSTER,
        "s1",
        "d1",
        vec![
            delta_resource("web", "1", web.clone()),
            delta_resource("db", "1", cluster("db")),
        ],
        &[],
    ));
    let (type_url, update) = observed.next_update().await;
    assert_eq!(type_url, CLUSTER);
    let Update::Delta {
        system_version_info,
        added,
        removed,
    } = update
    else {
        panic!("expected a delta update");
    };
    assert_eq!(system_version_info, "s1");
    assert_eq!(added.len(), 2);
    assert_eq!(
        (added[0].name.as_str(), added[0].version.as_str()),
        ("web", "1")
    );
    assert_eq!(added[0].body, web);
    assert!(removed.is_empty());
    let ack = stream.next_request().await;
    assert_eq!(ack.response_nonce, "d1");
    assert!(ack.error_detail.is_none());
    assert!(ack.node.is_none());

    stream.respond(delta_response(
        CLUSTER,
        "s2",
        "d2",
        vec![delta_resource("web", "2", cluster("web"))],
        &["db"],
    ));
    let (_, update) = observed.next_update().await;
    let Update::Delta { added, removed, .. } = update else {
        panic!("expected a delta update");
    };
    assert_eq!(added[0].version, "2");
    assert_eq!(removed, ["db"]);
    assert_eq!(stream.next_request().await.response_nonce, "d2");

    stream.respond(delta_response(
        CLUSTER,
        "s3",
        "d3",
        vec![delta_resource("bad", "1", cluster("bad"))],
        &["web"],
    ));
    observed.next_update().await;
    let nack = stream.next_request().await;
    assert_eq!(nack.response_nonce, "d3");
    let detail = nack.error_detail.expect("a NACK has an error_detail");
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("bad: no endpoints"),
        "{}",
        detail.message
    );
    assert_eq!(status.snapshot()[0].version, "s2");

    subs.set(ENDPOINT, vec!["web".into()]);
    let eds = stream.next_request().await;
    assert_eq!(eds.type_url, ENDPOINT);
    assert_eq!(eds.resource_names_subscribe, ["web"]);
    assert!(eds.node.is_some());
    assert_eq!(eds.response_nonce, "", "a subscription change is no ACK");
    stream.respond(delta_response(
        ENDPOINT,
        "e1",
        "d4",
        vec![delta_resource("web", "9", endpoints("web"))],
        &[],
    ));
    observed.next_update().await;
    assert_eq!(stream.next_request().await.response_nonce, "d4");

    let addr = server.stop().await;
    let mut server = FakeServer::start_on(addr, None).await;
    let mut stream = server.next_delta().await;
    let cds = stream.next_request().await;
    assert_eq!(cds.type_url, CLUSTER);
    assert!(cds.node.is_some());
    assert!(cds.resource_names_subscribe.is_empty());
    // The NACKed removal of "web" and addition of "bad" left no trace.
    assert_eq!(
        cds.initial_resource_versions,
        HashMap::from([("web".to_owned(), "2".to_owned())])
    );
    let eds = stream.next_request().await;
    assert_eq!(eds.type_url, ENDPOINT);
    assert_eq!(eds.resource_names_subscribe, ["web"]);
    assert_eq!(
        eds.initial_resource_versions,
        HashMap::from([("web".to_owned(), "9".to_owned())])
    );
}

#[tokio::test]
async fn delta_subscription_changes_send_diffs() {
    let mut server = FakeServer::start().await;
    let (handler, _observed) = recorder(accept_all);
    let client = XdsClient::new(config(server.addr, Protocol::Delta), handler);
    let (subs, _task) = spawn(client);
    subs.set(ROUTE, vec!["a".into(), "b".into()]);

    let mut stream = server.next_delta().await;
    let first = stream.next_request().await;
    assert_eq!(first.resource_names_subscribe, ["a", "b"]);
    subs.set(ROUTE, vec!["b".into(), "c".into()]);
    let change = stream.next_request().await;
    assert_eq!(change.resource_names_subscribe, ["c"]);
    assert_eq!(change.resource_names_unsubscribe, ["a"]);
    assert!(change.node.is_none());
    subs.remove(ROUTE);
    let gone = stream.next_request().await;
    assert!(gone.resource_names_subscribe.is_empty());
    assert_eq!(gone.resource_names_unsubscribe, ["b", "c"]);
}

#[tokio::test]
async fn mtls_to_the_control_plane() {
    let pki = TestPki::new();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &pki.server_cert,
            &pki.server_key,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&pki.ca));
    let mut server = FakeServer::start_on("127.0.0.1:0".parse().unwrap(), Some(tls)).await;
    let mut config = config(server.addr, Protocol::StateOfTheWorld);
    config.address = format!("https://{}", server.addr);
    config.tls = Some(postern_xds::TlsSettings {
        ca_pem: pki.ca.clone().into_bytes(),
        identity: Some((
            pki.client_cert.clone().into_bytes(),
            pki.client_key.clone().into_bytes(),
        )),
        domain: Some("xds.test".into()),
    });
    config.validate().unwrap();
    let (handler, mut observed) = recorder(accept_all);
    let client = XdsClient::new(config, handler);
    let (subs, _task) = spawn(client);
    subs.set(CLUSTER, vec![]);

    let mut stream = server.next_sotw().await;
    assert_eq!(stream.next_request().await.type_url, CLUSTER);
    stream.respond(sotw_response(CLUSTER, "v1", "n1", vec![cluster("web")]));
    observed.next_update().await;
    assert_eq!(stream.next_request().await.version_info, "v1");
}

#[test]
fn config_validation() {
    let addr = "127.0.0.1:1".parse().unwrap();
    let mut config = config(addr, Protocol::StateOfTheWorld);
    config.validate().unwrap();
    config.address = "https://127.0.0.1:1".into();
    assert!(matches!(
        config.validate(),
        Err(postern_xds::XdsError::HttpsWithoutTls(_))
    ));
    config.address = "http://127.0.0.1:1".into();
    config.tls = Some(postern_xds::TlsSettings::default());
    assert!(matches!(
        config.validate(),
        Err(postern_xds::XdsError::TlsWithoutHttps(_))
    ));
    config.tls = None;
    config.address = "not a uri".into();
    assert!(matches!(
        config.validate(),
        Err(postern_xds::XdsError::Address { .. })
    ));
}

#[test]
fn run_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (handler, _observed) = recorder(accept_all);
    let client = XdsClient::new(
        config("127.0.0.1:1".parse().unwrap(), Protocol::Delta),
        handler,
    );
    let run = client.run();
    assert_send(&run);
}

#[test]
fn metrics_count_acks_nacks_and_reconnects() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use postern_xds::metric;

    let recorder_ = DebuggingRecorder::new();
    let snapshotter = recorder_.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder_, || {
        runtime.block_on(async {
            let mut server = FakeServer::start().await;
            let (handler, mut observed) = recorder(|_, update| {
                if state_names(update).is_empty() {
                    Err(vec![])
                } else {
                    Ok(())
                }
            });
            let client = XdsClient::new(config(server.addr, Protocol::StateOfTheWorld), handler);
            let (subs, _task) = spawn(client);
            subs.set(LISTENER, vec![]);
            let mut stream = server.next_sotw().await;
            stream.next_request().await;
            stream.respond(sotw_response(LISTENER, "1", "a", vec![listener("l")]));
            stream.next_request().await;
            stream.respond(sotw_response(LISTENER, "2", "b", vec![]));
            let nack = stream.next_request().await;
            assert_eq!(nack.error_detail.expect("NACK").message, "update rejected");
            assert!(observed.next_connection().await);

            let addr = server.stop().await;
            assert!(!observed.next_connection().await);
            let mut server = FakeServer::start_on(addr, None).await;
            server.next_sotw().await.next_request().await;
            assert!(observed.next_connection().await);
        });
    });

    let mut values: HashMap<String, f64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let value = match value {
            DebugValue::Counter(n) => n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(_) => continue,
        };
        values.insert(name, value);
    }
    let get = |name: &str| values.get(name).copied();
    assert_eq!(
        get(&format!(
            "{}{{result=ack,type=listener}}",
            metric::XDS_UPDATES_TOTAL
        )),
        Some(1.0)
    );
    assert_eq!(
        get(&format!(
            "{}{{result=nack,type=listener}}",
            metric::XDS_UPDATES_TOTAL
        )),
        Some(1.0)
    );
    assert!(get(&format!("{}{{}}", metric::XDS_RECONNECTS_TOTAL)).is_some_and(|n| n >= 1.0));
    assert_eq!(get(&format!("{}{{}}", metric::XDS_CONNECTED)), Some(1.0));
}

/// A CA with a server certificate for `xds.test` and a client certificate.
struct TestPki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl TestPki {
    fn new() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(params, ca_key);
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap().pem();
            (cert, key.serialize_pem())
        };
        let (server_cert, server_key) = leaf("xds.test", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf("sidecar.test", ExtendedKeyUsagePurpose::ClientAuth);
        TestPki {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}
