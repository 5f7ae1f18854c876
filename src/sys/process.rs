//! Processes at the system level: signalling and reaping a child by its
//! PID, which thread we are on, who we run as, and whether a file may be
//! executed. (Children named by a pidfd are in the parent module.)

use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Sends SIGKILL to process `pid`.
///
/// Only for a child of ours that is not reaped yet (its number cannot be
/// reused until then); anything else goes through a pidfd
/// ([`super::pidfd_kill`]).
pub(crate) fn kill(pid: i32) -> io::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    Ok(())
}

/// The process group of process `pid`.
pub(crate) fn process_group_of(pid: i32) -> io::Result<i32> {
    Ok(nix::unistd::getpgid(Some(Pid::from_raw(pid)))?.as_raw())
}

/// Moves this process into process group `pgid` (of its own session).
pub(crate) fn join_process_group(pgid: i32) -> io::Result<()> {
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(pgid))?;
    Ok(())
}

/// Names the calling thread (`PR_SET_NAME`; on the main thread, the
/// process's name in `ps`, `pgrep`, `/proc/PID/comm`), cut at 15 bytes.
pub(crate) fn set_thread_name(name: &std::ffi::CStr) -> io::Result<()> {
    nix::sys::prctl::set_name(name)?;
    Ok(())
}

/// Whether child `pid` has exited, without reaping it: while it is a
/// zombie, its PID (and a process group it leads) cannot be reused.
pub(crate) fn has_exited(pid: i32) -> io::Result<bool> {
    use nix::sys::wait::{Id, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    Ok(waitid(Id::Pid(Pid::from_raw(pid)), flags)? != WaitStatus::StillAlive)
}

/// Sends SIGKILL to every process of process group `pgid`.
pub(crate) fn kill_group(pgid: i32) -> io::Result<()> {
    nix::sys::signal::killpg(Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL)?;
    Ok(())
}

/// Waits until child `pid` has exited and reaps it (retrying on `EINTR`).
pub(crate) fn reap(pid: i32) -> io::Result<()> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Reaps every child that already exited, without waiting for live ones.
pub(crate) fn reap_exited_children() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Whether the calling thread is the process's main thread (its thread id
/// is the process id).
#[cfg(feature = "tokio")]
pub(crate) fn on_main_thread() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
}

/// The process's real user id.
pub(crate) fn real_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The process's effective user id.
pub(crate) fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Checks that this process may execute `path` (`access(X_OK)`).
pub(crate) fn check_executable(path: &Path) -> io::Result<()> {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)?;
    Ok(())
}
