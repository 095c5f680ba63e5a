//! The demo's topology as text: the mesh description the control plane
//! serves, and each sidecar's bootstrap file. Both are written to the
//! demo's working directory so a user can read them, and the mesh file is
//! watched, so a saved change is pushed to the sidecars.
//!
//! Pure: addresses and paths in, YAML out.

use std::net::SocketAddr;
use std::path::Path;

/// The trust domain of the demo's CA.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The namespace every demo workload pretends to run in.
pub const NAMESPACE: &str = "demo";

/// One example workload: an app and its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// The sidecar's node id, also the workload name in metrics.
    pub node: &'static str,
    /// The `app` label, and the service account its identity names.
    pub app: &'static str,
    /// The `version` label.
    pub version: &'static str,
}

/// The frontend: its sidecar holds the edge listener.
pub const FRONTEND: Workload = Workload {
    node: "frontend",
    app: "frontend",
    version: "v1",
};
/// The two versions of the reviews service, each behind its own sidecar.
pub const REVIEWS: [Workload; 2] = [
    Workload {
        node: "reviews-v1",
        app: "reviews",
        version: "v1",
    },
    Workload {
        node: "reviews-v2",
        app: "reviews",
        version: "v2",
    },
];

impl Workload {
    /// The SPIFFE ID its sidecar is issued.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", self.app)
    }
}

/// Where everything listens.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The control plane's gRPC server: ADS, the CA and the ALS collector.
    pub control_plane: SocketAddr,
    /// The frontend sidecar's edge listener, where users send requests.
    pub edge: SocketAddr,
    /// The frontend app.
    pub frontend_app: SocketAddr,
    /// The frontend sidecar's admin server.
    pub frontend_admin: SocketAddr,
    /// The reviews apps, in [`REVIEWS`] order.
    pub reviews_apps: [SocketAddr; 2],
    /// The reviews sidecars' inbound (mTLS) listeners.
    pub reviews_inbound: [SocketAddr; 2],
    /// The reviews sidecars' admin servers.
    pub reviews_admin: [SocketAddr; 2],
}

/// The rate-limited route takes one call per this many seconds.
pub const TOP_LIMIT_SECONDS: u64 = 10;

/// The mesh the control plane serves.
pub fn mesh_yaml(at: &Addresses) -> String {
    let frontend_id = FRONTEND.spiffe_id();
    let reviews_id = REVIEWS[0].spiffe_id();
    let mut listeners = format!(
        r#"listeners:
  # The frontend sidecar's edge: send your requests here.
  - name: edge
    address: {edge}
    route: edge
    nodes: [{frontend}]
"#,
        edge = at.edge,
        frontend = FRONTEND.node,
    );
    let mut inbound_routes = String::new();
    let mut services = format!(
        r#"services:
  # The frontend app, next to its sidecar: plaintext on loopback.
  - name: frontend
    endpoints: [{{ address: {app} }}]
"#,
        app = at.frontend_app,
    );
    for (i, reviews) in REVIEWS.iter().enumerate() {
        let node = reviews.node;
        let comment = if i == 0 {
            "  # Each reviews sidecar's inbound listener: mTLS from the frontend's\n  # identity only, and /reviews/admin off limits to every caller.\n"
        } else {
            ""
        };
        listeners.push_str(&format!(
            r#"{comment}  - name: {node}-inbound
    address: {inbound}
    route: {node}-inbound
    nodes: [{node}]
    mtls: {{ allow: ["{frontend_id}"] }}
    rbac:
      action: deny
      policies:
        - {{ name: admin-off-limits, paths: [{{ prefix: /reviews/admin }}] }}
"#,
            inbound = at.reviews_inbound[i],
        ));
        inbound_routes.push_str(&format!(
            r#"  - name: {node}-inbound
    virtual_hosts:
      - name: {node}
        domains: ["*"]
        routes: [{{ name: {node}-app, prefix: /, cluster: {node}-app }}]
"#
        ));
        let comment = if i == 0 {
            "  # Each reviews version through its sidecar, over mTLS: the sidecar\n  # must present the reviews identity.\n"
        } else {
            ""
        };
        services.push_str(&format!(
            r#"{comment}  - name: {node}
    endpoints: [{{ address: {inbound} }}]
    tls: {{ identities: ["{reviews_id}"] }}
  - name: {node}-app
    endpoints: [{{ address: {app} }}]
"#,
            inbound = at.reviews_inbound[i],
            app = at.reviews_apps[i],
        ));
    }
    format!(
        r#"# The demo mesh: what `postern demo`'s control plane serves over ADS.
# Every listener, route and service below reaches the sidecars as an Envoy
# resource. Save a change while the demo runs and it is pushed within a
# second (try the weights); an invalid file is refused and the last good
# one stays.

{listeners}
routes:
  - name: edge
    virtual_hosts:
      - name: demo
        domains: ["*"]
        routes:
          # An expensive query: one call per {TOP_LIMIT_SECONDS}s, the next one gets 429.
          - name: reviews-top
            prefix: /reviews/top
            cluster: reviews-v1
            rate_limit: {{ max_tokens: 1, fill_interval: {TOP_LIMIT_SECONDS}s }}
          # Canary testers choose v2 with a header.
          - name: reviews-canary
            prefix: /reviews
            headers: [{{ name: x-canary, exact: "1" }}]
            cluster: reviews-v2
          # Everyone else: 80% v1, 20% v2.
          - name: reviews
            prefix: /reviews
            weighted:
              - {{ cluster: reviews-v1, weight: 80 }}
              - {{ cluster: reviews-v2, weight: 20 }}
            timeout: 5s
          - name: frontend
            prefix: /
            cluster: frontend
{inbound_routes}
{services}"#
    )
}

