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
//! [`disarm`] restores the previous signal actions and unpublishes the plan.
//! The plan itself is leaked on purpose: a handler running on another thread
//! may still hold its pointer, and a few hundred bytes per upgrade are cheap.

use std::ffi::{CString, c_char, c_int};
use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

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
    binary_fd: RawFd,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    reason: *mut u8,
    blocked: libc::sigset_t,
    previous: Vec<(c_int, libc::sigaction)>,
    // Owns the strings the pointer arrays point into.
    _strings: Vec<CString>,
    _reason_entry: Box<[u8]>,
}

static PLAN: AtomicPtr<Plan> = AtomicPtr::new(ptr::null_mut());
static FIRED: AtomicBool = AtomicBool::new(false);
static ATEXIT_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Publishes a rollback plan and installs the handlers for
/// [`FATAL_SIGNALS`] and an `atexit` hook.
///
/// * `binary_fd`: the old binary, opened at its start-up, not close-on-exec.
/// * `argv`, `env`: the old image's argument vector and its environment
///   (`NAME=value` entries), including the handoff variable.
/// * `reason_var`: the name of the variable that carries the reason.
/// * `blocked`: the signals to block before the exec.
pub(crate) fn arm(
    binary_fd: RawFd,
    argv: Vec<CString>,
    env: Vec<CString>,
    reason_var: &str,
    blocked: &[c_int],
) -> io::Result<()> {
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

    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in blocked {
        // SAFETY: as above; `sig` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }

    let mut strings = argv;
    strings.extend(env);
    let mut plan = Box::new(Plan {
        binary_fd,
        argv: argv_ptrs,
        envp,
        reason,
        blocked: set,
        previous: Vec::new(),
        _strings: strings,
        _reason_entry: entry,
    });

    for sig in FATAL_SIGNALS {
        // SAFETY: a zeroed sigaction is a valid "no handler, empty mask"
        // value, then filled in; `on_fatal_signal` is an extern "C" fn with
        // the signature SA_SIGINFO-less handlers have, and it is
        // async-signal-safe (see the module docs).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_fatal_signal as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_ONSTACK;
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to valid sigaction values.
        if unsafe { libc::sigaction(sig, &action, &mut old) } != 0 {
            return Err(io::Error::last_os_error());
        }
        plan.previous.push((sig, old));
    }

    FIRED.store(false, Ordering::SeqCst);
    PLAN.store(Box::into_raw(plan), Ordering::SeqCst);

    if !ATEXIT_REGISTERED.swap(true, Ordering::SeqCst) {
        // SAFETY: `on_exit` is an extern "C" fn taking nothing; atexit keeps
        // the pointer for the life of the process image.
        if unsafe { libc::atexit(on_exit) } != 0 {
            return Err(io::Error::other("atexit registration failed"));
        }
    }
    Ok(())
}

/// Unpublishes the plan and puts back the signal actions [`arm`] replaced.
/// Returns whether a plan was armed.
pub(crate) fn disarm() -> bool {
    let plan = PLAN.swap(ptr::null_mut(), Ordering::SeqCst);
    if plan.is_null() {
        return false;
    }
    // SAFETY: `plan` came from Box::into_raw in `arm` and is never freed
    // (leaked on purpose, see the module docs), so it is valid to read.
    let plan = unsafe { &*plan };
    for (sig, old) in &plan.previous {
        // SAFETY: `old` is the action the kernel gave us for `sig`.
        unsafe { libc::sigaction(*sig, old, ptr::null_mut()) };
    }
    true
}

/// Whether a rollback plan is armed (the new image is not ready yet).
pub(crate) fn armed() -> bool {
    !PLAN.load(Ordering::SeqCst).is_null()
}

/// Executes the old binary with `reason`, if a plan is armed.
///
/// Async-signal-safe. Returns only if no plan is armed (then it does
/// nothing) or if the `execveat` failed (then it returns that error; the
/// caller should end the process, there is nothing safe left to do).
/// A second call while the first is running never returns: it `_exit`s.
pub(crate) fn fire(reason: &[u8]) -> io::Error {
    let plan = PLAN.load(Ordering::SeqCst);
    if plan.is_null() {
        return io::Error::other("no rollback armed");
    }
    if FIRED.swap(true, Ordering::SeqCst) {
        // A rollback is already under way on another path (for example its
        // exec failed and raised SIGABRT); do not loop.
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(70) }
    }
    // SAFETY: see `disarm`; the plan is never freed.
    let plan = unsafe { &*plan };
    let n = reason.len().min(REASON_CAP - 1);
    // SAFETY: the slot has REASON_CAP bytes; we write n < REASON_CAP bytes
    // and a NUL. The source and the slot do not overlap.
    unsafe {
        ptr::copy_nonoverlapping(reason.as_ptr(), plan.reason, n);
        *plan.reason.add(n) = 0;
    }
    // SAFETY: sigprocmask is async-signal-safe; `blocked` is initialised.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &plan.blocked, ptr::null_mut()) };
    // SAFETY: argv and envp are NULL-terminated arrays of pointers to
    // NUL-terminated strings owned by the leaked plan; "" with
    // AT_EMPTY_PATH executes the file `binary_fd` refers to.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            plan.binary_fd,
            c"".as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
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
        let mut len = prefix.len();
        let mut digits = [0u8; 10];
        let mut d = 0;
        let mut v = sig.unsigned_abs();
        loop {
            digits[d] = b'0' + (v % 10) as u8;
            d += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while d > 0 {
            d -= 1;
            buf[len] = digits[d];
            len += 1;
        }
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
