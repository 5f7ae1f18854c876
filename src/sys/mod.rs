//! The thin system layer: every raw syscall and every `unsafe` block of the
//! crate lives here (mio's `sys` rule).
//!
//! Each function is a small, documented domain operation returning
//! `io::Result` (or a plain answer where nothing can fail). The rest of the
//! crate is safe Rust on `OwnedFd` / `BorrowedFd` and calls these functions,
//! the standard library and the `memfd` crate's safe API: it never calls
//! `nix` or `libc` functions itself (it may name `libc` constants as data).
//!
//! Where things are:
//!
//! - this module: descriptors (close-on-exec, inheriting a number, pidfds),
//!   exec, limits, the environment, timers, the monotonic clock, waiting;
//! - [`memfd`]: creating, sealing, checking and mapping memory files;
//! - [`signal`]: handlers, the wake-up pair, signal masks, SIGALRM;
//! - [`socket`]: what a socket is, `shutdown`, sending descriptors;
//! - [`process`]: killing and reaping by PID, thread and user ids;
//! - [`rollback`] and [`holder`]: the async-signal-safe rollback and the
//!   child that holds the old image;
//! - [`claim`]: the one byte that decides who ends an upgrade, the ready
//!   image or the holder at its deadline.

pub(crate) mod claim;
pub(crate) mod holder;
mod memfd;
mod process;
pub(crate) mod rollback;
mod signal;
mod socket;

pub(crate) use memfd::{
    Mapping, SEALS, allocate, check_sealed, file_size, map_region, map_sealed, memfd_create,
    memfd_io, read_at, seal,
};
#[cfg(feature = "tokio")]
pub(crate) use process::on_main_thread;
pub(crate) use process::{
    check_executable, effective_uid, has_exited, kill, kill_group, real_uid, reap,
    reap_exited_children,
};
#[cfg(all(test, feature = "tokio"))]
pub(crate) use signal::is_blocked;
pub(crate) use signal::{
    SavedMask, block_signals, discard_pending_sigalrm, ignore_sigalrm, on_signal, raise,
    restore_mask, unblock_signals, wake_pair, wake_socket,
};
pub(crate) use socket::{
    is_listening, send_with_fds, shutdown, socket_domain, socket_info, socket_protocol, socket_type,
};

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Runs a libc call that returns `-1` and sets `errno` on failure, and turns
/// that into an `io::Result` of the returned value (mio's `syscall!`).
///
/// Must be used inside an `unsafe` block whose `// SAFETY:` comment covers
/// the call itself.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        let rc = libc::$fn($($arg),*);
        if rc == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }};
}
pub(crate) use syscall;

/// `CLOCK_MONOTONIC` in nanoseconds (0 if the clock cannot be read, which
/// Linux never does). It keeps counting across `execve`, so the old image's
/// timestamps (the snapshot's request and commit times) and the new image's
/// can be subtracted.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

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

/// The right to take ownership of fd numbers inherited across `execve`:
/// the one way the crate turns a number it was told about (by the handoff variable, the
/// manifest or `LISTEN_FDS`) into an `OwnedFd`.
///
/// The number must be open and **not** close-on-exec: that is how the
/// previous image (or systemd) left it for us, and how no descriptor opened
/// by this image looks (Rust's standard library, and this crate, open
/// everything close-on-exec). `boot` calls this before the image opens any
/// descriptor of its own, then makes every fd close-on-exec, after which no
/// number passes the check. Each number is handed out at most once per
/// process image (a second claim is `EEXIST`), so no two owners can close it.
///
/// What this cannot see: a descriptor opened without close-on-exec by
/// foreign code (a C library) before `boot`. `boot` must come first in
/// `main`.
///
/// The check is sound only while this image has opened nothing of its own
/// that it then made inheritable (the commit does that, for the next
/// image). So claiming takes a [`Claims`] token, of which a process image
/// has one, taken by `boot` first thing and gone when `boot` returns:
/// nothing after `boot` can claim a number.
#[derive(Debug)]
pub(crate) struct Claims(());

