//! Processes named by a pidfd: opening one, signalling through it.

use super::*;

/// `pidfd_open(pid, 0)` (Linux 5.3): a close-on-exec descriptor that names
/// process `pid` for as long as it is open, even after the number is
/// reused.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { syscall!(syscall(libc::SYS_pidfd_open, pid, 0)) }?;
    // SAFETY: the kernel just returned this new fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends SIGKILL to the process a pidfd names (`pidfd_send_signal`).
pub(crate) fn pidfd_kill(pidfd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    pidfd_signal(pidfd, libc::SIGKILL)
}

/// Sends `sig` to the process a pidfd names (`pidfd_send_signal`): never to
/// another process that reused its number.
pub(crate) fn pidfd_signal(pidfd: std::os::fd::BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain integers and a NULL siginfo, as the man page allows.
    unsafe {
        syscall!(syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ))
    }
    .map(drop)
}
