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

/// How the old image was started: its argument vector and environment
/// (without the handoff variable), written by the commit into a sealed memfd
/// (`exec=FD` in the handoff variable).
///
/// # Format, version 1
///
/// `copyover-exec 1\n`, the argument count as a little-endian `u32`, then
/// every argument and every `NAME=value` entry, each ended by a NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecRecord {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

const RECORD_MAGIC: &[u8] = b"copyover-exec 1\n";

impl ExecRecord {
    pub(crate) fn encode(argv: &[CString], env: &[CString]) -> Vec<u8> {
        let mut out = RECORD_MAGIC.to_vec();
        out.extend_from_slice(&(argv.len() as u32).to_le_bytes());
        for s in argv.iter().chain(env) {
            out.extend_from_slice(s.as_bytes_with_nul());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<ExecRecord> {
        let rest = bytes.strip_prefix(RECORD_MAGIC)?;
        let (count, rest) = rest.split_first_chunk::<4>()?;
        let argc = u32::from_le_bytes(*count) as usize;
        let body = rest.strip_suffix(b"\0").unwrap_or(rest);
        let mut parts: Vec<&[u8]> = if rest.is_empty() {
            Vec::new()
        } else {
            body.split(|b| *b == 0).collect()
        };
        if parts.len() < argc || rest.last().is_some_and(|b| *b != 0) {
            return None;
        }
        let env = parts.split_off(argc);
        Some(ExecRecord {
            argv: parts
                .into_iter()
                .map(|a| CString::new(a).ok())
                .collect::<Option<_>>()?,
            env: env
                .into_iter()
                .map(|e| CString::new(e).ok())
                .collect::<Option<_>>()?,
        })
    }

    /// Encodes the record of `argv` and `env` (`NAME=value` entries) into a
    /// new sealed memfd: the one way a record is made (the probe makes it
    /// ahead; the commit, if the probe could not).
    pub(crate) fn seal(
        argv: &[CString],
        env: &[CString],
    ) -> Result<OwnedFd, crate::snapshot::SnapshotError> {
        crate::snapshot::seal_bytes(c"copyover-exec", &ExecRecord::encode(argv, env))
    }

    /// Reads the record from its sealed memfd.
    pub(crate) fn read(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<ExecRecord> {
        crate::snapshot::check_sealed(fd).map_err(io::Error::other)?;
        let len = crate::sys::file_size(fd)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= 1 << 24)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "an oversized exec record")
            })?;
        let mut bytes = vec![0u8; len];
        let mut at = 0;
        while at < len {
            match crate::sys::read_at(fd, &mut bytes[at..], at as u64)? {
                0 => break,
                n => at += n,
            }
        }
        bytes.truncate(at);
        ExecRecord::decode(&bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a malformed exec record"))
    }
}

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
    pub holder_pidfd: Option<std::os::fd::OwnedFd>,
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
pub(crate) fn disarm() -> Option<std::os::fd::OwnedFd> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::cstring;

    #[test]
    fn an_exec_record_round_trips_and_refuses_garbage() {
        let argv = vec![
            cstring(b"/srv/chat").unwrap(),
            cstring(b"--listen").unwrap(),
        ];
        let env = vec![cstring(b"A=1").unwrap(), cstring(b"EMPTY=").unwrap()];
        let bytes = ExecRecord::encode(&argv, &env);
        let back = ExecRecord::decode(&bytes).unwrap();
        assert_eq!(back.argv, argv);
        assert_eq!(back.env, env);
        let none = ExecRecord::decode(&ExecRecord::encode(&[], &[])).unwrap();
        assert!(none.argv.is_empty() && none.env.is_empty());
        assert!(ExecRecord::decode(b"garbage").is_none());
        assert!(ExecRecord::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut short = RECORD_MAGIC.to_vec();
        short.extend_from_slice(&9u32.to_le_bytes());
        short.extend_from_slice(b"a\0");
        assert!(ExecRecord::decode(&short).is_none());
    }

    #[test]
    fn an_exec_record_is_read_back_from_its_sealed_memfd() {
        use std::os::fd::AsFd;
        let argv = vec![cstring(b"/srv/chat").unwrap(), cstring(b"-v").unwrap()];
        let env = [cstring(b"A=1").unwrap()];
        let fd = ExecRecord::seal(&argv, &env).unwrap();
        let back = ExecRecord::read(fd.as_fd()).unwrap();
        assert_eq!(back.argv, argv);
        assert_eq!(back.env, [cstring(b"A=1").unwrap()]);
    }

    #[test]
    fn an_oversized_exec_record_is_refused() {
        use std::os::fd::AsFd;
        // One argument of 16 MiB: the record is over the 16 MiB cap.
        let argv = [cstring(&vec![b'a'; 1 << 24]).unwrap()];
        let fd = ExecRecord::seal(&argv, &[]).unwrap();
        let err = ExecRecord::read(fd.as_fd()).unwrap_err();
        assert!(err.to_string().contains("oversized"), "{err}");
    }
}
