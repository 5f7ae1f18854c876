//! systemd integration: readiness and reload notifications (`sd_notify`)
//! and socket activation (`LISTEN_FDS`).
//!
//! # Notifications
//!
//! When `NOTIFY_SOCKET` is set, the runtime sends what `Type=notify` and
//! `Type=notify-reload` (systemd 253+; its default reload signal is SIGHUP,
//! the upgrade signal) expect:
//!
//! * `READY=1` when an image is ready (first start, upgraded image, or the
//!   old image after a refusal or a rollback), with a `STATUS=` line;
//! * `RELOADING=1` and `MONOTONIC_USEC=` when an upgrade starts;
//! * `EXTEND_TIMEOUT_USEC=` when a resumed image starts restoring, covering
//!   its readiness deadline.
//!
//! The PID never changes, so no `MAINPID=` juggling is needed, and
//! `NOTIFY_SOCKET` is passed on across the exec. Under `Type=notify` with
//! `ExecReload=copyover upgrade $MAINPID` (the shipped unit, for systemd
//! 252) systemd only records these while the CLI runs; the CLI's exit status
//! decides whether the reload failed, which `Type=notify-reload` cannot say.
//!
//! # Socket activation
//!
//! On a first start, listeners passed by systemd (`LISTEN_PID` equal to our
//! PID, `LISTEN_FDS`, `LISTEN_FDNAMES`) are offered through
//! [`Copyover::take_activated_tcp_listener`](crate::Copyover::take_activated_tcp_listener).
//! The variables are removed at once: after a same-PID exec a stale
//! `LISTEN_PID` would match again, so the runtime never passes them on; a
//! resumed image gets its listeners from the handoff instead.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use crate::env::{LISTEN_VARS, NOTIFY_SOCKET};

/// Sends one notification datagram to `NOTIFY_SOCKET`, if it is set.
/// Failures are logged at debug level and otherwise ignored: a missing
/// supervisor must never stop an upgrade.
pub(crate) fn notify(message: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message.as_bytes(), &addr)
        } else {
            sock.send_to(message.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        tracing::debug!(socket = ?path, "sd_notify failed: {e}");
    }
}

/// Sends one notification datagram with descriptors attached (`SCM_RIGHTS`,
/// for `FDSTORE=1`). Returns `Ok(false)` if `NOTIFY_SOCKET` is not set.
///
/// # Errors
///
/// The socket's or `sendmsg`'s error: unlike [`notify`], the caller needs
/// to know whether the descriptors arrived.
pub(crate) fn notify_with_fds(message: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<bool> {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
    };
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(bytes)?,
    };
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [std::io::IoSlice::new(message.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(true)
}

/// `MONOTONIC_USEC=` of now, for `RELOADING=1`.
pub(crate) fn monotonic_usec() -> u64 {
    crate::sys::monotonic_ns() / 1000
}

/// Listeners passed by systemd socket activation, by name.
#[derive(Debug, Default)]
pub(crate) struct Activated {
    pub fds: Vec<(String, std::os::fd::OwnedFd)>,
}

impl Activated {
    /// Removes the `LISTEN_*` variables without adopting anything (a
    /// resumed image).
    pub(crate) fn from_env_ignored() -> Activated {
        crate::env::forget_listen_vars();
        Activated::default()
    }

    /// Reads and removes the `LISTEN_*` variables; adopts fds 3.. if
    /// `LISTEN_PID` is this process. Called by `boot` on a first start only,
    /// while the process has one thread.
    pub(crate) fn from_env() -> Activated {
        let [pid, count, names] = LISTEN_VARS.map(|var| std::env::var(var).ok());
        crate::env::forget_listen_vars();
        let ours = pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
        let Some(count) = count.and_then(|c| c.parse::<i32>().ok()).filter(|_| ours) else {
            return Activated::default();
        };
        let names: Vec<String> = names
            .map(|n| n.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = Vec::new();
        // Up to 65,536: with the fd store, every kept connection comes back
        // this way after a crash.
        for i in 0..count.clamp(0, 65_536) {
            let fd = 3 + i;
            // systemd passes them inheritable; one that is close-on-exec was
            // opened by this image (a library before `boot`), not passed.
            match crate::sys::inherit(fd) {
                Ok(owned) => {
                    let _ = crate::sys::set_cloexec(fd, true);
                    let name = names
                        .get(i as usize)
                        .cloned()
                        .unwrap_or_else(|| "unknown".into());
                    fds.push((name, owned));
                }
                Err(e) => {
                    tracing::warn!(fd, "LISTEN_FDS names fd {fd}, which cannot be adopted: {e}")
                }
            }
        }
        Activated { fds }
    }
}
