//! The handle a server holds once [`boot`](crate::boot) returned: the
//! [`Copyover`] polled from the event loop, its upgrade state machine
//! (idle, probing, approved), `ready` (the outcome of an upgrade or a
//! rollback, the holder's end), snapshots for staging. How an image starts
//! is in `resume`; the old image's commit in `upgrade`.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::env::clean_env;
use crate::error::{Error, UpgradeError};
use crate::handoff::{Handoff, Inherited, SocketKind};
use crate::notify::Activated;
use crate::signal::{self, Requests};
use crate::snapshot::{FORMAT_VERSION, Header};
use crate::state::{AppState, restore};
use crate::status::{Outcome, Phases, Reporter};
use crate::sys::monotonic_ns;
use crate::upgrade::probe::{Executable, Prepared, Probe, ProbeSpec, Verdict};
use crate::upgrade::variable::Mode;
use crate::upgrade::{Commit, Progress, commit};
use crate::worker::Worker;
use crate::{rollback, sys};

/// How an application runs under copyover.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) app: String,
    pub(crate) version: String,
    pub(crate) binary: Option<PathBuf>,
    pub(crate) ready_timeout: Duration,
    pub(crate) probe_timeout: Duration,
}

impl Config {
    /// A configuration for the application `app` (its snapshots are refused
    /// by any other application) at version label `version` (shown in logs:
    /// "from v1 to v2").
    pub fn new(app: impl Into<String>, version: impl Into<String>) -> Self {
        Config {
            app: app.into(),
            version: version.into(),
            binary: None,
            ready_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
        }
    }

    /// The binary executed on an upgrade. Default: the path this process
    /// was started from (`argv[0]` made absolute if it contains a `/`, so a
    /// symlink that a deploy switches is followed; else `/proc/self/exe`
    /// as resolved at start-up). Never `/proc/self/exe` at upgrade time,
    /// which names the old, replaced file.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// How long a new image may take from its `boot` to
    /// [`Copyover::ready`] before it is rolled back. Default 10 s.
    ///
    /// The old image's value also sets the holder's deadline, kept from
    /// outside the new image from just before the exec: this timeout and
    /// half of it again (at least 1 s more). A new image that has not
    /// become ready by then (it hangs before `main`, is stopped, or blocks
    /// SIGALRM) is killed, and the old binary is started again under the
    /// holder's PID with every client.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long the probe of a new binary may take. Default 5 s.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }
}

/// How this process image started.
#[derive(Debug)]
pub enum Start<S> {
    /// A first start: build the state and bind the listeners.
    Fresh,
    /// A resumed image, after an upgrade or a rollback (or, with systemd's
    /// fd store, a restart after a crash: see [`crate::fdstore`]): the state
    /// and the inherited descriptors. Claim the descriptors, register them with the
    /// event loop, then call [`Copyover::ready`].
    Resumed {
        /// The application's state, decoded (and migrated if needed).
        state: S,
        /// The descriptors, to claim by name.
        fds: Inherited,
    },
}

/// What the event loop is asked to do; see [`Copyover::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An upgrade was asked for: call [`Copyover::upgrade`] with the
    /// current state and descriptors. It starts the probe of the new binary
    /// and returns: keep serving (nothing needs to pause for the probe).
    Upgrade,
    /// The probe approved the new binary: reach a safe point (pause what
    /// must pause, collect every connection) and call [`Copyover::upgrade`]
    /// again, which commits. Comes once per upgrade, after
    /// [`Event::Upgrade`], so a server stalls its connections once.
    UpgradeApproved,
    /// The probe refused the new binary; the runtime logged why. Nothing to do.
    UpgradeRefused {
        /// Why.
        reason: String,
    },
    /// SIGTERM or SIGINT: shut down.
    Shutdown,
    /// SIGUSR1: call [`Copyover::save_snapshot`] with the current state.
    SaveSnapshot,
}

