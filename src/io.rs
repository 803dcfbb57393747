//! A read buffer under tungstenite that exists only while there is data in it.
//!
//! tungstenite reads into whatever capacity is left in its input buffer after splitting off
//! the previous frames, which for a stream of small messages means a `recv` syscall for every
//! few dozen bytes. Reading through a 16 KiB chunk here turns that into one `recv` per chunk.
//! The chunk is released as soon as it has been consumed, so an idle connection — which is
//! what most chat connections are, most of the time — holds no read buffer at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const CHUNK: usize = 16 * 1024;

pub struct ReadBuffered<S> {
    inner: S,
    buffer: Vec<u8>,
    position: usize,
}

impl<S> ReadBuffered<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buffer: Vec::new(),
            position: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadBuffered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.position == this.buffer.len() {
            // Empty: a large read goes straight through; a small one is served from a chunk.
            if out.remaining() >= CHUNK {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buffer.resize(CHUNK, 0);
            let mut chunk = ReadBuf::new(&mut this.buffer);
            let result = Pin::new(&mut this.inner).poll_read(cx, &mut chunk);
            let filled = chunk.filled().len();
            if !matches!(result, Poll::Ready(Ok(()))) || filled == 0 {
                this.release();
                ready!(result)?;
                return Poll::Ready(Ok(()));
            }
            this.buffer.truncate(filled);
            this.position = 0;
        }
        let available = &this.buffer[this.position..];
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        this.position += n;
        if this.position == this.buffer.len() {
            this.release();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> ReadBuffered<S> {
    fn release(&mut self) {
        self.buffer = Vec::new();
        self.position = 0;
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_chunk_and_the_chunk_is_released() {
        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&data).await.unwrap();
        drop(writer);
        let mut reader = ReadBuffered::new(reader);
        let mut received = Vec::new();
        let mut small = [0u8; 100];
        loop {
            let n = reader.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&small[..n]);
        }
        assert_eq!(received, data);
        assert_eq!(reader.buffer.capacity(), 0, "no buffer kept once drained");
    }
}
