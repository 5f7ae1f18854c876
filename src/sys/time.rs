//! Time: the monotonic clock, and `ITIMER_REAL`, the readiness deadline.

use super::*;

/// `CLOCK_MONOTONIC` in nanoseconds (0 if the clock cannot be read, which
/// Linux never does). It keeps counting across `execve`, so the old image's
/// timestamps (the snapshot's request and commit times) and the new image's
/// can be subtracted.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Arms (or with `ms == 0` disarms) `ITIMER_REAL`, which raises SIGALRM.
///
/// `ITIMER_REAL` survives `execve`: a new image arms it as its readiness
/// deadline; an image that comes back after a rollback cancels it first
/// thing in `boot`.
pub(crate) fn set_real_timer(ms: u64) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t,
    };
    let it = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: tv,
    };
    // SAFETY: `it` is a valid itimerval; the old value is not requested.
    unsafe { syscall!(setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut())) }.map(drop)
}
