//! The new image's side of an upgrade: [`boot`] answers the probe, or
//! restores the state and checks the inherited descriptors, arming the
//! rollback first; or starts fresh (socket activation, a crash recovered
//! from systemd's fd store).
//!
//! The old image's side (probe, commit, exec) is in [`crate::upgrade`] and
//! the [`Copyover`] handle's state machine in `runtime`.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::env::{CLAIM_VAR, HANDOFF_VAR, PROBE_VAR, ROLLBACK_REASON_VAR, forget_handoff_vars};
use crate::error::Error;
use crate::handoff::Inherited;
use crate::notify::Activated;
use crate::runtime::{Config, Copyover, Resume, Start, open_own_binary};
use crate::signal::{self, Requests};
use crate::snapshot::{Manifest, read_sealed};
use crate::state::{AppState, restore};
use crate::sys::{Claims, monotonic_ns};
use crate::upgrade::record::ExecRecord;
use crate::upgrade::variable::{ClaimVar, HandoffVar, Mode};
use crate::worker::Worker;
use crate::{rollback, sys};

/// Hands a server's start to copyover. Call it first in `main`, before any
/// thread starts.
///
/// * In **probe mode** (the old image is asking whether this binary can
///   take over) it answers and exits the process: it never returns.
/// * On a **first start** it returns [`Start::Fresh`].
/// * After an **upgrade** (or a **rollback**) it returns
///   [`Start::Resumed`] with the state and the inherited descriptors. Until
///   [`Copyover::ready`] is called, any failure of this image (an error
///   returned from `main`, a panic, a crash, the readiness deadline) rolls
///   back to the previous binary.
/// * In a new process started by a **migration** (see
///   [`crate::migration`]) it receives the state and the descriptors from
///   the old process and returns [`Start::Resumed`] the same way. Until
///   `ready`, the old process still serves: any failure of this one ends
///   it, and the old one serves on.
///
/// # Correct order of handling, after an upgrade
///
/// 1. The rollback is armed before anything else can fail: every later
///    step that fails brings the old binary back instead of ending the
///    process. Arming it arms the readiness deadline, `ITIMER_REAL`, which
///    replaces any interval the old image had set (the timer survives
///    `execve`); `ready` cancels it. (After a rollback, the old image's
///    `boot` instead cancels the failed image's deadline before anything
///    else; a fresh start leaves `ITIMER_REAL` alone.)
/// 2. The process must have a single thread (a thread started before
///    `boot` would make the environment unsafe to change): else, rollback.
/// 3. The snapshot and every descriptor of the manifest are checked: each
///    must be open and not close-on-exec, as the old image left it, and is
///    claimed once. After an upgrade, the runtime's helper thread checks
///    the manifest's while this thread decodes (and migrates) the state:
///    every number of the manifest is open then, so nothing the decoding
///    opens can take one. After a rollback, where some may be free, the
///    checks come first, **before this image opens any descriptor of its
///    own**.
/// 4. Every fd from 3 up (the inherited ones, and anything else the exec
///    let through) becomes close-on-exec in one call, so a child started
///    from now on inherits none; the rollback makes the kept ones
///    inheritable again only at the instant of its exec.
/// 5. Signal handlers.
///
/// # Errors
///
/// [`Error::Threads`] if threads already run, [`Error::HandoffVar`] for a
/// malformed handoff variable, [`Error::HandoffFd`] if it names fds that are
/// not open, [`Error::Snapshot`] for a snapshot this binary cannot use,
/// [`Error::Setup`] if signal handling cannot be installed. After an
/// upgrade, every error rolls back first; it is returned only if that is
/// impossible.
pub fn boot<S: AppState>(config: Config) -> Result<(Copyover<S>, Start<S>), Error> {
    let boot_ns = monotonic_ns();
    if let Some(nonce) = std::env::var_os(PROBE_VAR) {
        answer_probe::<S>(&config, &nonce);
    }
    // The right to claim inherited descriptors: this call's alone, and
    // gone when it returns (see `sys::Claims`).
    let claims = sys::Claims::take().ok_or_else(|| Error::Setup {
        what: "boot (it was called twice in this process; call it once, first thing in main)",
        source: std::io::ErrorKind::AlreadyExists.into(),
    })?;
    let argv = crate::env::args().map_err(|source| Error::Setup {
        what: "read the arguments",
        source,
    })?;
    if let Some(path) = std::env::var_os(crate::env::JOIN_VAR) {
        let path = std::path::PathBuf::from(path);
        return crate::migration::join::<S>(config, argv, &path, boot_ns);
    }
    if let Some(var) = crate::migration::read_var()? {
        return crate::migration::arrive::<S>(config, argv, var, boot_ns, &claims);
    }
    match read_handoff_var()? {
        None => boot_fresh(config, argv, &claims),
        Some(var) => resume::<S>(config, argv, var, boot_ns, claims),
    }
}

