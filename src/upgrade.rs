//! The upgrade sequence of the old image: preflight, probe, commit, exec.
//!
//! 1. **Preflight** (on the request): the binary path is executable, the
//!    handoff names each fd and each name once.
//! 2. **Probe**: the event loop encodes a first snapshot; a helper thread
//!    writes it, shows it to the new binary in probe mode, and meanwhile
//!    allocates and maps the memfd the commit will use, while the event loop
//!    keeps serving (see [`crate::probe`]).
//! 3. **Commit** (at the next safe point after a positive probe): the state
//!    is encoded again, straight into that prepared memfd, which is then cut
//!    to size and sealed; every fd becomes close-on-exec with one
//!    `close_range`, then exactly the manifest's fds, the snapshot and the
//!    old binary's fd are cleared; [`HELD_SIGNALS`] are blocked. Nothing is
//!    logged from here to the exec.
//! 4. **Exec** of the binary's path with an explicit environment. If
//!    `execve` returns, steps 3's flags and mask are undone and the error is
//!    returned: the old image keeps serving and nothing is lost.
//!
//! [`HELD_SIGNALS`]: crate::signal::HELD_SIGNALS

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::error::UpgradeError;
use crate::handoff::{HANDOFF_VAR, HandoffVar, Mode, ROLLBACK_REASON_VAR};
use crate::probe::PROBE_VAR;
use crate::rollback::cstring;
use crate::snapshot::{Draft, Header, ManifestEntry};
use crate::{signal, sys};

/// Where an upgrade stands after [`Copyover::upgrade`] returned.
///
/// [`Copyover::upgrade`]: crate::Copyover::upgrade
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// The new binary is being probed; keep serving. The event fd wakes the
    /// loop with [`Event::UpgradeApproved`](crate::Event::UpgradeApproved)
    /// once it answered yes (then call `upgrade` again to commit), or with
    /// [`Event::UpgradeRefused`](crate::Event::UpgradeRefused).
    Probing,
}

/// Variables the runtime owns: never passed on as they were.
const STRIPPED_VARS: [&str; 6] = [
    HANDOFF_VAR,
    ROLLBACK_REASON_VAR,
    PROBE_VAR,
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// This process's environment without the runtime's own variables and the
/// stale systemd socket-activation ones (a same-PID exec would match
/// `LISTEN_PID` again), as (name, value) pairs. `NOTIFY_SOCKET` is kept.
pub(crate) fn clean_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !STRIPPED_VARS.iter().any(|s| k.as_bytes() == s.as_bytes()))
        .collect()
}

/// The exec environment: [`clean_env`] plus `COPYOVER_HANDOFF=handoff`.
pub(crate) fn exec_env(handoff: &str) -> io::Result<Vec<CString>> {
    let mut env = Vec::new();
    for (k, v) in clean_env() {
        let mut e = k.into_vec();
        e.push(b'=');
        e.extend_from_slice(v.as_bytes());
        env.push(cstring(&e)?);
    }
    env.push(cstring(format!("{HANDOFF_VAR}={handoff}").as_bytes())?);
    Ok(env)
}

