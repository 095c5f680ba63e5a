//! The HTTP front end of a listener, served over an in-memory stream: hyper
//! with the listener's builder, then `screen_request` and
//! `HttpProxy::handle`, as `http::server::serve_connection` runs them. What
//! is left out is only the socket and the connection's timers; the client
//! is an in-memory stream on a runtime with paused time.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{header, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use postern::http::headers::DownstreamPeer;
use postern::http::proxy::{HttpConfig, HttpProxy};
use postern::http::server::{builder, reject_head, screen_request};
use postern::listener::{ConnectionTracker, Shutdown};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// One fuzzed listener and what its connections share.
struct Front {
    proxy: Arc<HttpProxy>,
    builder: postern::http::server::ServerBuilder,
}

struct Fronts {
    runtime: Runtime,
    fronts: Vec<Front>,
    // Kept so the drain and force signals never fire.
    _signals: (watch::Sender<bool>, watch::Sender<bool>),
}

fn fronts() -> &'static Fronts {
    static FRONTS: OnceLock<Fronts> = OnceLock::new();
    FRONTS.get_or_init(|| {
        // Paused time: whatever waits on a timer (a body that never comes,
        // a route timeout) ends at once and the same way every run.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let (drain_tx, drain) = watch::channel(false);
        let (force_tx, force) = watch::channel(false);
        let fronts = runtime.block_on(async {
            let mut fronts = Vec::new();
            for yaml in [crate::GATEWAY_YAML, crate::FRONT_YAML] {
                let config = crate::offline_config(yaml);
                let clusters = Arc::new(
                    postern::cluster::ClusterManager::new(
                        &config.clusters,
                        &config.upstream_tls,
                        None,
                    )
                    .expect("clusters"),
                );
                let hub = postern::telemetry::TelemetryHub::from_config(
                    &config.source.telemetry,
                    None,
                    postern_xds::Node::default(),
                )
                .expect("telemetry");
                for listener in &config.listeners {
                    let postern::config::ListenerProtocol::Http(http) = &listener.protocol else {
                        continue;
                    };
                    let proxy = Arc::new(HttpProxy {
                        listener: listener.clone(),
                        trust_downstream: http.trust_downstream,
                        config: Arc::new(arc_swap_cell(HttpConfig::of(http))),
                        clusters: clusters.clone(),
                        telemetry: postern::telemetry::ListenerTelemetry::new(
                            hub.clone(),
                            listener,
                        ),
                        tracker: Arc::new(ConnectionTracker::default()),
                        shutdown: Shutdown {
                            listener: listener.name.clone(),
                            drain: drain.clone(),
                            force: force.clone(),
                        },
                        overload: postern::overload::Overload::new(&config.source.overload),
                    });
                    fronts.push(Front {
                        builder: builder(&listener.limits),
                        proxy,
                    });
                }
            }
            fronts
        });
        Fronts {
            runtime,
            fronts,
            _signals: (drain_tx, force_tx),
        }
    })
}

fn arc_swap_cell(config: HttpConfig) -> arc_swap::ArcSwap<HttpConfig> {
    arc_swap::ArcSwap::from_pointee(config)
}

/// Feeds `bytes` to every fuzzed listener as one client connection that
/// sends them, waits for every answer, then closes.
///
/// # Panics
///
/// When a request passes the head checks but breaks what they promise, or
/// the proxy answers 500 (an internal failure).
pub fn serve(bytes: &[u8]) {
    let fronts = fronts();
    fronts.runtime.block_on(async {
        for front in &fronts.fronts {
            serve_one(front, bytes).await;
        }
    });
}

