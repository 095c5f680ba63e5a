//! The injection webhook over real HTTPS: a client that verifies the
//! serving certificate the way the API server does (against the CA, for the
//! Service's DNS name) posts `admission.k8s.io/v1` AdmissionReviews, and the
//! JSONPatch it gets back, applied to the pod, gives the same pod as
//! `postern inject`, and one that passes the Kubernetes schema. A rotated
//! certificate is served without a restart.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use postern::sidecar::inject::{inject_pod, InjectOptions, Outcome};
use postern::sidecar::webhook::{WebhookArgs, WebhookServer};
use postern_tests::mesh::TestCa;
use postern_tests::within;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const SERVICE_NAME: &str = "postern-webhook.postern-system.svc";

/// What the API server sends for a pod a ReplicaSet creates: no name yet,
/// owner references, service account token volume already added.
fn review(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "6b3b6a9e-0d0b-4f3c-9a55-4d7c1e0f0a11",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

fn web_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9c8b6f5-",
            "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9c8b6f5"},
            "annotations": {"postern.dev/exclude-outbound-ports": "5432"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c8b6f5",
                "uid": "2f0e7c1a-8d8e-4b8e-9c59-1b7c0a6f4d21",
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "registry.example.com/shop/web:1.4.2",
                "ports": [
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                    {"name": "grpc", "containerPort": 9090, "protocol": "TCP"}
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                    "periodSeconds": 5, "timeoutSeconds": 2, "successThreshold": 1, "failureThreshold": 3
                },
                "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 10},
                "startupProbe": {"grpc": {"port": 9090}, "failureThreshold": 30},
                "volumeMounts": [{
                    "name": "kube-api-access-abcde",
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "readOnly": true
                }]
            }],
            "volumes": [{
                "name": "kube-api-access-abcde",
                "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}
            }],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst"
        }
    })
}

/// Applies an RFC 6902 patch of `add` and `replace` operations on object
/// members: all the webhook emits.
fn apply_patch(target: &mut Value, patch: &Value) {
    for op in patch.as_array().expect("patch is a list") {
        let kind = op["op"].as_str().expect("op");
        assert!(kind == "add" || kind == "replace", "unexpected op {op}");
        let path = op["path"].as_str().expect("path");
        let keys: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|k| k.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = keys.split_last().expect("non-empty path");
        let mut node = &mut *target;
        for key in parents {
            node = node
                .get_mut(key)
                .unwrap_or_else(|| panic!("{path}: no {key}"));
        }
        let object = node.as_object_mut().expect("parent is an object");
        if kind == "replace" {
            assert!(object.contains_key(last), "replace of a missing {path}");
        }
        object.insert(last.clone(), op["value"].clone());
    }
}

struct Files {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn write_server_cert(dir: &Path, ca: &TestCa) -> Files {
    let issued = ca.issue_server(&[SERVICE_NAME]);
    let files = Files {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::fs::write(&files.cert, &issued.cert_pem).unwrap();
    std::fs::write(&files.key, &issued.key_pem).unwrap();
    files
}

/// A client that trusts only `ca` and checks the Service's DNS name.
fn client_for(ca: &TestCa) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.root_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// POSTs `body` to `path` over HTTPS; returns the status and body.
async fn post(
    connector: &TlsConnector,
    addr: SocketAddr,
    path: &str,
    body: String,
) -> std::io::Result<(u16, Bytes)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from(SERVICE_NAME).unwrap(), tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let request = http::Request::post(path)
        .header("host", SERVICE_NAME)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, body))
}

