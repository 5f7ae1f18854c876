//! A TLS connection as a tokio stream ([`TlsStream`]: `AsyncRead +
//! AsyncWrite`), for the `tls` and `tokio` features together.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::TcpStream;

use super::{Config, Connection, TlsError};

/// A TLS 1.3 server connection over a tokio `TcpStream`, whose session
/// crosses an upgrade: the application's code reads and writes it as it
/// would tokio-rustls's `TlsStream` (wrap it in a `Framed`, say).
///
/// The handshake is driven by the first reads and writes. With
/// [`copyover::tokio::Server`](crate::tokio::Server), a session whose
/// transport is a `TlsStream` (or a `Framed` of one) crosses with its TLS
/// session; give the server the configuration with
/// [`Server::tls`](crate::tokio::Server::tls).
pub struct TlsStream {
    io: TcpStream,
    conn: Connection,
    /// Opened plaintext not yet read by the application.
    plain: Vec<u8>,
    at: usize,
    eof: bool,
}

impl TlsStream {
    /// A server connection on an accepted socket; the handshake happens as
    /// the stream is read and written.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] if rustls refuses the configuration.
    pub fn accept(io: TcpStream, config: &Config) -> Result<TlsStream, TlsError> {
        Ok(TlsStream::new(io, Connection::accept(config)?))
    }

    /// A stream over a socket and its connection (a restored one, say).
    pub fn new(io: TcpStream, conn: Connection) -> TlsStream {
        TlsStream {
            io,
            conn,
            plain: Vec::new(),
            at: 0,
            eof: false,
        }
    }

    /// A restored stream whose application had not read `unread` yet.
    pub(crate) fn with_unread(io: TcpStream, conn: Connection, unread: Vec<u8>) -> TlsStream {
        TlsStream {
            plain: unread,
            ..TlsStream::new(io, conn)
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// The TLS connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Plaintext opened and not yet read by the application.
    pub fn unread(&self) -> &[u8] {
        &self.plain[self.at..]
    }

    /// Writes pending ciphertext until none is left or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            ready!(self.io.poll_write_ready(cx))?;
            match self.conn.write_tls(&mut Try(&self.io)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what the socket takes now, without waiting for room (the
    /// read side must not wait on the write side's readiness).
    fn try_send(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Try(&self.io)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A restored connection's first use after `ready`: what crossed (a
    /// hello to answer, queued plaintext) is processed once.
    fn wake(&mut self) -> io::Result<()> {
        if self.conn.awaits_processing() {
            let processed = self.conn.process(&mut self.plain).map_err(io::Error::other);
            self.try_send()?;
            processed?;
        }
        Ok(())
    }

    /// Reads and processes once: more plaintext, the handshake moved on,
    /// or the end of the stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.conn.dormant() {
            // It would read nothing (and clear no readiness): polled again
            // and again. A restored stream waits for `ready`.
            return Poll::Ready(Err(io::Error::other(
                "a restored TLS stream was used before Copyover::ready",
            )));
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            match self.conn.read_tls(&mut Try(&self.io)) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => {
                    if self.at == self.plain.len() {
                        self.plain.clear();
                        self.at = 0;
                    }
                    self.conn
                        .process(&mut self.plain)
                        .map_err(io::Error::other)?;
                    // A handshake flight, a key update's answer, an alert.
                    if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Drives the handshake to its end (writes need it: until then they
    /// are only queued).
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wake()?;
        while self.conn.is_handshaking() {
            ready!(self.poll_send(cx))?;
            if self.eof || self.conn.peer_closed() {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            ready!(self.poll_receive(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.wake()?;
        loop {
            if this.at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.at);
                buf.put_slice(&this.plain[this.at..this.at + n]);
                this.at += n;
                return Poll::Ready(Ok(()));
            }
            if this.conn.peer_closed() {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // The socket ended without close_notify: possibly cut short.
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            if this.conn.is_handshaking() {
                // One task drives the handshake: it may wait for room.
                ready!(this.poll_send(cx))?;
            } else if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                // What waits to be sent (a backlog that crossed the
                // upgrade, a key update's answer) goes out as room comes,
                // even in a task that only reads: the write readiness
                // wakes it too. (Split into halves, the read half takes
                // the write half's waker meanwhile.)
                return Poll::Ready(Err(e));
            }
            ready!(this.poll_receive(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        // What was sealed before goes first: the socket's room is the
        // back-pressure.
        ready!(this.poll_send(cx))?;
        this.conn.write(buf).map_err(io::Error::other)?;
        // Sent now if the socket takes it; else by the next flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        this.poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.wake()?;
        this.conn.close();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A tokio socket as `Read + Write` for one non-blocking attempt.
struct Try<'a>(&'a TcpStream);

impl Read for Try<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Try<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