/// Reads the handoff variable, if it is set and meant for this process.
fn read_handoff_var() -> Result<Option<HandoffVar>, Error> {
    let Some(value) = std::env::var_os(HANDOFF_VAR) else {
        return Ok(None);
    };
    let text = value.to_string_lossy().into_owned();
    let var = HandoffVar::parse(&text)?;
    if var.pid == std::process::id() as i32 {
        return Ok(Some(var));
    }
    tracing::warn!(
        handoff_pid = var.pid,
        pid = std::process::id(),
        "ignoring a {HANDOFF_VAR} variable inherited from process {}: starting fresh",
        var.pid
    );
    Ok(None)
}

pub(crate) fn single_thread() -> Result<(), Error> {
    let threads = sys::thread_count().map_err(|source| Error::Setup {
        what: "count threads",
        source,
    })?;
    if threads > 1 {
        return Err(Error::Threads { threads });
    }
    Ok(())
}

pub(crate) fn start_worker() -> Result<Worker, Error> {
    Worker::start().map_err(|source| Error::Setup {
        what: "start the runtime's helper thread",
        source,
    })
}

/// Offers [`Inherited::check`] to the helper thread (see
/// [`Offer`](crate::worker::Offer)); the
/// returned function waits for its result.
fn claim_on(
    worker: &Worker,
    manifest: Manifest,
    claims: Arc<Claims>,
) -> impl FnOnce() -> Result<Inherited, Error> {
    let offer = worker.offer((manifest, claims), |(m, c)| {
        Inherited::check(m, false, &c).inspect_err(roll_back_now)
    });
    move || {
        // `None`: the thread panicked halfway (the panic hook rolls back).
        offer.wait().unwrap_or_else(|| {
            Err(Error::Setup {
                what: "claim the inherited descriptors",
                source: std::io::Error::other("the runtime's helper thread stopped"),
            })
        })
    }
}

/// After an upgrade, before `ready`: an inherited descriptor that fails its
/// check rolls back where that happens, with every descriptor still open
/// (`fire` does not return while the rollback is armed; after `ready` it
/// does nothing).
fn roll_back_now(err: &Error) {
    let _ = rollback::trigger(&err.to_string());
}

pub(crate) fn install_requests() -> Result<Requests, Error> {
    let requests = Requests::install().map_err(|source| Error::Setup {
        what: "install signal handlers",
        source,
    })?;
    signal::release_all().map_err(|source| Error::Setup {
        what: "unblock signals",
        source,
    })?;
    Ok(requests)
}

fn boot_fresh<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    claims: &Claims,
) -> Result<(Copyover<S>, Start<S>), Error> {
    single_thread()?;
    forget_handoff_vars();
    // Socket activation first, before this image opens any descriptor of
    // its own: LISTEN_FDS names fds 3.. as they were at the exec.
    let activated = Activated::from_env(claims);
    // The helper thread first: it inherits this thread's mask and blocks
    // the reload signals itself; `install_requests` then unblocks the
    // runtime's own signals on this thread for sure.
    let worker = start_worker()?;
    let requests = install_requests()?;
    let mut co = Copyover::new(config, argv, requests, worker);
    co.activated = activated;
    co.own_binary = Some(open_own_binary()?);
    // A restart after a crash: the last checkpoint and the stored fds.
    if let Some(r) = crate::fdstore::recover::<S>(&co.config.app, &mut co.activated)? {
        co.generation = r.generation;
        let (state, fds) = (r.state, r.fds);
        return Ok((co, Start::Resumed { state, fds }));
    }
    Ok((co, Start::Fresh))
}

