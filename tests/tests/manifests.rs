//! Every Kubernetes manifest in `deploy/`, and what `postern inject` makes
//! of it, validates against the Kubernetes API schemas (strict: unknown
//! fields are errors) with `kubernetes-validate` (see
//! `postern_tests::kube`), for the oldest Kubernetes Postern supports.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use postern::sidecar::inject::{inject_yaml, InjectOptions, Outcome};
use postern_tests::kube::assert_valid;

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "manifests in {}: {files:?}",
        dir.display()
    );
    files
}

#[test]
fn deploy_manifests_validate() {
    for file in manifests() {
        let yaml = std::fs::read_to_string(&file).expect("read manifest");
        assert_valid(&file.display().to_string(), &yaml);
    }
}

#[test]
fn injected_manifests_validate() {
    for file in manifests() {
        let yaml = std::fs::read_to_string(&file).expect("read manifest");
        let (injected, _) = inject_yaml(&yaml, &InjectOptions::default()).expect("inject");
        assert_valid(&format!("injected-{}", file.display()), &injected);
    }
}

/// Every annotation set at once, on every workload kind.
#[test]
fn every_annotation_and_kind_validates_once_injected() {
    let annotations = r#"
        postern.dev/opaque-ports: "3306,9000-9100"
        postern.dev/exclude-inbound-ports: "22"
        postern.dev/exclude-outbound-ports: "5432,6379"
        postern.dev/exclude-outbound-cidrs: "169.254.169.254/32,fd00::/8"
        postern.dev/proxy-cpu: "500m"
        postern.dev/proxy-memory: "256Mi"
        postern.dev/log-level: "info,postern=debug""#;
    let template = |indent: usize| {
        let pad = " ".repeat(indent);
        let annotations: String = annotations
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("{pad}    {}\n", l.trim()))
            .collect();
        format!(
            "{pad}metadata:\n{pad}  labels: {{ app: x }}\n{pad}  annotations:\n{annotations}\
             {pad}spec:\n{pad}  restartPolicy: OnFailure\n\
             {pad}  containers: [{{ name: app, image: app:1 }}]\n"
        )
    };
    let always = |t: String| t.replace("OnFailure", "Always");
    let input = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{ name: p, annotations: {{ postern.dev/log-level: debug }} }}\n\
         spec: {{ containers: [{{ name: app, image: app:1 }}] }}\n\
         ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: d }}\n\
         spec:\n  selector: {{ matchLabels: {{ app: x }} }}\n  template:\n{}\
         ---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{ name: s }}\n\
         spec:\n  serviceName: s\n  selector: {{ matchLabels: {{ app: x }} }}\n  template:\n{}\
         ---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{ name: ds }}\n\
         spec:\n  selector: {{ matchLabels: {{ app: x }} }}\n  template:\n{}\
         ---\napiVersion: batch/v1\nkind: Job\nmetadata: {{ name: j }}\nspec:\n  template:\n{}\
         ---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {{ name: c }}\n\
         spec:\n  schedule: \"0 * * * *\"\n  jobTemplate:\n    spec:\n      template:\n{}",
        always(template(4)),
        always(template(4)),
        always(template(4)),
        template(4),
        template(8),
    );
    assert_valid("kinds.yaml", &input);
    let (injected, reports) = inject_yaml(&input, &InjectOptions::default()).expect("inject");
    assert_eq!(reports.len(), 6);
    assert!(
        reports.iter().all(|r| r.outcome == Outcome::Injected),
        "{reports:?}"
    );
    assert_valid("kinds-injected.yaml", &injected);
}

/// Rewritten probes of every kind (named and numbered ports, HTTPS and
/// headers, a gRPC service, probes left alone) validate, with the
/// opt-out pod beside them.
#[test]
fn rewritten_app_probes_validate() {
    let pod = |name: &str, annotations: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations: {{ {annotations} }}
spec:
  containers:
    - name: web
      image: web:1
      ports:
        - {{ name: http, containerPort: 8080 }}
        - {{ name: grpc, containerPort: 9090 }}
      livenessProbe:
        httpGet:
          path: /live
          port: http
          scheme: HTTPS
          httpHeaders: [{{ name: Host, value: web.internal }}]
        periodSeconds: 7
        timeoutSeconds: 3
      readinessProbe:
        tcpSocket: {{ port: 8080 }}
        initialDelaySeconds: 2
      startupProbe:
        grpc: {{ port: 9090, service: shop.Web }}
        failureThreshold: 30
    - name: cache
      image: cache:1
      livenessProbe:
        exec: {{ command: [cache-check] }}
      readinessProbe:
        httpGet: {{ path: /ready, port: 6379, host: 10.0.0.9 }}
"#
        )
    };
    let input = format!(
        "{}---\n{}",
        pod("rewritten", ""),
        pod("kept", "postern.dev/rewrite-app-probes: \"false\"")
    );
    assert_valid("probes.yaml", &input);
    let (injected, reports) = inject_yaml(&input, &InjectOptions::default()).expect("inject");
    assert!(
        reports.iter().all(|r| r.outcome == Outcome::Injected),
        "{reports:?}"
    );
    assert!(
        injected.contains("path: /app-health/web/startupz"),
        "{injected}"
    );
    assert_valid("probes-injected.yaml", &injected);
}