/// Where a sidecar's bootstrap points.
#[derive(Debug, Clone, Copy)]
pub struct BootstrapPaths<'a> {
    /// The file holding the sidecar's CA token.
    pub token: &'a Path,
    /// The CA's root, the sidecar's trust bundle.
    pub root: &'a Path,
}

/// A sidecar's bootstrap: who it is, where its control plane and CA are.
/// Everything it serves comes over xDS.
pub fn bootstrap_yaml(
    workload: &Workload,
    admin: SocketAddr,
    control_plane: SocketAddr,
    paths: BootstrapPaths<'_>,
) -> String {
    format!(
        r#"# Bootstrap of the {node} sidecar: its identity and its control plane.
# Listeners, routes, clusters, mTLS and policies come over xDS.
# `postern run --config <this file>` starts the same sidecar.
node: {{ id: {node} }}
admin: {{ address: {admin} }}
drain_timeout: 5s
xds: {{ address: "http://{control_plane}" }}
identity:
  spiffe_id: {id}
  source:
    istio_ca:
      address: "http://{control_plane}"
      token_file: {token:?}
      trust_bundle: {root:?}
telemetry:
  workload: {{ name: {node}, namespace: {NAMESPACE}, app: {app}, version: {version} }}
  access_log_service: {{ address: "http://{control_plane}", log_name: {node} }}
"#,
        node = workload.node,
        id = workload.spiffe_id(),
        app = workload.app,
        version = workload.version,
        token = paths.token,
        root = paths.root,
    )
}

#[cfg(test)]
mod tests {
    use postern_proto::type_url;

    use super::*;
    use crate::config::Config;

    fn addresses() -> Addresses {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Addresses {
            control_plane: at(15010),
            edge: at(10000),
            frontend_app: at(20000),
            frontend_admin: at(15000),
            reviews_apps: [at(20001), at(20002)],
            reviews_inbound: [at(20011), at(20012)],
            reviews_admin: [at(15001), at(15002)],
        }
    }

    #[test]
    fn the_mesh_is_valid_and_gives_each_sidecar_its_listeners() {
        let snapshot = postern_control::mesh::parse_mesh(&mesh_yaml(&addresses()), "1")
            .unwrap_or_else(|err| panic!("{err}: {:?}", std::error::Error::source(&err)));
        let listeners = |node: &str| {
            snapshot
                .for_node(node)
                .of_type(type_url::LISTENER)
                .map(|(name, _)| name.to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(listeners("frontend"), ["edge"]);
        assert_eq!(listeners("reviews-v1"), ["reviews-v1-inbound"]);
        assert_eq!(listeners("reviews-v2"), ["reviews-v2-inbound"]);
        let clusters: Vec<&str> = snapshot
            .of_type(type_url::CLUSTER)
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            clusters,
            [
                "frontend",
                "reviews-v1",
                "reviews-v1-app",
                "reviews-v2",
                "reviews-v2-app"
            ]
        );
    }

    #[test]
    fn bootstraps_are_valid_with_a_ca_identity_and_no_static_resources() {
        // Validation reads the trust bundle.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.pem");
        let ca = postern_control::ca::Ca::self_signed(TRUST_DOMAIN).unwrap();
        std::fs::write(&root, ca.root_pem()).unwrap();
        let token = dir.path().join("frontend.token");
        let at = addresses();
        for workload in [FRONTEND, REVIEWS[0], REVIEWS[1]] {
            let yaml = bootstrap_yaml(
                &workload,
                at.frontend_admin,
                at.control_plane,
                BootstrapPaths {
                    token: &token,
                    root: &root,
                },
            );
            let config = Config::from_yaml(&yaml).unwrap_or_else(|err| panic!("{yaml}\n{err}"));
            assert!(config.listeners.is_empty());
            assert!(config.clusters.is_empty());
            let identity = config.identity.expect("an identity");
            assert_eq!(identity.id.as_str(), workload.spiffe_id());
        }
    }
}
