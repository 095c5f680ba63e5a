//! `postern demo`: the proxy with in-process example backends, so a newcomer
//! can curl it at once without installing anything.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::app::Proxy;
use crate::config::Config;

/// Where the demo listens.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// The proxy's HTTP listener.
    pub listen: SocketAddr,
    /// The admin server.
    pub admin: SocketAddr,
}

/// Starts three example backends and a proxy routing to them; returns the
/// proxy and a text telling what to try.
pub async fn start(options: DemoOptions) -> anyhow::Result<(Proxy, String)> {
    let v1 = spawn_backend("hello-v1").await?;
    let v2 = spawn_backend("hello-v2").await?;
    let echo = spawn_backend("echo").await?;
    let yaml = demo_config(options, v1, v2, echo);
    let config =
        Config::from_yaml(&yaml).map_err(|e| anyhow::anyhow!("demo config is invalid: {e}"))?;
    let proxy = Proxy::start(config).await?;
    let http = proxy.listener_addr("demo").unwrap_or(options.listen);
    let admin = proxy.admin_addr();
    let help = format!(
        "Postern demo is running.\n\
         \n\
         Try:\n\
         \x20 curl -s http://{http}/hello            # 90% hello-v1, 10% hello-v2 (canary split)\n\
         \x20 curl -s -H 'x-canary: 1' http://{http}/hello   # always hello-v2 (header match)\n\
         \x20 curl -s http://{http}/echo/anything?x=1    # echo backend, path rewritten to /anything\n\
         \x20 curl -si http://{http}/old               # redirect to /hello\n\
         \x20 curl -s http://{http}/status             # direct response from the proxy\n\
         \x20 curl -s --http2-prior-knowledge http://{http}/hello   # HTTP/2 cleartext\n\
         \x20 curl -s http://{admin}/metrics | grep postern_http_requests_total\n\
         \x20 curl -s http://{admin}/config_dump\n\
         \n\
         Ctrl-C drains and stops.\n"
    );
    Ok((proxy, help))
}

fn demo_config(options: DemoOptions, v1: SocketAddr, v2: SocketAddr, echo: SocketAddr) -> String {
    format!(
        r#"
admin:
  address: {admin}
drain_timeout: 5s
listeners:
  - name: demo
    address: {listen}
    kind: http
    virtual_hosts:
      - name: demo
        domains: ["*"]
        routes:
          - name: hello-canary-pinned
            match: {{ path: {{ prefix: /hello }}, headers: [{{ name: x-canary, exact: "1" }}] }}
            cluster: hello-v2
          - name: hello
            match: {{ path: {{ prefix: /hello }} }}
            weighted_clusters:
              - {{ cluster: hello-v1, weight: 90 }}
              - {{ cluster: hello-v2, weight: 10 }}
            retry: {{ on: [connect-failure, reset, 5xx], max_attempts: 3 }}
            timeout: 5s
          - name: echo
            match: {{ path: {{ prefix: /echo/ }} }}
            cluster: echo
            rewrite: {{ prefix: / }}
          - name: old
            match: {{ path: {{ exact: /old }} }}
            redirect: {{ path: /hello, status: 302 }}
          - name: status
            match: {{ path: {{ exact: /status }} }}
            direct_response: {{ status: 200, body: "postern demo is up\n" }}
clusters:
  - name: hello-v1
    endpoints: [{{ address: {v1} }}]
  - name: hello-v2
    endpoints: [{{ address: {v2} }}]
  - name: echo
    lb: least_request
    endpoints: [{{ address: {echo} }}]
"#,
        admin = options.admin,
        listen = options.listen,
    )
}

async fn spawn_backend(name: &'static str) -> anyhow::Result<SocketAddr> {
    let socket = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    let (parts, body) = request.into_parts();
                    // Read the whole body, as a real service would, and report its size.
                    let received = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    let request = Request::from_parts(parts, ());
                    Ok::<_, Infallible>(backend_reply(name, &request, received))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn backend_reply(name: &str, request: &Request<()>, received: usize) -> Response<Full<Bytes>> {
    let body = if name == "echo" {
        let mut text = format!(
            "{} {} {:?}\n",
            request.method(),
            request.uri(),
            request.version()
        );
        for (key, value) in request.headers() {
            text.push_str(&format!(
                "{key}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        text.push_str(&format!("\n{received} body bytes received\n"));
        text
    } else {
        format!("hello from {name}\n")
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        "x-backend",
        http::HeaderValue::from_str(name).unwrap_or(http::HeaderValue::from_static("demo")),
    );
    response
}
