//! The async-signal-safe half of rollback: executing the old binary again
//! from a signal handler, an `atexit` hook or a panic hook.
//!
//! # Correct order of handling
//!
//! Everything that allocates happens in [`arm`], while the new image is
//! still an ordinary program: the argument and environment vectors are built
//! as C strings, the pointer arrays are laid out, and one environment entry
//! (`COPYOVER_ROLLBACK_REASON=`) gets a fixed-size slot for the reason. The
//! plan is then published through one `AtomicPtr`.
//!
//! [`fire`] and the handlers then use only async-signal-safe operations
//! (POSIX.1-2008, `signal-safety(7)`): atomic loads and swaps, byte copies
//! into the pre-allocated slot, `sigprocmask`, `execveat` and `write`, and
//! `_exit`. They never allocate, lock or log.
//!
//! # Why not signal-hook here
//!
//! The reload and shutdown signals go through `signal-hook` (see
//! `crate::signal`). These handlers do not, for two reasons: SIGSEGV, SIGILL
//! and SIGFPE are in signal-hook's `FORBIDDEN` set (only its `unchecked`
//! calls take them); and at `ready` the image must get back exactly the
//! actions it had (Rust's own stack-overflow handler for SIGSEGV and
//! SIGBUS, the defaults for the rest), while signal-hook, once it has put
//! its handler on a signal, keeps it there for the life of the process
//! (unregistering an action does not restore the previous one): every
//! later crash would go through it. So [`arm`] saves each previous
//! `sigaction` and [`disarm`] puts it back.
//!
//! [`disarm`] restores the previous signal actions and unpublishes the plan.
//! A plan can be published again ([`arm`] a second time) once more is known
//! (the descriptors, the holder): handlers are installed only once. A plan
//! is never changed once published (a handler on another thread may be
//! reading it): the second one replaces it whole, and the signal actions
//! the handlers replaced are kept apart from it.
//! The plan itself is leaked on purpose: a handler running on another thread
//! may still hold its pointer, and a few hundred bytes per upgrade are cheap.

use std::ffi::{CString, c_char, c_int};
use std::io;
use std::os::fd::RawFd;

use super::syscall;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};

/// Signals that mean "the new image died": they run the rollback.
pub(crate) const FATAL_SIGNALS: [c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGALRM,
];

/// Room for the reason, in bytes, including the terminating NUL.
const REASON_CAP: usize = 160;

struct Plan {
    /// The process that armed the plan: a forked child never fires it.
    pid: libc::pid_t,
    binary_fd: RawFd,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    reason: *mut u8,
    blocked: libc::sigset_t,
    /// Descriptors the old binary needs, made inheritable at the exec.
    fds: Vec<RawFd>,
    /// The holder (see `sys::holder`), whose descriptor table still has
    /// every one of `fds` as the old image left it; -1 if there is none.
    holder_pidfd: RawFd,
    /// The old image's `RLIMIT_NOFILE`, put back before the exec.
    nofile: Option<libc::rlimit>,
    // Owns the strings the pointer arrays point into.
    _strings: Vec<CString>,
    _reason_entry: Box<[u8]>,
}

/// The published plan. A plan is complete before it is published and never
/// changed afterwards (a handler on another thread may be reading it): a
/// new plan replaces it whole.
static PLAN: AtomicPtr<Plan> = AtomicPtr::new(ptr::null_mut());
/// The signal actions the handlers replaced, while they are installed: set
/// by [`arm`], taken and put back by [`disarm`]. Handlers never touch it.
static PREVIOUS: std::sync::Mutex<Vec<(c_int, SigAction)>> = std::sync::Mutex::new(Vec::new());

/// A `sigaction` kept in [`PREVIOUS`].
#[derive(Clone, Copy)]
struct SigAction(libc::sigaction);

// SAFETY: a sigaction is plain data (a handler address, flags, a mask);
// it is only handed back to the kernel.
unsafe impl Send for SigAction {}
// SAFETY: as above; it is never written after it is set.
unsafe impl Sync for SigAction {}
/// Where a rollback stands: none under way ([`IDLE`]), one executing on
/// some thread ([`RUNNING`]), or the last one's exec failed ([`FAILED`]).
static FIRED: AtomicU8 = AtomicU8::new(IDLE);
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const FAILED: u8 = 2;
static ATEXIT_REGISTERED: AtomicBool = AtomicBool::new(false);

