//! Executing a file open at a descriptor, with arrays prepared ahead
//! (async-signal-safe for the rollback and the holder).

use super::*;

/// Writes `v` in decimal at the start of `out` and returns how many bytes
/// that took (at most 20). Async-signal-safe: no allocation, no formatting
/// machinery; for the holder and the crash handler.
///
/// # Panics
///
/// If `out` is too short for the digits: callers size it for a `u64`.
pub(crate) fn write_decimal(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for (i, d) in digits[..n].iter().rev().enumerate() {
        out[i] = *d;
    }
    n
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)` on pointer arrays built
/// in advance: async-signal-safe (one `syscall(2)`, no allocation), for the
/// rollback's `fire` and the holder. Returns only if the exec failed.
///
/// # Safety
///
/// `argv` and `envp` must be NULL-terminated arrays of pointers to
/// NUL-terminated strings, all valid for the duration of the call.
pub(crate) unsafe fn execveat_prepared(
    fd: RawFd,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) {
    // SAFETY: the caller guarantees the arrays; "" with AT_EMPTY_PATH names
    // `fd`. `syscall` touches nothing but errno, and only on failure.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv,
            envp,
            libc::AT_EMPTY_PATH,
        )
    };
}

/// Executes the file open at `fd` (`execveat(fd, "", argv, envp,
/// AT_EMPTY_PATH)`): exactly the file that was checked, whatever a deploy
/// did to its path since. Returns only on failure.
///
/// A script can only be executed this way if `fd` is not close-on-exec (its
/// interpreter opens `/dev/fd/N`); the caller clears the flag for scripts.
pub(crate) fn execveat(
    fd: RawFd,
    argv: &[std::ffi::CString],
    env: &[std::ffi::CString],
) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: both arrays are NULL-terminated and point to NUL-terminated
    // strings that outlive the call.
    unsafe { execveat_prepared(fd, argv_ptrs.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Makes `cmd`'s child inherit exactly `fds` (and its standard streams):
/// between its fork and its exec, every descriptor from 3 up becomes
/// close-on-exec (one `close_range`: what the parent left inheritable by
/// mistake or on purpose stays behind), then the flag is cleared on `fds`.
pub(crate) fn inherit_only(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the close_range and fcntl system calls, both async-signal-safe;
    // it reads `fds`, allocated before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
}

/// Makes `cmd` clear close-on-exec on `fd` in the child, between its fork
/// and its exec, so that the child can execute `/proc/self/fd/FD` (a
/// script's interpreter opens that path) while the parent's copy stays
/// close-on-exec and never leaks into another child.
pub(crate) fn keep_fd_in_child(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl, which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
}
