//! The old process's side of a migration: the newcomer started after the
//! probe, and the hand-over at the commit (see the [sequence](super)).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::Child;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{
    FAIL, FDS, GO, HELLO, MAX_MESSAGE, MigrateVar, OK_MIGRATE, PROBE, READY, SHARE, SNAPSHOT,
};
use crate::env::{MIGRATE_VAR, clean_env};
use crate::error::UpgradeError;
use crate::signal::Requests;
use crate::snapshot::{Draft, Header, Manifest};
use crate::status::{Outcome, Reporter};
use crate::sys;
use crate::upgrade::probe::{Executable, command, describe};
use crate::worker::Worker;

/// The new process, started and waiting in its `boot` for the hand-over.
/// Dropped before it took over (a refusal, an abandon, a failed commit, a
/// shutdown), it is killed with its whole process group (a wrapper's
/// children too) and reaped off the caller's thread: it never served
/// anyone.
#[derive(Debug)]
pub(crate) struct Newcomer {
    /// `None` once it is reaped or handed over for good.
    child: Option<Child>,
    pid: u32,
    /// Our end of the socket pair (or of the migration socket's
    /// connection, for an external newcomer).
    sock: OwnedFd,
    /// The process, as a pidfd: whether it is gone. `None` if it could not
    /// be opened (an external newcomer in a PID namespace this process
    /// cannot see).
    pidfd: Option<OwnedFd>,
}

