//! One socket type for both legs of a connection, whatever carries it.
//!
//! A session outlives the client connection it started on (a resumed client may come back over
//! another listener), so the relay cannot be generic over the client's stream type: an enum
//! covers plain TCP, TLS as a server (clients), TLS as a client (`wss://` upstreams) and, as a
//! fallback, whatever hyper hands back after an upgrade. TLS state is boxed: rustls keeps over a
//! kilobyte per connection, and an enum is as large as its largest variant.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub(crate) enum Io {
    Tcp(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Upgraded(Box<TokioIo<Upgraded>>),
    /// What is left where a socket was moved away from ([`Io::rehome`]) and could not be put
    /// back: it fails every read and write, as a vanished peer's socket does.
    Moved,
    /// An in-memory pipe: the relay's unit tests drive both legs without sockets.
    #[cfg(test)]
    Memory(tokio::io::DuplexStream),
}

impl Io {
    /// The client's socket after hyper's upgrade, and the bytes hyper read past the request
    /// (a client may send its first frames right behind the upgrade request).
    pub(crate) fn from_upgraded(upgraded: Upgraded) -> (Io, bytes::Bytes) {
        let upgraded = match upgraded.downcast::<TokioIo<Io>>() {
            Ok(parts) => return (parts.io.into_inner(), parts.read_buf),
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<Rewind>>() {
            Ok(parts) => {
                let Rewind { prefix, io } = parts.io.into_inner();
                // hyper read from the front of the edge's own read: what it holds comes first,
                // what it had not taken of that read after.
                let read = if prefix.is_empty() {
                    parts.read_buf
                } else {
                    [parts.read_buf, prefix].concat().into()
                };
                (io, read)
            }
            Err(upgraded) => (
                Io::Upgraded(Box::new(TokioIo::new(upgraded))),
                Default::default(),
            ),
        }
    }
}

impl Io {
    /// Moves the socket to the event loop of the task that calls this: a client that comes
    /// back through another worker's listener, or over the cluster's link, is then served by
    /// its session's thread without a hop through the thread that accepted it. (A TLS socket
    /// stays where it is.)
    pub(crate) fn rehome(&mut self) -> io::Result<()> {
        if let Io::Tcp(_) = self
            && let Io::Tcp(tcp) = std::mem::replace(self, Io::Moved)
        {
            *self = Io::Tcp(TcpStream::from_std(tcp.into_std()?)?);
        }
        Ok(())
    }
}

/// A socket whose first bytes were read already (by the edge's own request reader): they are
/// read again first, then the socket. What hyper serves after the edge's reader gave up.
pub(crate) struct Rewind {
    pub(crate) prefix: bytes::Bytes,
    pub(crate) io: Io,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

macro_rules! each {
    ($self:expr, $io:ident => $body:expr) => {
        match $self.get_mut() {
            Io::Tcp($io) => $body,
            Io::ServerTls($io) => $body,
            Io::ClientTls($io) => $body,
            Io::Upgraded($io) => $body,
            Io::Moved => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            #[cfg(test)]
            Io::Memory($io) => $body,
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, io => Pin::new(io).poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}
