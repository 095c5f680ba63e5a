//! The gRPC `postern.test.echo.Echo` service as a test backend, and its
//! generated client.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// Code generated from `proto/echo.proto`.
pub mod pb {
    #![allow(
        missing_docs,
        unreachable_pub,
        rust_2018_idioms,
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used
    )]
    tonic::include_proto!("postern.test.echo");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// The echo service; it names itself `name` in every reply.
#[derive(Debug, Clone)]
pub struct EchoService {
    name: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = request.into_inner().message;
        if let Some(code) = message.strip_prefix("status:") {
            let code: i32 = code
                .parse()
                .map_err(|_| Status::invalid_argument("bad status"))?;
            return Err(Status::new(
                tonic::Code::from(code),
                "status requested by the test",
            ));
        }
        if let Some(ms) = message.strip_prefix("sleep:") {
            let ms: u64 = ms
                .parse()
                .map_err(|_| Status::invalid_argument("bad sleep"))?;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        Ok(Response::new(EchoReply {
            message,
            index: 0,
            backend: self.name.clone(),
        }))
    }

    type RepeatStream = ReplyStream;

    async fn repeat(&self, request: Request<EchoRequest>) -> Result<Response<ReplyStream>, Status> {
        let EchoRequest { message, repeat } = request.into_inner();
        let backend = self.name.clone();
        let replies = futures_util::stream::iter((0..repeat).map(move |index| {
            Ok(EchoReply {
                message: message.clone(),
                index,
                backend: backend.clone(),
            })
        }));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn collect(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut inbound = request.into_inner();
        let mut messages = Vec::new();
        while let Some(item) = inbound.next().await {
            messages.push(item?.message);
        }
        Ok(Response::new(EchoReply {
            index: u32::try_from(messages.len()).unwrap_or(u32::MAX),
            message: messages.join(","),
            backend: self.name.clone(),
        }))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let backend = self.name.clone();
        let replies = request.into_inner().enumerate().map(move |(index, item)| {
            item.map(|req| EchoReply {
                message: req.message,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                backend: backend.clone(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// A running gRPC echo backend (h2c); it stops when dropped.
#[derive(Debug)]
pub struct GrpcBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl GrpcBackend {
    /// Starts the echo service on `127.0.0.1:0`.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind grpc backend");
        let addr = listener.local_addr().expect("grpc backend addr");
        let service = EchoServer::new(EchoService {
            name: name.to_owned(),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        Self { addr, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC echo client for `http://{addr}` (e.g. a proxy listener).
///
/// # Errors
///
/// When the connection cannot be made.
pub async fn client(
    addr: SocketAddr,
) -> anyhow::Result<pb::echo_client::EchoClient<tonic::transport::Channel>> {
    Ok(pb::echo_client::EchoClient::connect(format!("http://{addr}")).await?)
}