impl Newcomer {
    /// Starts the new binary (the probed descriptor) with this process's
    /// arguments and environment, plus `COPYOVER_MIGRATE` naming its end of
    /// a fresh socket pair: that end (and a script's descriptor) is all it
    /// inherits. In a process group of its own, so that a failure kills
    /// whatever a wrapper started; it joins this process's group once it
    /// serves.
    fn start(exe: &Executable, argv: &[CString]) -> io::Result<Newcomer> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let var = MigrateVar {
            socket: theirs.as_raw_fd(),
            from: std::process::id(),
        };
        let mut cmd = command(exe, argv, &clean_env());
        let mut inherited = vec![theirs.as_raw_fd()];
        inherited.extend(exe.script.then(|| exe.fd.as_raw_fd()));
        sys::inherit_only(&mut cmd, inherited);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.env(MIGRATE_VAR, var.format());
        let child = cmd.spawn()?;
        // Only the child holds the other end now: its exit ends the socket.
        drop(theirs);
        Ok(Newcomer {
            pid: child.id(),
            pidfd: sys::pidfd_open(child.id() as i32).ok(),
            child: Some(child),
            sock: ours,
        })
    }

    /// A newcomer that connected to the migration socket: not this
    /// process's child, so never killed or reaped here (on a failure its
    /// socket closes, and it sees this process alive and exits).
    fn external(knock: super::door::Knock) -> Newcomer {
        Newcomer {
            child: None,
            pid: knock.pid,
            pidfd: (knock.pid != 0)
                .then(|| sys::pidfd_open(knock.pid as i32).ok())
                .flatten(),
            sock: knock.sock,
        }
    }

    /// The probe of an external newcomer: the snapshot as it would be handed
    /// over, without descriptors, for it to check (`ok-migrate VERSION`) or
    /// refuse, within `limit`.
    fn probe(&mut self, snapshot: &OwnedFd, limit: Duration) -> Result<String, String> {
        sys::send_message(self.sock.as_fd(), PROBE, &[snapshot.as_raw_fd()])
            .map_err(|e| format!("could not send it the probe: {e}"))?;
        if !matches!(sys::wait_readable(self.sock.as_fd(), limit), Ok(true)) {
            return Err(format!(
                "it did not answer the probe within {} ms (Config::probe_timeout)",
                limit.as_millis()
            ));
        }
        let message = self.read_message().unwrap_or_default();
        match std::str::from_utf8(&message)
            .ok()
            .and_then(|m| m.strip_prefix(OK_MIGRATE))
        {
            Some(version) => Ok(version.to_owned()),
            None if message.is_empty() => Err("it closed the migration socket at the probe".into()),
            None => Err(answer_error(&message)),
        }
    }

    /// Whether it is gone, asked for up to `limit` (its socket closes a
    /// moment before its pidfd says so). Without a pidfd: not known, so
    /// not gone.
    pub(super) fn is_gone(&self, limit: Duration) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return false;
        };
        let until = Instant::now() + limit;
        while Instant::now() < until {
            match sys::wait_readable(pidfd.as_fd(), Duration::from_millis(100)) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    }

    /// Waits for its `hello` (it reached `boot`), for at most `limit` from
    /// its start; says why not otherwise.
    fn await_hello(&mut self, limit: Duration) -> Result<(), String> {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "it did not reach copyover::boot within {} ms (Config::probe_timeout)",
                    limit.as_millis()
                ));
            }
            if matches!(sys::wait_readable(self.sock.as_fd(), left), Ok(true)) {
                break;
            }
        }
        match self.read_message().unwrap_or_default().as_slice() {
            [] => Err(self.how_it_ended()),
            m if m == HELLO => Ok(()),
            m => Err(answer_error(m)),
        }
    }

    /// Between its `hello` and the commit it only waits: a message or the
    /// socket's end now means it failed (or died) meanwhile. Checked at the
    /// commit, before anything is sealed or sent.
    fn still_waiting(&mut self) -> Result<(), String> {
        match sys::wait_readable(self.sock.as_fd(), Duration::ZERO) {
            Ok(false) => Ok(()),
            Ok(true) => Err(match self.read_message().unwrap_or_default().as_slice() {
                [] => self.how_it_ended(),
                m => answer_error(m),
            }),
            Err(e) => Err(format!("could not look at the migration socket: {e}")),
        }
    }

    /// Its PID.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// A second descriptor of our end of the socket pair, for the link of
    /// a gradual migration.
    pub(super) fn link_socket(&self) -> io::Result<OwnedFd> {
        self.sock.try_clone()
    }

    /// Sends one message, retrying while the kernel refuses more
    /// descriptors in flight (`ETOOMANYREFS`: this user's in-flight count
    /// is held to the sender's `RLIMIT_NOFILE`; the newcomer is draining
    /// them), until `deadline`.
    fn send(&self, message: &[u8], fds: &[RawFd], deadline: Instant) -> io::Result<()> {
        loop {
            match sys::send_message(self.sock.as_fd(), message, fds) {
                Err(e) if e.raw_os_error() == Some(libc::ETOOMANYREFS) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "it did not take the descriptors in time",
                    ));
                }
                done => return done,
            }
        }
    }

    /// Waits for `ready` until `deadline`; says why not otherwise. A
    /// shutdown asked of this process meanwhile ends the wait at once.
    fn wait_ready(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        requests: &Requests,
    ) -> Result<(), UpgradeError> {
        let pid = self.pid;
        let failed = |reason: String| UpgradeError::Migration { pid, reason };
        loop {
            if requests.shutdown.load(Ordering::SeqCst) {
                return Err(UpgradeError::Shutdown);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(failed(format!(
                    "it was not ready within {} ms of the commit (Config::ready_timeout of this process)",
                    timeout.as_millis()
                )));
            }
            match sys::wait_readable(self.sock.as_fd(), left.min(Duration::from_millis(50))) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => return Err(failed(format!("could not wait for it: {e}"))),
            }
            let message = match self.read_message() {
                Ok(m) => m,
                Err(e) => return Err(failed(format!("could not read its answer: {e}"))),
            };
            return match message.as_slice() {
                [] => Err(failed(self.how_it_ended())),
                m if m == READY => Ok(()),
                m => Err(failed(answer_error(m))),
            };
        }
    }

    /// A message waiting to be read, in words: a newcomer that cannot take
    /// what it is sent says why (`fail REASON`) and exits while the sending
    /// goes on.
    fn last_word(&self) -> Option<String> {
        if !matches!(
            sys::wait_readable(self.sock.as_fd(), Duration::ZERO),
            Ok(true)
        ) {
            return None;
        }
        let message = self.read_message().ok()?;
        (!message.is_empty()).then(|| answer_error(&message))
    }

    /// Reads one message (empty: the socket's end). A newcomer that exits
    /// with messages of ours unread leaves `ECONNRESET` on our end, which
    /// the kernel reports once, before the messages it sent: read past it.
    fn read_message(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut fds = Vec::new();
        let read =
            |buf: &mut [u8], fds: &mut Vec<OwnedFd>| sys::recv_message(self.sock.as_fd(), buf, fds);
        let n = match read(&mut buf, &mut fds) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                match sys::wait_readable(self.sock.as_fd(), Duration::ZERO) {
                    Ok(true) => read(&mut buf, &mut fds).or(Ok(0)),
                    _ => Ok(0),
                }
            }
            other => other,
        }?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Why the socket ended: the newcomer's exit status, once it has
    /// exited (its socket closes as it exits; it is given 100 ms to finish,
    /// then it is a newcomer that closed the socket and lives on, and is
    /// killed with the rest when dropped). An exited newcomer's group is
    /// killed (a wrapper's leftovers) before it is reaped: until then its
    /// number cannot be reused.
    fn how_it_ended(&mut self) -> String {
        let until = Instant::now() + Duration::from_millis(100);
        while !matches!(sys::has_exited(self.pid as i32), Ok(true)) {
            if Instant::now() >= until {
                return "it closed the migration socket before it was ready".into();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = sys::kill_group(self.pid as i32);
        let Some(mut child) = self.child.take() else {
            return "it ended before it was ready".into();
        };
        match child.wait() {
            Ok(status) => format!("it ended before it was ready: {}", describe(status)),
            Err(e) => format!("it ended before it was ready (its status: {e})"),
        }
    }

    /// After `go`: the newcomer is the server now, never to be killed or
    /// reaped by this process.
    pub(super) fn let_go(&mut self) {
        std::mem::forget(self.child.take());
    }
}

/// A `fail REASON`, or a message that has no place here, in words.
fn answer_error(m: &[u8]) -> String {
    match m.strip_prefix(FAIL.as_bytes()) {
        Some(reason) => format!("it refused: {}", String::from_utf8_lossy(reason)),
        None => format!(
            "it sent {:?}, not a migration answer",
            String::from_utf8_lossy(m)
        ),
    }
}

impl Drop for Newcomer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Its group's number, and its own, are ours until it is reaped: the
        // group is killed first (a wrapper's children), then the child.
        let killed = sys::kill_group(self.pid as i32).is_ok() | child.kill().is_ok();
        if !killed {
            // Not ours to kill any more (it took other credentials): it
            // sees the socket's end, and the old process alive, and exits
            // (see `Arrival::confirm`). Not waited for.
            tracing::warn!(newcomer = self.pid, "could not kill the new process");
            return;
        }
        // Reaped off this thread: tearing down a process that restored the
        // whole state takes time the event loop does not wait for.
        let reaper = std::thread::Builder::new()
            .name("copyover-reap".into())
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(e) = reaper {
            tracing::debug!("reaping the new process here: {e}");
        }
    }
}

