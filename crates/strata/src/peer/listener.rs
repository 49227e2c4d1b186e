//! The peer listener: every connection is a mutual TLS handshake first (a caller without a
//! certificate from the peer CA is dropped there, before anything is read), then, by the
//! protocol the handshake agreed on, gRPC (`h2`, or none) for tonic, or a [`bulk`] read on
//! a blocking thread of its own. Handshakes and bulk connections in progress are bounded.

use std::sync::Arc;
use std::time::Duration;

use strata_core::peer::Exports;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::bulk;
use super::tls::{HANDSHAKE_TIMEOUT, PeerTls};

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const HANDSHAKES: usize = 64;
/// Bulk connections served at once (each a blocking thread; the reads they stream are
/// bounded by the exports' own limits).
const BULK_CONNECTIONS: usize = 32;
/// How long a bulk connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the reader may leave a bulk stream's writes waiting.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The connections for tonic, handshaken and speaking HTTP/2.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// Accepts on `listener` until the task is dropped: gRPC connections go to the returned
/// stream (for `serve_with_incoming`), bulk ones are served here from `exports`.
pub fn accept(
    listener: TcpListener,
    tls: &PeerTls,
    exports: Arc<Exports>,
) -> Result<(Incoming, tokio::task::JoinHandle<()>), String> {
    let config = tls
        .rustls_server(&[b"h2", bulk::ALPN])
        .map_err(|e| format!("--peer-tls-dir: {e}"))?;
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(HANDSHAKES);
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    let bulk_slots = Arc::new(Semaphore::new(BULK_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let permit = match handshakes.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return,
            };
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was taken.
                    tracing::warn!(error = %e, "peer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // No Nagle delay on the small frames (window updates, ends of streams).
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, exports, bulk_slots) = (
                acceptor.clone(),
                tx.clone(),
                exports.clone(),
                bulk_slots.clone(),
            );
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "peer connection refused in its handshake");
                        return;
                    }
                    Err(_) => return,
                };
                if stream.get_ref().1.alpn_protocol() == Some(bulk::ALPN) {
                    serve_bulk(stream, exports, bulk_slots).await;
                } else {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    Ok((tokio_stream::wrappers::ReceiverStream::new(rx), task))
}

async fn serve_bulk(stream: TlsStream<TcpStream>, exports: Arc<Exports>, slots: Arc<Semaphore>) {
    let Ok(slot) = slots.try_acquire_owned() else {
        tracing::warn!("peer listener: too many bulk reads at once; one refused");
        return;
    };
    let (tcp, conn) = stream.into_inner();
    let tcp = match tcp.into_std().and_then(|t| {
        t.set_nonblocking(false)?;
        t.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        t.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(t)
    }) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "peer listener: a bulk connection could not be served");
            return;
        }
    };
    let _ = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        if let Err(e) = bulk::serve(&mut stream, &exports) {
            tracing::debug!(error = %e, "a bulk read ended early");
        }
        stream.conn.send_close_notify();
        let _ = stream.conn.complete_io(&mut stream.sock);
    })
    .await;
}
