//! A descriptor's close-on-exec flag, and waiting for descriptors to be readable.

use super::*;

/// Marks every fd from `first` upward close-on-exec with one
/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)` call (Linux 5.11).
///
/// This is the "deny by default" step before an exec, and the way the new
/// image makes every inherited fd close-on-exec again in one syscall.
pub(crate) fn cloexec_from(first: RawFd) -> io::Result<()> {
    let first =
        libc::c_uint::try_from(first).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags; it
    // closes nothing and touches no memory of ours.
    unsafe {
        syscall!(syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ))
    }
    .map(drop)
}

/// Sets or clears `FD_CLOEXEC` on a raw fd (with `F_SETFD`, never `F_SETFL`).
///
/// Works on raw numbers because the kept fds are borrowed from the
/// application only for the duration of the exec.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD takes an int and changes only the fd's flags; an fd
    // that is not open yields EBADF, which we report.
    unsafe { syscall!(fcntl(fd, libc::F_SETFD, flag)) }.map(drop)
}

/// Whether the open fd `fd` is close-on-exec (`F_GETFD`); `EBADF` if it is
/// not open.
pub(crate) fn is_cloexec(fd: RawFd) -> io::Result<bool> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only reads the fd's flags.
    let flags = unsafe { syscall!(fcntl(fd, libc::F_GETFD)) }?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// A new descriptor for `fd`'s open file, close-on-exec, at the lowest
/// free number from `min` up (`F_DUPFD_CLOEXEC`): exactly `min` if that is
/// free. It never closes anything, whatever other threads do meanwhile.
pub(crate) fn dup_at_least(fd: std::os::fd::BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD_CLOEXEC takes an int and touches no memory of ours;
    // the number it returns is a new descriptor that nothing else owns.
    let new = unsafe { syscall!(fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min)) }?;
    // SAFETY: see above: a descriptor just made for this call alone.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Waits until `fd` is readable, for at most `timeout` (`poll`). `Ok(false)`
/// if the time ran out or a signal interrupted the wait: the caller checks
/// its own deadline and asks again.
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Waits until at least one of `fds` is readable or at its end, for at most
/// `timeout` (`poll`); says which. All `false` if the time ran out or a
/// signal interrupted the wait: the caller checks its own deadline and asks
/// again. A pipe whose writers are gone counts as readable (its read returns
/// 0), so a caller that stops reading an ended pipe stops passing it.
pub(crate) fn readable_among(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: std::time::Duration,
) -> io::Result<Vec<bool>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut polled, PollTimeout::from(ms)) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(vec![false; fds.len()]),
        Ok(_) => Ok(polled
            .iter()
            .map(|p| {
                p.revents().is_some_and(|r| {
                    !(r & (PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)).is_empty()
                })
            })
            .collect()),
        Err(e) => Err(e.into()),
    }
}

/// Points descriptor `fd` at `null` (an open `/dev/null`; `dup3` over it,
/// close-on-exec): this process's reference to what `fd` named (a socket
/// handed to another process) is dropped, while the number stays open and
/// owned by whoever owned it, so no later `open` is handed that number.
/// Used by an old process that stays after a migration: the new process's
/// connections must end when it closes them.
///
/// The owner of `fd` then reads end-of-file and writes into nothing: the
/// caller guarantees no code of the application runs on that descriptor
/// any more (the staying process runs no application code again, and the
/// runtime refuses to stay with copies of sockets that other threads keep).
pub(crate) fn close_handed_over(null: std::os::fd::BorrowedFd<'_>, fd: RawFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup3 changes which file the number `fd` names, in one step:
    // the number never dangles and is never free for another `open`; no
    // memory is touched. Which file it names is the caller's contract (see
    // above).
    unsafe { syscall!(dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC)) }.map(drop)
}