/// What the hand-over needs from the runtime.
pub(crate) struct HandOver<'a> {
    pub header: Header,
    pub manifest: &'a Manifest,
    pub newcomer: Newcomer,
    /// The memfd the probe prepared, if it could.
    pub draft: Option<Draft>,
    pub payload_hint: usize,
    pub requests: &'a Requests,
    /// How long the newcomer has from the commit to `ready`.
    pub ready_timeout: Duration,
    /// Who this process is, for its last outcome.
    pub reporter: Reporter,
    /// A gradual migration: what is handed over is the shared part, and
    /// both processes serve after it (`share`, not `go`).
    pub gradual: bool,
    /// After handing over for good, stay until stopped instead of exiting.
    pub stay: bool,
}

/// Seals the state, hands it and every kept descriptor to the newcomer,
/// waits for its `ready`, and exits. Returns an error only if the newcomer
/// did not take over: it is killed then, and this process serves on with
/// everything it had (it closed nothing). A gradual migration's hand-over
/// (of the shared part) returns the newcomer, serving beside this process.
pub(crate) fn hand_over<S: serde::Serialize>(
    state: &S,
    h: HandOver<'_>,
) -> Result<Newcomer, UpgradeError> {
    let HandOver {
        header,
        manifest,
        mut newcomer,
        draft,
        payload_hint,
        requests,
        ready_timeout,
        reporter,
        gradual,
        stay,
    } = h;
    let pid = newcomer.pid();
    let failed = |reason: String| UpgradeError::Migration { pid, reason };
    // Failed or gone since its `hello`: nothing is sealed or sent.
    if let Err(reason) = newcomer.still_waiting() {
        return Err(failed(reason));
    }
    let deadline = Instant::now() + ready_timeout;
    let draft = draft.map_or_else(|| Draft::new(0), Ok);
    let memfd = match draft.and_then(|d| d.seal_state(&header, manifest, state, payload_hint)) {
        Ok((memfd, _)) => memfd,
        Err(e) => return Err(e.into()),
    };
    // This process, as the newcomer can watch it: the end of the socket
    // before `go` means "serve" only if this process is gone by then.
    let me = match sys::pidfd_open(std::process::id() as i32) {
        Ok(fd) => fd,
        Err(source) => {
            return Err(UpgradeError::Io {
                what: "open a pidfd of this process for the new one",
                source,
            });
        }
    };
    // A newcomer that stops reading must not hold this process past its
    // deadline.
    if let Err(e) = sys::set_send_timeout(newcomer.sock.as_fd(), ready_timeout) {
        return Err(UpgradeError::Io {
            what: "set the migration socket's send timeout",
            source: e,
        });
    }
    let fds: Vec<RawFd> = manifest.fds().collect();
    let first = format!("{SNAPSHOT} {}", fds.len());
    let sent = newcomer
        .send(
            first.as_bytes(),
            &[memfd.as_raw_fd(), me.as_raw_fd()],
            deadline,
        )
        .and_then(|()| {
            fds.chunks(sys::MAX_FDS_PER_MESSAGE)
                .try_for_each(|batch| newcomer.send(FDS, batch, deadline))
        });
    drop((memfd, me));
    if let Err(e) = sent {
        // Its `fail REASON`, if it said why before it went away.
        let ended = match (newcomer.last_word(), e.raw_os_error()) {
            (Some(said), _) => said,
            (None, Some(libc::EPIPE | libc::ECONNRESET)) => newcomer.how_it_ended(),
            (None, _) => format!("the hand-over failed: {e}"),
        };
        return Err(failed(ended));
    }
    tracing::debug!(
        newcomer = pid,
        fds = fds.len(),
        "handed over; waiting for the new process"
    );
    // A shutdown asked of this process meanwhile ends the wait: the
    // newcomer is killed, not left to serve what the operator stopped.
    newcomer.wait_ready(deadline, ready_timeout, requests)?;
    if gradual {
        // Both serve from here on; this process keeps every user until it
        // moves them. The send timeout goes: batches have their own.
        newcomer
            .send(SHARE, &[], deadline)
            .map_err(|e| failed(format!("it went away as it became ready ({e})")))?;
        let _ = sys::set_send_timeout(newcomer.sock.as_fd(), Duration::from_secs(5));
        return Ok(newcomer);
    }
    // systemd's status line, which both processes write, hears this one
    // first (one datagram); a `go` that then fails is a rollback, which
    // says so.
    crate::status::announce_migrated(pid);
    // The point of no return: from `go` on, the newcomer serves.
    if let Err(e) = newcomer.send(GO, &[], deadline) {
        return Err(failed(format!("it went away as it became ready ({e})")));
    }
    leave(newcomer, requests, &reporter, stay.then_some(fds))
}