/// Checks that `path` is an executable file.
pub(crate) fn preflight(path: &Path) -> Result<(), UpgradeError> {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).map_err(|e| {
        UpgradeError::Binary {
            path: path.to_owned(),
            source: e.into(),
        }
    })?;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(UpgradeError::Binary {
            path: path.to_owned(),
            source: io::Error::other("not a regular file"),
        }),
        Err(source) => Err(UpgradeError::Binary {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What the commit needs from the runtime.
pub(crate) struct Commit<'a> {
    pub header: Header,
    pub manifest: &'a [ManifestEntry],
    pub own_binary: &'a OwnedFd,
    pub argv: &'a [CString],
    pub requests: &'a signal::Requests,
    /// A memfd prepared during the probe (pages allocated), if any.
    pub draft: Option<Draft>,
    /// How large a buffer to encode into.
    pub payload_hint: usize,
}

/// Writes the snapshot, prepares the fds and the mask, and executes.
/// Returns only on failure, with everything undone.
pub(crate) fn commit<S: serde::Serialize>(state: &S, c: Commit<'_>) -> UpgradeError {
    let t0 = std::time::Instant::now();
    let draft = match c.draft {
        Some(d) => Ok(d),
        None => Draft::new(0),
    };
    // Encoded straight into the memfd prepared during the probe.
    let (memfd, payload_len) =
        match draft.and_then(|d| d.seal_state(&c.header, c.manifest, state, c.payload_hint)) {
            Ok(sealed) => sealed,
            Err(e) => return e.into(),
        };
    let written = t0.elapsed();
    let path = match cstring(c.header.binary.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(source) => {
            return UpgradeError::Io {
                what: "name the binary",
                source,
            };
        }
    };
    let var = HandoffVar {
        pid: std::process::id() as i32,
        snapshot_fd: memfd.as_raw_fd(),
        binary_fd: c.own_binary.as_raw_fd(),
        mode: Mode::Upgrade,
    };
    let env = match exec_env(&var.format()) {
        Ok(e) => e,
        Err(source) => {
            return UpgradeError::Io {
                what: "build the environment",
                source,
            };
        }
    };
    tracing::debug!(
        phase = "snapshot",
        bytes = payload_len,
        fds = c.manifest.len(),
        encode_ms = written.as_secs_f64() * 1e3,
        "snapshot sealed, executing {:?}",
        c.header.binary
    );

    // From here on: no logging, no allocation that matters, until the exec.
    if let Err(source) = keep_only(c.manifest, &[memfd.as_raw_fd(), c.own_binary.as_raw_fd()]) {
        let _ = sys::cloexec_from(3);
        return UpgradeError::Handoff {
            reason: format!("a kept fd is not open: {source}"),
        };
    }
    if let Err(source) = signal::hold() {
        let _ = sys::cloexec_from(3);
        return UpgradeError::Io {
            what: "block signals",
            source,
        };
    }
    // Signals are held now and will wait, pending, for the new image. One
    // that came since the loop last polled only set a flag, which the exec
    // would forget: a shutdown abandons the upgrade, other requests are
    // raised again so that they are pending across the exec.
    if c.requests
        .shutdown
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        let _ = sys::cloexec_from(3);
        let _ = signal::release();
        return UpgradeError::Shutdown;
    }
    c.requests.re_raise_pending();
    let err = nix::unistd::execve(&path, c.argv, &env)
        .err()
        .map(io::Error::from);
    // execve returned: undo, and keep serving.
    let _ = sys::cloexec_from(3);
    let _ = signal::release();
    UpgradeError::Exec {
        path: c.header.binary.clone(),
        source: err.unwrap_or_else(|| io::Error::other("execve returned")),
    }
}

/// Deny by default: every fd close-on-exec, then clear the flag on exactly
/// the manifest's fds and `extra`.
fn keep_only(manifest: &[ManifestEntry], extra: &[i32]) -> io::Result<()> {
    sys::cloexec_from(3)?;
    for e in manifest {
        sys::set_cloexec(e.fd, false).map_err(|err| {
            io::Error::new(err.kind(), format!("fd {} ('{}'): {err}", e.fd, e.name))
        })?;
    }
    for &fd in extra {
        sys::set_cloexec(fd, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_explains_a_missing_binary() {
        let err = preflight(Path::new("/nonexistent/server"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/server") && err.contains("Config::binary"),
            "{err}"
        );
        assert!(preflight(Path::new("/bin/sh")).is_ok());
    }

    #[test]
    fn exec_env_carries_exactly_one_handoff() {
        let env = exec_env("1:pid=1:snapshot=3:binary=4:mode=upgrade").unwrap();
        let ours: Vec<_> = env
            .iter()
            .filter(|e| e.as_bytes().starts_with(b"COPYOVER_HANDOFF="))
            .collect();
        assert_eq!(ours.len(), 1);
        assert!(!env.iter().any(|e| e.as_bytes().starts_with(b"LISTEN_PID=")));
    }
}
