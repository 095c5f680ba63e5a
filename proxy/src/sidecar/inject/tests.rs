#![allow(clippy::unwrap_used)]

use super::*;

fn inject(input: &str) -> (String, Vec<Report>) {
    inject_yaml(input, &InjectOptions::default()).unwrap()
}

fn parse(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  x-unknown-top: { kept: true }
spec:
  replicas: 2
  selector: { matchLabels: { app: web } }
  template:
    metadata:
      labels: { app: web }
      annotations:
        postern.dev/exclude-inbound-ports: "22, 9000-9100"
        postern.dev/exclude-outbound-ports: 5432
        postern.dev/exclude-outbound-cidrs: "169.254.169.254/32,fd00::/8"
        postern.dev/opaque-ports: "3306"
        postern.dev/proxy-cpu: 250m
        postern.dev/proxy-memory: 128Mi
        postern.dev/log-level: debug
    spec:
      initContainers:
        - name: migrate
          image: migrate:1
      containers:
        - name: web
          image: web:1
          futureField: "0755"
      volumes:
        - name: data
          emptyDir: {}
"#;

#[test]
fn a_deployment_gets_both_init_containers_first() {
    let (out, reports) = inject(DEPLOYMENT);
    assert_eq!(
        reports,
        [Report {
            object: "Deployment shop/web".into(),
            outcome: Outcome::Injected
        }]
    );
    let doc = &parse(&out)[0];
    let pod = &doc["spec"]["template"];
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        ["data", STATE_VOLUME, TOKEN_VOLUME, XTABLES_LOCK_VOLUME]
    );
    // Unknown fields and quoted strings round-trip.
    assert_eq!(doc["metadata"]["x-unknown-top"]["kept"], Value::Bool(true));
    assert_eq!(
        pod["spec"]["containers"][0]["futureField"],
        Value::String("0755".into())
    );
    let status: serde_json::Value = serde_json::from_str(
        pod["metadata"]["annotations"][STATUS_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));

    let init = &pod["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "iptables",
            "--proxy-uid",
            "1337",
            "--proxy-gid",
            "1337",
            "--outbound-port",
            "15001",
            "--inbound-port",
            "15006",
            "--exclude-inbound-ports",
            "15020,22,9000-9100",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,fd00::/8",
        ]
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_yaml_ng::from_str::<Value>("[NET_ADMIN, NET_RAW]").unwrap()
    );

    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], Value::String("Always".into()));
    assert_eq!(proxy["securityContext"]["runAsUser"], Value::from(1337));
    assert_eq!(
        proxy["resources"]["limits"]["cpu"],
        Value::String("250m".into())
    );
    assert_eq!(
        proxy["resources"]["requests"]["memory"],
        Value::String("128Mi".into())
    );
    let env: Vec<(&str, Option<&str>)> = proxy["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e.get("value").and_then(Value::as_str),
            )
        })
        .collect();
    assert!(env.contains(&("RUST_LOG", Some("debug"))), "{env:?}");
    assert!(
        env.contains(&("POSTERN_OPAQUE_PORTS", Some("3306"))),
        "{env:?}"
    );
    assert!(
        env.contains(&(
            "POSTERN_XDS_ADDRESS",
            Some("http://postern-control.postern-system.svc:15010")
        )),
        "{env:?}"
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let (once, _) = inject(DEPLOYMENT);
    let (twice, reports) = inject(&once);
    assert_eq!(once, twice);
    assert_eq!(reports[0].outcome, Outcome::AlreadyInjected);
}

