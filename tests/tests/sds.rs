//! Mesh mTLS configured entirely from xDS: listener and cluster TLS
//! contexts that reference SDS secrets, the workload certificate and trust
//! bundle delivered as Secrets, rotated by pushing new ones, and a bad
//! secret NACKed while the installed identity keeps serving; and the same
//! contexts served by an identity from a CA, under Istio's secret names.

use std::net::SocketAddr;

use postern_control::ads::{AdsEventKind, Snapshot};
use postern_proto::type_url;
use postern_tests::control::{is_nack, wait_event, ControlPlane};
use postern_tests::envoy::{certificate_secret, http_listener, root_secret, static_cluster};
use postern_tests::mesh::{CaServer, TestCa};
use postern_tests::{eventually, get, start_proxy, wait_until, HttpBackend, Proxy};

const ID_A: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn bootstrap(cp: &ControlPlane, node: &str, id: &str) -> String {
    format!(
        r#"
node: {{ id: "{node}" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
identity:
  spiffe_id: {id}
  source: {{ sds: {{}} }}
"#,
        cp.url()
    )
}

fn secrets(snapshot: &mut Snapshot, ca: &TestCa, id: &str) -> String {
    let issued = ca.issue(id, -60, 3600);
    snapshot.add_message(
        "default",
        &certificate_secret(&issued.cert_pem, &issued.key_pem),
    );
    snapshot.add_message("ROOTCA", &root_secret(ca.root_pem()));
    issued.cert_pem
}

async fn ready(proxy: &Proxy) {
    wait_until("ready", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_get_mtls_and_certificates_from_xds() {
    let ca = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;

    // Sidecar B: inbound mTLS that admits only A, in front of the app.
    let mut b_snapshot = Snapshot::new("1");
    b_snapshot.add_message(
        "b-in",
        &http_listener("b-in", any_port(), "app", Some(&[ID_A])),
    );
    b_snapshot.add_message("app", &static_cluster("app", app.addr(), None));
    secrets(&mut b_snapshot, &ca, ID_B);
    let b_cp = ControlPlane::start(b_snapshot.clone()).await;
    let b = start_proxy(&bootstrap(&b_cp, "b", ID_B)).await;
    ready(&b).await;
    let b_addr = b.listener_addr("b-in").expect("b-in bound");

    // Sidecar A: plaintext outbound, mesh mTLS to B that requires B's ID.
    let mut a_snapshot = Snapshot::new("1");
    a_snapshot.add_message("a-out", &http_listener("a-out", any_port(), "b", None));
    a_snapshot.add_message("b", &static_cluster("b", b_addr, Some(&[ID_B])));
    secrets(&mut a_snapshot, &ca, ID_A);
    let a_cp = ControlPlane::start(a_snapshot).await;
    let a = start_proxy(&bootstrap(&a_cp, "a", ID_A)).await;
    ready(&a).await;
    let a_addr = a.listener_addr("a-out").expect("a-out bound");

    let response = get(a_addr, "api", "/items").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        Some(format!("By={ID_B};URI={ID_A}").as_str())
    );
    let certs: serde_json::Value =
        serde_json::from_str(&get(a.admin_addr(), "localhost", "/certs").await.text())
            .expect("certs json");
    assert_eq!(certs["identity"]["certificate"]["source"], "sds");

    // Rotation by SDS: B gets a new certificate; new handshakes use it and
    // traffic goes on.
    let b_id = b.identity().expect("identity").clone();
    let first = b_id.current().expect("installed").info.serial.clone();
    let mut rotated = b_snapshot;
    rotated.version = "2".into();
    secrets(&mut rotated, &ca, ID_B);
    b_cp.server.set_snapshot(rotated);
    wait_until("B's certificate rotated", || async {
        b_id.current().is_some_and(|c| c.info.serial != first)
    })
    .await;
    eventually("traffic after rotation", || async {
        (get(a_addr, "api", "/after").await.status == 200).then_some(())
    })
    .await;

    // A bad secret is NACKed and the installed identity stays.
    let serial = b_id.current().expect("installed").info.serial.clone();
    let mut events = b_cp.server.events();
    let mut bad = Snapshot::new("3");
    for (kind, name, body) in [type_url::LISTENER, type_url::CLUSTER]
        .into_iter()
        .flat_map(|t| {
            b_cp.server
                .snapshot()
                .of_type(t)
                .map(|(n, b)| (t, n.to_string(), b.clone()))
                .collect::<Vec<_>>()
        })
    {
        bad.add(kind, &name, body);
    }
    bad.add_message("default", &certificate_secret("not a pem", "nor this"));
    bad.add_message("ROOTCA", &root_secret(ca.root_pem()));
    b_cp.server.set_snapshot(bad);
    let nack = wait_event(&mut events, "secret NACK", |e| is_nack(e, type_url::SECRET)).await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("default") && error.contains("certificate_chain"),
        "{error}"
    );
    assert_eq!(b_id.current().expect("installed").info.serial, serial);
    assert_eq!(get(a_addr, "api", "/still").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_contexts_naming_other_secrets_are_nacked() {
    let ca = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;
    let mut snapshot = Snapshot::new("1");
    let mut cluster = static_cluster("app", app.addr(), Some(&[ID_B]));
    // Point the cluster's certificate at a secret that is not the identity.
    if let Some(socket) = cluster.transport_socket.as_mut() {
        if let Some(
            postern_proto::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any),
        ) = socket.config_type.as_mut()
        {
            any.value = String::from_utf8_lossy(&any.value)
                .replace("default", "other")
                .into_bytes();
        }
    }
    snapshot.add_message("app", &cluster);
    secrets(&mut snapshot, &ca, ID_A);
    let cp = ControlPlane::start(snapshot).await;
    let mut events = cp.server.events();
    let _proxy = start_proxy(&bootstrap(&cp, "a", ID_A)).await;
    let nack = wait_event(&mut events, "cluster NACK", |e| {
        is_nack(e, type_url::CLUSTER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("tls_certificate_sds_secret_configs"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_contexts_use_a_ca_identity_under_istios_secret_names() {
    let ca = CaServer::start(
        "cluster.local",
        std::time::Duration::from_secs(3600),
        &[ID_A, ID_B],
    )
    .await;
    let bootstrap = |cp: &ControlPlane, node: &str, id: &str, token: usize| {
        format!(
            r#"
node: {{ id: "{node}" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
identity:
  spiffe_id: {id}
  source:
    istio_ca: {{ address: "{}", token_file: "{}", trust_bundle: "{}" }}
"#,
            cp.url(),
            ca.address,
            ca.token_files[token].display(),
            ca.root_file.display(),
        )
    };
    let app = HttpBackend::start("app").await;

    // The TLS contexts name `default` and `ROOTCA`, and no Secret is served.
    let mut b_snapshot = Snapshot::new("1");
    b_snapshot.add_message(
        "b-in",
        &http_listener("b-in", any_port(), "app", Some(&[ID_A])),
    );
    b_snapshot.add_message("app", &static_cluster("app", app.addr(), None));
    let b_cp = ControlPlane::start(b_snapshot).await;
    let b = start_proxy(&bootstrap(&b_cp, "b", ID_B, 1)).await;
    ready(&b).await;
    let b_addr = b.listener_addr("b-in").expect("b-in bound");

    let mut a_snapshot = Snapshot::new("1");
    a_snapshot.add_message("a-out", &http_listener("a-out", any_port(), "b", None));
    a_snapshot.add_message("b", &static_cluster("b", b_addr, Some(&[ID_B])));
    let a_cp = ControlPlane::start(a_snapshot).await;
    let a = start_proxy(&bootstrap(&a_cp, "a", ID_A, 0)).await;
    ready(&a).await;
    let a_addr = a.listener_addr("a-out").expect("a-out bound");

    let response = get(a_addr, "api", "/items").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        Some(format!("By={ID_B};URI={ID_A}").as_str())
    );
}
