//! The accept loop: each connection served by hyper, HTTP/1.1 or HTTP/2,
//! with buffers sized for many long-lived streams, and a graceful drain.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// The most a request head (request line and headers) may take: nginx's
/// default. It is also hyper's smallest read buffer: with a larger cap,
/// the first read after HTTP/2 detection's peek grows every connection's
/// buffer to 16 KB, which is most of an idle stream's memory.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// A client that sends no complete request head for this long is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts and serves connections until `shutdown` resolves; then stops
/// accepting and returns a future that resolves once every connection has
/// finished its requests in flight (idle keep-alive connections are closed
/// at once).
pub async fn accept_until(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> impl Future<Output = ()> {
    let builder = connection_builder();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    pause_after(&e).await;
                    continue;
                }
            },
        };
        // Stream events are small writes; without TCP_NODELAY, Nagle's
        // algorithm holds each one back until the client's delayed ACK
        // (about 40 ms on Linux).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(tcp), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown()
}

fn connection_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
}

/// An accept error from one client (it reset before we took it) is
/// nothing; running out of file descriptors or memory is logged, and the
/// loop waits a moment instead of spinning.
async fn pause_after(error: &io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %error, "could not accept a connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
