//! The thin system layer: every raw syscall and every `unsafe` block of the
//! crate lives here or in [`rollback`].
//!
//! Each function is a small, documented wrapper returning `io::Result`. The
//! rest of the crate is safe Rust on `OwnedFd` / `BorrowedFd` and calls these
//! functions (or `nix`'s safe wrappers) only.

pub(crate) mod holder;
pub(crate) mod rollback;

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

/// `MFD_NOEXEC_SEAL` (Linux 6.3): the memfd can never be made executable.
/// Not yet exported by every `libc` release, so it is spelled out here.
const MFD_NOEXEC_SEAL: libc::c_uint = 0x0008;

/// Creates an anonymous memory file for a snapshot: close-on-exec, sealable,
/// and never executable where the kernel knows `MFD_NOEXEC_SEAL`.
///
/// Falls back to creating it without `MFD_NOEXEC_SEAL` on kernels older than
/// 6.3, which reject the flag with `EINVAL`. `MFD_EXEC` is never asked for.
pub(crate) fn memfd_create(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    for flags in [base | MFD_NOEXEC_SEAL, base] {
        // SAFETY: `name` is a valid NUL-terminated string that outlives the
        // call; the flags are plain integers. The kernel returns a fresh fd
        // that nothing else owns, or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by memfd_create and is owned by
            // nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Err(io::Error::last_os_error())
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

/// Takes ownership of an fd number inherited across `execve`: the one way
/// the crate turns a number it was told about (by the handoff variable, the
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
pub(crate) fn inherit(fd: RawFd) -> io::Result<OwnedFd> {
    let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
    claim(&mut claimed, fd)
}

/// [`inherit`] for many numbers at once (one lock for all): the result for
/// each, in order.
pub(crate) fn inherit_all(fds: impl IntoIterator<Item = RawFd>) -> Vec<io::Result<OwnedFd>> {
    let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
    fds.into_iter().map(|fd| claim(&mut claimed, fd)).collect()
}

/// The numbers claimed in this process image, one bit each.
static CLAIMED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

fn claim(claimed: &mut Vec<u64>, fd: RawFd) -> io::Result<OwnedFd> {
    // `F_GETFD` fails only with EBADF on Linux; anything else (a fault
    // injected for a test, say) is asked once more rather than taken as
    // "not ours", which would leave an open client unowned.
    let cloexec = match is_cloexec(fd) {
        Err(e) if e.raw_os_error() != Some(libc::EBADF) => is_cloexec(fd),
        other => other,
    }?;
    if cloexec {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is close-on-exec, so the previous image did not leave it for us",
        ));
    }
    // `is_cloexec` refused negative numbers (EBADF).
    let (word, bit) = (fd as usize / 64, 1u64 << (fd as usize % 64));
    if claimed.len() <= word {
        claimed.resize(word + 1, 0);
    }
    if claimed[word] & bit != 0 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it was already claimed",
        ));
    }
    claimed[word] |= bit;
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
    // strings that outlive the call; "" with AT_EMPTY_PATH names `fd`.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv_ptrs.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
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

/// Reads an `int` socket option of `SOL_SOCKET` from a raw fd number.
///
/// Takes a raw number: it is how an inherited descriptor is checked before
/// anyone owns it (`getsockopt` has no side effect on any fd; a closed
/// number gives `EBADF`, a file `ENOTSOCK`).
fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes of an int and a
    // socklen_t; the kernel writes at most `len` bytes.
    unsafe {
        syscall!(getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        ))
    }?;
    Ok(val)
}

/// What a socket is, read with two `getsockopt` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// The protocol number (`SO_PROTOCOL`): `IPPROTO_TCP`, 0 for Unix sockets.
    pub protocol: i32,
    /// `SO_ACCEPTCONN`: the socket is listening.
    pub listening: bool,
}