/// What a rollback executes, and what it puts back first.
pub(crate) struct PlanSpec {
    /// The old binary, opened at its start-up.
    pub binary_fd: RawFd,
    /// The old image's argument vector.
    pub argv: Vec<CString>,
    /// Its environment (`NAME=value`), the handoff variable (mode rollback)
    /// included.
    pub env: Vec<CString>,
    /// The name of the variable that carries the reason.
    pub reason_var: &'static str,
    /// The signals to block before the exec.
    pub blocked: Vec<c_int>,
    /// The descriptors to make inheritable (and restore from the holder)
    /// just before the exec.
    pub fds: Vec<RawFd>,
    /// A pidfd of the holder, if any. The plan owns it from the moment it
    /// is published (it is never closed while a rollback may need it);
    /// [`disarm`] hands it back.
    pub holder_pidfd: Option<std::os::fd::OwnedFd>,
    /// `RLIMIT_NOFILE` (soft, hard) to put back, if known.
    pub nofile: Option<(u64, u64)>,
}

/// Publishes a rollback plan, replacing any earlier one, and (the first
/// time) installs the handlers for [`FATAL_SIGNALS`] and an `atexit` hook.
///
/// The plan is published before the handlers are installed: if installing
/// them fails, [`fire`] already works, and the caller rolls back with it.
pub(crate) fn arm(spec: PlanSpec) -> io::Result<()> {
    let PlanSpec {
        binary_fd,
        argv,
        env,
        reason_var,
        blocked,
        fds,
        holder_pidfd,
        nofile,
    } = spec;
    let mut entry = Vec::with_capacity(reason_var.len() + 1 + REASON_CAP);
    entry.extend_from_slice(reason_var.as_bytes());
    entry.push(b'=');
    let slot_at = entry.len();
    entry.resize(slot_at + REASON_CAP, 0);
    let mut entry = entry.into_boxed_slice();
    // SAFETY: `slot_at < entry.len()`; the box is never moved or resized
    // while the pointer is in use (it is owned by the leaked plan).
    let reason = unsafe { entry.as_mut_ptr().add(slot_at) };

    let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    argv_ptrs.push(ptr::null());
    let mut envp: Vec<*const c_char> = env.iter().map(|s| s.as_ptr()).collect();
    envp.push(entry.as_ptr().cast());
    envp.push(ptr::null());

    let mut strings = argv;
    strings.extend(env);
    use std::os::fd::IntoRawFd;
    let holder_pidfd = holder_pidfd.map_or(-1, IntoRawFd::into_raw_fd);
    // Also blocked while the rollback runs: the crash signals and SIGALRM,
    // so that no handler of ours interrupts it on this thread. The image
    // that comes back unblocks them (`signal::release_all`).
    let mut blocked = blocked;
    blocked.extend(FATAL_SIGNALS);
    let plan = Box::new(Plan {
        // SAFETY: getpid cannot fail.
        pid: unsafe { libc::getpid() },
        binary_fd,
        argv: argv_ptrs,
        envp,
        reason,
        blocked: sigset(&blocked),
        fds,
        holder_pidfd,
        nofile: nofile.map(|(cur, max)| libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        }),
        _strings: strings,
        _reason_entry: entry,
    });
    let mut installed_actions = PREVIOUS.lock().unwrap_or_else(|p| p.into_inner());
    let installed = !installed_actions.is_empty();
    // A new plan starts with no rollback under way; but one running on
    // another thread (the helper thread claiming descriptors, say) keeps
    // its plan and its course: this arming fails instead.
    if FIRED
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| {
            (f != RUNNING).then_some(IDLE)
        })
        .is_err()
    {
        // The plan is dropped unpublished: the holder's pidfd is closed with
        // it (the plan owns it from `arm` on, see `PlanSpec`).
        if plan.holder_pidfd >= 0 {
            use std::os::fd::FromRawFd;
            // SAFETY: `arm` took this pidfd's ownership above, and the plan
            // was never published: nothing else has the number.
            drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(plan.holder_pidfd) });
        }
        return Err(io::Error::other(
            "a rollback is under way on another thread",
        ));
    }
    let plan = Box::into_raw(plan);
    PLAN.store(plan, Ordering::SeqCst);
    if installed {
        return Ok(());
    }

    let mut previous = Vec::with_capacity(FATAL_SIGNALS.len());
    for sig in FATAL_SIGNALS {
        // SAFETY: a zeroed sigaction is a valid "no handler, empty mask"
        // value, then filled in; `on_fatal_signal` is an extern "C" fn with
        // the signature SA_SIGINFO-less handlers have, and it is
        // async-signal-safe (see the module docs).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_fatal_signal as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_ONSTACK;
        // SAFETY: initialises the mask of a local sigaction.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: a zeroed sigaction is a valid value to be overwritten.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to valid sigaction values.
        let done = unsafe { syscall!(sigaction(sig, &action, &mut old)) };
        if let Err(e) = done {
            // The ones installed so far are put back by `disarm`.
            *installed_actions = previous;
            return Err(e);
        }
        previous.push((sig, SigAction(old)));
    }
    *installed_actions = previous;
    drop(installed_actions);

    if !ATEXIT_REGISTERED.swap(true, Ordering::SeqCst) {
        // SAFETY: `on_exit` is an extern "C" fn taking nothing; atexit keeps
        // the pointer for the life of the process image.
        if unsafe { libc::atexit(on_exit) } != 0 {
            return Err(io::Error::other("atexit registration failed"));
        }
    }
    Ok(())
}

