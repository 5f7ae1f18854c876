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

use std::ffi::CString;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Once;
use std::time::Duration;

use crate::env::{CLAIM_VAR, ROLLBACK_REASON_VAR, cstring, exec_env, with_handoff};
use crate::signal::HELD_SIGNALS;
use crate::sys;

/// What a rollback needs: the old binary and how it was started, the
/// descriptors to hand back to it, and the holder that keeps copies.
pub(crate) struct Back {
    /// The old binary, opened at its start-up.
    pub binary_fd: RawFd,
    /// The old image's argument vector.
    pub argv: Vec<CString>,
    /// The old image's environment, without the handoff variable; `None`:
    /// this image's (if the old image left no record).
    pub env: Option<Vec<CString>>,
    /// The handoff variable's text for the old binary (mode rollback).
    pub var: String,
    /// The claim variable's text, as this image got it, if any: the old
    /// binary takes the same claim.
    pub claim_var: Option<String>,
    /// The descriptors the old binary reads: the manifest's, the
    /// snapshot's and its own.
    pub fds: Vec<RawFd>,
    /// A pidfd of the holder, handed to the plan by the next [`arm`].
    pub holder_pidfd: Option<OwnedFd>,
    /// The old image's soft `RLIMIT_NOFILE`.
    pub nofile: Option<u64>,
}

/// Builds and publishes the rollback plan (replacing an earlier one), and
/// with `Some(deadline)` arms the readiness deadline.
///
/// Once this returned, or even failed after its first step, [`trigger`]
/// rolls back: a caller that gets an error here triggers the rollback.
pub(crate) fn arm(back: &mut Back, deadline: Option<Duration>) -> io::Result<()> {
    let argv = back.argv.clone();
    let mut env = match &back.env {
        Some(env) => with_handoff(env.clone(), &back.var)?,
        None => exec_env(&back.var)?,
    };
    if let Some(claim) = &back.claim_var {
        env.push(cstring(format!("{CLAIM_VAR}={claim}").as_bytes())?);
    }
    let held = HELD_SIGNALS.to_vec();
    let nofile = back.nofile.map(|soft| {
        let hard = sys::nofile_limit().map_or(soft, |(_, hard)| hard);
        (soft.min(hard), hard)
    });
    sys::rollback::arm(sys::rollback::PlanSpec {
        binary_fd: back.binary_fd,
        argv,
        env,
        reason_var: ROLLBACK_REASON_VAR,
        blocked: held,
        fds: back.fds.clone(),
        holder_pidfd: back.holder_pidfd.take(),
        nofile,
    })?;
    install_panic_hook();
    if let Some(deadline) = deadline {
        let ms = u64::try_from(deadline.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        sys::set_real_timer(ms)?;
    }
    Ok(())
}

/// Disarms the deadline, then the plan: the image is ready. The timer goes
/// first, so that SIGALRM never meets its default (fatal) action. A timer
/// that cannot be cancelled is made harmless: SIGALRM is ignored. Returns
/// the holder's pidfd, which the plan owned.
pub(crate) fn disarm() -> Option<OwnedFd> {
    let timer_off = match sys::set_real_timer(0) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("could not cancel the readiness deadline ({e}); SIGALRM is now ignored");
            sys::ignore_sigalrm();
            false
        }
    };
    sys::rollback::disarm(timer_off)
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
