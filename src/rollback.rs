//! Rollback: from the exec until the new image says it is ready, any failure
//! of the new image executes the old binary again, with the untouched sealed
//! snapshot and the same sockets. Same PID, old version, nobody disconnected.
//!
//! The old binary was opened from `/proc/self/exe` when it started, so it
//! is still there after a deploy replaced or deleted its path. Failures
//! covered:
//!
//! * a restore error (bad snapshot, a descriptor of the wrong type): the
//!   runtime calls [`trigger`];
//! * a panic: a panic hook calls it;
//! * a crash signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT): a handler;
//! * the readiness deadline: `ITIMER_REAL` raises SIGALRM;
//! * an exit (`process::exit`, returning from `main`): an `atexit` hook.
//!
//! A process killed by SIGKILL cannot be helped by anyone but its
//! supervisor. The async-signal-safe machinery is in `sys::rollback`.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Once;
use std::time::Duration;

use crate::handoff::{HandoffVar, ROLLBACK_REASON_VAR};
use crate::signal::HELD_SIGNALS;
use crate::sys;

/// Builds and publishes the rollback plan, arms the readiness deadline.
pub(crate) fn arm(
    binary: &OwnedFd,
    argv: &[OsString],
    var: &HandoffVar,
    deadline: Duration,
) -> io::Result<()> {
    let argv: Vec<CString> = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let env = crate::upgrade::exec_env(&var.format())?;
    let held: Vec<i32> = HELD_SIGNALS.iter().map(|s| *s as i32).collect();
    sys::rollback::arm(binary.as_raw_fd(), argv, env, ROLLBACK_REASON_VAR, &held)?;
    install_panic_hook();
    let ms = u64::try_from(deadline.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    sys::set_real_timer(ms)
}

/// Disarms the plan and the deadline: the new image is ready.
pub(crate) fn disarm() -> io::Result<()> {
    sys::rollback::disarm();
    sys::set_real_timer(0)
}

/// Rolls back now with `reason`. Returns only if no rollback is armed or
/// the exec of the old binary failed.
pub(crate) fn trigger(reason: &str) -> io::Error {
    sys::rollback::fire(reason.as_bytes())
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if sys::rollback::armed() {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown payload".into());
                let _ = trigger(&format!("the new image panicked: {msg}"));
            }
        }));
    });
}

pub(crate) fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in an argument or variable",
        )
    })
}