/// A new image after an upgrade, or the old one after a rollback.
fn resume<S: AppState>(
    config: Config,
    argv: Vec<CString>,
    var: HandoffVar,
    boot_ns: u64,
    claims: Claims,
) -> Result<(Copyover<S>, Start<S>), Error> {
    let upgraded = var.mode == Mode::Upgrade;
    if !upgraded && let Err(e) = sys::set_real_timer(0) {
        // The failed image's readiness deadline survived the exec; it must
        // never fire here: cancelled before anything else.
        sys::ignore_sigalrm();
        tracing::warn!(
            "could not cancel the failed image's readiness deadline ({e}); SIGALRM is now ignored"
        );
    }
    let reason = std::env::var_os(ROLLBACK_REASON_VAR)
        .map_or_else(|| "unknown".into(), |r| r.to_string_lossy().into_owned());
    // Closed first: the script's descriptor only served the exec.
    if let Some(fd) = var.script {
        drop(claims.inherit(fd));
    }
    // How the old image ran (a wrapper may have changed our arguments or
    // environment): what a rollback starts again. Kept open until ready.
    let exec_record = var.exec.and_then(|fd| claims.inherit(fd).ok());
    let record = exec_record
        .as_ref()
        .filter(|_| upgraded)
        .and_then(|fd| match ExecRecord::read(fd.as_fd()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("the old image's exec record is unreadable ({e}): a rollback uses this image's arguments and environment");
                None
            }
        });
    // Who ends the upgrade, this image at `ready` or the holder at its
    // deadline (see `sys::claim`), in a variable of its own. Kept open
    // until ready. One named but unreadable, or not ours to own, counts as
    // taken by the holder: `ready` then waits for it.
    let claim_text = std::env::var_os(CLAIM_VAR);
    let claim_var = claim_text
        .as_ref()
        .map(|v| v.to_str().and_then(ClaimVar::parse));
    let held_at_ns = claim_var.flatten().map(|c| c.held_at);
    let claim: Option<Option<OwnedFd>> = claim_var.map(|parsed| {
        let c = parsed?;
        claims
            .inherit(c.claim)
            .inspect_err(|e| tracing::warn!(fd = c.claim, "the readiness claim cannot be owned ({e}): the holder ends this upgrade at its deadline"))
            .ok()
    });
    // The handoff's own fds: a rollback hands them back too.
    let mut handoff_fds = vec![var.snapshot_fd, var.binary_fd];
    handoff_fds.extend(exec_record.as_ref().map(|fd| fd.as_raw_fd()));
    handoff_fds.extend(
        claim
            .as_ref()
            .and_then(Option::as_ref)
            .map(|fd| fd.as_raw_fd()),
    );
    let (old_argv, old_env) = match record {
        Some(r) => (r.argv, Some(r.env)),
        None => (argv.clone(), None),
    };
    let mut back = rollback::Back {
        binary_fd: var.binary_fd,
        argv: old_argv,
        env: old_env,
        var: var.for_rollback().format(),
        claim_var: claim_text.and_then(|v| v.into_string().ok()),
        fds: handoff_fds,
        holder_pidfd: None,
        nofile: var.nofile,
    };
    // After an upgrade: every error from here on rolls back where it
    // happens, with every descriptor still open. After a rollback there is
    // no way further back: errors are returned.
    let or_roll_back = |e: Error| {
        if upgraded {
            let _ = rollback::trigger(&e.to_string());
        }
        e
    };
    if upgraded {
        rollback::arm(&mut back, Some(config.ready_timeout))
            .map_err(|source| Error::Setup {
                what: "arm the rollback",
                source,
            })
            .map_err(or_roll_back)?;
    } else {
        tracing::info!("the new image failed: {reason}; restoring this one");
    }
    match single_thread() {
        Ok(()) => {
            forget_handoff_vars();
            Activated::from_env_ignored();
        }
        Err(e) if upgraded => return Err(or_roll_back(e)),
        // The old code, back: serve anyway (the variables stay, but name
        // this PID, so a child ignores them).
        Err(e) => tracing::warn!("{e}"),
    }

    // Before this image opens any descriptor of its own: the snapshot, the
    // old binary, then every fd of the manifest.
    let snapshot =
        adopt_handoff_fd(&claims, var.snapshot_fd, "the snapshot").map_err(or_roll_back)?;
    let old_binary =
        adopt_handoff_fd(&claims, var.binary_fd, "the previous binary").map_err(or_roll_back)?;
    let mut snap = read_sealed(snapshot.as_fd())
        .and_then(|snap| snap.check_app(&config.app).map(|()| snap))
        .map_err(|e| or_roll_back(e.into()))?;
    // The helper thread first (see `boot_fresh`). After an upgrade it
    // claims the manifest's descriptors (a syscall each) while this thread
    // decodes the state: with 10,000 connections each takes milliseconds
    // of the blackout. Every number of the manifest is open then (the old
    // image left them so at the exec), so no descriptor the decoding opens
    // can take one, and the claims stay sound (see `sys::Claims`); a
    // failure on either side rolls back where it happens, which ends the
    // other thread too.
    //
    // After a rollback, not: some numbers may be free (the failed image
    // closed them, and the holder could not give them back), and a
    // descriptor the application's decoding opened could take one. The
    // claims come first then.
    let worker = start_worker().map_err(or_roll_back)?;
    let manifest = std::mem::take(&mut snap.manifest);
    let (fds, state) = if upgraded {
        let claimed = claim_on(&worker, manifest, Arc::new(claims));
        let state = restore::<S>(&config.app, snap.header.state_version, snap.payload())
            .map_err(|e| or_roll_back(e.into()));
        // An adoption error has already rolled back; a take that fails its
        // check will, where it happens.
        let mut fds = claimed()?;
        fds.on_failed_check = Some(roll_back_now);
        (fds, state?)
    } else {
        let fds = Inherited::check(manifest, true, &claims)?;
        let state = restore::<S>(&config.app, snap.header.state_version, snap.payload())?;
        (fds, state)
    };

    // Now nothing of the old image can be mistaken for ours: the holder's
    // pidfd, the full rollback plan (the kept fds), then close-on-exec on
    // everything (the plan makes the kept fds inheritable again at its
    // exec, so it must know them first).
    let mut holder = var.holder.and_then(|pid| match sys::pidfd_open(pid) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(holder = pid, "no pidfd of the holder ({e})");
            None
        }
    });
    if upgraded {
        back.fds.extend(fds.numbers());
        // The plan owns the holder's pidfd from now until `ready`.
        back.holder_pidfd = holder.take();
        rollback::arm(&mut back, None)
            .map_err(|source| Error::Setup {
                what: "arm the rollback",
                source,
            })
            .map_err(or_roll_back)?;
    }
    if let Err(source) = sys::cloexec_from(3) {
        let e = Error::Setup {
            what: "set close-on-exec on the inherited fds",
            source,
        };
        if upgraded {
            return Err(or_roll_back(e));
        }
        tracing::warn!("{e}; a child started now would inherit them");
    }
    if !upgraded {
        // A deadline that fired while the failed image rolled back is
        // pending here: it must not meet SIGALRM's default action when
        // the signals are unblocked.
        sys::discard_pending_sigalrm();
    }
    reap_exited_children();

    let requests = install_requests().map_err(or_roll_back)?;
    if snap.header.state_version != S::VERSION {
        tracing::info!(
            from = snap.header.state_version,
            to = S::VERSION,
            "migrated the state"
        );
    }
    let header = snap.header.clone();
    drop(snap);
    let mut co = Copyover::new(config, argv, requests, worker);
    co.generation = header.generation + u64::from(upgraded);
    if co.config.binary.is_none() {
        co.binary = header.binary.clone();
    }
    crate::notify::notify(&format!(
        "EXTEND_TIMEOUT_USEC={}\nSTATUS=restoring after an upgrade",
        co.config.ready_timeout.as_micros()
    ));
    co.resume = Some(Resume {
        mode: var.mode,
        header,
        snapshot,
        old_binary,
        exec_record,
        holder,
        holder_pid: var.holder,
        rescued: var.rescued,
        held_at_ns,
        claim,
        boot_ns,
        restored_ns: monotonic_ns(),
        reason,
    });
    Ok((co, Start::Resumed { state, fds }))
}

