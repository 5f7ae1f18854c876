//! The process's limits and environment: `RLIMIT_NOFILE`, variables,
//! threads.

use super::*;

/// The soft and hard `RLIMIT_NOFILE`.
pub(crate) fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    unsafe { syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim)) }?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Removes a variable from this process's environment, so that it is not
/// inherited by child processes.
///
/// Only called by `boot`, which first checks that the process has a single
/// thread (see [`thread_count`]), as the Rust docs require.
pub(crate) fn remove_env_var(name: &OsStr) {
    // SAFETY: `boot` calls this only after `thread_count() == 1` was
    // checked, so no other thread can read or write the environment now.
    unsafe { std::env::remove_var(name) }
}

/// Number of threads in this process, from `/proc/self/task`.
pub(crate) fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}