async fn serve_one(front: &Front, bytes: &[u8]) {
    let io = ClientIo::new(bytes);
    let in_flight = io.in_flight.clone();
    let peer = Arc::new(DownstreamPeer::new(
        ([127, 0, 0, 1], 40000).into(),
        front.proxy.listener.address.port(),
        &postern::tls::PeerTls::default(),
        None,
    ));
    let proxy = front.proxy.clone();
    let service = service_fn(move |mut request: Request<Incoming>| {
        let proxy = proxy.clone();
        let peer = peer.clone();
        let _call = InFlight::begin(&in_flight);
        async move {
            let _call = _call;
            if let Err(rejected) = screen_request(&mut request, &proxy) {
                if crate::debug() {
                    eprintln!("{}: refused: {}", proxy.listener.name, rejected.reason);
                }
                return Ok::<_, Infallible>(reject_head(&request, rejected, &proxy));
            }
            check_screened(&request);
            let line = request_line(&request);
            let response = proxy.handle(peer, request).await;
            if crate::debug() {
                eprintln!("{}: {line} -> {}", proxy.listener.name, response.status());
            }
            assert_ne!(
                response.status(),
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "the request path failed internally"
            );
            Ok(response)
        }
    });
    let conn = front.builder.serve(io, service);
    // Time is paused: a connection still open after an hour of it is stuck
    // for good, which the real server's idle timeout would end.
    let _ = tokio::time::timeout(Duration::from_secs(3600), conn).await;
}

/// The client's side of the connection: it sends the input, and ends its
/// stream only once no request is being answered. Ending it at once would
/// have hyper cancel the request in flight (a client that half-closes is
/// gone), and most inputs would never reach the request path.
struct ClientIo {
    input: Vec<u8>,
    read: usize,
    yields: u8,
    in_flight: Arc<CallCount>,
}

#[derive(Default)]
struct CallCount {
    calls: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

impl ClientIo {
    fn new(input: &[u8]) -> ClientIo {
        ClientIo {
            input: input.to_vec(),
            read: 0,
            yields: 0,
            in_flight: Arc::default(),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.input.len() {
            let n = buf.remaining().min(this.input.len() - this.read);
            buf.put_slice(&this.input[this.read..this.read + n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        *this.in_flight.waker.lock().expect("waker lock") = Some(cx.waker().clone());
        if this.in_flight.calls.load(Ordering::SeqCst) > 0 {
            return Poll::Pending;
        }
        // HTTP/2 reads on past the frames it has not dispatched yet: give it
        // a turn to start their requests before the stream ends.
        if this.yields < 2 {
            this.yields += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One request being answered; the client's stream may end once none is.
struct InFlight(Arc<CallCount>);

impl InFlight {
    fn begin(count: &Arc<CallCount>) -> InFlight {
        count.calls.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(waker) = self.0.waker.lock().expect("waker lock").take() {
                waker.wake();
            }
        }
    }
}

fn request_line<B>(request: &Request<B>) -> String {
    if crate::debug() {
        format!(
            "{} {} {:?}",
            request.method(),
            request.uri(),
            request.version()
        )
    } else {
        String::new()
    }
}

/// What `screen_request` promises the request path (docs/security.md,
/// "What the request path refuses before routing").
fn check_screened<B>(request: &Request<B>) {
    let headers = request.headers();
    assert_ne!(request.method(), http::Method::CONNECT, "CONNECT passed");
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        assert!(
            first
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked"),
            "transfer-encoding {first:?} passed"
        );
        assert!(
            codings.next().is_none(),
            "several transfer-encodings passed"
        );
    }
    let hosts = headers.get_all(header::HOST).iter().count();
    assert!(hosts <= 1, "{hosts} host headers passed");
    if request.version() == Version::HTTP_11 {
        assert_eq!(hosts, 1, "an HTTP/1.1 request without host passed");
    }
    for name in headers.keys() {
        let name = name.as_str();
        assert!(
            !name.starts_with("x-postern-") || name == "x-postern-peer",
            "{name} passed"
        );
    }
    if let Some(authority) = request.uri().authority() {
        assert!(!authority.as_str().contains('@'), "userinfo passed");
    }
}