fn sigset(signals: &[c_int]) -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is then initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: as above; `sig` is a signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Unpublishes the plan and puts back the signal actions [`arm`] replaced.
/// Returns the holder's pidfd, which the plan owned (so that no destructor
/// of the failing image could close it before a rollback needs it). The
/// caller cancels the readiness deadline first, so that SIGALRM never meets
/// its default action.
///
/// `timer_off`: whether the deadline was cancelled. If it was not, SIGALRM
/// is left ignored (the caller set that) instead of getting its previous
/// action back, so that the live timer can never kill the process.
pub(crate) fn disarm(timer_off: bool) -> Option<std::os::fd::OwnedFd> {
    let plan = PLAN.swap(ptr::null_mut(), Ordering::SeqCst);
    if plan.is_null() {
        return None;
    }
    // SAFETY: `plan` came from Box::into_raw in `arm` and is never freed
    // (leaked on purpose, see the module docs), so it is valid to read.
    let plan = unsafe { &*plan };
    let previous = std::mem::take(&mut *PREVIOUS.lock().unwrap_or_else(|p| p.into_inner()));
    for (sig, old) in &previous {
        if *sig == libc::SIGALRM && !timer_off {
            continue;
        }
        // SAFETY: `old` is the action the kernel gave us for `sig`.
        unsafe { libc::sigaction(*sig, &old.0, ptr::null_mut()) };
    }
    (plan.holder_pidfd >= 0).then(|| {
        use std::os::fd::FromRawFd;
        // SAFETY: `arm` took ownership of this pidfd (see `PlanSpec`), and
        // the plan is unpublished now, so this is its one owner.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(plan.holder_pidfd) }
    })
}

/// Whether a rollback plan is armed (the new image is not ready yet).
pub(crate) fn armed() -> bool {
    !PLAN.load(Ordering::SeqCst).is_null()
}

