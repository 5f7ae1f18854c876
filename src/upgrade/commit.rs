//! The commit: the snapshot written into the memfd the probe prepared, the
//! descriptors and the signal mask made ready, the holder cloned, and the
//! exec (see the [sequence](super)).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::probe::{Executable, Prepared};
use super::record::ExecRecord;
use super::variable::{ClaimVar, HandoffVar, Mode};
use crate::env::{
    CLAIM_VAR, HANDOFF_VAR, ROLLBACK_REASON_VAR, clean_env, cstring, env_entries, with_handoff,
};
use crate::error::UpgradeError;
use crate::snapshot::{Draft, Header, Manifest};
use crate::sys::holder::HolderSpec;
use crate::worker::{Offer, Worker};
use crate::{signal, sys};

/// What the commit needs from the runtime.
pub(crate) struct Commit<'a> {
    pub header: Header,
    pub manifest: &'a Manifest,
    pub own_binary: &'a OwnedFd,
    /// The new binary, as probed.
    pub exe: &'a Executable,
    pub argv: &'a [CString],
    pub requests: &'a signal::Requests,
    /// What the probe prepared: the snapshot's memfd (pages allocated), the
    /// exec record (sealed).
    pub prepared: Prepared,
    /// How large a buffer to encode into.
    pub payload_hint: usize,
    /// The runtime's helper thread.
    pub worker: &'a Worker,
    /// This image's readiness deadline (`Config::ready_timeout`), from
    /// which the holder's is made (see [`holder_deadline`]).
    pub ready_timeout: Duration,
}

/// How long the holder lets an upgrade run, from the exec, before it ends
/// it: the readiness deadline and half of it again (at least a second
/// more). The new image's own deadline, counted from its `boot`, fires
/// first if it got that far; the rest is for the rollback it starts (the
/// old binary decodes the state again) or for the time the image took to
/// reach `boot` (the loader, constructors). An image that never reaches
/// `boot`, or blocks SIGALRM, or is stopped, meets this one.
pub(crate) fn holder_deadline(ready_timeout: Duration) -> Duration {
    ready_timeout.saturating_add((ready_timeout / 2).max(Duration::from_secs(1)))
}

/// Undoes the commit's flags and mask if the exec does not happen: every fd
/// from 3 up close-on-exec (not each fd's flag as it was: an fd the
/// application had left inheritable stays close-on-exec), the signal mask
/// as it was before the commit.
struct Undo {
    /// The signal mask before the commit held the reload signals.
    mask: Option<sys::SavedMask>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = sys::cloexec_from(3);
        if let Some(mask) = &self.mask {
            let _ = signal::restore_mask(mask);
        }
    }
}