async fn admit(connector: &TlsConnector, addr: SocketAddr, uid: &str, pod: &Value) -> Value {
    let (status, body) = post(connector, addr, "/inject", review(uid, pod).to_string())
        .await
        .expect("webhook answers over HTTPS");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], uid);
    answer["response"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_patches_pods_like_the_cli_and_serves_a_rotated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("webhook ca");
    let files = write_server_cert(dir.path(), &ca);
    let server = WebhookServer::bind(&WebhookArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: files.cert.clone(),
        key: files.key.clone(),
        options: InjectOptions::default(),
    })
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    let client = client_for(&ca);

    // A pod gets a patch; applied, it is the pod the CLI would write.
    let pod = web_pod();
    let response = admit(&client, addr, "uid-1", &pod).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch);

    let mut expected: serde_yaml_ng::Value = serde_yaml_ng::to_value(&pod).unwrap();
    assert_eq!(
        inject_pod(&mut expected, &InjectOptions::default(), "Pod shop/web").unwrap(),
        Outcome::Injected
    );
    assert_eq!(patched, serde_json::to_value(&expected).unwrap());
    // What the API server would store must pass its schema, not just
    // match the CLI's output. It names the pod from `generateName` after
    // admission; the validator needs that name to report on the pod.
    let mut stored = patched.clone();
    stored["metadata"]["name"] = json!("web-7d9c8b6f5-x7k2p");
    postern_tests::kube::assert_valid(
        "webhook-patched-pod.yaml",
        &serde_yaml_ng::to_string(&stored).unwrap(),
    );
    let inits = patched["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits[0]["name"], "postern-init");
    assert_eq!(inits[1]["name"], "postern-proxy");
    assert_eq!(inits[1]["restartPolicy"], "Always");
    assert!(inits[0]["args"]
        .as_array()
        .unwrap()
        .windows(2)
        .any(|w| w[0] == "--exclude-outbound-ports" && w[1] == "5432"));

    // The app's probes reach the sidecar's status port; it has the originals.
    let web = &patched["spec"]["containers"][0];
    assert_eq!(
        web["readinessProbe"],
        json!({
            "httpGet": {"path": "/app-health/web/readyz", "port": 15020, "scheme": "HTTP"},
            "periodSeconds": 5, "timeoutSeconds": 2, "successThreshold": 1, "failureThreshold": 3
        })
    );
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/livez"
    );
    assert_eq!(
        web["startupProbe"]["httpGet"]["path"],
        "/app-health/web/startupz"
    );
    let probes = inits[1]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POSTERN_APP_PROBES")
        .and_then(|e| e["value"].as_str())
        .unwrap();
    let probes: Value = serde_json::from_str(probes).unwrap();
    assert_eq!(
        probes["/app-health/web/readyz"],
        json!({"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 2})
    );
    assert_eq!(
        probes["/app-health/web/startupz"],
        json!({"grpc": {"port": 9090}, "timeoutSeconds": 1})
    );

    // Admitting the patched pod again changes nothing.
    let response = admit(&client, addr, "uid-2", &patched).await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");

    // Opted out: allowed as it is. Bad annotation: refused with the reason.
    let mut opted_out = pod.clone();
    opted_out["metadata"]["annotations"]["postern.dev/inject"] = json!("false");
    let response = admit(&client, addr, "uid-3", &opted_out).await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    let mut bad = pod.clone();
    bad["metadata"]["annotations"]["postern.dev/exclude-outbound-cidrs"] = json!("10.0.0.0/99");
    let response = admit(&client, addr, "uid-4", &bad).await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("postern.dev/exclude-outbound-cidrs"),
        "{message}"
    );

    // Not a review: 400, with what is wrong.
    let (status, body) = post(&client, addr, "/inject", "{}".into()).await.unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("no request"));

    // Rotation: a certificate from another CA replaces the files; the next
    // handshake presents it.
    let next_ca = TestCa::new("next webhook ca");
    let rotated = write_server_cert(dir.path(), &next_ca);
    // Whatever the file system's timestamp granularity, the files changed.
    let later = SystemTime::now() + Duration::from_secs(2);
    for path in [&rotated.cert, &rotated.key] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    let response = admit(&client_for(&next_ca), addr, "uid-5", &pod).await;
    assert_eq!(response["allowed"], true);
    // A fresh client: the old one could resume its earlier TLS session.
    assert!(
        post(&client_for(&ca), addr, "/inject", "{}".into())
            .await
            .is_err(),
        "the old CA no longer verifies the served certificate"
    );

    stop.send(()).unwrap();
    within(Duration::from_secs(15), "webhook shutdown", serving)
        .await
        .unwrap();
}
