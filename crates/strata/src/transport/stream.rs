//! A connection whose incoming bytes pass through a [`Rewriter`]; writes go straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use strata_h2::frames::Rewriter;

/// How much is read from the socket at once.
const READ_CHUNK: usize = 16 * 1024;

pub struct Normalized<S> {
    inner: S,
    rewriter: Rewriter,
    /// Read from the socket, not yet rewritten (an incomplete frame).
    raw: Vec<u8>,
    /// Rewritten, not yet read by the server; `out[taken..]` is what is left.
    out: Vec<u8>,
    taken: usize,
    eof: bool,
}

impl<S> Normalized<S> {
    pub fn new(inner: S) -> Self {
        Normalized {
            inner,
            rewriter: Rewriter::default(),
            raw: Vec::new(),
            out: Vec::new(),
            taken: 0,
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Normalized<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.taken);
                buf.put_slice(&this.out[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.out.len() {
                    this.out.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The client is gone: what is left of an incomplete frame goes on as it is.
                this.eof = true;
                this.out.append(&mut this.raw);
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            let before = this.rewriter.replaced;
            let used = this.rewriter.process(&this.raw, &mut this.out);
            this.raw.drain(..used);
            if before == 0 && this.rewriter.replaced > 0 {
                tracing::debug!("client sent an :authority hyper refuses; serving it as localhost");
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Normalized<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Normalized<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_that_are_not_http2_arrive_unchanged_and_eof_ends_the_read() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = Normalized::new(server);
        let sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00";
        client.write_all(sent).await.unwrap();
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, sent,
            "an incomplete frame header goes on as it is at EOF"
        );
    }
}