/// After `go`: the newcomer is let go first (nothing here may kill it any
/// more), requests that came meanwhile are passed on to it (a shutdown
/// too), the status file (and systemd's status line) says where the server
/// went, and this process exits. No destructor runs: every descriptor is
/// the newcomer's now, and this process's copies close with it. (The
/// kernel tears the memory down before it closes them: until then, a
/// connection the newcomer closes sends no FIN.) The newcomer tells systemd
/// it is the main process once this one is gone. Before it exits, this
/// process waits for the newcomer to join its process group (`joined`):
/// the group a supervisor or a terminal signals then still holds the
/// server.
fn leave(
    newcomer: Newcomer,
    requests: &Requests,
    reporter: &Reporter,
    stay: Option<Vec<RawFd>>,
) -> ! {
    let waiter = newcomer.sock.try_clone().ok();
    leave_with(newcomer, requests, reporter, stay, move || {
        if let Some(sock) = waiter
            && matches!(
                sys::wait_readable(sock.as_fd(), Duration::from_secs(1)),
                Ok(true)
            )
        {
            let mut buf = [0u8; 16];
            let _ = sys::recv_message(sock.as_fd(), &mut buf, &mut Vec::new());
        }
    })
}

/// [`leave`], with `await_joined` waiting (a second at most) for the
/// newcomer's `joined`. With `stay` (the descriptors handed over), this
/// process closes those and stays, serving nobody, until it is asked to
/// stop (SIGTERM, SIGINT).
pub(super) fn leave_with(
    mut newcomer: Newcomer,
    requests: &Requests,
    reporter: &Reporter,
    stay: Option<Vec<RawFd>>,
    await_joined: impl FnOnce(),
) -> ! {
    let pid = newcomer.pid();
    newcomer.let_go();
    pass_on(newcomer.pidfd.as_ref().map(|p| p.as_fd()), pid, requests);
    crate::status::report(Outcome::Migrated { to: pid }, reporter);
    await_joined();
    if let Some(fds) = stay {
        stay_until_stopped(&fds, requests);
    }
    std::process::exit(0)
}

