//! A TLS connection as a blocking `Read + Write` stream ([`Stream`]), for
//! a thread per connection.

use std::io::{self, Read, Write};

use super::{Config, Connection, TlsError};

/// A TLS 1.3 server connection over a blocking socket, as `Read + Write`:
/// the application's code reads and writes it as it would rustls's
/// `StreamOwned`. The handshake happens with the first reads and writes.
///
/// At an upgrade, save its [`connection`](Self::connection) with
/// [`Carry::add`](super::Carry::add) and keep [`unread`](Self::unread)
/// (plaintext opened and not read yet) in the connection's record; in the
/// new image, [`Stream::new`] with the restored connection, and give the
/// unread bytes back to whatever reads the stream.
#[derive(Debug)]
pub struct Stream<S> {
    io: S,
    conn: Connection,
    plain: Vec<u8>,
    at: usize,
    eof: bool,
}

impl<S: Read + Write> Stream<S> {
    /// A server connection on an accepted socket.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] if rustls refuses the configuration.
    pub fn accept(io: S, config: &Config) -> Result<Stream<S>, TlsError> {
        Ok(Stream::new(io, Connection::accept(config)?))
    }

    /// A stream over a socket and its connection (a restored one, say).
    pub fn new(io: S, conn: Connection) -> Stream<S> {
        Stream {
            io,
            conn,
            plain: Vec::new(),
            at: 0,
            eof: false,
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
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

    /// A restored connection's first use after `ready`: what crossed (a
    /// hello to answer, queued plaintext) is processed once.
    fn wake(&mut self) -> io::Result<()> {
        if self.conn.awaits_processing() {
            let processed = self.conn.process(&mut self.plain).map_err(io::Error::other);
            self.send()?;
            processed?;
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.io)?;
        }
        self.io.flush()
    }

    /// Reads once and processes what came.
    fn receive(&mut self) -> io::Result<()> {
        if self.conn.read_tls(&mut self.io)? == 0 {
            self.eof = true;
            return Ok(());
        }
        if self.at == self.plain.len() {
            self.plain.clear();
            self.at = 0;
        }
        let processed = self.conn.process(&mut self.plain).map_err(io::Error::other);
        // A handshake flight, a key update's answer, a failure's alert.
        self.send()?;
        processed
    }

    fn handshake(&mut self) -> io::Result<()> {
        self.wake()?;
        while self.conn.is_handshaking() {
            self.send()?;
            if self.eof || self.conn.peer_closed() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.receive()?;
        }
        Ok(())
    }
}

impl<S: Read + Write> Read for Stream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.wake()?;
        loop {
            if self.at < self.plain.len() {
                let n = buf.len().min(self.plain.len() - self.at);
                buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            if self.conn.peer_closed() {
                return Ok(0);
            }
            if self.eof {
                // The socket ended without close_notify: possibly cut short.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.send()?;
            self.receive()?;
        }
    }
}

impl<S: Read + Write> Write for Stream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.handshake()?;
        self.conn.write(buf).map_err(io::Error::other)?;
        self.send()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.handshake()?;
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::tls::connection::tests::{become_ready, client, configs};

    #[test]
    fn a_blocking_stream_talks_to_a_rustls_client() {
        let (config, cc) = configs();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut c = rustls::StreamOwned::new(client(&cc), theirs);
            c.write_all(b"ping\n").unwrap();
            let mut got = [0; 5];
            c.read_exact(&mut got).unwrap();
            got
        });
        let mut s = Stream::accept(ours, &config).unwrap();
        let mut got = [0; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pi");
        assert_eq!(s.unread(), b"ng\n", "what was opened and not read yet");
        let mut rest = [0; 3];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"ng\n");
        s.write_all(b"pong\n").unwrap();
        assert_eq!(&peer.join().unwrap(), b"pong\n");
    }

    /// A hello held at the upgrade, with a greeting written meanwhile: the
    /// stream over the restored connection answers it on its first use.
    #[test]
    fn a_restored_hello_is_answered_on_first_use() {
        let (config, cc) = configs();
        let mut c = client(&cc);
        let mut conn = Connection::accept(&config).unwrap();
        conn.hold(true);
        conn.write(b"hello?").unwrap();
        let mut hello = Vec::new();
        c.write_tls(&mut hello).unwrap();
        conn.read_tls(&mut hello.as_slice()).unwrap();
        let restored = Connection::restore(conn.save().unwrap(), &config).unwrap();
        become_ready();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut c = rustls::StreamOwned::new(c, theirs);
            let mut got = [0; 6];
            c.read_exact(&mut got).unwrap();
            c.write_all(b"yes").unwrap();
            got
        });
        let mut s = Stream::new(ours, restored);
        let mut got = [0; 3];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"yes");
        assert_eq!(&peer.join().unwrap(), b"hello?");
    }

    #[test]
    fn a_server_that_speaks_first_finishes_the_handshake_before_writing() {
        let (config, cc) = configs();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut c = rustls::StreamOwned::new(client(&cc), theirs);
            let mut got = Vec::new();
            // Byte by byte, across several records.
            let mut one = [0; 1];
            while got.len() < 12 {
                c.read_exact(&mut one).unwrap();
                got.push(one[0]);
            }
            c.write_all(b"bye").unwrap();
            got
        });
        let mut s = Stream::accept(ours, &config).unwrap();
        s.write_all(b"greeting").unwrap();
        s.flush().unwrap();
        s.write_all(b"more").unwrap();
        let mut got = [0; 3];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"bye");
        assert_eq!(&peer.join().unwrap(), b"greetingmore");
    }
}