#[test]
fn every_workload_kind_and_pass_through() {
    let input = r#"
apiVersion: v1
kind: Service
metadata: { name: web }
spec: { ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Pod
metadata: { name: p }
spec: { containers: [{ name: a, image: a }] }
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: c, namespace: jobs }
spec:
  schedule: "* * * * *"
  jobTemplate:
    spec:
      template:
        spec: { restartPolicy: Never, containers: [{ name: a, image: a }] }
---
apiVersion: batch/v1
kind: Job
metadata: { name: j }
spec: { template: { spec: { restartPolicy: Never, containers: [{ name: a, image: a }] } } }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: s }
spec: { serviceName: s, selector: {}, template: { spec: { containers: [{ name: a, image: a }] } } }
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: d }
spec: { selector: {}, template: { spec: { hostNetwork: true, containers: [{ name: a, image: a }] } } }
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: { name: in-list }
    spec:
      selector: {}
      template:
        metadata: { annotations: { postern.dev/inject: "false" } }
        spec: { containers: [{ name: a, image: a }] }
---
apiVersion: example.com/v1
kind: Deployment
metadata: { name: not-apps }
spec: { template: { spec: {} } }
"#;
    let (out, reports) = inject(input);
    let outcomes: Vec<(&str, Outcome)> = reports
        .iter()
        .map(|r| (r.object.as_str(), r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("Pod p", Outcome::Injected),
            ("CronJob jobs/c", Outcome::Injected),
            ("Job j", Outcome::Injected),
            ("StatefulSet s", Outcome::Injected),
            ("DaemonSet d", Outcome::HostNetwork),
            ("Deployment in-list", Outcome::Disabled),
        ]
    );
    let docs = parse(&out);
    assert_eq!(docs.len(), 8);
    let input_docs = parse(input);
    for i in [0, 5, 6, 7] {
        assert_eq!(docs[i], input_docs[i], "document {i} passes through");
    }
    assert_eq!(
        names(&docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"]),
        [INIT_CONTAINER, PROXY_CONTAINER]
    );
}

#[test]
fn bad_annotations_name_the_workload_and_the_annotation() {
    for (annotation, value) in [
        ("postern.dev/exclude-inbound-ports", "ssh"),
        ("postern.dev/exclude-outbound-cidrs", "10.0.0.0/40"),
        ("postern.dev/proxy-cpu", "lots"),
        ("postern.dev/proxy-memory", "1.2.3Mi"),
        ("postern.dev/log-level", "debug; rm -rf /"),
        ("postern.dev/inject", "maybe"),
        ("postern.dev/opaque-ports", ""),
    ] {
        let input = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: web, namespace: shop }}\n\
             spec:\n  template:\n    metadata:\n      annotations: {{ {annotation}: {value:?} }}\n\
             \x20   spec: {{ containers: [{{ name: a, image: a }}] }}\n"
        );
        let err = inject_yaml(&input, &InjectOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("Deployment shop/web"), "{text}");
        assert!(text.contains(annotation), "{text}");
    }
}

#[test]
fn quantities_and_filters() {
    for ok in [
        "250m", "1", "0.5", "128Mi", "1Gi", "1e3", "1E-2", "2k", ".5",
    ] {
        assert!(check_quantity(ok).is_ok(), "{ok}");
    }
    for bad in ["", "m", "1.2.3", "12MB", "1e", "-1", "1 Gi", "."] {
        assert!(check_quantity(bad).is_err(), "{bad}");
    }
    assert!(check_log_filter("info,postern::http=trace").is_ok());
    assert!(check_log_filter("info postern").is_err());
}

#[test]
fn clashing_names_and_broken_shapes_are_refused() {
    let clash = DEPLOYMENT.replace("- name: migrate", "- name: postern-proxy");
    let err = inject_yaml(&clash, &InjectOptions::default()).unwrap_err();
    assert!(err.to_string().contains("postern-proxy"), "{err}");

    let err = inject_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n",
        &InjectOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("spec.template"), "{err}");

    let err = inject_yaml("a: [1\n", &InjectOptions::default()).unwrap_err();
    assert!(matches!(err, InjectError::Yaml { index: 1, .. }), "{err}");
}