/// Writes the snapshot, prepares the fds, the mask and the holder, and
/// executes. Returns only on failure, with the steps taken undone (see
/// [`Undo`]: the fd flags are not restored one by one).
pub(crate) fn commit<S: serde::Serialize>(state: &S, c: Commit<'_>) -> UpgradeError {
    let t0 = std::time::Instant::now();
    // Dropped after `clearing` (which waits for its job): on any failure,
    // every fd is close-on-exec again and the mask as it was.
    let mut undo = Undo { mask: None };
    let clearing = Clearing::start(c.worker, c.manifest);
    let Prepared { draft, record } = c.prepared;
    let draft = match draft {
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
    let io = |what: &'static str| move |source| UpgradeError::Io { what, source };
    // The environment, read once for the record (if the probe could not
    // make it), the rescue and the exec.
    let env = match env_entries(&clean_env()) {
        Ok(e) => e,
        Err(e) => return io("build the environment")(e),
    };
    // How this image runs, for a rollback to start it the same way.
    let record = match record.map_or_else(|| ExecRecord::seal(c.argv, &env), Ok) {
        Ok(fd) => fd,
        Err(e) => return e.into(),
    };
    let mut var = HandoffVar {
        pid: std::process::id() as i32,
        snapshot_fd: memfd.as_raw_fd(),
        binary_fd: c.own_binary.as_raw_fd(),
        mode: Mode::Upgrade,
        exec: Some(record.as_raw_fd()),
        nofile: sys::nofile_limit().ok().map(|(soft, _)| soft),
        ..Default::default()
    };
    if c.exe.script {
        var.script = Some(c.exe.fd.as_raw_fd());
    }
    // What the holder runs if the new image dies before it is ready: this
    // binary, in rollback mode, under the holder's PID (which closes the
    // script's fd, inherited from the holder's table, at once).
    let rescue = HandoffVar {
        mode: Mode::Rollback,
        rescued: true,
        ..var.clone()
    };
    let died = format!(
        "{ROLLBACK_REASON_VAR}=the new image died before it was ready; \
         the holder started the old binary again under its own PID"
    );
    let deadline = holder_deadline(c.ready_timeout);
    let late = format!(
        "{ROLLBACK_REASON_VAR}=the new image did not become ready within {} ms; \
         the holder killed it and started the old binary again under its own PID",
        deadline.as_millis()
    );
    let (died, late) = match (cstring(died.as_bytes()), cstring(late.as_bytes())) {
        (Ok(d), Ok(l)) => (d, l),
        (Err(e), _) | (_, Err(e)) => return io("build the environment")(e),
    };
    // Who ends the upgrade, the image that becomes ready or the holder at
    // its deadline: whoever takes this first (see `sys::claim`).
    let claim = match sys::claim::make() {
        Ok(fd) => fd,
        Err(e) => return io("make the readiness claim")(e),
    };
    let holder_spec = HolderSpec {
        binary_fd: c.own_binary.as_raw_fd(),
        argv: c.argv.to_vec(),
        env: env.clone(),
        died,
        late,
        claim_fd: claim.as_raw_fd(),
        deadline,
        var_prefix: format!("{HANDOFF_VAR}=1:pid="),
        var_suffix: rescue.format_after_pid(),
        blocked: signal::HELD_SIGNALS.to_vec(),
    };
    tracing::debug!(
        phase = "snapshot",
        bytes = payload_len,
        fds = c.manifest.len(),
        encode_ms = written.as_secs_f64() * 1e3,
        "snapshot sealed, executing {:?}",
        c.exe.path
    );

    // From here on: no logging until the exec.
    let mut extra = vec![
        memfd.as_raw_fd(),
        c.own_binary.as_raw_fd(),
        record.as_raw_fd(),
        claim.as_raw_fd(),
    ];
    if c.exe.script {
        extra.push(c.exe.fd.as_raw_fd());
    }
    if let Err(source) = clearing
        .wait(c.manifest)
        .and_then(|()| extra.iter().try_for_each(|&fd| sys::set_cloexec(fd, false)))
    {
        return UpgradeError::Handoff {
            reason: format!("the kept fds could not be made inheritable: {source}"),
        };
    }
    match signal::hold_saving() {
        Ok(mask) => undo.mask = Some(mask),
        Err(source) => return io("block signals")(source),
    }
    // Signals are held now and will wait, pending, for the new image. One
    // that came since the loop last polled only set a flag, which the exec
    // would forget: a shutdown abandons the upgrade, other requests are
    // raised again so that they are pending across the exec.
    if c.requests
        .shutdown
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return UpgradeError::Shutdown;
    }
    let holder = match sys::holder::spawn(holder_spec) {
        Ok(h) => h,
        Err(e) => return io("start the holder")(e),
    };
    var.holder = Some(holder.pid());
    let claim_var = ClaimVar {
        claim: claim.as_raw_fd(),
        held_at: sys::monotonic_ns(),
    };
    let env = match with_handoff(env, &var.format()).and_then(|mut env| {
        env.push(cstring(
            format!("{CLAIM_VAR}={}", claim_var.format()).as_bytes(),
        )?);
        Ok(env)
    }) {
        Ok(e) => e,
        Err(e) => {
            holder.abort();
            return io("build the environment")(e);
        }
    };
    c.requests.re_raise_pending();
    let err = sys::execveat(c.exe.fd.as_raw_fd(), c.argv, &env);
    // execveat returned (after however long it took): undo, and keep
    // serving; but the holder may have reached its deadline meanwhile. The
    // claim decides: ours, the holder is killed; the holder's, it is
    // killing this process to rescue it, and is waited for (it returns
    // only if the holder died without doing so).
    if !matches!(sys::claim::take(claim.as_fd()), Ok(true)) {
        holder.outlive();
    }
    holder.abort();
    drop(undo);
    // A re-raised request is pending, and is delivered now, to this image.
    UpgradeError::Exec {
        path: c.exe.path.clone(),
        source: err,
    }
}

/// The manifest's fds made inheritable on the runtime's helper thread while
/// the commit encodes the state on the application's: at 9,000 connections
/// each is milliseconds of the blackout, and most servers have a second
/// core. Deny by default: every fd from 3 up close-on-exec first, then the
/// flag cleared on exactly the manifest's fds (the caller clears its own
/// few after [`wait`](Self::wait)). An [`Offer`]: done once, by one side,
/// and dropped (the commit failed early), taken back or finished, so that
/// no clearing can come after the commit's undo.
struct Clearing(Offer<Vec<RawFd>, Result<(), (RawFd, io::Error)>>);

impl Clearing {
    fn start(worker: &Worker, manifest: &Manifest) -> Clearing {
        Clearing(worker.offer(manifest.fds().collect(), keep_only))
    }

    fn wait(self, manifest: &Manifest) -> io::Result<()> {
        // `None`: the helper thread died halfway; it is all done again here.
        let result = self.0.wait().unwrap_or_else(|| keep_only(manifest.fds()));
        result.map_err(|(fd, err)| {
            if fd < 0 {
                return io::Error::new(err.kind(), format!("making every fd close-on-exec: {err}"));
            }
            let name = manifest.names_of(fd).next().unwrap_or_default();
            io::Error::new(err.kind(), format!("fd {fd} ('{name}'): {err}"))
        })
    }
}

/// Deny by default: every fd close-on-exec, then clear the flag on `fds`.
fn keep_only<F: IntoIterator<Item = RawFd>>(fds: F) -> Result<(), (RawFd, io::Error)> {
    // -1: not one fd's failure.
    sys::cloexec_from(3).map_err(|e| (-1, e))?;
    for fd in fds {
        sys::set_cloexec(fd, false).map_err(|e| (fd, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_explains_a_missing_binary() {
        use std::path::Path;
        let err = Executable::open(Path::new("/nonexistent/server"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/server") && err.contains("Config::binary"),
            "{err}"
        );
        assert!(!Executable::open(Path::new("/bin/sh")).unwrap().script);
        assert!(Executable::open(Path::new("/dev/null")).is_err());
    }
}
