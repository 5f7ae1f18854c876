//! The runtime a server's `main` hands control to: [`boot`], then a
//! [`Copyover`] handle polled from the event loop.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, UpgradeError};
use crate::handoff::{HANDOFF_VAR, Handoff, HandoffVar, Inherited, Mode, ROLLBACK_REASON_VAR};
use crate::notify::Activated;
use crate::probe::{PROBE_VAR, Probe, ProbeSpec, Verdict};
use crate::signal::{self, Requests};
use crate::snapshot::{FORMAT_VERSION, Header, read_sealed};
use crate::state::{AppState, restore};
use crate::upgrade::{Commit, Progress, clean_env, commit, preflight};
use crate::{rollback, sys};

/// How an application runs under copyover.
#[derive(Debug, Clone)]
pub struct Config {
    app: String,
    version: String,
    binary: Option<PathBuf>,
    ready_timeout: Duration,
    probe_timeout: Duration,
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

    /// How long a new image may take from the exec to [`Copyover::ready`]
    /// before it is rolled back. Default 10 s.
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
    /// A resumed image, after an upgrade or a rollback: the state and the
    /// inherited descriptors. Claim the descriptors, register them with the
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
struct Resume {
    mode: Mode,
    header: Header,
    snapshot: OwnedFd,
    old_binary: OwnedFd,
    boot_ns: u64,
    restored_ns: u64,
    /// For a rollback: why.
    reason: String,
}

#[derive(Debug)]
enum Phase {
    Idle,
    Probing(Probe),
    Approved { to_version: String },
}

/// The runtime's handle: the upgrade's state machine, the signal flags, and
/// what the next exec needs.
#[derive(Debug)]
pub struct Copyover {
    config: Config,
    binary: PathBuf,
    argv: Vec<OsString>,
    argv_c: Vec<CString>,
    generation: u64,
    requests: Requests,
    own_binary: Option<OwnedFd>,
    resume: Option<Resume>,
    phase: Phase,
    requested_at_ns: u64,
    ready: bool,
    /// The commit's memfd, made while the probe runs.
    draft: Option<crate::snapshot::Draft>,
    /// The last payload's size: the commit encodes into a buffer this big.
    payload_hint: usize,
    /// Listeners from systemd socket activation, on a first start.
    activated: Activated,
}

/// `CLOCK_MONOTONIC` in nanoseconds; it keeps counting across `execve`.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

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
///
/// # Errors
///
/// [`Error::Threads`] if threads already run, [`Error::HandoffVar`] for a
/// malformed handoff variable, [`Error::HandoffFd`] if it names fds that are
/// not open, [`Error::Snapshot`] for a snapshot this binary cannot use,
/// [`Error::Setup`] if signal handling cannot be installed. After an
/// upgrade, a restore error rolls back first; the error is returned only if
/// that is impossible.
pub fn boot<S: AppState>(config: Config) -> Result<(Copyover, Start<S>), Error> {
    let boot_ns = monotonic_ns();
    if let Some(nonce) = std::env::var_os(PROBE_VAR) {
        answer_probe::<S>(&config, &nonce);
    }
    let threads = sys::thread_count().map_err(|source| Error::Setup {
        what: "count threads",
        source,
    })?;
    if threads > 1 {
        return Err(Error::Threads { threads });
    }
    let handoff = std::env::var_os(HANDOFF_VAR);
    let reason = std::env::var_os(ROLLBACK_REASON_VAR);
    for var in [HANDOFF_VAR, ROLLBACK_REASON_VAR] {
        sys::remove_env_var(var.as_ref());
    }
    let var = match handoff {
        None => None,
        Some(value) => {
            let text = value.to_string_lossy().into_owned();
            let var = HandoffVar::parse(&text)?;
            if var.pid == std::process::id() as i32 {
                Some(var)
            } else {
                tracing::warn!(
                    handoff_pid = var.pid,
                    pid = std::process::id(),
                    "ignoring a {HANDOFF_VAR} variable inherited from process {}: starting fresh",
                    var.pid
                );
                None
            }
        }
    };
    // Socket activation first, before this image opens any descriptor of
    // its own: LISTEN_FDS names fds 3.. as they were at the exec.
    let activated = if var.is_none() {
        Activated::from_env()
    } else {
        Activated::from_env_ignored()
    };
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv_c = argv
        .iter()
        .map(|a| rollback::cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Setup {
            what: "read the arguments",
            source,
        })?;
    let requests = Requests::install().map_err(|source| Error::Setup {
        what: "install signal handlers",
        source,
    })?;
    signal::release_all().map_err(|source| Error::Setup {
        what: "unblock signals",
        source,
    })?;

    let mut co = Copyover {
        binary: config
            .binary
            .clone()
            .unwrap_or_else(|| default_binary(&argv)),
        config,
        argv,
        argv_c,
        generation: 0,
        requests,
        own_binary: None,
        resume: None,
        phase: Phase::Idle,
        requested_at_ns: 0,
        ready: false,
        draft: None,
        payload_hint: 0,
        activated,
    };

    let Some(var) = var else {
        co.own_binary = Some(open_own_binary()?);
        return Ok((co, Start::Fresh));
    };

    let rollback_reason =
        reason.map_or_else(|| "unknown".into(), |r| r.to_string_lossy().into_owned());
    crate::notify::notify(&format!(
        "EXTEND_TIMEOUT_USEC={}\nSTATUS=restoring after an upgrade",
        co.config.ready_timeout.as_micros()
    ));
    // After an upgrade the inherited fds stay open across a rollback's exec
    // until `ready`, which makes them all close-on-exec with one syscall.
    // After a rollback there is no way further back: do it now.
    if var.mode == Mode::Rollback {
        cloexec_all()?;
    }
    reap_exited_children();
    let old_binary = sys::adopt_inherited_fd(var.binary_fd).map_err(|source| Error::HandoffFd {
        fd: var.binary_fd,
        what: "the previous binary".into(),
        source,
    })?;
    if var.mode == Mode::Upgrade {
        let back = HandoffVar {
            mode: Mode::Rollback,
            ..var.clone()
        };
        rollback::arm(&old_binary, &co.argv, &back, co.config.ready_timeout).map_err(|source| {
            Error::Setup {
                what: "arm the rollback",
                source,
            }
        })?;
    } else {
        tracing::warn!(version = %co.config.version, "upgrade rolled back: {rollback_reason}");
        // The failed image's readiness deadline survived the exec.
        sys::set_real_timer(0).map_err(|source| Error::Setup {
            what: "disarm the readiness deadline",
            source,
        })?;
    }
    let (state, header, snapshot, fds) = restore_image::<S>(&co.config, &var)?;
    co.generation = header.generation + u64::from(var.mode == Mode::Upgrade);
    if co.config.binary.is_none() {
        co.binary = header.binary.clone();
    }
    co.resume = Some(Resume {
        mode: var.mode,
        header,
        snapshot,
        old_binary,
        boot_ns,
        restored_ns: monotonic_ns(),
        reason: rollback_reason,
    });
    Ok((co, Start::Resumed { state, fds }))
}

type Restored<S> = (S, Header, OwnedFd, Inherited);

fn restore_image<S: AppState>(config: &Config, var: &HandoffVar) -> Result<Restored<S>, Error> {
    // Every error rolls back (after an upgrade) right where it happens, while
    // the snapshot and the adopted descriptors are still open.
    let rollback_on = |e: Error| {
        if var.mode == Mode::Upgrade {
            let _ = rollback::trigger(&e.to_string());
        }
        e
    };
    let snapshot = sys::adopt_inherited_fd(var.snapshot_fd)
        .map_err(|source| Error::HandoffFd {
            fd: var.snapshot_fd,
            what: "the snapshot".into(),
            source,
        })
        .map_err(rollback_on)?;
    let snap = read_sealed(snapshot.as_fd())
        .and_then(|snap| snap.check_app(&config.app).map(|()| snap))
        .map_err(|e| rollback_on(e.into()))?;
    let state = restore::<S>(&config.app, snap.header.state_version, snap.payload())
        .map_err(|e| rollback_on(e.into()))?;
    let reserved = [var.snapshot_fd, var.binary_fd];
    let fds = Inherited::adopt(&snap.manifest, &reserved, var.mode == Mode::Rollback)?;
    if snap.header.state_version != S::VERSION {
        tracing::info!(
            from = snap.header.state_version,
            to = S::VERSION,
            "migrated the state"
        );
    }
    Ok((state, snap.header, snapshot, fds))
}

fn answer_probe<S: AppState>(config: &Config, nonce: &std::ffi::OsStr) -> ! {
    let stdin = std::io::stdin();
    let result = read_sealed(stdin.as_fd())
        .and_then(|snap| {
            snap.check_app(&config.app)?;
            restore::<S>(&config.app, snap.header.state_version, snap.payload())
        })
        .map(|_| config.version.clone())
        .map_err(|e| e.to_string());
    crate::probe::answer(nonce, result)
}

fn default_binary(argv: &[OsString]) -> PathBuf {
    let from_argv = argv
        .first()
        .map(Path::new)
        .filter(|p| p.as_os_str().as_bytes().contains(&b'/'));
    match from_argv {
        Some(p) if p.is_absolute() => p.to_owned(),
        Some(p) => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned()),
        None => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
    }
}