/// Executes the old binary with `reason`, if a plan is armed.
///
/// Async-signal-safe, and never allocates. In order: the reason is copied
/// into its slot, the held signals are blocked, the old `RLIMIT_NOFILE` is
/// put back, every descriptor of the plan is made inheritable (taken again
/// from the holder's table with `pidfd_getfd` and `dup3`, so that one the
/// failed image closed, or whose number it reused, is the old image's
/// again), then `execveat` runs. Only the exec is essential: a step before
/// it that fails is skipped.
///
/// Returns only if no plan is armed (then it does nothing) or if the
/// `execveat` failed twice *and* no descriptor was swapped (then it returns
/// that error, and the application's descriptors are still its own, only
/// inheritable). If a copy from the holder was put at some number, a
/// failed exec ends the process (`_exit(70)`), so that no `OwnedFd` of the
/// application names another file: the holder rescues. A second call while
/// the first is running, on another thread, waits: for the first's exec
/// (which ends it too), or, if that exec fails, returns `Interrupted`.
pub(crate) fn fire(reason: &[u8]) -> io::Error {
    let plan = PLAN.load(Ordering::SeqCst);
    if plan.is_null() {
        // A constant error: this path must not allocate.
        return io::Error::from(io::ErrorKind::NotFound);
    }
    // SAFETY: see `disarm`; the plan is never freed.
    let plan = unsafe { &*plan };
    // SAFETY: getpid cannot fail.
    if unsafe { libc::getpid() } != plan.pid {
        // A child forked by the new image: its exit or crash is its own.
        return io::Error::from(io::ErrorKind::NotFound);
    }
    // SAFETY: sigprocmask is async-signal-safe; `blocked` is initialised.
    // From here no handler of ours runs on this thread.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &plan.blocked, ptr::null_mut()) };
    if FIRED
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| {
            (f != RUNNING).then_some(RUNNING)
        })
        .is_err()
    {
        // A rollback is already under way on another thread: wait for its
        // exec, which ends this thread too. (On this thread no handler of
        // ours runs: every signal whose handler fires is blocked above.)
        // If that exec fails, its error is this call's too.
        let tick = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        while FIRED.load(Ordering::SeqCst) == RUNNING {
            // SAFETY: nanosleep is async-signal-safe and reads one timespec.
            unsafe { libc::nanosleep(&tick, ptr::null_mut()) };
        }
        return io::Error::from(io::ErrorKind::Interrupted);
    }
    // The deadline must not fire in the old image before it cancels it.
    let off = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
    };
    // SAFETY: setitimer is a plain syscall reading one itimerval.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &off, ptr::null_mut()) };
    let n = reason.len().min(REASON_CAP - 1);
    // SAFETY: the slot has REASON_CAP bytes; we write n < REASON_CAP bytes
    // and a NUL. The source and the slot do not overlap.
    unsafe {
        ptr::copy_nonoverlapping(reason.as_ptr(), plan.reason, n);
        *plan.reason.add(n) = 0;
    }
    if let Some(limit) = &plan.nofile {
        // SAFETY: setrlimit reads one initialised rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) };
    }
    let mut swapped = false;
    for &fd in &plan.fds {
        swapped |= restore_fd(plan.holder_pidfd, fd);
    }
    // Tried twice: one failed call (ENOMEM, EAGAIN, an injected fault) must
    // not end a rollback.
    for _ in 0..2 {
        // SAFETY: argv and envp are NULL-terminated arrays of pointers to
        // NUL-terminated strings owned by the leaked plan.
        unsafe { super::execveat_prepared(plan.binary_fd, plan.argv.as_ptr(), plan.envp.as_ptr()) };
    }
    let err = io::Error::last_os_error();
    if swapped {
        // Some numbers now name the old image's descriptors, not the ones
        // the application's `OwnedFd`s were opened as: going back to it
        // would hand it other files. End the process instead: the holder,
        // which waits on it, starts the old binary with everything.
        write_stderr(b"copyover: the rollback's exec failed after its descriptors were put back; exiting for the holder to rescue\n");
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(70) }
    }
    // Another thread waiting on this rollback returns now, and a later
    // call may try again.
    FIRED.store(FAILED, Ordering::SeqCst);
    err
}

/// Makes `fd` the old image's descriptor again, inheritable: a copy taken
/// from the holder's table if there is a holder, else the flag cleared on
/// what is there. Returns whether the number now names another open file
/// description than before (a copy was put there). Async-signal-safe: raw
/// syscalls only.
fn restore_fd(holder_pidfd: RawFd, fd: RawFd) -> bool {
    if holder_pidfd >= 0 {
        // SAFETY: pidfd_getfd takes integers and returns a new fd or -1.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, holder_pidfd, fd, 0) } as RawFd;
        if got >= 0 {
            if got != fd {
                // SAFETY: dup3 and close on numbers this process holds; the
                // number `fd` belongs to the old image from here on, and
                // `got` is a fresh copy nobody else knows of.
                let placed = unsafe {
                    let placed = libc::dup3(got, fd, 0);
                    libc::close(got);
                    placed
                };
                if placed == -1 {
                    // (EBADF: `fd` is above a lowered hard RLIMIT_NOFILE.)
                    // What is at `fd` is still the old image's, unless the
                    // failed image closed it: make it inheritable.
                    // SAFETY: F_SETFD only changes the flags of `fd`.
                    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
                    return false;
                }
                return true;
            }
            // SAFETY: F_SETFD only changes the flags of `fd`.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
            return false;
        }
    }
    // SAFETY: F_SETFD only changes the flags of `fd` (EBADF if closed).
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    false
}

/// Writes `msg` to stderr with one `write(2)`: async-signal-safe.
fn write_stderr(msg: &[u8]) {
    // SAFETY: `msg` is valid for `msg.len()` bytes.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

extern "C" fn on_fatal_signal(sig: c_int) {
    let mut buf = [0u8; 64];
    let reason: &[u8] = if sig == libc::SIGALRM {
        b"the new image was not ready before the readiness deadline"
    } else {
        let prefix = b"the new image was killed by signal ";
        buf[..prefix.len()].copy_from_slice(prefix);
        let len = prefix.len()
            + super::write_decimal(&mut buf[prefix.len()..], sig.unsigned_abs().into());
        &buf[..len]
    };
    let _ = fire(reason);
    write_stderr(b"copyover: rollback exec failed after a fatal signal; exiting\n");
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(70) }
}