/// Whether this image's [`Claims`] token was taken.
static CLAIMS_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Claims {
    /// This image's one token; `None` once it was taken (a second `boot`).
    pub(crate) fn take() -> Option<Claims> {
        (!CLAIMS_TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst)).then_some(Claims(()))
    }

    /// A token for a unit test, which claims numbers it made inheritable
    /// itself (tests share one process under `cargo test`).
    #[cfg(test)]
    pub(crate) fn for_tests() -> Claims {
        Claims(())
    }

    /// Takes ownership of inherited number `fd` (see [`Claims`]).
    pub(crate) fn inherit(&self, fd: RawFd) -> io::Result<OwnedFd> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        claim(&mut claimed, fd)
    }

    /// [`inherit`](Self::inherit) for many numbers at once (one lock for
    /// all): the result for each, in order.
    pub(crate) fn inherit_all(
        &self,
        fds: impl IntoIterator<Item = RawFd>,
    ) -> Vec<io::Result<OwnedFd>> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        fds.into_iter().map(|fd| claim(&mut claimed, fd)).collect()
    }
}

/// Runs `f`, and once more if it fails with an error `retry` accepts: one
/// failed call (interrupted, transient, or failed on purpose by a fault
/// injector, which fails one call at a time) must not decide an outcome
/// where a second try is cheap and harmless.
pub(crate) fn once_more<T, E>(
    mut f: impl FnMut() -> Result<T, E>,
    retry: impl Fn(&E) -> bool,
) -> Result<T, E> {
    match f() {
        Err(e) if retry(&e) => f(),
        done => done,
    }
}

/// A set of fd numbers, one bit each: thousands of numbers checked for
/// repeats without hashing (the claims here, the handoff's manifest).
#[derive(Debug, Default)]
pub(crate) struct FdSet(Vec<u64>);

impl FdSet {
    pub(crate) const fn new() -> FdSet {
        FdSet(Vec::new())
    }

    /// Adds `fd`; `false` if it was in the set already.
    pub(crate) fn insert(&mut self, fd: usize) -> bool {
        let (word, bit) = (fd / 64, 1u64 << (fd % 64));
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        let new = self.0[word] & bit == 0;
        self.0[word] |= bit;
        new
    }
}

/// The numbers claimed in this process image.
static CLAIMED: std::sync::Mutex<FdSet> = std::sync::Mutex::new(FdSet::new());

fn claim(claimed: &mut FdSet, fd: RawFd) -> io::Result<OwnedFd> {
    // `F_GETFD` fails only with EBADF on Linux; anything else (a fault
    // injected for a test, say) is asked once more rather than taken as
    // "not ours", which would leave an open client unowned.
    let cloexec = once_more(|| is_cloexec(fd), |e| e.raw_os_error() != Some(libc::EBADF))?;
    if cloexec {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is close-on-exec, so the previous image did not leave it for us",
        ));
    }
    // `is_cloexec` refused negative numbers (EBADF).
    if !claimed.insert(fd as usize) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it was already claimed",
        ));
    }
    // SAFETY: the number is open and inheritable, so (see `inherit`)
    // nothing in this image opened it, and the set makes this its only
    // claim: this `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfd_is_cloexec_and_sealable() {
        let fd = memfd_create(c"t").unwrap();
        let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        nix::fcntl::fcntl(
            fd.as_fd(),
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_GROW),
        )
        .unwrap();
    }

    #[test]
    fn decimals_are_written_in_place() {
        let mut buf = [0u8; 20];
        for (v, want) in [
            (0, &b"0"[..]),
            (4242, b"4242"),
            (u64::MAX, b"18446744073709551615"),
        ] {
            let n = write_decimal(&mut buf, v);
            assert_eq!(&buf[..n], want);
        }
    }

    #[test]
    fn inheriting_checks_and_claims_once() {
        // The one token of this test process (each test runs in its own
        // under nextest; `cargo test` runs only this one that takes it).
        let claims = Claims::take().expect("the claims token");
        assert!(Claims::take().is_none(), "a second token");
        let inherit = |fd| claims.inherit(fd);
        let err = inherit(19_999).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        // Our own fds are close-on-exec: never inherited.
        let own = std::fs::File::open("/proc/self/stat").unwrap();
        use std::os::fd::AsRawFd;
        assert!(inherit(own.as_raw_fd()).is_err());
        // An inheritable one is claimed once.
        let fd = nix::fcntl::fcntl(&own, nix::fcntl::FcntlArg::F_DUPFD(100)).unwrap();
        let owned = inherit(fd).unwrap();
        assert_eq!(
            inherit(fd).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        drop(owned);
    }

    #[test]
    fn socket_info_tells_listener_from_file() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let info = socket_info(l.as_raw_fd()).unwrap();
        assert!(info.listening);
        assert_eq!(info.protocol, libc::IPPROTO_TCP);
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(
            socket_info(f.as_raw_fd()).unwrap_err().raw_os_error(),
            Some(libc::ENOTSOCK)
        );
    }
}
