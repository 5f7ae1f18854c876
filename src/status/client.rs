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

/// Asks the process a status file describes for a **gradual** migration
/// (see [`crate::migration`]): `batch` users at a time, one batch every
/// `every`. The request is written to `PID.migrate` in `dir` (the status
/// directory the server uses), then SIGUSR2 is sent under the checks of
/// [`request_upgrade`]; the server reads and removes the file.
///
/// # Errors
///
/// Writing the file, or as [`request_upgrade`].
pub fn request_gradual_migration(
    status: &Status,
    dir: &Path,
    batch: usize,
    every: std::time::Duration,
    stay: bool,
) -> io::Result<()> {
    let text = format!(
        "gradual {} {}{}\n",
        batch.max(1),
        every.as_millis(),
        if stay { " stay" } else { "" }
    );
    write_request(status, dir, &text)
}

/// Asks for a whole migration after which the old process **stays**,
/// serving nobody, until it is stopped (SIGTERM), instead of exiting
/// (`whole stay` in `PID.migrate`, then SIGUSR2; see
/// [`request_gradual_migration`]; `stay` there does the same).
///
/// # Errors
///
/// As [`request_gradual_migration`].
pub fn request_staying_migration(status: &Status, dir: &Path) -> io::Result<()> {
    write_request(status, dir, "whole stay\n")
}

/// Asks the old process of a gradual migration under way to move every
/// user back from the new process, which then exits (`back` in
/// `PID.migrate`, then SIGUSR2; see [`request_gradual_migration`]).
///
/// # Errors
///
/// As [`request_gradual_migration`].
pub fn request_move_back(status: &Status, dir: &Path) -> io::Result<()> {
    write_request(status, dir, "back\n")
}

/// Prepares the next migration of the process a status file describes,
/// without starting it: the migration starts when an external newcomer
/// connects to its migration socket (`COPYOVER_JOIN`, see
/// [`crate::migration`]). `gradual`: users a batch at a time (how many,
/// how often); `stay`: the old process stays after it. Only the request
/// file is written (`PID.migrate`); it applies to whichever migration
/// starts next.
///
/// # Errors
///
/// Writing the file.
pub fn prepare_migration(
    status: &Status,
    dir: &Path,
    gradual: Option<(usize, std::time::Duration)>,
    stay: bool,
) -> io::Result<()> {
    let stay = if stay { " stay" } else { "" };
    let text = match gradual {
        Some((batch, every)) => format!("gradual {} {}{stay}\n", batch.max(1), every.as_millis()),
        None => format!("whole{stay}\n"),
    };
    check_dir(dir)?;
    write_replacing(dir, &request_path(dir, status.pid), text.as_bytes(), false)
}

fn write_request(status: &Status, dir: &Path, text: &str) -> io::Result<()> {
    check_dir(dir)?;
    let path = request_path(dir, status.pid);
    write_replacing(dir, &path, text.as_bytes(), false)?;
    let sent = signal_checked(status, libc::SIGUSR2);
    if sent.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    sent
}

/// Where a migration request for process `pid` waits.
fn request_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.migrate"))
}

/// This process's pending migration request (`PID.migrate` in the status
/// directory), taken: read and removed. `None` if there is none (a whole
/// migration), or if the directory fails its checks (logged).
pub(crate) fn take_migration_request() -> Option<String> {
    let dir = status_dir();
    if let Err(e) = check_dir(&dir) {
        tracing::warn!(dir = ?dir, "not reading a migration request: {e}");
        return None;
    }
    let path = request_path(&dir, std::process::id());
    let text = read_bounded(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    Some(text)
}

/// Where this process's migration socket goes (`PID.migration` in the
/// status directory), once the directory passed its checks.
pub(crate) fn migration_socket_path() -> io::Result<PathBuf> {
    let dir = status_dir();
    check_dir(&dir)?;
    Ok(dir.join(format!("{}.migration", std::process::id())))
}