/// What the new image keeps of the handoff until it is ready.
#[derive(Debug)]
pub(crate) struct Resume {
    pub(crate) mode: Mode,
    pub(crate) header: Header,
    pub(crate) snapshot: OwnedFd,
    pub(crate) old_binary: OwnedFd,
    /// How the old image ran, for a rollback (see `upgrade::record`).
    pub(crate) exec_record: Option<OwnedFd>,
    /// A pidfd of the holder after a rollback (after an upgrade, the
    /// rollback plan owns it until `ready`), and its PID: killed and reaped
    /// when this image is ready.
    pub(crate) holder: Option<OwnedFd>,
    pub(crate) holder_pid: Option<i32>,
    /// The holder started this image under its own PID.
    pub(crate) rescued: bool,
    /// The readiness claim (see `sys::claim`), taken at `ready` before the
    /// holder is killed: `None` without a claim variable (a first start, a
    /// rescue, an older build's commit), `Some(None)` if one was named but
    /// could not be owned (it counts as the holder's).
    pub(crate) claim: Option<Option<OwnedFd>>,
    /// When the holder started (the handoff's `held=`).
    pub(crate) held_at_ns: Option<u64>,
    pub(crate) boot_ns: u64,
    pub(crate) restored_ns: u64,
    /// For a rollback: why.
    pub(crate) reason: String,
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// The probe runs; `exe` is the new binary, opened once, so that the
    /// commit executes exactly the file that was probed.
    Probing(Probe, Arc<Executable>),
    Approved {
        to_version: String,
        exe: Arc<Executable>,
        /// What the probe prepared, for the commit to take.
        prepared: Prepared,
    },
}

/// The runtime's handle: the upgrade's state machine, the signal flags, and
/// what the next exec needs.
///
/// `S` is the application's state type, bound once by
/// [`boot::<S>`](crate::boot): [`upgrade`](Self::upgrade),
/// [`save_snapshot`](Self::save_snapshot),
/// [`restore_from_file`](Self::restore_from_file) and
/// [`checkpoint`](Self::checkpoint) take that type and no other, so the
/// snapshot a probe checks, the one a commit hands over and the one a
/// staging file holds are all read back as what `boot` restores:
///
/// ```compile_fail
/// use copyover::{AppState, Config, Handoff};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Chat { users: Vec<String> }
/// impl AppState for Chat { const VERSION: u32 = 1; }
///
/// #[derive(Serialize, Deserialize)]
/// struct Other { users: Vec<String> }
/// impl AppState for Other { const VERSION: u32 = 1; }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let (mut co, _start) = copyover::boot::<Chat>(Config::new("chat", "v1"))?;
///     // A `Copyover<Chat>` hands over a `Chat` and nothing else.
///     co.upgrade(&Other { users: vec![] }, &Handoff::new())?;
///     Ok(())
/// }
/// ```
pub struct Copyover<S> {
    pub(crate) config: Config,
    pub(crate) binary: PathBuf,
    /// The argument vector this image runs with (see `env::args`).
    argv: Vec<CString>,
    pub(crate) generation: u64,
    requests: Requests,
    pub(crate) own_binary: Option<OwnedFd>,
    pub(crate) resume: Option<Resume>,
    phase: Phase,
    requested_at_ns: u64,
    ready: bool,
    /// The last payload's size: the commit encodes into a buffer this big.
    payload_hint: usize,
    /// Listeners from systemd socket activation, on a first start.
    pub(crate) activated: Activated,
    /// The helper thread: the probe, reaping the holder.
    worker: Worker,
    /// The state type; `fn() -> S` so that the handle is `Send` and `Sync`
    /// whatever `S` is (it holds no `S`).
    state: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for Copyover<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copyover")
            .field("config", &self.config)
            .field("binary", &self.binary)
            .field("generation", &self.generation)
            .field("phase", &self.phase)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl<S> Copyover<S> {
    pub(crate) fn new(
        config: Config,
        argv: Vec<CString>,
        requests: Requests,
        worker: Worker,
    ) -> Copyover<S> {
        Copyover {
            binary: config
                .binary
                .clone()
                .unwrap_or_else(|| default_binary(&argv)),
            config,
            argv,
            generation: 0,
            requests,
            own_binary: None,
            resume: None,
            phase: Phase::Idle,
            requested_at_ns: 0,
            ready: false,
            payload_hint: 0,
            activated: Activated::default(),
            worker,
            state: PhantomData,
        }
    }
}

fn default_binary(argv: &[CString]) -> PathBuf {
    let from_argv = argv
        .first()
        .map(|a| Path::new(OsStr::from_bytes(a.as_bytes())))
        .filter(|p| p.as_os_str().as_bytes().contains(&b'/'));
    match from_argv {
        Some(p) if p.is_absolute() => p.to_owned(),
        Some(p) => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned()),
        None => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
    }
}

