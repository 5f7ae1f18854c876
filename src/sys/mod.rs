//! The thin system layer: every raw syscall and every `unsafe` block of the
//! crate lives here (mio's `sys` rule).
//!
//! Each function is a small, documented domain operation returning
//! `io::Result` (or a plain answer where nothing can fail). The rest of the
//! crate is safe Rust on `OwnedFd` / `BorrowedFd` and calls these functions,
//! the standard library and the `memfd` crate's safe API: it never calls
//! `nix` or `libc` functions itself (it may name `libc` constants as data).
//!
//! Where things are:
//!
//! - this module: the [`syscall!`] macro, the wiring, and `once_more`;
//! - `fd`: a descriptor's close-on-exec flag, waiting for readability;
//! - `inherit`: owning inherited numbers ([`Claims`]);
//! - `pidfd`: processes named by a pidfd;
//! - `exec`: `execveat` of a descriptor, with arrays prepared ahead;
//! - `limits`: `RLIMIT_NOFILE`, the environment, the thread count;
//! - `time`: the monotonic clock and `ITIMER_REAL`;
//! - [`memfd`]: creating, sealing, checking and mapping memory files;
//! - [`signal`]: handlers, the wake-up pair, signal masks, SIGALRM;
//! - [`socket`]: what a socket is, `shutdown`, sending and receiving
//!   descriptors;
//! - [`process`]: killing and reaping by PID, thread and user ids;
//! - [`rollback`] and [`holder`]: the async-signal-safe rollback and the
//!   child that holds the old image;
//! - [`claim`]: the one byte that decides who ends an upgrade, the ready
//!   image or the holder at its deadline.

pub(crate) mod claim;
pub(crate) mod holder;
mod memfd;
mod process;
pub(crate) mod rollback;
mod signal;
mod socket;

pub(crate) use memfd::{
    Mapping, SEALS, allocate, check_sealed, file_size, map_region, map_sealed, memfd_create,
    memfd_io, read_at, seal,
};
#[cfg(feature = "tokio")]
pub(crate) use process::on_main_thread;
pub(crate) use process::{
    check_executable, effective_uid, has_exited, join_process_group, kill, kill_group,
    process_group_of, real_uid, reap, reap_exited_children, set_thread_name,
};
#[cfg(all(test, feature = "tokio"))]
pub(crate) use signal::is_blocked;
pub(crate) use signal::{
    SavedMask, block_signals, discard_pending_sigalrm, ignore_sigalrm, on_signal, raise,
    restore_mask, unblock_signals, wake_pair, wake_socket,
};
pub(crate) use socket::{
    MAX_FDS_PER_MESSAGE, accept, is_listening, peer_credentials, recv_message, send_message,
    send_with_fds, seqpacket_connect, seqpacket_listen, seqpacket_pair, set_send_timeout, shutdown,
    socket_domain, socket_info, socket_protocol, socket_type,
};

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Runs a libc call that returns `-1` and sets `errno` on failure, and turns
/// that into an `io::Result` of the returned value (mio's `syscall!`).
///
/// Must be used inside an `unsafe` block whose `// SAFETY:` comment covers
/// the call itself.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        let rc = libc::$fn($($arg),*);
        if rc == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }};
}
pub(crate) use syscall;

mod exec;
mod fd;
mod inherit;
mod limits;
mod pidfd;
mod time;

pub(crate) use exec::{execveat, execveat_prepared, inherit_only, keep_fd_in_child, write_decimal};
pub(crate) use fd::{
    cloexec_from, close_handed_over, dup_at_least, is_cloexec, readable_among, set_cloexec,
    wait_readable,
};
pub(crate) use inherit::{Claims, FdSet};
pub(crate) use limits::{nofile_limit, remove_env_var, thread_count};
pub(crate) use pidfd::{pidfd_kill, pidfd_open, pidfd_signal};
pub(crate) use time::{monotonic_ns, set_real_timer};

/// Runs `f`, and once more if it fails with an error `retry` accepts: one
/// failed call (interrupted, transient, or failed on purpose by a fault
/// injector, which fails one call at a time) must not decide an outcome
/// where a second try is cheap and harmless.
pub(crate) fn once_more<T, E>(
    mut f: impl FnMut() -> Result<T, E>,
    retry: impl Fn(&E) -> bool,
) -> Result<T, E> {
    match f() {
        Err(e) if retry(&e) => f(),
        done => done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfd_is_cloexec_and_sealable() {
        let fd = memfd_create(c"t").unwrap();
        let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        nix::fcntl::fcntl(
            fd.as_fd(),
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_GROW),
        )
        .unwrap();
    }

    #[test]
    fn decimals_are_written_in_place() {
        let mut buf = [0u8; 20];
        for (v, want) in [
            (0, &b"0"[..]),
            (4242, b"4242"),
            (u64::MAX, b"18446744073709551615"),
        ] {
            let n = write_decimal(&mut buf, v);
            assert_eq!(&buf[..n], want);
        }
    }

    #[test]
    fn inheriting_checks_and_claims_once() {
        // The one token of this test process (each test runs in its own
        // under nextest; `cargo test` runs only this one that takes it).
        let claims = Claims::take().expect("the claims token");
        assert!(Claims::take().is_none(), "a second token");
        let inherit = |fd| claims.inherit(fd);
        let err = inherit(19_999).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        // Our own fds are close-on-exec: never inherited.
        let own = std::fs::File::open("/proc/self/stat").unwrap();
        use std::os::fd::AsRawFd;
        assert!(inherit(own.as_raw_fd()).is_err());
        // An inheritable one is claimed once.
        let fd = nix::fcntl::fcntl(&own, nix::fcntl::FcntlArg::F_DUPFD(100)).unwrap();
        let owned = inherit(fd).unwrap();
        assert_eq!(
            inherit(fd).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        drop(owned);
    }

    #[test]
    fn socket_info_tells_listener_from_file() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let info = socket_info(l.as_raw_fd()).unwrap();
        assert!(info.listening);
        assert_eq!(info.protocol, libc::IPPROTO_TCP);
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(
            socket_info(f.as_raw_fd()).unwrap_err().raw_os_error(),
            Some(libc::ENOTSOCK)
        );
    }
}
