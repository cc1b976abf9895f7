//! The accept loop: each connection served over HTTP/1.1 (`http1`) or
//! HTTP/2 with prior knowledge (`http2`), and a graceful drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::front::Front;
use super::http1::{self, HEAD_TIMEOUT};
use super::http2;

/// How an HTTP/2 client with prior knowledge opens (RFC 9113 §3.4). No
/// HTTP/1 request starts with it: HTTP/1 requests differ from it by their
/// second byte at the latest, unless they use the method `PRI`, which
/// exists only to make this preface fail on HTTP/1 servers.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections the kernel holds completed for the accept loop. A burst of
/// new connections larger than this (the standard library and tokio
/// listen with 128) has its handshakes dropped, and each such client
/// waits a second for its retransmit. Linux caps it at
/// `net.core.somaxconn` (4,096 by default).
const BACKLOG: u32 = 4096;

/// Listens on `addr`, as `serve` does.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // A restarted gateway binds at once, past its old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts and serves connections until `shutdown` resolves; then stops
/// accepting and returns a future that resolves once every connection has
/// finished its requests in flight (idle keep-alive connections are closed
/// at once).
pub async fn accept_until(
    listener: TcpListener,
    front: Front,
    shutdown: impl Future<Output = ()>,
) -> impl Future<Output = ()> {
    // Turns true when the gateway stops; every connection holds a
    // receiver until it has finished.
    let (stopping, stop) = watch::channel(false);
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
        tokio::spawn(start_serving(tcp, front.clone(), stop.clone()));
    }
    drop(listener);
    drop(stop);
    stopping.send_replace(true);
    async move { stopping.closed().await }
}

enum Protocol {
    Http1,
    Http2,
}

/// Finds which protocol a connection speaks, then serves it in a task of
/// its own: a task is as large as the largest state its future can be in,
/// so an HTTP/1 connection served by a future that could also hold an
/// HTTP/2 one would carry the larger state for as long as it is open.
async fn start_serving(tcp: TcpStream, service: Front, mut stop: watch::Receiver<bool>) {
    let first_head_by = Instant::now() + HEAD_TIMEOUT;
    let protocol = tokio::select! {
        sniffed = tokio::time::timeout_at(first_head_by, sniff(&tcp)) => match sniffed {
            Ok(Ok(Some(protocol))) => protocol,
            // Closed, failed or silent before its first request.
            _ => return,
        },
        () = http1::stopped(&mut stop) => return,
    };
    match protocol {
        Protocol::Http1 => {
            let waits = service.waits();
            tokio::spawn(http1::serve(tcp, service, first_head_by, waits, stop));
        }
        // HTTP/2 refuses with stream resets, which have no body.
        Protocol::Http2 => {
            tokio::spawn(http2::serve(tcp, service, stop));
        }
    }
}

/// Looks at a connection's first bytes without taking them, so hyper reads
/// them as if nothing had. `None`: the client closed without sending any,
/// or closed while they could still open either protocol.
///
/// While they could ("P" sent alone, or part of the HTTP/2 preface), the
/// peek reports `WouldBlock` to `try_io`, which clears the readiness it
/// observed: the bytes already seen stay readable, so the next
/// `ready().await` sleeps until more arrive (only that readiness is
/// cleared, so bytes that come in between are not missed).
async fn sniff(tcp: &TcpStream) -> io::Result<Option<Protocol>> {
    let mut start = [0; H2_PREFACE.len()];
    loop {
        let ready = tcp.ready(Interest::READABLE).await?;
        match tcp.try_io(Interest::READABLE, || protocol(tcp, &mut start)) {
            // A closed read side stays ready: waiting again would spin.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !ready.is_read_closed() => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            found => return found,
        }
    }
}

/// The protocol the bytes waiting on `tcp` open; `WouldBlock` while they
/// could open either.
fn protocol(tcp: &TcpStream, start: &mut [u8; H2_PREFACE.len()]) -> io::Result<Option<Protocol>> {
    let (seen, _) = rustix::net::recv(tcp, &mut start[..], rustix::net::RecvFlags::PEEK)?;
    if seen == 0 {
        Ok(None)
    } else if start[..seen] != H2_PREFACE[..seen] {
        Ok(Some(Protocol::Http1))
    } else if seen == H2_PREFACE.len() {
        Ok(Some(Protocol::Http2))
    } else {
        Err(io::ErrorKind::WouldBlock.into())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 500 clients connect at once to a gateway that accepts none of them
    /// yet: every handshake completes, none waits for a retransmit.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_not_for_a_retransmit() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..500)
            .map(|_| tokio::time::timeout(Duration::from_millis(900), TcpStream::connect(addr)));
        let connected = futures_util::future::join_all(connects).await;
        let done = connected.iter().filter(|c| matches!(c, Ok(Ok(_)))).count();
        assert_eq!(done, 500);
        drop(listener);
    }
}