/// Drops this process's copies of what it handed over (the new process's
/// connections must end when it closes them: each number is pointed at
/// `/dev/null`), then waits for SIGTERM or SIGINT and exits 0. The
/// application's code on this thread never runs again; no destructor runs.
fn stay_until_stopped(fds: &[RawFd], requests: &Requests) -> ! {
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            for fd in fds {
                if let Err(e) = sys::close_handed_over(null.as_fd(), *fd) {
                    tracing::error!(
                        fd,
                        "could not let go of a handed-over descriptor ({e}): exiting instead of staying"
                    );
                    std::process::exit(0);
                }
            }
        }
        Err(e) => {
            tracing::error!("could not open /dev/null ({e}): exiting instead of staying");
            std::process::exit(0);
        }
    }
    tracing::info!("migrated: staying, serving nobody, until stopped (SIGTERM)");
    while !crate::signal::take(&requests.shutdown) {
        // The new process, once it exits, is reaped (it was this one's
        // child).
        sys::reap_exited_children();
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopped after the migration");
    std::process::exit(0)
}

/// Requests that reached this process and that it will not serve (it
/// exits) go to the process that serves on (`pidfd`; `pid` only names it in
/// the log): an upgrade, a migration, a snapshot, a shutdown. Through its
/// pidfd, never by number: a number seen from another PID namespace names
/// another process here. Without one, they are logged and dropped.
pub(super) fn pass_on(pidfd: Option<BorrowedFd<'_>>, pid: u32, requests: &Requests) {
    for (flag, sig, what) in [
        (&requests.upgrade, libc::SIGHUP, "an upgrade"),
        (&requests.migrate, libc::SIGUSR2, "a migration"),
        (&requests.save, libc::SIGUSR1, "a snapshot"),
        (&requests.shutdown, libc::SIGTERM, "a shutdown"),
    ] {
        if !crate::signal::take(flag) {
            continue;
        }
        let passed = pidfd.map(|fd| sys::pidfd_signal(fd, sig));
        if !matches!(passed, Some(Ok(()))) {
            tracing::warn!(
                to = pid,
                ?passed,
                "{what} asked of this process could not be passed on to process {pid}: ask it there"
            );
        }
    }
}

