//! The other side: a client (the `copyover` CLI) that pins a server by
//! PID and start time and asks it to upgrade.

use super::*;

/// The start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/PID/stat`), or an error if there is no such process.
pub fn start_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

/// Asks the process a status file describes for an upgrade (SIGHUP), only
/// if it is still that process: the PID is pinned with a pidfd first, then
/// its start time is compared with the file's, then the signal goes
/// through the pidfd. A server that died and whose PID was reused is never
/// signalled (SIGHUP's default action kills).
///
/// # Errors
///
/// `NotFound` if there is no such process, `InvalidData` if the process is
/// not the one that wrote the status (its PID was reused), or the error of
/// `pidfd_open` / `pidfd_send_signal` (`EPERM`: another user's process).
pub fn request_upgrade(status: &Status) -> io::Result<()> {
    signal_checked(status, libc::SIGHUP)
}

/// Asks the process a status file describes for a migration to a new
/// process (SIGUSR2; see [`crate::migration`]), under the same checks as
/// [`request_upgrade`].
///
/// # Errors
///
/// As [`request_upgrade`].
pub fn request_migration(status: &Status) -> io::Result<()> {
    signal_checked(status, libc::SIGUSR2)
}

fn signal_checked(status: &Status, sig: libc::c_int) -> io::Result<()> {
    let pid = i32::try_from(status.pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a PID"))?;
    let pidfd = crate::sys::pidfd_open(pid)?;
    let actual = start_ticks(status.pid)?;
    if status.start_ticks == 0 || actual != status.start_ticks {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "process {} started at tick {actual}, its status file says {}: the PID was reused",
                status.pid, status.start_ticks
            ),
        ));
    }
    use std::os::fd::AsFd;
    crate::sys::pidfd_signal(pidfd.as_fd(), sig)
}
