//! Typed takes that return tokio's sockets ([`TakeTokio`]).

use super::*;

/// Takes inherited sockets as tokio sockets, registered with the current
/// runtime's reactor and non-blocking. Call them inside the runtime.
///
/// Each checks the descriptor as its [`Inherited`] counterpart does and
/// returns `Ok(None)` for a name that was not handed over (or was already
/// taken).
///
/// # Errors
///
/// [`Error::Adopt`] if the descriptor is not of the asked type, or cannot
/// be registered with tokio. Before [`Copyover::ready`] after an upgrade,
/// either rolls back at once and the call does not return (see
/// [`Inherited`'s "When a check fails"](Inherited#when-a-check-fails)).
pub trait TakeTokio {
    /// A listening TCP socket.
    fn take_tokio_tcp_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpListener>, Error>;
    /// A connected TCP socket.
    fn take_tokio_tcp_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpStream>, Error>;
    /// A UDP socket.
    fn take_tokio_udp_socket(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UdpSocket>, Error>;
    /// A listening Unix stream socket.
    fn take_tokio_unix_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixListener>, Error>;
    /// A connected Unix stream socket.
    fn take_tokio_unix_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixStream>, Error>;
    /// A Unix datagram socket.
    fn take_tokio_unix_datagram(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixDatagram>, Error>;
}

/// Makes a checked std socket non-blocking and hands it to tokio.
fn to_tokio<S, T>(
    on_failed_check: Option<fn(&Error)>,
    name: &str,
    wanted: &'static str,
    taken: Result<Option<S>, Error>,
    nonblocking: impl FnOnce(&S) -> io::Result<()>,
    register: impl FnOnce(S) -> io::Result<T>,
) -> Result<Option<T>, Error>
where
    S: std::os::fd::AsRawFd,
{
    let Some(s) = taken? else { return Ok(None) };
    let fd = s.as_raw_fd();
    nonblocking(&s)
        .and_then(|()| register(s))
        .map(Some)
        .map_err(|e| {
            let reason = format!("it cannot be registered with tokio ({e})");
            crate::handoff::failed(
                on_failed_check,
                crate::handoff::refuse(name, fd, wanted, reason),
            )
        })
}

impl TakeTokio for Inherited {
    fn take_tokio_tcp_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpListener>, Error> {
        to_tokio(
            self.on_failed_check,
            name,
            SocketKind::TcpListener.wanted(),
            self.take_tcp_listener(name),
            |s: &net::TcpListener| s.set_nonblocking(true),
            ::tokio::net::TcpListener::from_std,
        )
    }

    fn take_tokio_tcp_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::TcpStream>, Error> {
        to_tokio(
            self.on_failed_check,
            name,
            SocketKind::TcpStream.wanted(),
            self.take_tcp_stream(name),
            |s: &net::TcpStream| s.set_nonblocking(true),
            ::tokio::net::TcpStream::from_std,
        )
    }

    fn take_tokio_udp_socket(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UdpSocket>, Error> {
        to_tokio(
            self.on_failed_check,
            name,
            SocketKind::Udp.wanted(),
            self.take_udp_socket(name),
            |s: &net::UdpSocket| s.set_nonblocking(true),
            ::tokio::net::UdpSocket::from_std,
        )
    }

    fn take_tokio_unix_listener(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixListener>, Error> {
        to_tokio(
            self.on_failed_check,
            name,
            SocketKind::UnixListener.wanted(),
            self.take_unix_listener(name),
            |s: &unix::UnixListener| s.set_nonblocking(true),
            ::tokio::net::UnixListener::from_std,
        )
    }

    fn take_tokio_unix_stream(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixStream>, Error> {
        to_tokio(
            self.on_failed_check,
            name,
            SocketKind::UnixStream.wanted(),
            self.take_unix_stream(name),
            |s: &unix::UnixStream| s.set_nonblocking(true),
            ::tokio::net::UnixStream::from_std,
        )
    }

    fn take_tokio_unix_datagram(
        &mut self,
        name: &str,
    ) -> Result<Option<::tokio::net::UnixDatagram>, Error> {
        to_tokio(
            self.on_failed_check,
            name,
            SocketKind::UnixDatagram.wanted(),
            self.take_unix_datagram(name),
            |s: &unix::UnixDatagram| s.set_nonblocking(true),
            ::tokio::net::UnixDatagram::from_std,
        )
    }
}