/// Adopts the snapshot's or the old binary's fd, after checking that the
/// previous image left it open and inheritable for us.
fn adopt_handoff_fd(claims: &Claims, fd: RawFd, what: &str) -> Result<OwnedFd, Error> {
    claims.inherit(fd).map_err(|source| Error::HandoffFd {
        fd,
        what: what.into(),
        source,
    })
}

fn answer_probe<S: AppState>(config: &Config, nonce: &std::ffi::OsStr) -> ! {
    // After the exec, `boot` needs a single thread: a binary that starts
    // one before `boot` (a static initializer, an LD_PRELOAD library, an
    // async runtime's main) would only roll back. Refuse it now.
    if let Err(e) = single_thread() {
        crate::upgrade::probe::answer(nonce, Err(format!("{e}")));
    }
    let stdin = std::io::stdin();
    let result = read_sealed(stdin.as_fd())
        .and_then(|snap| {
            snap.check_app(&config.app)?;
            restore::<S>(&config.app, snap.header.state_version, snap.payload())
        })
        .map(|_| config.version.clone())
        .map_err(|e| e.to_string());
    crate::upgrade::probe::answer(nonce, result)
}

/// Reaps children of the previous image that already exited. Live ones are
/// the application's business (they are its children now).
fn reap_exited_children() {
    crate::sys::reap_exited_children();
}
