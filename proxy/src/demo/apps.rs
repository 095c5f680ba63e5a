//! The demo's example apps: tiny HTTP servers on loopback that say who
//! they are, what they were asked, and which caller their sidecar let in.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The header every app answers with, naming itself.
pub const SERVED_BY: &str = "x-served-by";

/// Serves the app `name` on `listener` until the task is aborted.
pub fn spawn(name: &'static str, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of file descriptors or the like: the next accept may
                // work, and a demo app has nobody to report to.
                Err(_) => continue,
            };
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(reply(name, &request))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// Binds an app's port on loopback.
pub async fn bind() -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

fn reply<B>(name: &'static str, request: &Request<B>) -> Response<Full<Bytes>> {
    let mut body = format!("{name}: {} {}\n", request.method(), request.uri());
    // Its sidecar tells the app who called, once mTLS proved it.
    if let Some(caller) = request
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(caller)
    {
        body.push_str(&format!("  called by {caller} (mTLS)\n"));
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(SERVED_BY, HeaderValue::from_static(name));
    response
}

/// The client's URI SAN in an `x-forwarded-client-cert` value.
fn caller(xfcc: &str) -> Option<&str> {
    xfcc.split(';').find_map(|part| part.strip_prefix("URI="))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    async fn text(response: Response<Full<Bytes>>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn replies_name_the_app_and_the_verified_caller() {
        let request = Request::get("/reviews/1?x=1")
            .header(
                "x-forwarded-client-cert",
                "By=spiffe://td/ns/demo/sa/reviews;URI=spiffe://td/ns/demo/sa/frontend",
            )
            .body(())
            .unwrap();
        let response = reply("reviews-v2", &request);
        assert_eq!(response.headers()[SERVED_BY], "reviews-v2");
        assert_eq!(
            text(response).await,
            "reviews-v2: GET /reviews/1?x=1\n  called by spiffe://td/ns/demo/sa/frontend (mTLS)\n"
        );

        let plain = reply("frontend", &Request::get("/").body(()).unwrap());
        assert_eq!(text(plain).await, "frontend: GET /\n");
    }
}
