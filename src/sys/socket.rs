//! Sockets at the system level: what an inherited descriptor is (read
//! with `getsockopt` on its raw number, before anyone owns it), a
//! `shutdown`, a datagram that carries descriptors (`SCM_RIGHTS`), and the
//! socket pair a migration passes its descriptors over.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::SocketAddr;

use super::syscall;

/// Reads an `int` socket option of `SOL_SOCKET` from a raw fd number.
///
/// Takes a raw number: it is how an inherited descriptor is checked before
/// anyone owns it (`getsockopt` has no side effect on any fd; a closed
/// number gives `EBADF`, a file `ENOTSOCK`).
fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes of an int and a
    // socklen_t; the kernel writes at most `len` bytes.
    unsafe {
        syscall!(getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        ))
    }?;
    Ok(val)
}

/// What a socket is, read with two `getsockopt` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// The protocol number (`SO_PROTOCOL`): `IPPROTO_TCP`, 0 for Unix sockets.
    pub protocol: i32,
    /// `SO_ACCEPTCONN`: the socket is listening.
    pub listening: bool,
}

/// Reads `SO_PROTOCOL` and `SO_ACCEPTCONN`; fails with `ENOTSOCK` for a
/// descriptor that is not a socket, `EBADF` for one that is not open.
pub(crate) fn socket_info(fd: RawFd) -> io::Result<SocketInfo> {
    let protocol = getsockopt_int(fd, libc::SO_PROTOCOL)?;
    let listening = getsockopt_int(fd, libc::SO_ACCEPTCONN)? != 0;
    Ok(SocketInfo {
        protocol,
        listening,
    })
}

/// Whether fd number `fd` is a listening socket. A closed or reused number
/// merely gives a wrong answer for a warning.
pub(crate) fn is_listening(fd: RawFd) -> bool {
    getsockopt_int(fd, libc::SO_ACCEPTCONN).is_ok_and(|v| v != 0)
}

/// Reads `SO_TYPE` (`SOCK_STREAM`, `SOCK_DGRAM`, ...); fails with
/// `ENOTSOCK` for a descriptor that is not a socket.
pub(crate) fn socket_type(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SO_TYPE)
}

/// Reads `SO_PROTOCOL` (`IPPROTO_UDP`, 0 for a Unix socket, ...).
pub(crate) fn socket_protocol(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SO_PROTOCOL)
}

/// Reads `SO_DOMAIN` (`AF_UNIX`, `AF_INET`, ...).
pub(crate) fn socket_domain(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SO_DOMAIN)
}

/// Shuts a connected socket down in both directions (`shutdown(2)`): its
/// peer sees the end of the stream even while other copies of the
/// descriptor stay open.
pub(crate) fn shutdown(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both)?;
    Ok(())
}

/// Sends one datagram to the Unix socket at `to`, from a new unbound
/// socket, with `fds` attached (`sendmsg` with `SCM_RIGHTS`).
///
/// # Errors
///
/// The socket's or `sendmsg`'s error (an unnamed `to` is `InvalidInput`).
pub(crate) fn send_with_fds(
    to: &SocketAddr,
    message: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
    };
    use std::os::linux::net::SocketAddrExt;
    let addr = match (to.as_abstract_name(), to.as_pathname()) {
        (Some(name), _) => UnixAddr::new_abstract(name)?,
        (None, Some(path)) => UnixAddr::new(path)?,
        (None, None) => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [io::IoSlice::new(message)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(())
}

/// The most descriptors one `SCM_RIGHTS` message carries (the kernel's
/// `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// A connected pair of `SOCK_SEQPACKET` Unix sockets, both close-on-exec:
/// messages keep their bounds, and the pair is private to whoever holds its
/// ends (no path, no peer to check).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends one message on a connected socket, with `fds` attached
/// (`SCM_RIGHTS`, at most [`MAX_FDS_PER_MESSAGE`]), again if a signal
/// interrupted it. `MSG_NOSIGNAL`: a peer that is gone is `EPIPE`, not
/// SIGPIPE.
pub(crate) fn send_message(sock: BorrowedFd<'_>, message: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [io::IoSlice::new(message)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsg: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other?,
        }
    };
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", message.len()),
        ));
    }
    Ok(())
}

