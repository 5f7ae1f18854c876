//! Signals: how an upgrade or a shutdown is requested, and which signals
//! are held back across the exec.
//!
//! # Correct order of handling
//!
//! The handlers installed here (through `signal-hook`) only set an atomic
//! flag and write one byte into a socket pair: both async-signal-safe. The
//! event loop polls the other end ([`Copyover::event_fd`]) and acts at a
//! safe point; nothing ever executes from a handler.
//!
//! Across the exec, [`HELD_SIGNALS`] are blocked. The mask and the pending
//! set survive `execve`, handlers do not, and SIGHUP's default action
//! kills: a second SIGHUP during the exec therefore waits, pending, until
//! the new image has installed its handlers and unblocks them. It then asks
//! for one more upgrade; it is never lost and never fatal.
//!
//! [`Copyover::event_fd`]: crate::Copyover::event_fd

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

/// Signals blocked from the exec until the new image has its handlers:
/// exactly those the runtime handles (SIGHUP, SIGTERM, SIGINT, SIGUSR1).
/// A signal held across the exec with no handler waiting for it would meet
/// its default action (for these, death) when the new image unblocks it.
pub const HELD_SIGNALS: [i32; 4] = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

pub(crate) fn held_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HELD_SIGNALS
        .iter()
        .filter_map(|s| Signal::try_from(*s).ok())
    {
        set.add(s);
    }
    set
}

/// Blocks [`HELD_SIGNALS`] (before an exec).
pub(crate) fn hold() -> io::Result<()> {
    hold_saving().map(drop)
}

/// Blocks [`HELD_SIGNALS`] and returns the mask as it was, for
/// [`restore_mask`].
pub(crate) fn hold_saving() -> io::Result<SigSet> {
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&held_set()), Some(&mut old))
        .map_err(io::Error::from)?;
    Ok(old)
}

/// Puts back a mask saved by [`hold_saving`].
pub(crate) fn restore_mask(mask: &SigSet) -> io::Result<()> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None).map_err(io::Error::from)
}

/// Unblocks [`HELD_SIGNALS`] and the crash signals: a rollback executed
/// from a crash handler arrives with that signal still blocked.
pub(crate) fn release_all() -> io::Result<()> {
    let mut set = held_set();
    for sig in crate::sys::rollback::FATAL_SIGNALS {
        if let Ok(s) = Signal::try_from(sig) {
            set.add(s);
        }
    }
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None).map_err(io::Error::from)
}

/// The flags the handlers set, and the socket pair that wakes the loop.
#[derive(Debug)]
pub(crate) struct Requests {
    pub upgrade: Arc<AtomicBool>,
    pub shutdown: Arc<AtomicBool>,
    pub save: Arc<AtomicBool>,
    pub rx: UnixStream,
    pub tx: Arc<OwnedFd>,
}

impl Requests {
    /// Installs the handlers: SIGHUP asks for an upgrade, SIGTERM and SIGINT
    /// for a shutdown, SIGUSR1 for a snapshot saved to a file.
    ///
    /// One `socketpair` (non-blocking and close-on-exec from the start) and
    /// one `sigaction` per signal: the fewest syscalls that can fail.
    pub(crate) fn install() -> io::Result<Self> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (rx, tx) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        let tx = Arc::new(tx);
        let upgrade = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(AtomicBool::new(false));
        let save = Arc::new(AtomicBool::new(false));
        for (sig, flag) in [
            (libc::SIGHUP, &upgrade),
            (libc::SIGTERM, &shutdown),
            (libc::SIGINT, &shutdown),
            (libc::SIGUSR1, &save),
        ] {
            crate::sys::on_signal(sig, Arc::clone(flag), Arc::clone(&tx))?;
        }
        Ok(Self {
            upgrade,
            shutdown,
            save,
            rx: UnixStream::from(rx),
            tx,
        })
    }

    /// Reads every pending wake-up byte.
    pub(crate) fn drain(&self) {
        use std::io::Read;
        let mut buf = [0u8; 256];
        while let Ok(n) = (&self.rx).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// Turns the upgrade and save flags back into signals. Called with the
    /// signals held: they stay pending across the exec and reach the new
    /// image's handlers.
    pub(crate) fn re_raise_pending(&self) {
        for (flag, sig) in [
            (&self.upgrade, Signal::SIGHUP),
            (&self.save, Signal::SIGUSR1),
        ] {
            // Raised with the signals held: pending, for the new image.
            if take(flag) {
                let _ = nix::sys::signal::raise(sig);
            }
        }
    }

    /// Wakes the loop from this process (API-triggered upgrade, probe verdict).
    pub(crate) fn wake(&self) {
        wake(&self.tx);
    }
}

/// Wakes the loop (see `sys::wake_socket`).
pub(crate) fn wake(tx: &OwnedFd) {
    use std::os::fd::AsFd;
    crate::sys::wake_socket(tx.as_fd());
}

/// Takes a flag: true once per request.
pub(crate) fn take(flag: &AtomicBool) -> bool {
    flag.swap(false, Ordering::SeqCst)
}
