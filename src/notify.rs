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

use std::os::fd::BorrowedFd;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::env::{LISTEN_VARS, NOTIFY_SOCKET};

/// Sends one notification datagram to `NOTIFY_SOCKET`, if it is set.
/// Failures are logged at debug level and otherwise ignored: a missing
/// supervisor must never stop an upgrade.
pub(crate) fn notify(message: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let result = UnixDatagram::unbound()
        .and_then(|sock| sock.send_to_addr(message.as_bytes(), &notify_addr(&path)?));
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
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    crate::sys::send_with_fds(&notify_addr(&path)?, message.as_bytes(), fds)?;
    Ok(true)
}

/// The address `NOTIFY_SOCKET` names: a path, or with a leading `@` an
/// abstract name (sd_notify(3)).
fn notify_addr(var: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    match var.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(var),
    }
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
    pub(crate) fn from_env(claims: &crate::sys::Claims) -> Activated {
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
            match claims.inherit(fd) {
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