/// A migration's newcomer being started on the runtime's helper thread
/// (its `fork` copies this process's page tables: long for a large heap,
/// and not the event loop's to wait for), until it says `hello`. The event
/// loop is woken when [`take`](Self::take) has the result. Dropped before
/// that, the newcomer is killed when the thread is done with it.
#[derive(Debug)]
pub(crate) struct Arriving {
    slot: Arc<Mutex<Option<Result<Newcomer, UpgradeError>>>>,
}

impl Arriving {
    /// Queues the start: the probed binary, with these arguments; `limit`
    /// for it to reach `boot`; `wake` written to when it is known.
    pub(crate) fn start(
        worker: &Worker,
        exe: Arc<Executable>,
        argv: Vec<CString>,
        limit: Duration,
        wake: Arc<OwnedFd>,
    ) -> io::Result<Arriving> {
        Arriving::on_worker(worker, wake, move || {
            let mut n = Newcomer::start(&exe, &argv).map_err(|source| UpgradeError::Io {
                what: "start the new process",
                source,
            })?;
            tracing::debug!(newcomer = n.pid(), "migration: the new process is starting");
            match n.await_hello(limit) {
                Ok(()) => Ok(n),
                Err(reason) => Err(UpgradeError::Migration {
                    pid: n.pid(),
                    reason,
                }),
            }
        })
    }

    /// Queues the probe of an external newcomer (it said `hello` at the
    /// door already): `snapshot` as it would be handed over, without
    /// descriptors; `limit` for its answer.
    pub(crate) fn external(
        worker: &Worker,
        knock: super::door::Knock,
        snapshot: OwnedFd,
        limit: Duration,
        wake: Arc<OwnedFd>,
    ) -> io::Result<Arriving> {
        let uid = knock.uid;
        Arriving::on_worker(worker, wake, move || {
            let mut n = Newcomer::external(knock);
            match n.probe(&snapshot, limit) {
                Ok(version) => {
                    tracing::info!(newcomer = n.pid(), uid, %version, "the external newcomer accepted the snapshot");
                    Ok(n)
                }
                Err(reason) => Err(UpgradeError::Migration {
                    pid: n.pid(),
                    reason,
                }),
            }
        })
    }

    /// Runs `arrive` on the helper thread; its result waits in the slot
    /// [`take`](Self::take) reads, and `wake` wakes the event loop then.
    fn on_worker(
        worker: &Worker,
        wake: Arc<OwnedFd>,
        arrive: impl FnOnce() -> Result<Newcomer, UpgradeError> + Send + 'static,
    ) -> io::Result<Arriving> {
        let slot = Arc::new(Mutex::new(None));
        let theirs = Arc::clone(&slot);
        worker.run(move || {
            let result = arrive();
            *theirs.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
            crate::signal::wake(&wake);
        })?;
        Ok(Arriving { slot })
    }

    /// The newcomer once it said `hello`, or why it did not; `None` while
    /// it is starting.
    pub(crate) fn take(&self) -> Option<Result<Newcomer, UpgradeError>> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}