#[test]
fn json_patch_adds_and_replaces_top_level_fields() {
    let before: Value = serde_yaml_ng::from_str(
        "metadata: {name: p, annotations: {a: b}}\nspec: {containers: [{name: a}], volumes: []}",
    )
    .unwrap();
    let mut after = before.clone();
    assert_eq!(
        inject_pod(&mut after, &InjectOptions::default(), "Pod p").unwrap(),
        Outcome::Injected
    );
    let patch = json_patch(&before, &after);
    let ops: Vec<String> = patch
        .as_array()
        .unwrap()
        .iter()
        .map(|op| {
            format!(
                "{} {}",
                op["op"].as_str().unwrap(),
                op["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            "replace /metadata/annotations",
            "replace /spec/volumes",
            "add /spec/initContainers"
        ]
    );
    assert_eq!(
        escape_pointer("postern.dev/status~x"),
        "postern.dev~1status~0x"
    );
    assert_eq!(json_patch(&after, &after), serde_json::json!([]));
}

/// `deploy/kubernetes/app-injected.yaml` is exactly what `postern inject`
/// makes of `app.yaml`, so the example cannot drift from the code.
#[test]
fn the_deploy_example_is_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let plain = std::fs::read_to_string(dir.join("app.yaml")).unwrap();
    let injected = std::fs::read_to_string(dir.join("app-injected.yaml")).unwrap();
    let (out, _) = inject(&plain);
    // The checked-in file starts with a comment saying how it was made.
    let body: String = injected
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        out, body,
        "regenerate with: postern inject -f deploy/kubernetes/app.yaml"
    );
}

const PROBED: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: shop
  namespace: shop
spec:
  containers:
    - name: web
      image: web:1
      ports:
        - { name: http, containerPort: 8080 }
        - { name: grpc, containerPort: 9090 }
      livenessProbe:
        httpGet:
          path: /live
          port: http
          scheme: HTTPS
          httpHeaders: [{ name: Host, value: web.internal }]
        periodSeconds: 7
        timeoutSeconds: 3
        failureThreshold: 4
      readinessProbe:
        tcpSocket: { port: "8080" }
        initialDelaySeconds: 2
      startupProbe:
        grpc: { port: 9090, service: shop.Web }
        successThreshold: 1
    - name: cache
      image: cache:1
      livenessProbe:
        exec: { command: [cache-check] }
      readinessProbe:
        httpGet: { path: /ready, port: 6379, host: 10.0.0.9 }
      startupProbe:
        httpGet: { port: 6380 }
"#;

fn proxy_env<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
    pod["spec"]["initContainers"][1]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