/// Every fd from 3 up close-on-exec, with one `close_range` call.
fn cloexec_all() -> Result<(), Error> {
    sys::cloexec_from(3).map_err(|source| Error::Setup {
        what: "set close-on-exec on the inherited fds",
        source,
    })
}

fn open_own_binary() -> Result<OwnedFd, Error> {
    File::open("/proc/self/exe")
        .map(OwnedFd::from)
        .map_err(|source| Error::Setup {
            what: "open /proc/self/exe for rollback",
            source,
        })
}

/// Reaps children of the previous image that already exited. Live ones are
/// the application's business (they are its children now).
fn reap_exited_children() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

impl Copyover {
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
        if let Phase::Probing(probe) = std::mem::replace(&mut self.phase, Phase::Idle) {
            let verdict = match probe.try_verdict() {
                Ok(outcome) => {
                    self.draft = outcome.draft;
                    outcome.verdict
                }
                Err(still_running) => {
                    self.phase = Phase::Probing(still_running);
                    return self.poll_signals();
                }
            };
            let probe_ms = ms(monotonic_ns().saturating_sub(self.requested_at_ns));
            match verdict {
                Verdict::Accepted(to_version) => {
                    tracing::debug!(phase = "probe", probe_ms, %to_version, "the new binary accepted the snapshot");
                    self.phase = Phase::Approved { to_version };
                    return Some(Event::UpgradeApproved);
                }
                Verdict::Refused(reason) => {
                    self.draft = None;
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
        self.publish("refused", reason, "", 0.0);
        crate::notify::notify(&format!("READY=1\nSTATUS=upgrade refused: {reason}"));
        tracing::warn!(
            generation = self.generation,
            version = %self.config.version,
            elapsed_ms = ms(monotonic_ns().saturating_sub(self.requested_at_ns)),
            "upgrade refused: {reason}"
        );
    }

    /// Writes the status file (see [`crate::status`]).
    fn publish(&self, outcome: &str, reason: &str, from_version: &str, blackout_ms: f64) {
        crate::status::Status {
            pid: std::process::id(),
            app: self.config.app.clone(),
            version: self.config.version.clone(),
            generation: self.generation,
            outcome: outcome.into(),
            reason: reason.into(),
            from_version: from_version.into(),
            blackout_ms,
            ..Default::default()
        }
        .publish();
    }

    fn header(&self, now: u64) -> Header {
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
    /// runtime has logged `upgrade refused: REASON`; the application keeps
    /// serving, and owns all its descriptors as before.
    pub fn upgrade<S: AppState>(
        &mut self,
        state: &S,
        keep: &Handoff<'_>,
    ) -> Result<Progress, UpgradeError> {
        let result = self.advance(state, keep);
        if let Err(e) = &result {
            self.phase = Phase::Idle;
            self.draft = None;
            self.log_refused(&e.to_string());
        }
        result
    }

    fn advance<S: AppState>(
        &mut self,
        state: &S,
        keep: &Handoff<'_>,
    ) -> Result<Progress, UpgradeError> {
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
        let own_binary = self
            .own_binary
            .as_ref()
            .ok_or_else(|| UpgradeError::Handoff {
                reason: "the runtime has no descriptor of its own binary to roll back to".into(),
            })?;
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        match &self.phase {
            Phase::Probing(_) => Ok(Progress::Probing),
            Phase::Idle => {
                preflight(&self.binary)?;
                warn_unkept_listeners(manifest);
                // Only the encoding happens in the event loop; the probe's
                // thread writes the snapshot, starts the new binary and, off
                // the critical path, prepares the commit's memfd for a
                // state somewhat larger than this one.
                let payload = crate::snapshot::encode_state(state)?;
                self.payload_hint = payload.len() + payload.len() / 8 + 4096;
                let reserve = crate::snapshot::HEADER_LEN + 64 * manifest.len() + self.payload_hint;
                let spec = ProbeSpec {
                    binary: self.binary.clone(),
                    argv: self.argv.clone(),
                    env: clean_env(),
                    header,
                    manifest: manifest.to_vec(),
                    payload,
                    timeout: self.config.probe_timeout,
                    reserve: reserve as u64,
                };
                let probe = Probe::start(spec, self.requests.tx.clone()).map_err(|source| {
                    UpgradeError::Io {
                        what: "start the probe",
                        source,
                    }
                })?;
                tracing::debug!(phase = "probe", binary = ?self.binary, "probing the new binary");
                self.phase = Phase::Probing(probe);
                Ok(Progress::Probing)
            }
            Phase::Approved { to_version } => {
                tracing::debug!(%to_version, fds = manifest.len(), "committing the upgrade");
                Err(commit(
                    state,
                    Commit {
                        header,
                        manifest,
                        own_binary,
                        argv: &self.argv_c,
                        requests: &self.requests,
                        draft: self.draft.take(),
                        payload_hint: self.payload_hint,
                    },
                ))
            }
        }
    }

    /// Declares this image ready: the inherited descriptors are claimed and
    /// registered. Disarms the rollback and the readiness deadline, and logs
    /// the outcome (`upgrade complete` with the versions, the generation and
    /// the blackout). Call it once, after start-up, on every kind of start.
    ///
    /// # Errors
    ///
    /// [`Error::Setup`] if this binary cannot be opened for a future
    /// rollback; upgrades then stay refused, serving goes on.
    pub fn ready(&mut self) -> Result<(), Error> {
        if self.ready {
            return Ok(());
        }
        let now = monotonic_ns();
        match self.resume.take() {
            None => {
                self.publish("started", "", "", 0.0);
                crate::notify::notify(&format!(
                    "READY=1\nSTATUS=serving {} (generation {})",
                    self.config.version, self.generation
                ));
                tracing::info!(generation = self.generation, version = %self.config.version, binary = ?self.binary, "serving");
            }
            Some(r) if r.mode == Mode::Rollback => {
                self.publish("rolled back", &r.reason, "", 0.0);
                crate::notify::notify(&format!(
                    "READY=1\nSTATUS=upgrade rolled back: {}",
                    r.reason
                ));
                tracing::info!(
                    generation = self.generation,
                    version = %self.config.version,
                    blackout_ms = ms(now.saturating_sub(r.header.committed_at_ns)),
                    "serving again after the rollback"
                );
                drop(r.snapshot);
                self.own_binary = Some(r.old_binary);
            }
            Some(r) => {
                cloexec_all()?;
                rollback::disarm().map_err(|source| Error::Setup {
                    what: "disarm the readiness deadline",
                    source,
                })?;
                // The previous binary and the snapshot were kept for a rollback.
                drop(r.old_binary);
                drop(r.snapshot);
                self.ready = true;
                // Opened before the outcome is logged, so that whoever reads
                // the log sees the image's final descriptors.
                let own = open_own_binary();
                let h = &r.header;
                let blackout_ms = ms(now.saturating_sub(h.committed_at_ns));
                self.publish("complete", "", &h.writer_version, blackout_ms);
                crate::notify::notify(&format!(
                    "READY=1\nSTATUS=upgrade complete: {} to {}, generation {}, blackout {blackout_ms:.2} ms",
                    h.writer_version, self.config.version, self.generation
                ));
                tracing::info!(
                    generation = self.generation,
                    from_version = %h.writer_version,
                    to_version = %self.config.version,
                    blackout_ms,
                    total_ms = ms(now.saturating_sub(h.requested_at_ns)),
                    exec_ms = ms(r.boot_ns.saturating_sub(h.committed_at_ns)),
                    restore_ms = ms(r.restored_ns.saturating_sub(r.boot_ns)),
                    adopt_ms = ms(now.saturating_sub(r.restored_ns)),
                    "upgrade complete"
                );
                self.own_binary = Some(own?);
            }
        }
        self.ready = true;
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
        let fail = |reason: String| Error::Adopt {
            name: n.clone(),
            fd: raw,
            wanted: "a listening TCP socket",
            reason,
        };
        let info = sys::socket_info(raw).map_err(|e| fail(format!("it is not a socket ({e})")))?;
        if !info.listening || info.protocol != libc::IPPROTO_TCP {
            return Err(fail("it is not a listening TCP socket".into()));
        }
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
    /// # Errors
    ///
    /// [`UpgradeError::Snapshot`] if it cannot be encoded or written.
    pub fn save_snapshot<S: AppState>(&self, state: &S, path: &Path) -> Result<(), UpgradeError> {
        let mut header = self.header(monotonic_ns());
        header.state_version = S::VERSION;
        let payload = crate::snapshot::encode_state(state)?;
        let bytes = crate::snapshot::encode(&header, &[], &payload)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| UpgradeError::Io {
                what: "write the snapshot file",
                source,
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
    pub fn restore_from_file<S: AppState>(&self, path: &Path) -> Result<S, Error> {
        let snap = crate::snapshot::read_file(path)?;
        snap.check_app(&self.config.app)?;
        Ok(restore::<S>(
            &self.config.app,
            snap.header.state_version,
            snap.payload(),
        )?)
    }
}

impl Drop for Copyover {
    fn drop(&mut self) {
        if let Phase::Probing(p) = &self.phase {
            p.kill();
        }
        // Dropped at shutdown (an exec runs no destructor).
        if self.ready {
            crate::status::Status::remove(std::process::id());
        }
    }
}

/// Warns about listening sockets that an upgrade would close (DESIGN.md's
/// "unregistered listeners are lost silently"). Runs while the probe starts,
/// off the critical path.
fn warn_unkept_listeners(manifest: &[crate::snapshot::ManifestEntry]) {
    let kept: std::collections::HashSet<i32> = manifest.iter().map(|e| e.fd).collect();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let lost: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|fd| *fd >= 3 && !kept.contains(fd) && sys::is_listening(*fd))
        .collect();
    if !lost.is_empty() {
        tracing::warn!(fds = ?lost, "listening sockets not in the handoff will be closed by the upgrade");
    }
}