/// Receives one message on a connected socket into `buf`, and the
/// descriptors it carries into `fds`, close-on-exec from the start
/// (`MSG_CMSG_CLOEXEC`). `Ok(0)` with no descriptors: the peer is gone.
///
/// # Errors
///
/// `recvmsg`'s error; `InvalidData` if the message or its descriptors did
/// not fit (`MSG_TRUNC`, `MSG_CTRUNC`: the kernel closed the descriptors
/// it could not install, for instance at the `RLIMIT_NOFILE` limit, and
/// this closes the ones it did): that message is gone.
pub(crate) fn recv_message(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    // Room for one SCM_RIGHTS message of MAX_FDS_PER_MESSAGE descriptors,
    // aligned for `cmsghdr`.
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * size_of::<u64>();
    let bytes = loop {
        // SAFETY: `msg` points at `iov` (which points at `buf`) and at
        // `control`, all alive and writable for the whole call, with their
        // true lengths; the kernel writes within them.
        match unsafe { syscall!(recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC)) } {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other?,
        }
    };
    // Every descriptor the kernel installed gets an owner first, even from a
    // truncated message (with MSG_CTRUNC it installed what fit, at the
    // `RLIMIT_NOFILE` limit say, and closed the rest): dropped below, they
    // are closed, not leaked. nix refuses to read a truncated message's
    // control data; the kernel writes only whole `cmsghdr`s within
    // `msg_controllen`, so walking them is sound.
    let mut received = Vec::new();
    // SAFETY: CMSG_FIRSTHDR and CMSG_NXTHDR stay within `msg_control` and
    // `msg_controllen` as the kernel set them; each header they return is a
    // whole one the kernel wrote into `control`, which is alive and aligned
    // for `cmsghdr` (a buffer of u64).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = header.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    // The kernel has just installed each of these in this
                    // process's table for this call alone: exactly one owner.
                    received.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        drop(received);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message or its descriptors did not fit (MSG_TRUNC or MSG_CTRUNC): \
             the kernel closed the descriptors it could not install (and this \
             process those it did); check RLIMIT_NOFILE",
        ));
    }
    fds.extend(received);
    Ok(bytes as usize)
}

/// Sets how long a blocking send on `sock` may wait (`SO_SNDTIMEO`); after
/// it, the send fails with `EAGAIN`.
pub(crate) fn set_send_timeout(
    sock: BorrowedFd<'_>,
    timeout: std::time::Duration,
) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::SendTimeout};
    use nix::sys::time::TimeVal;
    let micros = i64::try_from(timeout.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    setsockopt(
        &sock,
        SendTimeout,
        &TimeVal::new(micros / 1_000_000, micros % 1_000_000),
    )?;
    Ok(())
}

/// A `SOCK_SEQPACKET` Unix socket listening at `path` (close-on-exec),
/// its file made `mode`: who may connect is then checked by their
/// credentials ([`peer_credentials`]). A file already at `path` is
/// replaced only if it is a socket (one a dead process of this PID left).
pub(crate) fn seqpacket_listen(path: &std::path::Path, mode: u32) -> io::Result<OwnedFd> {
    use nix::sys::socket::{Backlog, UnixAddr, bind, listen};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let sock = seqpacket_socket()?;
    bind(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listen(&sock, Backlog::new(4)?)?;
    Ok(sock)
}

/// Accepts one connection (close-on-exec), again if a signal interrupted
/// it.
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{SockFlag, accept4};
    loop {
        match accept4(listener, SockFlag::SOCK_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => {}
            Ok(fd) => return Ok(fd),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects a `SOCK_SEQPACKET` Unix socket (close-on-exec) to `path`.
pub(crate) fn seqpacket_connect(path: &std::path::Path) -> io::Result<OwnedFd> {
    use nix::sys::socket::{UnixAddr, connect};
    let sock = seqpacket_socket()?;
    connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(sock)
}

/// A fresh `SOCK_SEQPACKET` Unix socket, close-on-exec.
fn seqpacket_socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// The credentials the kernel recorded for the peer of a connected Unix
/// socket when it connected (`SO_PEERCRED`): its PID (0 if it is in a PID
/// namespace this one cannot see), user and group.
pub(crate) fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(u32, u32, u32)> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(&sock, PeerCredentials)?;
    Ok((cred.pid().max(0) as u32, cred.uid(), cred.gid()))
}
