//! HTTP/2 connections, with prior knowledge, served by hyper.
//!
//! hyper drops a client that leaves a ping unanswered, but not one that
//! answers pings and never opens a stream's window: hyper polls a
//! stream's body only when the client can take more, so that stream's
//! body would hold its upstream connection, its deployment's load and its
//! budget reservation for as long as the connection lives. Each answer's
//! body is therefore [`Watched`]: once the client has taken nothing of it
//! for `send_timeout`, a watch lets it go, as a blocked HTTP/1.1 write
//! gives up on its connection. The stream itself is reset the next time
//! hyper polls it. When the shutdown grace period runs out, the watch
//! ends such a body at once, as an HTTP/1.1 connection whose writes wait
//! does: its stream ends as cut by the gateway, and is metered so, before
//! the ledger closes.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::front::Front;
use super::http1::{self, MAX_HEAD_BYTES};
use crate::boxed;
use crate::state::AppState;

/// What an HTTP/2 stream may hold written and not yet sent: a client that
/// advertises large windows and stops reading would otherwise have each
/// of its streams hold hyper's default, about 400 KB, beside the frame in
/// flight.
const SEND_BUFFER: usize = 16 * 1024;

/// Serves `tcp` until the client closes it, leaves a ping unanswered for
/// `send_timeout`, or `stop` turns true and its streams have finished.
pub async fn serve(tcp: TcpStream, front: Front, mut stop: watch::Receiver<bool>) {
    let send_timeout = front.waits().1;
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_send_buf_size(SEND_BUFFER)
        .keep_alive_interval(send_timeout)
        .keep_alive_timeout(send_timeout);
    let service = Guarded {
        app: front.app().clone(),
        front,
        send_timeout,
    };
    let mut connection = pin!(http2.serve_connection(TokioIo::new(tcp), service));
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = http1::stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The gateway's service, each answer's body watched.
#[derive(Clone)]
struct Guarded {
    front: Front,
    app: Arc<AppState>,
    send_timeout: Duration,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Watched>, Infallible>> + Send>>;

impl<B> Service<Request<B>> for Guarded
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Watched>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<B>) -> Answer {
        let answer = self.front.call(request);
        let (app, send_timeout) = (self.app.clone(), self.send_timeout);
        boxed::pinned(|| async move {
            let response = answer.await?;
            Ok(response.map(|body| Watched::new(body, app, send_timeout)))
        })
    }
}

/// An answer's body, let go of once its client has taken nothing of it
/// for `send_timeout`.
pub struct Watched {
    held: Arc<Mutex<Held>>,
    /// Says when the shutdown grace period runs out.
    app: Arc<AppState>,
    send_timeout: Duration,
    /// The watch, once a frame has been handed over with more to come.
    watch: Option<AbortHandle>,
}

struct Held {
    /// `None` once let go.
    body: Option<Body>,
    /// When the last poll handed over a frame, while hyper has not polled
    /// for the next: the client has had no room for more since.
    handed: Option<Instant>,
}

/// Why a stream is reset: its client took nothing for `send_timeout`.
#[derive(Debug)]
struct Stalled;

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client took none of the answer for the send timeout")
    }
}

impl std::error::Error for Stalled {}

impl Watched {
    fn new(body: Body, app: Arc<AppState>, send_timeout: Duration) -> Self {
        Self {
            held: Arc::new(Mutex::new(Held {
                body: Some(body),
                handed: None,
            })),
            app,
            send_timeout,
            watch: None,
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        lock(&self.held)
    }
}

fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let mut held = lock(&this.held);
        let Some(body) = held.body.as_mut() else {
            return Poll::Ready(Some(Err(axum::Error::new(Stalled))));
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let more = matches!(polled, Poll::Ready(Some(Ok(_)))) && !body.is_end_stream();
        held.handed = more.then(Instant::now);
        drop(held);
        if more && this.watch.is_none() {
            let watch = tokio::spawn(watch(
                Arc::downgrade(&this.held),
                this.send_timeout,
                this.app.clone(),
            ));
            this.watch = Some(watch.abort_handle());
        }
        polled
    }

    /// A body let go of is not at its end: hyper polls it, and resets the
    /// stream, rather than ending it as if the answer were whole.
    fn is_end_stream(&self) -> bool {
        self.held().body.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.held()
            .body
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.abort();
        }
    }
}

/// Lets go of the body once a frame handed over has waited
/// `send_timeout` for hyper to poll again, or at once when the shutdown
/// grace period has run out.
async fn watch(held: Weak<Mutex<Held>>, send_timeout: Duration, app: Arc<AppState>) {
    let grace_over = app.grace_over();
    let mut ended = app.streams_ended();
    drop(app);
    let mut grace_over = pin!(grace_over);
    let mut wake = Instant::now() + send_timeout;
    loop {
        if ended {
            tokio::time::sleep(AFTER_GRACE).await;
        } else {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = grace_over.as_mut() => ended = true,
            }
        }
        let Some(held) = held.upgrade() else { return };
        let body = {
            let mut held = lock(&held);
            match held.handed {
                Some(at) if ended || at.elapsed() >= send_timeout => held.body.take(),
                Some(at) => {
                    wake = at + send_timeout;
                    continue;
                }
                None => {
                    wake = Instant::now() + send_timeout;
                    continue;
                }
            }
        };
        // Outside the lock: dropping the body ends its request (metered as
        // the client's leaving) and closes its upstream connection.
        if ended && let Some(body) = body {
            finish(body).await;
        }
        tracing::debug!("let go of an HTTP/2 answer its client took none of");
        return;
    }
}

/// How often, once the grace period has run out, a watch looks for its
/// body waiting on a client with no room for more.
const AFTER_GRACE: Duration = Duration::from_millis(50);

/// Polls a body to its end, dropping what it gives: its client has no
/// room for it. A stream past the grace period ends with its error event,
/// metered as cut by the gateway.
async fn finish(mut body: Body) {
    let ended = std::future::poll_fn(|cx| {
        while let Some(Ok(_)) = ready!(hyper::body::Body::poll_frame(Pin::new(&mut body), cx)) {}
        Poll::Ready(())
    });
    let _ = tokio::time::timeout(FINISH, ended).await;
}

/// The most a body let go of at the grace period's end is polled for.
const FINISH: Duration = Duration::from_secs(1);
