//! The handle a server holds once [`boot`](crate::boot) returned: the
//! [`Copyover`] polled from the event loop. Where things are: its
//! [`Config`] in `config`; the upgrade as it drives it (idle, probing,
//! approved: the events, the commit, an abandon) in `upgrading`; `ready`
//! (the claim, the holder's end, the outcome of an upgrade or a rollback) in
//! `ready`; snapshots for staging in `staging`. How an image starts is in
//! `resume`; the old image's probe and commit in `upgrade`.

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
use crate::upgrade::phase::{Phase, Settled};
use crate::upgrade::probe::{Executable, Probe, ProbeSpec};
use crate::upgrade::variable::Mode;
use crate::upgrade::{Commit, Progress, commit};
use crate::worker::Worker;
use crate::{rollback, sys};

mod config;
mod ready;
mod sharing;
mod staging;
mod upgrading;

pub use config::Config;
#[cfg(all(test, feature = "tls"))]
pub(crate) use ready::READY_IN_THIS_TEST;
pub(crate) use ready::Resume;
#[cfg(feature = "tls")]
pub(crate) use ready::image_is_ready;

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
    /// A **gradual** migration's new process is in its `boot` (it came
    /// instead of [`Event::UpgradeApproved`]): call
    /// [`Copyover::upgrade`] with the **shared** part of the state (none of
    /// the users' connections) and the descriptors both processes need
    /// (the listeners). It returns [`Progress::Sharing`](crate::Progress::Sharing)
    /// once the new process serves beside this one; stop accepting then (the
    /// new process accepts). See [`crate::migration`]. An application that
    /// does not move users this way must [`abandon`](Copyover::abandon) the
    /// migration here: ignored, it stays under way (the new process waits).
    ShareApproved,
    /// A gradual migration asks this process for its next batch: move up
    /// to `most` users with [`Copyover::move_users`]. An empty batch says
    /// none is left, and ends the migration.
    MoveUsers {
        /// The most users this batch may hold.
        most: usize,
    },
    /// Users arrived from the other process of a gradual migration: take
    /// them at once with [`Copyover::take_users`] (the other process
    /// waits).
    UsersArrived,
    /// A message the other process of a gradual migration forwarded
    /// ([`Copyover::forward`]).
    Forwarded(Vec<u8>),
    /// The gradual migration ended and this process serves alone: accept
    /// again if it had stopped (the new process left: it moved everyone
    /// back, or died; or the old one left). [`Copyover::sharing_with`]
    /// is `None` from now on.
    MigrationEnded,
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
    /// The request under way is a migration (SIGUSR2), not an exec.
    migrating: bool,
    /// A migration's new process being started (after the probe approved
    /// it), then, once it said `hello`, the process itself.
    arriving: Option<crate::migration::Arriving>,
    newcomer: Option<crate::migration::Newcomer>,
    /// In a migration's new process until `ready`: the way to the old one.
    pub(crate) arrival: Option<crate::migration::Arrival>,
    /// The process this one took over from by a migration.
    pub(crate) migrated_from: Option<u32>,
    /// After a migration: some descriptor has another number than it had
    /// in the old process.
    pub(crate) fds_renumbered: bool,
    /// The migration under way is gradual: this many users every so often.
    gradual: Option<(usize, Duration)>,
    /// A gradual migration asked for from the code, for when it starts.
    pending_gradual: Option<(usize, Duration)>,
    /// After the migration under way, this process stays (serving nobody)
    /// until it is stopped, instead of exiting.
    stay: bool,
    /// A gradual migration under way: both processes serve.
    pub(crate) window: Option<crate::migration::Window>,
    /// The migration socket, with `Config::migration_socket`, once ready.
    pub(crate) door: Option<crate::migration::Door>,
    /// The external newcomer of the migration asked for.
    knock: Option<crate::migration::Knock>,
    /// Raised by the migration socket's thread when a newcomer knocked.
    knocked: Arc<std::sync::atomic::AtomicBool>,
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
            migrating: false,
            arriving: None,
            newcomer: None,
            arrival: None,
            migrated_from: None,
            fds_renumbered: false,
            gradual: None,
            pending_gradual: None,
            stay: false,
            window: None,
            door: None,
            knock: None,
            knocked: Arc::default(),
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

    /// Asks for a migration to a new process, as SIGUSR2 does (see
    /// [`crate::migration`]): the same events and `upgrade` calls as an
    /// upgrade, and on success this process exits.
    pub fn request_migration(&self) {
        self.requests
            .migrate
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.requests.wake();
    }

    /// The PID of the process this one took over from by a migration, or
    /// `None` (a first start, an upgrade, a rollback).
    pub fn migrated_from(&self) -> Option<u32> {
        self.migrated_from
    }

    /// Whether every inherited descriptor has the number it had in the
    /// previous image: always after an upgrade (the exec keeps them), and
    /// after a migration unless some number was taken in this process
    /// (something it opened before `boot`, say; a warning says so). What
    /// names descriptors by number depends on it: an epoll instance kept in
    /// the handoff keys its registrations by file *and* number, so when
    /// this is `false`, make a new one and register what you took.
    pub fn fds_kept_numbers(&self) -> bool {
        !self.fds_renumbered
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
