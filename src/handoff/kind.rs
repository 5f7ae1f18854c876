//! The one check of a socket's type before it becomes a typed socket, and
//! the adoption error.

use super::*;

/// The socket a typed take asks for: the one check of a descriptor's type
/// before it becomes a typed socket, for an inherited descriptor
/// ([`Inherited`]'s `take_*`) and a socket-activated one
/// ([`Copyover::take_activated_tcp_listener`](crate::Copyover::take_activated_tcp_listener)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketKind {
    /// A listening TCP socket.
    TcpListener,
    /// A connected TCP socket.
    TcpStream,
    /// A listening Unix stream socket.
    UnixListener,
    /// A connected Unix stream socket.
    UnixStream,
    /// A UDP socket: `AF_INET` or `AF_INET6`, `IPPROTO_UDP`.
    Udp,
    /// A Unix datagram socket.
    UnixDatagram,
}

impl SocketKind {
    /// What a take of this kind wants, for its error.
    pub(crate) fn wanted(self) -> &'static str {
        match self {
            SocketKind::TcpListener => "a listening TCP socket",
            SocketKind::TcpStream => "a connected TCP socket",
            SocketKind::UnixListener => "a listening Unix socket",
            SocketKind::UnixStream => "a connected Unix socket",
            SocketKind::Udp => "a UDP socket",
            SocketKind::UnixDatagram => "a Unix datagram socket",
        }
    }

    /// Whether a manifest entry of `kind` may hold this socket. Datagram
    /// sockets kept with [`Handoff::other`] (the way to keep one before
    /// [`Handoff::datagram`]) are accepted too: the socket's own options
    /// decide.
    pub(super) fn kept_as(self, kind: FdKind) -> bool {
        match self {
            SocketKind::TcpListener | SocketKind::UnixListener => kind == FdKind::Listener,
            SocketKind::TcpStream | SocketKind::UnixStream => kind == FdKind::Stream,
            SocketKind::Udp | SocketKind::UnixDatagram => {
                matches!(kind, FdKind::Datagram | FdKind::Other)
            }
        }
    }

    /// Checks fd number `fd` with the socket's own options (`SO_ACCEPTCONN`,
    /// `SO_PROTOCOL`, `SO_DOMAIN`, `SO_TYPE`), on the raw number, before
    /// anyone owns it. The error is the reason, for [`Error::Adopt`].
    pub(crate) fn check(self, fd: RawFd) -> Result<(), String> {
        match self {
            SocketKind::TcpListener => check_stream(fd, true, Some(libc::IPPROTO_TCP)),
            SocketKind::TcpStream => check_stream(fd, false, Some(libc::IPPROTO_TCP)),
            SocketKind::UnixListener => check_stream(fd, true, None),
            SocketKind::UnixStream => check_stream(fd, false, None),
            SocketKind::Udp => check_datagram(fd, true),
            SocketKind::UnixDatagram => check_datagram(fd, false),
        }
    }
}

/// A stream socket's check. `protocol`: `Some(IPPROTO_TCP)` for TCP, `None`
/// for a Unix socket.
fn check_stream(fd: RawFd, listening: bool, protocol: Option<i32>) -> Result<(), String> {
    let info = sys::socket_info(fd).map_err(|e| format!("it is not a socket ({e})"))?;
    if info.listening != listening {
        let is = if info.listening {
            "listening"
        } else {
            "not listening"
        };
        return Err(format!("the socket is {is}"));
    }
    match protocol {
        Some(p) if info.protocol != p => {
            return Err(format!("its protocol is {}", info.protocol));
        }
        None if sys::socket_domain(fd).map_err(|e| e.to_string())? != libc::AF_UNIX => {
            return Err("it is not a Unix socket".into());
        }
        None => {
            // A TCP socket is always a stream; a Unix one may be a
            // datagram or seqpacket socket.
            let ty = sys::socket_type(fd).map_err(|e| e.to_string())?;
            if ty != libc::SOCK_STREAM {
                return Err(format!(
                    "it is a Unix socket of type {ty}, not a stream (SOCK_STREAM)"
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A datagram socket's check: UDP (`udp`) or Unix.
fn check_datagram(fd: RawFd, udp: bool) -> Result<(), String> {
    let ty = sys::socket_type(fd).map_err(|e| format!("it is not a socket ({e})"))?;
    if ty != libc::SOCK_DGRAM {
        return Err(format!("its type is {ty}, not SOCK_DGRAM"));
    }
    let domain = sys::socket_domain(fd).map_err(|e| e.to_string())?;
    if udp {
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(format!("its domain is {domain}, not AF_INET(6)"));
        }
        let protocol = sys::socket_protocol(fd).map_err(|e| e.to_string())?;
        if protocol != libc::IPPROTO_UDP {
            return Err(format!("its protocol is {protocol}, not UDP"));
        }
    } else if domain != libc::AF_UNIX {
        return Err(format!("its domain is {domain}, not AF_UNIX"));
    }
    Ok(())
}

/// An adoption error: descriptor `fd` under `name` is not `wanted`.
pub(crate) fn refuse(name: &str, fd: RawFd, wanted: &'static str, reason: String) -> Error {
    Error::Adopt {
        name: name.to_owned(),
        fd,
        wanted,
        reason,
    }
}