/// Reads `SO_PROTOCOL` and `SO_ACCEPTCONN`; fails with `ENOTSOCK` for a
/// descriptor that is not a socket, `EBADF` for one that is not open.
pub(crate) fn socket_info(fd: RawFd) -> io::Result<SocketInfo> {
    let protocol = getsockopt_int(fd, libc::SO_PROTOCOL)?;
    let listening = getsockopt_int(fd, libc::SO_ACCEPTCONN)? != 0;
    Ok(SocketInfo {
        protocol,
        listening,
    })
}

/// Whether fd number `fd` is a listening socket. A closed or reused number
/// merely gives a wrong answer for a warning.
pub(crate) fn is_listening(fd: RawFd) -> bool {
    getsockopt_int(fd, libc::SO_ACCEPTCONN).is_ok_and(|v| v != 0)
}

/// Reads `SO_TYPE` (`SOCK_STREAM`, `SOCK_DGRAM`, ...); fails with
/// `ENOTSOCK` for a descriptor that is not a socket.
pub(crate) fn socket_type(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SO_TYPE)
}

/// Reads `SO_PROTOCOL` (`IPPROTO_UDP`, 0 for a Unix socket, ...).
pub(crate) fn socket_protocol(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SO_PROTOCOL)
}

/// Reads `SO_DOMAIN` (`AF_UNIX`, `AF_INET`, ...).
pub(crate) fn socket_domain(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SO_DOMAIN)
}

/// A shared mapping of all of a memfd, read-only ([`map_sealed`], a
/// snapshot) or read-write ([`map_region`], a [`crate::Region`]).
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: a read-only mapping's contents cannot change (the memfd is sealed
// against writes and shrinking), so sharing it is like sharing a `&[u8]`; a
// writable one is owned by one `Region`, which hands out `&[u8]` and
// `&mut [u8]` under Rust's borrow rules.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd`, shared. `len == 0` maps nothing.
    fn new(
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
        writable: bool,
        populate: bool,
    ) -> io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
                writable,
            });
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let flags = if populate {
            libc::MAP_SHARED | libc::MAP_POPULATE
        } else {
            libc::MAP_SHARED
        };
        // SAFETY: a fresh mapping chosen by the kernel; it aliases no Rust
        // object. The result is checked for MAP_FAILED.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len, writable })
    }

    /// The mapped bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for the life of `self`
        // (unmapped only in Drop). Nobody else writes them: a read-only
        // mapping is of a sealed memfd; a region's memfd is private to this
        // process: close-on-exec from `boot` on (no child the application
        // starts gets it), inheritable only from our own exec (which ends
        // this mapping) to the next image's `boot` (before that image maps
        // it), and shared with one child only, the holder, which shares our
        // old memory and descriptor table (`CLONE_VM | CLONE_FILES`) but
        // never reads or writes the region; its size is sealed, so no page
        // can vanish under it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, to write (a region).
    ///
    /// # Panics
    ///
    /// If the mapping is read-only: a programmer error inside the crate.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "a read-only mapping");
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`, the mapping is writable, and `&mut self`
        // makes this the only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are exactly what mmap returned; no borrow
            // of the mapping outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Maps `len` bytes of a snapshot memfd read-only, after checking that it is
/// sealed against writing, growing and shrinking (which is what makes the
/// `&[u8]` view sound). Pages are populated in bulk (`MAP_POPULATE`).
pub(crate) fn map_sealed(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
    use std::os::fd::AsRawFd;
    let need = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & need != need {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to map a memfd that is not sealed",
        ));
    }
    Mapping::new(fd, len, false, true)
}

/// Maps all `len` bytes of a memfd read-write, shared, lazily: a region (a
/// new image touches only what it uses) or a snapshot being written before
/// it is sealed. The memfd is private to this process; the caller has
/// checked or just set the file's size.
///
/// `populate`: fault every page in now, in bulk (`MAP_POPULATE`), so that
/// later writes through the mapping take no page faults.
pub(crate) fn map_region(
    fd: std::os::fd::BorrowedFd<'_>,
    len: usize,
    populate: bool,
) -> io::Result<Mapping> {
    Mapping::new(fd, len, true, populate)
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
