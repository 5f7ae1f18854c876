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

use crate::sys;

/// Signals blocked from the exec until the new image has its handlers:
/// exactly those the runtime handles (SIGHUP, SIGTERM, SIGINT, SIGUSR1,
/// SIGUSR2). A signal held across the exec with no handler waiting for it
/// would meet its default action (for these, death) when the new image
/// unblocks it.
pub const HELD_SIGNALS: [i32; 5] = [
    libc::SIGHUP,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks [`HELD_SIGNALS`] (before an exec).
pub(crate) fn hold() -> io::Result<()> {
    hold_saving().map(drop)
}

/// Blocks [`HELD_SIGNALS`] and returns the mask as it was, for
/// [`restore_mask`].
pub(crate) fn hold_saving() -> io::Result<sys::SavedMask> {
    sys::block_signals(&HELD_SIGNALS)
}

/// Puts back a mask saved by [`hold_saving`].
pub(crate) fn restore_mask(mask: &sys::SavedMask) -> io::Result<()> {
    sys::restore_mask(mask)
}

/// Unblocks [`HELD_SIGNALS`] and the crash signals: a rollback executed
/// from a crash handler arrives with that signal still blocked.
pub(crate) fn release_all() -> io::Result<()> {
    let mut all = HELD_SIGNALS.to_vec();
    all.extend(sys::rollback::FATAL_SIGNALS);
    sys::unblock_signals(&all)
}

/// The flags the handlers set, and the socket pair that wakes the loop.
#[derive(Debug)]
pub(crate) struct Requests {
    pub upgrade: Arc<AtomicBool>,
    /// SIGUSR2: a migration to a new process (see [`crate::migration`]).
    pub migrate: Arc<AtomicBool>,
    pub shutdown: Arc<AtomicBool>,
    pub save: Arc<AtomicBool>,
    pub rx: UnixStream,
    pub tx: Arc<OwnedFd>,
}

impl Requests {
    /// Installs the handlers: SIGHUP asks for an upgrade, SIGUSR2 for a
    /// migration to a new process, SIGTERM and SIGINT for a shutdown,
    /// SIGUSR1 for a snapshot saved to a file.
    ///
    /// One `socketpair` (non-blocking and close-on-exec from the start) and
    /// one `sigaction` per signal: the fewest syscalls that can fail.
    pub(crate) fn install() -> io::Result<Self> {
        let (rx, tx) = sys::wake_pair()?;
        let tx = Arc::new(tx);
        let upgrade = Arc::new(AtomicBool::new(false));
        let migrate = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(AtomicBool::new(false));
        let save = Arc::new(AtomicBool::new(false));
        for (sig, flag) in [
            (libc::SIGHUP, &upgrade),
            (libc::SIGUSR2, &migrate),
            (libc::SIGTERM, &shutdown),
            (libc::SIGINT, &shutdown),
            (libc::SIGUSR1, &save),
        ] {
            sys::on_signal(sig, Arc::clone(flag), Arc::clone(&tx))?;
        }
        Ok(Self {
            upgrade,
            migrate,
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
            (&self.upgrade, libc::SIGHUP),
            (&self.migrate, libc::SIGUSR2),
            (&self.save, libc::SIGUSR1),
        ] {
            // Raised with the signals held: pending, for the new image.
            if take(flag) {
                let _ = sys::raise(sig);
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
    sys::wake_socket(tx.as_fd());
}

/// Takes a flag: true once per request.
pub(crate) fn take(flag: &AtomicBool) -> bool {
    flag.swap(false, Ordering::SeqCst)
}