#[test]
fn app_probes_point_at_the_status_port_and_the_sidecar_keeps_the_originals() {
    let (out, _) = inject(PROBED);
    let pod = &parse(&out)[0];
    let web = &pod["spec"]["containers"][0];
    assert_eq!(
        web["livenessProbe"],
        yaml(
            "{periodSeconds: 7, timeoutSeconds: 3, failureThreshold: 4, \
             httpGet: {path: /app-health/web/livez, port: 15020, scheme: HTTP}}"
        )
    );
    assert_eq!(
        web["readinessProbe"],
        yaml("{initialDelaySeconds: 2, httpGet: {path: /app-health/web/readyz, port: 15020, scheme: HTTP}}")
    );
    assert_eq!(
        web["startupProbe"],
        yaml("{successThreshold: 1, httpGet: {path: /app-health/web/startupz, port: 15020, scheme: HTTP}}")
    );
    // exec probes and probes of another host are the kubelet's business.
    let cache = &pod["spec"]["containers"][1];
    let original = &parse(PROBED)[0]["spec"]["containers"][1];
    assert_eq!(cache["livenessProbe"], original["livenessProbe"]);
    assert_eq!(cache["readinessProbe"], original["readinessProbe"]);
    assert_eq!(
        cache["startupProbe"]["httpGet"],
        yaml("{path: /app-health/cache/startupz, port: 15020, scheme: HTTP}")
    );

    let probes: serde_json::Value =
        serde_json::from_str(proxy_env(pod, APP_PROBES_ENV).unwrap()).unwrap();
    assert_eq!(
        probes,
        serde_json::json!({
            "/app-health/web/livez": {
                "httpGet": {"path": "/live", "port": 8080, "scheme": "HTTPS",
                            "httpHeaders": [{"name": "Host", "value": "web.internal"}]},
                "timeoutSeconds": 3,
            },
            "/app-health/web/readyz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
            "/app-health/web/startupz": {
                "grpc": {"port": 9090, "service": "shop.Web"}, "timeoutSeconds": 1,
            },
            "/app-health/cache/startupz": {"httpGet": {"port": 6380}, "timeoutSeconds": 1},
        })
    );
    // What inject writes is what the sidecar reads.
    let parsed =
        crate::sidecar::app_probe::AppProbes::from_json(proxy_env(pod, APP_PROBES_ENV).unwrap())
            .unwrap();
    assert_eq!(parsed.paths().count(), 4);
    assert_eq!(
        proxy_env(pod, "POSTERN_STATUS_ADDRESS"),
        Some(STATUS_ADDRESS)
    );
    let ports = &pod["spec"]["initContainers"][1]["ports"];
    assert!(ports.as_sequence().unwrap().contains(&yaml(
        "{name: postern-status, containerPort: 15020, protocol: TCP}"
    )));
    // The kubelet's plaintext probes must not be captured.
    let args = &pod["spec"]["initContainers"][0]["args"];
    let args: Vec<&str> = args
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--exclude-inbound-ports")
        .unwrap();
    assert_eq!(args[at + 1], "15020");
}

#[test]
fn probe_rewrite_is_idempotent_and_can_be_turned_off() {
    let (once, _) = inject(PROBED);
    let (twice, reports) = inject(&once);
    assert_eq!(once, twice);
    assert_eq!(reports[0].outcome, Outcome::AlreadyInjected);

    // A pod whose probes were rewritten but whose sidecar was taken out
    // (status annotation and containers removed) is not rewritten twice.
    let mut pod = parse(&once).remove(0);
    let (spec, rewritten) = (pod["spec"].as_mapping_mut().unwrap(), pod_containers(&once));
    spec.remove("initContainers");
    spec.remove("volumes");
    pod["metadata"]
        .as_mapping_mut()
        .unwrap()
        .remove("annotations");
    let (again, _) = inject(&serde_yaml_ng::to_string(&pod).unwrap());
    let again = &parse(&again)[0];
    assert_eq!(again["spec"]["containers"], rewritten);
    assert_eq!(proxy_env(again, APP_PROBES_ENV), None);

    let off = PROBED.replace(
        "  namespace: shop\n",
        "  namespace: shop\n  annotations: { postern.dev/rewrite-app-probes: \"false\" }\n",
    );
    let (out, _) = inject(&off);
    let pod = &parse(&out)[0];
    assert_eq!(
        pod["spec"]["containers"],
        parse(PROBED)[0]["spec"]["containers"]
    );
    assert_eq!(proxy_env(pod, APP_PROBES_ENV), None);

    let bad = PROBED.replace(
        "  namespace: shop\n",
        "  namespace: shop\n  annotations: { postern.dev/rewrite-app-probes: \"no\" }\n",
    );
    let err = inject_yaml(&bad, &InjectOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Pod shop/shop: annotation postern.dev/rewrite-app-probes: \"no\" must be \"true\" or \"false\""
    );
}

fn pod_containers(text: &str) -> Value {
    parse(text)[0]["spec"]["containers"].clone()
}

#[test]
fn an_unknown_named_probe_port_is_refused() {
    let bad = PROBED.replace("port: http\n", "port: https\n");
    let err = inject_yaml(&bad, &InjectOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Pod shop/shop: container \"web\": livenessProbe: httpGet.port \"https\" is not the name of one of the container's ports"
    );
}
