//! Signals at the system level: handlers that set a flag and wake the
//! loop, the wake-up socket pair itself, the thread's signal mask, and
//! SIGALRM (the readiness deadline's signal). What the signals *mean* is
//! `crate::signal`'s business.

use std::io;
use std::os::fd::OwnedFd;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

// `sigprocmask`, not `pthread_sigmask`: nix reads the latter's result as
// -1 and errno, but it returns the error number itself, so a failure would
// pass for success (a fault injection found it: the signals stayed blocked
// and the next upgrade request was never seen). On Linux `sigprocmask`
// changes the calling thread's mask, as `pthread_sigmask` does.

/// A signal mask as it was, to be put back with [`restore_mask`]. Opaque:
/// nothing above `sys` looks inside.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SavedMask(SigSet);

/// The set of `sigs` (numbers that are not signals are skipped).
fn set_of(sigs: &[libc::c_int]) -> SigSet {
    let mut set = SigSet::empty();
    for s in sigs.iter().filter_map(|s| Signal::try_from(*s).ok()) {
        set.add(s);
    }
    set
}

/// Blocks `sigs` in the calling thread and returns the mask as it was.
pub(crate) fn block_signals(sigs: &[libc::c_int]) -> io::Result<SavedMask> {
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set_of(sigs)), Some(&mut old))?;
    Ok(SavedMask(old))
}

/// Unblocks `sigs` in the calling thread.
pub(crate) fn unblock_signals(sigs: &[libc::c_int]) -> io::Result<()> {
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set_of(sigs)), None)?;
    Ok(())
}

/// Puts back the calling thread's mask saved by [`block_signals`].
pub(crate) fn restore_mask(mask: &SavedMask) -> io::Result<()> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask.0), None)?;
    Ok(())
}

/// Whether `sig` is blocked in the calling thread.
#[cfg(all(test, feature = "tokio"))]
pub(crate) fn is_blocked(sig: libc::c_int) -> bool {
    let mut cur = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, None, Some(&mut cur)).is_ok()
        && Signal::try_from(sig).is_ok_and(|s| cur.contains(s))
}

/// Sends `sig` to this process's calling thread (`raise`): with `sig`
/// blocked, it stays pending (and survives an exec).
pub(crate) fn raise(sig: libc::c_int) -> io::Result<()> {
    let sig = Signal::try_from(sig)?;
    nix::sys::signal::raise(sig)?;
    Ok(())
}

/// The event loop's wake-up pair: a Unix stream socket pair, non-blocking
/// and close-on-exec from the start (one `socketpair`, the fewest syscalls
/// that can fail). The loop reads the first; handlers write the second
/// ([`wake_socket`]).
pub(crate) fn wake_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Writes one byte to the event loop's wake-up socket without blocking; a
/// full buffer (EAGAIN) already means "awake". A few tries: a wake-up lost
/// to EINTR or ENOBUFS would leave the loop asleep until unrelated traffic
/// comes. Async-signal-safe: `send(2)` only (signal-hook saves and restores
/// errno around a handler that calls this).
pub(crate) fn wake_socket(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    for _ in 0..3 {
        // SAFETY: send(2) on a borrowed, open fd; the buffer is a static
        // byte string.
        let sent =
            unsafe { libc::send(fd.as_raw_fd(), b"w".as_ptr().cast(), 1, libc::MSG_DONTWAIT) };
        if sent == 1 || io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
            return;
        }
    }
}

/// Installs a handler for `sig` that sets `flag` and writes one byte to
/// `wake` (`send` with `MSG_DONTWAIT`: a full buffer already means awake).
///
/// The handler owns its `Arc`s for the life of the process (it is never
/// unregistered), so `wake` can never be closed, or its number reused,
/// under it.
pub(crate) fn on_signal(
    sig: libc::c_int,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: std::sync::Arc<OwnedFd>,
) -> io::Result<()> {
    use std::os::fd::AsFd;
    let action = move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        wake_socket(wake.as_fd());
    };
    // SAFETY: the action only makes an atomic store and a send(2), both
    // async-signal-safe; it neither allocates nor locks, and it is never
    // dropped (never unregistered), so no Arc is dropped in a handler.
    unsafe { signal_hook::low_level::register(sig, action) }.map(drop)
}

/// Takes a pending SIGALRM, if any, off this thread and the process
/// (`sigtimedwait` with a zero timeout), so that unblocking SIGALRM cannot
/// deliver it.
pub(crate) fn discard_pending_sigalrm() {
    // SAFETY: a zeroed sigset_t, initialised by sigemptyset/sigaddset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `zero` are valid for the calls; sigtimedwait takes
    // a pending signal of the set or returns EAGAIN at once.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGALRM);
        while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) == libc::SIGALRM {}
    }
}

/// Sets SIGALRM to be ignored: the fallback when an inherited readiness
/// deadline cannot be cancelled, so that it can never kill the process.
pub(crate) fn ignore_sigalrm() {
    // SAFETY: SIG_IGN is a valid disposition for SIGALRM.
    unsafe { libc::signal(libc::SIGALRM, libc::SIG_IGN) };
}