extern "C" fn on_exit() {
    if armed() {
        let _ = fire(b"the new image exited before it was ready");
        write_stderr(b"copyover: rollback exec failed at exit\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::process::{Command, Stdio};

    /// Set in the re-executed test binary that plays the failing image.
    const CHILD: &str = "COPYOVER_TEST_FAILED_ROLLBACK_EXEC";

    /// Runs test `name` again in a process of its own, with `var` set (the
    /// rollback installs handlers and ends the process), and returns how it
    /// ended and what it wrote.
    fn in_own_process(name: &str, var: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1"])
            .env(var, "1")
            .stdin(Stdio::piped())
            .output()
            .unwrap()
    }

    #[test]
    fn a_failed_exec_after_a_swap_never_returns() {
        if std::env::var_os(CHILD).is_some() {
            failing_image();
        }
        let status = in_own_process(
            "sys::rollback::tests::a_failed_exec_after_a_swap_never_returns",
            CHILD,
        );
        // 1: `fire` returned with fd 0 naming the holder's /dev/zero, not
        // this process's pipe.
        assert_eq!(
            status.status.code(),
            Some(70),
            "a failed rollback exec after a swap must end the process: {status:?}"
        );
        // And it says why, for the operator reading the server's log.
        let said = String::from_utf8_lossy(&status.stderr);
        assert!(
            said.contains("the rollback's exec failed after its descriptors were put back"),
            "{said}"
        );
    }

    /// Set in the re-executed test binary that arms a plan with no holder.
    const NO_HOLDER: &str = "COPYOVER_TEST_PLAN_WITHOUT_HOLDER";

    #[test]
    fn a_plan_without_a_holder_gives_no_holder_back() {
        if std::env::var_os(NO_HOLDER).is_some() {
            image_without_a_holder();
        }
        let status = in_own_process(
            "sys::rollback::tests::a_plan_without_a_holder_gives_no_holder_back",
            NO_HOLDER,
        )
        .status;
        // 1: `disarm` handed back a "holder pidfd" that was another fd.
        assert_eq!(status.code(), Some(0), "{status:?}");
    }

    /// Arms a plan whose holder pidfd is unknown (the new image could not
    /// open one), disarms it, and says whether it got no pidfd back.
    fn image_without_a_holder() -> ! {
        let binary = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        arm(PlanSpec {
            binary_fd: binary.as_raw_fd(),
            argv: vec![CString::new("old").unwrap()],
            env: Vec::new(),
            reason_var: "COPYOVER_ROLLBACK_REASON",
            blocked: Vec::new(),
            fds: Vec::new(),
            holder_pidfd: None,
            nofile: None,
        })
        .unwrap();
        let back = disarm(true);
        let code = i32::from(back.is_some());
        std::mem::forget(back);
        // SAFETY: ends this test process at once, without the atexit hook.
        unsafe { libc::_exit(code) }
    }

    /// fd 0 is a pipe here; the "holder" (a `sleep`) has /dev/zero at 0;
    /// the "old binary" is /dev/null, which cannot be executed.
    fn failing_image() -> ! {
        use std::os::unix::fs::FileTypeExt;
        let zero = std::fs::File::open("/dev/zero").unwrap();
        // Its output is not the test's: it outlives this process (which
        // ends in `fire`), for a few seconds.
        let mut holder = Command::new("sleep")
            .arg("5")
            .stdin(zero)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pidfd = crate::sys::pidfd_open(holder.id() as i32).unwrap();
        let binary = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        arm(PlanSpec {
            binary_fd: binary.as_raw_fd(),
            argv: vec![CString::new("old").unwrap()],
            env: Vec::new(),
            reason_var: "COPYOVER_ROLLBACK_REASON",
            blocked: Vec::new(),
            fds: vec![0],
            holder_pidfd: Some(pidfd),
            nofile: None,
        })
        .unwrap();
        let _ = fire(b"a test");
        let swapped =
            std::fs::metadata("/proc/self/fd/0").is_ok_and(|m| m.file_type().is_char_device());
        let _ = holder.kill();
        let _ = holder.wait();
        // SAFETY: ends this test process at once, without the atexit hook
        // (which would fire the rollback again).
        unsafe { libc::_exit(if swapped { 1 } else { 2 }) }
    }
}