pub(crate) fn open_own_binary() -> Result<OwnedFd, Error> {
    File::open("/proc/self/exe")
        .map(OwnedFd::from)
        .map_err(|source| Error::Setup {
            what: "open /proc/self/exe for rollback",
            source,
        })
}

/// Kills the holder (through its pidfd: never another process); returns
/// whether it is to be reaped (see [`reap_holder`]). Its pidfd is closed
/// here, so that the image's descriptors are final when the outcome is
/// reported.
///
/// Without a pidfd (`pidfd_open` failed in `boot`), by PID: the holder is
/// our child, unreaped unless it already died, so the number is still its.
fn kill_holder(pidfd: Option<OwnedFd>, pid: i32) -> bool {
    let by_pid = || sys::kill(pid);
    let killed = match &pidfd {
        Some(fd) => sys::pidfd_kill(fd.as_fd()).or_else(|_| by_pid()),
        None => by_pid(),
    };
    if let Err(e) = killed {
        // Not waited for: a live holder would block the helper thread.
        tracing::warn!(holder = pid, "could not kill the holder: {e}");
        return false;
    }
    // Reaped by PID, so that no descriptor lingers: the holder is our
    // child, so its PID cannot be reused before it is reaped.
    drop(pidfd);
    true
}

/// Takes the readiness claim before this image kills the holder (see
/// `sys::claim`). Returns if it is ours, or if the holder is gone (nobody
/// else will serve). Otherwise the holder took it at its deadline and is
/// killing this process: wait for that, serving nothing. A read that fails
/// (twice) says nothing about who has it, and is treated the same way: the
/// holder takes the claim at its deadline and rescues.
fn take_claim(claim: Option<&OwnedFd>, holder: Option<&OwnedFd>) {
    let taken = claim.map(|c| sys::once_more(|| sys::claim::take(c.as_fd()), |_| true));
    match taken {
        Some(Ok(true)) => return,
        Some(Ok(false)) => tracing::warn!("the holder's deadline passed first: it ends this image"),
        Some(Err(e)) => tracing::warn!(
            "could not take the readiness claim ({e}): the holder ends this image at its deadline"
        ),
        None => tracing::warn!(
            "the readiness claim is not this image's: the holder ends it at its deadline"
        ),
    }
    loop {
        match holder.map(|h| sys::wait_readable(h.as_fd(), Duration::from_secs(1))) {
            // The holder's end (readable pidfd), if it dies without killing
            // this process.
            Some(Ok(true)) => {
                tracing::warn!("the holder ended without ending this image: serving on");
                return;
            }
            Some(Ok(false)) => {}
            // No way to watch it: look again in a second.
            Some(Err(_)) | None => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Reaps the killed holder on the helper thread: its exit tears down the
/// old image's memory, which takes time the event loop does not wait for.
fn reap_holder(worker: &Worker, pid: i32) {
    let reaped = worker.run(move || {
        let _ = sys::reap(pid);
    });
    if let Err(e) = reaped {
        tracing::debug!(holder = pid, "could not reap the holder: {e}");
    }
}

impl<S> Copyover<S> {
    /// Upgrades since the first start (0 for a fresh start; a rollback keeps
    /// the old image's number).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This binary's version label, from [`Config::new`].
    pub fn version(&self) -> &str {
        &self.config.version
    }

    /// The binary the next upgrade executes.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// A descriptor that becomes readable when [`poll`](Self::poll) may
    /// have an event. Register it with the event loop (epoll, poll, mio) for
    /// reading; it is non-blocking and close-on-exec.
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.requests.rx.as_fd()
    }

    /// Asks for an upgrade, as SIGHUP does.
    pub fn request_upgrade(&self) {
        self.requests
            .upgrade
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.requests.wake();
    }

    /// Returns the next event, or `None`. Call it until it returns `None`
    /// each time [`event_fd`](Self::event_fd) is readable.
    pub fn poll(&mut self) -> Option<Event> {
        self.requests.drain();
        if signal::take(&self.requests.shutdown) {
            return Some(Event::Shutdown);
        }
        if let Phase::Probing(probe, exe) = std::mem::replace(&mut self.phase, Phase::Idle) {
            let (verdict, prepared) = match probe.try_verdict() {
                Ok(outcome) => (outcome.verdict, outcome.prepared),
                // The probe kills its child at its own time limit; one that
                // never reports (its job never ran) is refused here, so that
                // an upgrade can never stay under way for good.
                Err(stuck)
                    if monotonic_ns().saturating_sub(self.requested_at_ns)
                        > 2 * self.config.probe_timeout.as_nanos() as u64 + 5_000_000_000 =>
                {
                    stuck.kill();
                    let reason =
                        "the probe never reported: the runtime's helper thread did not run it";
                    (Verdict::Refused(reason.into()), Prepared::default())
                }
                Err(still_running) => {
                    self.phase = Phase::Probing(still_running, exe);
                    return self.poll_signals();
                }
            };
            let probe_ms = ms(monotonic_ns().saturating_sub(self.requested_at_ns));
            match verdict {
                Verdict::Accepted(to_version) => {
                    tracing::debug!(phase = "probe", probe_ms, %to_version, "the new binary accepted the snapshot");
                    self.phase = Phase::Approved {
                        to_version,
                        exe,
                        prepared,
                    };
                    return Some(Event::UpgradeApproved);
                }
                Verdict::Refused(reason) => {
                    let reason = UpgradeError::Probe { reason }.to_string();
                    self.log_refused(&reason);
                    return Some(Event::UpgradeRefused { reason });
                }
            }
        }
        self.poll_signals()
    }

    fn poll_signals(&mut self) -> Option<Event> {
        if signal::take(&self.requests.upgrade) {
            if matches!(self.phase, Phase::Idle) {
                self.requested_at_ns = monotonic_ns();
                crate::notify::notify(&format!(
                    "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=upgrading",
                    crate::notify::monotonic_usec()
                ));
                return Some(Event::Upgrade);
            }
            tracing::info!("an upgrade is already under way; the new request joins it");
        }
        if signal::take(&self.requests.save) {
            return Some(Event::SaveSnapshot);
        }
        None
    }

    fn log_refused(&self, reason: &str) {
        self.report_later(
            Outcome::Refused {
                reason: reason.into(),
            },
            ms(monotonic_ns().saturating_sub(self.requested_at_ns)),
            false,
        );
    }

    /// Reports a fresh start to the log, the status file and `sd_notify`
    /// (see [`crate::status::report`]), here: nothing else is reported
    /// before it.
    fn report_started(&self) {
        crate::status::report(Outcome::Started, &self.reporter(0.0, false));
    }

    /// Reports the outcome of an upgrade (see [`crate::status::report`]) on
    /// the helper thread: what `ready` reports after an exec (the status
    /// file, sd_notify, the log line: a millisecond of file system and pipe
    /// writes) is written while the event loop already serves. Every
    /// outcome after the start goes this way, so they are written one at a
    /// time and in order (a refusal right after a `ready` cannot overtake
    /// its `complete`); `Drop` waits for them, a second at most.
    /// `elapsed_ms` and `rescued` are for the log line of a refusal or a
    /// rollback.
    fn report_later(&self, outcome: Outcome, elapsed_ms: f64, rescued: bool) {
        let who = self.reporter(elapsed_ms, rescued);
        self.worker
            .run_or_here(move || crate::status::report(outcome, &who));
    }

    fn reporter(&self, elapsed_ms: f64, rescued: bool) -> Reporter {
        Reporter {
            app: self.config.app.clone(),
            version: self.config.version.clone(),
            generation: self.generation,
            binary: self.binary.clone(),
            elapsed_ms,
            rescued,
        }
    }

    pub(crate) fn header(&self, now: u64) -> Header {
        Header {
            format_version: FORMAT_VERSION,
            app: self.config.app.clone(),
            state_version: 0,
            writer_version: self.config.version.clone(),
            generation: self.generation,
            requested_at_ns: self.requested_at_ns,
            committed_at_ns: now,
            binary: self.binary.clone(),
        }
    }

    /// Moves the upgrade forward; call it on [`Event::Upgrade`] and on
    /// [`Event::UpgradeApproved`] with the whole current state and every
    /// descriptor to keep.
    ///
    /// * The first call checks the binary and starts the probe, then returns
    ///   [`Progress::Probing`]: keep serving.
    /// * Once the probe said yes, [`Event::UpgradeApproved`] comes; this call
    ///   then commits: it writes the snapshot and executes the new binary.
    ///   **It does not return on success**: the new image carries on.
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`] saying why no upgrade happened (the binary is
    /// missing, the handoff is inconsistent, the exec failed...). The
    /// runtime reports `upgrade refused: REASON` (from its helper thread);
    /// the application keeps serving, and owns all its descriptors as
    /// before. One flag is not put back as it was: a commit that fails
    /// leaves every fd from 3 up close-on-exec (the state in which an image
    /// normally runs), so one the application had left inheritable on
    /// purpose (for a child it starts later) must be made inheritable again
    /// by the application.
    pub fn upgrade(&mut self, state: &S, keep: &Handoff<'_>) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        let result = self.advance(state, keep);
        if let Err(e) = &result {
            self.phase = Phase::Idle;
            self.log_refused(&e.to_string());
        }
        result
    }

    fn advance(&mut self, state: &S, keep: &Handoff<'_>) -> Result<Progress, UpgradeError>
    where
        S: AppState,
    {
        if !self.ready {
            return Err(UpgradeError::Handoff {
                reason: "this image has not called Copyover::ready yet".into(),
            });
        }
        if self.requested_at_ns == 0 {
            self.requested_at_ns = monotonic_ns();
        }
        let manifest = keep
            .manifest()
            .map_err(|reason| UpgradeError::Handoff { reason })?;
        if self.own_binary.is_none() {
            // `ready` could not open it: try again now.
            self.own_binary = open_own_binary().ok();
        }
        let own_binary = self
            .own_binary
            .as_ref()
            .ok_or_else(|| UpgradeError::Handoff {
                reason: "the runtime has no descriptor of its own binary to roll back to (opening /proc/self/exe failed)".into(),
            })?;
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        // Taken: the commit takes what the probe prepared; every other way
        // out puts a phase back (`upgrade` makes an error Idle).
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            probing @ Phase::Probing(..) => {
                self.phase = probing;
                Ok(Progress::Probing)
            }
            Phase::Idle => {
                let exe = Arc::new(Executable::open(&self.binary)?);
                // Only the encoding happens in the event loop; the probe's
                // thread writes the snapshot, starts the new binary and, off
                // the critical path, prepares the commit's memfd for a
                // state somewhat larger than this one.
                let payload = crate::snapshot::encode_state(state)?;
                self.payload_hint = payload.len() + payload.len() / 8 + 4096;
                let reserve = crate::snapshot::HEADER_LEN + 64 * manifest.len() + self.payload_hint;
                let spec = ProbeSpec {
                    exe: exe.clone(),
                    argv: self.argv.clone(),
                    env: clean_env(),
                    header,
                    manifest: manifest.clone(),
                    payload,
                    timeout: self.config.probe_timeout,
                    reserve: reserve as u64,
                };
                let probe = Probe::start(spec, &self.worker, self.requests.tx.clone()).map_err(
                    |source| UpgradeError::Io {
                        what: "start the probe",
                        source,
                    },
                )?;
                tracing::debug!(phase = "probe", binary = ?self.binary, "probing the new binary");
                self.phase = Phase::Probing(probe, exe);
                Ok(Progress::Probing)
            }
            Phase::Approved {
                to_version,
                exe,
                prepared,
            } => {
                tracing::debug!(%to_version, fds = manifest.len(), "committing the upgrade");
                Err(commit(
                    state,
                    Commit {
                        header,
                        manifest,
                        own_binary,
                        exe: &exe,
                        argv: &self.argv,
                        requests: &self.requests,
                        prepared,
                        payload_hint: self.payload_hint,
                        worker: &self.worker,
                        ready_timeout: self.config.ready_timeout,
                    },
                ))
            }
        }
    }

    /// Abandons the upgrade under way, before its commit: it ends as
    /// `upgrade refused: the server abandoned the upgrade: REASON`, reported
    /// like any refusal (log, status file, sd_notify, the `copyover` CLI's
    /// exit status), and the next SIGHUP starts a new one. A probe still
    /// running is killed. Call it on [`Event::UpgradeApproved`] when the
    /// server cannot reach a safe point (for a tokio server: when
    /// [`Quiesce::pause`](crate::tokio::Quiesce::pause) returns
    /// `Unpaused`). Does nothing if no upgrade is under way.
    pub fn abandon(&mut self, reason: &str) {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => return,
            Phase::Probing(probe, _) => probe.kill(),
            Phase::Approved { .. } => {}
        }
        let reason = UpgradeError::Abandoned {
            reason: reason.into(),
        };
        self.log_refused(&reason.to_string());
    }

    /// Declares this image ready: the inherited descriptors are claimed and
    /// registered. Disarms the rollback and the readiness deadline, and
    /// reports the outcome (`upgrade complete` with the versions, the
    /// generation and the blackout; after a rollback, `upgrade rolled back`
    /// with its reason) to the log, the status file and sd_notify: from
    /// the helper thread, so the line may follow one the application logs
    /// right after `ready` returns. Call it once, after start-up, on every
    /// kind of start.
    ///
    /// # Errors
    ///
    /// None today: what can fail here (opening this binary for a future
    /// rollback, cancelling the deadline) is logged, and the next upgrade
    /// tries again. The `Result` leaves room for checks to come; a caller
    /// that propagates it with `?` loses nothing.
    pub fn ready(&mut self) -> Result<(), Error> {
        if self.ready {
            return Ok(());
        }
        let now = monotonic_ns();
        self.ready = true;
        let Some(r) = self.resume.take() else {
            self.report_started();
            return Ok(());
        };
        // No way back is needed any more: the deadline and the plan go
        // (the timer first), then the holder, whose exit frees the old
        // image's memory in its own time.
        let planned = rollback::disarm();
        let holder = planned.or(r.holder);
        if let Some(claim) = &r.claim {
            take_claim(claim.as_ref(), holder.as_ref());
        }
        let reap = r.holder_pid.filter(|&pid| kill_holder(holder, pid));
        drop(r.snapshot);
        drop(r.exec_record);
        let h = &r.header;
        let blackout_ms = ms(now.saturating_sub(h.committed_at_ns));
        if r.mode == Mode::Rollback {
            self.own_binary = Some(r.old_binary);
            let outcome = Outcome::RolledBack { reason: r.reason };
            self.report_later(outcome, blackout_ms, r.rescued);
            if let Some(pid) = reap {
                reap_holder(&self.worker, pid);
            }
            return Ok(());
        }
        // The previous binary was kept for a rollback.
        drop(r.old_binary);
        // Opened before the outcome is logged, so that whoever reads the
        // log sees the image's final descriptors.
        // Tried twice: without it the next upgrade has no way back until
        // it opens it again.
        let own = sys::once_more(open_own_binary, |_| true);
        let outcome = Outcome::Complete {
            from: h.writer_version.clone(),
            to: self.config.version.clone(),
            generation: self.generation,
            blackout_ms,
            phases: Phases {
                total_ms: Some(ms(now.saturating_sub(h.requested_at_ns))),
                exec_ms: Some(ms(r.boot_ns.saturating_sub(h.committed_at_ns))),
                restore_ms: Some(ms(r.restored_ns.saturating_sub(r.boot_ns))),
                adopt_ms: Some(ms(now.saturating_sub(r.restored_ns))),
                unheld_ms: r
                    .held_at_ns
                    .map(|held| ms(held.saturating_sub(h.committed_at_ns))),
            },
        };
        self.report_later(outcome, 0.0, false);
        if let Some(pid) = reap {
            reap_holder(&self.worker, pid);
        }
        match own {
            Ok(fd) => self.own_binary = Some(fd),
            // Serving goes on; the next upgrade tries again.
            Err(e) => tracing::warn!("{e}; the next upgrade will try again"),
        }
        Ok(())
    }

    /// Takes a TCP listener passed by systemd socket activation on a first
    /// start: the one named `name` in `LISTEN_FDNAMES`, or with `None` the
    /// first one. `Ok(None)` if there is none (then bind your own).
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the passed descriptor is not a listening TCP
    /// socket.
    pub fn take_activated_tcp_listener(
        &mut self,
        name: Option<&str>,
    ) -> Result<Option<std::net::TcpListener>, Error> {
        let at = self
            .activated
            .fds
            .iter()
            .position(|(n, _)| name.is_none_or(|want| n == want));
        let Some(at) = at else { return Ok(None) };
        let (n, fd) = self.activated.fds.remove(at);
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        let want = SocketKind::TcpListener;
        want.check(raw).map_err(|reason| Error::Adopt {
            name: n.clone(),
            fd: raw,
            wanted: want.wanted(),
            reason,
        })?;
        Ok(Some(std::net::TcpListener::from(fd)))
    }

    /// Rolls back to the previous binary now, if this image was started by
    /// an upgrade and is not [`ready`](Self::ready) yet: use it on an error
    /// path of your restore code, *before* dropping any adopted descriptor
    /// (a descriptor closed here is a client lost in the old image too).
    /// Does not return if the rollback happens.
    ///
    /// Returning an error from `main` also rolls back (through `atexit`),
    /// but by then the destructors have closed what they owned.
    ///
    /// # Errors
    ///
    /// Returns (rather than rolling back) an error saying why there is no
    /// rollback: a fresh start, an image already ready, or a failed exec.
    pub fn rollback(&self, reason: &str) -> Error {
        Error::Setup {
            what: "roll back",
            source: rollback::trigger(reason),
        }
    }

    /// Writes a snapshot of `state` (without descriptors) to `path`, for a
    /// staging server (`--restore-from`). Serving goes on.
    ///
    /// The file is created mode 0600 under a fresh temporary name in the
    /// same directory (`O_EXCL|O_NOFOLLOW`), synced, then renamed over
    /// `path`: a reader sees the old file or the whole new one.
    ///
    /// # Errors
    ///
    /// [`UpgradeError::Snapshot`] if it cannot be encoded or written.
    pub fn save_snapshot(&self, state: &S, path: &Path) -> Result<(), UpgradeError>
    where
        S: AppState,
    {
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        let payload = crate::snapshot::encode_state(state)?;
        let bytes = crate::snapshot::encode(&header, &Default::default(), &payload)?;
        // Every user's data is in it: 0600, a fresh temporary name that no
        // planted symlink can redirect, synced before it replaces the file.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        crate::status::write_replacing(dir, path, &bytes, true).map_err(|source| {
            UpgradeError::Io {
                what: "write the snapshot file",
                source,
            }
        })?;
        tracing::info!(path = ?path, generation = self.generation, "snapshot saved");
        Ok(())
    }

    /// Reads the state of a snapshot file written by
    /// [`save_snapshot`](Self::save_snapshot), checking the app and the
    /// state version as an upgrade would.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if the file is unreadable, corrupt, of another
    /// app, or of a state version this binary cannot read.
    pub fn restore_from_file(&self, path: &Path) -> Result<S, Error>
    where
        S: AppState,
    {
        let snap = crate::snapshot::read_file(path)?;
        snap.check_app(&self.config.app)?;
        Ok(restore::<S>(
            &self.config.app,
            snap.header.state_version,
            snap.payload(),
        )?)
    }
}

impl<S> Drop for Copyover<S> {
    fn drop(&mut self) {
        if let Phase::Probing(p, _) = &self.phase {
            p.kill();
        }
        // Dropped at shutdown (an exec runs no destructor). An outcome
        // still queued on the helper thread is written first (unless the
        // thread is busy for more than a second: a probe still writing its
        // snapshot, say).
        if self.ready {
            self.worker.flush_for(std::time::Duration::from_secs(1));
            crate::status::Status::remove(std::process::id());
        }
    }
}
